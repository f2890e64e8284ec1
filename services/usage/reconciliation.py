"""Reconciliation (`GetReconciliation`, `StreamDiscrepancies`): an operator's records paired with
the platform's answered calls of a period, counted and listed, in SQL. A record of a call the
platform has as not answered is its own kind (UNANSWERED_ON_PLATFORM), apart from the records of
call ids the platform has no call of (UNKNOWN_TO_PLATFORM).
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, or_, select, true, tuple_
from sqlalchemy.orm import Session

from plumbing.db import utc
from services.usage.rules import Discrepancy, DiscrepancyKind, ReconcileQuery, Reconciliation
from services.usage.tables import DURATIONS, PLATFORM_CALLS


def _greatest(session: Session, *values: Any) -> Any:
    name = "greatest" if session.get_bind().dialect.name == "postgresql" else "max"
    return getattr(func, name)(*values)


@dataclass(frozen=True)
class _Pairing:
    """The operator's records paired with the platform's answered calls that started in the
    period: the platform's calls, each with the operator's record of it if any (`platform`),
    and the operator's records the platform has no answered call for (`operator_only`), each
    with the platform's unanswered call of it if any (`unknown` where there is none)."""

    d: Any
    p: Any
    platform_us: Any
    reported: Any
    within: Any
    unknown: Any
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
        or_(p.c.call_id.is_(None), p.c.answer_time.is_(None)),
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
        unknown=p.c.call_id.is_(None),
        platform=p.outerjoin(d, same_call),
        platform_where=platform_where,
        operator_only=d.outerjoin(p, same_call),
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
        select(
            total(pair.unknown),
            total(~pair.unknown),
            func.coalesce(func.sum(d.c.duration_us), 0),
        )
        .select_from(pair.operator_only)
        .where(*pair.operator_where)
    )
    matched, mismatched, platform_only, platform_total, operator_on_platform = session.execute(
        platform_side
    ).one()
    unknown, unanswered, operator_only_total = session.execute(operator_only).one()
    return Reconciliation(
        matched=int(matched),
        mismatched=int(mismatched),
        platform_only=int(platform_only),
        operator_only=int(unknown),
        unanswered_on_platform=int(unanswered),
        platform_total_us=int(platform_total),
        operator_total_us=int(operator_on_platform) + int(operator_only_total),
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
    operator_kinds = {DiscrepancyKind.UNKNOWN_TO_PLATFORM, DiscrepancyKind.UNANSWERED_ON_PLATFORM}
    if kind is None or kind in operator_kinds:
        wanted = true()
        if kind is DiscrepancyKind.UNKNOWN_TO_PLATFORM:
            wanted = pair.unknown
        elif kind is DiscrepancyKind.UNANSWERED_ON_PLATFORM:
            wanted = ~pair.unknown
        operator_side = (
            select(
                case(
                    (pair.unknown, DiscrepancyKind.UNKNOWN_TO_PLATFORM.value),
                    else_=DiscrepancyKind.UNANSWERED_ON_PLATFORM.value,
                ),
                d.c.call_id,
                d.c.record_id,
                d.c.tenant_id,
                d.c.start_time,
                pair.platform_us,  # NULL where the platform has no call
                d.c.duration_us,
            )
            .select_from(pair.operator_only)
            .where(*pair.operator_where, wanted, *_after(d.c.start_time, d.c.call_id, after))
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
            start=utc(start),
            platform_us=None if platform_us is None else int(platform_us),
            operator_us=None if operator_us is None else int(operator_us),
        )
        for kind, call_id, record_id, tenant_id, start, platform_us, operator_us in session.execute(
            statement
        )
    ]
