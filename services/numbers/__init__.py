"""Numbers, platform -> operator: uploads, assignments from the Teams admin center, and the
assignment change log operators watch. storage.py holds the tables and units of work, rules.py
the domain types and checks, convert.py the protobuf edge, servicer.py the RPC handlers."""
