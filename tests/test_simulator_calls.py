"""The simulator's call records (simulator/calls.py), without a server: every record passes the
publish checks of CallRecordIngestService (written out again here, independently of the
server's code), the mix looks like real traffic, and one seed gives the same records."""

from __future__ import annotations

import datetime as dt
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable

import pytest
from google.protobuf.duration_pb2 import Duration

from opconnect.records.v1 import records_pb2 as pb
from opconnect.type.v1 import call_direction_pb2 as direction_pb
from services.records.quality import Quality, StreamMetrics, Thresholds, classify_call
from services.usage import convert as usage_convert
from services.usage import rules as usage_rules
from simulator import calls

NOW = dt.datetime(2025, 6, 1, 12, 0, 0, 123_456, tzinfo=dt.UTC)
TENANT = "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"
SEEDS = (1, 2, 3)
COUNT = 2_000

E164 = re.compile(r"\+[1-9][0-9]{1,14}")
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CALL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SIP_URI = re.compile(r"sips?:([^@\s]+@)?[A-Za-z0-9.-]+(;[^\s]*)?", re.IGNORECASE)
PRINTABLE = re.compile(r"[\x20-\x7e]*")
CODECS = {
    c.lower()
    for c in (
        *("PCMU", "PCMA", "G722", "G729", "G7221", "opus", "SILK", "SATIN", "AMR", "AMR-WB"),
        *("iLBC", "RED", "CN", "telephone-event", "H264", "H263", "VP8", "VP9", "AV1"),
        *("RTVideo", "T38"),
    )
}
ANSWERED_REASONS = {
    pb.CALL_END_REASON_CALLER_HANG_UP,
    pb.CALL_END_REASON_CALLEE_HANG_UP,
    pb.CALL_END_REASON_MEDIA_TIMEOUT,
}
UNANSWERED_REASONS = {
    pb.CALL_END_REASON_CANCELED,
    pb.CALL_END_REASON_NO_ANSWER,
    pb.CALL_END_REASON_BUSY,
    pb.CALL_END_REASON_DECLINED,
    pb.CALL_END_REASON_UNREACHABLE,
}
# The failures the brief names: code -> (phrase, end reason).
FAILURES = {
    486: ("Busy Here", pb.CALL_END_REASON_BUSY),
    600: ("Busy Everywhere", pb.CALL_END_REASON_BUSY),
    487: ("Request Terminated", pb.CALL_END_REASON_CANCELED),
    480: ("Temporarily Unavailable", pb.CALL_END_REASON_NO_ANSWER),
    408: ("Request Timeout", pb.CALL_END_REASON_NO_ANSWER),
    603: ("Decline", pb.CALL_END_REASON_DECLINED),
    404: ("Not Found", pb.CALL_END_REASON_UNREACHABLE),
    484: ("Address Incomplete", pb.CALL_END_REASON_UNREACHABLE),
    503: ("Service Unavailable", pb.CALL_END_REASON_UNREACHABLE),
    500: ("Server Internal Error", pb.CALL_END_REASON_ERROR),
}
MS = 1_000_000  # nanoseconds


def mix(rng: random.Random, poor_share: float = 0.1) -> calls.CallMix:
    return calls.CallMix(
        operator_id="contoso-telecom",
        tenant_id=TENANT,
        trunks=("sbc1.contoso-telecom.example", "sbc2.contoso-telecom.example"),
        users=calls.teams_users(calls.operator_numbers(rng, 20)),
        poor_share=poor_share,
    )


def generate(seed: int, poor_share: float = 0.1) -> list[pb.PublishedCallRecord]:
    rng = random.Random(seed)
    return calls.make_calls(rng, mix(rng, poor_share), NOW, COUNT)


def is_fqdn(value: str) -> bool:
    labels = value.split(".")
    return (
        len(value) <= 253
        and len(labels) >= 2
        and all(LABEL.fullmatch(label) for label in labels)
        and labels[-1][0].isalpha()
    )


def party_ok(value: str) -> bool:
    return bool(E164.fullmatch(value) or (len(value) <= 512 and SIP_URI.fullmatch(value)))


