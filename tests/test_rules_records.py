"""Unit tier: the records service's rules for a published call record, on domain objects alone
(no sockets, no database; the quality classification has its own, test_records_quality.py).
Run the fast tier alone with `pytest -m unit`."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from typing import Any

import pytest

from plumbing.direction import Direction
from plumbing.errors import ApiError, Kind
from services.records.rules import (
    CallRecord,
    EndReason,
    MediaDirection,
    MediaStream,
    MediaType,
    Published,
    check_batch_id,
    check_published,
    check_record,
    check_stream,
)

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
RETENTION = dt.timedelta(days=30)
SKEW = dt.timedelta(minutes=5)
INVITE = NOW - dt.timedelta(minutes=10)

ANSWERED = CallRecord(
    call_id="call-1",
    tenant_id="6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c",
    direction=Direction.INBOUND,
    caller="+442071838750",
    callee="sip:alice@contoso.example",
    trunk_fqdn="sbc1.contoso.example",
    invite_time=INVITE,
    answer_time=INVITE + dt.timedelta(seconds=5),
    end_time=INVITE + dt.timedelta(seconds=125),
    duration=dt.timedelta(seconds=120),
    final_sip_code=200,
    final_sip_phrase="OK",
    end_reason=EndReason.CALLER_HANG_UP,
    media_streams=(),
)


def refusal_of(**changes: object) -> tuple[str, str] | None:
    record = ANSWERED._replace(**changes)  # type: ignore[arg-type]
    found = check_record(record, NOW, RETENTION, SKEW)
    return None if found is None else (found.reason, found.field)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"call_id": ""}, ("CALL_ID_INVALID", "record.call_id")),
        ({"direction": None}, ("DIRECTION_INVALID", "record.direction")),
        # The PSTN side is E.164; the Teams side may be a SIP URI.
        ({"caller": "sip:bob@example.com"}, ("CALLER_INVALID", "record.caller")),
        ({"trunk_fqdn": "SBC1.contoso.example"}, ("TRUNK_FQDN_INVALID", "record.trunk_fqdn")),
        ({"invite_time": None}, ("TIME_INVALID", "record.invite_time")),
        ({"end_time": NOW + dt.timedelta(hours=1)}, ("TIME_INVALID", "record.end_time")),
        ({"duration": dt.timedelta(seconds=60)}, ("DURATION_INVALID", "record.duration")),
        ({"final_sip_code": 486}, ("SIP_CODE_INVALID", "record.final_sip_code")),
        ({"end_reason": EndReason.BUSY}, ("END_REASON_INVALID", "record.end_reason")),
        ({"end_reason": None}, ("END_REASON_INVALID", "record.end_reason")),
    ],
)
def test_each_rule_of_a_call_record(
    changes: dict[str, object], expected: tuple[str, str] | None
) -> None:
    assert refusal_of(**changes) == expected


def test_an_unanswered_call_ends_with_a_non_2xx_code_and_no_duration() -> None:
    unanswered = {
        "answer_time": None,
        "duration": dt.timedelta(0),
        "final_sip_code": 486,
        "final_sip_phrase": "Busy Here",
        "end_reason": EndReason.BUSY,
    }
    assert refusal_of(**unanswered) is None
    assert refusal_of(**{**unanswered, "end_reason": EndReason.CALLER_HANG_UP}) == (
        "END_REASON_INVALID",
        "record.end_reason",
    )


def test_a_record_past_retention_is_refused_as_expired() -> None:
    old = NOW - dt.timedelta(days=31)
    assert refusal_of(
        invite_time=old,
        answer_time=old + dt.timedelta(seconds=5),
        end_time=old + dt.timedelta(seconds=125),
    ) == ("RECORD_EXPIRED", "record.end_time")


def test_the_operator_id_is_checked_before_the_record() -> None:
    found = check_published(Published("Not An Id", ANSWERED, b""), NOW, RETENTION, SKEW)
    assert found is not None and (found.reason, found.field) == (
        "OPERATOR_ID_INVALID",
        "operator_id",
    )


def test_a_batch_id_the_stream_cannot_go_on_after() -> None:
    check_batch_id("batch-1")
    with pytest.raises(ApiError) as refused:
        check_batch_id("x" * 200)
    assert (refused.value.kind, refused.value.reason) == (Kind.INVALID, "BATCH_ID_INVALID")


# The values a media stream's checks look at: each in range, at an edge, and out of it (None:
# missing; NaN and infinity: refused).
_STREAM_VALUES: dict[str, tuple[Any, ...]] = {
    "direction": (MediaDirection.CALLER_TO_CALLEE, None),
    "media_type": (MediaType.AUDIO, MediaType.VIDEO, None),
    "codec": ("", "SILK", "pcmu", "nope", "x" * 40),
    "packet_count": (0, 6_000, -1, None),
    "average_jitter_ms": (0.0, 5.0, 60_000.0, 60_001.0, -1.0, math.nan, None),
    "max_jitter_ms": (0.0, 10.0, 60_000.0, math.inf, None),
    "packet_loss_rate": (0.0, 0.5, 1.0, 1.5, -0.1, None),
    "average_round_trip_ms": (0.0, 60.0, 90.0, -3.0, None),
    "max_round_trip_ms": (50.0, 90.0, 60_000.0, 60_000.5, None),
    "network_mos_degradation": (0.0, 4.0, 4.5, None),
    "concealed_samples_ratio": (0.0, 1.0, 1.01, math.nan, None),
}


def test_a_records_media_streams_are_refused_as_check_stream_refuses_them() -> None:
    """check_record refuses a record for its media streams exactly as check_stream refuses
    them, with the stream's index in the field: each value of a plain stream swapped for each
    other, one and two at a time."""
    plain = MediaStream(
        MediaDirection.CALLER_TO_CALLEE, MediaType.AUDIO, "SILK", 6_000, 5.0, 10.0, 0.01,
        60.0, 90.0, 0.2, 0.01,
    )  # fmt: skip
    assert check_stream(plain, "record.media_streams[0].") is None
    names = list(_STREAM_VALUES)
    swaps = [(n, v) for n in names for v in _STREAM_VALUES[n]]
    checked = 0
    for first, second in itertools.combinations_with_replacement(swaps, 2):
        stream = plain._replace(**dict([first, second]))
        full = check_stream(stream, "record.media_streams[1].")
        record = ANSWERED._replace(media_streams=(plain, stream))
        assert check_record(record, NOW, RETENTION, SKEW) == full
        checked += 1
    assert checked > 1_000
