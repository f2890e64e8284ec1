"""Time partitions on PostgreSQL (plumbing/partitions.py): made at start-up and ahead, retention
by dropping whole partitions (cursors into them expire, cursors after them resume without a
gap), a row with no partition refused without a crash, uniqueness kept by the writers' locks
under concurrent writers, every row kept across migrations 0008, 0009, 0012 and 0014, the keys
of duration records (0009), call records (0012) and the platform's calls (0014) kept in step
with their partitions,
and the usage service's per-operator lock per schema."""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from alembic import command

from app import runtime as server
from opconnect.records.v1 import records_pb2 as pb
from opconnect.usage.v1 import usage_pb2
from plumbing import partitions
from plumbing.changelog import encode_cursor, read_head
from plumbing.config import Settings
from plumbing.db import Database, alembic_config, driver_fetch_all
from plumbing.direction import Direction
from plumbing.validation import Outcome
from services.records import convert, rules, storage
from services.records.rules import LOG
from services.usage import ingest, platform_calls, usage_days
from services.usage import tables as usage_tables
from services.usage.rules import DurationRecord, PlatformCall, Submitted
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    POSTGRES_URL,
    Pki,
    RunningSystem,
    reset_postgres,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import age_records, eventually, submit, usage_stub
from tests.records_data import (
    duration_record,
    ids,
    publish_records,
    published,
    record,
    stamp,
    stream_all,
)

EPOCH = stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))


@pytest.fixture
def postgres_url() -> str:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    return reset_postgres(POSTGRES_URL)


@pytest.fixture
def pg_system(session_pki: Pki, postgres_url: str, tmp_path: Path) -> Iterator[RunningSystem]:
    settings = settings_for(tmp_path, session_pki.paths, postgres_url, metrics_listen="127.0.0.1:0")
    running = start_system(settings, session_pki)
    yield running
    running.stop()


def _run(system: RunningSystem, fn: Callable[..., Any], *args: Any) -> Any:
    return system.call(system.runtime.db.run(fn, *args, write=True))


def _names(system: RunningSystem, spec: partitions.Partitioned, table: str = "") -> set[str]:
    found = _run(system, partitions.partitions, spec, table)
    return {p.name for p in found}


def _sample(system: RunningSystem, name: str, table: str) -> float | None:
    return system.runtime.metrics.registry.get_sample_value(name, {"table": table})


@pytest.mark.postgres
def test_partitions_are_made_at_start_and_ahead(pg_system: RunningSystem) -> None:
    settings = pg_system.runtime.settings
    retention = {
        "call_records": settings.record_retention_s,
        "number_events": settings.change_log_retention_s,
        "audit_events": settings.audit_retention_s,
        "call_durations": settings.usage_retention_s,
        "usage_platform_calls": settings.usage_retention_s,
    }
    now = dt.datetime.now(dt.UTC)
    for spec in partitions.TABLES:
        starts = partitions.wanted(spec, now, retention[spec.table])
        for table in (spec.table, *spec.companions):
            expected = {partitions.partition_name(table, start) for start in starts}
            assert expected <= _names(pg_system, spec, table), table
        ahead = partitions.period_start(now, spec.period)
        for _ in range(partitions.AHEAD[spec.period]):
            ahead = partitions.period_end(ahead, spec.period)
        until = _sample(pg_system, "opconnect_partitions_until_timestamp_seconds", spec.table)
        assert until is not None and until >= ahead.timestamp(), spec.table
        count = _sample(pg_system, "opconnect_partitions", spec.table)
        assert count is not None and count >= len(starts), spec.table
    # Usage's tables reach back to the retention: an operator's old records have a place.
    durations = _run(pg_system, partitions.partitions, partitions.CALL_DURATIONS)
    assert durations[0].start <= now - dt.timedelta(seconds=settings.usage_retention_s)


@pytest.mark.postgres
def test_a_row_without_a_partition_is_refused_then_accepted_once_maintenance_ran(
    pg_system: RunningSystem,
) -> None:
    """No DEFAULT partition: a publish whose time has no partition fails whole (UNAVAILABLE,
    nothing stored, the process serving on); the purge task makes the partition again."""
    today = partitions.period_start(dt.datetime.now(dt.UTC), partitions.Period.DAY)

    def drop_today(session: sa.orm.Session) -> None:
        for table in ("call_media_streams", "call_records"):
            session.execute(sa.text(f"DROP TABLE {partitions.partition_name(table, today)}"))

    _run(pg_system, drop_today)
    first = record()
    with pytest.raises(grpc.RpcError) as caught:
        publish_records(pg_system.ingest(), [first])
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
    assert _run(pg_system, read_head, LOG).position == 0

    pg_system.call(server.purge(pg_system.runtime))

    response = publish_records(pg_system.ingest(), [first])
    assert [r.outcome for r in response.results] == [pb.CALL_RECORD_OUTCOME_ACCEPTED]
    kept, _, _ = stream_all(pg_system.records(), start_time=EPOCH)
    assert ids(kept) == [first.call_id]


@pytest.mark.postgres
def test_maintenance_that_cannot_lock_a_table_gives_up_and_does_the_others(
    pg_system: RunningSystem,
) -> None:
    """A long reader of call_records holds back the partition its maintenance must make
    (making one takes the parent's ACCESS EXCLUSIVE lock): it gives up after LOCK_TIMEOUT, the
    audit table is still done, the purge counts a failure; the next purge, the reader gone,
    makes it."""
    runtime = pg_system.runtime
    newest = _run(pg_system, partitions.partitions, partitions.RECORDS)[-1]

    def drop_newest(session: sa.orm.Session) -> None:
        session.execute(sa.text(f"DROP TABLE {newest.name}"))

    _run(pg_system, drop_newest)
    audit_before = _sample(pg_system, "opconnect_partitions_created_total", "audit_events")
    reader = _Held(
        runtime.settings.database_url,
        "SELECT count(*) FROM call_records",  # and its transaction stays open
        {},
    )
    try:
        pg_system.call(server.purge(runtime))
    finally:
        reader.release()
    failed = runtime.metrics.registry.get_sample_value(
        "opconnect_purge_runs_total", {"service": "records", "result": "failed"}
    )
    assert failed == 1
    assert newest.name not in _names(pg_system, partitions.RECORDS)
    assert _sample(pg_system, "opconnect_partitions_created_total", "audit_events") == audit_before
    assert _sample(pg_system, "opconnect_partitions", "audit_events")  # maintained: exported

    pg_system.call(server.purge(runtime))

    assert newest.name in _names(pg_system, partitions.RECORDS)


