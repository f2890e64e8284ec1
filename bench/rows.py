"""Rows written straight into SQLite: what the benchmarks that fill a database with many rows
share (the first rows go through the services' own code, the rest are made by the benchmark
as the services make them), and the raw baseline of durably inserting the rows a system wrote.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from runner import OPERATOR
from sqlalchemy.dialects import sqlite as sqlite_dialect

from gateway import registry
from plumbing.config import Settings
from plumbing.db import Database

T = TypeVar("T")
Row = tuple[Any, ...]


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """An INSERT of one row of `columns` into `table`, with `?` placeholders."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def time_text(column: sa.Column[Any]) -> Callable[[dt.datetime], Any]:
    """What SQLAlchemy stores in SQLite for a value of the DateTime `column` (its bind
    processor)."""
    dialect = sqlite_dialect.dialect()
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    if processor is None:
        raise RuntimeError(f"no SQLite bind processor for {column}")
    return processor


def prefix_range(prefix: str) -> tuple[str, str]:
    """The keys starting with `prefix`: at least the first, below the second."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def open_database(settings: Settings) -> Database:
    """The database of `settings` migrated and OPERATOR registered (no trust anchor: the
    systems that run on it bind it to the operator CA), for the rows made through the services'
    own code."""
    db = Database(settings.sqlalchemy_url, 2)
    db.migrate()
    db.transaction(registry.add_operator, OPERATOR, "benchmark operator", write=True)
    return db


@contextmanager
def bulk_load(path: Path, tables: Sequence[str]) -> Iterator[sqlite3.Connection]:
    """A connection to the SQLite database at `path` for loading many rows into `tables`: no
    journal, no syncs, a large cache, and their secondary indexes dropped; on leaving, the
    indexes made again (same definitions, same contents: sorting once is much faster than
    inserting a million random keys) and WAL restored. Sync the disk afterwards (`os.sync`),
    so that no writeback of the load runs under the measurements."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-1000000")
        listed = ", ".join("?" * len(tables))
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            f" AND tbl_name IN ({listed})",
            tuple(tables),
        ).fetchall()
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        yield connection
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def scalar(path: Path, sql: str, *parameters: Any) -> int:
    """The one number `sql` selects from the SQLite database at `path`."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(connection.execute(sql, parameters).fetchone()[0])
    finally:
        connection.close()


def durable_inserts(
    target: Path, statements: Sequence[str], batches: Sequence[Sequence[Sequence[Row]]]
) -> dict[str, Any]:
    """The raw baseline: each batch's rows inserted with plain sqlite3 executemany into a fresh
    copy of the schema at `target` (the system's migrations: same tables, same indexes), one
    durable transaction per batch, WAL and synchronous=FULL as the system configures SQLite. A
    batch holds the rows of each of `statements`, in order. Answers the rows of the first
    statement (`records`), the seconds, this process's CPU over them (share of one core), and a
    (seconds since the start, records done) mark per batch."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the system's
    schema = Database(f"sqlite:///{target}", 1)
    schema.migrate()
    schema.close()
    connection = sqlite3.connect(target, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        marks: list[tuple[float, int]] = []
        done = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for batch in batches:
            connection.execute("BEGIN IMMEDIATE")
            for statement, rows in zip(statements, batch, strict=True):
                connection.executemany(statement, rows)
            connection.execute("COMMIT")
            done += len(batch[0])
            marks.append((time.perf_counter() - t0, done))
        seconds = time.perf_counter() - t0
        cpu = (time.process_time() - c0) / seconds
    finally:
        connection.close()
    return {"records": done, "seconds": seconds, "cpu": cpu, "marks": marks}
