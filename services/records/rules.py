"""The call records domain: its types, and the rules a published record must meet.

A check returns a `Refusal` (reason, field path, message) or None; a refused record is answered
on its own and never stops its neighbours. Quality classification is in quality.py.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from plumbing.config import Settings
from plumbing.direction import Direction
from plumbing.errors import invalid_field
from plumbing.validation import (
    E164,
    IDENTITY,
    Outcome,
    Refusal,
    check_e164,
    check_fqdn,
    check_guid,
    check_sip_or_e164,
)
from services.records.quality import Quality, StreamMetrics, Thresholds

DOMAIN = "records.opconnect"
LOG = "records"  # the record change log: one position per published record

MAX_BATCH = 1_000
MAX_MEDIA_STREAMS = 64
MAX_CALL_LENGTH = dt.timedelta(hours=48)
MAX_METRIC_MS = 60_000.0  # jitter and round trip above a minute are measurement errors
DURATION_TOLERANCE = dt.timedelta(milliseconds=1)
MAX_PHRASE = 128
MAX_CODEC = 32
MAX_BATCH_ID = 128
MAX_MOS_DEGRADATION = 4.0

CALL_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
OPERATOR_ID = IDENTITY
# Payload format names (SDP rtpmap) the platform's media stack uses; compared case-insensitively.
KNOWN_CODECS = frozenset(
    c.lower()
    for c in (
        "PCMU",
        "PCMA",
        "G722",
        "G729",
        "G7221",
        "opus",
        "SILK",
        "SATIN",
        "AMR",
        "AMR-WB",
        "iLBC",
        "RED",
        "CN",
        "telephone-event",
        "H264",
        "H263",
        "VP8",
        "VP9",
        "AV1",
        "RTVideo",
        "T38",
    )
)


class EndReason(StrEnum):
    CALLER_HANG_UP = "caller_hang_up"
    CALLEE_HANG_UP = "callee_hang_up"
    CANCELED = "canceled"
    NO_ANSWER = "no_answer"
    BUSY = "busy"
    DECLINED = "declined"
    UNREACHABLE = "unreachable"
    MEDIA_TIMEOUT = "media_timeout"
    ERROR = "error"
    OTHER = "other"


# Reasons that only an answered call can end with, and those only an unanswered one can.
ANSWERED_ONLY = {EndReason.CALLER_HANG_UP, EndReason.CALLEE_HANG_UP, EndReason.MEDIA_TIMEOUT}
UNANSWERED_ONLY = {
    EndReason.CANCELED,
    EndReason.NO_ANSWER,
    EndReason.BUSY,
    EndReason.DECLINED,
    EndReason.UNREACHABLE,
}


class MediaDirection(StrEnum):
    CALLER_TO_CALLEE = "caller_to_callee"
    CALLEE_TO_CALLER = "callee_to_caller"


class MediaType(StrEnum):
    AUDIO = "audio"
    VIDEO = "video"
    SCREEN_SHARING = "screen_sharing"
    DATA = "data"


class GroupBy(StrEnum):
    NONE = "none"
    TENANT = "tenant"
    TRUNK = "trunk"


class MediaStream(NamedTuple):
    """One media stream as published; None is a missing (or, for enums, unknown) value.
    Time metrics are in milliseconds. (The values publish makes for each record are named
    tuples, immutable as frozen dataclasses but several times cheaper to make.)"""

    direction: MediaDirection | None
    media_type: MediaType | None
    codec: str
    packet_count: int | None
    average_jitter_ms: float | None
    max_jitter_ms: float | None
    packet_loss_rate: float | None
    average_round_trip_ms: float | None
    max_round_trip_ms: float | None
    network_mos_degradation: float | None
    concealed_samples_ratio: float | None

    def metrics(self) -> StreamMetrics:
        """What the quality classification reads (made from its values in StreamMetrics'
        field order: one per stream of every published record)."""
        return _stream_metrics(
            (
                self.media_type is MediaType.AUDIO,
                self.packet_count,
                self.average_round_trip_ms,
                self.packet_loss_rate,
                self.average_jitter_ms,
                self.network_mos_degradation,
                self.concealed_samples_ratio,
            )
        )


_stream_metrics = functools.partial(tuple.__new__, StreamMetrics)


class CallRecord(NamedTuple):
    """A call record as published (output-only fields are not part of it)."""

    call_id: str
    tenant_id: str
    direction: Direction | None
    caller: str
    callee: str
    trunk_fqdn: str
    invite_time: dt.datetime | None
    answer_time: dt.datetime | None
    end_time: dt.datetime | None
    duration: dt.timedelta
    final_sip_code: int
    final_sip_phrase: str
    end_reason: EndReason | None
    media_streams: tuple[MediaStream, ...]

    @property
    def answered(self) -> bool:
        return self.answer_time is not None


class Published(NamedTuple):
    """A record and the operator whose trunk carried it, with the digest of its content (the
    key of idempotent publishing: same call_id and digest is a duplicate)."""

    operator_id: str
    record: CallRecord
    digest: bytes


class Result(NamedTuple):
    """How one published record went."""

    call_id: str
    outcome: Outcome
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Percentiles:
    """Nearest-rank percentiles of one metric over a group's audio streams that report it."""

    p50: float
    p90: float
    p99: float
    count: int


