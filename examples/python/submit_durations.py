"""Submit your call durations: every record stored once, whatever breaks on the way.

    python examples/python/submit_durations.py --target localhost:50051 --ca var/pki/ca.pem \\
        --cert var/pki/clients/operator-contoso-telecom.pem \\
        --key var/pki/clients/operator-contoso-telecom.key durations.jsonl

Each line of the file is a CallDurationRecord in the contract's JSON form, e.g.
{"record_id": "cdr-1", "call_id": "...", "tenant_id": "...", "caller": "+442071838750",
 "callee": "+14255550100", "direction": "CALL_DIRECTION_INBOUND",
 "start_time": "2026-11-28T10:00:00Z", "end_time": "2026-11-28T10:02:00Z", "duration": "120s"}
Batches of 1,000 are pipelined; after a broken stream the library waits (as the server's
RetryInfo says) and sends again exactly the batches not acknowledged.
"""

import argparse
import asyncio
import json
from collections import Counter
from collections.abc import Iterator

from google.protobuf.json_format import ParseDict

from opconnect.usage.v1 import usage_pb2
from opconnect_client import Client, Connection


def records(path: str) -> Iterator[usage_pb2.CallDurationRecord]:
    with open(path) as lines:
        for line in lines:
            if line.strip():
                yield ParseDict(json.loads(line), usage_pb2.CallDurationRecord())


async def main(args: argparse.Namespace) -> None:
    connection = Connection(args.target, args.ca, args.cert, args.key)
    outcomes: Counter[str] = Counter()
    async with Client(connection) as client:
        async for batch in client.submit_durations(records(args.file)):
            for record, result in zip(batch.records, batch.results, strict=True):
                outcome = usage_pb2.CallDurationOutcome.Name(result.outcome)
                outcomes[outcome] += 1
                if result.outcome == usage_pb2.CALL_DURATION_OUTCOME_REFUSED:
                    print(f"{record.record_id}: {result.reason} ({result.field}): {result.message}")
    print(json.dumps(dict(outcomes)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("target", "ca", "cert", "key"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("file")
    asyncio.run(main(parser.parse_args()))
