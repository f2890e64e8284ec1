"""The protobuf edge of the records service: messages in, domain types out, and back.

A published record is kept as the bytes operators are sent: the record as published (unknown
fields dropped, output-only fields cleared) with its classification, and `publish_time` added at
commit as one more field, all framed as a StreamCallRecordsResponse that holds this record
alone. Concatenated protobuf messages parse as one message whose repeated fields are appended,
so a batch is those bytes joined, then the cursor field (see plumbing.wire): nothing is parsed
or encoded again per record.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math

from google.protobuf import duration_pb2, timestamp_pb2

from opconnect.records.v1 import records_pb2 as pb
from opconnect.type.v1 import call_direction_pb2 as direction_pb
from plumbing import wire
from plumbing.config import Settings
from plumbing.direction import DIRECTION_IN, DIRECTION_OUT, Direction
from plumbing.validation import Outcome, Refusal
from plumbing.wellknown import MAX_DURATION_SECONDS, duration_in, time_in, timestamp
from services.records.quality import Metric, Quality, Reason, Thresholds, Verdict, classify_call
from services.records.rules import (
    CallFact,
    CallRecord,
    Candidate,
    EndReason,
    GroupBy,
    MediaDirection,
    MediaStream,
    MediaType,
    Percentiles,
    Published,
    QualityGroup,
    Result,
    check_published,
)

END_REASON_IN = {
    pb.CALL_END_REASON_CALLER_HANG_UP: EndReason.CALLER_HANG_UP,
    pb.CALL_END_REASON_CALLEE_HANG_UP: EndReason.CALLEE_HANG_UP,
    pb.CALL_END_REASON_CANCELED: EndReason.CANCELED,
    pb.CALL_END_REASON_NO_ANSWER: EndReason.NO_ANSWER,
    pb.CALL_END_REASON_BUSY: EndReason.BUSY,
    pb.CALL_END_REASON_DECLINED: EndReason.DECLINED,
    pb.CALL_END_REASON_UNREACHABLE: EndReason.UNREACHABLE,
    pb.CALL_END_REASON_MEDIA_TIMEOUT: EndReason.MEDIA_TIMEOUT,
    pb.CALL_END_REASON_ERROR: EndReason.ERROR,
    pb.CALL_END_REASON_OTHER: EndReason.OTHER,
}
MEDIA_DIRECTION_IN = {
    pb.MEDIA_DIRECTION_CALLER_TO_CALLEE: MediaDirection.CALLER_TO_CALLEE,
    pb.MEDIA_DIRECTION_CALLEE_TO_CALLER: MediaDirection.CALLEE_TO_CALLER,
}
MEDIA_TYPE_IN = {
    pb.MEDIA_TYPE_AUDIO: MediaType.AUDIO,
    pb.MEDIA_TYPE_VIDEO: MediaType.VIDEO,
    pb.MEDIA_TYPE_SCREEN_SHARING: MediaType.SCREEN_SHARING,
    pb.MEDIA_TYPE_DATA: MediaType.DATA,
}
QUALITY_OUT = {
    Quality.GOOD: pb.QUALITY_CLASS_GOOD,
    Quality.POOR: pb.QUALITY_CLASS_POOR,
    Quality.UNCLASSIFIED: pb.QUALITY_CLASS_UNCLASSIFIED,
}
METRIC_OUT = {
    Metric.PACKET_COUNT: pb.QUALITY_METRIC_PACKET_COUNT,
    Metric.ROUND_TRIP: pb.QUALITY_METRIC_ROUND_TRIP,
    Metric.PACKET_LOSS_RATE: pb.QUALITY_METRIC_PACKET_LOSS_RATE,
    Metric.JITTER: pb.QUALITY_METRIC_JITTER,
    Metric.NETWORK_MOS_DEGRADATION: pb.QUALITY_METRIC_NETWORK_MOS_DEGRADATION,
    Metric.CONCEALED_SAMPLES_RATIO: pb.QUALITY_METRIC_CONCEALED_SAMPLES_RATIO,
}
TIME_METRICS = {Metric.ROUND_TRIP, Metric.JITTER}
OUTCOME_OUT = {
    Outcome.ACCEPTED: pb.CALL_RECORD_OUTCOME_ACCEPTED,
    Outcome.DUPLICATE: pb.CALL_RECORD_OUTCOME_DUPLICATE,
    Outcome.REFUSED: pb.CALL_RECORD_OUTCOME_REFUSED,
}
GROUP_BY_IN = {
    pb.QUALITY_GROUP_BY_UNSPECIFIED: GroupBy.NONE,
    pb.QUALITY_GROUP_BY_TENANT: GroupBy.TENANT,
    pb.QUALITY_GROUP_BY_TRUNK: GroupBy.TRUNK,
}

_PUBLISH_TIME = pb.CallRecord.DESCRIPTOR.fields_by_name["publish_time"].number
_RECORDS = pb.StreamCallRecordsResponse.DESCRIPTOR.fields_by_name["records"].number
_CURSOR = pb.StreamCallRecordsResponse.DESCRIPTOR.fields_by_name["cursor"].number


class _Bad(Exception):
    """A field that cannot be read at all (a timestamp or duration out of its range)."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


