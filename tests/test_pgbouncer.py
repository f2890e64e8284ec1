"""Behind a transaction pooler: a real pgbouncer (pool_mode=transaction, on a free port) in front
of the test PostgreSQL server. Two one-process replicas do their database work through it while
each LISTENs on a direct connection of its own (`database_listen_url`), with statements never
prepared on the server (`db_prepare_threshold` 0): every flow works, and a change through one
replica wakes a watcher on the other at once (heartbeats far off, so only the NOTIFY can wake
it). Skipped where pgbouncer or PostgreSQL is not there."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing.db import Database
from tests.conftest import (
    NO_POSTGRES,
    POSTGRES_URL,
    Pki,
    RunningSystem,
    Watcher,
    reset_postgres,
)
from tests.helpers import PgBouncer, assign, start_two, stored, submit, upload, usage_stub
from tests.records_data import duration_record, ids, publish_records, record, stamp, stream_all


def _schema(url: str) -> str:
    """The schema a test URL's `options=-csearch_path=...` names."""
    return str(sa.make_url(url).query["options"]).rsplit("=", 1)[1]


@pytest.fixture
def bouncer() -> Iterator[tuple[PgBouncer, str]]:
    """A pgbouncer in front of a fresh schema, and the direct URL of that schema."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    direct = reset_postgres(POSTGRES_URL)
    pooler = PgBouncer(POSTGRES_URL, _schema(direct))
    yield pooler, direct
    pooler.stop()


@pytest.fixture
def bounced(
    bouncer: tuple[PgBouncer, str], session_pki: Pki, tmp_path: Path
) -> Iterator[tuple[RunningSystem, RunningSystem]]:
    pooler, direct = bouncer
    first, second = start_two(
        session_pki,
        tmp_path,
        pooler.url,
        database_listen_url=direct,
        db_prepare_threshold=0,
        heartbeat_interval_s=60.0,
    )
    yield first, second
    first.stop()
    second.stop()


def test_the_flows_work_through_pgbouncer_with_the_listener_direct(
    bounced: tuple[RunningSystem, RunningSystem],
) -> None:
    first, second = bounced
    numbers = [f"+1425555{i:04d}" for i in range(300, 312)]
    upload(first, *numbers)
    watcher = Watcher(second.numbers())
    watcher.next()  # open, from now
    for number in numbers:  # the same statements, many times: never prepared on the server
        assign(first, number)
    events = watcher.events(len(numbers))  # woken by NOTIFY: the heartbeat is a minute off
    watcher.cancel()
    assert sorted(e.phone_number for e in events) == numbers
    reader = second.numbers()
    for number in numbers:
        found = reader.GetNumber(pb.GetNumberRequest(phone_number=number), timeout=10)
        assert found.number.state == state_pb.ASSIGNMENT_STATE_ASSIGNED

    calls = [record() for _ in range(30)]
    for start in range(0, 30, 10):
        assert publish_records(first.ingest(), calls[start : start + 10]).accepted_count == 10
    hour_ago = stamp(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    got, _, _ = stream_all(second.records(), start_time=hour_ago)
    assert ids(got) == ids(calls)

    durations = [duration_record() for _ in range(12)]
    answers = submit(usage_stub(second), durations[:6], durations[6:])
    assert [a.accepted_count for a in answers] == [6, 6]
    assert stored(first) == sorted(d.record_id for d in durations)


def test_a_statement_run_often_survives_a_change_of_server_connection(
    bouncer: tuple[PgBouncer, str],
) -> None:
    """In transaction pooling, a client's next transaction may run on another server
    connection. psycopg prepares a statement on the server after it ran `prepare_threshold`
    times, and would then name it on a connection that never saw it ("prepared statement
    _pg3_0 does not exist"); with the threshold 0 it never prepares one."""
    pooler, _ = bouncer
    database = Database(pooler.url, threads=1, prepare_threshold=0)
    query = sa.text("SELECT CAST(:x AS integer) + 1")

    def add_one(session: sa.orm.Session, x: int) -> int:
        return int(session.execute(query, {"x": x}).scalar_one())

    try:
        assert [database.transaction(add_one, i) for i in range(10)] == list(range(1, 11))
        plain = pooler.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as other, other.transaction():
            other.execute("SELECT 1")  # holds the server connection the others ran on
            assert [database.transaction(add_one, i) for i in range(3)] == [1, 2, 3]
    finally:
        database.close()