@pytest.mark.postgres
def test_retention_drops_whole_partitions_and_expires_cursors_into_them(
    pg_system: RunningSystem,
) -> None:
    records = [record() for _ in range(6)]
    publish_records(pg_system.ingest(), records)
    _, _, responses = stream_all(pg_system.records(), start_time=EPOCH, max_batch_size=1)
    cursors = [r.cursor for r in responses if r.records]
    age_records(pg_system, ids(records[:3]), days=33)  # a partition wholly past retention
    age_records(pg_system, ids(records[3:4]), days=30.01)  # just past it
    age_records(pg_system, ids(records[4:5]), days=29.9)  # just inside it
    old_day = partitions.period_start(
        dt.datetime.now(dt.UTC) - dt.timedelta(days=33), partitions.Period.DAY
    )
    old = {
        partitions.partition_name(table, old_day)
        for table in ("call_records", "call_media_streams")
    }
    assert old <= _names(pg_system, partitions.RECORDS) | _names(
        pg_system, partitions.RECORDS, "call_media_streams"
    )

    pg_system.call(server.purge(pg_system.runtime))

    names = _names(pg_system, partitions.RECORDS) | _names(
        pg_system, partitions.RECORDS, "call_media_streams"
    )
    assert not old & names, "the partition past retention is dropped, its streams' with it"
    assert (_sample(pg_system, "opconnect_partitions_dropped_total", "call_records") or 0) >= 1
    head = _run(pg_system, read_head, LOG)
    assert head.purged_through == 4  # the record just past retention went by the chunked delete
    for cursor in cursors[:3]:
        with pytest.raises(grpc.RpcError) as caught:
            stream_all(pg_system.records(), cursor=cursor)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CURSOR_EXPIRED")
    kept, _, _ = stream_all(pg_system.records(), cursor=cursors[3])
    assert ids(kept) == ids(records[4:])

    def streams(session: sa.orm.Session) -> int:
        return int(session.scalar(sa.select(sa.func.count()).select_from(storage.STREAMS)) or 0)

    assert _run(pg_system, streams) == 4  # the two kept records' audio streams
    # The keys of the dropped records went with their partition, the one past retention's by
    # the chunked delete: those calls are unknown again, the kept ones still duplicates.
    assert _run(pg_system, _record_keys) == sorted(ids(records[4:]))
    again = publish_records(pg_system.ingest(), [records[0], records[3], records[5]])
    assert [r.outcome for r in again.results] == [
        pb.CALL_RECORD_OUTCOME_ACCEPTED,
        pb.CALL_RECORD_OUTCOME_ACCEPTED,
        pb.CALL_RECORD_OUTCOME_DUPLICATE,
    ]


def _record_keys(session: sa.orm.Session) -> list[str]:
    return sorted(session.scalars(sa.select(storage.KEYS.c.call_id)))


@pytest.mark.postgres
def test_dropping_a_durations_partition_forgets_its_records_keys(pg_system: RunningSystem) -> None:
    """The keys of the records in a dropped `call_durations` partition go with it (same
    transaction), and so do those of the records the chunked delete takes; the others stay and
    still answer duplicates."""
    now = dt.datetime.now(dt.UTC)
    old = duration_record(start=now - dt.timedelta(days=20))
    recent = duration_record(start=now - dt.timedelta(hours=1))
    submit(usage_stub(pg_system), [old, recent])
    cutoff = partitions.period_start(now - dt.timedelta(days=10), partitions.Period.WEEK)
    dropped = _drop_past(pg_system, partitions.CALL_DURATIONS, cutoff)
    assert dropped, "the old record's week is wholly before the cutoff"
    k = usage_tables.DURATION_KEYS.c

    def keys(session: sa.orm.Session) -> list[str]:
        query = sa.select(k.record_id).where(k.operator_id == OPERATOR)
        return sorted(session.execute(query).scalars())

    assert _run(pg_system, keys) == [recent.record_id]
    again = duration_record(call_id=old.call_id, start=now - dt.timedelta(hours=2))
    (answer,) = submit(usage_stub(pg_system), [recent, again])
    assert [r.outcome for r in answer.results] == [
        usage_pb2.CALL_DURATION_OUTCOME_DUPLICATE,
        usage_pb2.CALL_DURATION_OUTCOME_ACCEPTED,  # the dropped record's call is no longer known
    ]
    # The chunked delete of the partition straddling the cutoff takes the keys of its rows.
    purged = _run(pg_system, ingest.purge_durations, now - dt.timedelta(minutes=90))
    assert purged == 1
    assert _run(pg_system, keys) == [recent.record_id]


class _Held:
    """A lock held by a transaction of its own until `release` (commit)."""

    def __init__(self, url: str, sql: str, params: dict[str, Any]) -> None:
        self._engine = sa.create_engine(url)
        self._conn = self._engine.connect()
        self._conn.execute(sa.text(sql), params)
        self.pid = int(self._conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())

    def waiting(self) -> int:
        """How many sessions wait, directly or behind another waiter, for this one."""
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "WITH RECURSIVE blocked(pid) AS ("
                        " SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
                        " UNION SELECT a.pid FROM pg_stat_activity a JOIN blocked b"
                        " ON b.pid = ANY(pg_blocking_pids(a.pid)))"
                        " SELECT count(*) FROM blocked"
                    ),
                    {"pid": self.pid},
                ).scalar_one()
            )

    def release(self) -> None:
        self._conn.commit()
        self._conn.close()
        self._engine.dispose()