@dataclass(frozen=True)
class QualityGroup:
    key: str
    call_count: int
    good: int
    poor: int
    unclassified: int
    jitter_ms: Percentiles | None
    packet_loss_rate: Percentiles | None
    round_trip_ms: Percentiles | None

    @property
    def poor_rate(self) -> float:
        classified = self.good + self.poor
        return self.poor / classified if classified else 0.0


@dataclass(frozen=True)
class SummaryQuery:
    """What GetQualitySummary sums up: the operator's calls set up in [start, end)."""

    operator_id: str
    start: dt.datetime
    end: dt.datetime
    group_by: GroupBy
    tenant_id: str | None
    trunk_fqdn: str | None
    direction: Direction | None


@dataclass(frozen=True)
class StreamFilter:
    """What a StreamCallRecords stream selects of the operator's records."""

    operator_id: str
    tenant_id: str | None
    phone_number: str | None
    poor_only: bool
    end_time: dt.datetime | None


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        min_packets=settings.quality_min_packets,
        round_trip_ms=settings.quality_round_trip_ms,
        packet_loss_rate=settings.quality_packet_loss_rate,
        jitter_ms=settings.quality_jitter_ms,
        mos_degradation=settings.quality_mos_degradation,
        concealed_ratio=settings.quality_concealed_ratio,
    )


# --- checks of a published record ---------------------------------------------------------------


def check_published(
    published: Published, now: dt.datetime, retention: dt.timedelta, skew: dt.timedelta
) -> Refusal | None:
    """The first rule the record breaks, or None. Operator registration is checked apart."""
    if OPERATOR_ID.fullmatch(published.operator_id) is None:
        return Refusal(
            "OPERATOR_ID_INVALID",
            "operator_id",
            "not an operator id (1 to 63 of a-z 0-9 -, starting with a letter or digit)",
        )
    return check_record(published.record, now, retention, skew)


# The checks of values that recur from record to record (a tenant, a trunk, an operator's
# numbers, its customers' users), remembered: pure functions of one string each, bounded.
_guid = functools.lru_cache(maxsize=4096)(check_guid)
_e164 = functools.lru_cache(maxsize=4096)(check_e164)
_sip_or_e164 = functools.lru_cache(maxsize=4096)(check_sip_or_e164)
_fqdn = functools.lru_cache(maxsize=256)(check_fqdn)


