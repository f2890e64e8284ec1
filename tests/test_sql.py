"""Statements written by hand, checked against the tables as the migrations are (test_storage).

The hot paths run plain SQL on the driver (`plumbing.db.driver_fetch`, `driver_execute_many`,
`?` turned into `%s` for PostgreSQL), past SQLAlchemy's knowledge of the models. Each module
lists its statements in `SQL`; here each one is compiled by the database itself (EXPLAIN, through
the same driver call and rewriting) on a freshly migrated SQLite and PostgreSQL database, so an
unknown table or column fails here, and so does every one of its column names misspelt. The
records stream's query, assembled from its filters, is taken from a real call with every filter
on. The usage service's statements are also caught as its units of work run, so a statement
that is not listed fails too.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import exc
from sqlalchemy import text as sa_text
from sqlalchemy.orm import Session

from plumbing import changelog
from plumbing.db import (
    Base,
    Database,
    driver_execute_many,
    driver_fetch,
    driver_fetch_all,
    driver_insert_many,
)
from plumbing.direction import Direction
from services.numbers import storage as numbers_storage
from services.records import storage as records_storage
from services.records.rules import StreamFilter
from services.usage import ingest, platform_calls, tables, usage_days
from services.usage.rules import DurationRecord, PlatformCall, Submitted

TENANT = "11111111-1111-4111-8111-111111111111"
START = dt.datetime(2026, 11, 2, 10, tzinfo=dt.UTC)
COLUMNS = {column.name for table in Base.metadata.tables.values() for column in table.columns}


def records_stream_sql(db: Database) -> str:
    """The records stream's query with every filter on, as `read_records` sends it."""
    sent: list[str] = []

    def spy(session: Session, sql: str, params: Any) -> list[tuple[Any, ...]]:
        sent.append(sql)
        return driver_fetch(session, sql, params)

    selection = StreamFilter("op-a", TENANT, "+14255550100", poor_only=True, end_time=START)
    read = functools.partial(records_storage.read_records, selection=selection)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records_storage, "driver_fetch", spy)
        db.transaction(read, 0, 10, 5)
    (sql,) = sent
    return sql


def statements(db: Database) -> list[str]:
    backend = db.engine.dialect.name
    return [
        *ingest.SQL[backend],
        *usage_days.SQL[backend],
        *platform_calls.SQL[backend],
        *tables.SQL.get(backend, ()),
        *changelog.SQL,
        *records_storage.SQL,
        *records_storage.TAIL_SQL,
        *records_storage.FACTS_SQL,
        *(records_storage.POSTGRES_SQL if db.is_postgres else ()),
        *numbers_storage.SQL,
        *(numbers_storage.POSTGRES_SQL if db.is_postgres else ()),
        records_stream_sql(db),
    ]


def explain(db: Database, sql: str) -> None:
    """Have the database compile the statement (not run it), with NULL for every parameter."""
    db.transaction(driver_fetch, "EXPLAIN " + sql, [None] * sql.count("?"))


def test_every_hand_written_statement_names_only_what_the_tables_have(db: Database) -> None:
    for sql in statements(db):
        explain(db, sql)


def test_a_misspelt_column_in_any_of_them_fails(db: Database) -> None:
    for sql in statements(db):
        names = sorted(set(re.findall(r"\b\w+\b", sql)) & COLUMNS)
        assert names, sql
        for name in names:
            misspelt = re.sub(rf"\b{name}\b", name + "x", sql, count=1)
            with pytest.raises(Exception, match=f"(?i){name}x"):
                explain(db, misspelt)


def test_a_misspelt_table_fails(db: Database) -> None:
    for sql in statements(db):
        table = re.search(r"\b(?:FROM|INTO|UPDATE) (\w+)", sql)
        assert table is not None, sql
        misspelt = sql.replace(table[0], table[0] + "x", 1)
        with pytest.raises(Exception, match=f"(?i){table[1]}x"):
            explain(db, misspelt)


def _record(call_id: str) -> Submitted:
    duration = dt.timedelta(seconds=61)
    body = DurationRecord(
        f"rec-{call_id}",
        call_id,
        TENANT,
        "+14255550100",
        "+14255550101",
        Direction.INBOUND,
        START,
        START + duration,
        duration,
    )
    return Submitted(body, hashlib.sha256(call_id.encode()).digest())


