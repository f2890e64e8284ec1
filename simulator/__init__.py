"""The traffic simulator behind `opconnect simulate`: `calls` makes realistic call records (pure,
deterministic), `run` uploads and assigns numbers and publishes the records to a running system.
"""
