"""`opconnect operator numbers ...`: the operator's numbers, as carriers manage them in the
Operator Connect portal.

Upload reads a CSV file with a header and these columns (any order; more are ignored):

    phone_number,usage,inbound,outbound
    +14255550100,user,yes,yes

and, each optional, the columns of the number's other fields:

    calling_profile_id,civic_address_id,location_id,allow_tenant_address_update,
    iso_country_code,ticket_id

`usage` is `user`, `voice_app` or `conference`; `inbound`, `outbound` and
`allow_tenant_address_update` are `yes`/`no` (also `true`/`false`, `1`/`0`, empty for no); the
others are sent as written (trimmed; empty: not given). A USER number needs a
`civic_address_id` (`opconnect operator addresses create`) unless
`allow_tenant_address_update` lets the customer set it. At most 10,000 numbers a file (the
platform's batch): a longer file is refused whole, before anything is sent. A row that cannot
be read is reported with its line number and never sent; the platform answers every other row.

`update` changes the fields of one number whose options are given (the update mask).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from opconnect_client import Client, ClientError, FileCheckpoint
from operator_client import addresses
from operator_client.output import Output, as_dict, read_text, when

MAX_ROWS = 10_000
COLUMNS = ("phone_number", "usage", "inbound", "outbound")
# Optional columns: each is the NumberUpload field of the same name.
TEXT_COLUMNS = (
    "calling_profile_id",
    "civic_address_id",
    "location_id",
    "iso_country_code",
    "ticket_id",
)
OPTIONAL_COLUMNS = (*TEXT_COLUMNS, "allow_tenant_address_update")
# What `numbers update` may change (UpdateNumber's mask), by option.
UPDATABLE = (
    "civic_address_id",
    "location_id",
    "allow_tenant_address_update",
    "calling_profile_id",
    "ticket_id",
)
USAGES = {
    "user": pb.NUMBER_USAGE_USER,
    "voice_app": pb.NUMBER_USAGE_VOICE_APP,
    "conference": pb.NUMBER_USAGE_CONFERENCE,
}
YES = {"yes", "y", "true", "1"}
NO = {"no", "n", "false", "0", ""}
STATES = {
    "assigned": state_pb.ASSIGNMENT_STATE_ASSIGNED,
    "unassigned": state_pb.ASSIGNMENT_STATE_UNASSIGNED,
}


@dataclass(frozen=True)
class Row:
    """One data row of an upload file: its line, and the number or why it cannot be read."""

    line: int
    phone_number: str
    upload: pb.NumberUpload | None
    problem: str = ""


def _flag(row: dict[str, str], column: str) -> bool:
    text = (row[column] or "").strip().lower()
    if text in YES:
        return True
    if text in NO:
        return False
    raise ValueError(f"{column} must be yes or no, not {row[column]!r}")


def parse_upload_row(row: dict[str, str]) -> pb.NumberUpload:
    """A NumberUpload from one CSV row; ValueError saying what is wrong."""
    number = (row["phone_number"] or "").strip()
    if not number:
        raise ValueError("phone_number is empty")
    usage = USAGES.get((row["usage"] or "").strip().lower())
    if usage is None:
        raise ValueError(f"usage must be one of {', '.join(USAGES)}, not {row['usage']!r}")
    capabilities = pb.Capabilities(inbound=_flag(row, "inbound"), outbound=_flag(row, "outbound"))
    upload = pb.NumberUpload(phone_number=number, usage=usage, capabilities=capabilities)
    for column in TEXT_COLUMNS:
        setattr(upload, column, (row.get(column) or "").strip())
    if row.get("allow_tenant_address_update") is not None:
        upload.allow_tenant_address_update = _flag(row, "allow_tenant_address_update")
    return upload


def read_upload(path: Path) -> list[Row]:
    """Every data row of an upload file; ClientError for a file that cannot be used at all (not
    there, not UTF-8 text, columns missing, more than 10,000 rows)."""
    rows: list[Row] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ClientError(
                    f"{path}: missing columns: {', '.join(missing)} (the header must name"
                    f" {','.join(COLUMNS)})"
                )
            for row in reader:
                if len(rows) == MAX_ROWS:
                    raise ClientError(
                        f"{path}: more than {MAX_ROWS:,} numbers; upload at most {MAX_ROWS:,}"
                        " a file (split it)"
                    )
                line = reader.line_num
                number = (row.get("phone_number") or "").strip()
                present = [c for c in OPTIONAL_COLUMNS if c in (reader.fieldnames or [])]
                if any(row.get(c) is None for c in (*COLUMNS, *present)):
                    rows.append(Row(line, number, None, "too few fields"))
                    continue
                try:
                    rows.append(Row(line, number, parse_upload_row(row)))
                except ValueError as error:
                    rows.append(Row(line, number, None, str(error)))
    except UnicodeDecodeError:
        raise ClientError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror}") from None
    except csv.Error as error:
        raise ClientError(f"{path}: not CSV: {error}") from None
    if not rows:
        raise ClientError(f"{path}: no numbers (a header, then one number a line)")
    return rows


def _outcome(result: pb.NumberResult, done: str) -> str:
    if result.outcome == pb.NUMBER_OUTCOME_DONE:
        return done
    if result.outcome == pb.NUMBER_OUTCOME_ALREADY_PRESENT:
        return "already_present"
    return "refused"


def _problems_table(out: Output, title: str, results: list[dict[str, Any]]) -> None:
    shown = [r for r in results if r["outcome"] in ("refused", "unreadable")]
    if not shown:
        return
    columns = ["line", "phone number", "outcome", "reason", "message"]
    keyed = ["line", "phone_number", "outcome", "reason", "message"]
    if "line" not in shown[0]:
        columns, keyed = columns[1:], keyed[1:]
    out.table(title, columns, ([str(r.get(k, "")) for k in keyed] for r in shown))


async def upload(client: Client, path: Path, tenant: str, out: Output) -> int:
    """Upload the file's numbers for `tenant`; 1 when any row was refused or unreadable."""
    rows = read_upload(path)
    sendable = [r for r in rows if r.upload is not None]
    answers: list[pb.NumberResult] = []
    if sendable:
        uploads = [r.upload for r in sendable if r.upload is not None]
        answers = list((await client.upload_numbers(tenant, uploads)).results)
    by_line = {r.line: a for r, a in zip(sendable, answers, strict=True)}
    results: list[dict[str, Any]] = []
    for row in rows:
        answer = by_line.get(row.line)
        if answer is None:
            results.append(
                {
                    "line": row.line,
                    "phone_number": row.phone_number,
                    "outcome": "unreadable",
                    "reason": "",
                    "message": row.problem,
                }
            )
        else:
            results.append(
                {
                    "line": row.line,
                    "phone_number": answer.phone_number or row.phone_number,
                    "outcome": _outcome(answer, "added"),
                    "reason": answer.reason,
                    "message": answer.message,
                }
            )
    counts = {k: sum(r["outcome"] == k for r in results) for k in _KINDS_UPLOAD}
    if out.json:
        out.data({"file": str(path), "tenant_id": tenant, **counts, "results": results})
    else:
        out.line(
            f"{path.name}: {counts['added']:,} added, {counts['already_present']:,} already"
            f" there, {counts['refused']:,} refused, {counts['unreadable']:,} unreadable rows"
        )
        _problems_table(out, "Rows not uploaded", results)
    return 0 if counts["refused"] == counts["unreadable"] == 0 else 1


