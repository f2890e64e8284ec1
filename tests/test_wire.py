"""Responses built from stored bytes (plumbing.wire) are exactly what protobuf would encode."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf.internal import decoder, encoder
from hypothesis import given
from hypothesis import strategies as st

from opconnect.records.v1 import records_pb2 as pb
from plumbing import wire
from services.records import convert
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
