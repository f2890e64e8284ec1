"""google.protobuf Timestamp and Duration at the edge: read checked, written plainly.

A message's Timestamp or Duration may hold values protobuf itself calls invalid (nanos out of
range, seconds past year 9999, signs that disagree); these helpers answer None for them, so
each service refuses them with its own reason and field.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from plumbing.errors import invalid_field

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)
MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_DURATION_SECONDS = 315_576_000_000  # 10,000 years


def time_in(stamp: timestamp_pb2.Timestamp) -> dt.datetime | None:
    """The time as an aware UTC datetime (to the microsecond); None if not a valid Timestamp."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if not (MIN_SECONDS <= seconds <= MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return None
    return _EPOCH + dt.timedelta(0, seconds, nanos // 1000)  # positional: a third faster


def duration_in(value: duration_pb2.Duration) -> dt.timedelta | None:
    """The duration (to the microsecond, rounded down); None if not a valid Duration."""
    seconds, nanos = value.seconds, value.nanos
    if not valid_duration(seconds, nanos):
        return None
    return dt.timedelta(0, seconds, nanos // 1000)


def valid_duration(seconds: int, nanos: int) -> bool:
    """Whether (seconds, nanos) is a valid Duration: in range, their signs agreeing."""
    if abs(seconds) > MAX_DURATION_SECONDS or abs(nanos) >= 1_000_000_000:
        return False
    return not (seconds > 0 > nanos or seconds < 0 < nanos)


def request_time(request: Any, name: str, domain: str, reason: str) -> dt.datetime | None:
    """A request's Timestamp field `name`; None when unset. A time before 1970 or not a valid
    Timestamp answers INVALID_ARGUMENT with `reason` on that field."""
    if not request.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(request, name)
    value = time_in(stamp) if stamp.seconds >= 0 else None
    if value is None:
        raise invalid_field(domain, reason, name, "not a valid timestamp")
    return value


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """`value` as a Timestamp (a naive datetime taken as UTC), as `Timestamp.FromDatetime`
    makes it at half its cost (no time tuple; the call feed makes three a call)."""
    since = value - (_EPOCH if value.tzinfo is not None else _NAIVE_EPOCH)
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )
