"""Call-duration records in CSV, as an operator's billing system exports them.

One header line, then one record a line, columns by name (any order; more columns are ignored):

    record_id,call_id,tenant_id,caller,callee,direction,start_time,end_time,duration_s

`direction` is `inbound` or `outbound`; times are ISO 8601 (UTC unless a zone is given);
`duration_s` is seconds with up to 6 decimals. A line that cannot be read is reported with its
number and never sent; the server checks the rest.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from google.protobuf import timestamp_pb2

from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect.usage.v1 import usage_pb2 as pb

COLUMNS = (
    "record_id",
    "call_id",
    "tenant_id",
    "caller",
    "callee",
    "direction",
    "start_time",
    "end_time",
    "duration_s",
)
DIRECTIONS = {
    "inbound": direction_pb.CALL_DIRECTION_INBOUND,
    "outbound": direction_pb.CALL_DIRECTION_OUTBOUND,
}


@dataclass(frozen=True)
class Line:
    """One data line: its number in the file, and the record or why it cannot be read."""

    number: int
    record: pb.CallDurationRecord | None
    problem: str = ""


def _time(text: str) -> timestamp_pb2.Timestamp:
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def parse_row(row: dict[str, str]) -> pb.CallDurationRecord:
    """A record from one CSV row; ValueError saying what is wrong."""
    direction = DIRECTIONS.get(row["direction"].strip().lower())
    if direction is None:
        raise ValueError("direction must be inbound or outbound")
    try:
        start, end = _time(row["start_time"]), _time(row["end_time"])
    except ValueError as error:
        raise ValueError(f"a time is not ISO 8601: {error}") from None
    try:
        seconds = Decimal(row["duration_s"].strip())
    except InvalidOperation:
        raise ValueError("duration_s is not a number of seconds") from None
    if not seconds.is_finite():
        raise ValueError("duration_s is not a number of seconds")
    record = pb.CallDurationRecord(
        record_id=row["record_id"],
        call_id=row["call_id"].strip(),
        tenant_id=row["tenant_id"].strip(),
        caller=row["caller"].strip(),
        callee=row["callee"].strip(),
        direction=direction,
        start_time=start,
        end_time=end,
    )
    record.duration.FromNanoseconds(int(seconds * 1_000_000_000))
    return record


def read_lines(path: Path) -> Iterator[Line]:
    """Every data line of the file, in order (line numbers count the header as line 1)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns: {', '.join(missing)}")
        for number, row in enumerate(reader, start=2):
            if any(row.get(c) is None for c in COLUMNS):
                yield Line(number, None, "too few fields")
                continue
            try:
                yield Line(number, parse_row(row))
            except ValueError as error:
                yield Line(number, None, str(error))


def write_records(path: Path, records: list[pb.CallDurationRecord]) -> None:
    """Write records as such a file (for tests and the simulator)."""
    names = {v: k for k, v in DIRECTIONS.items()}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for r in records:
            writer.writerow(
                (
                    r.record_id,
                    r.call_id,
                    r.tenant_id,
                    r.caller,
                    r.callee,
                    names[r.direction],
                    r.start_time.ToJsonString(),
                    r.end_time.ToJsonString(),
                    str(Decimal(r.duration.ToNanoseconds()) / Decimal(1_000_000_000)),
                )
            )
