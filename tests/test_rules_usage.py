"""Unit tier: the usage service's rules, on domain objects alone (no sockets, no database).
Run the fast tier alone with `pytest -m unit`."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from plumbing.direction import Direction
from plumbing.errors import ApiError, Kind
from services.usage.rules import DurationRecord, check_batch, check_record, check_tolerance

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
RETENTION = dt.timedelta(days=396)
SKEW = dt.timedelta(minutes=5)
START = NOW - dt.timedelta(hours=1)

GOOD = DurationRecord(
    record_id="cdr-1",
    call_id="c-1",
    tenant_id="6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c",
    caller="+442071838750",
    callee="+14255550100",
    direction=Direction.INBOUND,
    start_time=START,
    end_time=START + dt.timedelta(seconds=120),
    duration=dt.timedelta(seconds=120),
)


def refusal_of(**changes: object) -> tuple[str, str] | None:
    found = check_record(GOOD._replace(**changes), NOW, RETENTION, SKEW)  # type: ignore[arg-type]
    return None if found is None else (found.reason, found.field)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"record_id": ""}, ("RECORD_ID_INVALID", "record_id")),
        ({"call_id": "a b"}, ("CALL_ID_INVALID", "call_id")),
        ({"tenant_id": "x"}, ("TENANT_ID_INVALID", "tenant_id")),
        ({"caller": "0425"}, ("CALLER_INVALID", "caller")),
        ({"direction": None}, ("DIRECTION_INVALID", "direction")),
        ({"start_time": NOW + dt.timedelta(hours=1)}, ("START_TIME_INVALID", "start_time")),
        ({"start_time": NOW - dt.timedelta(days=400)}, ("RECORD_EXPIRED", "start_time")),
        ({"end_time": START - dt.timedelta(seconds=1)}, ("END_TIME_INVALID", "end_time")),
        ({"end_time": START + dt.timedelta(hours=49)}, ("END_TIME_INVALID", "end_time")),
        ({"duration": dt.timedelta(seconds=-1)}, ("DURATION_INVALID", "duration")),
        # One second of allowance over end - start, no more.
        ({"duration": dt.timedelta(seconds=121)}, None),
        ({"duration": dt.timedelta(seconds=121, microseconds=1)}, ("DURATION_INVALID", "duration")),
    ],
)
def test_each_rule_of_a_duration_record(
    changes: dict[str, object], expected: tuple[str, str] | None
) -> None:
    assert refusal_of(**changes) == expected


@pytest.mark.parametrize(
    ("batch_id", "size", "reason"),
    [("b", 0, "BATCH_EMPTY"), ("b", 1_001, "BATCH_TOO_LARGE"), ("x" * 129, 1, "BATCH_ID_INVALID")],
)
def test_a_batch_the_stream_cannot_go_on_after(batch_id: str, size: int, reason: str) -> None:
    check_batch("b", 1_000)
    with pytest.raises(ApiError) as refused:
        check_batch(batch_id, size)
    assert (refused.value.kind, refused.value.reason) == (Kind.INVALID, reason)


@pytest.mark.parametrize(
    ("absolute", "relative", "field"),
    [
        (None, 0.01, "tolerance.absolute"),
        (dt.timedelta(hours=2), 0.01, "tolerance.absolute"),
        (dt.timedelta(seconds=1), math.nan, "tolerance.relative"),
        (dt.timedelta(seconds=1), 1.5, "tolerance.relative"),
    ],
)
def test_a_tolerance_is_bounded(absolute: dt.timedelta | None, relative: float, field: str) -> None:
    assert check_tolerance(dt.timedelta(seconds=1), 0.01).relative == 0.01
    with pytest.raises(ApiError) as refused:
        check_tolerance(absolute, relative)
    assert [v.field for v in refused.value.violations] == [field]
