"""The call records flow as the call controller and an operator use it, through the gateway:
publish, stream (stored and live), resume, filters, isolation, get, and the audit log."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from opconnect.numbers.v1 import numbers_pb2
from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from plumbing import audit, wire
from tests.conftest import (
    OTHER_OPERATOR,
    OTHER_TENANT,
    SUSPENDED_OPERATOR,
    Pki,
    RunningSystem,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import moment
from tests.records_data import (
    OUTBOUND,
    Follower,
    audio,
    ids,
    publish,
    publish_records,
    published,
    record,
    stamp,
    stream_all,
)

EPOCH = stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))


def test_publish_then_stream_in_order_with_classification(system: RunningSystem) -> None:
    poor = record(streams=[audio(jitter_ms=45.0), audio(pb.MEDIA_DIRECTION_CALLEE_TO_CALLER)])
    unanswered = record(answered=False)
    records = [record(), poor, unanswered]
    before = dt.datetime.now(dt.UTC)
    response = publish_records(system.ingest(), records)
    after = dt.datetime.now(dt.UTC)
    assert [r.outcome for r in response.results] == [pb.CALL_RECORD_OUTCOME_ACCEPTED] * 3
    assert (response.accepted_count, response.duplicate_count, response.refused_count) == (3, 0, 0)
    assert response.batch_id == "batch-0"

    got, cursor, _ = stream_all(system.records(), start_time=EPOCH)
    assert ids(got) == ids(records)
    assert cursor
    for sent, stored in zip(records, got, strict=True):
        # What was published comes back as it was sent, with the output-only fields filled in.
        expected = pb.CallRecord()
        expected.CopyFrom(stored)
        expected.ClearField("quality_class")
        expected.ClearField("quality_reasons")
        expected.ClearField("publish_time")
        for stream in expected.media_streams:
            stream.ClearField("quality_class")
            stream.ClearField("quality_reasons")
        assert expected == sent
        assert before - dt.timedelta(seconds=1) <= stored.publish_time.ToDatetime(dt.UTC) <= after
    good, bad, silent = got
    assert good.quality_class == pb.QUALITY_CLASS_GOOD
    assert [s.quality_class for s in good.media_streams] == [pb.QUALITY_CLASS_GOOD] * 2
    assert bad.quality_class == pb.QUALITY_CLASS_POOR
    (reason,) = bad.quality_reasons
    assert reason.metric == pb.QUALITY_METRIC_JITTER
    assert reason.media_stream_index == 0
    assert reason.observed.duration.ToMilliseconds() == 45
    assert reason.threshold.duration.ToMilliseconds() == 30
    assert bad.media_streams[0].quality_class == pb.QUALITY_CLASS_POOR
    assert bad.media_streams[1].quality_class == pb.QUALITY_CLASS_GOOD
    assert silent.quality_class == pb.QUALITY_CLASS_UNCLASSIFIED  # no audio at all
    # Nothing new: a stream from the last cursor sends only a final cursor, no records.
    again, _, _ = stream_all(system.records(), cursor=cursor)
    assert again == []


def test_publish_is_idempotent_by_call_id(system: RunningSystem) -> None:
    first = record()
    changed = pb.CallRecord()
    changed.CopyFrom(first)
    changed.final_sip_phrase = "OK then"
    second = record()
    (one, two) = publish(
        system.ingest(),
        [published(first)],
        # Resending a record is a no-op; the same call_id with other content is refused, even
        # within one batch (records of a batch are handled as if published one by one).
        [published(first), published(changed), published(second), published(second)],
    )
    assert [r.outcome for r in one.results] == [pb.CALL_RECORD_OUTCOME_ACCEPTED]
    outcomes = [(r.call_id, r.outcome, r.reason, r.field) for r in two.results]
    assert outcomes == [
        (first.call_id, pb.CALL_RECORD_OUTCOME_DUPLICATE, "", ""),
        (first.call_id, pb.CALL_RECORD_OUTCOME_REFUSED, "CALL_ID_CONFLICT", "record.call_id"),
        (second.call_id, pb.CALL_RECORD_OUTCOME_ACCEPTED, "", ""),
        (second.call_id, pb.CALL_RECORD_OUTCOME_DUPLICATE, "", ""),
    ]
    assert (two.accepted_count, two.duplicate_count, two.refused_count) == (1, 2, 1)
    got, _, _ = stream_all(system.records(), start_time=EPOCH)
    assert ids(got) == [first.call_id, second.call_id]
    # The same record for another operator is other content: a conflict, not a duplicate.
    (three,) = publish(system.ingest(), [published(first, OTHER_OPERATOR)])
    assert three.results[0].reason == "CALL_ID_CONFLICT"


def test_unknown_operators_are_refused_and_neighbours_land(system: RunningSystem) -> None:
    good = record()
    (response,) = publish(
        system.ingest(),
        [
            published(record(), "no-such-operator"),
            published(record(), "Not An Id"),
            published(good),
            published(record(), SUSPENDED_OPERATOR),  # registered: its records are kept
        ],
    )
    reasons = [(r.outcome, r.reason, r.field) for r in response.results]
    assert reasons == [
        (pb.CALL_RECORD_OUTCOME_REFUSED, "OPERATOR_NOT_FOUND", "operator_id"),
        (pb.CALL_RECORD_OUTCOME_REFUSED, "OPERATOR_ID_INVALID", "operator_id"),
        (pb.CALL_RECORD_OUTCOME_ACCEPTED, "", ""),
        (pb.CALL_RECORD_OUTCOME_ACCEPTED, "", ""),
    ]
    assert all(r.message for r in response.results if r.reason)
    got, _, _ = stream_all(system.records(), start_time=EPOCH)
    assert ids(got) == [good.call_id]


def test_operators_never_see_each_others_records(system: RunningSystem) -> None:
    mine, theirs = record(), record()
    publish_records(system.ingest(), [mine])
    publish_records(system.ingest(), [theirs], operator=OTHER_OPERATOR)
    got, _, _ = stream_all(system.records(), start_time=EPOCH)
    assert ids(got) == [mine.call_id]
    got, _, _ = stream_all(system.records(OTHER_OPERATOR), start_time=EPOCH)
    assert ids(got) == [theirs.call_id]
    found = system.records().GetCallRecord(pb.GetCallRecordRequest(call_id=mine.call_id))
    assert found.record.call_id == mine.call_id
    for call_id in (theirs.call_id, "never-published"):
        with pytest.raises(grpc.RpcError) as caught:
            system.records().GetCallRecord(pb.GetCallRecordRequest(call_id=call_id))
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "CALL_RECORD_NOT_FOUND")
        assert error.domain == "records.opconnect"


def test_filters_select_tenant_number_and_poor_quality(system: RunningSystem) -> None:
    number = "+14255550123"
    other_tenant = record(tenant=OTHER_TENANT)
    by_number_in = record(callee=number)
    by_number_out = record(direction=OUTBOUND, caller=number, callee="+33142685300")
    poor = record(streams=[audio(loss=0.2)])
    plain = record()
    publish_records(system.ingest(), [other_tenant, by_number_in, by_number_out, poor, plain])
    stub = system.records()
    got, _, _ = stream_all(stub, start_time=EPOCH, tenant_id=OTHER_TENANT)
    assert ids(got) == [other_tenant.call_id]
    got, _, _ = stream_all(stub, start_time=EPOCH, tenant_id=OTHER_TENANT.upper())
    assert ids(got) == [other_tenant.call_id]  # GUIDs compare without case
    got, _, _ = stream_all(stub, start_time=EPOCH, phone_number=number)
    assert ids(got) == [by_number_in.call_id, by_number_out.call_id]
    got, _, _ = stream_all(stub, start_time=EPOCH, poor_quality_only=True)
    assert ids(got) == [poor.call_id]
    got, cursor, _ = stream_all(
        stub, start_time=EPOCH, poor_quality_only=True, tenant_id=OTHER_TENANT
    )
    assert got == []
    # The final cursor covers what the filters left out: resuming from it sends nothing old.
    got, _, _ = stream_all(stub, cursor=cursor)
    assert got == []


def test_batches_respect_the_client_maximum(system: RunningSystem) -> None:
    records = [record() for _ in range(7)]
    publish_records(system.ingest(), records)
    got, _, responses = stream_all(system.records(), start_time=EPOCH, max_batch_size=3)
    assert ids(got) == ids(records)
    sizes = [len(r.records) for r in responses]
    assert sizes[:3] == [3, 3, 1]
    assert all(size <= 3 for size in sizes)
    # Above the server's maximum, the maximum is used.
    got, _, _ = stream_all(system.records(), start_time=EPOCH, max_batch_size=1_000_000)
    assert ids(got) == ids(records)


def test_cut_stream_resumes_without_gap_or_repeat(system: RunningSystem) -> None:
    records = [record() for _ in range(10)]
    publish_records(system.ingest(), records)
    call = system.records().StreamCallRecords(
        pb.StreamCallRecordsRequest(start_time=EPOCH, max_batch_size=4)
    )
    first = next(call)
    call.cancel()  # the client goes away after one batch
    assert ids(first.records) == ids(records[:4])
    rest, _, _ = stream_all(system.records(), cursor=first.cursor, max_batch_size=4)
    assert ids(rest) == ids(records[4:])


def test_follow_delivers_live_records_and_heartbeats(system: RunningSystem) -> None:
    follower = Follower(system.records(), pb.StreamCallRecordsRequest(follow=True))
    try:
        opening = follower.next()
        assert opening is not None and not opening.records and opening.cursor
        publish_records(system.ingest(), [record()], operator=OTHER_OPERATOR)  # not ours
        live = [record(), record()]
        publish_records(system.ingest(), live)
        got, cursor = follower.records(2)
        assert ids(got) == ids(live)
        # Idle: heartbeats (no records) carrying a cursor at least as new.
        heartbeat = follower.next(timeout=5)
        assert heartbeat is not None and not heartbeat.records and heartbeat.cursor
        later = record()
        publish_records(system.ingest(), [later])
        got, _ = follower.records(1)
        assert ids(got) == [later.call_id]
        # A stream resumed from a heartbeat's cursor misses nothing published after it.
        resumed, _, _ = stream_all(system.records(), cursor=heartbeat.cursor)
        assert ids(resumed) == [later.call_id]
        assert cursor
    finally:
        follower.cancel()


def test_time_window_selects_by_publish_time(system: RunningSystem) -> None:
    early = [record(), record()]
    publish_records(system.ingest(), early)
    middle = moment()  # after early's publish time, before late's
    late = [record(), record()]
    publish_records(system.ingest(), late)
    end = moment()
    publish_records(system.ingest(), [record()])
    got, _, _ = stream_all(system.records(), start_time=stamp(middle))
    assert ids(got)[:2] == ids(late) and len(got) == 3
    got, _, _ = stream_all(system.records(), start_time=EPOCH, end_time=stamp(middle))
    assert ids(got) == ids(early)
    got, _, _ = stream_all(system.records(), start_time=stamp(middle), end_time=stamp(end))
    assert ids(got) == ids(late)
    # Following with an end_time in the past: what is stored, then the stream ends (OK).
    follower = Follower(
        system.records(),
        pb.StreamCallRecordsRequest(start_time=EPOCH, end_time=stamp(middle), follow=True),
    )
    got, _ = follower.records(10)
    assert ids(got) == ids(early)


def test_follow_until_end_time_then_end(sqlite_system: RunningSystem) -> None:
    end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    follower = Follower(
        sqlite_system.records(),
        pb.StreamCallRecordsRequest(
            start_time=stamp(end - dt.timedelta(hours=1)), end_time=stamp(end), follow=True
        ),
    )
    live = record()
    publish_records(sqlite_system.ingest(), [live])
    got, _ = follower.records(1)
    assert ids(got) == [live.call_id]
    deadline = time.monotonic() + 10
    while (response := follower.next(timeout=10)) is not None:
        assert not response.records
        assert time.monotonic() < deadline
    assert dt.datetime.now(dt.UTC) >= end  # ended only once end_time had passed


def test_stream_request_errors(sqlite_system: RunningSystem) -> None:
    stub = sqlite_system.records()
    cases = [
        (pb.StreamCallRecordsRequest(cursor="not-a-cursor"), "CURSOR_INVALID", "cursor"),
        (pb.StreamCallRecordsRequest(tenant_id="x"), "TENANT_ID_INVALID", "tenant_id"),
        (pb.StreamCallRecordsRequest(phone_number="0800"), "PHONE_NUMBER_INVALID", "phone_number"),
        (
            pb.StreamCallRecordsRequest(max_batch_size=-1),
            "MAX_BATCH_SIZE_INVALID",
            "max_batch_size",
        ),
        (
            pb.StreamCallRecordsRequest(
                start_time=stamp(dt.datetime(2026, 1, 2, tzinfo=dt.UTC)),
                end_time=stamp(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
            ),
            "TIME_RANGE_INVALID",
            "end_time",
        ),
    ]
    for request, reason, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamCallRecords(request, timeout=10))
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), request
        assert field in error.fields
    # A cursor of another stream (the numbers log) is not a records cursor.
    listing = sqlite_system.numbers().ListNumbers(numbers_pb2.ListNumbersRequest())
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.StreamCallRecords(pb.StreamCallRecordsRequest(cursor=listing.watch_cursor)))
    assert rich_error(caught.value).reason == "CURSOR_INVALID"
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetCallRecord(pb.GetCallRecordRequest(call_id="bad id!"))
    assert rich_error(caught.value).reason == "CALL_ID_INVALID"


def test_principals_are_kept_to_their_side(sqlite_system: RunningSystem) -> None:
    as_platform = pb_grpc.CallRecordServiceStub(sqlite_system.channel("platform", "admin-center"))
    with pytest.raises(grpc.RpcError) as caught:
        as_platform.GetCallRecord(pb.GetCallRecordRequest(call_id="x"))
    assert rich_error(caught.value).reason == "OPERATOR_ONLY"
    as_operator = pb_grpc.CallRecordIngestServiceStub(
        sqlite_system.channel("operator", "contoso-telecom")
    )
    with pytest.raises(grpc.RpcError) as caught:
        publish(as_operator, [published(record())])
    assert rich_error(caught.value).reason == "PLATFORM_ONLY"


def test_bad_batches_end_the_stream_but_keep_acknowledged_ones(
    sqlite_system: RunningSystem,
) -> None:
    kept = record()
    cases = [
        ([], "", "BATCH_EMPTY"),
        ([published(record()) for _ in range(1_001)], "", "BATCH_TOO_LARGE"),
        ([published(record())], "x" * 129, "BATCH_ID_INVALID"),
        ([published(record())], "tab\there", "BATCH_ID_INVALID"),
    ]
    for batch, batch_id, reason in cases:
        requests = [
            pb.PublishCallRecordsRequest(batch_id="ok", records=[published(kept)]),
            pb.PublishCallRecordsRequest(batch_id=batch_id, records=batch),
        ]
        call = sqlite_system.ingest().PublishCallRecords(iter(requests), timeout=30)
        first = next(call)
        assert first.batch_id == "ok"
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    got, _, _ = stream_all(sqlite_system.records(), start_time=EPOCH)
    assert ids(got) == [kept.call_id]


def test_every_operator_read_is_audited_without_personal_data(system: RunningSystem) -> None:
    number = "+14255550199"
    records = [record(callee=number), record()]
    publish_records(system.ingest(), records)
    stub = system.records()
    stream_all(stub, start_time=EPOCH, phone_number=number)
    stub.GetCallRecord(pb.GetCallRecordRequest(call_id=records[1].call_id))
    with pytest.raises(grpc.RpcError):
        stub.GetCallRecord(pb.GetCallRecordRequest(call_id="missing"))
    now = dt.datetime.now(dt.UTC)
    stub.GetQualitySummary(
        pb.GetQualitySummaryRequest(
            start_time=stamp(now - dt.timedelta(days=1)), end_time=stamp(now)
        )
    )
    system.call(system.audit.flush())
    events = system.call(system.runtime.db.run(audit.list_events, None, None, 100))
    seen = [(e.principal, e.method, e.record_count, e.status) for e in reversed(events)]
    assert seen == [
        ("operator/contoso-telecom", "StreamCallRecords", 0, "STARTED"),
        ("operator/contoso-telecom", "StreamCallRecords", 1, "OK"),
        ("operator/contoso-telecom", "GetCallRecord", 1, "OK"),
        ("operator/contoso-telecom", "GetCallRecord", 0, "NOT_FOUND"),
        ("operator/contoso-telecom", "GetQualitySummary", 2, "OK"),
    ]
    stream_event = events[-1]
    assert stream_event.filters["phone_number"] == "+1425555****"
    assert all(e.request_id and e.duration_ms >= 0 for e in events)
    text = repr(events)
    assert number not in text
    assert all(r.call_id not in text for r in records)


# The stored classification at, just under and just over every threshold (the rules themselves
# are unit-tested in test_records_quality.py): (metric, stream change, value, expected class).
EDGES: list[tuple[str, Callable[[float], pb.MediaStream], float]] = [
    ("jitter", lambda v: audio(jitter_ms=v), 30.0),
    ("loss", lambda v: audio(loss=v), 0.1),
    ("round trip", lambda v: audio(round_trip_ms=v), 500.0),
    ("degradation", lambda v: audio(degradation=v), 1.0),
    ("concealed", lambda v: audio(concealed=v), 0.07),
    ("packets", lambda v: audio(packets=int(v), jitter_ms=99.0), 500),
]


def test_classification_at_every_threshold(sqlite_system: RunningSystem) -> None:
    cases: list[tuple[str, pb.CallRecord, pb.QualityClass.ValueType]] = []
    for name, make, limit in EDGES:
        step = 1 if name == "packets" else limit / 1000
        for value, expected in (
            (limit - step, pb.QUALITY_CLASS_GOOD),
            (limit, pb.QUALITY_CLASS_GOOD),  # strict: equal to the threshold is not a crossing
            (limit + step, pb.QUALITY_CLASS_POOR),
        ):
            cases.append((f"{name}={value}", record(streams=[make(value)]), expected))
    publish_records(sqlite_system.ingest(), [c[1] for c in cases])
    got = {r.call_id: r for r in stream_all(sqlite_system.records(), start_time=EPOCH)[0]}
    for name, sent, expected in cases:
        assert got[sent.call_id].quality_class == expected, name


def test_thresholds_are_configurable(session_pki: Pki, tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        quality_jitter_ms=10.0,
        quality_min_packets=100,
    )
    running = start_system(settings, session_pki)
    try:
        sent = record(streams=[audio(jitter_ms=12.0, packets=200)])
        publish_records(running.ingest(), [sent])
        (got,) = stream_all(running.records(), start_time=EPOCH)[0]
        assert got.quality_class == pb.QUALITY_CLASS_POOR
        (reason,) = got.quality_reasons
        assert reason.metric == pb.QUALITY_METRIC_JITTER
        assert reason.threshold.duration.ToMilliseconds() == 10
        assert reason.observed.duration.ToMilliseconds() == 12
    finally:
        running.stop()


def test_output_only_and_unknown_fields_sent_are_not_stored(system: RunningSystem) -> None:
    """A published record's output-only fields (its classification, publish_time) and unknown
    fields (a newer client's) are dropped before its digest and its stored body: the clean
    record resent is a duplicate, and what is streamed is the service's own classification."""
    clean = record(streams=[audio(jitter_ms=45.0), audio(pb.MEDIA_DIRECTION_CALLEE_TO_CALLER)])
    dirty = pb.CallRecord()
    dirty.CopyFrom(clean)
    dirty.quality_class = pb.QUALITY_CLASS_GOOD  # the service says POOR
    dirty.quality_reasons.add(metric=pb.QUALITY_METRIC_ROUND_TRIP, media_stream_index=1)
    dirty.publish_time.CopyFrom(EPOCH)
    dirty.media_streams[1].quality_class = pb.QUALITY_CLASS_POOR
    dirty.media_streams[1].quality_reasons.add(metric=pb.QUALITY_METRIC_JITTER)
    unknown = wire.varint(1000 << 3) + b"\x07"  # field 1000, varint 7: unknown to every side
    message = pb.PublishedCallRecord()
    message.ParseFromString(
        published(pb.CallRecord()).SerializeToString()
        + wire.field(2, dirty.SerializeToString() + unknown)
        + unknown
    )
    assert message.record.call_id == clean.call_id
    (first, second) = publish(system.ingest(), [message], [published(clean)])
    assert [r.outcome for r in first.results] == [pb.CALL_RECORD_OUTCOME_ACCEPTED]
    assert [r.outcome for r in second.results] == [pb.CALL_RECORD_OUTCOME_DUPLICATE]
    (got,), _, _ = stream_all(system.records(), start_time=EPOCH)
    assert got.quality_class == pb.QUALITY_CLASS_POOR
    assert [r.metric for r in got.quality_reasons] == [pb.QUALITY_METRIC_JITTER]
    assert [s.quality_class for s in got.media_streams] == [
        pb.QUALITY_CLASS_POOR,
        pb.QUALITY_CLASS_GOOD,
    ]
    assert not got.media_streams[1].quality_reasons
    assert got.publish_time.seconds > EPOCH.seconds
    assert unknown not in got.SerializeToString()
