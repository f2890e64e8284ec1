"""Usage benchmark: SubmitCallDurations ingest throughput, and reconciliation over a month.

Run from the repository root:

    .venv/bin/python bench/usage_bench.py [--records N] [--calls N] [--json] [--profile]

Every throughput is set against a raw baseline measured in the same run, because the machines
this runs on are small and noisy:

1. Records/s committed by SubmitCallDurations: `--records` (1,000,000 by default) valid
   call-duration records of one operator, sent by one operator client process through the
   one-process system (gateway interceptor, mutual TLS, validation and digests, the duplicate
   check and the insert in SQLite, one acknowledgement per batch after its commit) in batches of
   1,000 with a few in flight, from the first send to the last acknowledgement; every record
   must be accepted. Versus raw `sqlite3` executemany inserts of the very rows the system wrote
   into a fresh copy of the schema, one durable transaction per 1,000 (WAL, synchronous=FULL,
   as the system runs SQLite). Reported as `ingest_ratio` = best system / best raw records/s
   (target >= 0.5, issue 12).
2. A month of `--calls` (1,000,000 by default) platform calls of the operator over 30 days and
   the operator's duration records of them (most answered calls reported, a share of them
   beyond the tolerance, a few the platform does not know, a few it has as not answered),
   written straight into SQLite before
   the system starts; then, through the system from an operator client process: the seconds of
   GetReconciliation for the 30 days (`--rounds` rounds), of StreamDiscrepancies reading every
   discrepancy of the 30 days (and its discrepancies/s), and of GetUsageSummary by day (every
   page). Each figure is checked equal to what was filled, computed independently while
   filling. As baselines, the service's own storage functions called in-process without gRPC,
   the discrepancies and usage rows in one query each. Reported as `reconcile_s`,
   `discrepancies_s` and `usage_summary_s` (target: seconds, not minutes).

Servers and clients run in their own processes (this script started again with `--role ...`),
so client and server each get a core. Everything (PKI, SQLite databases) lives in a temporary
directory removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import runner
from alembic import command
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from report import machine, print_figures, print_header, share, verdict
from rows import (
    RAW_METHODS,
    Row,
    bulk_load,
    chunks,
    database_mb,
    durable_inserts,
    fetch,
    is_postgres,
    open_database,
    prefix_range,
    scalar,
    table_columns,
    time_value,
)
from runner import OPERATOR, Child, CpuWindow, ServerProcess, Spec, credentials, in_turn
from sqlalchemy import create_engine, text

from opconnect.type.v1 import call_direction_pb2 as direction_pb
from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from plumbing.config import Settings
from plumbing.db import Database, alembic_config
from plumbing.validation import Outcome
from services.usage import convert, ingest, reconciliation, rules, tables, usage_query
from services.usage.platform_calls import COLUMNS as PLATFORM_COLUMNS
from services.usage.platform_calls import store_platform_calls

SUBMIT_METHOD = "/opconnect.usage.v1.UsageService/SubmitCallDurations"
INGEST_TARGET = 0.5  # issue 12
SECONDS_TARGET = 60.0  # "seconds, not minutes": each query of the month under a minute
BATCH = rules.MAX_BATCH  # records per SubmitCallDurations request, and per raw transaction
TEMPLATES = 2_000  # rows of each table the fill makes through the service's own code
FILL_CHUNK = 20_000  # platform calls generated and written per executemany while filling
PROFILE_RUN = 91  # run id of the profiled ingest
PAGE_SIZE = 1_000  # GetUsageSummary page size (the maximum)
RAW_TEXT = {  # the raw baseline's inserts, by backend
    "sqlite": "sqlite3 executemany",
    "postgresql": "psycopg executemany (and COPY: raw (copy))",
}

US = 1_000_000
DAY_US = 86_400 * US
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
DIRECTIONS = {
    "inbound": direction_pb.CALL_DIRECTION_INBOUND,
    "outbound": direction_pb.CALL_DIRECTION_OUTBOUND,
}
# The month's mix.
ANSWERED_SHARE = 0.85
REPORTED_SHARE = 0.95  # of answered calls, reported by the operator
MISMATCHED_SHARE = 0.02  # of reported calls of 4 s or more: a duration beyond the tolerance
EXTRA_SHARE = 0.005  # per reported call: one more record of a call the platform does not know
UNANSWERED_REPORTED_SHARE = 0.01  # of unanswered calls: a record anyway (its ringing time)
# Connected time: lognormal with this median (seconds) and spread, within these bounds (ms).
TALK_MEDIAN_S = 150.0
TALK_SIGMA = 0.9
TALK_MIN_MS = 1_000
TALK_MAX_MS = 2 * 3600 * 1000

DURATION_COLUMNS = ingest.COLUMNS
KEY_COLUMNS = ingest.KEY_COLUMNS
KEY_INDEXES = [DURATION_COLUMNS.index(c) for c in KEY_COLUMNS]
CALL_KEY_COLUMNS = ("call_id", "operator_id", "invite_time")  # usage_platform_call_keys
CALL_KEY_INDEXES = [PLATFORM_COLUMNS.index(c) for c in CALL_KEY_COLUMNS]

# A platform call: call_id, tenant, direction, invite and answer time (us since the epoch;
# answer None when not answered), duration in ms.
PlatformTuple = tuple[str, str, str, int, int | None, int]
# An operator's record: record_id, call_id, tenant, caller, callee, direction, start and end
# (us since the epoch), duration in us.
RecordTuple = tuple[str, str, str, str, str, str, int, int, int]


# --------------------------------------------------------------------------- helpers


def moment(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def epoch_us(value: dt.datetime) -> int:
    return (value - EPOCH) // dt.timedelta(microseconds=1)


def stamp(us: int) -> Timestamp:
    return Timestamp(seconds=us // US, nanos=us % US * 1000)


def span(us: int) -> Duration:
    """A non-negative Duration of `us` microseconds."""
    return Duration(seconds=us // US, nanos=us % US * 1000)


def guid(rng: random.Random) -> str:
    """A random (version 4) GUID, as `uuid.uuid4` makes them."""
    h = f"{rng.getrandbits(122):031x}"
    variant = "89ab"[int(h[15], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{variant}{h[16:19]}-{h[19:31]}"


def talk_ms(rng: random.Random) -> int:
    talk = round(rng.lognormvariate(math.log(TALK_MEDIAN_S), TALK_SIGMA) * 1000)
    return max(TALK_MIN_MS, min(TALK_MAX_MS, talk))


def pstn_number(rng: random.Random) -> str:
    """A North American number outside the operator's own 425-555 block."""
    r = rng.random
    return f"+1{200 + int(r() * 800)}{200 + int(r() * 355)}{int(r() * 10_000):04d}"


def tenant_numbers(tenants: int) -> list[list[str]]:
    """Each tenant's block of 200 of the operator's numbers (+1 425 5xx xxxx)."""
    return [[f"+14255{k // 10:02d}{k % 10}{n:03d}" for n in range(200)] for k in range(tenants)]


