"""Watch your number assignments, resuming after any disconnect or restart.

    python examples/python/watch_assignments.py --target localhost:50051 --ca var/pki/ca.pem \\
        --cert var/pki/clients/operator-contoso-telecom.pem \\
        --key var/pki/clients/operator-contoso-telecom.key --checkpoint assignments.cursor

Prints one JSON line per number listed (a first run, or after the saved cursor expired) and per
assignment event. The checkpoint saves a batch's cursor once you ask for the next batch, so a
restart resumes right after the last batch this loop finished.
"""

import argparse
import asyncio
import contextlib
import json

from google.protobuf.json_format import MessageToDict

from opconnect_client import Client, Connection, FileCheckpoint


async def main(args: argparse.Namespace) -> None:
    connection = Connection(args.target, args.ca, args.cert, args.key)
    async with Client(connection) as client:
        checkpoint = FileCheckpoint(args.checkpoint)
        async for batch in client.watch_assignments(checkpoint=checkpoint):
            for item in batch.items:  # PhoneNumber when batch.listing, else AssignmentEvent
                line = MessageToDict(item, preserving_proto_field_name=True)
                print(json.dumps({"listing": True, **line} if batch.listing else line), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("target", "ca", "cert", "key", "checkpoint"):
        parser.add_argument(f"--{name}", required=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))
