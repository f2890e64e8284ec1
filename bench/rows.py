"""Rows written straight into a benchmark's database, SQLite or PostgreSQL: what the benchmarks
that fill a database with many rows share (the first rows go through the services' own code,
the rest are made by the benchmark as the services make them), plain driver access to either
backend (sqlite3, psycopg), the bulk load, and the raw baselines of durably inserting the rows
a system wrote (sqlite3 `executemany`; psycopg `executemany` and `COPY`).

SQL here is written with `?` placeholders; on PostgreSQL they become `%s` (`driver_sql`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from runner import OPERATOR
from sqlalchemy.dialects import sqlite as sqlite_dialect

from gateway import registry
from plumbing import partitions
from plumbing.config import Settings
from plumbing.db import Database

T = TypeVar("T")
Row = tuple[Any, ...]
# How the raw baselines insert: one executemany per table and batch (both backends), or one
# COPY per table and batch (PostgreSQL only).
RAW_METHODS = {"sqlite": ("executemany",), "postgresql": ("executemany", "copy")}


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# --------------------------------------------------------------------------- either backend


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///").partition("?")[0])


def connect(url: str, *, read_only: bool = False) -> Any:
    """A DB-API connection to the database of SQLAlchemy URL `url` that begins no transaction
    by itself (statements outside BEGIN ... COMMIT commit alone): sqlite3 (`read_only`: opened
    so), or psycopg on PostgreSQL (its schema from the URL's search_path)."""
    if is_postgres(url):
        return psycopg.connect(url.replace("+psycopg", "", 1), autocommit=True)
    path = sqlite_path(url)
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    return sqlite3.connect(path, isolation_level=None)


def driver_sql(url: str, sql: str) -> str:
    """`sql`, written with `?` placeholders, for the driver of `url`."""
    return sql.replace("?", "%s") if is_postgres(url) else sql


def fetch(url: str, sql: str, *parameters: Any) -> list[Row]:
    """The rows `sql` selects."""
    connection = connect(url, read_only=True)
    try:
        cursor = connection.cursor()
        cursor.execute(driver_sql(url, sql), parameters)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        connection.close()


def scalar(url: str, sql: str, *parameters: Any) -> int:
    """The one number `sql` selects."""
    return int(fetch(url, sql, *parameters)[0][0])


def table_columns(url: str, table: str) -> list[str]:
    """The columns of `table`, in table order."""
    if is_postgres(url):
        rows = fetch(
            url,
            "SELECT column_name FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND table_name = ? ORDER BY ordinal_position",
            table,
        )
        return [r[0] for r in rows]
    return [r[1] for r in fetch(url, f"PRAGMA table_info({table})")]


def database_mb(url: str) -> float:
    """The size of the database (SQLite: its file; PostgreSQL: every table of its schema, with
    indexes and TOAST)."""
    if not is_postgres(url):
        return sqlite_path(url).stat().st_size / 1e6
    return (
        scalar(
            url,
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'",
        )
        / 1e6
    )


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """An INSERT of one row of `columns` into `table`, with `?` placeholders."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def time_value(column: sa.Column[Any], url: str) -> Callable[[dt.datetime], Any]:
    """What the driver is given for a value of the DateTime `column`, so that the row is the one
    SQLAlchemy stores: on SQLite its bind processor's text, on PostgreSQL the (aware) time."""
    if is_postgres(url):
        return lambda value: value
    dialect = sqlite_dialect.dialect()
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    if processor is None:
        raise RuntimeError(f"no SQLite bind processor for {column}")
    return processor


def as_time(value: str | dt.datetime) -> dt.datetime:
    """A stored time read back by the driver (SQLite: SQLAlchemy's text; PostgreSQL: an aware
    time), as an aware UTC time."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC)
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)


def prefix_range(prefix: str) -> tuple[str, str]:
    """The keys starting with `prefix`: at least the first, below the second."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def migrate(db: Database) -> None:
    """Migrate; on PostgreSQL also make the time partitions as a service makes them at start-up
    (plumbing/partitions.py), back to the longest retention: fills write rows of the past."""
    db.migrate()
    if db.is_postgres:
        partitions.create_all_ahead(db, dt.datetime.now(dt.UTC), Settings().usage_retention_s)


def open_database(settings: Settings) -> Database:
    """The database of `settings` migrated and OPERATOR registered (no trust anchor: the
    systems that run on it bind it to the operator CA), for the rows made through the services'
    own code."""
    db = Database(settings.sqlalchemy_url, 2)
    migrate(db)
    db.transaction(registry.add_operator, OPERATOR, "benchmark operator", write=True)
    return db


# --------------------------------------------------------------------------- the bulk load


class Loader:
    """Writes of a bulk load, one transaction from the first write to `commit`: `rows` into a
    table (SQLite: executemany; PostgreSQL: COPY), and single statements."""

    def __init__(self, url: str, connection: Any) -> None:
        self.url = url
        self.connection = connection
        self.postgres = is_postgres(url)
        self.open = False

    def _begin(self) -> None:
        if not self.open:
            self.connection.execute("BEGIN")
            self.open = True

    def rows(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        self._begin()
        if not self.postgres:
            self.connection.executemany(insert_sql(table, columns), rows)
            return
        with self.connection.cursor().copy(
            f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)

    def execute(self, sql: str, *parameters: Any) -> None:
        self._begin()
        self.connection.execute(driver_sql(self.url, sql), parameters)

    def commit(self) -> None:
        if self.open:
            self.connection.execute("COMMIT")
            self.open = False


@contextmanager
def bulk_load(url: str, tables: Sequence[str]) -> Iterator[Loader]:
    """A `Loader` for loading many rows into `tables` of the database at `url`, then the
    database made ready to measure on. SQLite: no journal, no syncs, a large cache, the tables'
    secondary indexes dropped and made again on leaving (same definitions, same contents:
    sorting once is much faster than inserting a million random keys), WAL restored.
    PostgreSQL: COPY without waiting for each commit's flush (`synchronous_commit` off in this
    session), indexes kept, then VACUUM (ANALYZE) of the tables (statistics for the planner,
    the visibility map set and hint bits written now rather than by the first measured reads)
    and a CHECKPOINT. Either way, sync the disk afterwards (`os.sync`), so that no writeback of
    the load runs under the measurements."""
    if is_postgres(url):
        connection = connect(url)
        try:
            connection.execute("SET synchronous_commit = off")
            yield Loader(url, connection)
            for table in tables:
                connection.execute(f"VACUUM (ANALYZE) {table}")
            # (not a superuser: the server's own checkpoints will do it)
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                connection.execute("CHECKPOINT")
        finally:
            connection.close()
        return
    connection = sqlite3.connect(sqlite_path(url), isolation_level=None)
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
        yield Loader(url, connection)
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


# --------------------------------------------------------------------------- raw baselines


def durable_inserts(
    target: str,
    tables: Sequence[tuple[str, Sequence[str]]],
    batches: Sequence[Sequence[Sequence[Row]]],
    method: str = "executemany",
) -> dict[str, Any]:
    """The raw baseline: each batch's rows inserted into a fresh copy of the schema at the
    database URL `target` (the system's migrations: same tables, same indexes), one durable
    transaction per batch, as the system's database commits: SQLite in WAL with
    synchronous=FULL, PostgreSQL with the server's own durability (`synchronous_commit` as
    configured). `method`: one `executemany` per table (sqlite3, or psycopg, which pipelines
    it), or one `COPY` per table (PostgreSQL). A batch holds the rows of each of `tables`
    (name, columns), in order. Answers the rows of the first table (`records`), the seconds,
    this process's CPU over them (share of one core), and a (seconds since the start, records
    done) mark per batch."""
    if not is_postgres(target):
        # private, as the system's
        sqlite_path(target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    schema = Database(target, 1)
    migrate(schema)
    schema.close()
    connection = connect(target)
    try:
        if not is_postgres(target):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
        begin = "BEGIN" if is_postgres(target) else "BEGIN IMMEDIATE"
        statements = [driver_sql(target, insert_sql(name, columns)) for name, columns in tables]
        copies = [f"COPY {name} ({', '.join(columns)}) FROM STDIN" for name, columns in tables]
        marks: list[tuple[float, int]] = []
        done = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for batch in batches:
            connection.execute(begin)
            cursor = connection.cursor()
            for statement, copy_sql, rows in zip(statements, copies, batch, strict=True):
                if method == "copy":
                    with cursor.copy(copy_sql) as copy:
                        for row in rows:
                            copy.write_row(row)
                elif rows:
                    cursor.executemany(statement, rows)
            connection.execute("COMMIT")
            done += len(batch[0])
            marks.append((time.perf_counter() - t0, done))
        seconds = time.perf_counter() - t0
        cpu = (time.process_time() - c0) / seconds
    finally:
        connection.close()
    return {"records": done, "seconds": seconds, "cpu": cpu, "marks": marks, "method": method}
