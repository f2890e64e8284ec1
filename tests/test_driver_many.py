"""Many rows on the driver. Written (`plumbing.db.driver_insert_many`, `driver_execute_many`):
on SQLite an INSERT (or upsert) goes many rows a statement, and stores exactly what
executemany of the one-row statement stores (rows, their order, conflicts, at and past the
statements' bounds, no rows); on PostgreSQL (COPY, psycopg's executemany) the same outcome.
Read (`driver_fetch_rows`): on SQLite a page joined into one row by SQLite gives the rows the
driver reads."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest
from sqlalchemy import Table
from sqlalchemy.orm import Session

from plumbing import db as db_module
from plumbing.audit import AuditEventRow
from plumbing.db import (
    Database,
    driver_execute_many,
    driver_fetch,
    driver_fetch_rows,
    driver_insert_many,
    driver_time,
    insert_sql,
    rows_sql,
    unit_of,
)
from services.records.storage import RECORD_COLUMNS, RECORDS
from services.usage import usage_days

# Row counts around the statements' bound (4 here): none, one, under, at, one past, two, ...
COUNTS = (0, 1, 2, 3, 4, 5, 7, 8, 9, 13)
ROWS_PER_STATEMENT = 4
AUDIT = cast(Table, AuditEventRow.__table__)
AUDIT_COLUMNS = (
    *("at", "principal", "method", "filters", "record_count", "duration_ms", "status"),
    "request_id",
)
HEADS_DO_NOTHING = (
    "INSERT INTO change_log_heads (log, position, purged_through) VALUES (?, ?, ?)"
    " ON CONFLICT (log) DO NOTHING"
)


@pytest.fixture(autouse=True)
def small_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statements of 4 rows at most, so that a few rows cross their bounds."""
    monkeypatch.setattr(db_module, "ROWS_PER_STATEMENT", ROWS_PER_STATEMENT)


def _executemany(session: Session, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """The reference: the driver's own executemany of the one-row statement."""
    unit = unit_of(session)
    cursor = unit.connection.cursor()
    try:
        cursor.executemany(unit._sql(sql), rows)
    finally:
        cursor.close()


def _written(
    db: Database,
    write: Callable[[Session], None],
    read: str,
    clear: str,
) -> list[tuple[Any, ...]]:
    """What `read` gives after `write`, in a table emptied by `clear` first (one transaction)."""

    def unit(session: Session) -> list[tuple[Any, ...]]:
        driver_fetch(session, clear, [])
        write(session)
        return [tuple(row) for row in driver_fetch(session, read, [])]

    return db.transaction(unit, write=True)


def _audit_rows(session: Session, count: int) -> list[tuple[Any, ...]]:
    at = driver_time(session)(dt.datetime.now(dt.UTC).replace(microsecond=0))
    return [(at, f"p{i % 3}", "m", "{}", i, i / 4, "OK", f"r{i}") for i in range(count)]


@pytest.mark.parametrize("count", COUNTS)
def test_an_insert_stores_the_rows_executemany_stores_in_its_order(
    db: Database, count: int
) -> None:
    read = "SELECT principal, record_count, duration_ms, request_id FROM audit_events ORDER BY id"
    clear = "DELETE FROM audit_events"
    sql = insert_sql(AUDIT, AUDIT_COLUMNS)

    def reference(session: Session) -> None:
        _executemany(session, sql, _audit_rows(session, count))

    def ours(session: Session) -> None:
        driver_insert_many(session, AUDIT, AUDIT_COLUMNS, _audit_rows(session, count))

    expected = _written(db, reference, read, clear)
    assert len(expected) == count
    assert _written(db, ours, read, clear) == expected
    # The same statement through driver_execute_many.
    many = _written(db, lambda s: driver_execute_many(s, sql, _audit_rows(s, count)), read, clear)
    assert many == expected


@pytest.mark.parametrize("count", COUNTS)
def test_a_key_given_twice_meets_its_first_row_as_in_executemany(db: Database, count: int) -> None:
    """ON CONFLICT DO NOTHING: the first row of a key stays, in one statement as across two."""
    read = "SELECT log, position, purged_through FROM change_log_heads ORDER BY log"
    clear = "DELETE FROM change_log_heads"
    # Every third row repeats the key of the row before it (inside a statement and across the
    # bound of one), with other values.
    rows = [(f"log-{i - (i % 3 == 2)}", i, 0) for i in range(count)]

    expected = _written(db, lambda s: _executemany(s, HEADS_DO_NOTHING, rows), read, clear)
    assert _written(db, lambda s: driver_execute_many(s, HEADS_DO_NOTHING, rows), read, clear) == (
        expected
    )


@pytest.mark.parametrize("count", COUNTS)
def test_an_upsert_adds_as_executemany_does(db: Database, count: int) -> None:
    """ON CONFLICT DO UPDATE (the usage by day's): on SQLite a key given twice in one call is
    added to twice, as by executemany (PostgreSQL's own statement takes each key once)."""
    if db.is_postgres:
        pytest.skip("PostgreSQL adds the usage by day over arrays, a key once (usage_days)")
    read = "SELECT tenant_id, day, calls, billed_s FROM usage_daily ORDER BY tenant_id, day"
    clear = "DELETE FROM usage_daily"
    rows = [("op-a", f"t{i % 5}", "2026-11-02", "inbound", "platform", 1, i) for i in range(count)]

    expected = _written(db, lambda s: _executemany(s, usage_days._ADD_USAGE, rows), read, clear)
    assert sum(row[2] for row in expected) == count
    ours = _written(db, lambda s: driver_execute_many(s, usage_days._ADD_USAGE, rows), read, clear)
    assert ours == expected


def test_sqlite_sends_many_rows_a_statement_of_a_few_sizes(db: Database) -> None:
    """13 rows go as 4, 4, 4 and 1, then 7 as 4, 2 and 1 (not a statement a row: pysqlite lets
    go of the GIL around each)."""
    if db.is_postgres:
        pytest.skip("SQLite's")
    sent: list[str] = []

    def traced(session: Session) -> None:
        connection = unit_of(session).connection
        connection.set_trace_callback(sent.append)
        try:
            driver_insert_many(session, AUDIT, AUDIT_COLUMNS, _audit_rows(session, 13))
            driver_insert_many(session, AUDIT, AUDIT_COLUMNS, _audit_rows(session, 7))
        finally:
            connection.set_trace_callback(None)

    db.transaction(traced, write=True)
    # The statements as SQLite ran them (their values written in): rows by their status.
    assert [sql.count("'OK'") for sql in sent] == [4, 4, 4, 1, 4, 2, 1]


def test_sqlite_keeps_under_its_limit_of_variables(db: Database) -> None:
    """A statement never takes more values than SQLite allows (a build with a lower limit)."""
    if db.is_postgres:
        pytest.skip("SQLite's")
    width = len(AUDIT_COLUMNS)

    def insert(session: Session) -> int:
        connection: sqlite3.Connection = unit_of(session).connection
        old = connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 2 * width + 1)
        try:
            driver_insert_many(session, AUDIT, AUDIT_COLUMNS, _audit_rows(session, 9))
        finally:
            connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, old)
        return int(driver_fetch(session, "SELECT count(*) FROM audit_events", [])[0][0])

    assert db.transaction(insert, write=True) == 9


