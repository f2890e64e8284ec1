"""Time partitions of the high-volume tables, on PostgreSQL only (SQLite keeps plain tables and
the chunked deletes of each service's purge).

Each table is a native RANGE partitioned table on the time its retention is measured on, one
partition per UTC day or ISO week (`TABLES`), named `<table>_pYYYYMMDD` after its first day.
There is no DEFAULT partition: a partition is created before any row can fall in it, by each
service's face at start-up and at every purge (`maintain`): the current period and the next
`AHEAD` ones, and for a table whose rows carry times a client gives (a call's start or
invite), every period back to the retention's cutoff. A row outside them is refused by
PostgreSQL ("no partition of relation ... found for row"): the unit fails, nothing of it is
stored, and the caller is answered UNAVAILABLE (plumbing/db.py), never a lost acceptance.

Retention drops whole partitions once their upper bound is at or before the cutoff, with a
plain DROP TABLE in one short transaction (not DETACH ... CONCURRENTLY, which cannot run in a
transaction block): for a table holding a change log's positions, the log's `purged_through`
is advanced to the highest position dropped in the same transaction, before the drop, so a
cursor into the dropped range answers CURSOR_EXPIRED the moment the rows are gone. The one
partition straddling the cutoff is left to the service's chunked delete, so retention stays
exact: a row outlives its retention by at most the purge interval.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from plumbing.changelog import mark_purged
from plumbing.db import Database
from plumbing.logs import get_logger
from plumbing.metrics import Metrics

log = get_logger("opconnect.partitions")


class Period(enum.Enum):
    DAY = "day"
    WEEK = "week"  # ISO weeks: from Monday 00:00 UTC


# Periods created ahead of the current one: a week of days, four weeks. A maintenance that
# keeps failing leaves that long before writes are refused (OpconnectPartitionsRunningOut
# warns two days before).
AHEAD = {Period.DAY: 7, Period.WEEK: 4}
# Making or dropping a partition takes the table's ACCESS EXCLUSIVE lock: it waits for every
# open reader of the table, and the table's writers queue behind it meanwhile. So maintenance
# waits at most LOCK_TIMEOUT for it, tries TRIES times RETRY_S apart, then gives the table up
# until the next purge (a week of partitions ahead leaves many).
LOCK_TIMEOUT = "250ms"
TRIES = 3
RETRY_S = 1.0


@dataclass(frozen=True)
class Partitioned:
    """A table partitioned by time."""

    table: str
    column: str  # the partition key: the time retention is measured on
    period: Period
    # Rows carry times a client gives, as old as the retention: partitions are made back to it.
    past: bool = False
    # The change log whose positions the table's `position` column holds: dropping advances
    # its horizon (`purged_through`).
    log: str = ""
    # Tables partitioned on the same key, with the same bounds, dropped in the same transaction.
    companions: tuple[str, ...] = ()
    # An unpartitioned table of the rows' keys, with the same time column: its rows in the
    # dropped range are deleted in the same transaction (by that column's index).
    keys: str = ""


# Records (30 days) and the numbers' change log (30 days) by day: 30-odd partitions, and the
# chunked delete of the straddling one deletes at most a day's rows. Tables kept for a year or
# more by week: 52-57 partitions (planning a query that cannot prune visits each one).
RECORDS = Partitioned(
    "call_records",
    "publish_time",
    Period.DAY,
    log="records",
    companions=("call_media_streams",),
    keys="call_record_keys",
)
NUMBER_EVENTS = Partitioned("number_events", "occurred_at", Period.DAY, log="numbers")
AUDIT_EVENTS = Partitioned("audit_events", "at", Period.WEEK)
CALL_DURATIONS = Partitioned(
    "call_durations", "start_time", Period.WEEK, past=True, keys="call_duration_keys"
)
PLATFORM_CALLS = Partitioned(
    "usage_platform_calls", "invite_time", Period.WEEK, past=True, keys="usage_platform_call_keys"
)
TABLES = (RECORDS, NUMBER_EVENTS, AUDIT_EVENTS, CALL_DURATIONS, PLATFORM_CALLS)

_NAME = re.compile(r"_p(\d{8})$")


def period_start(at: dt.datetime, period: Period) -> dt.datetime:
    """The start (UTC midnight; Monday for a week) of the period holding `at`."""
    day = at.astimezone(dt.UTC).date()
    if period is Period.WEEK:
        day -= dt.timedelta(days=day.weekday())
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def period_end(start: dt.datetime, period: Period) -> dt.datetime:
    return start + dt.timedelta(days=7 if period is Period.WEEK else 1)


def partition_name(table: str, start: dt.datetime) -> str:
    return f"{table}_p{start:%Y%m%d}"


@dataclass(frozen=True)
class Partition:
    name: str
    start: dt.datetime
    end: dt.datetime


def partitions(session: Session, spec: Partitioned, table: str = "") -> list[Partition]:
    """The partitions of `table` (the spec's own by default), oldest first. Their bounds are
    read from their names, which only this module and migration 0008 give."""
    rows = session.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = CAST(:table AS regclass)"
        ),
        {"table": table or spec.table},
    ).scalars()
    found = []
    for name in rows:
        match = _NAME.search(name)
        if match is None:
            continue
        start = dt.datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=dt.UTC)
        found.append(Partition(name, start, period_end(start, spec.period)))
    return sorted(found, key=lambda p: p.start)


def _serialize(session: Session, spec: Partitioned) -> None:
    """One maintainer of a table at a time across replicas, never waiting long for its lock.
    The lock names the table in its schema: advisory locks are the whole database's, and the
    same table in another schema (another deployment sharing the server, a test's schema) is
    another table."""
    session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(current_schema() || :key))"),
        {"key": f":partitions:{spec.table}"},
    )


def wanted(spec: Partitioned, now: dt.datetime, retention_s: float) -> list[dt.datetime]:
    """The starts of the periods that must exist at `now`."""
    first = period_start(now - dt.timedelta(seconds=retention_s) if spec.past else now, spec.period)
    last = period_start(now, spec.period)
    for _ in range(AHEAD[spec.period]):
        last = period_end(last, spec.period)
    starts = [first]
    while starts[-1] < last:
        starts.append(period_end(starts[-1], spec.period))
    return starts


def create_ahead(
    session: Session, spec: Partitioned, now: dt.datetime, retention_s: float
) -> list[str]:
    """Create the missing partitions of the spec's tables (see `wanted`); returns the names of
    the main table's partitions created. The companions' first: a row of one never waits for
    a partition of the other."""
    _serialize(session, spec)
    created: list[str] = []
    for table in (*spec.companions, spec.table):
        have = {p.start for p in partitions(session, spec, table)}
        for start in wanted(spec, now, retention_s):
            if start in have:
                continue
            name = partition_name(table, start)
            end = period_end(start, spec.period)
            session.execute(
                text(
                    f'CREATE TABLE "{name}" PARTITION OF "{table}"'
                    f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                )
            )
            if table == spec.table:
                created.append(name)
    return created


def create_all_ahead(db: Database, now: dt.datetime, retention_s: float) -> None:
    """Every table's partitions made as a service makes them at start-up (`create_ahead`, back
    to `retention_s` for the tables of the past), each table tried up to TRIES times RETRY_S
    apart when its maintenance lock is not had in time, as `maintain` does; raises the last
    failure. For what runs outside a service: benches and tests on a shared server."""
    for spec in TABLES:
        for attempt in range(1, TRIES + 1):
            try:
                db.transaction(create_ahead, spec, now, retention_s, write=True)
                break
            except OperationalError:
                if attempt == TRIES:
                    raise
                time.sleep(RETRY_S)


def drop_past(session: Session, spec: Partitioned, cutoff: dt.datetime) -> list[str]:
    """Drop the spec's partitions wholly before `cutoff` (their upper bound at or before it),
    the companions' with them and the keys table's rows of their range, in this transaction;
    returns the names dropped.

    For a change log's table the log's horizon moves first, to the highest position dropped:
    that takes the log head's row lock, as every writer of the log does before touching the
    tables, so the drop never deadlocks with them, and a cursor into the dropped range
    answers CURSOR_EXPIRED as soon as the drop is visible."""
    _serialize(session, spec)
    old = [p for p in partitions(session, spec) if p.end <= cutoff]
    if not old:
        return []
    if spec.log:
        highest = [
            session.scalar(text(f'SELECT max(position) FROM "{p.name}"'))  # noqa: S608
            for p in old
        ]
        kept = [int(value) for value in highest if value is not None]
        if kept:
            mark_purged(session, spec.log, max(kept))
    if spec.keys:
        session.execute(
            text(f'DELETE FROM "{spec.keys}" WHERE "{spec.column}" < :end'),  # noqa: S608
            {"end": max(p.end for p in old)},
        )
    for partition in old:
        for table in spec.companions:
            name = partition_name(table, partition.start)
            session.execute(text(f'DROP TABLE IF EXISTS "{name}"'))
        session.execute(text(f'DROP TABLE "{partition.name}"'))
    return [p.name for p in old]


@dataclass(frozen=True)
class State:
    """What a table's partitions cover, after maintenance."""

    count: int
    oldest: dt.datetime | None
    until: dt.datetime | None


def state(session: Session, spec: Partitioned) -> State:
    found = partitions(session, spec)
    if not found:
        return State(0, None, None)
    return State(len(found), found[0].start, found[-1].end)


async def _maintain_one(
    db: Database, spec: Partitioned, retention_s: float, metrics: Metrics, drop: bool
) -> State:
    now = dt.datetime.now(dt.UTC)
    created = await db.run(create_ahead, spec, now, retention_s, write=True)
    metrics.partitions_created.labels(spec.table).inc(len(created))
    if created:
        log.info("partitions created", table=spec.table, count=len(created))
    if drop:
        cutoff = now - dt.timedelta(seconds=retention_s)
        dropped = await db.run(drop_past, spec, cutoff, write=True)
        metrics.partitions_dropped.labels(spec.table).inc(len(dropped))
        if dropped:
            log.info("partitions dropped", table=spec.table, count=len(dropped))
    return cast(State, await db.run(state, spec))


async def maintain(
    db: Database,
    tables: Sequence[tuple[Partitioned, float]],
    metrics: Metrics,
    *,
    drop: bool = True,
) -> Exception | None:
    """Create each table's partitions ahead and (with `drop`) drop those past its retention
    (seconds, given with it), one transaction per table; export what they cover. Nothing on
    SQLite. A table that fails TRIES times (its lock not had within LOCK_TIMEOUT, storage
    trouble) is logged and the others are done; the first failure is returned, for the
    service's purge to raise once its chunked deletes have run (the purge counts a failure;
    the next run tries again)."""
    if db.engine.dialect.name != "postgresql":
        return None
    failed: Exception | None = None
    for spec, retention_s in tables:
        found: State | None = None
        for attempt in range(1, TRIES + 1):
            try:
                found = await _maintain_one(db, spec, retention_s, metrics, drop)
                break
            except Exception as error:
                log.error(
                    "partition maintenance failed",
                    table=spec.table,
                    attempt=attempt,
                    error=str(error)[:200],
                )
                if attempt == TRIES:
                    failed = failed or error
                else:
                    await asyncio.sleep(RETRY_S)
        if found is None:
            continue
        metrics.partitions.labels(spec.table).set(found.count)
        if found.until is not None and found.oldest is not None:
            metrics.partitions_until.labels(spec.table).set(found.until.timestamp())
            metrics.partitions_oldest.labels(spec.table).set(found.oldest.timestamp())
    return failed


def is_partition(name: str | None, kind: str, parents: object = None) -> bool:
    """Whether `name` is one of the partitions this module (or migration 0008) makes: Alembic
    leaves them out of the comparison with the models (`include_name`, migrations/env.py)."""
    if kind != "table" or name is None:
        return False
    match = _NAME.search(name)
    return match is not None and name[: match.start()] in {
        table for spec in TABLES for table in (spec.table, *spec.companions)
    }


def include_name(name: str | None, kind: str, parents: object) -> bool:
    """Alembic's `include_name`: every table but the partitions."""
    return not is_partition(name, kind)
