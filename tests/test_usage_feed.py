"""The usage service's copy of the platform's calls: learnt over gRPC from the records service's
call feed (never from its tables), kept with the feed's cursor, resumed exactly after a restart,
and started again from the oldest record kept when its cursor expired."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from app import runtime as server
from opconnect.records.v1 import records_pb2 as records_pb
from plumbing.changelog import encode_cursor
from services.records import storage as records_storage
from services.usage import feed, platform_calls, tables
from tests.conftest import OTHER_OPERATOR, Pki, settings_for, start_system
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
        session.execute(sa.delete(tables.PLATFORM_CALL_KEYS))

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
            session.execute(sa.delete(tables.PLATFORM_CALL_KEYS))
            platform_calls.store_platform_calls(session, feed.FEED, [], encode_cursor("records", 0))

        system.call(system.runtime.db.run(age_and_forget, write=True))
        system.call(server.purge(system.runtime))
        follower = feed.CallFeedFollower(system.runtime.db, service.feed.client)
        service.feed = follower
        system.call(start_follower(follower))
        eventually(lambda: set(kept(system)) == {r.call_id for r in records[1:]})
    finally:
        system.stop()


def test_an_interrupted_feed_logs_once_and_says_when_it_follows_again(
    session_pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The records process stopped and started again: the follower (of another process) warns
    while it is away and logs, once, when it follows again."""
    records_dir, usage_dir = tmp_path / "records", tmp_path / "usage"
    records_dir.mkdir()
    usage_dir.mkdir()
    url = f"sqlite:///{records_dir / 'opconnect.db'}"
    records_side = start_system(settings_for(records_dir, session_pki.paths, url), session_pki)
    port = records_side.runtime.port
    usage_side = start_system(
        settings_for(usage_dir, session_pki.paths, f"sqlite:///{usage_dir / 'opconnect.db'}"),
        session_pki,
    )
    cert, key = session_pki.client("platform", "admin-center")
    credentials = grpc.ssl_channel_credentials(session_pki.paths.ca_cert.read_bytes(), key, cert)
    follower = feed.CallFeedFollower(
        usage_side.runtime.db, feed.FeedClient(f"localhost:{port}", credentials)
    )
    usage_side.call(start_follower(follower))
    again = None
    try:
        first = record()
        publish_records(records_side.ingest(), [first])
        eventually(lambda: follower.kept >= 1)
        records_side.stop()
        time.sleep(1.5)  # a few reconnection attempts
        settings = settings_for(records_dir, session_pki.paths, url, listen=f"127.0.0.1:{port}")
        again = start_system(settings, session_pki)
        publish_records(again.ingest(), [record()])
        eventually(lambda: follower.kept >= 2, timeout=30)
    finally:
        usage_side.call(follower.stop())
        usage_side.stop()
        if again is not None:
            again.stop()
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines() if line]
    assert "call feed interrupted; reconnecting" in events
    assert events.count("call feed following again") == 1


def _response(name: str, calls: int) -> records_pb.FollowCallsResponse:
    response = records_pb.FollowCallsResponse(cursor=name)
    for n in range(calls):
        response.calls.add(call_id=f"{name}-{n}")
    return response


def test_responses_that_arrive_while_a_group_is_stored_are_stored_together() -> None:
    """The feed stores the responses that arrived while it stored the ones before in one unit
    (up to its batch size of calls), in order; the stream's end or failure comes after them."""

    async def grouped_of(fail: bool) -> tuple[list[list[str]], str]:
        first_taken, exhausted = asyncio.Event(), asyncio.Event()

        async def responses() -> AsyncIterator[records_pb.FollowCallsResponse]:
            yield _response("r0", 300)
            await first_taken.wait()  # the rest arrive while the first group is stored
            for n in range(1, 5):
                yield _response(f"r{n}", 300)
            exhausted.set()
            if fail:
                raise RuntimeError("stream broken")

        groups: list[list[str]] = []
        ending = "end"
        try:
            async for group in feed.grouped(responses(), 1_000):
                groups.append([response.cursor for response in group])
                if len(groups) == 1:
                    first_taken.set()
                    await exhausted.wait()  # storing the first group takes that long
        except RuntimeError as error:
            ending = str(error)
        return groups, ending

    expected = [["r0"], ["r1", "r2", "r3"], ["r4"]]  # 900 calls; 1,200 would be over 1,000
    assert asyncio.run(grouped_of(fail=False)) == (expected, "end")
    assert asyncio.run(grouped_of(fail=True)) == (expected, "stream broken")
