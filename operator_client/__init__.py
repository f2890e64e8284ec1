"""An operator's command-line client: submit call durations from CSV, show usage and
reconciliation (`opconnect operator ...`)."""
