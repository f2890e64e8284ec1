"""Ingest: operators' call-duration records stored (`SubmitCallDurations`), and forgotten after
the retention. Each function takes a `Session` inside a transaction (run it with
`Database.run`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, delete
from sqlalchemy.orm import Session

from plumbing.db import driver_fetch_all, driver_insert_many, driver_time
from plumbing.direction import Direction
from plumbing.validation import Outcome, Refusal
from services.usage.rules import Reported, Result, Submitted
from services.usage.tables import CHUNK, DURATION_KEYS, DURATIONS, SUBMISSIONS, operators_lock
from services.usage.usage_days import count_reported

COLUMNS = (
    "operator_id",
    "record_id",
    "call_id",
    "tenant_id",
    "caller",
    "callee",
    "direction",
    "start_time",
    "end_time",
    "duration_us",
    "digest",
    "submitted_at",
)


def _select_stored(column: Literal["record_id", "call_id"], count: int) -> str:
    """SQLite: the operator's records whose `column` is among `count` values."""
    marks = ",".join("?" * count)
    return (
        "SELECT record_id, call_id, digest FROM call_durations"  # noqa: S608 - fixed column
        f" WHERE operator_id = ? AND {column} IN ({marks})"
    )


def _select_keys(column: Literal["record_id", "call_id"]) -> str:
    """PostgreSQL: the operator's records whose `column` is in an array, from their keys (one
    index probe per value; `call_durations` would take one per partition). One statement for a
    whole batch, its text the same every time (psycopg parses it once)."""
    return (
        "SELECT record_id, call_id, digest FROM call_duration_keys"  # noqa: S608 - fixed column
        f" WHERE operator_id = ? AND {column} = ANY(CAST(? AS text[]))"
    )


def _look_ups(
    session: Session, operator_id: str, column: Literal["record_id", "call_id"], values: list[str]
) -> list[tuple[str, list[Any]]]:
    """The statements that find (record_id, call_id, digest) of the operator's records whose
    `column` is in `values`: on PostgreSQL one (never prepared, see `driver_fetch`), on SQLite
    one per CHUNK."""
    if session.get_bind().dialect.name == "postgresql":
        return [(_select_keys(column), [operator_id, values])]
    return [
        (_select_stored(column, len(chunk)), [operator_id, *chunk])
        for chunk in (values[first : first + CHUNK] for first in range(0, len(values), CHUNK))
    ]


_CONFLICT = Refusal(
    "RECORD_ID_CONFLICT",
    "record_id",
    "a record with this record_id and other content is stored; records are immutable",
)
_REPORTED = Refusal("CALL_ALREADY_REPORTED", "call_id", "another of your records reports this call")
_US = dt.timedelta(microseconds=1)
_WAY = {direction: direction.value for direction in Direction}  # a dict: faster than .value
KEY_COLUMNS = ("operator_id", "record_id", "call_id", "digest", "start_time")  # PostgreSQL


def submit(session: Session, operator_id: str, submitted: Sequence[Submitted]) -> list[Result]:
    """Store checked records in order, as if submitted one by one: a record_id already stored
    (or earlier in the batch) is a duplicate with the same digest and a conflict with another;
    a call_id another record of the operator reports is CALL_ALREADY_REPORTED.

    The ingest hot path: the look-ups (one per key, each on its index) and the insert run on
    the driver (plumbing.db). On PostgreSQL the look-ups read `call_duration_keys` (an array
    each), and each record's keys are written there with it (binary COPY, as the records), the
    database enforcing them; the operator's submissions are serialized by a transaction-scoped
    advisory lock (`tables.operators_lock`, SUBMISSIONS), so concurrent streams of one operator
    see each other's commits (SQLite has one writer) and answer CALL_ALREADY_REPORTED rather
    than meet the constraint. The lock and the two look-ups after it go in one pipeline: one
    round trip. The pairing with the platform's calls (`count_reported`) takes its own lock.
    """
    if not submitted:
        return []
    by_record: dict[str, tuple[bytes, str]] = {}
    by_call: dict[str, str] = {}
    lock = operators_lock(session, [operator_id], SUBMISSIONS)
    look_ups = [
        *lock,
        *_look_ups(session, operator_id, "record_id", [s.record.record_id for s in submitted]),
        *_look_ups(session, operator_id, "call_id", [s.record.call_id for s in submitted]),
    ]
    found = driver_fetch_all(session, look_ups, prepare=False)[len(lock) :]
    for record_id, call_id, digest in (row for rows in found for row in rows):
        by_record[record_id] = (bytes(digest), call_id)
        by_call[call_id] = record_id
    time_of = driver_time(session)
    now = time_of(dt.datetime.now(dt.UTC))
    postgres = session.get_bind().dialect.name == "postgresql"
    rows: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    results: list[Result] = []
    accepted: list[Reported] = []
    for item in submitted:
        record = item.record
        record_id, call_id = record.record_id, record.call_id
        seen = by_record.get(record_id)
        if seen is not None:
            if seen[0] == item.digest:
                results.append(Result(record_id, Outcome.DUPLICATE))
            else:
                results.append(Result(record_id, Outcome.REFUSED, _CONFLICT))
            continue
        if call_id in by_call:
            results.append(Result(record_id, Outcome.REFUSED, _REPORTED))
            continue
        start, end, duration, direction = (
            record.start_time,
            record.end_time,
            record.duration,
            record.direction,
        )
        if start is None or end is None or duration is None or direction is None:
            raise ValueError("submit() stores checked records only")
        by_record[record_id] = (item.digest, call_id)
        by_call[call_id] = record_id
        tenant, way, duration_us = record.tenant_id.lower(), _WAY[direction], duration // _US
        start_value = time_of(start)
        rows.append(
            (
                operator_id,
                record_id,
                call_id,
                tenant,
                record.caller,
                record.callee,
                way,
                start_value,
                time_of(end),
                duration_us,
                item.digest,
                now,
            )
        )
        if postgres:
            keys.append((operator_id, record_id, call_id, item.digest, start_value))
        results.append(Result(record_id, Outcome.ACCEPTED))
        accepted.append(Reported(call_id, tenant, start, way, duration_us))
    if rows:
        if keys:
            driver_insert_many(session, DURATION_KEYS, KEY_COLUMNS, keys)
        driver_insert_many(session, DURATIONS, COLUMNS, rows)
        count_reported(session, operator_id, accepted)
    return results


def purge_durations(session: Session, older_than: dt.datetime) -> int:
    """Delete records of calls that started before the retention (and, on PostgreSQL, their
    keys, in the same transaction)."""
    result = cast(
        CursorResult[Any],
        session.execute(delete(DURATIONS).where(DURATIONS.c.start_time < older_than)),
    )
    if session.get_bind().dialect.name == "postgresql":
        session.execute(delete(DURATION_KEYS).where(DURATION_KEYS.c.start_time < older_than))
    return result.rowcount


# Every statement this module writes by hand (an IN list with one item) on each backend, as
# tests/test_sql.py checks them against the tables, each on its own backend (the insert is
# `driver_insert_many`'s, made from the table's own columns).
SQL = {
    "sqlite": (_select_stored("record_id", 1), _select_stored("call_id", 1)),
    "postgresql": (_select_keys("record_id"), _select_keys("call_id")),
}