def _together(held: _Held, *calls: Callable[[], Any]) -> list[Any]:
    """Run the calls on threads of their own while `held` blocks them all; release it once
    every one waits for it; their results, in order."""
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Callable[[], Any]) -> None:
        results[index] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    try:
        for thread in threads:
            thread.start()
        eventually(lambda: held.waiting() >= len(calls), timeout=20)
    finally:
        held.release()
    for thread in threads:
        thread.join(30)
    return results


@pytest.mark.postgres
def test_concurrent_publishers_store_a_call_once(pg_system: RunningSystem) -> None:
    """Two publishers of one call_id with other content (another invite time), released at
    the same moment: no constraint stops a second row (the partitioned table has none on
    call_id), the `records` log head's lock does: one is accepted, the other a conflict. One
    publishes through the system, the other as another replica's writer (a process of its own
    would: one process commits its streams' batches one group at a time)."""
    url = pg_system.runtime.settings.database_url
    first = record(end=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3))
    second = record(first.call_id)  # ends a minute ago: another digest
    held = _Held(url, "SELECT 1 FROM change_log_heads WHERE log = :log FOR UPDATE", {"log": LOG})
    replica = Database(url, threads=1)
    settings = pg_system.runtime.settings
    (candidate,) = convert.prepare(
        [published(second)], {OPERATOR}, settings, rules.thresholds(settings)
    )
    assert isinstance(candidate, rules.Candidate)
    try:
        one, two = _together(
            held,
            lambda: publish_records(pg_system.ingest(), [first]),
            lambda: replica.transaction(
                storage.publish,
                [candidate],
                convert.publish_time_field,
                convert.stored,
                write=True,
            ),
        )
    finally:
        replica.close()
    outcomes = sorted(
        [(r.outcome, r.reason) for r in one.results]
        + [
            (convert.OUTCOME_OUT[r.outcome], r.refusal.reason if r.refusal else "")
            for r in two.results
        ]
    )
    assert outcomes == [
        (pb.CALL_RECORD_OUTCOME_ACCEPTED, ""),
        (pb.CALL_RECORD_OUTCOME_REFUSED, "CALL_ID_CONFLICT"),
    ]

    def stored(session: sa.orm.Session) -> int:
        query = sa.select(sa.func.count()).where(storage.RECORDS.c.call_id == first.call_id)
        return int(session.scalar(query) or 0)

    assert _run(pg_system, stored) == 1


@pytest.mark.postgres
def test_concurrent_replicas_publishing_the_same_calls_store_each_once(
    pg_system: RunningSystem,
) -> None:
    """Two replicas' writers publish the same four call ids, in opposite orders, one of them
    with other content, released at the same moment: each call is stored once, and the other
    writer is answered as if it came second (the same content a duplicate, other content a
    conflict), whichever wins; neither deadlocks. Their keys are claimed before the log's lock
    (`call_record_keys`), so each waits for the other's claim, not for the lock."""
    url = pg_system.runtime.settings.database_url
    settings = pg_system.runtime.settings
    end = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3)
    same = [record(end=end) for _ in range(3)]
    other = record(end=end)
    changed = record(other.call_id)  # ends a minute ago: another digest

    def candidates(records: list[pb.CallRecord]) -> list[rules.Candidate]:
        found = convert.prepare(
            [published(r) for r in records], {OPERATOR}, settings, rules.thresholds(settings)
        )
        assert all(isinstance(c, rules.Candidate) for c in found)
        return [c for c in found if isinstance(c, rules.Candidate)]

    mine = candidates([*same, other])
    theirs = candidates([changed, *reversed(same)])
    held = _Held(url, "SELECT 1 FROM change_log_heads WHERE log = :log FOR UPDATE", {"log": LOG})
    replicas = [Database(url, threads=1) for _ in range(2)]
    try:
        one, two = _together(
            held,
            *(
                functools.partial(
                    replica.transaction,
                    storage.publish,
                    batch,
                    convert.publish_time_field,
                    convert.stored,
                    write=True,
                )
                for replica, batch in zip(replicas, (mine, theirs), strict=True)
            ),
        )
    finally:
        for replica in replicas:
            replica.close()
    outcomes: dict[str, list[str]] = {}
    for result in [*one.results, *two.results]:
        outcomes.setdefault(result.call_id, []).append(
            result.refusal.reason if result.refusal else result.outcome.value
        )
    for call_id in ids(same):
        assert sorted(outcomes[call_id]) == sorted(
            [Outcome.ACCEPTED.value, Outcome.DUPLICATE.value]
        )
    assert sorted(outcomes[other.call_id]) == sorted([Outcome.ACCEPTED.value, "CALL_ID_CONFLICT"])

    def stored(session: sa.orm.Session) -> list[str]:
        query = sa.select(storage.RECORDS.c.call_id)
        return sorted(session.scalars(query))

    assert _run(pg_system, stored) == sorted(ids([*same, other]))
    assert _run(pg_system, _record_keys) == sorted(ids([*same, other]))
    got, _, _ = stream_all(pg_system.records(), start_time=EPOCH)
    assert sorted(ids(got)) == sorted(ids([*same, other]))