def metrics_of(stream: pb.MediaStream) -> dict[str, float | None]:
    """The stream's optional metrics, None when unset; times in milliseconds."""

    def ms(present: bool, value: Duration) -> float | None:
        return value.ToNanoseconds() / 1e6 if present else None

    return {
        "packet_count": stream.packet_count if stream.HasField("packet_count") else None,
        "average_jitter": ms(stream.HasField("average_jitter"), stream.average_jitter),
        "max_jitter": ms(stream.HasField("max_jitter"), stream.max_jitter),
        "average_round_trip": ms(stream.HasField("average_round_trip"), stream.average_round_trip),
        "max_round_trip": ms(stream.HasField("max_round_trip"), stream.max_round_trip),
        "packet_loss_rate": (
            stream.packet_loss_rate if stream.HasField("packet_loss_rate") else None
        ),
        "network_mos_degradation": (
            stream.network_mos_degradation if stream.HasField("network_mos_degradation") else None
        ),
        "concealed_samples_ratio": (
            stream.concealed_samples_ratio if stream.HasField("concealed_samples_ratio") else None
        ),
    }


# Each metric's allowed range.
RANGES = {
    "packet_count": (0.0, float("inf")),
    "average_jitter": (0.0, 60_000.0),
    "max_jitter": (0.0, 60_000.0),
    "average_round_trip": (0.0, 60_000.0),
    "max_round_trip": (0.0, 60_000.0),
    "packet_loss_rate": (0.0, 1.0),
    "network_mos_degradation": (0.0, 4.0),
    "concealed_samples_ratio": (0.0, 1.0),
}


def stream_problems(index: int, stream: pb.MediaStream) -> list[str]:
    where = f"media_streams[{index}]"
    problems = []
    if stream.direction == pb.MEDIA_DIRECTION_UNSPECIFIED:
        problems.append(f"{where}.direction unset")
    if stream.media_type == pb.MEDIA_TYPE_UNSPECIFIED:
        problems.append(f"{where}.media_type unset")
    if stream.codec and stream.codec.lower() not in CODECS:
        problems.append(f"{where}.codec {stream.codec}")
    values = metrics_of(stream)
    for name, (low, high) in RANGES.items():
        value = values[name]
        if value is not None and not low <= value <= high:
            problems.append(f"{where}.{name} out of {low}-{high}")
    for average, maximum in (
        ("average_jitter", "max_jitter"),
        ("average_round_trip", "max_round_trip"),
    ):
        mean, peak = values[average], values[maximum]
        if mean is not None and peak is not None and peak < mean:
            problems.append(f"{where}.{maximum} below {average}")
    return problems


def problems_of(published: pb.PublishedCallRecord) -> list[str]:
    """Every publish check the record fails (empty: the server accepts it)."""
    record = published.record
    problems = []
    if published.operator_id != "contoso-telecom":
        problems.append("operator_id")
    if not CALL_ID.fullmatch(record.call_id):
        problems.append("call_id")
    if not GUID.fullmatch(record.tenant_id):
        problems.append("tenant_id")
    if record.direction == direction_pb.CALL_DIRECTION_INBOUND:
        if not E164.fullmatch(record.caller):
            problems.append("inbound caller not E.164")
        if not party_ok(record.callee):
            problems.append("callee")
    elif record.direction == direction_pb.CALL_DIRECTION_OUTBOUND:
        if not E164.fullmatch(record.callee):
            problems.append("outbound callee not E.164")
        if not party_ok(record.caller):
            problems.append("caller")
    else:
        problems.append("direction unset")
    if not is_fqdn(record.trunk_fqdn):
        problems.append("trunk_fqdn")
    if not (record.HasField("invite_time") and record.HasField("end_time")):
        return [*problems, "invite_time or end_time unset"]
    invite = record.invite_time.ToNanoseconds()
    end = record.end_time.ToNanoseconds()
    answered = record.HasField("answer_time")
    answer = record.answer_time.ToNanoseconds() if answered else invite
    if not invite <= answer <= end:
        problems.append("times out of order")
    if end > int(NOW.timestamp() * 1e9) + 300 * 10**9:
        problems.append("end_time more than 5 min in the future")
    if end - invite > 48 * 3600 * 10**9:
        problems.append("longer than 48 h")
    duration = record.duration.ToNanoseconds()
    if answered and abs(duration - (end - answer)) > MS:
        problems.append("duration is not end - answer")
    if not answered and duration != 0:
        problems.append("duration of an unanswered call not zero")
    if not 200 <= record.final_sip_code <= 699:
        problems.append("final_sip_code out of 200-699")
    if (200 <= record.final_sip_code <= 299) != answered:
        problems.append("2xx exactly when answered")
    if len(record.final_sip_phrase) > 128 or not PRINTABLE.fullmatch(record.final_sip_phrase):
        problems.append("final_sip_phrase")
    if record.end_reason == pb.CALL_END_REASON_UNSPECIFIED:
        problems.append("end_reason unset")
    if record.end_reason in ANSWERED_REASONS and not answered:
        problems.append("hang-up reason on an unanswered call")
    if record.end_reason in UNANSWERED_REASONS and answered:
        problems.append("failure reason on an answered call")
    if len(record.media_streams) > 64:
        problems.append("more than 64 media streams")
    for index, stream in enumerate(record.media_streams):
        problems.extend(stream_problems(index, stream))
    return problems