# --- in ----------------------------------------------------------------------------------------


def _stamp(stamp: timestamp_pb2.Timestamp, name: str) -> dt.datetime:
    """A set Timestamp field as an aware UTC datetime, refused when not a valid Timestamp."""
    value = time_in(stamp)
    if value is None:
        raise _Bad(Refusal("TIME_INVALID", f"record.{name}", "not a valid timestamp"))
    return value


def _ms(value: duration_pb2.Duration) -> float:
    """A time metric in milliseconds; NaN (refused as out of range) when not a valid Duration.
    (The publish hot path: no timedelta made, `valid_duration`'s test written out.)"""
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(seconds) > MAX_DURATION_SECONDS
        or abs(nanos) >= 1_000_000_000
        or seconds > 0 > nanos
        or seconds < 0 < nanos
    ):
        return math.nan
    return seconds * 1000.0 + nanos / 1e6


# A named tuple made from its values in field order, without its generated __new__'s call (the
# publish hot path makes one per record and per media stream).
_media_stream = functools.partial(tuple.__new__, MediaStream)
_call_record = functools.partial(tuple.__new__, CallRecord)


def stream_in(stream: pb.MediaStream) -> MediaStream:
    has = stream.HasField
    return _media_stream(
        (
            MEDIA_DIRECTION_IN.get(stream.direction),
            MEDIA_TYPE_IN.get(stream.media_type),
            stream.codec,
            stream.packet_count if has("packet_count") else None,
            _ms(stream.average_jitter) if has("average_jitter") else None,
            _ms(stream.max_jitter) if has("max_jitter") else None,
            stream.packet_loss_rate if has("packet_loss_rate") else None,
            _ms(stream.average_round_trip) if has("average_round_trip") else None,
            _ms(stream.max_round_trip) if has("max_round_trip") else None,
            stream.network_mos_degradation if has("network_mos_degradation") else None,
            stream.concealed_samples_ratio if has("concealed_samples_ratio") else None,
        )
    )


def _duration(message: pb.CallRecord) -> dt.timedelta:
    value = duration_in(message.duration)
    if value is None or value < _ZERO:
        raise _Bad(Refusal("DURATION_INVALID", "record.duration", "not a valid, positive duration"))
    return value


_ZERO = dt.timedelta(0)


def record_in(message: pb.CallRecord) -> CallRecord:
    has = message.HasField
    return _call_record(
        (
            message.call_id,
            message.tenant_id,
            DIRECTION_IN.get(message.direction),
            message.caller,
            message.callee,
            message.trunk_fqdn,
            _stamp(message.invite_time, "invite_time") if has("invite_time") else None,
            _stamp(message.answer_time, "answer_time") if has("answer_time") else None,
            _stamp(message.end_time, "end_time") if has("end_time") else None,
            _duration(message),
            message.final_sip_code,
            message.final_sip_phrase,
            END_REASON_IN.get(message.end_reason),
            tuple(map(stream_in, message.media_streams)),
        )
    )


