"""Responses built from stored bytes (plumbing.wire) are exactly what protobuf would encode; the
well-known types the call feed writes and reads by hand are what protobuf's helpers make."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.internal import decoder, encoder
from hypothesis import given
from hypothesis import strategies as st

from opconnect.records.v1 import records_pb2 as pb
from plumbing import wellknown, wire
from plumbing.direction import DIRECTION_OUT, Direction
from services.records import convert
from services.records.rules import CallFact
from services.usage import feed
from services.usage.rules import PlatformCall
from tests.records_data import record

NOON = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_matches_protobuf(value: int) -> None:
    expected = encoder._VarintBytes(value)  # type: ignore[attr-defined]
    assert wire.varint(value) == expected
    decoded, end = decoder._DecodeVarint(expected, 0)  # type: ignore[attr-defined]
    assert (decoded, end) == (value, len(expected))


def test_varint_refuses_negatives() -> None:
    with pytest.raises(ValueError, match="negative"):
        wire.varint(-1)


@given(count=st.integers(min_value=0, max_value=40), cursor=st.text(max_size=200))
def test_a_stream_response_from_stored_bodies_is_canonical(count: int, cursor: str) -> None:
    records = [record(call_id=f"c{i}") for i in range(count)]
    stored = [
        convert.stored(r.SerializeToString(), convert.publish_time_field(NOON)) for r in records
    ]
    for r in records:
        r.publish_time.FromDatetime(NOON)
    built = convert.stream_response(stored, cursor)
    expected = pb.StreamCallRecordsResponse(records=records, cursor=cursor)
    assert built == expected.SerializeToString()  # byte for byte: any client parses it
    assert pb.StreamCallRecordsResponse.FromString(built) == expected


def test_publish_time_appended_to_a_body_parses_as_the_field() -> None:

    sent = record()
    when = dt.datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=dt.UTC)
    body = sent.SerializeToString() + convert.publish_time_field(when)
    parsed = pb.CallRecord.FromString(body)
    assert parsed.publish_time.ToDatetime(dt.UTC) == when
    expected = pb.CallRecord()
    expected.CopyFrom(sent)
    expected.publish_time.FromDatetime(when)
    assert body == expected.SerializeToString()  # field 17 comes last: still canonical


# --- well-known types written and read without protobuf's helpers (the call feed's per-call
# cost): the same values as those helpers give.

ZONES = st.sampled_from(
    [
        None,
        dt.UTC,
        dt.timezone(dt.timedelta(hours=5, minutes=30)),
        dt.timezone(-dt.timedelta(hours=8)),
    ]
)


@given(st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)), ZONES)
def test_timestamp_is_what_from_datetime_makes(value: dt.datetime, zone: dt.tzinfo | None) -> None:
    value = value.replace(tzinfo=zone)
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert wellknown.timestamp(value) == expected


@given(st.floats(min_value=-1e12, max_value=1e12, allow_nan=False))
def test_duration_ms_is_what_from_nanoseconds_makes(value: float) -> None:
    expected = duration_pb2.Duration()
    expected.FromNanoseconds(round(value * 1_000_000))
    assert convert.duration_ms(value) == expected


@given(
    st.integers(min_value=wellknown.MIN_SECONDS, max_value=wellknown.MAX_SECONDS),
    st.integers(min_value=0, max_value=999_999_999),
    st.booleans(),
    st.integers(min_value=-(10**9), max_value=10**9),
    st.integers(min_value=-999_999_999, max_value=999_999_999),
)
def test_a_feed_call_reads_as_protobufs_helpers_read_it(
    seconds: int, nanos: int, answered: bool, duration_s: int, duration_ns: int
) -> None:
    if duration_s * duration_ns < 0:
        duration_ns = -duration_ns  # a valid Duration's signs agree
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    duration = duration_pb2.Duration(seconds=duration_s, nanos=duration_ns)
    fact = pb.CallFact(
        operator_id="op-a",
        call_id="call-1",
        tenant_id="t",
        direction=DIRECTION_OUT[Direction.OUTBOUND],
        invite_time=stamp,
        answer_time=stamp if answered else None,
        duration=duration,
    )
    call = feed.call_in(fact)
    assert call == PlatformCall(
        "call-1",
        "op-a",
        "t",
        "outbound",
        stamp.ToDatetime(tzinfo=dt.UTC),
        stamp.ToDatetime(tzinfo=dt.UTC) if answered else None,
        duration.ToMilliseconds(),
    )


def test_a_feed_call_with_an_invalid_time_is_an_error() -> None:
    fact = pb.CallFact(call_id="c", invite_time=timestamp_pb2.Timestamp(nanos=-1))
    with pytest.raises(ValueError, match="not a valid timestamp"):
        feed.call_in(fact)


def test_a_call_fact_goes_out_and_comes_back_the_same() -> None:
    invite = dt.datetime(2026, 11, 23, 11, 58, 1, 123456, tzinfo=dt.UTC)
    for answer in (None, invite + dt.timedelta(seconds=7)):
        fact = CallFact(
            position=3,
            operator_id="op-a",
            call_id="call-1",
            tenant_id="t",
            direction="inbound",
            invite_time=invite,
            answer_time=answer,
            duration_ms=61_234,
            publish_time=NOON,
        )
        out = pb.CallFact.FromString(convert.fact_out(fact).SerializeToString())
        assert out.HasField("answer_time") is (answer is not None)
        assert out.publish_time.ToDatetime(tzinfo=dt.UTC) == NOON
        assert feed.call_in(out) == PlatformCall(
            "call-1", "op-a", "t", "inbound", invite, answer, 61_234
        )