def quality_of(record: pb.CallRecord) -> Quality:
    streams = []
    for stream in record.media_streams:
        values = metrics_of(stream)
        count = values["packet_count"]
        streams.append(
            StreamMetrics(
                audio=stream.media_type == pb.MEDIA_TYPE_AUDIO,
                packet_count=None if count is None else int(count),
                round_trip_ms=values["average_round_trip"],
                packet_loss_rate=values["packet_loss_rate"],
                jitter_ms=values["average_jitter"],
                mos_degradation=values["network_mos_degradation"],
                concealed_ratio=values["concealed_samples_ratio"],
            )
        )
    verdict, _ = classify_call(streams, Thresholds())
    return verdict.quality


@pytest.mark.parametrize("seed", SEEDS)
def test_every_record_passes_the_publish_checks(seed: int) -> None:
    records = generate(seed)
    failing = {r.record.call_id: problems_of(r) for r in records if problems_of(r)}
    assert failing == {}
    assert len({r.record.call_id for r in records}) == COUNT
    end = NOW.replace(microsecond=123_000)
    assert all(r.record.end_time.ToDatetime(dt.UTC) == end for r in records)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_mix_looks_like_real_traffic(seed: int) -> None:
    records = [r.record for r in generate(seed)]
    answered = [r for r in records if r.HasField("answer_time")]
    failed = [r for r in records if not r.HasField("answer_time")]
    assert 0.65 <= len(answered) / COUNT <= 0.85
    inbound = sum(r.direction == direction_pb.CALL_DIRECTION_INBOUND for r in records)
    assert 0.4 <= inbound / COUNT <= 0.6
    # Inbound: a PSTN caller calls an operator number; outbound: the reverse, sometimes from
    # the Teams user's SIP URI.
    ours = re.compile(r"\+1425555\d{4}")
    for r in records:
        if r.direction == direction_pb.CALL_DIRECTION_INBOUND:
            assert ours.fullmatch(r.callee) and not ours.fullmatch(r.caller)
        else:
            assert ours.fullmatch(r.caller) or r.caller.startswith("sip:user")
            assert not ours.fullmatch(r.callee)
    assert any(r.caller.startswith("sip:") for r in records)
    pstn = [
        r.caller if r.direction == direction_pb.CALL_DIRECTION_INBOUND else r.callee
        for r in records
    ]
    for country in ("+1", "+44", "+49", "+33"):
        assert any(p.startswith(country) for p in pstn)

    for r in answered:
        assert (r.final_sip_code, r.final_sip_phrase) == (200, "OK")
        ringing = r.answer_time.ToNanoseconds() - r.invite_time.ToNanoseconds()
        assert 1_000 * MS <= ringing <= 20_000 * MS
        assert r.duration.ToNanoseconds() <= 2 * 3600 * 10**9
        audio = [s for s in r.media_streams if s.media_type == pb.MEDIA_TYPE_AUDIO]
        assert {s.direction for s in audio} == {
            pb.MEDIA_DIRECTION_CALLER_TO_CALLEE,
            pb.MEDIA_DIRECTION_CALLEE_TO_CALLER,
        }
        seconds = r.duration.ToNanoseconds() / 1e9
        for s in audio:
            if s.HasField("packet_count"):
                assert abs(s.packet_count - 50 * seconds) <= 0.05 * 50 * seconds + 1
    talk = statistics.median(r.duration.ToNanoseconds() / 1e9 for r in answered)
    assert 100 <= talk <= 220
    reasons = Counter(r.end_reason for r in answered)
    assert reasons[pb.CALL_END_REASON_MEDIA_TIMEOUT] < 0.05 * len(answered)
    assert any(
        s.media_type == pb.MEDIA_TYPE_VIDEO and s.codec in ("H264", "VP8")
        for r in answered
        for s in r.media_streams
    )
    codecs = Counter(s.codec for r in answered for s in r.media_streams)
    assert {"SILK", "opus", "G722", "PCMU", "PCMA"} <= set(codecs)

    for r in failed:
        phrase, reason = FAILURES[r.final_sip_code]
        assert (r.final_sip_phrase, r.end_reason) == (phrase, reason)
        assert r.duration.ToNanoseconds() == 0
        ringing = r.end_time.ToNanoseconds() - r.invite_time.ToNanoseconds()
        assert 2_000 * MS <= ringing <= 30_000 * MS
        assert len(r.media_streams) in (0, 2)
    assert len({r.final_sip_code for r in failed}) >= 6
    assert sum(bool(r.media_streams) for r in failed) < len(failed) / 2


