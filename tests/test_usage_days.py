"""Usage by day (`usage_daily`), kept by ingest and the records feed, checked against usage
computed here from the calls themselves: whatever order the two sides of a call arrive in,
redeliveries included, for periods that start and end inside days or on midnights; paged or
not; on SQLite and PostgreSQL. Also: the migration that fills it from data stored before it,
and the two writers running at once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
from typing import Any

import sqlalchemy as sa
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plumbing.db import Database, alembic_config
from plumbing.direction import Direction
from services.usage import ingest, platform_calls, usage_query
from services.usage.rules import (
    DurationRecord,
    Granularity,
    PlatformCall,
    Source,
    Submitted,
    UsageQuery,
)

BASE = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
OPERATORS = ("op-a", "op-b")
TENANTS = ("11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222")
TABLES = (
    "usage_daily",
    "usage_platform_calls",
    "usage_platform_call_keys",
    "call_durations",
    "call_duration_keys",
    "usage_feed_cursors",
)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call: the platform's side (when `answer_min` is None, not answered) and, when
    `reported_by` is set, that operator's record of it."""

    number: int
    operator: str
    tenant: str
    direction: Direction
    answer_min: int | None
    platform_ms: int
    reported_by: str | None
    record_tenant: str
    record_start_min: int
    operator_us: int

    @property
    def call_id(self) -> str:
        return f"call-{self.number:04d}"

    def platform(self) -> PlatformCall:
        invite = BASE + dt.timedelta(minutes=(self.answer_min or 0) - 1)
        answer = None
        if self.answer_min is not None:
            answer = BASE + dt.timedelta(minutes=self.answer_min, microseconds=123)
        return PlatformCall(
            call_id=self.call_id,
            operator_id=self.operator,
            tenant_id=self.tenant,
            direction=self.direction.value,
            invite_time=invite,
            answer_time=answer,
            duration_ms=self.platform_ms,
        )

    def record(self) -> Submitted:
        start = BASE + dt.timedelta(minutes=self.record_start_min, microseconds=456)
        duration = dt.timedelta(microseconds=self.operator_us)
        record = DurationRecord(
            record_id=f"rec-{self.number:04d}",
            call_id=self.call_id,
            tenant_id=self.record_tenant,
            caller="+14255550100",
            callee="+14255550101",
            direction=self.direction,
            start_time=start,
            end_time=start + duration,
            duration=duration,
        )
        return Submitted(record, hashlib.sha256(repr(record).encode()).digest())


DAYS_MIN = 4 * 24 * 60
calls_strategy = st.lists(
    st.builds(
        Call,
        number=st.just(0),
        operator=st.sampled_from(OPERATORS),
        tenant=st.sampled_from(TENANTS),
        direction=st.sampled_from(list(Direction)),
        answer_min=st.none() | st.integers(0, DAYS_MIN),
        platform_ms=st.integers(0, 3_600_000),
        reported_by=st.none() | st.sampled_from(OPERATORS),
        record_tenant=st.sampled_from(TENANTS),
        record_start_min=st.integers(0, DAYS_MIN),
        operator_us=st.integers(0, 3_600_000_000),
    ),
    max_size=24,
).map(lambda calls: [dataclasses.replace(c, number=i) for i, c in enumerate(calls)])


@st.composite
def arrivals(draw: st.DrawFn, calls: list[Call]) -> list[tuple[str, list[Call]]]:
    """The two sides of the calls in some order, in batches, some delivered twice."""
    events = [("platform", c) for c in calls] + [("record", c) for c in calls if c.reported_by]
    events += draw(st.lists(st.sampled_from(events), max_size=4)) if events else []
    events = draw(st.permutations(events))
    batches: list[tuple[str, list[Call]]] = []
    for kind, call in events:
        if batches and batches[-1][0] == kind and draw(st.booleans()):
            batches[-1][1].append(call)
        else:
            batches.append((kind, [call]))
    return batches


queries = st.builds(
    lambda start_h, hours, granularity, operator, tenant: UsageQuery(
        BASE + dt.timedelta(hours=start_h),
        BASE + dt.timedelta(hours=start_h + hours),
        granularity,
        operator,
        tenant,
    ),
    start_h=st.integers(-30, 100) | st.sampled_from([0, 24, 48]),
    hours=st.integers(1, 130) | st.sampled_from([24, 48, 96]),
    granularity=st.sampled_from(list(Granularity)),
    operator=st.none() | st.sampled_from(OPERATORS),
    tenant=st.none() | st.sampled_from(TENANTS),
)

Expected = dict[tuple[str, dt.datetime, str], dict[Source, tuple[int, int]]]