def published_in(
    message: pb.PublishedCallRecord, owned: bool = False
) -> tuple[Published, pb.CallRecord] | Refusal:
    """The domain record and a clean copy of the message (unknown fields dropped, output-only
    fields cleared) that becomes the stored body; or why it cannot even be read. `owned`: the
    caller owns `message` and has dropped its unknown fields already (the servicer, once per
    request): its record is cleaned in place, not copied (the publish hot path)."""
    if owned:
        clean = message.record
    else:
        clean = pb.CallRecord()
        clean.CopyFrom(message.record)
        clean.DiscardUnknownFields()
    clean.ClearField("quality_class")  # output-only (clearing costs less than looking)
    clean.ClearField("quality_reasons")
    clean.ClearField("publish_time")
    for stream in clean.media_streams:
        stream.ClearField("quality_class")
        stream.ClearField("quality_reasons")
    try:
        record = record_in(clean)
    except _Bad as bad:
        return bad.refusal
    content = clean.SerializeToString(deterministic=True)
    digest = hashlib.sha256(message.operator_id.encode() + b"\0" + content).digest()
    return Published(message.operator_id, record, digest), clean


def prepare(
    messages: list[pb.PublishedCallRecord],
    known: set[str],
    settings: Settings,
    thresholds: Thresholds,
    owned: bool = False,
) -> list[Candidate | Result]:
    """Each published record read, checked and classified: a candidate to store (its body made),
    or its refusal. `known` holds the registered operators among the records' operator ids.
    `owned`: see `published_in` (the messages' records become the bodies)."""
    now = dt.datetime.now(dt.UTC)
    retention = dt.timedelta(seconds=settings.record_retention_s)
    skew = dt.timedelta(seconds=settings.clock_skew_s)
    out: list[Candidate | Result] = []
    for message in messages:
        converted = published_in(message, owned)
        if isinstance(converted, Refusal):
            out.append(Result(message.record.call_id, Outcome.REFUSED, converted))
            continue
        published, clean = converted
        refusal = check_published(published, now, retention, skew)
        if refusal is None and published.operator_id not in known:
            refusal = Refusal(
                "OPERATOR_NOT_FOUND", "operator_id", "no operator with this id is registered"
            )
        if refusal is not None:
            out.append(Result(published.record.call_id, Outcome.REFUSED, refusal))
            continue
        call, streams = classify_call(
            [s.metrics() for s in published.record.media_streams], thresholds
        )
        out.append(Candidate(published, call.quality, body(clean, call, streams)))
    return out


# --- out ---------------------------------------------------------------------------------------


def duration_ms(value: float) -> duration_pb2.Duration:
    """Milliseconds as a Duration, as `Duration.FromNanoseconds` makes it (nanos take the
    seconds' sign) at half its cost (the call feed makes one a call)."""
    seconds, nanos = divmod(round(value * 1_000_000), 1_000_000_000)
    if seconds < 0 < nanos:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _metric_value(metric: Metric, value: float) -> pb.MetricValue:
    if metric in TIME_METRICS:
        return pb.MetricValue(duration=duration_ms(value))
    return pb.MetricValue(number=value)


def reason_out(reason: Reason) -> pb.QualityReason:
    out = pb.QualityReason(
        metric=METRIC_OUT[reason.metric],
        threshold=_metric_value(reason.metric, reason.threshold),
        media_stream_index=reason.stream_index,
    )
    if reason.observed is not None:
        out.observed.CopyFrom(_metric_value(reason.metric, reason.observed))
    return out


