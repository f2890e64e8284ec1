"""Call records and quality, platform -> operator (issue 3). So far: the quality rules
(quality.py); storage, handlers and the protobuf edge come next."""
