"""The domain's metrics: records published and durations submitted by outcome and reason,
numbers changed, what streams deliver and how far behind they are, log heads, retention, the
audit log and the usage feed (plumbing/metrics.py names them)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from app import runtime as server
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.records.v1 import records_pb2_grpc as records_grpc
from opconnect.usage.v1 import usage_pb2
from services.records import storage as records_storage
from tests.conftest import OPERATOR, TENANT, Pki, RunningSystem, settings_for, start_system
from tests.helpers import assign, poll, sample, samples_of, scrape, submit, upload, usage_stub
from tests.records_data import (
    duration_record,
    publish,
    publish_records,
    published,
    record,
)

NUMBERS = ("+14255550101", "+14255550102")
SIP = "sip:+14255550101@sbc2.contoso.example;user=phone"


@pytest.fixture
def measured(session_pki: Pki, tmp_path: Path) -> Iterator[RunningSystem]:
    """The one-process system with metrics on and its usage service following the call feed."""
    cert, key = session_pki.paths.client("platform-admin-center")
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        metrics_listen="127.0.0.1:0",
        feed_ca_file=str(session_pki.paths.ca_cert),
        feed_cert_file=str(cert),
        feed_key_file=str(key),
    )
    running = start_system(settings, session_pki)
    yield running
    running.stop()


def scraped(system: RunningSystem, name: str, until: float, **labels: str) -> float:
    """Scrape until the sample `name` with `labels` is `until` (10 s at most); its last value."""
    return poll(lambda: sample(scrape(system), name, **labels), lambda v: v == until)


def test_published_records_are_counted_by_outcome_and_reason(measured: RunningSystem) -> None:
    first, second = record(), record()
    conflicting = record(second.call_id, talk_s=30)
    (one, two) = publish(
        measured.ingest(),
        [published(first), published(second)],
        [
            published(first),
            published(conflicting),
            published(record(), "no-such-operator"),
            published(record()),
        ],
    )
    assert (one.accepted_count, two.accepted_count, two.duplicate_count) == (2, 1, 1)
    got = scrape(measured)
    name = "opconnect_records_published_total"
    assert sample(got, name, outcome="accepted", reason="") == 3
    assert sample(got, name, outcome="duplicate", reason="") == 1
    assert sample(got, name, outcome="refused", reason="CALL_ID_CONFLICT") == 1
    assert sample(got, name, outcome="refused", reason="OPERATOR_NOT_FOUND") == 1
    assert sum(samples_of(got, name).values()) == 6


def test_submitted_durations_are_counted_by_operator_outcome_and_reason(
    measured: RunningSystem,
) -> None:
    first = duration_record()
    changed = usage_pb2.CallDurationRecord()
    changed.CopyFrom(first)
    changed.duration.FromSeconds(first.duration.seconds - 1)
    submit(usage_stub(measured), [first], [first, changed, duration_record()])
    got = scrape(measured)
    name = "opconnect_durations_submitted_total"
    mine = {"operator": OPERATOR}
    assert sample(got, name, **mine, outcome="accepted", reason="") == 2
    assert sample(got, name, **mine, outcome="duplicate", reason="") == 1
    assert sample(got, name, **mine, outcome="refused", reason="RECORD_ID_CONFLICT") == 1


def test_numbers_changed_count_only_real_changes(measured: RunningSystem) -> None:
    upload(measured, *NUMBERS)
    upload(measured, *NUMBERS)  # already present: no change
    assign(measured, NUMBERS[0])
    assign(measured, NUMBERS[0])  # the same assignment: no change
    assign(measured, NUMBERS[0], sip=SIP)  # its data changed
    admin = measured.admin()
    request = pb.UnassignNumberRequest(phone_number=NUMBERS[0], tenant_id=TENANT)
    admin.UnassignNumber(request)
    admin.UnassignNumber(request)  # already unassigned: no change
    measured.numbers().ReleaseNumbers(pb.ReleaseNumbersRequest(phone_numbers=list(NUMBERS)))
    got = scrape(measured)
    name = "opconnect_numbers_changed_total"
    expected = {"uploaded": 2, "assigned": 1, "updated": 1, "unassigned": 1, "released": 2}
    for change, count in expected.items():
        assert sample(got, name, operator=OPERATOR, change=change) == count, change


def test_a_stream_behind_shows_lag_until_it_catches_up(measured: RunningSystem) -> None:
    """A client that stops reading holds its stream back: lag in positions and seconds, until
    it reads everything; what it received is what was counted delivered."""
    # No BDP probing: the flow-control window stays small, so the server must wait for us.
    channel = measured.channel(options=[("grpc.http2.bdp_probe", 0)])
    stub = records_grpc.CallRecordServiceStub(channel)
    call = stub.StreamCallRecords(
        records_pb.StreamCallRecordsRequest(follow=True, max_batch_size=10)
    )
    responses = iter(call)
    received = len(next(responses).records)  # open: its "from now" cursor came
    total = 3_000
    ingest = measured.ingest()
    for _ in range(total // 1_000):
        publish_records(ingest, [record() for _ in range(1_000)])
    mine = {"operator": OPERATOR, "kind": "records"}
    got = poll(
        lambda: scrape(measured),
        lambda s: (
            sample(s, "opconnect_stream_lag_positions", **mine) > 0
            and sample(s, "opconnect_stream_lag_seconds", **mine) > 0
        ),
    )
    assert sample(got, "opconnect_stream_lag_positions", **mine) > 0
    assert sample(got, "opconnect_stream_lag_seconds", **mine) > 0
    assert sample(got, "opconnect_changelog_head_position", log="records") == total
    try:
        while received < total:
            received += len(next(responses).records)
        assert received == total
        got = poll(
            lambda: scrape(measured),
            lambda s: (
                sample(s, "opconnect_stream_lag_positions", **mine) == 0
                and sample(s, "opconnect_stream_lag_seconds", **mine) == 0
                and sample(s, "opconnect_stream_delivered_total", **mine) == total
            ),
        )
        assert sample(got, "opconnect_stream_lag_positions", **mine) == 0
        assert sample(got, "opconnect_stream_lag_seconds", **mine) == 0
        assert sample(got, "opconnect_stream_delivered_total", **mine) == received
        # Every record was committed while the stream was open: each was timed.
        count = "opconnect_delivery_latency_seconds_count"
        assert sample(got, count, kind="records") == total
        # The usage feed follows the same log as a platform stream.
        calls = {"operator": "platform", "kind": "calls"}
        assert scraped(measured, "opconnect_stream_delivered_total", total, **calls) == total
    finally:
        call.cancel()
    # Closed: no series for the operator's records streams any more.
    got = poll(
        lambda: scrape(measured),
        lambda s: not samples_of(s, "opconnect_stream_lag_positions", **mine),
    )
    assert not samples_of(got, "opconnect_stream_lag_positions", **mine)


def test_assignment_watch_counts_what_it_delivers(measured: RunningSystem) -> None:
    watch = measured.numbers().WatchAssignments(pb.WatchAssignmentsRequest())
    try:
        responses = iter(watch)
        next(responses)  # open
        upload(measured, *NUMBERS)
        for number in NUMBERS:
            assign(measured, number)
        events = 0
        while events < len(NUMBERS):
            events += len(next(responses).events)
        mine = {"operator": OPERATOR, "kind": "assignments"}
        assert scraped(measured, "opconnect_stream_delivered_total", 2, **mine) == 2
        got = scrape(measured)
        assert sample(got, "opconnect_delivery_latency_seconds_count", kind="assignments") == 2
        assert sample(got, "opconnect_stream_lag_positions", **mine) == 0
        assert sample(got, "opconnect_changelog_head_position", log="numbers") == 2
    finally:
        watch.cancel()


def test_purges_count_rows_removed_and_move_the_horizon(measured: RunningSystem) -> None:
    records = [record() for _ in range(3)]
    publish_records(measured.ingest(), records)
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)

    def age(session: sa.orm.Session) -> None:
        session.execute(sa.update(records_storage.RECORDS).values(publish_time=then))

    measured.call(measured.runtime.db.run(age, write=True))
    measured.call(server.purge(measured.runtime))
    got = scrape(measured)
    name = "opconnect_purge_removed_total"
    assert sample(got, name, table="call_records") == 3
    assert sample(got, name, table="call_media_streams") == 6  # two audio streams each
    assert sample(got, "opconnect_changelog_purged_position", log="records") == 3
    assert sample(got, "opconnect_changelog_purged_position", log="numbers") == 0
    assert sample(got, "opconnect_changelog_head_position", log="records") == 3


def test_audit_events_are_counted_written_and_pending(measured: RunningSystem) -> None:
    got = scrape(measured)
    assert ("opconnect_audit_events_pending", frozenset()) in got
    records = measured.records()
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            records.GetCallRecord(records_pb.GetCallRecordRequest(call_id="call-unknown"))
    assert scraped(measured, "opconnect_audit_events_written_total", 2) == 2
    assert sample(scrape(measured), "opconnect_audit_events_pending") == 0


def test_the_usage_feed_reports_its_position_and_progress(measured: RunningSystem) -> None:
    publish_records(measured.ingest(), [record() for _ in range(4)])
    assert scraped(measured, "opconnect_usage_feed_position", 4) == 4
    got = scrape(measured)
    assert sample(got, "opconnect_usage_feed_last_batch_timestamp_seconds") > 0
    assert ("opconnect_usage_feed_lag_seconds", frozenset()) in got
    assert sample(got, "opconnect_usage_feed_lag_seconds") >= 0
    # Every call the feed stored was counted in a unit (the 4 here at least).
    assert sample(got, "opconnect_usage_feed_unit_calls_sum") >= 4
    assert sample(got, "opconnect_usage_feed_unit_calls_count") >= 1