@pytest.mark.postgres
def test_a_publish_waiting_for_a_claimed_call_id_holds_no_log_lock(
    pg_system: RunningSystem,
) -> None:
    """A call id claimed by a transaction still open (another replica's publish, between its
    claim and its commit) makes a publish of it wait for that transaction, before the log's
    lock: other publishes commit meanwhile; once the claim commits, the waiting one answers it
    as stored (here other content: a conflict)."""
    url = pg_system.runtime.settings.database_url
    settings = pg_system.runtime.settings
    claimed = record()
    (candidate,) = convert.prepare(
        [published(claimed)], {OPERATOR}, settings, rules.thresholds(settings)
    )
    assert isinstance(candidate, rules.Candidate)
    held = _Held(
        url,
        "INSERT INTO call_record_keys (call_id, digest, publish_time) VALUES (:c, :d, now())",
        {"c": claimed.call_id, "d": bytes(32)},
    )
    replica = Database(url, threads=1)
    answer: list[storage.Stored] = []
    waiting = threading.Thread(
        target=lambda: answer.append(
            replica.transaction(
                storage.publish,
                [candidate],
                convert.publish_time_field,
                convert.stored,
                write=True,
            )
        )
    )
    try:
        waiting.start()
        eventually(lambda: held.waiting() >= 1, timeout=20)
        meanwhile = record()
        response = publish_records(pg_system.ingest(), [meanwhile])
        assert [r.outcome for r in response.results] == [pb.CALL_RECORD_OUTCOME_ACCEPTED]
        assert not answer, "still waiting for the claim"
    finally:
        held.release()
        waiting.join(30)
        replica.close()
    ((result,),) = [stored.results for stored in answer]
    assert (result.outcome, result.refusal and result.refusal.reason) == (
        Outcome.REFUSED,
        "CALL_ID_CONFLICT",
    )


@pytest.mark.postgres
def test_a_key_claimed_the_day_before_its_record_is_published_moves_to_its_day(
    pg_system: RunningSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that claimed its call ids before midnight (UTC) and took the log's lock after
    it: the keys move to their records' publish time, so that they are dropped with that day's
    partition, not the day before's."""
    settings = pg_system.runtime.settings
    candidates = convert.prepare(
        [published(record()), published(record())], {OPERATOR}, settings, rules.thresholds(settings)
    )
    days = iter([dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2000, 1, 2, tzinfo=dt.UTC)])
    monkeypatch.setattr(storage, "_day", lambda at: next(days))  # claimed, then published
    (stored,) = _run(
        pg_system,
        storage.publish_many,
        [candidates],
        convert.publish_time_field,
        convert.stored,
    )
    assert [r.outcome for r in stored.results] == [Outcome.ACCEPTED] * 2

    def times(session: sa.orm.Session) -> tuple[list[Any], list[Any]]:
        records = session.execute(
            sa.select(storage.RECORDS.c.call_id, storage.RECORDS.c.publish_time)
        )
        keys = session.execute(sa.select(storage.KEYS.c.call_id, storage.KEYS.c.publish_time))
        return sorted(records), sorted(keys)

    records, keys = _run(pg_system, times)
    assert keys == records


@pytest.mark.postgres
def test_concurrent_submitters_store_a_record_and_a_call_once(pg_system: RunningSystem) -> None:
    """Two streams of one operator report one call and one record_id each, with a start time in
    another week (another partition: no key of the table sees both). Both are held after their
    duplicate check, at the usage by day's rows they add to (locked here): the operator's
    advisory lock has the second wait before its check, so each is stored once."""
    url = pg_system.runtime.settings.database_url
    now = dt.datetime.now(dt.UTC)
    recent, older = now - dt.timedelta(hours=1), now - dt.timedelta(days=10)
    submit(usage_stub(pg_system), [duration_record(start=recent), duration_record(start=older)])
    a = [duration_record(start=recent), duration_record(start=recent)]
    b = [
        duration_record(call_id=a[0].call_id, start=older),  # the same call
        duration_record(record_id=a[1].record_id, start=older),  # the same record_id
    ]
    held = _Held(
        url, "SELECT 1 FROM usage_daily WHERE operator_id = :op FOR UPDATE", {"op": OPERATOR}
    )
    (one,), (two,) = _together(
        held,
        lambda: submit(usage_stub(pg_system), a),
        lambda: submit(usage_stub(pg_system), b),
    )
    accepted = usage_pb2.CALL_DURATION_OUTCOME_ACCEPTED
    refused = usage_pb2.CALL_DURATION_OUTCOME_REFUSED
    a_won = one.results[0].outcome == accepted
    first, then, winner = (one, two, a) if a_won else (two, one, b)
    assert [r.outcome for r in first.results] == [accepted, accepted]
    assert [(r.outcome, r.reason) for r in then.results] == [
        (refused, "CALL_ALREADY_REPORTED"),
        (refused, "RECORD_ID_CONFLICT"),
    ]
    c = usage_tables.DURATIONS.c

    def rows(session: sa.orm.Session) -> list[tuple[str, str]]:
        chosen = [r.record_id for r in (*a, *b)]
        query = sa.select(c.record_id, c.call_id).where(
            c.operator_id == OPERATOR, c.record_id.in_(chosen)
        )
        return sorted((r.record_id, r.call_id) for r in session.execute(query))

    assert _run(pg_system, rows) == sorted((r.record_id, r.call_id) for r in winner)


# --- migration 0008 ------------------------------------------------------------------------