def expected_usage(calls: list[Call], query: UsageQuery) -> Expected:
    """The usage of the query, straight from the definition: the platform's answered calls,
    and the operator's records of calls the platform has no call of (answered or not)."""
    known = {(c.operator, c.call_id) for c in calls}
    out: dict[tuple[str, dt.datetime, str], dict[Source, list[int]]] = {}

    def count(
        operator: str,
        tenant: str,
        start: dt.datetime,
        direction: Direction,
        source: Source,
        billed: int,
    ) -> None:
        if not (query.start <= start < query.end):
            return
        if query.operator_id not in (None, operator) or query.tenant_id not in (None, tenant):
            return
        day = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)
        if query.granularity is Granularity.MONTH:
            day = day.replace(day=1)
        key = (tenant, max(day, query.start), direction.value)
        total = out.setdefault(key, {}).setdefault(source, [0, 0])
        total[0] += 1
        total[1] += billed

    def seconds(us: int) -> int:
        return -(-us // 1_000_000)

    for c in calls:
        if c.answer_min is not None:
            answer = c.platform().answer_time
            assert answer is not None
            if c.reported_by == c.operator:
                count(
                    c.operator,
                    c.tenant,
                    answer,
                    c.direction,
                    Source.OPERATOR,
                    seconds(c.operator_us),
                )
            else:
                count(
                    c.operator,
                    c.tenant,
                    answer,
                    c.direction,
                    Source.PLATFORM,
                    seconds(c.platform_ms * 1000),
                )
        if c.reported_by and (c.reported_by, c.call_id) not in known:
            start = c.record().record.start_time
            assert start is not None
            count(
                c.reported_by,
                c.record_tenant,
                start,
                c.direction,
                Source.OPERATOR,
                seconds(c.operator_us),
            )
    return {k: {s: (v[0], v[1]) for s, v in sources.items()} for k, sources in out.items()}


def stored_usage(db: Database, query: UsageQuery, limit: int) -> Expected:
    """Every row of the query, `limit` per page."""
    out: Expected = {}
    after = None
    while True:
        rows = db.transaction(usage_query.usage_rows, query, after, limit + 1)
        for row in rows[:limit]:
            key = (row.tenant_id, row.period_start, row.direction.value)
            assert key not in out, "a row twice"
            out[key] = {s.source: (s.calls, s.billed_seconds) for s in row.by_source}
        if len(rows) <= limit:
            return out
        last = rows[limit - 1]
        bucket = last.period_start.strftime("%Y-%m-%d")
        if query.granularity is Granularity.MONTH:
            bucket = bucket[:7]
        after = (last.tenant_id, bucket, last.direction.value)


def deliver(db: Database, batches: list[tuple[str, list[Call]]]) -> None:
    for kind, batch in batches:
        if kind == "platform":
            db.transaction(
                platform_calls.store_platform_calls,
                "records",
                [c.platform() for c in batch],
                "cursor",
                write=True,
            )
        else:
            by_operator: dict[str, list[Submitted]] = {}
            for c in batch:
                assert c.reported_by is not None
                by_operator.setdefault(c.reported_by, []).append(c.record())
            for operator, records in by_operator.items():
                db.transaction(ingest.submit, operator, records, write=True)


def empty(db: Database) -> None:
    with db.engine.begin() as connection:
        for table in TABLES:
            connection.execute(sa.text(f"DELETE FROM {table}"))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), calls=calls_strategy)
def test_usage_by_day_is_the_usage_of_the_calls(
    db: Database, data: st.DataObject, calls: list[Call]
) -> None:
    empty(db)
    deliver(db, data.draw(arrivals(calls)))
    for query in data.draw(st.lists(queries, min_size=1, max_size=4)):
        want = expected_usage(calls, query)
        assert stored_usage(db, query, 1000) == want, query
        assert stored_usage(db, query, data.draw(st.integers(1, 3))) == want, query


def test_the_migration_fills_usage_by_day_from_what_is_stored(database_url: str) -> None:
    """Calls and records stored before `usage_daily` existed are counted when it is made."""
    calls = [
        Call(
            i,
            OPERATORS[i % 2],
            TENANTS[i % 3 % 2],
            list(Direction)[i % 2],
            None if i % 7 == 0 else i * 97 % DAYS_MIN,
            i * 7_919 % 900_000,
            OPERATORS[i % 4 % 2] if i % 3 else None,
            TENANTS[i % 2],
            i * 89 % DAYS_MIN,
            i * 1_000_003 % 900_000_000,
        )
        for i in range(60)
    ]
    config = alembic_config(database_url)
    database = Database(database_url, threads=2)
    try:
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0005")
        metadata = sa.MetaData()
        metadata.reflect(database.engine, only=["usage_platform_calls", "call_durations"])
        with database.engine.begin() as connection:
            connection.execute(
                metadata.tables["usage_platform_calls"].insert(),
                [c.platform()._asdict() for c in calls],
            )
            connection.execute(
                metadata.tables["call_durations"].insert(),
                [_duration_row(c) for c in calls if c.reported_by],
            )
        database.migrate()
        whole = UsageQuery(
            BASE - dt.timedelta(days=1), BASE + dt.timedelta(days=6), Granularity.DAY, None, None
        )
        days = UsageQuery(BASE, BASE + dt.timedelta(days=5), Granularity.MONTH, None, None)
        for query in (whole, days):
            assert stored_usage(database, query, 7) == expected_usage(calls, query)
    finally:
        database.close()


