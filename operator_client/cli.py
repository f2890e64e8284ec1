"""The `opconnect operator ...` commands: their arguments (with help for every one) and how
each runs, on the client library (`opconnect_client`).

Every command prints tables for people, or JSON for machines with `--output json` (stdout holds
JSON only; messages go to stderr). A problem on the client's side (`ClientError`: a file, an
option) or an error the server answered (`ServerError`) is one line, `opconnect: ...`, and exit
status 1; a usage error is argparse's, status 2; Ctrl-C stops cleanly with status 130.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
from pathlib import Path
from typing import Any

from opconnect_client import Client, ClientError, Connection, ServerError
from operator_client import addresses, commands, consents, numbers, records
from operator_client.output import Output
from operator_client.times import FORMS, time_argument

INTERRUPTED = 130
TIME_HELP = f"accepts {FORMS}"


class Parser(argparse.ArgumentParser):
    """argparse, with a relative time (`--start -2h`) read as a value, as it reads `-2`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+[smhdw]$")


def _output_option() -> Parser:
    common = Parser(add_help=False)
    common.add_argument(
        "--output",
        choices=["table", "json"],
        default="table",
        help="table: for people (default); json: machine-readable JSON on stdout",
    )
    return common


def _period(parser: argparse.ArgumentParser, start: str) -> None:
    parser.add_argument(
        "--start", type=time_argument, help=f"from this time (default: {start}); {TIME_HELP}"
    )
    parser.add_argument(
        "--end", type=time_argument, help=f"until this time (default: now); {TIME_HELP}"
    )


def add_commands(op: argparse.ArgumentParser) -> None:
    """The subcommands of `opconnect operator` (its connection options are the caller's)."""
    output = _output_option()
    opc = op.add_subparsers(dest="operator", required=True, metavar="COMMAND", parser_class=Parser)

    submit = opc.add_parser(
        "submit",
        parents=[output],
        help="submit call durations from a CSV file (resumable)",
        description="Submit call durations from a CSV file with the columns record_id,call_id,"
        "tenant_id,caller,callee,direction,start_time,end_time,duration_s. Starts at once;"
        " Ctrl-C, then run again to resume after the last acknowledged line (FILE.progress)."
        " Two submits of one file at once are refused (FILE.progress.lock).",
    )
    submit.add_argument("file", type=Path, metavar="FILE.csv", help="the durations file")

    usage = opc.add_parser(
        "usage", parents=[output], help="your usage per tenant, day or month, direction"
    )
    _period(usage, "30 days ago")
    usage.add_argument("--tenant", default="", help="only this tenant (GUID)")
    usage.add_argument("--monthly", action="store_true", help="a row per month, not per day")

    reconcile = opc.add_parser(
        "reconcile",
        parents=[output],
        help="compare your durations with the platform's calls",
    )
    _period(reconcile, "30 days ago")
    reconcile.add_argument("--tenant", default="", help="only this tenant (GUID)")
    reconcile.add_argument(
        "--show", type=int, default=20, help="how many discrepancies to list (default 20)"
    )

    consents.add_parser(opc)
    addresses.add_parser(opc, output)

    num = opc.add_parser(
        "numbers", help="your numbers: list, get, upload, update, release, watch assignments"
    ).add_subparsers(dest="numbers", required=True, metavar="COMMAND")
    listing = num.add_parser("list", parents=[output], help="list your numbers")
    listing.add_argument("--tenant", default="", help="only this tenant's numbers (GUID)")
    listing.add_argument(
        "--state", choices=sorted(numbers.STATES), help="only assigned or unassigned numbers"
    )
    got = num.add_parser("get", parents=[output], help="one number")
    got.add_argument("number", metavar="NUMBER", help="the number, E.164 (+14255550100)")
    up = num.add_parser(
        "upload",
        parents=[output],
        help="upload up to 10,000 numbers from a CSV file, with a result per row",
        description="Upload numbers for a customer tenant from a CSV file with the header"
        " phone_number,usage,inbound,outbound (usage: user, voice_app or conference;"
        " inbound/outbound: yes or no) and, each optional, the columns calling_profile_id,"
        " civic_address_id, location_id, allow_tenant_address_update (yes or no),"
        " iso_country_code, ticket_id. A user number needs a civic_address_id unless"
        " allow_tenant_address_update lets the customer set it. At most 10,000 rows; a row"
        " that cannot be read is reported with its line number and not sent.",
    )
    up.add_argument("file", type=Path, metavar="FILE.csv", help="the numbers to upload")
    up.add_argument("--tenant", required=True, help="the customer tenant (GUID)")
    upd = num.add_parser(
        "update",
        parents=[output],
        help="change a number's address, location, calling profile or ticket",
        description="Change the fields of one of your numbers whose options are given (an"
        " empty value clears one). An assigned number whose emergency location changes gets"
        " an UPDATED assignment event.",
    )
    upd.add_argument("number", metavar="NUMBER", help="the number, E.164 (+14255550100)")
    upd.add_argument(
        "--civic-address-id", help="its civic address (opconnect operator addresses list)"
    )
    upd.add_argument("--location-id", help="a location inside that address (empty: none)")
    upd.add_argument(
        "--allow-tenant-address-update",
        action=argparse.BooleanOptionalAction,
        help="whether the customer may set the number's emergency address in Teams",
    )
    upd.add_argument("--calling-profile-id", help="your calling profile for it (GUID)")
    upd.add_argument("--ticket-id", help="your own reference, up to 64 characters")
    rel = num.add_parser(
        "release", parents=[output], help="release unassigned numbers, with a result per number"
    )
    rel.add_argument("number", nargs="*", metavar="NUMBER", help="numbers to release, E.164")
    rel.add_argument(
        "--file",
        type=Path,
        help="also the numbers in this file, one a line (or a CSV whose first column they are)",
    )
    watch = num.add_parser(
        "watch",
        help="print assignment changes as JSON lines, for ever, resumable",
        description="List-then-watch: on a first run (and when the saved cursor is past the"
        ' platform\'s retention) every number is printed first with "listing": true, then'
        " every assignment change as it happens. The cursor is saved in the checkpoint file"
        " after each batch is printed: run again to resume there. Ctrl-C to stop.",
    )
    watch.add_argument("--checkpoint", type=Path, required=True, help="where the cursor is kept")
    watch.add_argument("--tenant", default="", help="only this tenant's numbers (GUID)")
    watch.add_argument(
        "--output",
        choices=["json", "table"],
        default="json",
        help="json: a JSON line per number or event (default); table: a line for people",
    )

    rec = opc.add_parser(
        "records", help="your call records: follow to a file, get one, quality summary"
    ).add_subparsers(dest="records", required=True, metavar="COMMAND")
    follow = rec.add_parser(
        "follow",
        parents=[output],
        help="append call records to a file, exactly once across kills",
        description="Append your call records to a JSON lines (.jsonl) or CSV (.csv) file as"
        " they are published. The checkpoint holds the stream's cursor and the file's length;"
        " after a crash or a kill, run again with the same --out and --checkpoint: the file is"
        " cut back to its checkpointed length and the stream resumes there, so every record"
        " is in the file once, in order.",
    )
    follow.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="FILE.jsonl or FILE.csv"
    )
    follow.add_argument("--checkpoint", type=Path, required=True, help="cursor and file length")
    follow.add_argument(
        "--start",
        type=time_argument,
        help=f"on a first run, from records published at this time (default: from now);"
        f" {TIME_HELP}",
    )
    follow.add_argument("--tenant", default="", help="only this tenant's calls (GUID)")
    follow.add_argument("--number", default="", help="only calls from or to this number")
    follow.add_argument("--poor-only", action="store_true", help="only calls of POOR quality")
    follow.add_argument(
        "--no-follow",
        action="store_true",
        help="stop once the records published so far are written (default: follow for ever)",
    )
    rget = rec.add_parser("get", parents=[output], help="one call record")
    rget.add_argument("call_id", metavar="CALL_ID", help="the platform's call id")
    summary = rec.add_parser(
        "summary", parents=[output], help="call quality of a period, per tenant or trunk"
    )
    _period(summary, "24 hours ago")
    summary.add_argument(
        "--group-by", choices=sorted(records.GROUP_BY), default="none", help="a row per group"
    )
    summary.add_argument("--tenant", default="", help="only this tenant's calls (GUID)")


