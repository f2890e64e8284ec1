"""Storage plumbing: migrations, change-log ordering under concurrent writers, and wake-ups
(in-process and across replicas through PostgreSQL LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.orm import Session

from plumbing.changelog import (
    ANY_KEY,
    LogHead,
    Notifier,
    PostgresListener,
    allocate,
    notify_commit,
    read_head,
)
from plumbing.db import Base, Database, Unit
from plumbing.errors import ApiError, Kind
from plumbing.metrics import Metrics
from plumbing.partitions import include_name
from services.numbers import storage
from services.numbers.rules import LOG
from tests.conftest import NO_POSTGRES, POSTGRES_URL, reset_postgres


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": include_name})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_migrating_again_changes_nothing(db: Database) -> None:
    db.migrate()
    assert db.transaction(read_head, LOG).position == 0


# Four processes released together onto one fresh database. One process loads what migrating
# needs once (by migrating a scratch database of its own: every import, every migration script),
# then forks the four (it has no thread yet); each waits on one pipe until all are there, so that
# they reach the shared database at the same moment with nothing left to load.
MIGRATE_TOGETHER = """
import os, sys, traceback
from plumbing.db import Database

Database(sys.argv[2], 1).migrate()
go_read, go_write = os.pipe()
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.read(go_read, 1)
        try:
            Database(sys.argv[1], 1).migrate()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    children.append(pid)
os.write(go_write, b"go!!")
statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
sys.exit(sum(status != 0 for status in statuses))
"""


def test_processes_starting_together_migrate_once(database_url: str, tmp_path: Path) -> None:
    """Four processes (the separate-processes mode) start at once on a fresh database: each
    waits for the others' migration, none fails."""
    scratch = f"sqlite:///{tmp_path / 'scratch.db'}"
    done = subprocess.run(
        [sys.executable, "-c", MIGRATE_TOGETHER, database_url, scratch],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    database = Database(database_url, threads=1)
    try:
        assert database.transaction(read_head, LOG).position == 0
    finally:
        database.close()


def _event(session: Session, number: str) -> int:
    position = allocate(session, LOG)
    session.add(
        storage.NumberEventRow(
            position=position,
            operator_id="op",
            tenant_id="t",
            phone_number=number,
            type="assigned",
            occurred_at=dt.datetime.now(dt.UTC),
        )
    )
    return position


def test_a_reader_never_runs_past_an_open_transaction(db: Database) -> None:
    """Writer A takes a position and holds its transaction open; writer B must wait for it, and a
    reader meanwhile sees neither. After both commit, positions follow commit order."""
    a_holds = threading.Event()
    release_a = threading.Event()
    positions: dict[str, int] = {}

    def writer_a(session: Session) -> None:
        positions["a"] = _event(session, "+10000000001")
        session.flush()
        a_holds.set()
        release_a.wait(10)

    def writer_b(session: Session) -> None:
        positions["b"] = _event(session, "+10000000002")

    thread_a = threading.Thread(target=db.transaction, args=(writer_a,), kwargs={"write": True})
    thread_a.start()
    assert a_holds.wait(10)
    thread_b = threading.Thread(target=db.transaction, args=(writer_b,), kwargs={"write": True})
    thread_b.start()
    time.sleep(0.3)  # the time B would need to get past A were it not made to wait
    assert "b" not in positions, "B must wait for A's transaction to end"
    assert db.transaction(read_head, LOG).position == 0
    assert db.transaction(lambda s: list(s.scalars(select(storage.NumberEventRow.position)))) == []
    release_a.set()
    thread_a.join(10)
    thread_b.join(10)
    assert positions == {"a": 1, "b": 2}
    read = functools.partial(storage.read_events, operator_id="op", tenant_id=None)
    events = db.transaction(read, 0, 10, 10)
    assert [e.phone_number for e in events] == ["+10000000001", "+10000000002"]


def test_purge_marks_the_horizon(db: Database) -> None:
    db.transaction(_event, "+10000000001", write=True)
    db.transaction(_event, "+10000000002", write=True)
    purged = db.transaction(
        storage.purge_events, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1), write=True
    )
    assert purged == 2
    head = db.transaction(read_head, LOG)
    assert (head.position, head.purged_through) == (2, 2)
    row = db.transaction(lambda s: s.get(LogHead, LOG))
    assert row is not None and row.purged_through == 2


