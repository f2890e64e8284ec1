"""The call-duration tables and the units of work on them.

`call_durations` holds each operator's records, keyed by (operator, record_id), at most one per
(operator, call_id). Each function takes a `Session` inside a transaction (run it with
`Database.run`).
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    CursorResult,
    Date,
    DateTime,
    Index,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    and_,
    case,
    delete,
    func,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.db import Base, dialect_insert, driver_execute_many, driver_fetch, driver_time
from plumbing.validation import Refusal
from services.usage.rules import (
    Direction,
    Discrepancy,
    DiscrepancyKind,
    Granularity,
    Outcome,
    ReconcileQuery,
    Reconciliation,
    Result,
    Source,
    SourceUsage,
    Submitted,
    UsageQuery,
    UsageRow,
)

CHUNK = 400  # ids per IN (...) list: inside SQLite's variable limit


class DurationRow(Base):
    """An operator's record of one call's duration. Immutable."""

    __tablename__ = "call_durations"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    call_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(36))
    caller: Mapped[str] = mapped_column(String(16))
    callee: Mapped[str] = mapped_column(String(16))
    direction: Mapped[str] = mapped_column(String(8))
    start_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_us: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the record as submitted: same record_id and digest is a duplicate.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("operator_id", "call_id", name="uq_call_durations_operator_call"),
        Index("ix_call_durations_operator_start", "operator_id", "start_time"),
        Index("ix_call_durations_tenant_start", "tenant_id", "start_time"),
    )


DURATIONS: Table = DurationRow.__table__  # type: ignore[assignment]


def _rejected(record_id: str, reason: str, field: str, message: str) -> Result:
    return Result(record_id, Outcome.REJECTED, Refusal(reason, field, message))


_INSERT = (
    "INSERT INTO call_durations (operator_id, record_id, call_id, tenant_id, caller, callee,"
    " direction, start_time, end_time, duration_us, digest, submitted_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _stored(
    session: Session, operator_id: str, column: Literal["record_id", "call_id"], values: list[str]
) -> list[tuple[Any, ...]]:
    """(record_id, call_id, digest) of the operator's records whose `column` is in `values`."""
    found: list[tuple[Any, ...]] = []
    for first in range(0, len(values), CHUNK):
        chunk = values[first : first + CHUNK]
        marks = ",".join("?" * len(chunk))
        found += driver_fetch(
            session,
            "SELECT record_id, call_id, digest FROM call_durations"  # noqa: S608 - fixed column
            f" WHERE operator_id = ? AND {column} IN ({marks})",
            [operator_id, *chunk],
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
    _lock_operators(session, [operator_id])
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
                    _rejected(
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
                _rejected(
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
        _count_reported(session, operator_id, accepted)
    return results


def _lock_operators(session: Session, operators: Sequence[str]) -> None:
    """Serialize, per operator, whatever pairs its records with the platform's calls (ingest,
    the records feed): on PostgreSQL a transaction-scoped advisory lock each, taken in one
    order; SQLite has one writer."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for operator_id in sorted(set(operators)):
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"usage:{operator_id}"}
        )


def purge_durations(session: Session, older_than: dt.datetime) -> int:
    """Delete records of calls that started before the retention."""
    result = cast(
        CursorResult[Any],
        session.execute(delete(DURATIONS).where(DURATIONS.c.start_time < older_than)),
    )
    return result.rowcount


class PlatformCallRow(Base):
    """The platform's side of a call, as the records feed told it: what usage and
    reconciliation compare operators' records with. Immutable, like the record it comes from."""

    __tablename__ = "usage_platform_calls"

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    direction: Mapped[str] = mapped_column(String(8))
    invite_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    answer_time: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_usage_platform_calls_operator_answer", "operator_id", "answer_time"),
        Index("ix_usage_platform_calls_tenant_answer", "tenant_id", "answer_time"),
    )


class FeedCursorRow(Base):
    """Where a feed this service follows was left: saved with what it delivered."""

    __tablename__ = "usage_feed_cursors"

    feed: Mapped[str] = mapped_column(String(32), primary_key=True)
    cursor: Mapped[str] = mapped_column(String(256))


PLATFORM_CALLS: Table = PlatformCallRow.__table__  # type: ignore[assignment]
CURSORS: Table = FeedCursorRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class PlatformCall:
    call_id: str
    operator_id: str
    tenant_id: str
    direction: str
    invite_time: dt.datetime
    answer_time: dt.datetime | None
    duration_ms: int


def feed_cursor(session: Session, feed: str) -> str:
    """The saved cursor of a feed; empty when it was never followed."""
    return session.scalar(select(CURSORS.c.cursor).where(CURSORS.c.feed == feed)) or ""


def store_platform_calls(
    session: Session, feed: str, calls: Sequence[PlatformCall], cursor: str
) -> int:
    """Keep the calls (each once: a call delivered again is ignored) and the feed's cursor, in
    one transaction, so a restart resumes exactly after what was kept; the usage by day counts
    the new ones. Returns how many were new."""
    _lock_operators(session, [c.operator_id for c in calls])
    insert = dialect_insert(session)
    new: set[str] = set()
    for first in range(0, len(calls), CHUNK):
        rows = [
            {
                "call_id": c.call_id,
                "operator_id": c.operator_id,
                "tenant_id": c.tenant_id,
                "direction": c.direction,
                "invite_time": c.invite_time,
                "answer_time": c.answer_time,
                "duration_ms": c.duration_ms,
            }
            for c in calls[first : first + CHUNK]
        ]
        statement = (
            insert(PLATFORM_CALLS)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["call_id"])
            .returning(PLATFORM_CALLS.c.call_id)
        )
        new.update(session.scalars(statement))
    first_of = {c.call_id: c for c in reversed(calls)}  # a call twice in `calls`: kept once
    _count_platform(session, [first_of[call_id] for call_id in new])
    session.execute(
        insert(CURSORS)
        .values(feed=feed, cursor=cursor)
        .on_conflict_do_update(index_elements=["feed"], set_={"cursor": cursor})
    )
    return len(new)


def purge_platform_calls(session: Session, older_than: dt.datetime) -> int:
    """Forget calls set up before the retention."""
    result = session.execute(
        delete(PLATFORM_CALLS).where(PLATFORM_CALLS.c.invite_time < older_than)
    )
    return cast(CursorResult[Any], result).rowcount


# --- usage by day: counted as calls arrive -----------------------------------------------------
#
# A call counts once, at its start: every answered call the platform has, with the operator's
# duration when the operator reported it and the platform's otherwise, plus every call the
# operator reported that the platform has no answered call for; each duration rounded up to a
# whole second. `usage_daily` holds those sums per (operator, tenant, UTC day, direction,
# source), kept by the two writers that can change them, each under the operator's lock:
# `submit` (an operator's record arrives) and `store_platform_calls` (the platform's call
# arrives). `usage_rows` reads whole days from it and the partial days at a period's ends
# from the calls themselves (`_usage_of_calls`, the definition above in SQL).


class UsageDayRow(Base):
    """Calls and billed seconds of one operator, tenant, UTC day, direction and source."""

    __tablename__ = "usage_daily"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), primary_key=True)
    source: Mapped[str] = mapped_column(String(8), primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger)
    billed_s: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_usage_daily_tenant_day", "tenant_id", "day"),)


