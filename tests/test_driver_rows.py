"""Many rows read on the driver (`plumbing.db.driver_fetch_rows`): on SQLite a page joined
into one row by SQLite gives the rows the driver reads; on PostgreSQL the rows themselves."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy.orm import Session

from plumbing.db import (
    Database,
    driver_fetch,
    driver_fetch_rows,
    driver_insert_many,
    driver_time,
    rows_sql,
)
from services.records.storage import RECORD_COLUMNS, RECORDS


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