def test_the_row_counts_of_the_statements() -> None:
    counts = db_module._row_counts
    assert list(counts(0, 4)) == []
    assert list(counts(4, 4)) == [4]
    assert list(counts(5, 4)) == [4, 1]
    assert list(counts(13, 4)) == [4, 4, 4, 1]
    assert list(counts(255, 256)) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert list(counts(600, 256)) == [256, 256, 64, 16, 8]
    assert list(counts(7, 3)) == [3, 3, 1]


def test_statements_it_cannot_repeat_go_by_executemany() -> None:
    assert db_module._one_row("UPDATE t SET a = ? WHERE b = ?") is None
    assert db_module._one_row("INSERT INTO t (a) SELECT ? WHERE 1") is None
    upsert = "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO UPDATE SET b = ?"
    assert db_module._one_row(upsert) is None
    assert db_module._one_row("INSERT INTO t (a, b) VALUES (?, lower(?))") is None
    assert db_module._one_row("INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO NOTHING") == (
        "INSERT INTO t (a, b) VALUES ",
        "(?, ?)",
        " ON CONFLICT (a) DO NOTHING",
    )


def _records(session: Session, count: int) -> list[tuple[Any, ...]]:
    """`count` call records (their bodies of every length from empty, odd text among them)."""
    time_of = driver_time(session)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return [
        (
            *(i + 1, f"c-{i}", f"op-{i % 3}", "t", "inbound", "+14255550100"),
            'sip:"a,b"\\ü@example.com' if i % 2 else "+14255550101",
            *("trunk.example.com", time_of(now), None if i % 2 else time_of(now), time_of(now)),
            *(1000 * i, 200, "GOOD", bytes(32), time_of(now), bytes(range(i % 7)) * i),
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("count", [0, 1, 2, 9])
def test_rows_joined_by_sqlite_are_the_rows_the_driver_reads(db: Database, count: int) -> None:
    """`driver_fetch_rows` (on SQLite one row joined by SQLite, cut here) gives what the
    driver's own read of its SELECT gives: the rows in order, NULLs, text, the blobs."""
    columns = ("position", "call_id", "caller", "answer_time", "duration_ms")
    source = "FROM call_records WHERE position > ? ORDER BY position LIMIT ?"

    def read(session: Session) -> tuple[list[Any], list[Any], list[Any]]:
        driver_insert_many(session, RECORDS, RECORD_COLUMNS, _records(session, count))
        plain = driver_fetch(session, rows_sql(columns, source, "body"), [0, 5])
        joined = driver_fetch_rows(session, columns, source, [0, 5], blob="body")
        no_blob = driver_fetch_rows(session, columns, source, [0, 5])
        return plain, joined, no_blob

    plain, joined, no_blob = db.transaction(read, write=True)
    assert len(plain) == min(count, 5)
    assert [tuple(row) for row in plain] == joined
    assert [tuple(row[:-1]) for row in plain] == no_blob
    if count == 9:
        assert plain[-1][-1] == bytes(range(4)) * 4