def _rows_at_0007(url: str) -> dict[str, int]:
    """Rows as the system stored them before 0008 (the columns of 0007), through SQL; the
    count of each table."""
    now = dt.datetime.now(dt.UTC)
    engine = sa.create_engine(url)
    records = [record(end=now - dt.timedelta(days=d, minutes=5)) for d in (3, 1, 0)]
    with engine.begin() as conn:
        for position, message in enumerate(records, start=1):
            body = pb.StreamCallRecordsResponse(records=[message]).SerializeToString()
            conn.execute(
                sa.text(
                    "INSERT INTO call_records (position, call_id, operator_id, tenant_id,"
                    " direction, caller, callee, trunk_fqdn, invite_time, answer_time, end_time,"
                    " duration_ms, final_sip_code, quality, publish_time, digest, body) VALUES"
                    " (:p, :call, :op, :tenant, 'inbound', :caller, :callee, :trunk, :invite,"
                    " :invite, :end, 120000, 200, 'GOOD', :published, :digest, :body)"
                ),
                {
                    "p": position,
                    "call": message.call_id,
                    "op": OPERATOR,
                    "tenant": message.tenant_id,
                    "caller": message.caller,
                    "callee": message.callee,
                    "trunk": message.trunk_fqdn,
                    "invite": message.invite_time.ToDatetime(dt.UTC),
                    "end": message.end_time.ToDatetime(dt.UTC),
                    "published": message.end_time.ToDatetime(dt.UTC) + dt.timedelta(minutes=1),
                    "digest": bytes(32),
                    "body": body,
                },
            )
            for index in (0, 1):
                conn.execute(
                    sa.text(
                        "INSERT INTO call_media_streams (position, stream_index, operator_id,"
                        " tenant_id, trunk_fqdn, direction, invite_time, jitter_ms) VALUES"
                        " (:p, :i, :op, :tenant, :trunk, 'inbound', :invite, 3.0)"
                    ),
                    {
                        "p": position,
                        "i": index,
                        "op": OPERATOR,
                        "tenant": message.tenant_id,
                        "trunk": message.trunk_fqdn,
                        "invite": message.invite_time.ToDatetime(dt.UTC),
                    },
                )
        conn.execute(sa.text("UPDATE change_log_heads SET position = 3 WHERE log = 'records'"))
        for position in (1, 2):
            conn.execute(
                sa.text(
                    "INSERT INTO number_events (position, operator_id, tenant_id, phone_number,"
                    " type, sip_uri, target_kind, target_id, occurred_at) VALUES"
                    " (:p, :op, 't', :number, 'assigned', '', '', '', :at)"
                ),
                {"p": position, "op": OPERATOR, "number": f"+1425555010{position}", "at": now},
            )
        conn.execute(sa.text("UPDATE change_log_heads SET position = 2 WHERE log = 'numbers'"))
        for days in (100, 1):
            conn.execute(
                sa.text(
                    "INSERT INTO audit_events (at, principal, method, filters, record_count,"
                    " duration_ms, status, request_id) VALUES"
                    " (:at, 'operator/x', 'GetCallRecord', '{}', 1, 1.0, 'OK', :request)"
                ),
                {"at": now - dt.timedelta(days=days), "request": f"r{days}"},
            )
        for days in (200, 10):
            start = now - dt.timedelta(days=days)
            conn.execute(
                sa.text(
                    "INSERT INTO call_durations (operator_id, record_id, call_id, tenant_id,"
                    " caller, callee, direction, start_time, end_time, duration_us, digest,"
                    " submitted_at) VALUES (:op, :record, :call, 't', '+1', '+2', 'inbound',"
                    " :start, :start, 1, :digest, :start)"
                ),
                {
                    "op": OPERATOR,
                    "record": f"cdr-{days}",
                    "call": f"call-{days}",
                    "start": start,
                    "digest": bytes(32),
                },
            )
            conn.execute(
                sa.text(
                    "INSERT INTO usage_platform_calls (call_id, operator_id, tenant_id,"
                    " direction, invite_time, answer_time, duration_ms) VALUES"
                    " (:call, :op, 't', 'inbound', :start, NULL, 0)"
                ),
                {"op": OPERATOR, "call": f"call-{days}", "start": start},
            )
    counts = _counts(engine)
    engine.dispose()
    return counts


TABLES = (
    "call_records",
    "call_media_streams",
    "number_events",
    "audit_events",
    "call_durations",
    "usage_platform_calls",
)


def _counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES
        }


# Columns later migrations add (0008: the media streams' publish time; 0013: the emergency
# location an assignment event keeps): not the rows' contents as 0007 stored them.
LATER_COLUMNS = {"call_media_streams": ("publish_time",), "number_events": ("emergency_location",)}


