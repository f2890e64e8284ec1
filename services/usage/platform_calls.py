"""The platform's side of every call, as the records feed delivers it (`feed.py`), kept with the
feed's cursor, and forgotten after the retention.

The feed's hot path: every statement runs on the driver (plumbing.db), as ingest's do; a unit of
1,000 calls through SQLAlchemy's multi-row INSERT compile took about 38 ms on SQLite.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, delete
from sqlalchemy.orm import Session

from plumbing.db import (
    dialect_name,
    driver_execute_many,
    driver_fetch,
    driver_insert_many,
    driver_time,
)
from services.usage.rules import PlatformCall
from services.usage.tables import (
    CHUNK,
    PLATFORM_CALL_KEYS,
    PLATFORM_CALLS,
    lock_operators,
)
from services.usage.usage_days import count_platform

COLUMNS = (
    "call_id",
    "operator_id",
    "tenant_id",
    "direction",
    "invite_time",
    "answer_time",
    "duration_ms",
)
_SELECT_CURSOR = "SELECT cursor FROM usage_feed_cursors WHERE feed = ?"
_SAVE_CURSOR = (
    "INSERT INTO usage_feed_cursors (feed, cursor) VALUES (?, ?)"
    " ON CONFLICT (feed) DO UPDATE SET cursor = excluded.cursor"
)
# PostgreSQL: the calls' keys, those not kept yet (the database decides, by the primary key:
# also against a concurrent writer of the same call, whose commit it waits for).
_INSERT_KEYS = (
    "INSERT INTO usage_platform_call_keys (call_id, operator_id, invite_time)"
    " SELECT * FROM unnest(CAST(? AS text[]), CAST(? AS text[]), CAST(? AS timestamptz[]))"
    " ON CONFLICT (call_id) DO NOTHING RETURNING call_id"
)


def _select_kept(count: int) -> str:
    """SQLite: which of `count` call ids are kept already."""
    marks = ",".join("?" * count)
    return f"SELECT call_id FROM usage_platform_calls WHERE call_id IN ({marks})"  # noqa: S608


def feed_cursor(session: Session, feed: str) -> str:
    """The saved cursor of a feed; empty when it was never followed."""
    found = driver_fetch(session, _SELECT_CURSOR, [feed])
    return str(found[0][0]) if found else ""


def _new_calls(session: Session, calls: Sequence[PlatformCall]) -> list[PlatformCall]:
    """The calls not kept yet, each once (the first of a call given twice), in order; on
    PostgreSQL their keys are written (see `_INSERT_KEYS`)."""
    first: dict[str, PlatformCall] = {}
    for call in calls:
        first.setdefault(call.call_id, call)
    if dialect_name(session) == "postgresql":
        keys = list(first.values())
        added = driver_fetch(
            session,
            _INSERT_KEYS,
            [
                [c.call_id for c in keys],
                [c.operator_id for c in keys],
                [c.invite_time for c in keys],
            ],
        )
        new = {row[0] for row in added}
    else:
        ids = list(first)
        kept: set[str] = set()
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            kept.update(row[0] for row in driver_fetch(session, _select_kept(len(chunk)), chunk))
        new = set(ids) - kept
    return [call for call_id, call in first.items() if call_id in new]


def store_platform_calls(
    session: Session, feed: str, calls: Sequence[PlatformCall], cursor: str
) -> int:
    """Keep the calls (each once: a call delivered again is ignored) and the feed's cursor, in
    one transaction, so a restart resumes exactly after what was kept; the usage by day counts
    the new ones. Returns how many were new.

    On PostgreSQL the keys go first (`usage_platform_call_keys`, one statement over arrays,
    answering which are new) and the new rows by binary COPY; on SQLite (one writer) a look-up
    of the ids kept, then executemany."""
    if calls:
        lock_operators(session, [c.operator_id for c in calls])
        new = _new_calls(session, calls)
    else:
        new = []
    if new:
        time_of = driver_time(session)
        rows = [
            (
                c.call_id,
                c.operator_id,
                c.tenant_id,
                c.direction,
                time_of(c.invite_time),
                time_of(c.answer_time),
                c.duration_ms,
            )
            for c in new
        ]
        driver_insert_many(session, PLATFORM_CALLS, COLUMNS, rows)
        count_platform(session, new)
    driver_execute_many(session, _SAVE_CURSOR, [(feed, cursor)])
    return len(new)


def purge_platform_calls(session: Session, older_than: dt.datetime) -> int:
    """Forget calls set up before the retention (and, on PostgreSQL, their keys, in the same
    transaction)."""
    result = session.execute(
        delete(PLATFORM_CALLS).where(PLATFORM_CALLS.c.invite_time < older_than)
    )
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            delete(PLATFORM_CALL_KEYS).where(PLATFORM_CALL_KEYS.c.invite_time < older_than)
        )
    return cast(CursorResult[Any], result).rowcount


# Every statement this module writes by hand (an IN list with one item) on each backend, as
# tests/test_sql.py checks them against the tables, each on its own backend (the insert of the
# rows is `driver_insert_many`'s, made from the table's own columns).
SQL = {
    "sqlite": (_SELECT_CURSOR, _SAVE_CURSOR, _select_kept(1)),
    "postgresql": (_SELECT_CURSOR, _SAVE_CURSOR, _INSERT_KEYS),
}
