"""Bad records through the real server: each refused on its own with the reason and the path of
the offending field, while the good records of the same batch land; fuzzed fields and garbage
streams never crash the server, and never answer INTERNAL."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from tests.conftest import RunningSystem, rich_error
from tests.records_data import (
    OUTBOUND,
    audio,
    ids,
    publish,
    published,
    record,
    stamp,
    stream_all,
)

Mutation = Callable[[Any], object]  # changes a CallRecord or a MediaStream in place
NOW = dt.datetime.now(dt.UTC)
EPOCH = stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))

fuzz = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _set(name: str, value: object) -> Mutation:
    return lambda r: setattr(r, name, value)


def _clear(name: str) -> Mutation:
    return lambda r: r.ClearField(name)


def _stream(index: int, change: Mutation) -> Mutation:
    return lambda r: change(r.media_streams[index])


def _shift(name: str, delta: dt.timedelta) -> Mutation:
    def change(r: pb.CallRecord) -> None:
        value = getattr(r, name).ToDatetime(dt.UTC) + delta
        getattr(r, name).CopyFrom(stamp(value))

    return change


def _unanswered(r: pb.CallRecord) -> None:
    r.ClearField("answer_time")
    r.duration.FromSeconds(0)
    r.final_sip_code = 486
    r.end_reason = pb.CALL_END_REASON_BUSY


def _unanswered_with_duration(r: pb.CallRecord) -> None:
    _unanswered(r)
    r.duration.FromSeconds(3)


def _all_times(delta: dt.timedelta) -> Mutation:
    def change(r: pb.CallRecord) -> None:
        for name in ("invite_time", "answer_time", "end_time"):
            _shift(name, delta)(r)

    return change


def _many_streams(r: pb.CallRecord) -> None:
    r.media_streams.extend(audio() for _ in range(63))


def _bad_nanos(r: pb.CallRecord) -> None:
    r.invite_time.nanos = -5


def _jitter(value_ms: float) -> Mutation:
    def change(s: pb.MediaStream) -> None:
        s.average_jitter.FromNanoseconds(round(value_ms * 1e6))

    return change


# (what is wrong, how, the reason, the field path)
CASES: list[tuple[str, Mutation, str, str]] = [
    ("empty call id", _set("call_id", ""), "CALL_ID_INVALID", "record.call_id"),
    ("long call id", _set("call_id", "c" * 65), "CALL_ID_INVALID", "record.call_id"),
    ("call id with a space", _set("call_id", "a b"), "CALL_ID_INVALID", "record.call_id"),
    ("tenant", _set("tenant_id", "contoso"), "TENANT_ID_INVALID", "record.tenant_id"),
    ("no direction", _set("direction", 0), "DIRECTION_INVALID", "record.direction"),
    ("unknown direction", _set("direction", 9), "DIRECTION_INVALID", "record.direction"),
    (
        "inbound caller not E.164",
        _set("caller", "sip:alice@contoso.example"),
        "CALLER_INVALID",
        "record.caller",
    ),
    ("callee not a number", _set("callee", "12345"), "CALLEE_INVALID", "record.callee"),
    ("trunk", _set("trunk_fqdn", "sbc_1"), "TRUNK_FQDN_INVALID", "record.trunk_fqdn"),
    (
        "trunk in capitals",
        _set("trunk_fqdn", "SBC1.example.com"),
        "TRUNK_FQDN_INVALID",
        "record.trunk_fqdn",
    ),
    ("no invite time", _clear("invite_time"), "TIME_INVALID", "record.invite_time"),
    ("no end time", _clear("end_time"), "TIME_INVALID", "record.end_time"),
    ("bad timestamp", _bad_nanos, "TIME_INVALID", "record.invite_time"),
    (
        "answered before invited",
        _shift("answer_time", -dt.timedelta(hours=1)),
        "TIME_INVALID",
        "record.answer_time",
    ),
    (
        "ended before answered",
        _shift("end_time", -dt.timedelta(minutes=30)),
        "TIME_INVALID",
        "record.end_time",
    ),
    (
        "ends in the future",
        _all_times(dt.timedelta(hours=1)),
        "TIME_INVALID",
        "record.end_time",
    ),
    (
        "over 48 hours",
        _shift("invite_time", -dt.timedelta(hours=49)),
        "TIME_INVALID",
        "record.end_time",
    ),
    (
        "duration off",
        lambda r: r.duration.FromSeconds(r.duration.seconds + 2),
        "DURATION_INVALID",
        "record.duration",
    ),
    (
        "negative duration",
        lambda r: r.duration.FromSeconds(-1),
        "DURATION_INVALID",
        "record.duration",
    ),
    (
        "unanswered with a duration",
        _unanswered_with_duration,
        "DURATION_INVALID",
        "record.duration",
    ),
    ("sip code 199", _set("final_sip_code", 199), "SIP_CODE_INVALID", "record.final_sip_code"),
    ("sip code 700", _set("final_sip_code", 700), "SIP_CODE_INVALID", "record.final_sip_code"),
    (
        "answered with a 486",
        _set("final_sip_code", 486),
        "SIP_CODE_INVALID",
        "record.final_sip_code",
    ),
    (
        "long phrase",
        _set("final_sip_phrase", "x" * 129),
        "SIP_PHRASE_INVALID",
        "record.final_sip_phrase",
    ),
    (
        "phrase with a newline",
        _set("final_sip_phrase", "OK\r\nX-Evil: 1"),
        "SIP_PHRASE_INVALID",
        "record.final_sip_phrase",
    ),
    ("no end reason", _set("end_reason", 0), "END_REASON_INVALID", "record.end_reason"),
    (
        "answered call ended busy",
        _set("end_reason", pb.CALL_END_REASON_BUSY),
        "END_REASON_INVALID",
        "record.end_reason",
    ),
    ("65 streams", _many_streams, "TOO_MANY_MEDIA_STREAMS", "record.media_streams"),
    (
        "stream direction",
        _stream(1, _set("direction", 0)),
        "MEDIA_STREAM_INVALID",
        "record.media_streams[1].direction",
    ),
    (
        "stream type",
        _stream(0, _set("media_type", 42)),
        "MEDIA_STREAM_INVALID",
        "record.media_streams[0].media_type",
    ),
    (
        "unknown codec",
        _stream(0, _set("codec", "MP3")),
        "MEDIA_STREAM_INVALID",
        "record.media_streams[0].codec",
    ),
    (
        "negative packets",
        _stream(0, _set("packet_count", -1)),
        "METRIC_INVALID",
        "record.media_streams[0].packet_count",
    ),
    (
        "loss over 1",
        _stream(1, _set("packet_loss_rate", 1.5)),
        "METRIC_INVALID",
        "record.media_streams[1].packet_loss_rate",
    ),
    (
        "loss NaN",
        _stream(1, _set("packet_loss_rate", math.nan)),
        "METRIC_INVALID",
        "record.media_streams[1].packet_loss_rate",
    ),
    (
        "negative jitter",
        _stream(0, _jitter(-1)),
        "METRIC_INVALID",
        "record.media_streams[0].average_jitter",
    ),
    (
        "max jitter under average",
        _stream(0, _jitter(50)),  # the stream's max_jitter stays at 10 ms
        "METRIC_INVALID",
        "record.media_streams[0].max_jitter",
    ),
    (
        "degradation over 4",
        _stream(0, _set("network_mos_degradation", 4.5)),
        "METRIC_INVALID",
        "record.media_streams[0].network_mos_degradation",
    ),
    (
        "negative concealment",
        _stream(0, _set("concealed_samples_ratio", -0.1)),
        "METRIC_INVALID",
        "record.media_streams[0].concealed_samples_ratio",
    ),
    (
        "round trip over a minute",
        _stream(0, lambda s: s.average_round_trip.FromSeconds(61)),
        "METRIC_INVALID",
        "record.media_streams[0].average_round_trip",
    ),
]


def test_each_bad_record_is_refused_alone_and_its_neighbours_land(
    fuzz_system: RunningSystem,
) -> None:
    batch: list[pb.PublishedCallRecord] = []
    good: list[pb.CallRecord] = []
    for _, mutate, _, _ in CASES:
        bad = record()
        mutate(bad)
        ok = record()
        batch += [published(bad), published(ok)]
        good.append(ok)
    (response,) = publish(fuzz_system.ingest(), batch)
    for (name, _, reason, field), bad_result, good_result in zip(
        CASES, response.results[::2], response.results[1::2], strict=True
    ):
        assert (bad_result.outcome, bad_result.reason, bad_result.field) == (
            pb.CALL_RECORD_OUTCOME_REFUSED,
            reason,
            field,
        ), name
        assert bad_result.message, name
        assert good_result.outcome == pb.CALL_RECORD_OUTCOME_ACCEPTED, name
    assert response.refused_count == len(CASES) and response.accepted_count == len(CASES)
    got, _, _ = stream_all(fuzz_system.records(), start_time=EPOCH)
    assert set(ids(good)) <= set(ids(got))


def test_valid_variants_are_accepted(fuzz_system: RunningSystem) -> None:
    """The edges that must pass: a Teams SIP URI on the Teams side, early media on a failed
    call, a missing metric (UNCLASSIFIED), a non-audio stream, values at their limits."""
    teams_caller = record(
        direction=OUTBOUND, caller="sip:alice@contoso.example", callee="+33142685300"
    )
    early_media = record(answered=False, streams=[audio(packets=40)])
    missing = record(streams=[audio(loss=None)])
    video = record(
        streams=[
            audio(),
            pb.MediaStream(
                direction=pb.MEDIA_DIRECTION_CALLEE_TO_CALLER,
                media_type=pb.MEDIA_TYPE_VIDEO,
                codec="h264",
            ),
        ]
    )
    limits = record(streams=[audio(loss=1.0, concealed=0.0, degradation=4.0, codec="")])
    records = [teams_caller, early_media, missing, video, limits]
    (response,) = publish(fuzz_system.ingest(), [published(r) for r in records])
    assert [r.reason for r in response.results] == [""] * len(records)
    got = {r.call_id: r for r in stream_all(fuzz_system.records(), start_time=EPOCH)[0]}
    assert got[missing.call_id].quality_class == pb.QUALITY_CLASS_UNCLASSIFIED
    reason = got[missing.call_id].quality_reasons[0]
    assert reason.metric == pb.QUALITY_METRIC_PACKET_LOSS_RATE and not reason.HasField("observed")
    assert got[video.call_id].quality_class == pb.QUALITY_CLASS_GOOD
    assert got[video.call_id].media_streams[1].quality_class == pb.QUALITY_CLASS_UNCLASSIFIED
    assert got[limits.call_id].quality_class == pb.QUALITY_CLASS_POOR
    assert got[early_media.call_id].quality_class == pb.QUALITY_CLASS_GOOD  # too few packets


# --- fuzzing: any value of a field is accepted or refused for that field, never a crash -------

TEXT_FIELDS = {
    "call_id": "CALL_ID_INVALID",
    "tenant_id": "TENANT_ID_INVALID",
    "caller": "CALLER_INVALID",
    "callee": "CALLEE_INVALID",
    "trunk_fqdn": "TRUNK_FQDN_INVALID",
    "final_sip_phrase": "SIP_PHRASE_INVALID",
}


def _publish_between_good(system: RunningSystem, bad: pb.CallRecord) -> pb.CallRecordResult:
    before, after = record(), record()
    (response,) = publish(system.ingest(), [published(before), published(bad), published(after)])
    first, middle, last = response.results
    assert first.outcome == last.outcome == pb.CALL_RECORD_OUTCOME_ACCEPTED
    return middle


@fuzz
@given(name=st.sampled_from(sorted(TEXT_FIELDS)), value=st.text(max_size=300))
def test_fuzzed_text_fields(fuzz_system: RunningSystem, name: str, value: str) -> None:
    bad = record()
    setattr(bad, name, value)
    result = _publish_between_good(fuzz_system, bad)
    if result.outcome == pb.CALL_RECORD_OUTCOME_REFUSED:
        assert (result.reason, result.field) == (TEXT_FIELDS[name], f"record.{name}")
    else:
        assert result.outcome == pb.CALL_RECORD_OUTCOME_ACCEPTED


METRICS = ("packet_loss_rate", "network_mos_degradation", "concealed_samples_ratio")


@fuzz
@given(
    name=st.sampled_from(METRICS),
    value=st.floats(allow_nan=True, allow_infinity=True),
    codec=st.text(max_size=40),
    packets=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_fuzzed_stream_values(
    fuzz_system: RunningSystem, name: str, value: float, codec: str, packets: int
) -> None:
    bad = record()
    stream = bad.media_streams[0]
    setattr(stream, name, value)
    stream.codec = codec
    stream.packet_count = packets
    result = _publish_between_good(fuzz_system, bad)
    assert result.outcome in (pb.CALL_RECORD_OUTCOME_ACCEPTED, pb.CALL_RECORD_OUTCOME_REFUSED)
    if result.outcome == pb.CALL_RECORD_OUTCOME_REFUSED:
        assert result.reason in ("MEDIA_STREAM_INVALID", "METRIC_INVALID")
        assert result.field.startswith("record.media_streams[0].")


@fuzz
@given(body=st.binary(max_size=2_000))
def test_garbage_publish_bodies_answer_clearly(fuzz_system: RunningSystem, body: bytes) -> None:
    """Raw bytes on the publish stream: not a message (REQUEST_MALFORMED) or a message with
    whatever fields it happens to decode to; never INTERNAL, and the server keeps serving."""
    channel = fuzz_system.channel("platform", "admin-center")
    method = channel.stream_stream(
        "/opconnect.records.v1.CallRecordIngestService/PublishCallRecords",
        request_serializer=None,
        response_deserializer=pb.PublishCallRecordsResponse.FromString,
    )
    failure: grpc.RpcError | None = None
    try:
        for response in method(iter([body]), timeout=10):
            assert len(response.results) >= 1
    except grpc.RpcError as error:
        failure = error
    if failure is not None:
        assert failure.code() != grpc.StatusCode.INTERNAL
        assert rich_error(failure).reason
    stub = pb_grpc.CallRecordIngestServiceStub(channel)
    (ok,) = publish(stub, [published(record())])
    assert ok.accepted_count == 1
