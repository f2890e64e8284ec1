"""Keep your emergency routing table (number -> emergency location) from WatchAssignments.

    python examples/python/emergency_routes.py --target localhost:50051 --ca var/pki/ca.pem \\
        --cert var/pki/clients/operator-contoso-telecom.pem \\
        --key var/pki/clients/operator-contoso-telecom.key --database routes.db

The table `emergency_routes` of the SQLite database holds a row per assigned number: its
tenant, SIP URI, civic address and location ids, the address on one line, the location's
description and ELIN (empty while the customer has not set the number's address yet). An
ASSIGNED or UPDATED event writes the row, UNASSIGNED deletes it; a first run (or a run after the
saved cursor fell past the platform's retention) fills the table from the listing. Each batch
and its cursor commit in one transaction, so a restart resumes exactly after the last batch
applied. Prints a JSON line per row written or deleted.
"""

import argparse
import asyncio
import contextlib
import json
import sqlite3

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from opconnect_client import Client, Connection, SqliteCheckpoint

TABLE = """CREATE TABLE IF NOT EXISTS emergency_routes (
    phone_number TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, sip_uri TEXT NOT NULL,
    civic_address_id TEXT NOT NULL, location_id TEXT NOT NULL, address TEXT NOT NULL,
    location TEXT NOT NULL, elin TEXT NOT NULL)"""


class Committed(SqliteCheckpoint):
    """The cursor, saved by `apply` in the batch's own transaction: the library's own save
    (when the next batch is asked for) has nothing left to do."""

    def save(self, cursor: str, connection: sqlite3.Connection | None = None) -> None:
        if connection is not None:
            super().save(cursor, connection)


def one_line(address: addresses_pb.CivicAddress) -> str:
    street = " ".join(
        part
        for part in (
            address.house_number + address.house_number_suffix,
            address.pre_directional,
            address.street_name,
            address.street_suffix,
            address.post_directional,
        )
        if part
    )
    region = " ".join(p for p in (address.state_or_province, address.postal_code) if p)
    return ", ".join(p for p in (street, address.city, region, address.country_code) if p)


def route(
    db: sqlite3.Connection,
    item: numbers_pb.PhoneNumber | numbers_pb.AssignmentEvent,
    assigned: bool,
) -> dict[str, object]:
    """Write (or, for a number no longer assigned, delete) one number's row."""
    if not assigned:
        db.execute("DELETE FROM emergency_routes WHERE phone_number = ?", (item.phone_number,))
        return {"phone_number": item.phone_number, "route": None}
    where = item.emergency_location
    row = {
        "phone_number": item.phone_number,
        "tenant_id": item.tenant_id,
        "sip_uri": item.sip_uri,
        "civic_address_id": where.civic_address.civic_address_id,
        "location_id": where.location.location_id,
        "address": one_line(where.civic_address) if item.HasField("emergency_location") else "",
        "location": where.location.description,
        "elin": where.location.elin,
    }
    db.execute(
        "INSERT OR REPLACE INTO emergency_routes VALUES (:phone_number, :tenant_id, :sip_uri,"
        " :civic_address_id, :location_id, :address, :location, :elin)",
        row,
    )
    return {"phone_number": item.phone_number, "route": row}


async def main(args: argparse.Namespace) -> None:
    db = sqlite3.connect(args.database)
    with db:
        db.execute(TABLE)
    checkpoint = Committed(args.database, "emergency-routes")
    connection = Connection(args.target, args.ca, args.cert, args.key)
    listing = False
    async with Client(connection) as client:
        async for batch in client.watch_assignments(checkpoint=checkpoint):
            lines = []
            with db:  # the batch and its cursor, in one transaction
                if batch.listing and not listing:
                    db.execute("DELETE FROM emergency_routes")  # the listing is the whole state
                listing = batch.listing
                for item in batch.items:  # PhoneNumber when listing, else AssignmentEvent
                    if batch.listing:
                        assigned = item.state == state_pb.ASSIGNMENT_STATE_ASSIGNED
                    else:
                        assigned = item.type != numbers_pb.ASSIGNMENT_EVENT_TYPE_UNASSIGNED
                    lines.append(route(db, item, assigned))
                if batch.cursor:
                    checkpoint.save(batch.cursor, db)
            for line in lines:
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("target", "ca", "cert", "key", "database"):
        parser.add_argument(f"--{name}", required=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))