_KINDS_UPLOAD = ("added", "already_present", "refused", "unreadable")


def read_numbers_file(path: Path) -> list[str]:
    """Numbers to release, one a line (the first CSV field of a line; a `phone_number` header,
    blank lines and `#` comments skipped)."""
    text = read_text(path)
    numbers = []
    for line in text.splitlines():
        first = line.split(",", 1)[0].strip()
        if first and not first.startswith("#") and first != "phone_number":
            numbers.append(first)
    return numbers


async def release(client: Client, numbers: list[str], out: Output) -> int:
    """Release unassigned numbers; 1 when any was refused."""
    if not numbers:
        raise ClientError("no numbers to release")
    answer = await client.release_numbers(numbers)
    results = [
        {
            "phone_number": r.phone_number,
            "outcome": _outcome(r, "released"),
            "reason": r.reason,
            "message": r.message,
        }
        for r in answer.results
    ]
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("released", "refused")}
    if out.json:
        out.data({**counts, "results": results})
    else:
        out.line(f"{counts['released']:,} released, {counts['refused']:,} refused")
        _problems_table(out, "Numbers not released", results)
    return 0 if counts["refused"] == 0 else 1


USAGE_NAMES: dict[int, str] = {int(v): k for k, v in USAGES.items()}


def _usage(value: int) -> str:
    return USAGE_NAMES.get(value, "")