def check_record(
    record: CallRecord, now: dt.datetime, retention: dt.timedelta, skew: dt.timedelta
) -> Refusal | None:
    r = "record."
    if CALL_ID.fullmatch(record.call_id) is None:
        return Refusal("CALL_ID_INVALID", r + "call_id", "1 to 64 of A-Z a-z 0-9 . _ -")
    if problem := _guid(record.tenant_id):
        return Refusal("TENANT_ID_INVALID", r + "tenant_id", problem)
    direction = record.direction
    if direction is None:
        return Refusal("DIRECTION_INVALID", r + "direction", "required: INBOUND or OUTBOUND")
    inbound = direction is Direction.INBOUND  # the PSTN side: the caller in, the callee out
    if problem := _e164(record.caller) if inbound else _sip_or_e164(record.caller):
        return _party_refusal("caller", problem, inbound)
    if problem := _sip_or_e164(record.callee) if inbound else _e164(record.callee):
        return _party_refusal("callee", problem, not inbound)
    trunk = record.trunk_fqdn
    if problem := _fqdn(trunk):
        return Refusal("TRUNK_FQDN_INVALID", r + "trunk_fqdn", problem)
    if trunk != trunk.lower():
        return Refusal("TRUNK_FQDN_INVALID", r + "trunk_fqdn", "must be lowercase")
    if refusal := _check_times(record, now, retention, skew):
        return refusal
    if not 200 <= record.final_sip_code <= 699:
        return Refusal("SIP_CODE_INVALID", r + "final_sip_code", "a final SIP code, 200 to 699")
    if (record.final_sip_code < 300) != record.answered:
        return Refusal(
            "SIP_CODE_INVALID",
            r + "final_sip_code",
            "a 2xx code exactly when the call was answered (answer_time set)",
        )
    phrase = record.final_sip_phrase
    if len(phrase) > MAX_PHRASE or not phrase.isprintable():
        return Refusal(
            "SIP_PHRASE_INVALID", r + "final_sip_phrase", "at most 128 printable characters"
        )
    if refusal := _check_end_reason(record):
        return refusal
    if len(record.media_streams) > MAX_MEDIA_STREAMS:
        return Refusal(
            "TOO_MANY_MEDIA_STREAMS", r + "media_streams", f"at most {MAX_MEDIA_STREAMS} streams"
        )
    for index, stream in enumerate(record.media_streams):
        if refusal := check_stream(stream, f"{r}media_streams[{index}]."):
            return refusal
    return None


def _party_refusal(name: str, problem: str, pstn: bool) -> Refusal:
    side = " (the PSTN side of the call must be E.164)" if pstn else ""
    return Refusal(f"{name.upper()}_INVALID", f"record.{name}", problem + side)


def _check_times(
    record: CallRecord, now: dt.datetime, retention: dt.timedelta, skew: dt.timedelta
) -> Refusal | None:
    r = "record."
    invite, answer, end = record.invite_time, record.answer_time, record.end_time
    if invite is None:
        return Refusal("TIME_INVALID", r + "invite_time", "required")
    if end is None:
        return Refusal("TIME_INVALID", r + "end_time", "required")
    if answer is not None and answer < invite:
        return Refusal("TIME_INVALID", r + "answer_time", "before invite_time")
    if end < (answer or invite):
        return Refusal("TIME_INVALID", r + "end_time", "before invite_time or answer_time")
    if end - invite > MAX_CALL_LENGTH:
        return Refusal("TIME_INVALID", r + "end_time", "more than 48 hours after invite_time")
    if end > now + skew:
        return Refusal("TIME_INVALID", r + "end_time", "in the future")
    if end < now - retention:
        return Refusal("RECORD_EXPIRED", r + "end_time", "older than the retention of call records")
    expected = end - answer if answer is not None else dt.timedelta(0)
    if abs(record.duration - expected) > DURATION_TOLERANCE:
        return Refusal(
            "DURATION_INVALID",
            r + "duration",
            "must be end_time minus answer_time for an answered call, zero otherwise",
        )
    return None