async def test_notifier_wakes_only_the_keys_it_names() -> None:
    notifier = Notifier()
    notifier.bind(asyncio.get_running_loop())
    mine, other = notifier.waiter(LOG, "a"), notifier.waiter(LOG, "b")
    await asyncio.to_thread(notifier.publish, LOG, ["a"])
    await asyncio.wait_for(mine.wait(), 2)
    assert not other.is_set()
    notifier.publish(LOG, [ANY_KEY])
    await asyncio.wait_for(other.wait(), 2)
    last = notifier.waiter(LOG, "c")
    notifier.close()
    assert last.is_set() and notifier.closed


async def test_the_notify_of_a_change_already_woken_for_wakes_nobody_again() -> None:
    """The NOTIFY of this process's own commit, after `publish` woke its keys, wakes nobody
    twice; nor does one at an earlier position (committed before it). Every other NOTIFY
    wakes: a later position, a key not woken, position 0 (a change without one), every key;
    and positions come only from this process's own commits, never from a NOTIFY (another
    deployment sharing the database may be far ahead)."""
    notifier = Notifier()
    notifier.bind(asyncio.get_running_loop())
    notifier.wake_notified(LOG, ("a",), 1_000)  # another deployment's log, far ahead
    notifier.publish(LOG, ["a"], 5)
    await asyncio.sleep(0.01)  # publish wakes on the loop
    generation = notifier.generation(LOG, "a")
    echo, other = notifier.waiter(LOG, "a"), notifier.waiter(LOG, "b")
    notifier.wake_notified(LOG, ("a",), 5)  # the echo
    notifier.wake_notified(LOG, ("a",), 4)  # committed before 5: the wake-up at 5 came after it
    assert not echo.is_set() and notifier.generation(LOG, "a") == generation
    notifier.wake_notified(LOG, ("a", "b"), 5)  # "b" was not woken at 5
    assert other.is_set() and not echo.is_set()
    for keys, position in ((("a",), 6), (("a",), 0), ((ANY_KEY,), 3)):
        again = notifier.waiter(LOG, "a")
        notifier.wake_notified(LOG, keys, position)
        assert again.is_set(), (keys, position)


async def test_a_commit_through_one_replica_wakes_streams_on_another() -> None:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url = reset_postgres(POSTGRES_URL)
    writer = Database(url, threads=2)
    writer.migrate()
    replica = Notifier()
    replica.bind(asyncio.get_running_loop())
    listener = PostgresListener(url, replica)
    listener.start()
    try:
        await asyncio.wait_for(listener.ready.wait(), 10)
        waiter = replica.waiter(LOG, "op")
        bystander = replica.waiter(LOG, "someone-else")

        def write(session: Session) -> None:
            position = _event(session, "+10000000001")
            notify_commit(session, LOG, position, ["op"])

        await writer.run(write, write=True)
        await asyncio.wait_for(waiter.wait(), 5)
        assert not bystander.is_set()
    finally:
        await listener.stop()
        writer.close()


async def test_storage_that_cannot_be_reached_answers_unavailable() -> None:
    unreachable = Database("postgresql+psycopg://nobody@127.0.0.1:1/none", threads=1)
    try:
        with pytest.raises(ApiError) as caught:
            await unreachable.run(read_head, LOG)
    finally:
        unreachable.close()
    error = caught.value
    assert (error.kind, error.reason) == (Kind.UNAVAILABLE, "STORAGE_UNAVAILABLE")
    assert error.retry_after_s is not None


# --------------------------------------------------------------------------- Session-free units


def _allocate_then(unit: Unit, fail: bool) -> int:
    position = allocate(unit, LOG)
    if fail:
        raise RuntimeError("the unit fails after its statements")
    return position