def _number_row(number: pb.PhoneNumber) -> list[str]:
    caps = number.capabilities
    return [
        number.phone_number,
        number.tenant_id,
        _usage(number.usage),
        "/".join(x for x, on in (("in", caps.inbound), ("out", caps.outbound)) if on),
        "assigned" if number.state == state_pb.ASSIGNMENT_STATE_ASSIGNED else "unassigned",
        number.sip_uri,
        number.civic_address_id,
        when(number.update_time),
    ]


NUMBER_COLUMNS = [
    "number",
    "tenant",
    "usage",
    "calls",
    "state",
    "routes to",
    "address",
    "updated (UTC)",
]


def emergency_text(location: addresses_pb.EmergencyLocation) -> str:
    """An emergency location on one line: the address, then the place inside it."""
    text = addresses.one_line(location.civic_address)
    if location.HasField("location"):
        text += f"; {addresses.location_text(location.location)}"
    return text


async def list_numbers(client: Client, tenant: str, state: str, out: Output) -> int:
    """The operator's numbers (of a tenant, in a state): a JSON line each, or a table."""
    pages = client.list_numbers(tenant, STATES.get(state, state_pb.ASSIGNMENT_STATE_UNSPECIFIED))
    items = (number async for page in pages for number in page.numbers)
    await out.listing("numbers", NUMBER_COLUMNS, items, _number_row)
    return 0


async def get_number(client: Client, phone_number: str, out: Output) -> int:
    number = await client.get_number(phone_number)
    if out.json:
        out.data(as_dict(number))
        return 0
    values = _number_row(number)
    fields = list(zip(NUMBER_COLUMNS, values, strict=True))
    if number.HasField("target"):
        kind = pb.AssignmentTarget.Kind.Name(number.target.kind).removeprefix("KIND_").lower()
        fields.append(("assigned to", f"{kind} {number.target.id}"))
    fields.append(("uploaded (UTC)", when(number.create_time)))
    _show_fields(number, fields)
    out.table(number.phone_number, ["", ""], fields)
    return 0


def _show_fields(number: pb.PhoneNumber, fields: list[tuple[str, str]]) -> None:
    """The number's other fields, those it has, for `get` and `update`."""
    if number.location_id:
        fields.append(("location", number.location_id))
    if number.HasField("emergency_location"):
        fields.append(("emergency location", emergency_text(number.emergency_location)))
    fields.append(("customer sets address", "yes" if number.allow_tenant_address_update else "no"))
    for label, value in (
        ("calling profile", number.calling_profile_id),
        ("country", number.iso_country_code),
        ("ticket", number.ticket_id),
    ):
        if value:
            fields.append((label, value))


async def update_number(
    client: Client, phone_number: str, given: dict[str, Any], out: Output
) -> int:
    """Change the fields of a number given (by UpdateNumber field name); the number after."""
    if not given:
        options = ", ".join("--" + name.replace("_", "-") for name in UPDATABLE)
        raise ClientError(f"nothing to change: give at least one of {options}")
    number = pb.PhoneNumber(phone_number=phone_number, **given)
    changed = await client.update_number(number, [p for p in UPDATABLE if p in given])
    if out.json:
        out.data(as_dict(changed))
        return 0
    fields = list(zip(NUMBER_COLUMNS, _number_row(changed), strict=True))
    _show_fields(changed, fields)
    out.table(changed.phone_number, ["", ""], fields)
    return 0


def _event_line(event: pb.AssignmentEvent) -> str:
    kind = pb.AssignmentEventType.Name(event.type).removeprefix("ASSIGNMENT_EVENT_TYPE_")
    parts = [when(event.event_time), kind.lower(), event.phone_number, event.tenant_id]
    line = " ".join([*parts, event.sip_uri]).rstrip()
    if event.HasField("emergency_location"):
        line += f" at {emergency_text(event.emergency_location)}"
    return line


async def watch(client: Client, checkpoint: Path, tenant: str, out: Output) -> int:
    """List-then-watch from the checkpoint, for ever: a JSON line per listed number (with
    `"listing": true`) and per event; each batch printed and flushed before its cursor is
    saved, so a restart repeats at most the batch it was printing."""
    store = FileCheckpoint(checkpoint)
    async for batch in client.watch_assignments(checkpoint=store, tenant_id=tenant):
        for item in batch.items:
            if out.json:
                out.data({**as_dict(item), "listing": True} if batch.listing else as_dict(item))
            elif batch.listing:
                out.line(f"listed {' '.join(_number_row(item)[:6])}".rstrip())
            else:
                out.line(_event_line(item))
    return 0


def iter_numbers(values: list[str], file: Path | None) -> Iterator[str]:
    yield from values
    if file is not None:
        yield from read_numbers_file(file)