def _contents(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each table (the columns 0007 had), in a fixed order."""
    with engine.connect() as conn:
        found = {}
        for table in TABLES:
            columns = [c["name"] for c in sa.inspect(conn).get_columns(table)]
            columns = [c for c in columns if c not in LATER_COLUMNS.get(table, ())]
            listed = ", ".join(columns)
            rows = conn.execute(sa.text(f"SELECT {listed} FROM {table} ORDER BY {listed}"))
            found[table] = [tuple(row) for row in rows]
        return found


def _migrate(url: str, revision: str, *, down: bool = False) -> None:
    engine = sa.create_engine(url)
    config = alembic_config(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_rows_stored_before_the_migration_are_kept_and_served(
    session_pki: Pki, database_url: str, tmp_path: Path
) -> None:
    """On both backends (SQLite's tables stay plain; its media streams get their publish
    time): every row kept and served, a cursor from before resumes; down to 0007 and up again
    keeps them too."""
    postgres = database_url.startswith("postgresql")
    engine = sa.create_engine(database_url)
    _migrate(database_url, "0007")
    counts = _rows_at_0007(database_url)
    assert counts == {
        "call_records": 3,
        "call_media_streams": 6,
        "number_events": 2,
        "audit_events": 2,
        "call_durations": 2,
        "usage_platform_calls": 2,
    }
    before = _contents(engine)

    database = Database(database_url, threads=1)
    database.migrate()
    database.close()

    assert _counts(engine) == counts
    assert _contents(engine) == before
    with engine.connect() as conn:
        for table in TABLES if postgres else ():
            kind = conn.execute(
                sa.text("SELECT relkind FROM pg_class WHERE oid = CAST(:t AS regclass)"),
                {"t": table},
            ).scalar_one()
            assert kind == "p", table  # partitioned
        unmatched = conn.execute(
            sa.text(
                "SELECT count(*) FROM call_media_streams m JOIN call_records r"
                " ON r.position = m.position WHERE m.publish_time <> r.publish_time"
            )
        ).scalar_one()
        assert unmatched == 0
    system = start_system(settings_for(tmp_path, session_pki.paths, database_url), session_pki)
    try:
        # A cursor handed out before the migration (after the first record) resumes after it.
        kept, _, _ = stream_all(system.records(), cursor=encode_cursor(LOG, 1))
        assert len(kept) == 2
        everything, _, _ = stream_all(system.records(), start_time=EPOCH)
        assert len(everything) == 3 and everything[1:] == kept
        # New rows go on where the old ones stopped: the next position, the next audit id.
        fresh = record()
        publish_records(system.ingest(), [fresh])
        after, _, _ = stream_all(system.records(), cursor=encode_cursor(LOG, 3))
        assert ids(after) == [fresh.call_id]
        system.records().GetCallRecord(pb.GetCallRecordRequest(call_id=fresh.call_id))
        system.call(system.audit.flush())
        with engine.connect() as conn:
            ids_now = list(
                conn.execute(sa.text("SELECT id FROM audit_events ORDER BY id")).scalars()
            )
        assert ids_now[:2] == [1, 2] and len(ids_now) > 2 and ids_now[2] > 2
    finally:
        system.stop()
    served = _contents(engine)
    _migrate(database_url, "0007", down=True)
    assert _contents(engine) == served
    _migrate(database_url, "head")
    assert _contents(engine) == served
    engine.dispose()


@pytest.mark.postgres
def test_maintainers_of_the_same_table_in_other_schemas_never_wait_for_each_other(
    postgres_url: str,
) -> None:
    """Partition maintenance is serialized per table of one schema: a maintainer of
    call_durations in another schema (another deployment on the server; the tests' and benches'
    own schemas) holding its lock does not make this one give up."""
    other = reset_postgres(POSTGRES_URL)
    mine = Database(postgres_url, threads=1)
    theirs = Database(other, threads=1)
    try:
        mine.migrate()
        theirs.migrate()
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)  # partitions to make
        spec = partitions.CALL_DURATIONS
        with sa.orm.Session(theirs.engine) as session, session.begin():
            # Their maintainer, in the middle of its transaction: it holds its table's lock.
            assert partitions.create_ahead(session, spec, later, 86_400.0)
            made = mine.transaction(partitions.create_ahead, spec, later, 86_400.0, write=True)
            assert made
            session.rollback()
    finally:
        mine.close()
        theirs.close()


# --- migration 0009 ------------------------------------------------------------------------


def _stored_before(url: str, revision: str) -> tuple[sa.Engine, dict[str, list[tuple[Any, ...]]]]:
    """Rows stored at 0007 (`_rows_at_0007`), the schema migrated to `revision`, then to the
    head with every row kept: an engine on the database, and the rows as at `revision`."""
    engine = sa.create_engine(url)
    _migrate(url, "0007")
    _rows_at_0007(url)
    _migrate(url, revision)
    before = _contents(engine)
    _migrate(url, "head")
    assert _contents(engine) == before
    return engine, before


def _drop_past(system: RunningSystem, spec: partitions.Partitioned, cutoff: dt.datetime) -> Any:
    """`partitions.drop_past` tried as maintenance tries it on a shared server."""
    for attempt in range(1, partitions.TRIES + 1):
        try:
            return _run(system, partitions.drop_past, spec, cutoff)
        except sa.exc.OperationalError:
            if attempt == partitions.TRIES:
                raise
            time.sleep(partitions.RETRY_S)
    return None


def test_records_stored_before_the_duration_keys_keep_their_keys(database_url: str) -> None:
    """On both backends every row stored before 0009 is kept (down to 0008 and up again too);
    on PostgreSQL their keys fill `call_duration_keys` (SQLite's stays empty), and ingest
    answers the records stored before as stored: the same record a duplicate, other content
    a conflict, another record of one of their calls CALL_ALREADY_REPORTED."""
    postgres = database_url.startswith("postgresql")
    engine, before = _stored_before(database_url, "0008")

    def keys() -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT operator_id, record_id, call_id, digest FROM call_duration_keys")
            )
            return sorted((a, b, c, bytes(d)) for a, b, c, d in found)

    stored = [(OPERATOR, f"cdr-{days}", f"call-{days}", bytes(32)) for days in (10, 200)]
    assert keys() == (sorted(stored) if postgres else [])

    now = dt.datetime.now(dt.UTC)

    def checked(record_id: str, call_id: str, digest: bytes) -> Submitted:
        talk = dt.timedelta(seconds=60)
        return Submitted(
            DurationRecord(
                record_id, call_id, "t", "+1", "+2", Direction.INBOUND, now, now + talk, talk
            ),
            digest,
        )

    database = Database(database_url, threads=1)
    try:
        results = database.transaction(
            ingest.submit,
            OPERATOR,
            [
                checked("cdr-10", "call-10", bytes(32)),
                checked("cdr-200", "call-200", b"\x01" * 32),
                checked("cdr-new", "call-10", b"\x02" * 32),
            ],
            write=True,
        )
    finally:
        database.close()
    assert [(r.outcome, r.refusal and r.refusal.reason) for r in results] == [
        (Outcome.DUPLICATE, None),
        (Outcome.REFUSED, "RECORD_ID_CONFLICT"),
        (Outcome.REFUSED, "CALL_ALREADY_REPORTED"),
    ]
    _migrate(database_url, "0008", down=True)
    assert _contents(engine) == before
    _migrate(database_url, "head")
    assert _contents(engine) == before
    assert keys() == (sorted(stored) if postgres else [])
    engine.dispose()


# --- migration 0012 ------------------------------------------------------------------------


def test_records_stored_before_the_record_keys_keep_their_keys(database_url: str) -> None:
    """On both backends every row stored before 0012 is kept (down to 0011 and up again too);
    on PostgreSQL their keys fill `call_record_keys` (SQLite's stays empty), and publish
    answers the records stored before as stored: other content under one of their call ids a
    conflict, a new call accepted, and each call id stored once."""
    postgres = database_url.startswith("postgresql")
    engine, before = _stored_before(database_url, "0011")
    stored_ids = sorted(row[1] for row in before["call_records"])

    def keys() -> list[tuple[str, bytes]]:
        with engine.connect() as conn:
            found = conn.execute(sa.text("SELECT call_id, digest FROM call_record_keys"))
            return sorted((c, bytes(d)) for c, d in found)

    assert keys() == ([(c, bytes(32)) for c in stored_ids] if postgres else [])
    settings = Settings()
    fresh = record()
    candidates = convert.prepare(
        [published(record(stored_ids[0])), published(fresh)],
        {OPERATOR},
        settings,
        rules.thresholds(settings),
    )
    database = Database(database_url, threads=1)
    try:
        if postgres:
            now = dt.datetime.now(dt.UTC)
            database.transaction(partitions.create_ahead, partitions.RECORDS, now, 0, write=True)
        (stored,) = database.transaction(
            storage.publish_many,
            [[c for c in candidates if isinstance(c, rules.Candidate)]],
            convert.publish_time_field,
            convert.stored,
            write=True,
        )
    finally:
        database.close()
    assert [(r.outcome, r.refusal and r.refusal.reason) for r in stored.results] == [
        (Outcome.REFUSED, "CALL_ID_CONFLICT"),
        (Outcome.ACCEPTED, None),
    ]
    after = _contents(engine)
    assert sorted(row[1] for row in after["call_records"]) == sorted([*stored_ids, fresh.call_id])
    _migrate(database_url, "0011", down=True)
    assert _contents(engine) == after
    _migrate(database_url, "head")
    assert _contents(engine) == after
    assert [c for c, _ in keys()] == (sorted([*stored_ids, fresh.call_id]) if postgres else [])
    engine.dispose()


# --- migration 0014 and the platform's calls' keys -----------------------------------------


def test_platform_calls_stored_before_their_keys_keep_their_keys(database_url: str) -> None:
    """On both backends every row stored before 0014 is kept (down to 0013 and up again too);
    on PostgreSQL their keys fill `usage_platform_call_keys` (SQLite's stays empty); ingest
    finds the calls stored before by their ids, the feed keeps one delivered again once, and
    the look-up of the operator's records of those calls finds the records stored before."""
    postgres = database_url.startswith("postgresql")
    engine, before = _stored_before(database_url, "0013")

    def keys() -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT call_id, operator_id FROM usage_platform_call_keys")
            )
            return sorted(tuple(row) for row in found)

    stored = [(f"call-{days}", OPERATOR) for days in (10, 200)]
    assert keys() == (sorted(stored) if postgres else [])
    calls = [call_id for call_id, _ in stored]
    database = Database(database_url, threads=1)
    try:
        platform = database.transaction(usage_days._platform, OPERATOR, [*calls, "call-new"])
        assert sorted(row[0] for row in platform) == calls
        assert database.transaction(usage_days._platform, "another-operator", calls) == []
        asked = [(OPERATOR, c) for c in [*calls, "call-new"]]
        reported = database.transaction(
            usage_days._reported, [*asked, ("another-operator", calls[0])]
        )
        assert sorted((row[1], row[0]) for row in reported) == stored
        (row,) = [r for r in before["usage_platform_calls"] if r[0] == "call-10"]
        again = PlatformCall("call-10", OPERATOR, "t", "inbound", usage_time(row[4]), None, 0)
        new = database.transaction(
            platform_calls.store_platform_calls, "records", [again], "", write=True
        )
        assert new == 0
    finally:
        database.close()
    assert _contents(engine) == before
    _migrate(database_url, "0013", down=True)
    assert _contents(engine) == before
    _migrate(database_url, "head")
    assert _contents(engine) == before
    assert keys() == (sorted(stored) if postgres else [])
    engine.dispose()


def usage_time(value: Any) -> dt.datetime:
    """A time as read back by SQL (SQLite: naive text or datetime), made aware UTC."""
    moment: dt.datetime = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _platform_call(call_id: str, invite: dt.datetime) -> PlatformCall:
    return PlatformCall(call_id, OPERATOR, "t", "inbound", invite, invite, 60_000)


def _platform_keys(session: sa.orm.Session) -> list[str]:
    k = usage_tables.PLATFORM_CALL_KEYS.c
    return sorted(session.execute(sa.select(k.call_id).where(k.operator_id == OPERATOR)).scalars())


@pytest.mark.postgres
def test_dropping_a_platform_calls_partition_forgets_their_keys(
    pg_system: RunningSystem,
) -> None:
    """The keys of the calls in a dropped `usage_platform_calls` partition go with it (same
    transaction), and so do those of the calls the chunked delete takes; the others stay, and
    the feed still keeps each of those once."""
    now = dt.datetime.now(dt.UTC)
    old = _platform_call("call-old", now - dt.timedelta(days=20))
    recent = _platform_call("call-recent", now - dt.timedelta(hours=1))
    store = platform_calls.store_platform_calls
    assert _run(pg_system, store, "test", [old, recent], "") == 2
    assert _run(pg_system, _platform_keys) == ["call-old", "call-recent"]
    cutoff = partitions.period_start(now - dt.timedelta(days=10), partitions.Period.WEEK)
    dropped = _drop_past(pg_system, partitions.PLATFORM_CALLS, cutoff)
    assert dropped, "the old call's week is wholly before the cutoff"
    assert _run(pg_system, _platform_keys) == ["call-recent"]
    assert _run(pg_system, store, "test", [recent], "") == 0  # still kept: once
    # The chunked delete of the partition straddling the cutoff takes the keys of its rows.
    purged = _run(pg_system, platform_calls.purge_platform_calls, now - dt.timedelta(minutes=30))
    assert purged == 1
    assert _run(pg_system, _platform_keys) == []


@pytest.mark.postgres
def test_two_feed_writers_of_one_call_keep_it_once(pg_system: RunningSystem) -> None:
    """Two writers of the feed (two replicas) store one call at the same moment, one with
    another invite time (another week's partition: no key of `usage_platform_calls` sees
    both): the keys table's primary key keeps it once, and it is counted once."""
    url = pg_system.runtime.settings.database_url
    now = dt.datetime.now(dt.UTC)
    first = _platform_call("call-twice", now - dt.timedelta(hours=1))
    second = _platform_call("call-twice", now - dt.timedelta(days=10))
    held = _Held(
        url,
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || :kind || :op))",
        {"kind": usage_tables.PAIRING, "op": OPERATOR},
    )
    replicas = [Database(url, threads=1), Database(url, threads=1)]
    store = platform_calls.store_platform_calls
    try:
        one, two = _together(
            held,
            lambda: replicas[0].transaction(store, "records", [first], "a", write=True),
            lambda: replicas[1].transaction(store, "records", [second], "b", write=True),
        )
    finally:
        for replica in replicas:
            replica.close()
    assert sorted([one, two]) == [0, 1]

    def rows(session: sa.orm.Session) -> list[str]:
        c = usage_tables.PLATFORM_CALLS.c
        return list(
            session.execute(sa.select(c.call_id).where(c.call_id == "call-twice")).scalars()
        )

    def counted(session: sa.orm.Session) -> int:
        d = usage_tables.USAGE_DAYS.c
        query = sa.select(sa.func.sum(d.calls)).where(d.operator_id == OPERATOR)
        return int(session.scalar(query) or 0)

    assert _run(pg_system, rows) == ["call-twice"]
    assert _run(pg_system, _platform_keys) == ["call-twice"]
    assert _run(pg_system, counted) == 1


@pytest.mark.postgres
def test_a_feed_unit_waiting_for_a_claimed_call_holds_no_operators_lock(
    pg_system: RunningSystem,
) -> None:
    """A feed unit whose call's key another writer has claimed and not committed (another
    replica storing the same call) waits for that writer before it takes the operators' locks
    (PAIRING, `usage_tables.operators_lock`, taken after its own keys and rows): the operator's
    submissions are stored meanwhile; once the claim commits, the unit finds the call kept."""
    url = pg_system.runtime.settings.database_url
    call = _platform_call("call-claimed", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    held = _Held(
        url,
        "INSERT INTO usage_platform_call_keys (call_id, operator_id, invite_time)"
        " VALUES (:c, :op, :t)",
        {"c": call.call_id, "op": OPERATOR, "t": call.invite_time},
    )
    replica = Database(url, threads=1)
    stored: list[int] = []
    answers: list[Any] = []
    store = platform_calls.store_platform_calls
    feed = threading.Thread(
        target=lambda: stored.append(replica.transaction(store, "records", [call], "a", write=True))
    )
    submitting = threading.Thread(
        target=lambda: answers.append(submit(usage_stub(pg_system), [duration_record()]))
    )
    try:
        feed.start()
        eventually(lambda: held.waiting() >= 1, timeout=20)
        submitting.start()
        eventually(lambda: bool(answers), timeout=20)  # not behind the waiting feed unit
        assert not stored, "still waiting for the claim"
    finally:
        held.release()
        feed.join(30)
        submitting.join(30)
        replica.close()
    ((answer,),) = answers
    assert [r.outcome for r in answer.results] == [usage_pb2.CALL_DURATION_OUTCOME_ACCEPTED]
    assert stored == [0]  # kept by the claim's writer


@pytest.mark.postgres
def test_a_feed_unit_never_waits_for_a_submissions_checks(pg_system: RunningSystem) -> None:
    """A submission holds its operator's SUBMISSIONS lock for its whole unit (its duplicate
    checks); the feed's unit takes only PAIRING locks: held here, the first does not keep a
    feed unit carrying a call of that operator waiting."""
    url = pg_system.runtime.settings.database_url
    call = _platform_call("call-meanwhile", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    held = _Held(
        url,
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || :kind || :op))",
        {"kind": usage_tables.SUBMISSIONS, "op": OPERATOR},
    )
    replica = Database(url, threads=1)
    stored: list[int] = []
    store = platform_calls.store_platform_calls
    feed = threading.Thread(
        target=lambda: stored.append(replica.transaction(store, "records", [call], "a", write=True))
    )
    try:
        feed.start()
        eventually(lambda: bool(stored), timeout=20)
    finally:
        held.release()
        feed.join(30)
        replica.close()
    assert stored == [1]


@pytest.mark.postgres
def test_the_operators_lock_of_one_schema_never_waits_for_another_schema(
    postgres_url: str,
) -> None:
    """The usage service's per-operator lock names the schema: a writer of the same operator
    in another schema (another deployment on the server; the tests' and benches' schemas)
    holding its lock does not make this one wait."""
    other = reset_postgres(POSTGRES_URL)
    mine = Database(postgres_url, threads=1)
    theirs = Database(other, threads=1)

    def lock(session: sa.orm.Session) -> None:
        session.execute(sa.text("SET LOCAL lock_timeout = '5s'"))  # a failure, not a hang
        for kind in (usage_tables.SUBMISSIONS, usage_tables.PAIRING):
            driver_fetch_all(
                session, usage_tables.operators_lock(session, [OPERATOR, "op-x"], kind)
            )

    try:
        with sa.orm.Session(theirs.engine) as session, session.begin():
            for kind in (usage_tables.SUBMISSIONS, usage_tables.PAIRING):  # held until rolled back
                driver_fetch_all(session, usage_tables.operators_lock(session, [OPERATOR], kind))
            mine.transaction(lock, write=True)
            session.rollback()
    finally:
        mine.close()
        theirs.close()
