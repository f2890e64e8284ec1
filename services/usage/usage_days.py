"""The usage by day (`usage_daily`), kept as calls arrive."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, delete
from sqlalchemy.orm import Session

from plumbing.db import driver_execute_many, driver_fetch, driver_fetch_all
from services.usage.rules import PlatformCall, Reported, Source
from services.usage.tables import CHUNK, PAIRING, USAGE_DAYS, operators_lock

# A call counts once, at its start: every answered call the platform has, with the operator's
# duration when the operator reported it and the platform's otherwise, plus every call the
# operator reported that the platform has no call of at all; each duration rounded up to a
# whole second. A call the platform has as not answered counts nowhere, reported or not: the
# platform's record decides whether a call was answered (it saw the signalling).
# `usage_daily` holds those sums per (operator, tenant, UTC day, direction, source), kept by
# the two writers that can change them, each under the operator's PAIRING lock (taken here,
# with the first look-up of the other side, after the writer wrote its own: `tables.
# operators_lock`): `ingest.submit` (an operator's record arrives) and `platform_calls.
# store_platform_calls` (the platform's call arrives). `usage_query.usage_rows` reads whole
# days from it and the partial days at a period's ends from the calls themselves
# (`_usage_of_calls`, the definition above in SQL).

# (operator, tenant, day, direction, source) -> [calls, billed seconds]
DayKey = tuple[str, str, dt.date, str, str]

_ADD_USAGE = (
    "INSERT INTO usage_daily (operator_id, tenant_id, day, direction, source, calls, billed_s)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (operator_id, tenant_id, day, direction, source) DO UPDATE SET"
    " calls = usage_daily.calls + excluded.calls,"
    " billed_s = usage_daily.billed_s + excluded.billed_s"
)
# PostgreSQL: the same for many rows at once, each column an array, in the arrays' order.
_ADD_USAGE_ARRAYS = (
    "INSERT INTO usage_daily (operator_id, tenant_id, day, direction, source, calls, billed_s)"
    " SELECT * FROM unnest(CAST(? AS text[]), CAST(? AS text[]), CAST(? AS date[]),"
    " CAST(? AS text[]), CAST(? AS text[]), CAST(? AS bigint[]), CAST(? AS bigint[]))"
    " ON CONFLICT (operator_id, tenant_id, day, direction, source) DO UPDATE SET"
    " calls = usage_daily.calls + excluded.calls,"
    " billed_s = usage_daily.billed_s + excluded.billed_s"
)


def _utc_day(value: Any) -> dt.date:
    """The UTC day of a time as the driver returns it: SQLite's UTC text or an aware datetime."""
    if isinstance(value, str):
        return dt.date.fromisoformat(value[:10])
    if value.tzinfo is dt.UTC:  # a record's own time (ingest): no conversion to make
        return cast(dt.date, value.date())
    return cast(dt.datetime, value).astimezone(dt.UTC).date()


def _add_usage(session: Session, changes: dict[DayKey, list[int]]) -> None:
    """Add the changes to `usage_daily`, in key order (so concurrent writers on PostgreSQL
    lock its rows in one order): on PostgreSQL one statement over arrays (a batch of records
    changes hundreds of days' rows), on SQLite executemany."""
    keys = [key for key in sorted(changes) if changes[key] != [0, 0]]
    if not keys:
        return
    if session.get_bind().dialect.name == "postgresql":
        columns = list(zip(*keys, strict=True))
        calls = [changes[key][0] for key in keys]
        billed = [changes[key][1] for key in keys]
        arrays = (*(list(c) for c in columns), calls, billed)
        driver_execute_many(session, _ADD_USAGE_ARRAYS, [arrays])
        return
    rows = [
        (key[0], key[1], key[2].isoformat(), key[3], key[4], *changes[key])  # as Date keeps it
        for key in keys
    ]
    driver_execute_many(session, _ADD_USAGE, rows)


def _change(changes: dict[DayKey, list[int]], key: DayKey, calls: int, billed: int) -> None:
    total = changes.setdefault(key, [0, 0])
    total[0] += calls
    total[1] += billed


def ceil_seconds(value: Any, per_second: int) -> Any:
    return (value + (per_second - 1)) // per_second


def _select_platform(count: int) -> str:
    """The operator's platform calls among `count` call ids, answered or not: found by their
    primary key (`+operator_id` keeps SQLite off the index of the operator's calls by answer
    time, which it otherwise chose, and then read every call of the operator for each batch
    submitted: a cost growing with the table)."""
    marks = ",".join("?" * count)
    return (
        "SELECT call_id, tenant_id, answer_time, direction, duration_ms"  # noqa: S608
        f" FROM usage_platform_calls WHERE call_id IN ({marks})"
        " AND +operator_id = ?"
    )


