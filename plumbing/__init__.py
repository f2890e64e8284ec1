"""Plumbing every opconnect service shares: configuration, storage, change logs and cursors,
errors, logging and the per-RPC wrapper. Nothing service-specific lives here."""