def _duration_row(c: Call) -> dict[str, Any]:
    record = c.record().record
    assert record.duration is not None and record.direction is not None
    return {
        "operator_id": c.reported_by,
        "record_id": record.record_id,
        "call_id": record.call_id,
        "tenant_id": record.tenant_id,
        "caller": record.caller,
        "callee": record.callee,
        "direction": record.direction.value,
        "start_time": record.start_time,
        "end_time": record.end_time,
        "duration_us": record.duration // dt.timedelta(microseconds=1),
        "digest": c.record().digest,
        "submitted_at": BASE,
    }


def test_ingest_and_the_feed_at_once_count_each_call_once(db: Database) -> None:
    """The operator's records and the platform's calls of the same calls, written at the same
    time from two threads in small batches: each call counted once, on the operator's
    duration."""
    calls = [
        Call(
            i,
            OPERATORS[0],
            TENANTS[i % 2],
            list(Direction)[i % 2],
            i % DAYS_MIN,
            61_000,
            OPERATORS[0],
            TENANTS[i % 2],
            i % DAYS_MIN,
            30_000_000,
        )
        for i in range(600)
    ]
    platform = [("platform", calls[i : i + 5]) for i in range(0, len(calls), 5)]
    records = [("record", calls[i : i + 5]) for i in range(0, len(calls), 5)]
    together = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def run(batches: list[tuple[str, list[Call]]]) -> None:
        try:
            for batch in batches:
                together.wait()  # both sides of the same calls at the same moment
                deliver(db, [batch])
        except BaseException as error:
            errors.append(error)
            together.abort()

    threads = [threading.Thread(target=run, args=(b,)) for b in (platform, records)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    query = UsageQuery(BASE, BASE + dt.timedelta(days=5), Granularity.MONTH, None, None)
    usage = stored_usage(db, query, 100)
    assert usage == expected_usage(calls, query)
    assert sum(s.get(Source.OPERATOR, (0, 0))[0] for s in usage.values()) == 600
    assert all(Source.PLATFORM not in s for s in usage.values())


def test_a_record_of_a_call_the_platform_did_not_answer_counts_nowhere(db: Database) -> None:
    """The platform has the call as not answered and the operator reported 120 s of it: it
    counts nowhere, whether the record came first (it counted at its start until the
    platform's call came) or the platform's call did; by day and from the calls alike. A record
    of a call the platform has no call of still counts at its start."""
    operator, tenant = OPERATORS[0], TENANTS[0]

    def call(number: int, start_min: int) -> Call:
        return Call(
            number,
            operator,
            tenant,
            Direction.INBOUND,
            None,
            0,
            operator,
            tenant,
            start_min,
            120_000_000,
        )

    record_first, platform_first, unknown = call(1, 60), call(2, 24 * 60 + 60), call(3, 90)
    whole = UsageQuery(BASE, BASE + dt.timedelta(days=2), Granularity.DAY, None, None)
    partial = UsageQuery(
        BASE + dt.timedelta(minutes=30),
        BASE + dt.timedelta(days=1, hours=2),
        Granularity.DAY,
        operator,
        tenant,
    )
    month = UsageQuery(BASE, BASE + dt.timedelta(days=3), Granularity.MONTH, None, tenant)
    queries = (whole, partial, month)

    def usage_of(*records: Call) -> dict[UsageQuery, Expected]:
        out: dict[UsageQuery, Expected] = {}
        for query in queries:
            rows: Expected = {}
            for c in records:
                start = c.record().record.start_time
                assert start is not None
                if not query.start <= start < query.end:
                    continue
                day = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)
                if query.granularity is Granularity.MONTH:
                    day = day.replace(day=1)
                key = (tenant, max(day, query.start), Direction.INBOUND.value)
                calls, billed = rows.get(key, {}).get(Source.OPERATOR, (0, 0))
                rows[key] = {Source.OPERATOR: (calls + 1, billed + 120)}
            out[query] = rows
        return out

    def stored() -> dict[UsageQuery, Expected]:
        return {query: stored_usage(db, query, 10) for query in queries}

    deliver(db, [("record", [record_first, unknown])])
    assert stored() == usage_of(record_first, unknown)  # the platform has no call of either yet
    deliver(db, [("platform", [record_first, platform_first])])
    deliver(db, [("record", [platform_first])])
    assert stored() == usage_of(unknown)
    assert stored()[partial] and stored()[whole]
