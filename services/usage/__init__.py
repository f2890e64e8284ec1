"""Call durations from operators: ingest, customer usage and reconciliation (DESIGN.md, flow 3)."""