def _check_end_reason(record: CallRecord) -> Refusal | None:
    reason = record.end_reason
    field = "record.end_reason"
    if reason is None:
        return Refusal("END_REASON_INVALID", field, "required")
    if reason in ANSWERED_ONLY and not record.answered:
        return Refusal("END_REASON_INVALID", field, f"{reason.name} needs an answered call")
    if reason in UNANSWERED_ONLY and record.answered:
        return Refusal("END_REASON_INVALID", field, f"{reason.name} needs an unanswered call")
    return None


def check_stream(stream: MediaStream, path: str) -> Refusal | None:
    if stream.direction is None:
        return Refusal("MEDIA_STREAM_INVALID", path + "direction", "required")
    if stream.media_type is None:
        return Refusal("MEDIA_STREAM_INVALID", path + "media_type", "required")
    codec = stream.codec
    if codec and (len(codec) > MAX_CODEC or codec.lower() not in KNOWN_CODECS):
        return Refusal(
            "MEDIA_STREAM_INVALID",
            path + "codec",
            "not a known codec (e.g. PCMU, PCMA, G722, opus, SILK, SATIN); empty when unknown",
        )
    if stream.packet_count is not None and stream.packet_count < 0:
        return Refusal("METRIC_INVALID", path + "packet_count", "must not be negative")
    ranges = (
        ("average_jitter", stream.average_jitter_ms, MAX_METRIC_MS),
        ("max_jitter", stream.max_jitter_ms, MAX_METRIC_MS),
        ("average_round_trip", stream.average_round_trip_ms, MAX_METRIC_MS),
        ("max_round_trip", stream.max_round_trip_ms, MAX_METRIC_MS),
        ("packet_loss_rate", stream.packet_loss_rate, 1.0),
        ("network_mos_degradation", stream.network_mos_degradation, MAX_MOS_DEGRADATION),
        ("concealed_samples_ratio", stream.concealed_samples_ratio, 1.0),
    )
    for name, value, top in ranges:  # NaN and infinities compare False: refused too
        if value is not None and not 0 <= value <= top:
            return Refusal("METRIC_INVALID", path + name, f"must be from 0 to {top:g}")
    for name, average, peak in (
        ("max_jitter", stream.average_jitter_ms, stream.max_jitter_ms),
        ("max_round_trip", stream.average_round_trip_ms, stream.max_round_trip_ms),
    ):
        if average is not None and peak is not None and peak < average:
            return Refusal("METRIC_INVALID", path + name, "below the average")
    return None


def check_batch_id(batch_id: str) -> None:
    if len(batch_id) > MAX_BATCH_ID or not batch_id.isprintable():
        raise invalid_field(
            DOMAIN, "BATCH_ID_INVALID", "batch_id", "at most 128 printable characters"
        )


# --- checks of read requests -------------------------------------------------------------------


def optional_number(value: str, field: str = "phone_number") -> str | None:
    if not value:
        return None
    if E164.fullmatch(value) is None:
        raise invalid_field(DOMAIN, "PHONE_NUMBER_INVALID", field, check_e164(value) or "")
    return value


def optional_trunk(value: str, field: str = "trunk_fqdn") -> str | None:
    if not value:
        return None
    problem = check_fqdn(value)
    if problem:
        raise invalid_field(DOMAIN, "TRUNK_FQDN_INVALID", field, problem)
    return value.lower()


def require_call_id(value: str) -> str:
    if CALL_ID.fullmatch(value) is None:
        raise invalid_field(DOMAIN, "CALL_ID_INVALID", "call_id", "1 to 64 of A-Z a-z 0-9 . _ -")
    return value


MAX_SUMMARY_PERIOD = dt.timedelta(days=31)


class Candidate(NamedTuple):
    """A valid, classified record ready to store: `body` lacks only its publish_time."""

    published: Published
    quality: Quality
    body: bytes


@dataclass(frozen=True)
class CallFact:
    """What the platform's own systems need of a published call (CallFeedService)."""

    position: int
    operator_id: str
    call_id: str
    tenant_id: str
    direction: str
    invite_time: dt.datetime
    answer_time: dt.datetime | None
    duration_ms: int
    publish_time: dt.datetime
