"""The records log's head lock: how long a publish batch holds it, and what that allows.

Run from the repository root:

    .venv/bin/python bench/log_lock_bench.py [--database URL] [--batches N] [--json]

Every publish takes the `records` log's head lock (plumbing.changelog.allocate) and holds it to
its commit, so the publishes of every process on one database commit one at a time: the most
batches per second the log allows is 1 / the time the lock is held. This measures that time,
as the system itself does (`opconnect_changelog_lock_hold_seconds`), in process, without gRPC:
realistic records (simulator/calls.py, batches of 1,000) are prepared and their rows built
beforehand, then `--publishers` threads, each its own `Database` (a replica with its own
connections), publish them at once through `storage.publish` (`--publishers` 1 and then the
given number). Reported: the hold time per batch (mean and p99 bucket), the batches/s it allows,
the records/s committed; and, as a baseline in the same run, the very rows inserted raw by one
connection (PostgreSQL COPY, SQLite executemany; one durable transaction per batch):
`storage_ratio` = committed records/s of one publisher / raw records/s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import runner
import sqlalchemy as sa
from records_bench import realistic_records
from report import machine, print_figures, print_header
from rows import migrate

from plumbing.config import Settings
from plumbing.db import Database, driver_insert_many, time_form
from plumbing.metrics import Metrics
from services.records import convert, rules, storage

BATCH = rules.MAX_BATCH


def _lock_figures(metrics: Metrics) -> tuple[int, float, float]:
    """(batches, mean seconds, p99 bucket's upper bound) of the records log's lock."""
    count = total = 0.0
    buckets: list[tuple[float, float]] = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.labels.get("log") != rules.LOG:
                continue
            if sample.name == "opconnect_changelog_lock_hold_seconds_count":
                count = sample.value
            elif sample.name == "opconnect_changelog_lock_hold_seconds_sum":
                total = sample.value
            elif sample.name == "opconnect_changelog_lock_hold_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    p99 = next((le for le, seen in sorted(buckets) if seen >= 0.99 * count), float("inf"))
    return int(count), total / count if count else 0.0, p99


def _staged(count: int, seed: int, run: int, sqlite: bool) -> list[storage.Staged]:
    settings = Settings()
    thresholds = rules.thresholds(settings)
    messages = realistic_records(count, seed, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2))
    operators = {m.operator_id for m in messages}
    for message in messages:
        message.record.call_id = f"r{run}-{message.record.call_id}"[:64]
    out = []
    for first in range(0, count, BATCH):
        prepared = convert.prepare(messages[first : first + BATCH], operators, settings, thresholds)
        candidates = [c for c in prepared if isinstance(c, rules.Candidate)]
        out.append(storage.stage(candidates, sqlite))
    return out


@contextlib.contextmanager
def fresh_tables(base: str, folder: Path, run: int) -> Iterator[str]:
    """The URL of freshly migrated, empty tables: SQLite, a new database file in `folder`;
    PostgreSQL, a schema of their own on `base`'s server (dropped on leaving). Every run,
    raw or publish, starts from empty tables: index sizes are alike."""
    with contextlib.ExitStack() as stack:
        if base.startswith("postgresql"):
            url = stack.enter_context(runner.postgres_schema(base))
        else:
            url = f"sqlite:///{folder / f'run{run}.db'}"
        db = Database(url, threads=1)
        migrate(db)
        db.close()
        yield url


def publish_run(url: str, publishers: int, batches: int, seed: int, run: int) -> dict[str, Any]:
    """`publishers` replicas publishing `batches` batches each, all at once, into `url`."""
    metrics = Metrics()
    replicas = [Database(url, threads=2, metrics=metrics) for _ in range(publishers)]
    work = [
        _staged(batches * BATCH, seed + i, run * 100 + i, replicas[0].is_sqlite)
        for i in range(publishers)
    ]
    start = threading.Barrier(publishers + 1)
    accepted = [0] * publishers

    def publisher(number: int) -> None:
        db = replicas[number]
        start.wait()
        for staged in work[number]:
            stored = db.transaction(
                storage.publish, staged, convert.publish_time_field, convert.stored, write=True
            )
            accepted[number] += sum(r.outcome.value == "accepted" for r in stored.results)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(publishers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    for db in replicas:
        db.close()
    count, mean, p99 = _lock_figures(metrics)
    with sa.create_engine(url).connect() as connection:
        duplicated = connection.execute(
            sa.text("SELECT count(*) - count(DISTINCT call_id) FROM call_records")
        ).scalar_one()
    return {
        "duplicated_call_ids": int(duplicated),
        "publishers": publishers,
        "batches": count,
        "records": sum(accepted),
        "seconds": seconds,
        "records_per_s": sum(accepted) / seconds,
        "batches_per_s": count / seconds,
        "lock_mean_ms": mean * 1000,
        "lock_p99_bucket_ms": p99 * 1000,
        "lock_allows_batches_per_s": 1 / mean if mean else 0.0,
    }


def raw_run(url: str, batches: int, seed: int, run: int) -> dict[str, Any]:
    """The rows of `batches` batches inserted by one connection into the fresh tables of
    `url`, one transaction per batch: no lock, no look-up."""
    raw = Database(url, threads=1)
    sqlite = raw.is_sqlite
    work = _staged(batches * BATCH, seed, run, sqlite)
    now = dt.datetime.now(dt.UTC)
    stamp = convert.publish_time_field(now)
    moment = time_form(sqlite=sqlite)(now)
    position = 0
    rows = []
    for staged in work:
        records, streams = [], []
        for candidate, row, stream_rows in zip(
            staged.candidates, staged.records, staged.streams, strict=True
        ):
            position += 1
            records.append((position, *row, moment, convert.stored(candidate.body, stamp)))
            streams += [(position, *s, moment) for s in stream_rows]
        rows.append((records, streams))
    began = time.perf_counter()
    for records, streams in rows:
        raw.transaction(_insert, records, streams, write=True)
    seconds = time.perf_counter() - began
    raw.close()
    total = sum(len(r) for r, _ in rows)
    return {"records": total, "seconds": seconds, "records_per_s": total / seconds}


def _insert(session: Any, records: list[tuple[Any, ...]], streams: list[tuple[Any, ...]]) -> None:
    driver_insert_many(session, storage.RECORDS, storage.RECORD_COLUMNS, records)
    driver_insert_many(session, storage.STREAMS, storage.STREAM_COLUMNS, streams)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with runner.workspace("opconnect-log-lock-bench-") as ws:
        base = args.database
        runs: list[dict[str, Any]] = []
        for round_no in range(1, args.rounds + 1):
            with fresh_tables(base, ws.root, round_no * 10) as url:
                raw = raw_run(url, args.batches, args.seed, 900 + round_no)
            publish = []
            for n in sorted({1, args.publishers}):
                with fresh_tables(base, ws.root, round_no * 10 + n) as url:
                    publish.append(publish_run(url, n, args.batches, args.seed, round_no * 10 + n))
            runs.append({"round": round_no, "raw": raw, "publish": publish})
    duplicated = sum(p["duplicated_call_ids"] for r in runs for p in r["publish"])
    best_raw = max(r["raw"]["records_per_s"] for r in runs)
    one = [p for r in runs for p in r["publish"] if p["publishers"] == 1]
    best_one = max(p["records_per_s"] for p in one)
    return {
        "machine": machine(),
        "backend": "postgresql" if base.startswith("postgresql") else "sqlite",
        "settings": {"database": "postgresql" if base.startswith("postgresql") else "sqlite"},
        "params": vars(args),
        "runs": runs,
        "duplicated_call_ids": duplicated,
        "storage_ratio": round(best_one / best_raw, 4),
        "lock_mean_ms": round(min(p["lock_mean_ms"] for p in one), 3),
        "lock_allows_batches_per_s": round(max(p["lock_allows_batches_per_s"] for p in one), 1),
    }


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print_header("Records log head lock (in process, no gRPC)", report)
    print(f"   batches of {BATCH:,} realistic records, rows built beforehand")
    print("   round  kind        publishers  records/s  batches/s  lock mean ms  lock p99 <= ms")
    for r in report["runs"]:
        raw = r["raw"]
        print(f"   {r['round']:>5}  raw         {1:>10}  {raw['records_per_s']:>9,.0f}")
        for p in r["publish"]:
            print(
                f"   {r['round']:>5}  publish     {p['publishers']:>10}"
                f"  {p['records_per_s']:>9,.0f}  {p['batches_per_s']:>9.1f}"
                f"  {p['lock_mean_ms']:>12.2f}  {p['lock_p99_bucket_ms']:>13g}"
            )
    print(
        f"   the lock held {report['lock_mean_ms']:.2f} ms a batch (one publisher, best round):"
        f" at most {report['lock_allows_batches_per_s']:,.0f} batches/s"
        f" ({report['lock_allows_batches_per_s'] * BATCH:,.0f} records/s) for one log"
    )
    print(f"   call ids stored twice: {report['duplicated_call_ids']}")
    print_figures(
        report,
        [
            ("storage_ratio", f"{report['storage_ratio']:.2f}"),
            ("lock_mean_ms", f"{report['lock_mean_ms']:.2f}"),
            ("lock_allows_batches_per_s", f"{report['lock_allows_batches_per_s']:.0f}"),
        ],
    )


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, default=20, help="batches of 1,000 per publisher")
    p.add_argument("--publishers", type=int, default=4, help="concurrent publishers (replicas)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (raw, then publishers)")
    p.add_argument("--seed", type=int, default=20261129, help="seed of the realistic records")


SCENARIO = runner.Scenario(
    description=__doc__ or "",
    options=options,
    quick={"batches": 2, "publishers": 2, "rounds": 1},
    roles={},
    run=run,
    print_report=print_report,
)

if __name__ == "__main__":
    sys.exit(runner.main(SCENARIO))