@pytest.mark.parametrize(("seed", "poor_share"), [(1, 0.1), (2, 0.1), (3, 0.3), (4, 0.0)])
def test_the_poor_share_of_answered_calls_is_as_asked(seed: int, poor_share: float) -> None:
    answered = [r.record for r in generate(seed, poor_share) if r.record.HasField("answer_time")]
    classes = Counter(quality_of(r) for r in answered)
    assert abs(classes[Quality.POOR] / len(answered) - poor_share) <= 0.03
    assert 0.005 <= classes[Quality.UNCLASSIFIED] / len(answered) <= 0.04
    # A poor call has one poor stream: the other audio stream stays within the thresholds.
    for r in answered:
        if quality_of(r) is Quality.POOR:
            audio = [s for s in r.media_streams if s.media_type == pb.MEDIA_TYPE_AUDIO]
            poor = [quality_of(pb.CallRecord(media_streams=[s])) is Quality.POOR for s in audio]
            assert sum(poor) == 1


def test_failed_calls_are_never_poor_and_unanswered_calls_without_media_are_unclassified() -> None:
    failed = [r.record for r in generate(5) if not r.record.HasField("answer_time")]
    for r in failed:
        expected = Quality.GOOD if r.media_streams else Quality.UNCLASSIFIED
        assert quality_of(r) is expected


def test_same_seed_same_records_other_seed_other_records() -> None:
    first = [r.SerializeToString() for r in generate(7)]
    assert first == [r.SerializeToString() for r in generate(7)]
    assert first != [r.SerializeToString() for r in generate(8)]


def test_a_given_call_id_is_used() -> None:
    rng = random.Random(1)
    record = calls.make_call(rng, mix(rng), NOW, call_id="abc-123")
    assert record.record.call_id == "abc-123"
    assert problems_of(record) == []


def test_a_mix_without_users_is_refused() -> None:
    rng = random.Random(1)
    empty = calls.CallMix("contoso-telecom", TENANT, ("sbc1.contoso-telecom.example",), [])
    with pytest.raises(ValueError, match="at least one user"):
        calls.make_call(rng, empty, NOW)


