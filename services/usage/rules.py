"""The usage domain: operators' call-duration records, and the rules a submitted one must meet.

A check returns a `Refusal` (reason, field name, message) or None; a refused record is answered
on its own and never stops its neighbours.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from plumbing.direction import Direction
from plumbing.errors import invalid_field
from plumbing.validation import E164, IDENTITY, Outcome, Refusal, check_e164, check_guid

DOMAIN = "usage.opconnect"

MAX_BATCH = 1_000
MAX_BATCH_ID = 128
MAX_CALL_LENGTH = dt.timedelta(hours=48)
# An operator's billable duration may round up: at most this much over end_time - start_time.
DURATION_ALLOWANCE = dt.timedelta(seconds=1)

RECORD_ID = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII
CALL_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
OPERATOR_ID = IDENTITY


class Granularity(StrEnum):
    DAY = "day"
    MONTH = "month"


class Source(StrEnum):
    OPERATOR = "operator"
    PLATFORM = "platform"


class DurationRecord(NamedTuple):
    """An operator's record of one call's duration, as submitted (None: missing or unknown).
    A NamedTuple, not a frozen dataclass: ingest makes one per record, and a frozen dataclass
    takes five times as long to make."""

    record_id: str
    call_id: str
    tenant_id: str
    caller: str
    callee: str
    direction: Direction | None
    start_time: dt.datetime | None
    end_time: dt.datetime | None
    duration: dt.timedelta | None


class Submitted(NamedTuple):
    """A checked record and the digest of its content: the same record_id with the same digest
    is a duplicate; with another, a conflict. (Named tuples, as DurationRecord: ingest makes one
    of each per record.)"""

    record: DurationRecord
    digest: bytes


class Result(NamedTuple):
    record_id: str
    outcome: Outcome
    refusal: Refusal | None = None


class PlatformCall(NamedTuple):
    """The platform's side of a call, as the records feed tells it. (A named tuple, as
    DurationRecord: the feed makes one per call.)"""

    call_id: str
    operator_id: str
    tenant_id: str
    direction: str
    invite_time: dt.datetime
    answer_time: dt.datetime | None
    duration_ms: int


class Reported(NamedTuple):
    """A record as the usage by day counts it."""

    call_id: str
    tenant_id: str
    start: dt.datetime
    direction: str
    duration_us: int


# A tenant's check, remembered (a pure function of one string; tenants recur from record to
# record): as the records service does.
_guid = functools.lru_cache(maxsize=4096)(check_guid)


def check_record(
    record: DurationRecord, now: dt.datetime, retention: dt.timedelta, skew: dt.timedelta
) -> Refusal | None:
    """The first rule the record breaks, or None."""
    if RECORD_ID.fullmatch(record.record_id) is None:
        return Refusal("RECORD_ID_INVALID", "record_id", "1 to 128 printable ASCII characters")
    if CALL_ID.fullmatch(record.call_id) is None:
        return Refusal("CALL_ID_INVALID", "call_id", "1 to 64 of A-Z a-z 0-9 . _ -")
    if problem := _guid(record.tenant_id):
        return Refusal("TENANT_ID_INVALID", "tenant_id", problem)
    if E164.fullmatch(record.caller) is None:
        return Refusal("CALLER_INVALID", "caller", check_e164(record.caller) or "not E.164")
    if E164.fullmatch(record.callee) is None:
        return Refusal("CALLEE_INVALID", "callee", check_e164(record.callee) or "not E.164")
    if record.direction is None:
        return Refusal("DIRECTION_INVALID", "direction", "required: INBOUND or OUTBOUND")
    start, end, duration = record.start_time, record.end_time, record.duration
    if start is None:
        return Refusal("START_TIME_INVALID", "start_time", "required")
    if start > now + skew:
        return Refusal("START_TIME_INVALID", "start_time", "in the future")
    if start < now - retention:
        return Refusal("RECORD_EXPIRED", "start_time", "older than the retention of usage")
    if end is None:
        return Refusal("END_TIME_INVALID", "end_time", "required")
    if end < start:
        return Refusal("END_TIME_INVALID", "end_time", "before start_time")
    if end - start > MAX_CALL_LENGTH:
        return Refusal("END_TIME_INVALID", "end_time", "more than 48 hours after start_time")
    if end > now + skew:
        return Refusal("END_TIME_INVALID", "end_time", "in the future")
    if duration is None or duration < dt.timedelta(0):
        return Refusal("DURATION_INVALID", "duration", "required, and not negative")
    if duration > end - start + DURATION_ALLOWANCE:
        return Refusal(
            "DURATION_INVALID",
            "duration",
            "at most 1 second longer than end_time minus start_time",
        )
    return None


def check_batch(batch_id: str, size: int) -> None:
    """A batch the stream cannot go on after (the stream ends with INVALID_ARGUMENT)."""
    if len(batch_id) > MAX_BATCH_ID or not batch_id.isprintable():
        raise invalid_field(
            DOMAIN, "BATCH_ID_INVALID", "batch_id", "at most 128 printable characters"
        )
    if size == 0:
        raise invalid_field(DOMAIN, "BATCH_EMPTY", "records", "1 to 1,000 records")
    if size > MAX_BATCH:
        raise invalid_field(DOMAIN, "BATCH_TOO_LARGE", "records", f"at most {MAX_BATCH:,} records")


MAX_USAGE_PERIOD = dt.timedelta(days=366)


@dataclass(frozen=True)
class UsageQuery:
    """Usage of calls that started in [start, end), of one operator or all, one tenant or all."""

    start: dt.datetime
    end: dt.datetime
    granularity: Granularity
    operator_id: str | None
    tenant_id: str | None


@dataclass(frozen=True)
class SourceUsage:
    source: Source
    calls: int
    billed_seconds: int


@dataclass(frozen=True)
class UsageRow:
    """One tenant's answered calls in one day or month and one direction."""

    tenant_id: str
    period_start: dt.datetime
    direction: Direction
    by_source: tuple[SourceUsage, ...]

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.by_source)

    @property
    def billed_seconds(self) -> int:
        return sum(s.billed_seconds for s in self.by_source)


