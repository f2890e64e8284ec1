"""Realistic call records, as the platform's call controller would publish them.

Pure and deterministic: every choice is drawn from the `random.Random` passed in, and the only
clock is the `now` passed in, so one seed gives the same records. No I/O.

The mix, per call:

* direction INBOUND or OUTBOUND, half each. INBOUND: a PSTN caller (E.164 of the US, UK,
  Germany, France or Australia) calls one of the operator's assigned numbers. OUTBOUND: a Teams
  user (its assigned number, or sometimes its `sip:` URI) calls a PSTN number;
* answered about 3 calls in 4: 200 OK, answered 1 to 20 s after the INVITE, connected for a
  lognormal time around 2 to 3 minutes (at most 2 hours), two audio streams, sometimes a video
  stream. A share of answered calls (`poor_share`) has one audio stream over a Call Quality
  Dashboard threshold; about 2% misses a metric (UNCLASSIFIED);
* otherwise failed with a real SIP code (486, 600, 487, 480, 408, 603, 404, 484, 503, 500) after
  2 to 30 s, never answered, duration zero, no media or a little early media.

Every record passes the server's publish checks (see `CallMix` and tests/test_simulator_calls.py).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from opconnect.records.v1 import records_pb2 as pb
from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect.usage.v1 import usage_pb2 as usage_pb

# The Teams side's SIP domain: assigned number i routes to sip:user<i>@TEAMS_DOMAIN.
TEAMS_DOMAIN = "contoso.example"
# Audio packets per second (20 ms frames), and video packets per second.
AUDIO_PACKET_RATE = 50
VIDEO_PACKET_RATE = 200
# Shares of the mix.
ANSWERED_SHARE = 0.75
UNCLASSIFIED_SHARE = 0.02
VIDEO_SHARE = 0.05
TEAMS_URI_SHARE = 0.15
EARLY_MEDIA_SHARE = 0.25
# Connected time: lognormal with this median (seconds) and spread, within these bounds.
TALK_MEDIAN_S = 150.0
TALK_SIGMA = 0.9
TALK_MIN_MS = 1_000
TALK_MAX_MS = 2 * 3600 * 1000
# POOR and UNCLASSIFIED calls last at least this long, so that their streams carry more than
# the 500 packets the classification needs to judge a stream.
JUDGED_MIN_MS = 30_000

# Audio codecs on the trunk, weighted by how often they are negotiated.
AUDIO_CODECS: tuple[tuple[str, int], ...] = (
    ("SILK", 30),
    ("G722", 20),
    ("PCMU", 20),
    ("PCMA", 15),
    ("opus", 10),
    ("SATIN", 5),
)
VIDEO_CODECS = ("H264", "VP8")


@dataclass(frozen=True)
class Failure:
    """One way a call fails: its final SIP response, why it ended, how often it happens, and
    whether the callee's side rang (so early media is possible)."""

    code: int
    phrase: str
    end_reason: pb.CallEndReason.ValueType
    weight: int
    rang: bool


FAILURES: tuple[Failure, ...] = (
    Failure(487, "Request Terminated", pb.CALL_END_REASON_CANCELED, 30, True),
    Failure(486, "Busy Here", pb.CALL_END_REASON_BUSY, 16, True),
    Failure(480, "Temporarily Unavailable", pb.CALL_END_REASON_NO_ANSWER, 15, True),
    Failure(603, "Decline", pb.CALL_END_REASON_DECLINED, 10, True),
    Failure(408, "Request Timeout", pb.CALL_END_REASON_NO_ANSWER, 8, True),
    Failure(404, "Not Found", pb.CALL_END_REASON_UNREACHABLE, 7, False),
    Failure(503, "Service Unavailable", pb.CALL_END_REASON_UNREACHABLE, 5, False),
    Failure(484, "Address Incomplete", pb.CALL_END_REASON_UNREACHABLE, 3, False),
    Failure(500, "Server Internal Error", pb.CALL_END_REASON_ERROR, 3, False),
    Failure(600, "Busy Everywhere", pb.CALL_END_REASON_BUSY, 3, True),
)