def record_message(r: RecordTuple) -> pb.CallDurationRecord:
    record_id, call_id, tenant, caller, callee, direction, start, end, duration = r
    return pb.CallDurationRecord(
        record_id=record_id,
        call_id=call_id,
        tenant_id=tenant,
        caller=caller,
        callee=callee,
        direction=DIRECTIONS[direction],
        start_time=stamp(start),
        end_time=stamp(end),
        duration=span(duration),
    )


def within(operator_us: int, platform_us: int, tolerance: rules.Tolerance) -> bool:
    """The reconciliation's match rule: max(absolute, relative x the longer)."""
    allowed = max(
        tolerance.absolute // dt.timedelta(microseconds=1),
        max(operator_us, platform_us) * tolerance.relative,
    )
    return abs(operator_us - platform_us) <= allowed


# --------------------------------------------------------------------------- the month


USAGE_DAYS_REVISION = "0006"  # the migration that makes and fills usage_daily


@dataclass
class Expected:
    """What the filled month must reconcile to, counted while it is made (independently of the
    service's SQL)."""

    platform_calls: int = 0
    answered: int = 0
    reported: int = 0
    matched: int = 0
    mismatched: int = 0
    platform_only: int = 0
    operator_only: int = 0
    unanswered_on_platform: int = 0
    platform_total_us: int = 0
    operator_total_us: int = 0
    # (tenant, UTC day YYYY-MM-DD, direction) -> [calls, billed s, operator calls, operator s]
    usage: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return self.reported + self.operator_only + self.unanswered_on_platform

    @property
    def discrepancies(self) -> int:
        return (
            self.mismatched + self.platform_only + self.operator_only + self.unanswered_on_platform
        )


