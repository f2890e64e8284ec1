"""Usage read (`GetUsageSummary`, `GetTenantUsage`): the whole UTC days of a period from the usage
by day (`usage_days.py`), its partial first and last days from the calls themselves.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import String, and_, case, func, literal, select, tuple_, union_all
from sqlalchemy.orm import Session

from plumbing.direction import Direction
from services.usage.rules import Granularity, Source, SourceUsage, UsageQuery, UsageRow
from services.usage.tables import DURATIONS, PLATFORM_CALLS, USAGE_DAYS
from services.usage.usage_days import ceil_seconds


def _period(session: Session, column: Any, granularity: Granularity) -> Any:
    """The UTC day (YYYY-MM-DD) or month (YYYY-MM) of a stored time, as text."""
    if session.get_bind().dialect.name == "postgresql":
        fmt = "YYYY-MM-DD" if granularity is Granularity.DAY else "YYYY-MM"
        return func.to_char(func.timezone("UTC", column), fmt)
    # SQLite keeps times as UTC text, "YYYY-MM-DD HH:MM:SS.ffffff".
    return func.substr(column, 1, 10 if granularity is Granularity.DAY else 7)


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
    """The sums of the calls that started in the query's period, from the calls themselves
    (as `usage_days.py` counts them: the platform's answered calls, and the operator's records
    of calls the platform has no call of): (tenant, period, direction, source, calls, billed)
    of the first `limit` keys after `after`, with every source of each."""
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
                (reported, ceil_seconds(d.c.duration_us, 1_000_000)),
                else_=ceil_seconds(p.c.duration_ms, 1_000),
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
            ceil_seconds(d.c.duration_us, 1_000_000),
        )
        .select_from(d.outerjoin(p, same_call))  # the platform has no call of it at all
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