# The metrics a POOR stream may cross, each with the range of a poor value (all above the Call
# Quality Dashboard thresholds: jitter 30 ms, loss 0.1, round trip 500 ms, degradation 1.0,
# concealed 0.07).
POOR_METRICS = ("jitter", "loss", "round_trip", "degradation", "concealed")
# The metrics an UNCLASSIFIED stream may miss.
MISSABLE_METRICS = ("packet_count", *POOR_METRICS)


@dataclass(frozen=True)
class TeamsUser:
    """A Teams user of the customer tenant: its assigned number and the SIP URI it routes to."""

    number: str
    sip_uri: str


@dataclass(frozen=True)
class CallMix:
    """Who the calls are for and what they look like.

    `operator_id` is the operator whose trunks carry the calls, `tenant_id` the customer tenant
    (a GUID), `trunks` the operator's SBCs (lowercase FQDNs; each call crosses one), `users` the
    tenant's users with the operator's assigned numbers (at least one), `poor_share` the share
    (0 to 1) of answered calls with a POOR audio stream.
    """

    operator_id: str
    tenant_id: str
    trunks: Sequence[str]
    users: Sequence[TeamsUser]
    poor_share: float = 0.1


def sip_uri_for(index: int) -> str:
    """The SIP URI the operator's `index`-th number is assigned to: `sip:user<index>@...`."""
    return f"sip:user{index}@{TEAMS_DOMAIN}"


def operator_numbers(rng: random.Random, count: int) -> list[str]:
    """`count` distinct numbers of the operator's block +1 425 555 0000 to 9999 (at most
    10,000). Asking again with an rng in the same state and a larger count gives the same
    numbers first, then more."""
    if not 0 <= count <= 10_000:
        raise ValueError("count must be 0 to 10,000")
    lines = list(range(10_000))
    rng.shuffle(lines)
    return [f"+1425555{line:04d}" for line in lines[:count]]


def teams_users(numbers: Sequence[str]) -> list[TeamsUser]:
    """The users the numbers are assigned to, number i routed to `sip_uri_for(i)`."""
    return [TeamsUser(number, sip_uri_for(i)) for i, number in enumerate(numbers)]


def pstn_number(rng: random.Random) -> str:
    """A random PSTN number, E.164, in a realistic national format."""
    country = rng.choices(("US", "GB", "DE", "FR", "AU"), weights=(50, 15, 15, 12, 8))[0]
    if country == "US":
        # NANP: area code and exchange start with 2-9; the fictional 555 exchange is left to
        # the operator's own numbers.
        area = rng.randint(200, 999)
        exchange = rng.randint(200, 998)
        exchange += exchange >= 555
        return f"+1{area}{exchange}{rng.randint(0, 9999):04d}"
    if country == "GB":
        if rng.random() < 0.6:
            return f"+447{rng.randint(0, 999_999_999):09d}"  # mobile
        return f"+4420{rng.randint(3000_0000, 8999_9999)}"  # London
    if country == "DE":
        if rng.random() < 0.6:
            prefix = rng.choice(("151", "152", "160", "170", "171", "176"))
            return f"+49{prefix}{rng.randint(0, 99_999_999):08d}"  # mobile
        return f"+4930{rng.randint(1000_0000, 9999_9999)}"  # Berlin
    if country == "FR":
        return f"+33{rng.choice('1679')}{rng.randint(0, 99_999_999):08d}"
    return f"+614{rng.randint(0, 99_999_999):08d}"  # Australian mobile