def _select_reported(count: int) -> str:
    """The operator's records of `count` call ids."""
    marks = ",".join("?" * count)
    return (
        "SELECT operator_id, call_id, tenant_id, start_time, direction, duration_us"  # noqa: S608
        f" FROM call_durations WHERE operator_id = ? AND call_id IN ({marks})"
    )


# PostgreSQL: the operator's platform calls, answered or not, whose call id is in an array (one
# statement for a whole batch, as ingest's look-ups), in two steps that each visit one index:
# their keys (`usage_platform_call_keys`, unpartitioned: one probe per id) give their invite
# times, and the rows are read from the partitions between the earliest and the latest of
# those times only (the bounds known when the statement is planned: it is never prepared, see
# `driver_fetch`). A range, not the list of times: pruning by a list costs partitions x times
# to plan (a batch of calls invited over 300 days took 2-3 times main's single statement).
_SELECT_PLATFORM_KEYS = (
    "SELECT call_id, invite_time FROM usage_platform_call_keys"
    " WHERE call_id = ANY(CAST(? AS text[])) AND operator_id = ?"
)
_SELECT_PLATFORM_BY_KEYS = (
    "SELECT call_id, tenant_id, answer_time, direction, duration_ms FROM usage_platform_calls"
    " WHERE call_id = ANY(CAST(? AS text[])) AND invite_time BETWEEN ? AND ?"
)
# PostgreSQL: the same for the operator's records of calls, from `call_duration_keys` (their
# record ids and start times), then `call_durations` in the partitions of those starts' range.
# One operator a statement: the feed's unit asks for the records of every operator it carries,
# the statements of all in one pipeline (`driver_fetch_all`). (One statement over (operator,
# call id) pairs instead, joined to `unnest` laterally, took a partition's index on
# (operator_id, start_time) while its statistics were not gathered yet: 2 s for 1,000 pairs.)
_SELECT_REPORTED_KEYS = (
    "SELECT record_id, start_time FROM call_duration_keys"
    " WHERE operator_id = ? AND call_id = ANY(CAST(? AS text[]))"
)
_SELECT_REPORTED_BY_KEYS = (
    "SELECT operator_id, call_id, tenant_id, start_time, direction, duration_us"
    " FROM call_durations WHERE operator_id = ? AND record_id = ANY(CAST(? AS text[]))"
    " AND start_time BETWEEN ? AND ?"
)


def _by_keys(
    session: Session,
    keys_sql: str,
    rows_sql: str,
    asked: Sequence[tuple[list[Any], list[Any]]],
    lock: list[tuple[str, list[Any]]],
) -> list[tuple[Any, ...]]:
    """PostgreSQL: the `lock` statements, then for each (params, first) asked the keys found by
    `keys_sql` (params), then the rows of those keys by `rows_sql` (`first` + [keys, earliest
    time, latest time]). The lock and the keys' statements in one pipeline, then the rows' in
    another (`driver_fetch_all`): two round trips however many are asked; no rows read for
    what has no key."""
    keys_of = [(keys_sql, params) for params, _ in asked]
    found = driver_fetch_all(session, [*lock, *keys_of], prepare=False)[len(lock) :]
    reads: list[tuple[str, list[Any]]] = []
    for (_, first), keys in zip(asked, found, strict=True):
        if keys:
            times = [row[1] for row in keys]
            reads.append((rows_sql, [*first, [row[0] for row in keys], min(times), max(times)]))
    return [row for rows in driver_fetch_all(session, reads, prepare=False) for row in rows]


def _platform(session: Session, operator_id: str, call_ids: list[str]) -> list[tuple[Any, ...]]:
    """The operator's platform calls among `call_ids`, answered or not (never prepared on
    PostgreSQL, see `driver_fetch`), the operator's PAIRING lock taken first."""
    if session.get_bind().dialect.name == "postgresql":
        return _by_keys(
            session,
            _SELECT_PLATFORM_KEYS,
            _SELECT_PLATFORM_BY_KEYS,
            [([call_ids, operator_id], [])],
            operators_lock(session, [operator_id], PAIRING),
        )
    found: list[tuple[Any, ...]] = []
    for first in range(0, len(call_ids), CHUNK):
        chunk = call_ids[first : first + CHUNK]
        found += driver_fetch(session, _select_platform(len(chunk)), [*chunk, operator_id])
    return found