async def _dispatch(client: Client, args: argparse.Namespace, out: Output) -> int:
    now = dt.datetime.now(dt.UTC)
    if args.operator == "submit":
        return await commands.submit(client, args.file, out)
    if args.operator in ("usage", "reconcile"):
        start = args.start or now - dt.timedelta(days=30)
        end = args.end or now
        if args.operator == "usage":
            return await commands.usage(
                client, start=start, end=end, monthly=args.monthly, tenant=args.tenant, out=out
            )
        return await commands.reconcile(
            client, start=start, end=end, tenant=args.tenant, show=args.show, out=out
        )
    if args.operator == "numbers":
        if args.numbers == "list":
            return await numbers.list_numbers(client, args.tenant, args.state or "", out)
        if args.numbers == "get":
            return await numbers.get_number(client, args.number, out)
        if args.numbers == "upload":
            return await numbers.upload(client, args.file, args.tenant, out)
        if args.numbers == "update":
            given = {k: getattr(args, k) for k in numbers.UPDATABLE}
            given = {k: v for k, v in given.items() if v is not None}
            return await numbers.update_number(client, args.number, given, out)
        if args.numbers == "release":
            listed = list(numbers.iter_numbers(args.number, args.file))
            return await numbers.release(client, listed, out)
        return await numbers.watch(client, args.checkpoint, args.tenant, out)
    if args.operator == "addresses":
        return await addresses.run(client, args, out)
    if args.records == "follow":
        return await records.follow(
            client,
            out_path=args.out,
            checkpoint_path=args.checkpoint,
            start=args.start,
            follow=not args.no_follow,
            tenant=args.tenant,
            number=args.number,
            poor_only=args.poor_only,
            out=out,
        )
    if args.records == "get":
        return await records.get(client, args.call_id, out)
    return await records.summary(
        client,
        start=args.start or now - dt.timedelta(days=1),
        end=args.end or now,
        group_by=args.group_by,
        tenant=args.tenant,
        out=out,
    )


async def _run(connection: Connection, args: argparse.Namespace, out: Output) -> int:
    async with Client(connection) as client:
        return await _dispatch(client, args, out)


def run(connection: Connection, args: argparse.Namespace, out: Output | None = None) -> int:
    """Run the parsed command; its exit status."""
    if args.operator == "consents":
        return consents.command(connection, args)
    out = out or Output(args.output)
    try:
        return asyncio.run(_run(connection, args, out))
    except (ClientError, ServerError) as error:
        out.note(f"opconnect: {error}")
        return 1
    except KeyboardInterrupt:
        if args.operator == "submit":
            done = commands.lines_done(args.file)
            out.note(f"interrupted after {done:,} lines; run again to resume")
        else:
            out.note("interrupted")
        return INTERRUPTED