USAGE_DAYS: Table = UsageDayRow.__table__  # type: ignore[assignment]

# (operator, tenant, day, direction, source) -> [calls, billed seconds]
DayKey = tuple[str, str, dt.date, str, str]

_ADD_USAGE = (
    "INSERT INTO usage_daily (operator_id, tenant_id, day, direction, source, calls, billed_s)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (operator_id, tenant_id, day, direction, source) DO UPDATE SET"
    " calls = usage_daily.calls + excluded.calls,"
    " billed_s = usage_daily.billed_s + excluded.billed_s"
)


def _utc_day(value: Any) -> dt.date:
    """The UTC day of a time as the driver returns it: SQLite's UTC text or an aware datetime."""
    if isinstance(value, str):
        return dt.date.fromisoformat(value[:10])
    return cast(dt.datetime, value).astimezone(dt.UTC).date()


def _add_usage(session: Session, changes: dict[DayKey, list[int]]) -> None:
    """Add the changes to `usage_daily`, in key order (so concurrent writers on PostgreSQL
    lock its rows in one order)."""
    day_of: Callable[[dt.date], Any] = lambda day: day  # noqa: E731
    if session.get_bind().dialect.name == "sqlite":
        day_of = dt.date.isoformat  # as SQLAlchemy's Date keeps it
    rows = [
        (operator, tenant, day_of(day), direction, source, calls, billed)
        for (operator, tenant, day, direction, source), (calls, billed) in sorted(changes.items())
        if calls or billed
    ]
    if rows:
        driver_execute_many(session, _ADD_USAGE, rows)