def test_the_usage_units_of_work_send_only_listed_statements(db: Database) -> None:
    """Every statement ingest, the call feed's store, the operators' lock and the usage by day
    send to the driver is one of their `SQL` (an IN list of any length as the listed one of one
    item)."""
    sent: list[str] = []

    def spying(real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(session: Session, sql: str, params: Any, **options: Any) -> Any:
            sent.append(re.sub(r"IN \(\?(,\?)*\)", "IN (?)", sql))
            return real(session, sql, params, **options)

        return spy

    def spying_all(real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(session: Session, statements: Any, **options: Any) -> Any:
            sent.extend(re.sub(r"IN \(\?(,\?)*\)", "IN (?)", sql) for sql, _ in statements)
            return real(session, statements, **options)

        return spy

    def call(call_id: str) -> PlatformCall:
        return PlatformCall(call_id, "op-a", TENANT, "inbound", START, START, 60_000)

    with pytest.MonkeyPatch.context() as patch:
        for module in (ingest, usage_days, platform_calls, tables):
            for name in ("driver_fetch", "driver_execute_many"):
                if hasattr(module, name):
                    patch.setattr(module, name, spying(getattr(module, name)))
            if hasattr(module, "driver_fetch_all"):
                patch.setattr(module, "driver_fetch_all", spying_all(module.driver_fetch_all))
        # The platform's call first, then the operator's records of it and of another call,
        # then the platform's call of that other: every look-up of both writers runs.
        db.transaction(platform_calls.store_platform_calls, "f", [call("c-1")], "", write=True)
        db.transaction(ingest.submit, "op-a", [_record("c-1"), _record("c-2")], write=True)
        db.transaction(platform_calls.store_platform_calls, "f", [call("c-2")], "", write=True)
        assert db.transaction(platform_calls.feed_cursor, "f") == ""
    backend = db.engine.dialect.name
    listed = {
        *ingest.SQL[backend],
        *usage_days.SQL[backend],
        *platform_calls.SQL[backend],
        *tables.SQL.get(backend, ()),
    }
    assert set(sent) == listed


def test_the_drivers_own_errors_fail_a_unit_as_sqlalchemys_do(db: Database) -> None:
    """A statement on the driver that the database refuses raises SQLAlchemy's error (so the
    unit fails as any other: UNAVAILABLE for a lost database or a row with no partition),
    without the rows' values rendered as parameters."""
    heads = changelog.HEADS
    secret = "+14255550123"
    with pytest.raises(exc.IntegrityError) as twice:  # the unique log name
        db.transaction(
            driver_insert_many,
            heads,
            ("log", "position", "purged_through"),
            [(secret, 0, 0), (secret, 0, 0)],
            write=True,
        )
    assert "[parameters" not in str(twice.value)  # the rows are not rendered as parameters
    with pytest.raises(exc.ProgrammingError if db.is_postgres else exc.OperationalError):
        db.transaction(driver_execute_many, "INSERT INTO no_such_table VALUES (?)", [(1,)])
    with pytest.raises(exc.DBAPIError):
        db.transaction(driver_fetch, "SELECT no_such_column FROM change_log_heads", [])


def test_statements_sent_together_answer_each_its_rows_in_order(db: Database) -> None:
    """`driver_fetch_all` (one pipeline on PostgreSQL): each statement's rows, in order, a
    statement with none among them; in a Session's unit and in a driver `Unit` (whose BEGIN goes
    with the first); a failing statement fails the unit as `driver_fetch`'s does."""
    statements: list[tuple[str, list[Any]]] = [
        ("SELECT ? + 1", [1]),
        ("INSERT INTO usage_feed_cursors (feed, cursor) VALUES (?, ?)", ["f", "c"]),
        ("SELECT feed, cursor FROM usage_feed_cursors", []),
        ("SELECT ? || 'b'", ["a"]),
    ]
    if db.is_postgres:  # the parameters' types, which SQLite needs none of
        statements[0] = ("SELECT CAST(? AS int) + 1", [1])
        statements[3] = ("SELECT CAST(? AS text) || 'b'", ["a"])
    expected = [[(2,)], [], [("f", "c")], [("ab",)]]
    assert db.transaction(driver_fetch_all, statements, write=True) == expected
    statements[1] = (statements[1][0], ["g", "c"])
    expected[2] = [("f", "c"), ("g", "c")]
    assert db.unit_transaction(driver_fetch_all, statements, write=True) == expected
    assert db.transaction(driver_fetch_all, []) == []
    with pytest.raises(exc.DBAPIError):
        db.transaction(driver_fetch_all, [*statements[:1], ("SELECT nothing FROM nowhere", [])])


def test_the_look_ups_of_many_keys_are_never_prepared_on_postgresql(db: Database) -> None:
    """psycopg prepares a statement run 5 times; PostgreSQL may then keep a generic plan made
    while the partitions were small, and scan them whole as they grow. The duplicate look-ups
    of ingest and publish (IN lists on partitioned tables) are planned each time instead."""
    if not db.is_postgres:
        pytest.skip("server-side prepared statements are PostgreSQL's")
    one = Database(db.url, threads=1)  # one connection: its prepared statements are seen
    try:
        for n in range(8):  # past psycopg's prepare threshold
            ids = [f"c-{n}-{i}" for i in range(3)]
            one.transaction(ingest.submit, "op-a", [_record(i) for i in ids], write=True)
            one.transaction(usage_days._platform, "op-a", ids)
            one.transaction(usage_days._reported, [("op-a", i) for i in ids])
            one.transaction(changelog.read_head, "records")  # prepared: control
        with one.session(write=False) as session, session.begin():
            prepared = [
                str(row[0])
                for row in session.execute(sa_text("SELECT statement FROM pg_prepared_statements"))
            ]
    finally:
        one.close()
    assert [s for s in prepared if "change_log_heads" in s], prepared  # the control was
    assert not [s for s in prepared if "call_duration" in s], prepared
    assert not [s for s in prepared if "usage_platform_call" in s], prepared


def test_sqlites_look_ups_of_many_keys_search_by_those_keys(db: Database) -> None:
    """SQLite's hand-written look-ups of a batch's keys (`... IN (?, ...)`) find each by its
    key, never by reading an index of the operator's rows, at a batch's size (SQLite's planner
    chooses by the IN list's length): the look-up of the platform's calls
    went by the operator's answer-time index, reading every call of the operator for each batch
    submitted (a cost that grew with the table, until the one writer was saturated)."""
    if db.is_postgres:
        pytest.skip("PostgreSQL's look-ups of many keys go by arrays (the test above)")
    looked_up = {
        usage_days._select_platform(100): "call_id=?",
        usage_days._select_reported(100): "call_id=?",
        ingest._select_stored("record_id", 100): "record_id=?",
        ingest._select_stored("call_id", 100): "call_id=?",
        platform_calls._select_kept(100): "call_id=?",
    }
    for sql, key in looked_up.items():
        plan = " ".join(
            str(row[-1])
            for row in db.transaction(
                driver_fetch, "EXPLAIN QUERY PLAN " + sql, ["x"] * sql.count("?")
            )
        )
        assert plan.startswith("SEARCH") and key in plan, (sql, plan)
