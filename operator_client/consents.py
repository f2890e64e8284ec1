"""`opconnect operator consents ...`: the operator's consents with its customers, on the client
library (`opconnect_client`).

`list` shows them (a state filter), `watch` follows their changes (list first, then every change;
with `--checkpoint FILE` a later run resumes after the last change shown), and `accept`,
`decline`, `terminate` move one (the last two with a reason). Moving a consent to the state it
is in changes nothing, so running a command again is safe.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from rich.console import Console

from opconnect.numbers.v1 import consents_pb2 as pb
from opconnect_client import Client, ClientError, Connection, ServerError
from opconnect_client.checkpoints import Checkpoint, FileCheckpoint, MemoryCheckpoint

STATES = {
    "requested": pb.CONSENT_STATE_REQUESTED,
    "active": pb.CONSENT_STATE_ACTIVE,
    "declined": pb.CONSENT_STATE_DECLINED,
    "terminated": pb.CONSENT_STATE_TERMINATED,
    "withdrawn": pb.CONSENT_STATE_WITHDRAWN,
}
REASONS = {
    "region-not-served": pb.CONSENT_REASON_REGION_NOT_SERVED,
    "customer-not-verified": pb.CONSENT_REASON_CUSTOMER_NOT_VERIFIED,
    "no-agreement": pb.CONSENT_REASON_NO_AGREEMENT,
    "non-payment": pb.CONSENT_REASON_NON_PAYMENT,
    "customer-request": pb.CONSENT_REASON_CUSTOMER_REQUEST,
    "other": pb.CONSENT_REASON_OTHER,
}
MOVES = {"accept": pb.CONSENT_STATE_ACTIVE, "decline": pb.CONSENT_STATE_DECLINED}
MOVES["terminate"] = pb.CONSENT_STATE_TERMINATED


def add_parser(operator_commands: Any) -> None:
    """The `consents` sub-commands, under `opconnect operator` (its sub-parsers)."""
    consents = operator_commands.add_parser("consents", help="the consents of your customers")
    sub = consents.add_subparsers(dest="consents", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="your consents, by tenant")
    listing.add_argument("--state", choices=sorted(STATES), help="only consents in this state")
    watch = sub.add_parser("watch", help="list, then follow every change (Ctrl-C to stop)")
    watch.add_argument("--checkpoint", help="a file keeping where to resume (default: none)")
    watch.add_argument("--count", type=int, help="stop after N changes (default: never)")
    for name in MOVES:
        move = sub.add_parser(name, help=f"{name} the consent with a tenant")
        move.add_argument("tenant", help="the customer tenant id (GUID)")
        if name != "accept":
            move.add_argument(
                "--reason",
                required=True,
                choices=sorted(REASONS),
                help="why, one of the program's reasons (required to decline or terminate)",
            )


def _name(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower().replace("_", "-")


def state_name(value: int) -> str:
    return _name(value, pb.ConsentState, "CONSENT_STATE_")


def reason_name(value: int) -> str:
    return "" if not value else _name(value, pb.ConsentReason, "CONSENT_REASON_")


def _row(consent: pb.Consent) -> tuple[str, str, str, str]:
    updated = consent.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    return consent.tenant_id, state_name(consent.state), reason_name(consent.reason), updated


def _say(console: Console, text: str) -> None:
    """One line as it is (never wrapped or coloured: scripts read it)."""
    console.print(text.rstrip(), soft_wrap=True, highlight=False, markup=False)


async def _list(client: Client, state: str | None, console: Console) -> int:
    wanted = STATES[state] if state else pb.CONSENT_STATE_UNSPECIFIED
    async for page in client.list_consents(wanted):
        for consent in page.consents:
            tenant, state_shown, reason, updated = _row(consent)
            _say(console, f"{updated}  {tenant}  {state_shown} {reason}")
    return 0


async def _watch(
    client: Client, checkpoint: Checkpoint, count: int | None, console: Console
) -> int:
    """Print the listing (a first run), then every change; with `count`, stop after that many
    changes (0: once the listing is shown), their cursor saved as processed."""
    shown = 0
    async for batch in client.watch_consents(checkpoint=checkpoint):
        if batch.listing:
            for consent in batch.items:
                tenant, state, reason, updated = _row(consent)
                _say(console, f"{updated}  {tenant}  {state} {reason}")
            if batch.cursor and count == 0:
                checkpoint.save(batch.cursor)
                return 0
            continue
        for event in batch.items:
            tenant, state, reason, updated = _row(event.consent)
            before = state_name(event.previous_state) if event.previous_state else "none"
            _say(console, f"{updated}  {tenant}  {before} -> {state} {reason}")
            shown += 1
            if count is not None and shown >= count:
                checkpoint.save(event.cursor)
                return 0
    return 0


async def _move(client: Client, args: argparse.Namespace, console: Console) -> int:
    reason = pb.CONSENT_REASON_UNSPECIFIED
    if getattr(args, "reason", None):
        reason = REASONS[args.reason]
    consent = await client.update_consent_status(args.tenant, MOVES[args.consents], reason)
    tenant, state, shown_reason, _ = _row(consent)
    _say(console, f"{tenant}: {state} {shown_reason}")
    return 0


async def run(args: argparse.Namespace, connection: Connection, console: Console) -> int:
    """One `opconnect operator consents` command; its exit status."""
    async with Client(connection) as client:
        if args.consents == "list":
            return await _list(client, args.state, console)
        if args.consents == "watch":
            checkpoint: Checkpoint = (
                FileCheckpoint(args.checkpoint) if args.checkpoint else MemoryCheckpoint()
            )
            return await _watch(client, checkpoint, args.count, console)
        return await _move(client, args, console)


def main(
    args: argparse.Namespace, target: str, files: tuple[Path, Path, Path], console: Console
) -> int:
    """`files`: the CA, the operator's certificate and its key."""
    return command(Connection(target, *files), args, console)


def command(
    connection: Connection, args: argparse.Namespace, console: Console | None = None
) -> int:
    """One `opconnect operator consents` command on `connection`; its exit status (Ctrl-C: 130,
    a refusal: 1 with the server's status and reason printed)."""
    console = console or Console()
    try:
        return asyncio.run(run(args, connection, console))
    except KeyboardInterrupt:
        return 130
    except (ClientError, ServerError) as error:  # a ServerError: the server's status, reason
        _say(console, f"opconnect: {error}")
        return 1
