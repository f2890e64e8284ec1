"""Time partitions on PostgreSQL (plumbing/partitions.py): made at start-up and ahead, retention
by dropping whole partitions (cursors into them expire, cursors after them resume without a
gap), a row with no partition refused without a crash, uniqueness kept by the writers' locks
under concurrent writers, every row kept across migrations 0008 and 0009, and the duration
records' keys (0009) kept in step with their partitions."""

from __future__ import annotations

import datetime as dt
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
from plumbing.db import Database, alembic_config
from plumbing.direction import Direction
from plumbing.validation import Outcome
from services.records import convert, rules, storage
from services.records.rules import LOG
from services.usage import ingest
from services.usage import tables as usage_tables
from services.usage.rules import DurationRecord, Submitted
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
    for attempt in range(1, partitions.TRIES + 1):  # as maintenance does, on a shared server
        try:
            dropped = _run(pg_system, partitions.drop_past, partitions.CALL_DURATIONS, cutoff)
            break
        except sa.exc.OperationalError:
            if attempt == partitions.TRIES:
                raise
            time.sleep(partitions.RETRY_S)
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


# Columns later migrations add (0008: the media streams' publish time; 0012: the emergency
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


def test_records_stored_before_the_duration_keys_keep_their_keys(database_url: str) -> None:
    """On both backends every row stored before 0009 is kept (down to 0008 and up again too);
    on PostgreSQL their keys fill `call_duration_keys` (SQLite's stays empty), and ingest
    answers the records stored before as stored: the same record a duplicate, other content
    a conflict, another record of one of their calls CALL_ALREADY_REPORTED."""
    postgres = database_url.startswith("postgresql")
    engine = sa.create_engine(database_url)
    _migrate(database_url, "0007")
    _rows_at_0007(database_url)
    _migrate(database_url, "0008")
    before = _contents(engine)
    _migrate(database_url, "head")
    assert _contents(engine) == before

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
