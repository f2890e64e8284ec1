"""Quality classification at and around every threshold (Call Quality Dashboard defaults)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opconnect.records.v1 import records_pb2 as pb
from services.records import convert
from services.records.quality import (
    Metric,
    Quality,
    Reason,
    StreamMetrics,
    Thresholds,
    classify_call,
    classify_stream,
)
from services.records.rules import CallRecord, MediaStream, MediaType
from tests.records_data import audio, record

pytestmark = pytest.mark.unit  # the fast tier: no sockets, no database

RULES = Thresholds()
GOOD = StreamMetrics(
    audio=True,
    packet_count=1000,
    round_trip_ms=100.0,
    packet_loss_rate=0.01,
    jitter_ms=5.0,
    mos_degradation=0.2,
    concealed_ratio=0.01,
)
FIELDS = {
    Metric.ROUND_TRIP: ("round_trip_ms", 500.0),
    Metric.PACKET_LOSS_RATE: ("packet_loss_rate", 0.1),
    Metric.JITTER: ("jitter_ms", 30.0),
    Metric.NETWORK_MOS_DEGRADATION: ("mos_degradation", 1.0),
    Metric.CONCEALED_SAMPLES_RATIO: ("concealed_ratio", 0.07),
}


def changed(stream: StreamMetrics, field: str, value: float | None) -> StreamMetrics:
    changes: dict[str, Any] = {field: value}
    return stream._replace(**changes)


def test_a_healthy_stream_is_good() -> None:
    assert classify_stream(0, GOOD, RULES).quality is Quality.GOOD


@pytest.mark.parametrize("metric", list(FIELDS))
def test_each_threshold_is_strict(metric: Metric) -> None:
    field, limit = FIELDS[metric]
    at = changed(GOOD, field, limit)
    above = changed(GOOD, field, limit * 1.0001)
    assert classify_stream(0, at, RULES).quality is Quality.GOOD
    verdict = classify_stream(3, above, RULES)
    assert verdict.quality is Quality.POOR
    assert verdict.reasons == (Reason(metric, limit * 1.0001, limit, 3),)


@pytest.mark.parametrize("metric", list(FIELDS))
def test_a_missing_metric_makes_the_stream_unclassified(metric: Metric) -> None:
    field, limit = FIELDS[metric]
    verdict = classify_stream(1, changed(GOOD, field, None), RULES)
    assert verdict.quality is Quality.UNCLASSIFIED
    assert verdict.reasons == (Reason(metric, None, limit, 1),)


def test_the_minimum_packet_count() -> None:
    bad = GOOD._replace(round_trip_ms=900.0, jitter_ms=None)
    assert classify_stream(0, bad._replace(packet_count=500), RULES).quality is Quality.GOOD
    assert classify_stream(0, bad._replace(packet_count=501), RULES).quality is Quality.UNCLASSIFIED
    poor = GOOD._replace(round_trip_ms=900.0, packet_count=501)
    assert classify_stream(0, poor, RULES).quality is Quality.POOR
    missing = classify_stream(0, GOOD._replace(packet_count=None), RULES)
    assert missing.reasons == (Reason(Metric.PACKET_COUNT, None, 500, 0),)


def test_thresholds_are_configurable() -> None:
    strict = Thresholds(jitter_ms=4.0)
    verdict = classify_stream(0, GOOD, strict)
    assert verdict.reasons == (Reason(Metric.JITTER, 5.0, 4.0, 0),)


def test_every_crossing_is_a_reason() -> None:
    worst = GOOD._replace(
        round_trip_ms=600.0,
        packet_loss_rate=0.2,
        jitter_ms=40.0,
        mos_degradation=2.0,
        concealed_ratio=0.1,
    )
    assert [r.metric for r in classify_stream(0, worst, RULES).reasons] == list(FIELDS)


def test_a_call_is_as_bad_as_its_worst_audio_stream() -> None:
    video = GOOD._replace(audio=False, jitter_ms=None)
    poor = GOOD._replace(jitter_ms=31.0)
    unknown = GOOD._replace(concealed_ratio=None)
    assert classify_call([GOOD, video], RULES)[0].quality is Quality.GOOD
    call, streams = classify_call([GOOD, unknown, poor], RULES)
    assert call.quality is Quality.POOR
    assert call.reasons == (Reason(Metric.JITTER, 31.0, 30.0, 2),)
    assert [s.quality for s in streams] == [Quality.GOOD, Quality.UNCLASSIFIED, Quality.POOR]
    assert classify_call([GOOD, unknown], RULES)[0].quality is Quality.UNCLASSIFIED
    assert classify_call([video], RULES)[0].quality is Quality.UNCLASSIFIED
    assert classify_call([], RULES)[0].quality is Quality.UNCLASSIFIED


metric_values = st.floats(0, 1000, allow_nan=False)


@given(
    packets=st.integers(0, 10_000),
    round_trip=metric_values,
    loss=st.floats(0, 1),
    jitter=metric_values,
    degradation=st.floats(0, 5),
    concealed=st.floats(0, 1),
)
def test_poor_exactly_when_the_dashboard_rules_say_so(
    packets: int,
    round_trip: float,
    loss: float,
    jitter: float,
    degradation: float,
    concealed: float,
) -> None:
    stream = StreamMetrics(True, packets, round_trip, loss, jitter, degradation, concealed)
    expected_poor = packets > 500 and (
        round_trip > 500 or loss > 0.1 or jitter > 30 or degradation > 1.0 or concealed > 0.07
    )
    verdict = classify_stream(0, stream, RULES)
    assert (verdict.quality is Quality.POOR) == expected_poor
    assert verdict.quality is not Quality.UNCLASSIFIED
    assert all(r.observed is not None and r.observed > r.threshold for r in verdict.reasons)


def test_the_records_publish_reads_are_their_fields_by_name() -> None:
    """record_in, stream_in and metrics() make their named tuples from values in field order
    (the publish hot path): each value is the field its name says."""
    message = record(streams=[audio(), audio(pb.MEDIA_DIRECTION_CALLEE_TO_CALLER, packets=None)])
    message.final_sip_phrase = "OK"
    message.end_reason = pb.CALL_END_REASON_CALLER_HANG_UP
    got = convert.record_in(message)
    streams = tuple(
        MediaStream(
            direction=convert.MEDIA_DIRECTION_IN[s.direction],
            media_type=MediaType.AUDIO,
            codec=s.codec,
            packet_count=s.packet_count if s.HasField("packet_count") else None,
            average_jitter_ms=s.average_jitter.ToNanoseconds() / 1e6,
            max_jitter_ms=s.max_jitter.ToNanoseconds() / 1e6,
            packet_loss_rate=s.packet_loss_rate,
            average_round_trip_ms=s.average_round_trip.ToNanoseconds() / 1e6,
            max_round_trip_ms=s.max_round_trip.ToNanoseconds() / 1e6,
            network_mos_degradation=s.network_mos_degradation,
            concealed_samples_ratio=s.concealed_samples_ratio,
        )
        for s in message.media_streams
    )
    assert got == CallRecord(
        call_id=message.call_id,
        tenant_id=message.tenant_id,
        direction=convert.direction_in(message.direction),
        caller=message.caller,
        callee=message.callee,
        trunk_fqdn=message.trunk_fqdn,
        invite_time=message.invite_time.ToDatetime(dt.UTC),
        answer_time=message.answer_time.ToDatetime(dt.UTC),
        end_time=message.end_time.ToDatetime(dt.UTC),
        duration=message.duration.ToTimedelta(),
        final_sip_code=message.final_sip_code,
        final_sip_phrase="OK",
        end_reason=convert.END_REASON_IN[message.end_reason],
        media_streams=streams,
    )
    assert got.media_streams[1].packet_count is None
    for stream in got.media_streams:
        assert stream.metrics() == StreamMetrics(
            audio=True,
            packet_count=stream.packet_count,
            round_trip_ms=stream.average_round_trip_ms,
            packet_loss_rate=stream.packet_loss_rate,
            jitter_ms=stream.average_jitter_ms,
            mos_degradation=stream.network_mos_degradation,
            concealed_ratio=stream.concealed_samples_ratio,
        )
