"""Call-duration records in CSV, as an operator's billing system exports them.

One header line, then one record a line, columns by name (any order; more columns are ignored):

    record_id,call_id,tenant_id,caller,callee,direction,start_time,end_time,duration_s

`direction` is `inbound` or `outbound`; times are ISO 8601 (UTC unless a zone is given);
`duration_s` is seconds with up to 6 decimals. A line that cannot be read is reported with its
number and never sent; the server checks the rest. A file that cannot be used at all (not
there, not UTF-8, columns missing) is a `ClientError`.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

from google.protobuf import timestamp_pb2

from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect.usage.v1 import usage_pb2 as pb
from opconnect_client import ClientError

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
    """One data line: its number in the file, and the record or why it cannot be read; `end`
    is the byte offset just after it (where a run that finished it resumes)."""

    number: int
    record: pb.CallDurationRecord | None
    problem: str = ""
    end: int = 0


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


class DurationsFile:
    """A durations file read line by line as it is sent (nothing read ahead, no first pass),
    with the bytes read so far (`offset`) out of its `size` for progress. It resumes after
    `skip_lines` data lines: at byte `skip_bytes` when given (a seek), else by reading past
    them."""

    def __init__(self, path: Path, skip_lines: int = 0, skip_bytes: int = 0) -> None:
        self.path = path
        self.skip_lines = skip_lines
        self.skip_bytes = skip_bytes
        self.offset = 0
        try:
            self.size = path.stat().st_size
        except OSError as error:
            raise ClientError(f"cannot read {path}: {error.strerror}") from None

    def _text(self, handle: BinaryIO) -> Iterator[str]:
        header = handle.readline()
        self.offset = len(header)
        yield self._decode(header, 1)
        if self.skip_bytes:
            handle.seek(self.skip_bytes)
            self.offset = self.skip_bytes
        number = 1 + (self.skip_lines if self.skip_bytes else 0)
        for raw in handle:
            self.offset += len(raw)
            number += 1
            yield self._decode(raw, number)

    def _decode(self, raw: bytes, number: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(f"{self.path}: line {number} is not UTF-8 text") from None

    def lines(self) -> Iterator[Line]:
        """The data lines after the skipped ones, in order (the header is line 1)."""
        try:
            handle = self.path.open("rb")
        except OSError as error:
            raise ClientError(f"cannot read {self.path}: {error.strerror}") from None
        with handle:
            reader = csv.DictReader(self._text(handle))
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ClientError(
                    f"{self.path}: missing columns: {', '.join(missing)} (the header must name"
                    f" {','.join(COLUMNS)})"
                )
            seeked = self.skip_lines if self.skip_bytes else 0
            skip = 0 if self.skip_bytes else self.skip_lines
            try:
                for row in reader:
                    if skip:
                        skip -= 1
                        continue
                    number = seeked + reader.line_num
                    if any(row.get(c) is None for c in COLUMNS):
                        yield Line(number, None, "too few fields", self.offset)
                        continue
                    try:
                        yield Line(number, parse_row(row), end=self.offset)
                    except ValueError as error:
                        yield Line(number, None, str(error), self.offset)
            except csv.Error as error:
                raise ClientError(f"{self.path}: not CSV: {error}") from None


def read_lines(path: Path) -> Iterator[Line]:
    """Every data line of the file, in order (line numbers count the header as line 1)."""
    return DurationsFile(path).lines()


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
