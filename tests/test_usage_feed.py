"""The usage service's copy of the platform's calls: learnt over gRPC from the records service's
call feed (never from its tables), kept with the feed's cursor, resumed exactly after a restart,
and started again from the oldest record kept when its cursor expired."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from app import runtime as server
from plumbing.changelog import encode_cursor
from services.records import storage as records_storage
from services.usage import feed, platform_calls, tables
from tests.conftest import OTHER_OPERATOR, Pki
from tests.helpers import eventually, feed_system, kept, start_follower
from tests.records_data import publish_records, record


def test_the_usage_service_learns_every_call_from_the_feed(
    session_pki: Pki, tmp_path: Path, database_url: str
) -> None:
    system = feed_system(session_pki, tmp_path, database_url)
    try:
        answered, unanswered = record(), record(answered=False)
        theirs = record()
        publish_records(system.ingest(), [answered, unanswered])
        publish_records(system.ingest(), [theirs], operator=OTHER_OPERATOR)
        eventually(lambda: len(kept(system)) == 3)
        calls = kept(system)
        first = calls[answered.call_id]
        assert first["operator_id"] == "contoso-telecom" and first["direction"] == "inbound"
        answer = first["answer_time"]
        answer = answer if answer.tzinfo else answer.replace(tzinfo=dt.UTC)
        assert answer == answered.answer_time.ToDatetime(dt.UTC)
        assert first["duration_ms"] == answered.duration.ToMilliseconds()
        assert calls[unanswered.call_id]["answer_time"] is None
        assert calls[theirs.call_id]["operator_id"] == OTHER_OPERATOR
        cursor = system.call(system.runtime.db.run(platform_calls.feed_cursor, feed.FEED))
        assert cursor
    finally:
        system.stop()


def test_a_restart_resumes_after_the_saved_cursor(session_pki: Pki, tmp_path: Path) -> None:
    system = feed_system(session_pki, tmp_path)
    before = [record(), record()]
    try:
        publish_records(system.ingest(), before)
        eventually(lambda: len(kept(system)) == 2)
    finally:
        system.stop()

    def forget(session: sa.orm.Session) -> None:  # the copy lost, the cursor kept
        session.execute(sa.delete(tables.PLATFORM_CALLS))

    system = feed_system(session_pki, tmp_path)
    try:
        system.call(system.runtime.db.run(forget, write=True))
        after = record()
        publish_records(system.ingest(), [after])
        eventually(lambda: after.call_id in kept(system))
        # Resumed after the cursor: what it had already kept is not delivered again.
        assert set(kept(system)) == {after.call_id}
    finally:
        system.stop()


def test_an_expired_cursor_starts_again_from_the_oldest_kept(
    session_pki: Pki, tmp_path: Path
) -> None:
    system = feed_system(session_pki, tmp_path)
    try:
        records = [record() for _ in range(3)]
        publish_records(system.ingest(), records)
        eventually(lambda: len(kept(system)) == 3)
        service = system.usage_service
        assert service.feed is not None
        system.call(service.feed.stop())
        # The records log is purged past the feed's cursor while the follower is away.
        then = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)

        def age_and_forget(session: sa.orm.Session) -> None:
            session.execute(
                sa.update(records_storage.RECORDS)
                .where(records_storage.RECORDS.c.call_id == records[0].call_id)
                .values(publish_time=then)
            )
            session.execute(sa.delete(tables.PLATFORM_CALLS))
            platform_calls.store_platform_calls(session, feed.FEED, [], encode_cursor("records", 0))

        system.call(system.runtime.db.run(age_and_forget, write=True))
        system.call(server.purge(system.runtime))
        follower = feed.CallFeedFollower(system.runtime.db, service.feed.client)
        service.feed = follower
        system.call(start_follower(follower))
        eventually(lambda: set(kept(system)) == {r.call_id for r in records[1:]})
    finally:
        system.stop()
