"""Follow your call records into a JSON-lines file, resuming where you stopped.

    python examples/python/follow_records.py --target localhost:50051 --ca var/pki/ca.pem \\
        --cert var/pki/clients/operator-contoso-telecom.pem \\
        --key var/pki/clients/operator-contoso-telecom.key \\
        --checkpoint records.db --out records.jsonl

The cursor is kept in SQLite: save it in the same transaction as your own work on a batch
(here, the batch's rows) and a crash can neither lose nor repeat a record. (This example
appends to a file instead, so a crash between the write and the save can repeat one batch;
`opconnect operator records follow` does that part exactly-once.)
"""

import argparse
import asyncio
import contextlib
import json

from google.protobuf.json_format import MessageToDict

from opconnect_client import EPOCH, Client, Connection, SqliteCheckpoint


async def main(args: argparse.Namespace) -> None:
    connection = Connection(args.target, args.ca, args.cert, args.key)
    checkpoint = SqliteCheckpoint(args.checkpoint, "records")
    async with Client(connection) as client:
        stream = client.follow_records(checkpoint=checkpoint, start_time=EPOCH)
        async for batch in stream:
            if batch.gap:
                print("records were purged before they could be read; continuing after them")
            with open(args.out, "a") as out:
                for record in batch.items:
                    line = MessageToDict(record, preserving_proto_field_name=True)
                    out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("target", "ca", "cert", "key", "checkpoint", "out"):
        parser.add_argument(f"--{name}", required=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))
