"""The call-duration tables and the units of work on them.

`call_durations` holds each operator's records, keyed by (operator, record_id), at most one per
(operator, call_id). Each function takes a `Session` inside a transaction (run it with
`Database.run`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from sqlalchemy import (
    BigInteger,
    CursorResult,
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
from services.usage.rules import (
    Direction,
    Discrepancy,
    DiscrepancyKind,
    Granularity,
    Outcome,
    ReconcileQuery,
    Reconciliation,
    Refusal,
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
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"usage:{operator_id}"}
        )
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
    if rows:
        driver_execute_many(session, _INSERT, rows)
    return results


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
    one transaction, so a restart resumes exactly after what was kept. Returns how many were
    new."""
    insert = dialect_insert(session)
    added = 0
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
        result = session.execute(
            insert(PLATFORM_CALLS).values(rows).on_conflict_do_nothing(index_elements=["call_id"])
        )
        added += max(cast(CursorResult[Any], result).rowcount, 0)
    session.execute(
        insert(CURSORS)
        .values(feed=feed, cursor=cursor)
        .on_conflict_do_update(index_elements=["feed"], set_={"cursor": cursor})
    )
    return added


def purge_platform_calls(session: Session, older_than: dt.datetime) -> int:
    """Forget calls set up before the retention."""
    result = session.execute(
        delete(PLATFORM_CALLS).where(PLATFORM_CALLS.c.invite_time < older_than)
    )
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


def usage_rows(
    session: Session, query: UsageQuery, after: tuple[str, str, str] | None, limit: int
) -> list[UsageRow]:
    """Up to `limit` usage rows after the key `after` (tenant, period, direction), in key order.

    A call counts once, at its start: every answered call the platform has, with the operator's
    duration when the operator reported it and the platform's otherwise, plus every call the
    operator reported that the platform has no answered call for. Each duration is rounded up
    to a whole second before it is summed. Summed in SQL, split by source.
    """
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
        .where(
            p.c.answer_time.is_not(None),
            p.c.answer_time >= query.start,
            p.c.answer_time < query.end,
        )
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
        .where(p.c.call_id.is_(None), d.c.start_time >= query.start, d.c.start_time < query.end)
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
    rows: dict[tuple[str, str, str], list[SourceUsage]] = {}
    for tenant, bucket, direction, source, count, billed in session.execute(statement):
        group = rows.setdefault((tenant, bucket, direction), [])
        group.append(SourceUsage(Source(source), int(count), int(billed or 0)))
    return [
        UsageRow(
            tenant_id=tenant,
            period_start=max(_period_start(bucket), query.start),
            direction=Direction(direction),
            by_source=tuple(sources),
        )
        for (tenant, bucket, direction), sources in list(rows.items())[:limit]
    ]


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


def _pairing(session: Session, query: ReconcileQuery) -> _Pairing:
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
        p.c.answer_time >= query.start,
        p.c.answer_time < query.end,
    ]
    operator_where = [
        d.c.operator_id == query.operator_id,
        p.c.call_id.is_(None),
        d.c.start_time >= query.start,
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
    """The next `limit` discrepancies after (start, call_id), ordered by start then call_id."""
    pair = _pairing(session, query)
    d, p = pair.d, pair.p
    platform_side = (
        select(
            case(
                (pair.reported, DiscrepancyKind.MISMATCH.value),
                else_=DiscrepancyKind.MISSING_FROM_OPERATOR.value,
            ).label("kind"),
            p.c.call_id.label("call_id"),
            d.c.record_id.label("record_id"),
            p.c.tenant_id.label("tenant_id"),
            p.c.answer_time.label("start"),
            pair.platform_us.label("platform_us"),
            d.c.duration_us.label("operator_us"),
        )
        .select_from(pair.platform)
        .where(*pair.platform_where, or_(~pair.reported, ~pair.within))
    )
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
        .where(*pair.operator_where)
    )
    found = union_all(platform_side, operator_side).subquery()
    statement = select(found)
    if kind is not None:
        statement = statement.where(found.c.kind == kind.value)
    if after is not None:
        statement = statement.where(tuple_(found.c.start, found.c.call_id) > tuple_(*after))
    statement = statement.order_by(found.c.start, found.c.call_id).limit(limit)
    return [
        Discrepancy(
            kind=DiscrepancyKind(row.kind),
            call_id=row.call_id,
            record_id=row.record_id or "",
            tenant_id=row.tenant_id,
            start=_utc(row.start),
            platform_us=None if row.platform_us is None else int(row.platform_us),
            operator_us=None if row.operator_us is None else int(row.operator_us),
        )
        for row in session.execute(statement)
    ]


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
