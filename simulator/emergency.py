"""The simulator's address change: the operator edits the civic address of an assigned number,
and a watch of the operator's assignments sees the UPDATED event carrying the new emergency
location (as a carrier's emergency routing table would take it in).

The watch starts from a listing's cursor taken before the edit (list-then-watch), so the event
cannot be missed however late the stream opens. The edit changes the address's `description`
(a note for people) to one naming this run (its time and a random id), so every run
changes it, and the numbers uploaded
keep the same address id (a rerun's upload is still ALREADY_PRESENT). Every assigned number
that refers to the address gets an UPDATED event: the watch waits for each of them.
Nothing of the address is printed but its id: addresses are personal data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from opconnect_client import Client, Connection, MemoryCheckpoint, ServerError
from plumbing.logs import mask_number, redact

WATCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AddressChange:
    """What the exercise did: the address edited, the number whose address it is, how many
    UPDATED events with the new location the watch saw (one per assigned number referring to
    the address), and what went wrong, if anything."""

    civic_address_id: str = ""
    phone_number: str = ""
    updated_events: int = 0
    problem: str = ""

    def summary(self) -> str:
        if self.problem:
            return f"address change: {self.problem}"
        return (
            f"address change: the operator edited civic address {self.civic_address_id}; the"
            f" watch saw {self.updated_events} UPDATED event(s) with the new emergency location,"
            f" one per assigned number at that address ({mask_number(self.phone_number)}'s"
            " among them)"
        )


async def _watch_for(client: Client, tenant: str, cursor: str, numbers: set[str], note: str) -> int:
    """Watch the tenant's assignments after `cursor` until every one of `numbers` had its
    UPDATED event whose emergency location carries `note`; how many such events came."""
    seen: set[str] = set()
    count = 0
    stream = client.watch_assignments(
        checkpoint=MemoryCheckpoint(cursor), tenant_id=tenant, list_first=False
    )
    try:
        async for batch in stream:
            for event in batch.items:
                if event.type != numbers_pb.ASSIGNMENT_EVENT_TYPE_UPDATED:
                    continue
                if event.emergency_location.civic_address.description != note:
                    continue
                count += 1
                seen.add(event.phone_number)
            if numbers <= seen:
                return count
    finally:
        await stream.aclose()
    return count


async def _at_address(client: Client, tenant: str, address_id: str) -> tuple[set[str], str]:
    """The tenant's assigned numbers that refer to the address, and the cursor of a watch from
    this listing."""
    numbers: set[str] = set()
    cursor = ""
    async for page in client.list_numbers(tenant, state_pb.ASSIGNMENT_STATE_ASSIGNED):
        cursor = cursor or page.watch_cursor
        numbers.update(n.phone_number for n in page.numbers if n.civic_address_id == address_id)
    return numbers, cursor


async def change_address(connection: Connection, tenant: str, number: str) -> AddressChange:
    """Edit the civic address of the assigned `number` as the operator, and watch for its
    UPDATED event (see the module docstring)."""
    async with Client(connection) as client:
        try:
            held = await client.get_number(number)
            if not held.civic_address_id:
                return AddressChange(phone_number=number, problem="skipped (no address to edit)")
            address_id = held.civic_address_id
            numbers, cursor = await _at_address(client, tenant, address_id)
            # Its own on every run, also of two runs within a second (an edit that leaves the
            # address as it was changes nothing, and no event would come).
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            run = uuid.uuid4().hex[:8]
            note = f"emergency address checked by opconnect simulate at {now} (run {run})"
            edit = addresses_pb.CivicAddress(civic_address_id=address_id, description=note)
            watching = asyncio.create_task(_watch_for(client, tenant, cursor, numbers, note))
            try:
                await client.update_civic_address(edit, ["description"])
                count = await asyncio.wait_for(watching, WATCH_TIMEOUT_S)
            finally:
                watching.cancel()
        except ServerError as error:
            return AddressChange(phone_number=number, problem=f"failed: {redact(str(error))}")
        except TimeoutError:
            return AddressChange(
                address_id,
                number,
                problem=f"the watch did not see every UPDATED event within {WATCH_TIMEOUT_S:.0f} s",
            )
    return AddressChange(address_id, number, count)