def body(clean: pb.CallRecord, call: Verdict, streams: list[Verdict]) -> bytes:
    """The stored bytes of a record (all but publish_time): the clean copy, classified."""
    clean.quality_class = QUALITY_OUT[call.quality]
    if call.reasons:
        clean.quality_reasons.extend(reason_out(r) for r in call.reasons)
    for message, verdict in zip(clean.media_streams, streams, strict=True):
        message.quality_class = QUALITY_OUT[verdict.quality]
        if verdict.reasons:
            message.quality_reasons.extend(reason_out(r) for r in verdict.reasons)
    return clean.SerializeToString()


def publish_time_field(value: dt.datetime) -> bytes:
    """`publish_time` as one encoded field (the last field of a record)."""
    return wire.field(_PUBLISH_TIME, timestamp(value).SerializeToString())


def stored(body: bytes, publish_time_field: bytes) -> bytes:
    """What is stored of a record: its body and publish_time, as a StreamCallRecordsResponse
    holding it alone (a `records` entry)."""
    return wire.field(_RECORDS, body + publish_time_field)


def record_out(stored: bytes) -> pb.CallRecord:
    (record,) = pb.StreamCallRecordsResponse.FromString(stored).records
    return record


def stream_response(stored: list[bytes], cursor: str) -> bytes:
    """An encoded StreamCallRecordsResponse of stored records (joined as they are)."""
    tail = wire.field(_CURSOR, cursor.encode()) if cursor else b""  # proto3 omits empty
    return b"".join([*stored, tail])  # one copy of the bodies


def add_results(out: pb.PublishCallRecordsResponse, results: list[Result]) -> None:
    """The results of a batch into its response, in order, each made in place (not made apart
    and copied in: a batch is up to 1,000 records), and its counts."""
    add = out.results.add
    counts = dict.fromkeys(Outcome, 0)
    for result in results:
        outcome, refusal = result.outcome, result.refusal
        counts[outcome] += 1
        if refusal is None:
            add(call_id=result.call_id, outcome=OUTCOME_OUT[outcome])
        else:
            add(
                call_id=result.call_id,
                outcome=OUTCOME_OUT[outcome],
                reason=refusal.reason,
                field=refusal.field,
                message=refusal.message,
            )
    out.accepted_count = counts[Outcome.ACCEPTED]
    out.duplicate_count = counts[Outcome.DUPLICATE]
    out.refused_count = counts[Outcome.REFUSED]


def _durations(value: Percentiles | None) -> pb.DurationPercentiles | None:
    if value is None:
        return None
    return pb.DurationPercentiles(
        p50=duration_ms(value.p50),
        p90=duration_ms(value.p90),
        p99=duration_ms(value.p99),
        stream_count=value.count,
    )


def group_out(group: QualityGroup) -> pb.QualityGroup:
    loss = group.packet_loss_rate
    return pb.QualityGroup(
        key=group.key,
        call_count=group.call_count,
        good_call_count=group.good,
        poor_call_count=group.poor,
        unclassified_call_count=group.unclassified,
        poor_call_rate=group.poor_rate,
        jitter=_durations(group.jitter_ms),
        packet_loss_rate=pb.RatioPercentiles(
            p50=loss.p50, p90=loss.p90, p99=loss.p99, stream_count=loss.count
        )
        if loss is not None
        else None,
        round_trip=_durations(group.round_trip_ms),
    )


def direction_in(value: direction_pb.CallDirection.ValueType) -> Direction | None:
    return DIRECTION_IN.get(value)


def fact_out(fact: CallFact) -> pb.CallFact:
    answer = fact.answer_time
    return pb.CallFact(
        operator_id=fact.operator_id,
        call_id=fact.call_id,
        tenant_id=fact.tenant_id,
        direction=DIRECTION_OUT[Direction(fact.direction)],
        invite_time=timestamp(fact.invite_time),
        answer_time=timestamp(answer) if answer is not None else None,
        duration=duration_ms(fact.duration_ms),
        publish_time=timestamp(fact.publish_time),
    )