class Month:
    """A month of one operator's calls (`calls` of them, evenly over [start, end), in time
    order) and the operator's duration records of them, made chunk by chunk from one seed."""

    def __init__(
        self, calls: int, tenants: int, seed: int, start_us: int, end_us: int, tol: rules.Tolerance
    ) -> None:
        self.rng = random.Random(seed)
        self.calls = calls
        self.start_us = start_us
        self.step = (end_us - start_us) // calls
        self.tenants = [guid(self.rng) for _ in range(tenants)]
        self.numbers = tenant_numbers(tenants)
        self.tolerance = tol
        self.expected = Expected()
        self.made = 0
        self.record_seq = 0
        self._days: dict[int, str] = {}

    def _day(self, us: int) -> str:
        index = us // DAY_US
        day = self._days.get(index)
        if day is None:
            day = self._days[index] = moment(index * DAY_US).strftime("%Y-%m-%d")
        return day

    def _use(self, tenant: str, us: int, direction: str, billed_s: int, operator: bool) -> None:
        row = self.expected.usage.setdefault((tenant, self._day(us), direction), [0, 0, 0, 0])
        row[0] += 1
        row[1] += billed_s
        if operator:
            row[2] += 1
            row[3] += billed_s

    def _record(
        self, call_id: str, k: int, direction: str, start: int, end: int, duration: int
    ) -> RecordTuple:
        self.record_seq += 1
        ours = self.numbers[k][int(self.rng.random() * len(self.numbers[k]))]
        other = pstn_number(self.rng)
        caller, callee = (other, ours) if direction == "inbound" else (ours, other)
        record_id = f"cdr-{self.record_seq:010d}"
        return (
            record_id,
            call_id,
            self.tenants[k],
            caller,
            callee,
            direction,
            start,
            end,
            duration,
        )

    def chunk(self, size: int) -> tuple[list[PlatformTuple], list[RecordTuple]]:
        """The next `size` platform calls (fewer at the end) and the operator's records of
        them, with the expected figures updated."""
        rng, e = self.rng, self.expected
        calls: list[PlatformTuple] = []
        records: list[RecordTuple] = []
        for i in range(self.made, min(self.calls, self.made + size)):
            t = self.start_us + i * self.step + int(rng.random() * self.step)
            k = int(rng.random() * len(self.tenants))
            tenant = self.tenants[k]
            direction = "inbound" if rng.random() < 0.5 else "outbound"
            call_id = guid(rng)
            e.platform_calls += 1
            if rng.random() >= ANSWERED_SHARE:
                calls.append((call_id, tenant, direction, t, None, 0))
                if rng.random() < UNANSWERED_REPORTED_SHARE:
                    # Counts in no usage: the platform has the call as not answered.
                    ringing_us = int(rng.random() * 29 * US) + US
                    records.append(
                        self._record(call_id, k, direction, t, t + ringing_us, ringing_us)
                    )
                    e.unanswered_on_platform += 1
                    e.operator_total_us += ringing_us
                continue
            ms = talk_ms(rng)
            invite = t - US - int(rng.random() * 19 * US)  # rang 1 to 20 s
            calls.append((call_id, tenant, direction, invite, t, ms))
            e.answered += 1
            e.platform_total_us += ms * 1000
            if rng.random() >= REPORTED_SHARE:
                e.platform_only += 1
                self._use(tenant, t, direction, -(-ms // 1000), operator=False)
                continue
            if ms >= 4_000 and rng.random() < MISMATCHED_SHARE:
                # Short by 10% to 40%, and at least 2 s: beyond max(1 s, 1%).
                operator_us = (ms - max(2_000, int(ms * rng.uniform(0.1, 0.4)))) * 1000
            else:
                operator_us = -(-ms // 1000) * US  # whole seconds, rounded up, as billed
            records.append(self._record(call_id, k, direction, t, t + ms * 1000, operator_us))
            e.reported += 1
            e.operator_total_us += operator_us
            if within(operator_us, ms * 1000, self.tolerance):
                e.matched += 1
            else:
                e.mismatched += 1
            self._use(tenant, t, direction, -(-operator_us // US), operator=True)
            if rng.random() < EXTRA_SHARE:
                extra_us = -(-talk_ms(rng) // 1000) * US
                records.append(self._record(guid(rng), k, direction, t, t + extra_us, extra_us))
                e.operator_only += 1
                e.operator_total_us += extra_us
                self._use(tenant, t, direction, -(-extra_us // US), operator=True)
        self.made = min(self.calls, self.made + size)
        return calls, records


class RowMaker:
    """Rows of both tables as the service stores them (`platform_calls.store_platform_calls` and
    `ingest.submit`), in PLATFORM_COLUMNS and DURATION_COLUMNS order."""

    def __init__(self, url: str) -> None:
        self._text: Callable[[dt.datetime], Any] = time_value(tables.DURATIONS.c.start_time, url)
        self._days: dict[int, str] = {}
        self._postgres = is_postgres(url)

    def time_text(self, us: int) -> Any:
        """A time as the driver is given it so that the row is SQLAlchemy's: on SQLite its
        DateTime bind processor's text (made faster: the rows of the templates check it), on
        PostgreSQL the aware time."""
        if self._postgres:
            return moment(us)
        day, rest = divmod(us, DAY_US)
        prefix = self._days.get(day)
        if prefix is None:
            prefix = self._days[day] = self._text(moment(day * DAY_US))[:10]
        seconds, micro = divmod(rest, US)
        hours, seconds = divmod(seconds, 3600)
        minutes, seconds = divmod(seconds, 60)
        return f"{prefix} {hours:02d}:{minutes:02d}:{seconds:02d}.{micro:06d}"

    def platform(self, c: PlatformTuple) -> tuple[Any, ...]:
        call_id, tenant, direction, invite, answer, ms = c
        answer_text = None if answer is None else self.time_text(answer)
        return (call_id, OPERATOR, tenant, direction, self.time_text(invite), answer_text, ms)

    def duration(self, r: RecordTuple, submitted_at: Any) -> tuple[Any, ...]:
        record_id, call_id, tenant, caller, callee, direction, start, end, duration = r
        digest = hashlib.sha256(record_message(r).SerializeToString(deterministic=True)).digest()
        return (
            OPERATOR,
            record_id,
            call_id,
            tenant,
            caller,
            callee,
            direction,
            self.time_text(start),
            self.time_text(end),
            duration,
            digest,
            submitted_at,
        )


@dataclass
class FillResult:
    platform_calls: int
    records: int
    tenants: int
    templates: int
    real_path_s: float
    copies_s: float
    usage_days_s: float  # the migration counting the usage by day of the month
    seconds: float
    database_mb: float


def recount_usage_days(url: str) -> None:
    """Migrate down to before `usage_daily` and up again: the migrations fill it. On PostgreSQL
    that rebuilds the partitioned tables (0008) without planner statistics: analyze them again,
    as `bulk_load` did (without, a StreamDiscrepancies page of a 50,000-call month took over a
    minute)."""
    config = alembic_config(url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, USAGE_DAYS_REVISION + "-1")
            command.upgrade(config, "head")
        if is_postgres(url):
            with engine.begin() as connection:
                for table in (
                    "usage_platform_calls",
                    "call_durations",
                    "usage_daily",
                    "call_duration_keys",  # refilled by their migrations (0009, 0012)
                    "usage_platform_call_keys",
                ):
                    connection.execute(text(f"ANALYZE {table}"))
    finally:
        engine.dispose()


def fill(
    settings: Settings, calls: int, tenants: int, seed: int, start_us: int, end_us: int
) -> tuple[FillResult, Expected]:
    """Migrate the database of `settings` (SQLite or PostgreSQL), register OPERATOR and store a
    month of its calls and duration records (the same rows on either backend). The first
    TEMPLATES rows of each table go through the service's own code
    (`platform_calls.store_platform_calls`, `convert.check` + `ingest.submit`); the rest are made
    by RowMaker, checked first to make those very rows."""
    started = time.perf_counter()
    tolerance = rules.Tolerance(
        dt.timedelta(seconds=settings.reconcile_tolerance_s), settings.reconcile_tolerance_ratio
    )
    month = Month(calls, tenants, seed, start_us, end_us, tolerance)
    url = settings.sqlalchemy_url
    maker = RowMaker(url)
    first_calls, first_records = month.chunk(FILL_CHUNK)
    template_calls, template_records = first_calls[:TEMPLATES], first_records[:TEMPLATES]
    db = open_database(settings)
    try:
        platform_calls = [
            rules.PlatformCall(
                c[0],
                OPERATOR,
                c[1],
                c[2],
                moment(c[3]),
                None if c[4] is None else moment(c[4]),
                c[5],
            )
            for c in template_calls
        ]
        db.transaction(store_platform_calls, "bench-fill", platform_calls, "", write=True)
        checked = convert.check([record_message(r) for r in template_records], settings)
        valid = [c for c in checked if isinstance(c, rules.Submitted)]
        if len(valid) != len(template_records):
            refused = Counter(
                c.refusal.reason for c in checked if isinstance(c, rules.Result) and c.refusal
            )
            raise RuntimeError(f"template records refused: {dict(refused)}")
        for part in chunks(valid, BATCH):
            results = db.transaction(ingest.submit, OPERATOR, part, write=True)
            if any(r.outcome is not Outcome.ACCEPTED for r in results):
                raise RuntimeError("a template record was not accepted")
    finally:
        db.close()
    real_path_s = time.perf_counter() - started

    for table, columns in (
        ("usage_platform_calls", PLATFORM_COLUMNS),
        ("call_durations", DURATION_COLUMNS),
    ):
        if set(table_columns(url, table)) != set(columns):
            raise RuntimeError(f"{table} has columns {sorted(table_columns(url, table))}")
    # In key order (the platform's call ids are random; the record ids are in the order made).
    stored_calls = sorted(
        fetch(url, f"SELECT {', '.join(PLATFORM_COLUMNS)} FROM usage_platform_calls")
    )
    stored_records = sorted(
        fetch(url, f"SELECT {', '.join(DURATION_COLUMNS)} FROM call_durations"),
        key=lambda row: str(row[1]),
    )
    # The rows the service wrote must be the rows RowMaker makes (submitted_at aside, a time of
    # the submission).
    if stored_calls != sorted(maker.platform(c) for c in template_calls):
        raise RuntimeError("a platform call row differs from store_platform_calls's")
    if len(stored_records) != len(template_records) or stored_records != [
        maker.duration(r, s[-1]) for r, s in zip(template_records, stored_records, strict=True)
    ]:
        raise RuntimeError("a call_durations row differs from ingest.submit's")

    copies_started = time.perf_counter()
    rest_calls, rest_records = first_calls[TEMPLATES:], first_records[TEMPLATES:]
    postgres = is_postgres(url)
    # On PostgreSQL each record's keys and each call's too, as ingest.submit and
    # platform_calls.store_platform_calls write them.
    keys_tables = ["call_duration_keys", "usage_platform_call_keys"] if postgres else []
    loaded = ["usage_platform_calls", "call_durations", *keys_tables]
    with bulk_load(url, loaded) as loader:
        while True:
            submitted_at = maker.time_text(epoch_us(dt.datetime.now(dt.UTC)))
            record_rows = []
            for i, r in enumerate(rest_records):
                if i % BATCH == 0:  # one submission time per batch, as submit does
                    submitted_at = maker.time_text(epoch_us(dt.datetime.now(dt.UTC)))
                record_rows.append(maker.duration(r, submitted_at))
            call_rows = [maker.platform(c) for c in rest_calls]
            loader.rows("usage_platform_calls", PLATFORM_COLUMNS, call_rows)
            loader.rows("call_durations", DURATION_COLUMNS, record_rows)
            if postgres:
                keys = [
                    tuple(row[DURATION_COLUMNS.index(c)] for c in KEY_COLUMNS)
                    for row in record_rows
                ]
                loader.rows("call_duration_keys", KEY_COLUMNS, keys)
                call_keys = [tuple(row[i] for i in CALL_KEY_INDEXES) for row in call_rows]
                loader.rows("usage_platform_call_keys", CALL_KEY_COLUMNS, call_keys)
            loader.commit()
            if month.made >= calls:
                break
            rest_calls, rest_records = month.chunk(FILL_CHUNK)
    e = month.expected
    stored_calls_n = scalar(url, "SELECT count(*) FROM usage_platform_calls")
    stored_records_n = scalar(url, "SELECT count(*) FROM call_durations")
    if stored_calls_n != e.platform_calls or stored_records_n != e.records:
        raise RuntimeError(
            f"filled {stored_calls_n} calls and {stored_records_n} records, wanted"
            f" {e.platform_calls} and {e.records}"
        )
    # The usage by day of the bulk-loaded rows: made by the very migration that makes the table
    # (down and up again), which counts it from the stored calls in SQL.
    counted = time.perf_counter()
    recount_usage_days(settings.sqlalchemy_url)
    usage_days_s = time.perf_counter() - counted
    os.sync()  # no writeback of the fill left to slow down the measurements
    result = FillResult(
        platform_calls=month.expected.platform_calls,
        records=month.expected.records,
        tenants=tenants,
        templates=TEMPLATES,
        real_path_s=real_path_s,
        copies_s=counted - copies_started,
        usage_days_s=usage_days_s,
        seconds=time.perf_counter() - started,
        database_mb=database_mb(url),
    )
    return result, month.expected


# --------------------------------------------------------------------------- submit client


def ingest_records(count: int, seed: int, now: dt.datetime) -> list[RecordTuple]:
    """`count` valid records of OPERATOR, of calls that started 3 hours to 30 days ago (so that
    none ends in the future), in the order they started, as an operator reports calls soon
    after they end: 50 tenants, sequential record ids, random (GUID) call ids."""
    rng = random.Random(seed)
    tenants = [guid(rng) for _ in range(50)]
    numbers = tenant_numbers(len(tenants))
    oldest = epoch_us(now - dt.timedelta(days=30))
    step = (epoch_us(now - dt.timedelta(hours=3)) - oldest) // count
    out: list[RecordTuple] = []
    for i in range(count):
        k = int(rng.random() * len(tenants))
        start = oldest + i * step + int(rng.random() * step)
        ms = talk_ms(rng)
        direction = "inbound" if rng.random() < 0.5 else "outbound"
        ours, other = numbers[k][int(rng.random() * 200)], pstn_number(rng)
        caller, callee = (other, ours) if direction == "inbound" else (ours, other)
        end = start + ms * 1000
        duration = -(-ms // 1000) * US  # whole seconds, rounded up, as billed
        call_id = guid(rng)
        out.append(
            (f"cdr-{i:010d}", call_id, tenants[k], caller, callee, direction, start, end, duration)
        )
    return out


def encoded_batches(messages: list[pb.CallDurationRecord], run: int, count: int) -> list[bytes]:
    """The first `count` records under the ids of run `run` (`r<run>-...`, distinct across runs),
    as encoded SubmitCallDurationsRequests of BATCH records."""
    batches: list[bytes] = []
    for number, first in enumerate(range(0, count, BATCH)):
        request = pb.SubmitCallDurationsRequest(batch_id=f"r{run}-{number}")
        for message in messages[first : min(count, first + BATCH)]:
            record = request.records.add()
            record.CopyFrom(message)
            record.record_id = f"r{run}-{message.record_id}"
            record.call_id = f"r{run}-{message.call_id}"
        batches.append(request.SerializeToString())
    return batches


async def submit_once(
    channel: grpc.aio.Channel, batches: list[bytes], in_flight: int, pid: int
) -> dict[str, Any]:
    """Submit the batches on one stream with at most `in_flight` unacknowledged; time from the
    first send to the last acknowledgement."""
    method = channel.stream_stream(
        SUBMIT_METHOD,
        request_serializer=None,  # the batches are encoded already
        response_deserializer=pb.SubmitCallDurationsResponse.FromString,
    )
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    marks: list[tuple[float, int]] = []  # (seconds since the first send, records acknowledged)
    window = CpuWindow([pid])

    def answered(response: pb.SubmitCallDurationsResponse) -> None:
        outcomes["accepted"] += response.accepted_count
        outcomes["duplicate"] += response.duplicate_count
        outcomes["rejected"] += response.refused_count
        marks.append((time.perf_counter() - window.started, sum(outcomes.values())))
        reasons.update(r.reason for r in response.results if r.reason)

    await runner.write_windowed(method(timeout=1800), batches, in_flight, answered)
    cpu = window.end()
    return {
        "batches": len(batches),
        "acks": len(marks),
        "accepted": outcomes["accepted"],
        "duplicate": outcomes["duplicate"],
        "rejected": outcomes["rejected"],
        "reasons": dict(reasons.most_common(5)),
        "marks": marks,
        **cpu.figures(),
    }


async def submit_worker(spec: Spec) -> None:
    """The operator's client process: makes its records once, says READY (with how long that
    took); then each `GO <address> <pid> <run> <count>` submits the first `count` of them under
    the ids of run `run` to the server at `address` and answers with a JSON line."""
    creds = credentials(spec["root"], "operator", OPERATOR)
    t0 = time.perf_counter()
    messages = [
        record_message(r)
        for r in ingest_records(spec["records"], spec["seed"], dt.datetime.now(dt.UTC))
    ]
    print(json.dumps({"made_s": time.perf_counter() - t0}), flush=True)
    async for line in runner.commands():
        _, address, pid, run, count = line.split()
        batches = encoded_batches(messages, int(run), int(count))
        async with grpc.aio.secure_channel(address, creds) as channel:
            await channel.channel_ready()
            try:
                result = await submit_once(channel, batches, spec["in_flight"], int(pid))
                result["records"] = int(count)
            except grpc.aio.AioRpcError as error:
                result = {"error": f"{error.code().name}: {error.details()}"}
        print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- query client


async def reconcile_once(
    stub: pb_grpc.UsageServiceStub, pid: int, start: int, end: int
) -> dict[str, Any]:
    window = CpuWindow([pid])
    response = await stub.GetReconciliation(
        pb.GetReconciliationRequest(start_time=stamp(start), end_time=stamp(end)), timeout=1800
    )
    return {
        **window.end().figures(),
        "matched": response.matched_count,
        "mismatched": response.mismatch_count,
        "platform_only": response.platform_only_count,
        "operator_only": response.operator_only_count,
        "unanswered_on_platform": response.unanswered_on_platform_count,
        "platform_total_us": response.platform_total_duration.ToMicroseconds(),
        "operator_total_us": response.operator_total_duration.ToMicroseconds(),
    }


async def discrepancies_once(
    stub: pb_grpc.UsageServiceStub, pid: int, start: int, end: int, batch: int
) -> dict[str, Any]:
    """Read every discrepancy of the period; count them by kind, check their order, and time
    the first response and the gaps between responses."""
    request = pb.StreamDiscrepanciesRequest(
        start_time=stamp(start), end_time=stamp(end), max_batch_size=batch
    )
    kinds: Counter[str] = Counter()
    gaps: list[float] = []
    ordered = True
    last: tuple[int, int, str] = (0, 0, "")
    first_s: float | None = None
    responses = 0
    window = CpuWindow([pid])
    previous = time.perf_counter()
    async for response in stub.StreamDiscrepancies(request, timeout=1800):
        now = time.perf_counter()
        gaps.append(now - previous)
        previous = now
        if first_s is None:
            first_s = gaps[0]
        responses += 1
        for d in response.discrepancies:
            key = (d.start_time.seconds, d.start_time.nanos, d.call_id)
            ordered = ordered and key > last
            last = key
            kinds[pb.DiscrepancyKind.Name(d.kind)] += 1
    timing = window.end().figures()
    later = sorted(gaps[1:]) or [0.0]
    tenth = max(1, len(gaps) // 10)
    return {
        **timing,
        "discrepancies": sum(kinds.values()),
        "kinds": dict(kinds),
        "responses": responses,
        "ordered": ordered,
        "first_s": first_s or 0.0,
        "gap_median_s": later[len(later) // 2],
        "gap_max_s": later[-1],
        # the mean wait for a response over the first and the last tenth of the stream
        "gap_first_tenth_s": sum(gaps[1 : 1 + tenth]) / len(gaps[1 : 1 + tenth] or [0]),
        "gap_last_tenth_s": sum(gaps[-tenth:]) / tenth,
    }


async def summary_once(
    stub: pb_grpc.UsageServiceStub, pid: int, start: int, end: int, page_size: int
) -> dict[str, Any]:
    """Every page of the operator's usage by day; the rows as [tenant, day, direction, calls,
    billed s, operator calls, operator s]."""
    rows: list[list[Any]] = []
    pages: list[float] = []
    token = ""
    window = CpuWindow([pid])
    while True:
        t0 = time.perf_counter()
        response = await stub.GetUsageSummary(
            pb.GetUsageSummaryRequest(
                start_time=stamp(start),
                end_time=stamp(end),
                granularity=pb.GRANULARITY_DAY,
                page_size=page_size,
                page_token=token,
            ),
            timeout=1800,
        )
        pages.append(time.perf_counter() - t0)
        for row in response.rows:
            operator = [s for s in row.by_source if s.source == pb.DURATION_SOURCE_OPERATOR]
            rows.append(
                [
                    row.tenant_id,
                    row.period_start_time.ToDatetime().strftime("%Y-%m-%d"),
                    "inbound"
                    if row.direction == direction_pb.CALL_DIRECTION_INBOUND
                    else "outbound",
                    row.call_count,
                    row.billed_duration.seconds,
                    sum(s.call_count for s in operator),
                    sum(s.billed_duration.seconds for s in operator),
                ]
            )
        token = response.next_page_token
        if not token:
            break
    return {**window.end().figures(), "pages": len(pages), "page_s": pages, "rows": rows}


async def query_worker(spec: Spec) -> None:
    """The operator's client process for the month: one channel, kept; says READY once
    connected; then answers each command with a JSON line: `RECONCILE`, `DISCREPANCIES
    <max_batch_size>`, `SUMMARY <page_size>`, all for the period of the spec."""
    creds = credentials(spec["root"], "operator", OPERATOR)
    start, end, pid = spec["start_us"], spec["end_us"], spec["pid"]
    async with grpc.aio.secure_channel(
        spec["address"], creds, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = pb_grpc.UsageServiceStub(channel)
        # Connect, and one small call through the whole path (one hour of the period).
        await stub.GetReconciliation(
            pb.GetReconciliationRequest(start_time=stamp(start), end_time=stamp(start + 3600 * US)),
            timeout=60,
        )
        print("READY", flush=True)
        async for line in runner.commands():
            command, *rest = line.split()
            try:
                if command == "RECONCILE":
                    result = await reconcile_once(stub, pid, start, end)
                elif command == "DISCREPANCIES":
                    result = await discrepancies_once(stub, pid, start, end, int(rest[0]))
                else:
                    result = await summary_once(stub, pid, start, end, int(rest[0]))
            except grpc.aio.AioRpcError as error:
                result = {"error": f"{error.code().name}: {error.details()}"}
            print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- raw baselines


def stored_rows(source: str, prefix: str) -> list[Row]:
    """The call_durations rows the system wrote for record ids starting with `prefix`, in the
    order it wrote them (the order of their record ids)."""
    rows = fetch(
        source,
        f"SELECT {', '.join(DURATION_COLUMNS)} FROM call_durations"
        " WHERE record_id >= ? AND record_id < ?",
        *prefix_range(prefix),
    )
    if not rows:
        raise RuntimeError(f"no stored records with ids {prefix}*")
    return sorted(rows, key=lambda row: str(row[1]))


def in_process(
    database: str, query: rules.ReconcileQuery, usage: rules.UsageQuery
) -> dict[str, Any]:
    """The service's own storage functions on the month, called in this process without gRPC
    (after the system's measurements, with the system idle): the reconciliation, every
    discrepancy in one query, every usage row in one query; seconds each."""
    db = Database(database, 1)
    try:
        t0 = time.perf_counter()
        db.transaction(reconciliation.reconcile, query)
        t1 = time.perf_counter()
        found = db.transaction(reconciliation.discrepancies, query, None, None, 10**9)
        t2 = time.perf_counter()
        rows = db.transaction(usage_query.usage_rows, usage, None, 10**7)
        t3 = time.perf_counter()
    finally:
        db.close()
    return {
        "reconcile_s": t1 - t0,
        "discrepancies_s": t2 - t1,
        "discrepancies": len(found),
        "usage_s": t3 - t2,
        "usage_rows": len(rows),
    }


# --------------------------------------------------------------------------- orchestrator


@dataclass
class IngestRun:
    kind: str  # "system" or "raw"
    round: int
    records: int
    records_per_s: float
    seconds: float
    client_cpu: float | None
    server_cpu: float | None  # for raw: the inserting process's CPU
    other_cpu: float | None  # cores busy with anything else (system runs): noise
    accepted: int | None
    rejected: int | None
    first_tenth_per_s: float  # records/s over the first 10% of the records
    last_tenth_per_s: float  # and over the last 10%, into a table 9 times as large


def tenths(marks: Sequence[Sequence[float]], total: int) -> tuple[float, float]:
    """Records/s over about the first and the last tenth of a run's records, from its
    (seconds since the start, records done) marks, one per batch."""
    t1, n1 = next((t, n) for t, n in marks if n >= total / 10)
    t9, n9 = max(((t, n) for t, n in marks if n <= total * 9 / 10), default=(0.0, 0))
    last_t, last_n = marks[-1]
    return n1 / t1, (last_n - n9) / max(last_t - t9, 1e-9)


def ingest_run(
    client: Child, server: ServerProcess, round_no: int, run: int, count: int
) -> tuple[IngestRun, dict[str, Any]]:
    result = client.ask(f"GO {server.address} {server.pid} {run} {count}")
    if result["accepted"] != count:
        raise RuntimeError(
            f"ingest run {run}: {result['accepted']:,} of {count:,} records accepted"
            f" ({result['duplicate']:,} duplicate, {result['rejected']:,} rejected:"
            f" {result['reasons']})"
        )
    return (
        IngestRun(
            kind="system",
            round=round_no,
            records=count,
            records_per_s=result["accepted"] / result["seconds"],
            seconds=result["seconds"],
            client_cpu=result["client_cpu"],
            server_cpu=result["server_cpu"],
            other_cpu=result["other_cpu"],
            accepted=result["accepted"],
            rejected=result["rejected"],
            first_tenth_per_s=tenths(result["marks"], count)[0],
            last_tenth_per_s=tenths(result["marks"], count)[1],
        ),
        result,
    )


def raw_run(rows: list[Row], target: str, round_no: int, method: str) -> IngestRun:
    """`rows` inserted durably into a fresh schema at the database URL `target`, BATCH rows per
    transaction, by `method` (`rows.durable_inserts`)."""
    batches = [[part] for part in chunks(rows, BATCH)]
    raw = durable_inserts(target, [("call_durations", DURATION_COLUMNS)], batches, method)
    return IngestRun(
        kind="raw" if method == "executemany" else f"raw ({method})",
        round=round_no,
        records=raw["records"],
        records_per_s=raw["records"] / raw["seconds"],
        seconds=raw["seconds"],
        client_cpu=None,
        server_cpu=raw["cpu"],
        other_cpu=None,
        accepted=None,
        rejected=None,
        first_tenth_per_s=tenths(raw["marks"], raw["records"])[0],
        last_tenth_per_s=tenths(raw["marks"], raw["records"])[1],
    )


def _rate(run: IngestRun) -> float:
    return run.records_per_s


def check_month(expected: Expected, answers: dict[str, Any]) -> list[str]:
    """Every way the system's answers differ from what was filled (empty: all equal)."""
    problems: list[str] = []
    want = {
        "matched": expected.matched,
        "mismatched": expected.mismatched,
        "platform_only": expected.platform_only,
        "operator_only": expected.operator_only,
        "unanswered_on_platform": expected.unanswered_on_platform,
        "platform_total_us": expected.platform_total_us,
        "operator_total_us": expected.operator_total_us,
    }
    for number, got in enumerate(answers["reconcile"], 1):
        for key, value in want.items():
            if got[key] != value:
                problems.append(
                    f"GetReconciliation round {number}: {key} {got[key]:,} != {value:,}"
                )
    kinds = {
        "DISCREPANCY_KIND_MISMATCH": expected.mismatched,
        "DISCREPANCY_KIND_MISSING_FROM_OPERATOR": expected.platform_only,
        "DISCREPANCY_KIND_UNKNOWN_TO_PLATFORM": expected.operator_only,
        "DISCREPANCY_KIND_UNANSWERED_ON_PLATFORM": expected.unanswered_on_platform,
    }
    listed = answers["discrepancies"]
    for kind, value in kinds.items():
        if listed["kinds"].get(kind, 0) != value:
            problems.append(
                f"StreamDiscrepancies: {kind} {listed['kinds'].get(kind, 0):,} != {value:,}"
            )
    if not listed["ordered"]:
        problems.append("StreamDiscrepancies: not ordered by start time then call_id")
    got_rows = {(r[0], r[1], r[2]): r[3:] for r in answers["summary"]["rows"]}
    if len(got_rows) != len(answers["summary"]["rows"]):
        problems.append("GetUsageSummary: a (tenant, day, direction) row came twice")
    if got_rows != expected.usage:
        differ = [
            k
            for k in expected.usage.keys() | got_rows.keys()
            if got_rows.get(k) != expected.usage.get(k)
        ]
        problems.append(
            f"GetUsageSummary: {len(differ):,} of {len(expected.usage):,} rows differ, e.g."
            f" {differ[0]}: {got_rows.get(differ[0])} != {expected.usage.get(differ[0])}"
        )
    return problems


def run(args: argparse.Namespace) -> dict[str, Any]:
    ingest_runs: list[IngestRun] = []
    profile: dict[str, Any] | None = {} if args.profile else None
    with (
        runner.workspace("opconnect-usage-bench-", database_url=args.database) as ws,
        runner.Children() as children,
    ):
        root = ws.root
        settings = ws.settings("ingest1")
        # The client makes its records while the month is filled (neither is measured).
        submitter = children.add(
            Child(
                "submit",
                ws.spec(records=args.records, seed=args.seed, in_flight=args.in_flight),
            )
        )
        print(
            f"filling a month of {args.calls:,} platform calls and their records (and making"
            f" {args.records:,} records to submit in the client) ...",
            flush=True,
        )
        today = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
        end = dt.datetime(today.year, today.month, today.day, tzinfo=dt.UTC)
        start = end - dt.timedelta(days=30)
        start_us, end_us = epoch_us(start), epoch_us(end)
        filled, expected = fill(
            ws.settings("month"), args.calls, args.tenants, args.seed + 1, start_us, end_us
        )
        made_s = json.loads(submitter.line())["made_s"]
        print(f"filled in {filled.seconds:.1f} s", flush=True)

        rows: list[Row] = []
        for round_no in range(1, args.ingest_rounds + 1):
            # Each round into a fresh system; the raw rows are the first system run's.
            for kind in in_turn(["system", "raw"], round_no):
                if kind == "raw":
                    for method in RAW_METHODS[ws.backend]:
                        target = ws.database(f"raw_{method}{round_no}")
                        ingest_runs.append(raw_run(rows, target, round_no, method))
                        done = ingest_runs[-1]
                        print(f"   {done.kind} {done.records_per_s:,.0f} records/s", flush=True)
                    continue
                print(f"ingest round {round_no}: {args.records:,} records ...", flush=True)
                data = f"ingest{round_no}"
                system = children.add(ServerProcess("system", ws.spec(data, profile=args.profile)))
                ingested, _ = ingest_run(submitter, system, round_no, round_no, args.records)
                ingest_runs.append(ingested)
                system.stop()
                print(
                    f"   {ingested.records_per_s:,.0f} records/s, {ingested.seconds:.1f} s",
                    flush=True,
                )
                if round_no == 1:
                    rows = stored_rows(ws.database(data), "r1-")
        for extra in range(args.raw_rounds_extra):
            number = args.ingest_rounds + extra + 1
            for method in RAW_METHODS[ws.backend]:
                target = ws.database(f"raw_{method}{number}")
                ingest_runs.append(raw_run(rows, target, number, method))
        del rows
        if profile is not None:
            count = min(args.records, args.profile_records)
            print(f"profiled ingest: {count:,} records ...", flush=True)
            system = children.add(
                ServerProcess("system", ws.spec("profiled", profile=args.profile))
            )
            (profiled, _), text = runner.profiled(
                system,
                root / "ingest.prof",
                25,
                lambda: ingest_run(submitter, system, 0, PROFILE_RUN, count),
            )
            system.stop()
            profile["ingest"] = {"run": asdict(profiled), "text": text}
        submitter.stop()

        print("querying the month ...", flush=True)
        month = children.add(ServerProcess("system", ws.spec("month", profile=args.profile)))
        querier = children.add(
            Child(
                "query",
                ws.spec(address=month.address, pid=month.pid, start_us=start_us, end_us=end_us),
            )
        )
        querier.expect("READY")
        answers: dict[str, Any] = {"reconcile": []}
        for round_no in range(1, args.rounds + 1):
            answers["reconcile"].append(querier.ask("RECONCILE"))
            seconds = answers["reconcile"][-1]["seconds"]
            print(f"   GetReconciliation round {round_no}: {seconds:.2f} s", flush=True)
        answers["discrepancies"] = querier.ask(f"DISCREPANCIES {args.discrepancy_batch}")
        print(f"   StreamDiscrepancies: {answers['discrepancies']['seconds']:.1f} s", flush=True)
        answers["summary"] = querier.ask(f"SUMMARY {PAGE_SIZE}")
        print(f"   GetUsageSummary: {answers['summary']['seconds']:.2f} s", flush=True)
        if profile is not None:
            profiled_month, text = runner.profiled(
                month,
                root / "month.prof",
                20,
                lambda: {
                    "reconcile": querier.ask("RECONCILE"),
                    "discrepancies": querier.ask(f"DISCREPANCIES {args.discrepancy_batch}"),
                    "summary": querier.ask(f"SUMMARY {PAGE_SIZE}"),
                },
            )
            for value in profiled_month.values():
                value.pop("rows", None)
            profile["month"] = {"run": profiled_month, "text": text}
        querier.stop()
        month.stop()
        tolerance = rules.Tolerance(
            dt.timedelta(seconds=settings.reconcile_tolerance_s),
            settings.reconcile_tolerance_ratio,
        )
        direct = in_process(
            ws.database("month"),
            rules.ReconcileQuery(OPERATOR, start, end, None, tolerance),
            rules.UsageQuery(start, end, rules.Granularity.DAY, OPERATOR, None),
        )

    problems = check_month(expected, answers)
    report = make_report(
        args, settings, made_s, ingest_runs, filled, expected, answers, direct, problems, profile
    )
    report["settings"]["database"] = ws.described()
    report["backend"] = ws.backend
    return report


def make_report(
    args: argparse.Namespace,
    settings: Settings,
    made_s: float,
    ingest_runs: list[IngestRun],
    filled: FillResult,
    expected: Expected,
    answers: dict[str, Any],
    direct: dict[str, Any],
    problems: list[str],
    profile: dict[str, Any] | None,
) -> dict[str, Any]:
    best_system = max((r for r in ingest_runs if r.kind == "system"), key=_rate)
    best_raw = max((r for r in ingest_runs if r.kind == "raw"), key=_rate)
    best_copy = max((r for r in ingest_runs if r.kind == "raw (copy)"), key=_rate, default=None)
    ratio = best_system.records_per_s / best_raw.records_per_s
    reconcile_s = min(r["seconds"] for r in answers["reconcile"])
    listed = answers["discrepancies"]
    summary = {k: v for k, v in answers["summary"].items() if k != "rows"}
    summary["rows"] = len(answers["summary"]["rows"])
    return {
        "machine": machine(),
        "settings": {
            "database": "",  # the workspace's (run)
            "tls": "mutual, dev PKI in a temp dir",
            "log_level": settings.log_level,
            "rate_per_operator": f"{settings.rate_per_operator:g}",
            "rate_burst": settings.rate_burst,
            "db_threads": settings.db_threads,
            "reconcile_tolerance": f"max({settings.reconcile_tolerance_s:g} s,"
            f" {settings.reconcile_tolerance_ratio:g})",
            "usage_call_feed": "off (no feed_* certificate: the month is filled directly)",
        },
        "params": {
            "records": args.records,
            "ingest_rounds": args.ingest_rounds,
            "in_flight": args.in_flight,
            "calls": args.calls,
            "tenants": args.tenants,
            "rounds": args.rounds,
            "discrepancy_batch": args.discrepancy_batch,
            "seed": args.seed,
        },
        "ingest": {
            "made_s": made_s,
            "runs": [asdict(r) for r in ingest_runs],
            "best": {"system": best_system.records_per_s, "raw": best_raw.records_per_s},
            "ratio": ratio,
            # PostgreSQL: against COPY of the same rows too (None on SQLite)
            "copy_ratio": best_system.records_per_s / best_copy.records_per_s
            if best_copy
            else None,
            # the same two runs over their first and their last tenth of the records
            "ratio_first_tenth": best_system.first_tenth_per_s / best_raw.first_tenth_per_s,
            "ratio_last_tenth": best_system.last_tenth_per_s / best_raw.last_tenth_per_s,
            "target": INGEST_TARGET,
        },
        "fill": asdict(filled),
        "expected": {k: v for k, v in asdict(expected).items() if k != "usage"}
        | {"usage_rows": len(expected.usage), "discrepancies": expected.discrepancies},
        "month": {
            "reconcile": answers["reconcile"],
            "discrepancies": listed,
            "summary": summary,
            "in_process": direct,
            "problems": problems,
            "target_s": SECONDS_TARGET,
        },
        "profile": profile,
        "ingest_ratio": round(ratio, 4),
        "reconcile_s": round(reconcile_s, 3),
        "discrepancies_s": round(listed["seconds"], 3),
        "usage_summary_s": round(answers["summary"]["seconds"], 3),
    }


def _share(value: float | None) -> str:
    return share(value, "-")


def _verdict(seconds: float) -> str:
    return verdict(seconds < SECONDS_TARGET)


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    ingest_runs = [IngestRun(**r) for r in report["ingest"]["runs"]]
    print()
    print_header("opconnect usage benchmark", report)
    print()
    ing = report["ingest"]
    print(
        f"1. SubmitCallDurations ingest: {args.records:,} valid records of one operator in batches"
        f" of {BATCH:,}, at most {args.in_flight} in flight, one operator client process (batches"
        f" encoded before the clock starts; records made in {ing['made_s']:.1f} s while the month"
        " was filled), each round into a"
        " fresh system, first send to last ack; raw: the rows the system wrote, by"
        f" {RAW_TEXT[report['backend']]} into a fresh schema, one durable transaction per batch"
    )
    print(
        f"   {'kind':<12}{'round':>6}{'records/s':>11}{'1st 10%':>9}{'last 10%':>10}"
        f"{'seconds':>9}{'client CPU':>12}{'server CPU':>12}{'other CPU':>11}{'accepted':>11}"
        f"{'rejected':>10}"
    )
    for r in ingest_runs:
        accepted = f"{r.accepted:,}" if r.accepted is not None else "-"
        rejected = f"{r.rejected:,}" if r.rejected is not None else "-"
        print(
            f"   {r.kind:<12}{r.round:>6}{r.records_per_s:>11,.0f}{r.first_tenth_per_s:>9,.0f}"
            f"{r.last_tenth_per_s:>10,.0f}{r.seconds:>9.2f}{_share(r.client_cpu):>12}"
            f"{_share(r.server_cpu):>12}{_share(r.other_cpu):>11}{accepted:>11}{rejected:>10}"
        )
    print(
        "   (records/s over the whole run, over its first 10% of records and over its last 10%,"
        " when the table holds 9 times as many; raw's CPU is the inserting process's; CPU in"
        " shares of one core, all threads)"
    )
    met = verdict(ing["ratio"] >= INGEST_TARGET)
    print(
        f"   best system {ing['best']['system']:,.0f} / best raw {ing['best']['raw']:,.0f}"
        f" records/s = {ing['ratio']:.2f} (target >= {INGEST_TARGET}: {met}); the same"
        f" runs over their first 10% of records {ing['ratio_first_tenth']:.2f}, over their last"
        f" {ing['ratio_last_tenth']:.2f} (raw: executemany)"
    )
    if ing["copy_ratio"] is not None:
        print(f"   against COPY of the same rows (best raw (copy)): {ing['copy_ratio']:.2f}")
    print()

    f, e, m = report["fill"], report["expected"], report["month"]
    print(
        f"2. A month: {f['platform_calls']:,} platform calls of the operator over 30 days"
        f" ({e['answered']:,} answered) and {f['records']:,} duration records, {f['tenants']}"
        f" tenants, {f['database_mb']:,.0f} MB, filled in {f['seconds']:.1f} s"
        f" ({f['templates']:,} rows of each table through the service's own code in"
        f" {f['real_path_s']:.1f} s, the rest made as it makes them in {f['copies_s']:.1f} s,"
        f" the usage by day counted by its migration in {f['usage_days_s']:.1f} s)."
        " Not a figure of merit."
    )
    print(
        f"   filled: {e['matched']:,} matched, {e['mismatched']:,} mismatched,"
        f" {e['platform_only']:,} platform-only, {e['operator_only']:,} operator-only,"
        f" {e['unanswered_on_platform']:,} unanswered on the platform;"
        f" {e['discrepancies']:,} discrepancies; {e['usage_rows']:,} usage rows"
        " (tenant x day x direction)"
    )
    print(
        f"   {'query (one operator client)':<42}{'seconds':>9}{'server CPU':>12}{'other CPU':>11}"
    )
    for number, r in enumerate(m["reconcile"], 1):
        print(
            f"   {f'GetReconciliation, 30 days, round {number}':<42}{r['seconds']:>9.2f}"
            f"{_share(r['server_cpu']):>12}{_share(r['other_cpu']):>11}"
        )
    d = m["discrepancies"]
    print(
        f"   {'StreamDiscrepancies, 30 days, all':<42}{d['seconds']:>9.2f}"
        f"{_share(d['server_cpu']):>12}{_share(d['other_cpu']):>11}"
    )
    s = m["summary"]
    label = f"GetUsageSummary by day, {s['pages']} pages of {PAGE_SIZE:,}"
    print(
        f"   {label:<42}{s['seconds']:>9.2f}{_share(s['server_cpu']):>12}"
        f"{_share(s['other_cpu']):>11}"
    )
    rate = d["discrepancies"] / d["seconds"] if d["seconds"] else 0.0
    print(
        f"   StreamDiscrepancies: {d['discrepancies']:,} discrepancies in {d['responses']:,}"
        f" responses of up to {args.discrepancy_batch:,}, {rate:,.0f} discrepancies/s; first"
        f" response after {d['first_s']:.2f} s, then one every {d['gap_median_s']:.2f} s"
        f" (median; slowest {d['gap_max_s']:.2f} s; mean {d['gap_first_tenth_s']:.2f} s over"
        f" the first tenth of the stream, {d['gap_last_tenth_s']:.2f} s over the last)"
    )
    pages = ", ".join(f"{p:.2f}" for p in s["page_s"])
    print(f"   GetUsageSummary: {s['rows']:,} rows; seconds per page: {pages}")
    x = m["in_process"]
    print(
        "   in-process baseline (the service's storage functions on this database, no gRPC, one"
        f" query each): reconcile {x['reconcile_s']:.2f} s; all {x['discrepancies']:,}"
        f" discrepancies {x['discrepancies_s']:.2f} s; all {x['usage_rows']:,} usage rows"
        f" {x['usage_s']:.2f} s"
    )
    if m["problems"]:
        print("   figures checked against the fill: DIFFER")
        for problem in m["problems"]:
            print(f"     {problem}")
    else:
        print(
            "   figures checked against the fill: every reconciliation count and total, every"
            " discrepancy's kind and order, every usage row: equal"
        )
    print(
        f"   reconcile {report['reconcile_s']:.2f} s (best round), discrepancies"
        f" {report['discrepancies_s']:.2f} s, usage summary {report['usage_summary_s']:.2f} s"
        f" (target: seconds, not minutes, i.e. each < {SECONDS_TARGET:g} s:"
        f" {_verdict(report['reconcile_s'])} / {_verdict(report['discrepancies_s'])} /"
        f" {_verdict(report['usage_summary_s'])})"
    )
    if report["profile"]:
        if "ingest" in report["profile"]:
            profiled = report["profile"]["ingest"]
            print()
            print(
                f"Server profile of one more ingest ({profiled['run']['records']:,} records into a"
                " fresh system): cProfile of the event-loop thread and of every executor thread,"
                " merged (validation runs on the loop's default executor, storage on the database"
                " threads; C code that releases the GIL is not seen;"
                f" {profiled['run']['records_per_s']:,.0f} records/s while profiled):"
            )
            print(profiled["text"].rstrip())
        if "month" in report["profile"]:
            print()
            print(
                "Server profile of one more GetReconciliation, StreamDiscrepancies and"
                " GetUsageSummary on the month (same threads, merged):"
            )
            print(report["profile"]["month"]["text"].rstrip())
    print_figures(
        report,
        [
            ("ingest_ratio", f"{report['ingest']['ratio']:.2f}"),
            ("reconcile_s", f"{report['reconcile_s']:.2f}"),
            ("discrepancies_s", f"{report['discrepancies_s']:.2f}"),
            ("usage_summary_s", f"{report['usage_summary_s']:.2f}"),
        ],
    )


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=int, default=1_000_000, help="records per ingest run")
    p.add_argument("--ingest-rounds", type=int, default=1, help="ingest rounds (and raw)")
    p.add_argument("--raw-rounds-extra", type=int, default=0, help="more raw rounds after")
    p.add_argument("--in-flight", type=int, default=4, help="ingest batches unacknowledged")
    p.add_argument("--profile-records", type=int, default=200_000, help="profiled ingest run")
    p.add_argument("--calls", type=int, default=1_000_000, help="platform calls in the month")
    p.add_argument("--tenants", type=int, default=50, help="customer tenants in the month")
    p.add_argument("--rounds", type=int, default=3, help="GetReconciliation rounds")
    p.add_argument("--discrepancy-batch", type=int, default=1_000, help="max_batch_size")
    p.add_argument("--seed", type=int, default=20261123, help="seed of the generated data")


def check(args: argparse.Namespace) -> str | None:
    if min(args.records, args.calls, args.tenants, args.rounds, args.ingest_rounds) < 1:
        return "--records, --calls, --tenants, --rounds, --ingest-rounds must be >= 1"
    return None


SCENARIO = runner.Scenario(
    description=__doc__ or "",
    options=options,
    quick={"records": 2_000, "calls": 5_000, "tenants": 5, "rounds": 1, "profile_records": 1_000},
    roles={"serve": runner.serve, "submit": submit_worker, "query": query_worker},
    run=run,
    print_report=print_report,
    profile="cProfile the system (ingest, month)",
    check=check,
)

if __name__ == "__main__":
    sys.exit(runner.main(SCENARIO))
