"""The composition root: what each process runs (roles.py), starting and stopping it
(runtime.py), and the `opconnect` command (cli.py)."""
