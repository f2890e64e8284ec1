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

from plumbing.db import driver_execute_many, driver_fetch, driver_time
from plumbing.validation import Outcome, Refusal
from services.usage.rules import Reported, Result, Submitted
from services.usage.tables import CHUNK, DURATIONS, lock_operators
from services.usage.usage_days import count_reported


def _refused(record_id: str, reason: str, field: str, message: str) -> Result:
    return Result(record_id, Outcome.REFUSED, Refusal(reason, field, message))


_INSERT = (
    "INSERT INTO call_durations (operator_id, record_id, call_id, tenant_id, caller, callee,"
    " direction, start_time, end_time, duration_us, digest, submitted_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _select_stored(column: Literal["record_id", "call_id"], count: int) -> str:
    """The operator's records whose `column` is among `count` values."""
    marks = ",".join("?" * count)
    return (
        "SELECT record_id, call_id, digest FROM call_durations"  # noqa: S608 - fixed column
        f" WHERE operator_id = ? AND {column} IN ({marks})"
    )


def _stored(
    session: Session, operator_id: str, column: Literal["record_id", "call_id"], values: list[str]
) -> list[tuple[Any, ...]]:
    """(record_id, call_id, digest) of the operator's records whose `column` is in `values`."""
    found: list[tuple[Any, ...]] = []
    for first in range(0, len(values), CHUNK):
        chunk = values[first : first + CHUNK]
        found += driver_fetch(
            session, _select_stored(column, len(chunk)), [operator_id, *chunk], prepare=False
        )
    return found


def submit(session: Session, operator_id: str, submitted: Sequence[Submitted]) -> list[Result]:
    """Store checked records in order, as if submitted one by one: a record_id already stored
    (or earlier in the batch) is a duplicate with the same digest and a conflict with another;
    a call_id another record of the operator reports is CALL_ALREADY_REPORTED.

    The ingest hot path: the look-ups (one per key, each on its index) and the insert run on
    the driver (plumbing.db). On PostgreSQL the operator's submissions are serialized by a
    transaction-scoped advisory lock, so concurrent streams of one operator see each other's
    commits (SQLite has one writer).
    """
    if not submitted:
        return []
    lock_operators(session, [operator_id])
    by_record: dict[str, tuple[bytes, str]] = {}
    by_call: dict[str, str] = {}
    found = _stored(session, operator_id, "record_id", [s.record.record_id for s in submitted])
    found += _stored(session, operator_id, "call_id", [s.record.call_id for s in submitted])
    for record_id, call_id, digest in found:
        by_record[record_id] = (bytes(digest), call_id)
        by_call[call_id] = record_id
    time_of = driver_time(session)
    now = time_of(dt.datetime.now(dt.UTC))
    rows: list[tuple[Any, ...]] = []
    results: list[Result] = []
    accepted: list[Reported] = []
    for item in submitted:
        record = item.record
        seen = by_record.get(record.record_id)
        if seen is not None:
            if seen[0] == item.digest:
                results.append(Result(record.record_id, Outcome.DUPLICATE))
            else:
                results.append(
                    _refused(
                        record.record_id,
                        "RECORD_ID_CONFLICT",
                        "record_id",
                        "a record with this record_id and other content is stored; records are"
                        " immutable",
                    )
                )
            continue
        if record.call_id in by_call:
            results.append(
                _refused(
                    record.record_id,
                    "CALL_ALREADY_REPORTED",
                    "call_id",
                    "another of your records reports this call",
                )
            )
            continue
        start, end, duration, direction = (
            record.start_time,
            record.end_time,
            record.duration,
            record.direction,
        )
        if start is None or end is None or duration is None or direction is None:
            raise ValueError("submit() stores checked records only")
        by_record[record.record_id] = (item.digest, record.call_id)
        by_call[record.call_id] = record.record_id
        rows.append(
            (
                operator_id,
                record.record_id,
                record.call_id,
                record.tenant_id.lower(),
                record.caller,
                record.callee,
                direction.value,
                time_of(start),
                time_of(end),
                duration // dt.timedelta(microseconds=1),
                item.digest,
                now,
            )
        )
        results.append(Result(record.record_id, Outcome.ACCEPTED))
        accepted.append(
            Reported(
                record.call_id,
                record.tenant_id.lower(),
                start,
                direction.value,
                duration // dt.timedelta(microseconds=1),
            )
        )
    if rows:
        driver_execute_many(session, _INSERT, rows)
        count_reported(session, operator_id, accepted)
    return results


def purge_durations(session: Session, older_than: dt.datetime) -> int:
    """Delete records of calls that started before the retention."""
    result = cast(
        CursorResult[Any],
        session.execute(delete(DURATIONS).where(DURATIONS.c.start_time < older_than)),
    )
    return result.rowcount


# Every statement this module writes by hand (an IN list with one item), as
# tests/test_sql.py checks them against the tables.
SQL = (_INSERT, _select_stored("record_id", 1), _select_stored("call_id", 1))