MAX_RECONCILE_PERIOD = dt.timedelta(days=31)
MAX_TOLERANCE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Tolerance:
    """Durations match when they differ by at most max(absolute, relative x the longer)."""

    absolute: dt.timedelta
    relative: float


@dataclass(frozen=True)
class ReconcileQuery:
    operator_id: str
    start: dt.datetime
    end: dt.datetime
    tenant_id: str | None
    tolerance: Tolerance


class DiscrepancyKind(StrEnum):
    MISMATCH = "mismatch"
    MISSING_FROM_OPERATOR = "missing_from_operator"
    # The operator's record of a call id the platform has no call of (for this operator).
    UNKNOWN_TO_PLATFORM = "unknown_to_platform"
    # The operator's record of a call the platform has as not answered: the platform's record
    # decides, so the call counts in no usage.
    UNANSWERED_ON_PLATFORM = "unanswered_on_platform"


@dataclass(frozen=True)
class Discrepancy:
    """One call the two sides disagree on (durations in microseconds; None: that side lacks
    the call)."""

    kind: DiscrepancyKind
    call_id: str
    record_id: str
    tenant_id: str
    start: dt.datetime
    platform_us: int | None
    operator_us: int | None


@dataclass(frozen=True)
class Reconciliation:
    """The counts of a reconciliation; the platform's total is over its answered calls, the
    operator's over every record it reported (unanswered on the platform included)."""

    matched: int
    mismatched: int
    platform_only: int
    operator_only: int
    unanswered_on_platform: int
    platform_total_us: int
    operator_total_us: int


def check_tolerance(absolute: dt.timedelta | None, relative: float) -> Tolerance:
    if absolute is None or not dt.timedelta(0) <= absolute <= MAX_TOLERANCE:
        raise invalid_field(
            DOMAIN, "TOLERANCE_INVALID", "tolerance.absolute", "a duration from 0 to 1 hour"
        )
    if not 0.0 <= relative <= 1.0:  # also refuses NaN
        raise invalid_field(DOMAIN, "TOLERANCE_INVALID", "tolerance.relative", "from 0 to 1")
    return Tolerance(absolute, relative)