def test_operator_numbers_are_distinct_and_stable() -> None:
    numbers = calls.operator_numbers(random.Random("contoso"), 500)
    assert len(set(numbers)) == 500
    assert all(re.fullmatch(r"\+1425555\d{4}", n) for n in numbers)
    assert calls.operator_numbers(random.Random("contoso"), 20) == numbers[:20]
    assert len(set(calls.operator_numbers(random.Random(1), 10_000))) == 10_000
    with pytest.raises(ValueError, match="10,000"):
        calls.operator_numbers(random.Random(1), 10_001)


def test_teams_users_route_to_their_sip_uris() -> None:
    users = calls.teams_users(["+14255550100", "+14255550101"])
    assert [u.sip_uri for u in users] == [
        "sip:user0@contoso.example",
        "sip:user1@contoso.example",
    ]
    assert all(SIP_URI.fullmatch(u.sip_uri) for u in users)


def test_the_checks_here_catch_broken_records() -> None:
    """The independent checks above are not vacuous: each breakage is found."""
    rng = random.Random(11)
    answered = next(
        r for r in generate(11) if r.record.HasField("answer_time") and r.record.media_streams
    )
    breakages: dict[str, Callable[[pb.PublishedCallRecord], object]] = {
        "duration": lambda r: r.record.duration.FromMilliseconds(
            r.record.duration.ToMilliseconds() + 2
        ),
        "sip code": lambda r: setattr(r.record, "final_sip_code", 486),
        "end reason": lambda r: setattr(r.record, "end_reason", pb.CALL_END_REASON_BUSY),
        "codec": lambda r: setattr(r.record.media_streams[0], "codec", "MP3"),
        "jitter": lambda r: r.record.media_streams[0].max_jitter.FromNanoseconds(0),
        "loss": lambda r: setattr(r.record.media_streams[0], "packet_loss_rate", 1.5),
        "caller": lambda r: setattr(r.record, "caller", "0042"),
        "callee": lambda r: setattr(r.record, "callee", "0042"),
        "trunk": lambda r: setattr(r.record, "trunk_fqdn", "SBC1.Example"),
        "call id": lambda r: setattr(r.record, "call_id", "a b"),
    }
    for name, breakage in breakages.items():
        broken = pb.PublishedCallRecord()
        broken.CopyFrom(answered)
        breakage(broken)
        assert problems_of(broken), name
    assert problems_of(calls.make_call(rng, mix(rng), NOW)) == []


def test_the_operators_reports_pass_its_checks_with_the_shares_asked() -> None:
    rng = random.Random(4)
    the_mix = mix(rng)
    published = calls.make_calls(rng, the_mix, dt.datetime.now(dt.UTC), 4_000)
    off = calls.ReportMix(missing=0.1, mismatched=0.2, extra=0.05, unanswered=0.1)
    reports = calls.operator_reports(rng, published, the_mix.users, off)
    now = dt.datetime.now(dt.UTC)
    for report in reports:
        submitted = usage_convert.submitted_in(report)
        assert isinstance(submitted, usage_rules.Submitted), submitted
        refusal = usage_rules.check_record(
            submitted.record, now, dt.timedelta(days=396), dt.timedelta(minutes=5)
        )
        assert refusal is None, (refusal, report)
    answered = {p.record.call_id: p.record for p in published if p.record.HasField("answer_time")}
    unanswered = {p.record.call_id: p.record for p in published if p.record.call_id not in answered}
    reported = [r for r in reports if r.call_id in answered]
    ringing = [r for r in reports if r.call_id in unanswered]
    extra = [r for r in reports if r.call_id not in answered and r.call_id not in unanswered]
    off_by = [r for r in reported if r.duration != answered[r.call_id].duration]
    assert 1 - len(reported) / len(answered) == pytest.approx(0.1, abs=0.03)
    assert len(off_by) / len(reported) == pytest.approx(0.2, abs=0.04)
    assert len(extra) / len(reported) == pytest.approx(0.05, abs=0.02)
    assert len(ringing) / len(unanswered) == pytest.approx(0.1, abs=0.03)
    for r in ringing:  # from the INVITE to the end, as the platform has them
        assert r.start_time == unanswered[r.call_id].invite_time
        assert r.end_time == unanswered[r.call_id].end_time
    assert len({r.record_id for r in reports}) == len(reports)