def _change(changes: dict[DayKey, list[int]], key: DayKey, calls: int, billed: int) -> None:
    total = changes.setdefault(key, [0, 0])
    total[0] += calls
    total[1] += billed


class Reported(NamedTuple):
    """A record as the usage by day counts it."""

    call_id: str
    tenant_id: str
    start: dt.datetime
    direction: str
    duration_us: int


def _count_reported(session: Session, operator_id: str, stored: Sequence[Reported]) -> None:
    """The operator's newly stored records into the usage by day: a call the platform has
    moves from its duration to the operator's; any other call counts at the record's start."""
    platform: dict[str, tuple[Any, ...]] = {}
    for first in range(0, len(stored), CHUNK):
        chunk = [r.call_id for r in stored[first : first + CHUNK]]
        marks = ",".join("?" * len(chunk))
        for row in driver_fetch(
            session,
            "SELECT call_id, tenant_id, answer_time, direction, duration_ms"  # noqa: S608
            " FROM usage_platform_calls WHERE operator_id = ? AND answer_time IS NOT NULL"
            f" AND call_id IN ({marks})",
            [operator_id, *chunk],
        ):
            platform[row[0]] = row
    changes: dict[DayKey, list[int]] = {}
    for record in stored:
        billed = _ceil_seconds(record.duration_us, 1_000_000)
        call = platform.get(record.call_id)
        if call is None:
            day = _utc_day(record.start)
            key = (operator_id, record.tenant_id, day, record.direction, Source.OPERATOR.value)
            _change(changes, key, 1, billed)
            continue
        _, tenant, answer_time, direction, duration_ms = call
        day = _utc_day(answer_time)
        _change(
            changes,
            (operator_id, tenant, day, direction, Source.PLATFORM.value),
            -1,
            -_ceil_seconds(duration_ms, 1000),
        )
        _change(changes, (operator_id, tenant, day, direction, Source.OPERATOR.value), 1, billed)
    _add_usage(session, changes)