def _call_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _timestamp(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _ms(value_ms: float) -> Duration:
    """A Duration of `value_ms` milliseconds, to the microsecond."""
    duration = Duration()
    duration.FromMicroseconds(round(value_ms * 1000))
    return duration


def _talk_ms(rng: random.Random, judged: bool) -> int:
    """How long an answered call stays connected, in milliseconds."""
    talk = round(rng.lognormvariate(math.log(TALK_MEDIAN_S), TALK_SIGMA) * 1000)
    low = JUDGED_MIN_MS if judged else TALK_MIN_MS
    return max(low, min(TALK_MAX_MS, talk))


def _good_audio(
    rng: random.Random, direction: pb.MediaDirection.ValueType, codec: str, packets: int
) -> pb.MediaStream:
    """An audio stream with every metric well within the thresholds."""
    jitter = min(20.0, rng.lognormvariate(math.log(3.0), 0.5))
    round_trip = rng.uniform(20.0, 150.0)
    return pb.MediaStream(
        direction=direction,
        media_type=pb.MEDIA_TYPE_AUDIO,
        codec=codec,
        packet_count=packets,
        average_jitter=_ms(jitter),
        max_jitter=_ms(jitter * rng.uniform(1.5, 4.0)),
        packet_loss_rate=0.02 * rng.random() ** 2,
        average_round_trip=_ms(round_trip),
        max_round_trip=_ms(round_trip * rng.uniform(1.1, 2.5)),
        network_mos_degradation=0.5 * rng.random() ** 2,
        concealed_samples_ratio=0.03 * rng.random() ** 2,
    )


def _make_poor(rng: random.Random, stream: pb.MediaStream) -> None:
    """Push one or two of the stream's metrics over their thresholds."""
    for metric in rng.sample(POOR_METRICS, rng.choices((1, 2), weights=(7, 3))[0]):
        if metric == "jitter":
            jitter = rng.uniform(32.0, 120.0)
            stream.average_jitter.CopyFrom(_ms(jitter))
            stream.max_jitter.CopyFrom(_ms(jitter * rng.uniform(1.5, 3.0)))
        elif metric == "loss":
            stream.packet_loss_rate = rng.uniform(0.11, 0.35)
        elif metric == "round_trip":
            round_trip = rng.uniform(520.0, 1500.0)
            stream.average_round_trip.CopyFrom(_ms(round_trip))
            stream.max_round_trip.CopyFrom(_ms(round_trip * rng.uniform(1.1, 2.0)))
        elif metric == "degradation":
            stream.network_mos_degradation = rng.uniform(1.1, 2.8)
        else:
            stream.concealed_samples_ratio = rng.uniform(0.08, 0.3)


def _drop_metric(rng: random.Random, stream: pb.MediaStream) -> None:
    """Leave one metric the classification needs unset (the stream is then UNCLASSIFIED)."""
    fields = {
        "packet_count": ("packet_count",),
        "jitter": ("average_jitter", "max_jitter"),
        "loss": ("packet_loss_rate",),
        "round_trip": ("average_round_trip", "max_round_trip"),
        "degradation": ("network_mos_degradation",),
        "concealed": ("concealed_samples_ratio",),
    }[rng.choice(MISSABLE_METRICS)]
    for name in fields:
        stream.ClearField(name)  # type: ignore[arg-type]


def _video(rng: random.Random, seconds: float) -> pb.MediaStream:
    """A video stream (not classified: the audio-only metrics are left unset)."""
    round_trip = rng.uniform(20.0, 150.0)
    jitter = rng.uniform(2.0, 15.0)
    return pb.MediaStream(
        direction=rng.choice(
            (pb.MEDIA_DIRECTION_CALLER_TO_CALLEE, pb.MEDIA_DIRECTION_CALLEE_TO_CALLER)
        ),
        media_type=pb.MEDIA_TYPE_VIDEO,
        codec=rng.choice(VIDEO_CODECS),
        packet_count=round(VIDEO_PACKET_RATE * seconds * rng.uniform(0.9, 1.0)),
        average_jitter=_ms(jitter),
        max_jitter=_ms(jitter * rng.uniform(1.5, 4.0)),
        packet_loss_rate=0.02 * rng.random() ** 2,
        average_round_trip=_ms(round_trip),
        max_round_trip=_ms(round_trip * rng.uniform(1.1, 2.5)),
    )


def _parties(
    rng: random.Random, mix: CallMix
) -> tuple[direction_pb.CallDirection.ValueType, str, str]:
    """(direction, caller, callee)."""
    user = rng.choice(mix.users)
    if rng.random() < 0.5:
        return direction_pb.CALL_DIRECTION_INBOUND, pstn_number(rng), user.number
    caller = user.sip_uri if rng.random() < TEAMS_URI_SHARE else user.number
    return direction_pb.CALL_DIRECTION_OUTBOUND, caller, pstn_number(rng)


def make_call(
    rng: random.Random, mix: CallMix, now: dt.datetime, call_id: str | None = None
) -> pb.PublishedCallRecord:
    """One call that ended at `now` (a timezone-aware datetime; kept to the millisecond), for
    `mix.operator_id`. `call_id` defaults to a GUID drawn from `rng`."""
    if not mix.users or not mix.trunks:
        raise ValueError("a call mix needs at least one user and one trunk")
    end = now.replace(microsecond=now.microsecond - now.microsecond % 1000)
    direction, caller, callee = _parties(rng, mix)
    record = pb.CallRecord(
        call_id=call_id if call_id is not None else _call_id(rng),
        tenant_id=mix.tenant_id,
        direction=direction,
        caller=caller,
        callee=callee,
        trunk_fqdn=rng.choice(mix.trunks),
        end_time=_timestamp(end),
    )
    if rng.random() < ANSWERED_SHARE:
        _answered(rng, mix, record, end)
    else:
        _failed(rng, record, end)
    return pb.PublishedCallRecord(operator_id=mix.operator_id, record=record)


def _answered(rng: random.Random, mix: CallMix, record: pb.CallRecord, end: dt.datetime) -> None:
    """Fill in an answered call: times, 200 OK, who hung up, and its media streams."""
    draw = rng.random()
    poor = draw < mix.poor_share
    unclassified = not poor and draw < mix.poor_share + UNCLASSIFIED_SHARE
    talk = dt.timedelta(milliseconds=_talk_ms(rng, judged=poor or unclassified))
    answer = end - talk
    invite = answer - dt.timedelta(milliseconds=rng.randint(1_000, 20_000))
    record.invite_time.CopyFrom(_timestamp(invite))
    record.answer_time.CopyFrom(_timestamp(answer))
    duration = Duration()
    duration.FromTimedelta(end - answer)
    record.duration.CopyFrom(duration)
    record.final_sip_code = 200
    record.final_sip_phrase = "OK"
    if rng.random() < (0.1 if poor else 0.01):
        record.end_reason = pb.CALL_END_REASON_MEDIA_TIMEOUT
    else:
        record.end_reason = rng.choice(
            (pb.CALL_END_REASON_CALLER_HANG_UP, pb.CALL_END_REASON_CALLEE_HANG_UP)
        )
    seconds = talk.total_seconds()
    codec = rng.choices([c for c, _ in AUDIO_CODECS], weights=[w for _, w in AUDIO_CODECS])[0]
    streams = [
        _good_audio(
            rng, direction, codec, round(AUDIO_PACKET_RATE * seconds * rng.uniform(0.98, 1.0))
        )
        for direction in (pb.MEDIA_DIRECTION_CALLER_TO_CALLEE, pb.MEDIA_DIRECTION_CALLEE_TO_CALLER)
    ]
    if poor:
        _make_poor(rng, rng.choice(streams))
    elif unclassified:
        _drop_metric(rng, rng.choice(streams))
    if rng.random() < VIDEO_SHARE:
        streams.append(_video(rng, seconds))
    record.media_streams.extend(streams)


def _failed(rng: random.Random, record: pb.CallRecord, end: dt.datetime) -> None:
    """Fill in a call that was never answered: times, its SIP failure, maybe early media."""
    failure = rng.choices(FAILURES, weights=[f.weight for f in FAILURES])[0]
    record.invite_time.CopyFrom(
        _timestamp(end - dt.timedelta(milliseconds=rng.randint(2_000, 30_000)))
    )
    record.duration.CopyFrom(Duration())
    record.final_sip_code = failure.code
    record.final_sip_phrase = failure.phrase
    record.end_reason = failure.end_reason
    if failure.rang and rng.random() < EARLY_MEDIA_SHARE:
        codec = rng.choices([c for c, _ in AUDIO_CODECS], weights=[w for _, w in AUDIO_CODECS])[0]
        record.media_streams.extend(
            _good_audio(rng, direction, codec, rng.randint(5, 400))
            for direction in (
                pb.MEDIA_DIRECTION_CALLER_TO_CALLEE,
                pb.MEDIA_DIRECTION_CALLEE_TO_CALLER,
            )
        )


def make_calls(
    rng: random.Random, mix: CallMix, now: dt.datetime, count: int
) -> list[pb.PublishedCallRecord]:
    """`count` calls that all ended at `now`."""
    return [make_call(rng, mix, now) for _ in range(count)]


# --- the operator's side: its duration records of the calls ---------------------------------


@dataclass(frozen=True)
class ReportMix:
    """How the simulated operator's records differ from the platform's, on purpose, so that
    reconciliation has something to find: shares of answered calls it does not report
    (`missing`), reports with a duration off by more than the tolerance (`mismatched`), extra
    reports of calls the platform never had (`extra`, per answered call), and reports of calls
    the platform did not answer, billing their ringing time (`unanswered`, per unanswered
    call)."""

    missing: float = 0.03
    mismatched: float = 0.02
    extra: float = 0.01
    unanswered: float = 0.01


def _report(
    record: pb.CallRecord, number_of: dict[str, str], start: Timestamp, duration: Duration
) -> usage_pb.CallDurationRecord:
    """The operator's record of a call: from `start` to its end, lasting `duration`."""
    return usage_pb.CallDurationRecord(
        record_id=f"op-{record.call_id}",
        call_id=record.call_id,
        tenant_id=record.tenant_id,
        caller=number_of.get(record.caller, record.caller),
        callee=number_of.get(record.callee, record.callee),
        direction=record.direction,
        start_time=start,
        end_time=record.end_time,
        duration=duration,
    )


def operator_reports(
    rng: random.Random,
    published: Sequence[pb.PublishedCallRecord],
    users: Sequence[TeamsUser],
    mix: ReportMix,
) -> list[usage_pb.CallDurationRecord]:
    """The operator's duration records of the answered calls among `published` (and, at the
    share `mix.unanswered`, of calls the platform did not answer)."""
    number_of = {u.sip_uri: u.number for u in users}
    out: list[usage_pb.CallDurationRecord] = []
    for item in published:
        record = item.record
        if not record.HasField("answer_time"):
            # Usage counts answered calls only; a switch that bills the ringing time reports
            # some anyway (reconciliation: UNANSWERED_ON_PLATFORM).
            if rng.random() < mix.unanswered:
                ringing = Duration()
                ringing.FromTimedelta(
                    record.end_time.ToDatetime() - record.invite_time.ToDatetime()
                )
                out.append(_report(record, number_of, record.invite_time, ringing))
            continue
        if rng.random() < mix.missing:
            continue
        report = _report(record, number_of, record.answer_time, record.duration)
        talk_ms = record.duration.ToMilliseconds()
        if talk_ms >= 4_000 and rng.random() < mix.mismatched:
            # Short by 10% to 40%, and at least 2 s: beyond max(1 s, 1%).
            short = max(2_000, int(talk_ms * rng.uniform(0.1, 0.4)))
            report.duration.FromMilliseconds(talk_ms - short)
        out.append(report)
        if rng.random() < mix.extra:
            extra = usage_pb.CallDurationRecord()
            extra.CopyFrom(report)
            extra.call_id = _call_id(rng)
            extra.record_id = f"op-extra-{extra.call_id}"
            out.append(extra)
    return out
