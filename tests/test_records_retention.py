"""Retention: records past it are purged by the background job, cursors into the purged range
expire cleanly, records already past it are refused at publish; audit events have their own."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
import sqlalchemy as sa

from app import runtime as server
from opconnect.records.v1 import records_pb2 as pb
from plumbing import audit
from services.records import storage
from tests.conftest import RunningSystem, rich_error
from tests.helpers import age_records
from tests.records_data import ids, publish_records, record, stamp, stream_all

EPOCH = stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))


def _count(system: RunningSystem, table: sa.Table) -> int:
    def count(session: sa.orm.Session) -> int:
        return int(session.scalar(sa.select(sa.func.count()).select_from(table)) or 0)

    return system.call(system.runtime.db.run(count))


def test_purge_expires_cursors_and_keeps_the_rest(system: RunningSystem) -> None:
    opening = next(iter(system.records().StreamCallRecords(pb.StreamCallRecordsRequest())))
    records = [record() for _ in range(5)]
    publish_records(system.ingest(), records)
    _, _, responses = stream_all(system.records(), start_time=EPOCH, max_batch_size=1)
    cursors = [r.cursor for r in responses if r.records]
    age_records(system, ids(records[:3]), days=31)
    assert _count(system, storage.STREAMS) == 10

    system.call(server.purge(system.runtime))

    assert _count(system, storage.RECORDS) == 2
    assert _count(system, storage.STREAMS) == 4  # their audio streams went with them
    for cursor in (opening.cursor, cursors[0], cursors[1]):
        with pytest.raises(grpc.RpcError) as caught:
            stream_all(system.records(), cursor=cursor)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CURSOR_EXPIRED")
    # The cursor of the last purged record is still good: nothing after it was lost.
    kept, _, _ = stream_all(system.records(), cursor=cursors[2])
    assert ids(kept) == ids(records[3:])
    # A start time before the retention starts at the oldest record kept.
    kept, _, _ = stream_all(system.records(), start_time=EPOCH)
    assert ids(kept) == ids(records[3:])
    with pytest.raises(grpc.RpcError) as caught:
        system.records().GetCallRecord(pb.GetCallRecordRequest(call_id=records[0].call_id))
    assert rich_error(caught.value).reason == "CALL_RECORD_NOT_FOUND"
    # Purging again finds nothing more.
    system.call(server.purge(system.runtime))
    assert _count(system, storage.RECORDS) == 2


def test_purge_works_in_chunks(sqlite_system: RunningSystem) -> None:
    records = [record() for _ in range(7)]
    publish_records(sqlite_system.ingest(), records)
    age_records(sqlite_system, ids(records), days=40)
    db = sqlite_system.runtime.db
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert sqlite_system.call(db.run(storage.purge_records, cutoff, 3, write=True)).records == 3
    assert sqlite_system.call(db.run(storage.purge_records, cutoff, 3, write=True)).records == 3
    assert sqlite_system.call(db.run(storage.purge_records, cutoff, 3, write=True)).records == 1
    assert sqlite_system.call(db.run(storage.purge_records, cutoff, 3, write=True)).records == 0


def test_records_older_than_the_retention_are_refused(sqlite_system: RunningSystem) -> None:
    old = record(end=dt.datetime.now(dt.UTC) - dt.timedelta(days=30, minutes=1))
    recent = record(end=dt.datetime.now(dt.UTC) - dt.timedelta(days=29))
    response = publish_records(sqlite_system.ingest(), [old, recent])
    assert [(r.outcome, r.reason, r.field) for r in response.results] == [
        (pb.CALL_RECORD_OUTCOME_REFUSED, "RECORD_EXPIRED", "record.end_time"),
        (pb.CALL_RECORD_OUTCOME_ACCEPTED, "", ""),
    ]


def test_audit_events_are_purged_after_their_retention(sqlite_system: RunningSystem) -> None:
    runtime = sqlite_system.runtime
    old = audit.AuditEvent(
        at=dt.datetime.now(dt.UTC) - dt.timedelta(days=400),
        principal="operator/contoso-telecom",
        method="GetCallRecord",
        filters={},
        record_count=1,
        duration_ms=1.0,
        status="OK",
        request_id="r1",
    )
    new = audit.AuditEvent(**{**old.__dict__, "at": dt.datetime.now(dt.UTC), "request_id": "r2"})
    sqlite_system.call(runtime.db.run(audit.insert_events, [old, new], write=True))
    sqlite_system.call(server.purge(runtime))
    events = sqlite_system.call(runtime.db.run(audit.list_events, None, None, 10))
    assert [e.request_id for e in events] == ["r2"]