def _reported(session: Session, calls: Sequence[tuple[str, str]]) -> list[tuple[Any, ...]]:
    """The records of `calls`, (operator, call id) pairs: (operator_id, call_id, tenant_id,
    start_time, direction, duration_us). Never prepared on PostgreSQL (see `driver_fetch`); the
    operators' PAIRING locks taken first."""
    by_operator: dict[str, list[str]] = {}
    for operator_id, call_id in calls:
        by_operator.setdefault(operator_id, []).append(call_id)
    if session.get_bind().dialect.name == "postgresql":
        asked = [([op, ids], [op]) for op, ids in by_operator.items()]
        lock = operators_lock(session, list(by_operator), PAIRING)
        return _by_keys(session, _SELECT_REPORTED_KEYS, _SELECT_REPORTED_BY_KEYS, asked, lock)
    found: list[tuple[Any, ...]] = []
    for operator_id, ids in by_operator.items():
        for first in range(0, len(ids), CHUNK):
            chunk = ids[first : first + CHUNK]
            found += driver_fetch(session, _select_reported(len(chunk)), [operator_id, *chunk])
    return found


def count_reported(session: Session, operator_id: str, stored: Sequence[Reported]) -> None:
    """The operator's newly stored records into the usage by day: a call the platform has
    answered moves from its duration to the operator's; one it has as not answered counts
    nowhere; a call it does not have counts at the record's start."""
    found = _platform(session, operator_id, [r.call_id for r in stored])
    platform = {row[0]: row for row in found}
    changes: dict[DayKey, list[int]] = {}
    operator_source, platform_source = Source.OPERATOR.value, Source.PLATFORM.value
    for record in stored:
        billed = ceil_seconds(record.duration_us, 1_000_000)
        call = platform.get(record.call_id)
        if call is None:
            day = _utc_day(record.start)
            key = (operator_id, record.tenant_id, day, record.direction, operator_source)
            _change(changes, key, 1, billed)
            continue
        _, tenant, answer_time, direction, duration_ms = call
        if answer_time is None:
            continue  # the platform has it as not answered
        day = _utc_day(answer_time)
        _change(
            changes,
            (operator_id, tenant, day, direction, platform_source),
            -1,
            -ceil_seconds(duration_ms, 1000),
        )
        _change(changes, (operator_id, tenant, day, direction, operator_source), 1, billed)
    _add_usage(session, changes)


def count_platform(session: Session, calls: Sequence[PlatformCall]) -> None:
    """The platform's newly stored calls into the usage by day: an answered call counts at its
    answer with the operator's duration if reported (moving that record from its own start) and
    its own otherwise; an unanswered call counts nowhere (a record of it stops counting at its
    start)."""
    found = _reported(session, [(call.operator_id, call.call_id) for call in calls])
    reported = {(row[0], row[1]): row for row in found}
    changes: dict[DayKey, list[int]] = {}
    for call in calls:
        record = reported.get((call.operator_id, call.call_id))
        if record is None:
            if call.answer_time is None:
                continue  # not answered, not reported: counts nowhere
            day = _utc_day(call.answer_time)
            key = (call.operator_id, call.tenant_id, day, call.direction, Source.PLATFORM.value)
            _change(changes, key, 1, ceil_seconds(call.duration_ms, 1000))
            continue
        _, _, tenant, start_time, direction, duration_us = record
        billed = ceil_seconds(duration_us, 1_000_000)
        own = (call.operator_id, tenant, _utc_day(start_time), direction, Source.OPERATOR.value)
        _change(changes, own, -1, -billed)
        if call.answer_time is None:
            continue  # not answered: the record counts nowhere any more
        day = _utc_day(call.answer_time)
        key = (call.operator_id, call.tenant_id, day, call.direction, Source.OPERATOR.value)
        _change(changes, key, 1, billed)
    _add_usage(session, changes)


def purge_usage_days(session: Session, older_than: dt.datetime) -> int:
    """Forget the usage of days that ended before the retention."""
    day = older_than.astimezone(dt.UTC).date()
    result = session.execute(delete(USAGE_DAYS).where(USAGE_DAYS.c.day < day))
    return cast(CursorResult[Any], result).rowcount


# Every statement this module writes by hand (an IN list with one item) on each backend, as
# tests/test_sql.py checks them against the tables, each on its own backend.
SQL = {
    "sqlite": (_ADD_USAGE, _select_platform(1), _select_reported(1)),
    "postgresql": (
        _ADD_USAGE_ARRAYS,
        _SELECT_PLATFORM_KEYS,
        _SELECT_PLATFORM_BY_KEYS,
        _SELECT_REPORTED_KEYS,
        _SELECT_REPORTED_BY_KEYS,
    ),
}