def _count_platform(session: Session, calls: Sequence[PlatformCall]) -> None:
    """The platform's newly stored calls into the usage by day: an answered call counts at its
    answer with the operator's duration if reported (moving that record from its own start) and
    its own otherwise; an unanswered call counts nowhere."""
    answered = [c for c in calls if c.answer_time is not None]
    reported: dict[tuple[str, str], tuple[Any, ...]] = {}
    by_operator: dict[str, list[str]] = {}
    for call in answered:
        by_operator.setdefault(call.operator_id, []).append(call.call_id)
    for operator_id, call_ids in by_operator.items():
        for first in range(0, len(call_ids), CHUNK):
            chunk = call_ids[first : first + CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in driver_fetch(
                session,
                "SELECT call_id, tenant_id, start_time, direction, duration_us"  # noqa: S608
                f" FROM call_durations WHERE operator_id = ? AND call_id IN ({marks})",
                [operator_id, *chunk],
            ):
                reported[(operator_id, row[0])] = row
    changes: dict[DayKey, list[int]] = {}
    for call in answered:
        day = _utc_day(call.answer_time)
        record = reported.get((call.operator_id, call.call_id))
        if record is None:
            key = (call.operator_id, call.tenant_id, day, call.direction, Source.PLATFORM.value)
            _change(changes, key, 1, _ceil_seconds(call.duration_ms, 1000))
            continue
        _, tenant, start_time, direction, duration_us = record
        billed = _ceil_seconds(duration_us, 1_000_000)
        own = (call.operator_id, tenant, _utc_day(start_time), direction, Source.OPERATOR.value)
        _change(changes, own, -1, -billed)
        key = (call.operator_id, call.tenant_id, day, call.direction, Source.OPERATOR.value)
        _change(changes, key, 1, billed)
    _add_usage(session, changes)


def purge_usage_days(session: Session, older_than: dt.datetime) -> int:
    """Forget the usage of days that ended before the retention."""
    day = older_than.astimezone(dt.UTC).date()
    result = session.execute(delete(USAGE_DAYS).where(USAGE_DAYS.c.day < day))
    return cast(CursorResult[Any], result).rowcount


# --- usage -----------------------------------------------------------------------------------


def _period(session: Session, column: Any, granularity: Granularity) -> Any:
    """The UTC day (YYYY-MM-DD) or month (YYYY-MM) of a stored time, as text."""
    if session.get_bind().dialect.name == "postgresql":
        fmt = "YYYY-MM-DD" if granularity is Granularity.DAY else "YYYY-MM"
        return func.to_char(func.timezone("UTC", column), fmt)
    # SQLite keeps times as UTC text, "YYYY-MM-DD HH:MM:SS.ffffff".
    return func.substr(column, 1, 10 if granularity is Granularity.DAY else 7)


def _ceil_seconds(value: Any, per_second: int) -> Any:
    return (value + (per_second - 1)) // per_second


UsageKey = tuple[str, str, str]  # tenant, period (YYYY-MM-DD or YYYY-MM), direction
Sums = dict[UsageKey, dict[Source, list[int]]]  # -> source -> [calls, billed seconds]


def usage_rows(
    session: Session, query: UsageQuery, after: UsageKey | None, limit: int
) -> list[UsageRow]:
    """Up to `limit` usage rows after the key `after` (tenant, period, direction), in key order:
    the UTC days the period holds whole from `usage_daily`, its partial first and last days
    from the calls themselves."""
    first_day = _day_start(query.start)
    if first_day < query.start:
        try:
            first_day += dt.timedelta(days=1)
        except OverflowError:  # the last day there is: the period holds no whole day
            first_day = query.end
    end_day = _day_start(query.end)
    sums: Sums = {}
    if first_day >= end_day:  # not one whole day
        _add_sums(sums, _usage_of_calls(session, query, after, limit))
    else:
        if query.start < first_day:
            head = replace(query, end=first_day)
            _add_sums(sums, _usage_of_calls(session, head, after, limit))
        whole = replace(query, start=first_day, end=end_day)
        _add_sums(sums, _usage_of_days(session, whole, after, limit))
        if end_day < query.end:
            tail = replace(query, start=end_day)
            _add_sums(sums, _usage_of_calls(session, tail, after, limit))
    return [
        UsageRow(
            tenant_id=tenant,
            period_start=max(_period_start(bucket), query.start),
            direction=Direction(direction),
            by_source=tuple(
                SourceUsage(source, calls, billed)
                for source, (calls, billed) in sorted(sources.items())
                if calls
            ),
        )
        for (tenant, bucket, direction), sources in sorted(sums.items())[:limit]
    ]


def _day_start(value: dt.datetime) -> dt.datetime:
    utc = value.astimezone(dt.UTC)
    return dt.datetime(utc.year, utc.month, utc.day, tzinfo=dt.UTC)


def _add_sums(sums: Sums, rows: Sequence[Any]) -> None:
    for tenant, bucket, direction, source, calls, billed in rows:
        total = sums.setdefault((tenant, bucket, direction), {}).setdefault(Source(source), [0, 0])
        total[0] += int(calls)
        total[1] += int(billed or 0)


def _usage_of_days(
    session: Session, query: UsageQuery, after: UsageKey | None, limit: int
) -> Sequence[Any]:
    """The sums of the query's days (its start and end are midnights) from `usage_daily`:
    (tenant, period, direction, source, calls, billed) of the first `limit` keys after
    `after`, with every source of each."""
    u = USAGE_DAYS
    if session.get_bind().dialect.name == "postgresql":
        fmt = "YYYY-MM-DD" if query.granularity is Granularity.DAY else "YYYY-MM"
        period = func.to_char(u.c.day, fmt)
    else:  # SQLite keeps a Date as its ISO text
        period = func.substr(u.c.day, 1, 10 if query.granularity is Granularity.DAY else 7)
    key = (u.c.tenant_id, period, u.c.direction)
    statement = select(*key, u.c.source, func.sum(u.c.calls), func.sum(u.c.billed_s)).where(
        u.c.day >= query.start.date(), u.c.day < query.end.date()
    )
    if query.operator_id is not None:
        statement = statement.where(u.c.operator_id == query.operator_id)
    if query.tenant_id is not None:
        statement = statement.where(u.c.tenant_id == query.tenant_id)
    if after is not None:
        statement = statement.where(u.c.tenant_id >= after[0], tuple_(*key) > tuple_(*after))
    statement = (
        statement.group_by(*key, u.c.source)
        .having(func.sum(u.c.calls) != 0)
        .order_by(*key, u.c.source)
        .limit(limit * len(Source))
    )
    return list(session.execute(statement))


def _usage_of_calls(
    session: Session, query: UsageQuery, after: UsageKey | None, limit: int
) -> Sequence[Any]:
    """The sums of the calls that started in the query's period, from the calls themselves:
    (tenant, period, direction, source, calls, billed) of the first `limit` keys after
    `after`, with every source of each."""
    start, end = query.start, query.end
    d, p = DURATIONS.alias("d"), PLATFORM_CALLS.alias("p")
    same_call = and_(d.c.operator_id == p.c.operator_id, d.c.call_id == p.c.call_id)
    reported = d.c.record_id.is_not(None)
    platform_side = (
        select(
            p.c.tenant_id.label("tenant_id"),
            p.c.answer_time.label("start"),
            p.c.direction.label("direction"),
            case((reported, Source.OPERATOR.value), else_=Source.PLATFORM.value).label("source"),
            case(
                (reported, _ceil_seconds(d.c.duration_us, 1_000_000)),
                else_=_ceil_seconds(p.c.duration_ms, 1_000),
            ).label("billed"),
        )
        .select_from(p.outerjoin(d, same_call))
        .where(p.c.answer_time.is_not(None), p.c.answer_time >= start, p.c.answer_time < end)
    )
    operator_only = (
        select(
            d.c.tenant_id,
            d.c.start_time,
            d.c.direction,
            literal(Source.OPERATOR.value, String),
            _ceil_seconds(d.c.duration_us, 1_000_000),
        )
        .select_from(d.outerjoin(p, and_(same_call, p.c.answer_time.is_not(None))))
        .where(p.c.call_id.is_(None), d.c.start_time >= start, d.c.start_time < end)
    )
    if query.operator_id is not None:
        platform_side = platform_side.where(p.c.operator_id == query.operator_id)
        operator_only = operator_only.where(d.c.operator_id == query.operator_id)
    if query.tenant_id is not None:
        platform_side = platform_side.where(p.c.tenant_id == query.tenant_id)
        operator_only = operator_only.where(d.c.tenant_id == query.tenant_id)
    calls = union_all(platform_side, operator_only).subquery()
    period = _period(session, calls.c.start, query.granularity).label("period")
    key = (calls.c.tenant_id, period, calls.c.direction)
    statement = select(*key, calls.c.source, func.count(), func.sum(calls.c.billed))
    if after is not None:
        statement = statement.where(tuple_(*key) > tuple_(*after))
    statement = (
        statement.group_by(*key, calls.c.source)
        .order_by(*key, calls.c.source)
        .limit(limit * len(Source))
    )
    return list(session.execute(statement))


def _period_start(bucket: str) -> dt.datetime:
    """The start of a day (YYYY-MM-DD) or month (YYYY-MM) as an aware UTC time."""
    if len(bucket) == 7:
        bucket += "-01"
    return dt.datetime.fromisoformat(bucket).replace(tzinfo=dt.UTC)


# --- reconciliation --------------------------------------------------------------------------


def _greatest(session: Session, *values: Any) -> Any:
    name = "greatest" if session.get_bind().dialect.name == "postgresql" else "max"
    return getattr(func, name)(*values)


@dataclass(frozen=True)
class _Pairing:
    """The operator's records paired with the platform's answered calls that started in the
    period: the platform's calls, each with the operator's record of it if any (`platform`),
    and the operator's records the platform has no answered call for (`operator_only`)."""

    d: Any
    p: Any
    platform_us: Any
    reported: Any
    within: Any
    platform: Any  # FROM clause
    platform_where: list[Any]
    operator_only: Any  # FROM clause
    operator_where: list[Any]


def _pairing(session: Session, query: ReconcileQuery, since: dt.datetime | None = None) -> _Pairing:
    """The pairing over the query's period, or from `since` on when that is later: one lower
    bound (SQLite seeks an index on the first of two)."""
    lower = query.start if since is None else max(query.start, since)
    d, p = DURATIONS.alias("d"), PLATFORM_CALLS.alias("p")
    same_call = and_(d.c.operator_id == p.c.operator_id, d.c.call_id == p.c.call_id)
    platform_us = p.c.duration_ms * 1000
    tolerance = query.tolerance
    allowed = _greatest(
        session,
        tolerance.absolute // dt.timedelta(microseconds=1),
        _greatest(session, d.c.duration_us, platform_us) * tolerance.relative,
    )
    platform_where = [
        p.c.operator_id == query.operator_id,
        p.c.answer_time.is_not(None),
        p.c.answer_time >= lower,
        p.c.answer_time < query.end,
    ]
    operator_where = [
        d.c.operator_id == query.operator_id,
        p.c.call_id.is_(None),
        d.c.start_time >= lower,
        d.c.start_time < query.end,
    ]
    if query.tenant_id is not None:
        platform_where.append(p.c.tenant_id == query.tenant_id)
        operator_where.append(d.c.tenant_id == query.tenant_id)
    return _Pairing(
        d=d,
        p=p,
        platform_us=platform_us,
        reported=d.c.record_id.is_not(None),
        within=func.abs(d.c.duration_us - platform_us) <= allowed,
        platform=p.outerjoin(d, same_call),
        platform_where=platform_where,
        operator_only=d.outerjoin(p, and_(same_call, p.c.answer_time.is_not(None))),
        operator_where=operator_where,
    )


def reconcile(session: Session, query: ReconcileQuery) -> Reconciliation:
    """Counts and totals of a reconciliation, in SQL: one pass over each side of the pairing."""
    pair = _pairing(session, query)
    reported, within, d = pair.reported, pair.within, pair.d

    def total(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    platform_side = (
        select(
            total(and_(reported, within)),
            total(and_(reported, ~within)),
            total(~reported),
            func.coalesce(func.sum(pair.platform_us), 0),
            func.coalesce(func.sum(d.c.duration_us), 0),
        )
        .select_from(pair.platform)
        .where(*pair.platform_where)
    )
    operator_only = (
        select(func.count(), func.coalesce(func.sum(d.c.duration_us), 0))
        .select_from(pair.operator_only)
        .where(*pair.operator_where)
    )
    matched, mismatched, platform_only, platform_total, operator_on_platform = session.execute(
        platform_side
    ).one()
    unknown, unknown_total = session.execute(operator_only).one()
    return Reconciliation(
        matched=int(matched),
        mismatched=int(mismatched),
        platform_only=int(platform_only),
        operator_only=int(unknown),
        platform_total_us=int(platform_total),
        operator_total_us=int(operator_on_platform) + int(unknown_total),
    )


def discrepancies(
    session: Session,
    query: ReconcileQuery,
    kind: DiscrepancyKind | None,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[Discrepancy]:
    """The next `limit` discrepancies after (start, call_id), ordered by start then call_id.

    Each side of the pairing is read in that order on its own index from `after` on, at most
    `limit` rows (the operator's side no further than the platform's last when that is full),
    and the two are merged here: a page costs what it reads, wherever it starts in the period
    (a UNION ALL sorted as a whole would be read from the period's start)."""
    pair = _pairing(session, query, None if after is None else after[0])
    d, p = pair.d, pair.p
    sides: list[list[Discrepancy]] = []
    platform_kinds = {DiscrepancyKind.MISMATCH, DiscrepancyKind.MISSING_FROM_OPERATOR}
    if kind is None or kind in platform_kinds:
        wanted = or_(~pair.reported, ~pair.within)
        if kind is DiscrepancyKind.MISMATCH:
            wanted = and_(pair.reported, ~pair.within)
        elif kind is DiscrepancyKind.MISSING_FROM_OPERATOR:
            wanted = ~pair.reported
        platform_side = (
            select(
                case(
                    (pair.reported, DiscrepancyKind.MISMATCH.value),
                    else_=DiscrepancyKind.MISSING_FROM_OPERATOR.value,
                ),
                p.c.call_id,
                d.c.record_id,
                p.c.tenant_id,
                p.c.answer_time,
                pair.platform_us,
                d.c.duration_us,
            )
            .select_from(pair.platform)
            .where(*pair.platform_where, wanted, *_after(p.c.answer_time, p.c.call_id, after))
            .order_by(p.c.answer_time, p.c.call_id)
            .limit(limit)
        )
        sides.append(_discrepancies_of(session, platform_side))
    if kind is None or kind is DiscrepancyKind.UNKNOWN_TO_PLATFORM:
        operator_side = (
            select(
                literal(DiscrepancyKind.UNKNOWN_TO_PLATFORM.value, String),
                d.c.call_id,
                d.c.record_id,
                d.c.tenant_id,
                d.c.start_time,
                null(),
                d.c.duration_us,
            )
            .select_from(pair.operator_only)
            .where(*pair.operator_where, *_after(d.c.start_time, d.c.call_id, after))
            .order_by(d.c.start_time, d.c.call_id)
            .limit(limit)
        )
        if sides and len(sides[0]) == limit:
            # The page ends by the platform side's last start at the latest: no need to read
            # past it (the operator's records the platform lacks can be far apart).
            operator_side = operator_side.where(d.c.start_time <= sides[0][-1].start)
        sides.append(_discrepancies_of(session, operator_side))
    merged = heapq.merge(*sides, key=lambda x: (x.start, x.call_id))
    return list(itertools.islice(merged, limit))


def _after(start: Any, call_id: Any, after: tuple[dt.datetime, str] | None) -> list[Any]:
    """Rows after the key `after` in (start, call_id) order (the pairing's lower bound seeks
    the index to its start)."""
    return [] if after is None else [tuple_(start, call_id) > tuple_(*after)]


def _discrepancies_of(session: Session, statement: Any) -> list[Discrepancy]:
    return [
        Discrepancy(
            kind=DiscrepancyKind(kind),
            call_id=call_id,
            record_id=record_id or "",
            tenant_id=tenant_id,
            start=_utc(start),
            platform_us=None if platform_us is None else int(platform_us),
            operator_us=None if operator_us is None else int(operator_us),
        )
        for kind, call_id, record_id, tenant_id, start, platform_us, operator_us in session.execute(
            statement
        )
    ]


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