async def test_a_unit_without_a_session_commits_or_rolls_back_as_a_sessions_does(
    db: Database,
) -> None:
    """`run_unit`: what a unit wrote is committed when it returns, rolled back when it raises,
    and its connection goes back to the pool either way."""
    assert await db.run_unit(_allocate_then, False, write=True) == 1
    with pytest.raises(RuntimeError):
        await db.run_unit(_allocate_then, True, write=True)
    assert db.transaction(read_head, LOG).position == 1
    assert await db.run_unit(read_head, LOG) == db.transaction(read_head, LOG)
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_units_head_lock_is_timed_to_its_commit(tmp_path: Path) -> None:
    metrics = Metrics(enabled=True)
    database = Database(f"sqlite:///{tmp_path / 'opconnect.db'}", threads=2, metrics=metrics)
    database.migrate()
    try:
        await database.run_unit(_allocate_then, False, write=True)
        name = "opconnect_changelog_lock_hold_seconds"
        labels = {"log": LOG}
        assert metrics.registry.get_sample_value(f"{name}_count", labels) == 1
        assert (metrics.registry.get_sample_value(f"{name}_sum", labels) or 0) > 0
    finally:
        database.close()


@pytest.mark.postgres
async def test_a_read_unit_sees_one_snapshot_and_leaves_the_connection_as_it_was() -> None:
    """PostgreSQL: a read unit runs at REPEATABLE READ, as a Session's read does; the pooled
    connection is back at the server's default level for the next unit."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    database = Database(reset_postgres(POSTGRES_URL), threads=1)

    def level(unit: Unit) -> str:
        return str(unit.fetch("SHOW transaction_isolation", ())[0][0])

    try:
        assert await database.run_unit(level) == "repeatable read"
        assert await database.run_unit(level, write=True) == "read committed"
    finally:
        database.close()


async def test_a_write_units_begin_goes_with_its_first_statement(
    db: Database, tmp_path: Path
) -> None:
    """PostgreSQL: a write unit's BEGIN is sent with its first statement, so the server
    answers them once (one ReadyForQuery) instead of twice; what the unit wrote commits with
    it, a failure rolls it all back, and the connection goes back to the pool as it came (out
    of autocommit, no transaction open)."""
    if not db.is_postgres:
        pytest.skip("SQLite's BEGIN IMMEDIATE takes no round trip")
    one = Database(db.url, threads=1)  # one connection: the one the units ran on is checked
    trace = tmp_path / "protocol.txt"

    def traced(unit: Unit, fail: bool) -> int:
        pgconn = unit.connection.pgconn
        with trace.open("w") as out:
            pgconn.trace(out.fileno())
            pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                position = allocate(unit, LOG)
                assert read_head(unit, LOG).position == position
            finally:
                pgconn.untrace()
        if fail:
            raise RuntimeError("the unit fails after its statements")
        return position

    try:
        before = one.transaction(read_head, LOG).position
        assert await one.run_unit(traced, False, write=True) == before + 1
        # BEGIN with the allocation (one answer), then the head read (one answer)
        assert trace.read_text().count("ReadyForQuery") == 2
        with pytest.raises(RuntimeError):
            await one.run_unit(traced, True, write=True)
        assert one.transaction(read_head, LOG).position == before + 1
        pooled = one.engine.raw_connection()
        try:
            connection = pooled.dbapi_connection
            assert connection is not None
            assert not connection.autocommit
            assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        finally:
            pooled.close()
    finally:
        one.close()


async def test_a_unit_on_storage_that_cannot_be_reached_answers_unavailable() -> None:
    unreachable = Database("postgresql+psycopg://nobody@127.0.0.1:1/none", threads=1)
    try:
        with pytest.raises(ApiError) as caught:
            await unreachable.run_unit(read_head, LOG)
    finally:
        unreachable.close()
    error = caught.value
    assert (error.kind, error.reason) == (Kind.UNAVAILABLE, "STORAGE_UNAVAILABLE")


def test_a_unit_waits_out_another_process_lock_as_busy(tmp_path: Path) -> None:
    """SQLite's write lock held by another process past the busy timeout: a unit without a
    Session answers RESOURCE_EXHAUSTED (STORAGE_BUSY), and works once the lock is free."""
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    database = Database(url, threads=2, busy_timeout_s=0.2)
    database.migrate()
    other = sqlite3.connect(tmp_path / "opconnect.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(ApiError) as raised:
            asyncio.run(database.run_unit(_allocate_then, False, write=True))
        assert (raised.value.kind, raised.value.reason) == (Kind.LIMITED, "STORAGE_BUSY")
        other.execute("ROLLBACK")
        assert asyncio.run(database.run_unit(_allocate_then, False, write=True)) == 1
    finally:
        other.close()
        database.close()
