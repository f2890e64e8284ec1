"""Storage: SQLAlchemy 2 on SQLite (WAL, the embedded default) or PostgreSQL (by URL).

A `Database` is made at start-up, never at import time. Work is done in units: a function that
takes a `Session`, run by `await db.run(fn, ...)` on the database threads inside one transaction
(`write=True`: serialized with other writers on SQLite by BEGIN IMMEDIATE; read-only units on
PostgreSQL run at REPEATABLE READ so that everything they read is one snapshot). Schema changes
are Alembic migrations (migrations/), applied at start by `migrate()`.

Every unit passes a `FairGate` (plumbing.limits) first, in the lane of the principal of the call
it serves: a bounded number at once per principal, taken in turn between principals, and on
SQLite one writer at a time in the process. SQLite's "database is locked" (another process held
the lock past the busy timeout) answers RESOURCE_EXHAUSTED STORAGE_BUSY with RetryInfo, never
UNAVAILABLE. The SQLite files and their directory are private to the server's user (0600, 0700):
they hold whole phone numbers. With tracing on, a unit done for a traced call is a span of its own
(plumbing.tracing), named by the unit's function.

The hot single-row units (an assignment change) run by `await db.run_unit(fn, ...)` instead:
fn takes a `Unit`, a transaction on a driver connection of the same pool without a `Session`
(whose set-up, connection handling and commit cost more than such a unit's statements). It is
the same mechanism otherwise: the gate, the threads, the retry of busy SQLite, the errors mapped
(`_driver_errors`), the metrics and spans. On PostgreSQL a write unit's BEGIN goes in one
pipeline with its first statement (`Unit._first_fetch`): one round trip fewer. `driver_fetch`
and its kin take either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import datetime as dt
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg
from alembic import command
from alembic.config import Config
from opentelemetry.trace import Tracer
from prometheus_client.core import Metric
from sqlalchemy import Connection, Dialect, Engine, Table, create_engine, event, exc, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import QueuePool

from plumbing.errors import ApiError, resource_exhausted, unavailable
from plumbing.files import private_directory, private_files
from plumbing.limits import SYSTEM_LANE, FairGate
from plumbing.logs import get_logger
from plumbing.metrics import Metrics, gauge
from plumbing.rpc import current_principal
from plumbing.tracing import failed, traced, unit_span
from plumbing.writer_turns import WriterTurns

P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
log = get_logger("opconnect.db")


# session.info key: (log name, time.perf_counter()) of each change-log head lock the
# transaction took (plumbing.changelog.allocate); `Database.transaction` times them to commit.
LOG_LOCKS = "log_locks"


class Base(DeclarativeBase):
    """The declarative base of every table of every service (one schema, one migration line)."""


class Database:
    """An engine, its session makers, and the threads that run units of work."""

    def __init__(
        self,
        url: str,
        threads: int = 8,
        *,
        work_per_lane: int = 0,
        busy_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
        pool_size: int = 0,
        max_overflow: int = 2,
        prepare_threshold: int = 5,
    ) -> None:
        """`work_per_lane`: units one principal may run at once (0: as many as `threads`);
        `busy_timeout_s`: how long SQLite waits for another process's write lock; `metrics`:
        where units of work are counted and timed (none: not at all); `tracer`: where units
        done for a traced call are spans (none: tracing is off). PostgreSQL only:
        `pool_size` connections kept (0: `threads`), `max_overflow` more opened at a peak,
        `prepare_threshold` executions of a statement before psycopg prepares it on the server
        (0: never, as behind a transaction pooler)."""
        self.url = url
        self.metrics = metrics or Metrics(enabled=False)
        self.tracer = tracer
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        self.busy_timeout_s = busy_timeout_s
        self.gate = FairGate(threads, work_per_lane, one_writer=self.is_sqlite)
        # SQLite's writers of every process on the file take turns (plumbing.writer_turns).
        self._turns: WriterTurns | None = None
        if self.is_sqlite:
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                path = Path(url.removeprefix("sqlite:///").partition("?")[0])
                _private_database(path)
                self._turns = WriterTurns(path)
            engine = create_engine(
                url,
                pool_size=threads,
                max_overflow=0,
                connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
            )
            _sqlite_setup(engine, busy_timeout_s)
            read_engine: Engine = engine
            write_engine: Engine = engine.execution_options(sqlite_begin="IMMEDIATE")
            self.max_connections = threads
        else:
            engine = create_engine(
                url,
                pool_size=pool_size or threads,
                max_overflow=max_overflow,
                pool_pre_ping=True,
                connect_args=_psycopg_arguments(url, prepare_threshold),
            )
            read_engine = engine.execution_options(isolation_level="REPEATABLE READ")
            write_engine = engine
            self.max_connections = (pool_size or threads) + max_overflow
        self.engine: Engine = engine
        self._read = sessionmaker(read_engine, expire_on_commit=False)
        self._write = sessionmaker(write_engine, expire_on_commit=False)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="db")
        self.metrics.on_scrape("db_pool", self._pool_figures)
        for kind in ("read", "write"):  # at 0 from the start: a first failure is an increase
            for reason in ("busy", "unavailable"):
                self.metrics.db_unit_failures.labels(kind, reason)

    def _pool_figures(self) -> Iterator[Metric]:
        pool = self.engine.pool
        family = gauge(
            "opconnect_db_pool_connections",
            "Database connections of this process's pool, by state (in_use, idle).",
            ("state",),
        )
        limit = gauge(
            "opconnect_db_pool_max_connections",
            "Database connections this process's pool may open at once (its size plus overflow:"
            " db_pool_size + db_max_overflow on PostgreSQL).",
        )
        if isinstance(pool, QueuePool):
            family.add_metric(["in_use"], pool.checkedout())
            family.add_metric(["idle"], pool.checkedin())
        limit.add_metric([], self.max_connections)
        yield family
        yield limit

    def session(self, *, write: bool) -> Session:
        """A new session (use as a context manager with `.begin()`)."""
        return (self._write if write else self._read)()

    def transaction(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run fn(session, *args) in one transaction, on the calling thread. The change-log
        head locks it took are timed to its commit or rollback."""
        with self.session(write=write) as session:
            try:
                with session.begin():
                    return fn(session, *args)
            finally:
                locks = session.info.pop(LOG_LOCKS, None)
                if locks:
                    self._locks_released(locks)

    def _locks_released(self, locks: list[tuple[str, float]]) -> None:
        now = time.perf_counter()
        for log_name, taken in locks:
            self.metrics.log_lock_seconds.labels(log_name).observe(now - taken)

    def unit_transaction(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run fn(unit, *args) in one transaction on a driver connection of the pool (no
        Session: see the module docstring), on the calling thread; as `transaction` otherwise
        (PostgreSQL reads at REPEATABLE READ, SQLite writes begun IMMEDIATE, the change-log head
        locks timed to commit or rollback). A lost connection is dropped from the pool."""
        dialect = self.engine.dialect
        with _driver_errors_of(dialect, None, None, "connect"):  # as a Session's checkout fails
            pooled = self.engine.raw_connection()
        unit = Unit(pooled.dbapi_connection, dialect)
        try:
            unit.begin(write=write)
            try:
                result = fn(unit, *args)
                unit.commit()
            except BaseException:
                unit.rollback()
                raise
            return result
        except exc.DBAPIError as error:
            if error.connection_invalidated:
                pooled.invalidate()
            raise
        finally:
            unit.end()
            locks = unit.info.pop(LOG_LOCKS, None)
            if locks:
                self._locks_released(locks)
            pooled.close()

    async def run(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run fn(session, *args) in one transaction on a database thread.

        Storage that cannot be reached answers UNAVAILABLE (with RetryInfo), not a crash. The
        unit waits its turn at the gate first (see the module docstring); its place there is
        given back when its thread is done with it, also when the caller has gone.
        """
        return await self._run(self.transaction, fn, args, write)

    async def run_unit(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run fn(unit, *args) (a `Unit`, no Session) as `run` runs a Session's unit: the same
        gate, threads, retries, error mapping, metrics and spans."""
        return await self._run(self.unit_transaction, fn, args, write)

    async def _run(
        self,
        transaction: Callable[..., T],
        fn: Callable[..., T],
        args: tuple[Any, ...],
        write: bool,
    ) -> T:
        loop = asyncio.get_running_loop()
        lane = _lane()
        queued = time.perf_counter()
        await self.gate.enter(lane, write)
        call = functools.partial(self._timed, transaction, fn, args, write, queued)
        if self.tracer is not None and traced():
            call = functools.partial(self._traced, self.tracer, call, fn, write)
        ctx = contextvars.copy_context()
        try:
            work = self._executor.submit(ctx.run, call)
        except BaseException:
            self.gate.leave(lane, write)
            raise
        # One hop back to the loop when the thread is done: the gate left and the answer given
        # together (asyncio.wrap_future would take a second one).
        done: asyncio.Future[T] = loop.create_future()
        done.add_done_callback(functools.partial(_cancel_work, work))
        work.add_done_callback(functools.partial(_on_loop, loop, self._finish, lane, write, done))
        return await done

    def _finish(
        self, lane: str, write: bool, done: asyncio.Future[T], work: concurrent.futures.Future[T]
    ) -> None:
        """On the loop, once a unit's thread is done with it (or it was cancelled before it
        ran): its place at the gate given back, its outcome to the caller if still waiting."""
        self.gate.leave(lane, write)
        if done.done():
            return
        if work.cancelled():
            done.cancel()
            return
        error = work.exception()
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(work.result())

    def _timed(
        self,
        transaction: Callable[..., T],
        fn: Callable[..., T],
        args: tuple[Any, ...],
        write: bool,
        queued: float,
    ) -> T:
        """The unit on its thread, timed: its wait (gate and thread) and its work, by kind, and
        a failure by reason."""
        kind = "write" if write else "read"
        started = time.perf_counter()
        cpu = time.thread_time()
        self.metrics.db_unit_wait_seconds.labels(kind).observe(started - queued)
        try:
            return self._guarded(transaction, fn, args, write)
        except ApiError as error:
            reason = {"STORAGE_BUSY": "busy", "STORAGE_UNAVAILABLE": "unavailable"}
            self.metrics.db_unit_failures.labels(kind, reason.get(error.reason, "refused")).inc()
            raise
        except Exception:
            self.metrics.db_unit_failures.labels(kind, "error").inc()
            raise
        finally:
            spent = time.perf_counter() - started
            self.metrics.db_unit_seconds.labels(kind).observe(spent)
            name = unit_name(fn)
            self.metrics.db_unit_busy.labels(kind, name).inc(spent)
            self.metrics.db_unit_cpu.labels(kind, name).inc(time.thread_time() - cpu)

    def _traced(self, tracer: Tracer, call: Callable[[], T], fn: Any, write: bool) -> T:
        """The unit as a span (a child of the call's): its function's name, the database, read
        or write; a failure's reason (ErrorInfo reason or exception type, never its text)."""
        name = unit_name(fn)
        system = "postgresql" if self.is_postgres else "sqlite" if self.is_sqlite else "other"
        attributes = {"db.system": system, "opconnect.db.write": write}
        with unit_span(tracer, f"db {name}", attributes) as span:
            try:
                return call()
            except ApiError as error:
                failed(span, error.reason)
                raise
            except Exception as error:
                failed(span, type(error).__name__)
                raise

    def _guarded(
        self,
        transaction: Callable[..., T],
        fn: Callable[..., T],
        args: tuple[Any, ...],
        write: bool,
    ) -> T:
        deadline = time.monotonic() + self.busy_timeout_s
        turns = self._turns if write else None
        while True:
            if turns is not None:
                asked = time.perf_counter()
                taken = turns.take(deadline - time.monotonic())
                self.metrics.db_writer_turn_wait_seconds.observe(time.perf_counter() - asked)
                if not taken:
                    log.warning("storage busy", error="another process kept the writers' turn")
                    raise _storage_busy()
            try:
                return self._attempt(transaction, fn, args, write)
            except _Busy as busy:
                # Another process holds SQLite's lock. Waited out the busy timeout: a limit,
                # answered as one; refused at once (a stale snapshot): the unit is tried again.
                if time.monotonic() + _BUSY_PAUSE_S >= deadline:
                    log.warning("storage busy", error=str(busy))
                    raise _storage_busy() from busy.__cause__
            finally:
                if turns is not None:
                    turns.give_back()
            time.sleep(_BUSY_PAUSE_S)

    def _attempt(
        self,
        transaction: Callable[..., T],
        fn: Callable[..., T],
        args: tuple[Any, ...],
        write: bool,
    ) -> T:
        try:
            return transaction(fn, *args, write=write)
        except exc.OperationalError as error:
            if _is_busy(error):
                raise _Busy(str(error.orig)[:200]) from error  # the driver's words: no SQL
            log.error("storage unavailable", error=str(error.orig)[:200])
            raise unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry") from error
        except exc.DBAPIError as error:
            if error.connection_invalidated:
                log.error("storage connection lost", error=str(error.orig)[:200])
                raise unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry") from error
            if _no_partition(error):
                # A row past the time partitions made ahead (plumbing/partitions.py): nothing
                # of the unit was stored; maintenance makes them, so the caller retries.
                log.error("no partition for a row", table=_partitioned_table(error))
                raise unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry") from error
            raise

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe with several replicas)."""
        config = alembic_config(self.url)
        # SQLite: a writer from the start (BEGIN IMMEDIATE), so processes starting together
        # wait for each other's migration instead of failing to upgrade a read lock.
        engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._turns is not None:
            self._turns.close()
        self.engine.dispose()


_BUSY_PAUSE_S = 0.05


def _storage_busy() -> ApiError:
    return resource_exhausted(
        "opconnect",
        "STORAGE_BUSY",
        "the database is busy with other writers; retry after the delay given",
        1.0,
    )


# SQLite's primary result codes for a lock held by another connection.
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class _Busy(Exception):
    """SQLite answered busy or locked (the driver's message; the cause is its error)."""


_CHECK_VIOLATION = "23514"  # PostgreSQL's SQLSTATE for a row no partition accepts, among others


def _no_partition(error: exc.DBAPIError) -> bool:
    """PostgreSQL refused a row because no partition holds its partition key."""
    diag = getattr(error.orig, "diag", None)
    primary = getattr(diag, "message_primary", None) or ""
    return getattr(error.orig, "sqlstate", None) == _CHECK_VIOLATION and primary.startswith(
        "no partition of relation"
    )


def _partitioned_table(error: exc.DBAPIError) -> str:
    """The table a row had no partition in (its name only: the row's values stay out of logs)."""
    return str(getattr(getattr(error.orig, "diag", None), "table_name", None) or "")


def _is_busy(error: exc.OperationalError) -> bool:
    code = getattr(error.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _psycopg_arguments(url: str, prepare_threshold: int) -> dict[str, Any]:
    """psycopg's connection arguments: when it prepares statements on the server (never for
    0: a transaction pooler hands each transaction any server connection, where a statement
    prepared on another is unknown)."""
    if make_url(url).get_driver_name() != "psycopg":
        return {}
    return {"prepare_threshold": prepare_threshold or None}


def _lane() -> str:
    """The gate lane of the work being done: the principal of the call it serves, or the
    process's own lane."""
    try:
        return str(current_principal())
    except LookupError:
        return SYSTEM_LANE


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn on the loop (from a database thread); at once if the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        fn(*args)


def unit_name(fn: Any) -> str:
    """A unit's name in metrics and spans: its function's (a partial's function's)."""
    return str(getattr(getattr(fn, "func", fn), "__name__", "unit"))


def _cancel_work(work: concurrent.futures.Future[Any], done: asyncio.Future[Any]) -> None:
    """The caller has gone: a unit not begun yet is not run (its place at the gate is given
    back by `Database._finish`)."""
    if done.cancelled():
        work.cancel()


def _private_database(path: Path) -> None:
    """The SQLite database file made 0600 before SQLite opens it (its -wal and -shm files take
    the database's mode); existing files open to others are tightened, and that is logged."""
    # Made 0700 if missing; an existing directory may be the working directory or a shared
    # one: only the data directory is tightened (app.runtime).
    private_directory(path.parent, tighten=False)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    private_files(path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))


class Unit:
    """A transaction on a driver connection, without a Session (`Database.run_unit`), or a
    view of a Session's own connection (`unit_of`). Statements are plain SQL with `?`
    placeholders (`%s` on PostgreSQL is made here); the driver's errors are raised as
    SQLAlchemy raises them (`_driver_errors`). `info` is the transaction's own notes (as
    `Session.info`: the change-log head locks it took)."""

    __slots__ = (
        "_begin",
        "_isolation",
        "_pipelined",
        "connection",
        "dialect",
        "info",
        "postgres",
        "time",
    )

    def __init__(
        self, connection: Any, dialect: Dialect, info: dict[Any, Any] | None = None
    ) -> None:
        self.connection = connection  # the driver's own (sqlite3, psycopg)
        self.dialect = dialect
        self.info: dict[Any, Any] = {} if info is None else info
        self.postgres = dialect.name == "postgresql"
        # How a time goes to the driver (see `driver_time`).
        self.time: Callable[[dt.datetime | None], Any] = time_form(sqlite=not self.postgres)
        self._isolation: tuple[Any] | None = None  # (the level to put back) after a read
        # PostgreSQL: a write's BEGIN, to be sent with its first statement (`_first_fetch`).
        self._begin = False
        self._pipelined = False  # it was: the connection is in autocommit until `end`

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def fetch(
        self, sql: str, params: Sequence[Any], *, prepare: bool = True
    ) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (see `driver_fetch`)."""
        sql = self._sql(sql)
        if self._begin:
            return self._first_fetch(sql, params, prepare)
        cursor = self.connection.cursor()
        try:
            with _driver_errors_of(self.dialect, self.connection, cursor, sql):
                if prepare or not self.postgres:
                    cursor.execute(sql, tuple(params))
                else:
                    cursor.execute(sql, tuple(params), prepare=False)
                return list(cursor.fetchall()) if cursor.description is not None else []
        finally:
            cursor.close()

    def _first_fetch(self, sql: str, params: Sequence[Any], prepare: bool) -> list[tuple[Any, ...]]:
        """PostgreSQL, a write's first statement: sent with its BEGIN in one round trip (a
        pipeline: BEGIN, the statement, one sync), where psycopg would wait for its own BEGIN's
        answer first. The connection is in autocommit meanwhile, so that psycopg sends no
        BEGIN of its own; the server's transaction stays open until `commit` or `rollback`
        (psycopg sends COMMIT or ROLLBACK whenever the server says one is open), and `end`
        puts the connection back as the pool lent it."""
        self._begin = False
        connection = self.connection
        begin = connection.cursor()
        cursor = connection.cursor()
        try:
            with _driver_errors_of(self.dialect, connection, cursor, sql):
                connection.autocommit = True
                self._pipelined = True
                with connection.pipeline():
                    begin.execute(_begin_statement(connection), prepare=False)
                    cursor.execute(sql, tuple(params), prepare=None if prepare else False)
                return list(cursor.fetchall()) if cursor.description is not None else []
        finally:
            begin.close()
            cursor.close()

    def fetch_all(
        self, statements: Sequence[tuple[str, Sequence[Any]]], *, prepare: bool = True
    ) -> list[list[tuple[Any, ...]]]:
        """Run statements that need none of each other's rows, in order; the rows of each (see
        `driver_fetch_all`)."""
        if not self.postgres or len(statements) < 2:
            return [self.fetch(sql, params, prepare=prepare) for sql, params in statements]
        if self._begin:  # the first with its BEGIN (`_first_fetch`), the others after it
            first = self.fetch(*statements[0], prepare=prepare)
            return [first, *self.fetch_all(statements[1:], prepare=prepare)]
        connection = self.connection
        cursors = [connection.cursor() for _ in statements]
        try:
            with _driver_errors_of(self.dialect, connection, None, statements[0][0]):
                with connection.pipeline():
                    for cursor, (sql, params) in zip(cursors, statements, strict=True):
                        cursor.execute(
                            self._sql(sql), tuple(params), prepare=None if prepare else False
                        )
                return [list(c.fetchall()) if c.description is not None else [] for c in cursors]
        finally:
            for cursor in cursors:
                cursor.close()

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for many rows (see `driver_execute_many`)."""
        sql = self._sql(sql)
        if self._begin:  # its BEGIN the ordinary way (the first statement of no unit today)
            self._begin = False
        cursor = self.connection.cursor()
        try:
            with _driver_errors_of(self.dialect, self.connection, cursor, sql):
                cursor.executemany(sql, rows)
        finally:
            cursor.close()

    def begin(self, *, write: bool) -> None:
        """Begin the transaction as `Database` begins a Session's: SQLite BEGIN IMMEDIATE for a
        write (DEFERRED for a read); PostgreSQL begins at the first statement, a write's BEGIN
        sent with it (`_first_fetch`), a read at REPEATABLE READ (the connection's level put
        back by `end`)."""
        if self.postgres:
            if not write:
                self._isolation = (self.connection.isolation_level,)
                self.connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            else:
                self._begin = True  # with its first statement (`_first_fetch`)
            return
        self._command("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self) -> None:
        with _driver_errors_of(self.dialect, self.connection, None, "COMMIT"):
            self.connection.commit()

    def rollback(self) -> None:
        """Roll back; a connection already gone is left to the pool (it is invalidated)."""
        with contextlib.suppress(self.dialect.loaded_dbapi.Error):
            self.connection.rollback()

    def end(self) -> None:
        """After commit or rollback: the connection as the pool lent it."""
        self._begin = False
        if self._pipelined:  # after `_first_fetch`
            self._pipelined = False
            with contextlib.suppress(self.dialect.loaded_dbapi.Error):
                self.connection.autocommit = False
        if self._isolation is not None:
            with contextlib.suppress(self.dialect.loaded_dbapi.Error):
                self.connection.isolation_level = self._isolation[0]
            self._isolation = None

    def _command(self, sql: str) -> None:
        cursor = self.connection.cursor()
        try:
            with _driver_errors_of(self.dialect, self.connection, cursor, sql):
                cursor.execute(sql)
        finally:
            cursor.close()


def _begin_statement(connection: psycopg.Connection[Any]) -> bytes:
    """The BEGIN psycopg itself sends on `connection` (its isolation level, read-only and
    deferrable options as set: SQLAlchemy sets the level on every pooled connection)."""
    parts = ["BEGIN"]
    if connection.isolation_level is not None:
        level = psycopg.IsolationLevel(connection.isolation_level)
        parts.append("ISOLATION LEVEL " + level.name.replace("_", " "))
    if connection.read_only is not None:
        parts.append("READ ONLY" if connection.read_only else "READ WRITE")
    if connection.deferrable is not None:
        parts.append("DEFERRABLE" if connection.deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


def unit_of(target: Session | Unit) -> Unit:
    """`target` itself, or a `Unit` on a Session's connection (its transaction begun), sharing
    the Session's `info`: so the driver helpers and the units on them take either."""
    if isinstance(target, Unit):
        return target
    connection = target.connection()
    return Unit(connection.connection.dbapi_connection, connection.dialect, target.info)


def dialect_name(target: Session | Unit) -> str:
    """The database's kind (`sqlite`, `postgresql`) of a Session or a Unit."""
    if isinstance(target, Unit):
        return str(target.dialect.name)
    return str(target.get_bind().dialect.name)


def dialect_insert(session: Session) -> type[sqlite.Insert] | type[postgresql.Insert]:
    """The INSERT construct of the session's database, which has ON CONFLICT DO NOTHING."""
    return postgresql.Insert if session.get_bind().dialect.name == "postgresql" else sqlite.Insert


def driver_fetch(
    session: Session | Unit, sql: str, params: Sequence[Any], *, prepare: bool = True
) -> list[tuple[Any, ...]]:
    """Run one SELECT on the driver itself, inside the session's (or unit's) transaction,
    without SQLAlchemy's statement and row handling.

    Only for the few queries a stream runs for every batch, where that handling costs more than
    the query (500 rows of the record log: 1.9 ms through Core, 0.9 ms on the driver). `sql` is
    plain SQL with `?` placeholders (turned into `%s` for PostgreSQL).

    `prepare=False`: never a server-side prepared statement on PostgreSQL (psycopg prepares a
    statement run `db_prepare_threshold` times, and PostgreSQL may then keep one generic plan
    for it). For the look-ups of many keys on partitioned tables: a generic plan made while a
    partition was small or had no statistics kept scanning it whole as it grew (ingest of 1,000
    durations at 50,000 stored: 1.7 s a batch prepared, 0.13 s planned each time).
    """
    return unit_of(session).fetch(sql, params, prepare=prepare)


def driver_fetch_all(
    session: Session | Unit,
    statements: Sequence[tuple[str, Sequence[Any]]],
    *,
    prepare: bool = True,
) -> list[list[tuple[Any, ...]]]:
    """`driver_fetch` of each of `statements` ((sql, params), none needing another's rows), in
    order: the rows of each. On PostgreSQL they go in one pipeline, one round trip for them all
    (each still planned and run on its own, in turn: a lock taken by one is held for those
    after it); on SQLite one after the other."""
    return unit_of(session).fetch_all(statements, prepare=prepare)


def driver_fetch_rows(
    session: Session | Unit,
    columns: Sequence[str],
    source: str,
    params: Sequence[Any],
    *,
    blob: str = "",
) -> list[tuple[Any, ...]]:
    """The rows of `rows_sql(columns, source, blob)` (`source`: FROM ... WHERE ... ORDER BY ...
    LIMIT ?), as `driver_fetch` gives them: the columns, then the blob column's bytes if any.

    On SQLite they come as ONE row joined by SQLite (`joined_sql`): pysqlite lets go of the GIL
    and takes it back around every step and for every column of every row it fetches (a row of
    8 columns: 10 hand-overs), each a wait for the switch interval while the event loop's
    thread is busy; so a page is read as the records stream catching up reads its own
    (`group_concat`). The columns are plain column names, of text, integers or NULL (JSON keeps
    SQLite's REAL to 15 digits only); the blob's values are joined and cut by their lengths.
    PostgreSQL (psycopg keeps the GIL while it makes rows) reads the rows themselves."""
    unit = unit_of(session)
    if unit.postgres:
        return unit.fetch(rows_sql(columns, source, blob), params)
    ((text, joined),) = unit.fetch(joined_sql(tuple(columns), source, blob), params)
    rows = json.loads(text)
    if not blob:
        return [tuple(row) for row in rows]
    out: list[tuple[Any, ...]] = []
    data, at = joined or b"", 0
    for row in rows:
        end = at + row[-1]
        row[-1] = data[at:end]
        out.append(tuple(row))
        at = end
    return out


def rows_sql(columns: Sequence[str], source: str, blob: str = "") -> str:
    """The SELECT `driver_fetch_rows` reads (as PostgreSQL runs it; tests/test_sql.py checks
    it)."""
    return f"SELECT {', '.join((*columns, blob) if blob else columns)} {source}"


@functools.lru_cache(maxsize=32)
def joined_sql(columns: tuple[str, ...], source: str, blob: str = "") -> str:
    """SQLite: `rows_sql` as one row: a JSON array of the rows (each an array of the columns,
    then the blob's length), and the blob's values joined, in the page's order (a subquery
    with a LIMIT is not flattened into the aggregates)."""
    values = ", ".join((*columns, f"length({blob})") if blob else columns)
    data = f", CAST(group_concat({blob}, x'') AS BLOB)" if blob else ", NULL"
    return (
        f"SELECT json_group_array(json_array({values})){data}"  # noqa: S608
        f" FROM ({rows_sql(columns, source, blob)}) AS page"
    )


def driver_execute_many(session: Session | Unit, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run one INSERT (or UPDATE) for many rows on the driver, inside the session's (or unit's)
    transaction: for ingest paths, where SQLAlchemy's parameter handling costs more than the
    insert itself. `sql` uses `?` placeholders; times must come from `driver_time`."""
    unit_of(session).execute_many(sql, rows)


def driver_insert_many(
    session: Session, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert many rows (values of `columns`, in that order) on the driver, inside the
    session's transaction: on PostgreSQL by a binary `COPY ... FROM STDIN` (one stream, no
    statement per row, no text to parse; the columns' types from the table), on SQLite by
    executemany of `insert_sql`. For the publish hot path, where SQLAlchemy's parameter
    handling costs more than the insert; times must come from `driver_time`."""
    connection = session.connection()
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if connection.dialect.name == "postgresql":
            copy_sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
            with _driver_errors(connection, cursor, copy_sql), cursor.copy(copy_sql) as copy:
                copy.set_types(_copy_types(table, tuple(columns)))
                for row in rows:
                    copy.write_row(row)
        else:
            sql = insert_sql(table, columns)
            with _driver_errors(connection, cursor, sql):
                cursor.executemany(sql, rows)
    finally:
        cursor.close()


@contextlib.contextmanager
def _driver_errors(connection: Connection, cursor: Any, sql: str) -> Iterator[None]:
    """`_driver_errors_of` a SQLAlchemy connection's driver connection."""
    with _driver_errors_of(connection.dialect, connection.connection.dbapi_connection, cursor, sql):
        yield


@contextlib.contextmanager
def _driver_errors_of(
    dialect: Dialect, dbapi_connection: Any, cursor: Any, sql: str
) -> Iterator[None]:
    """The driver's own errors, raised as SQLAlchemy raises them from a statement it runs (an
    `OperationalError`, an `IntegrityError`, ..., with `connection_invalidated` when the link is
    gone), so a unit on the driver fails as any other: `Database` answers UNAVAILABLE for a lost
    database or a row with no partition, busy SQLite is retried. The parameters (records) are
    kept out of the error's text."""
    base = dialect.loaded_dbapi.Error
    try:
        yield
    except base as error:
        gone = dialect.is_disconnect(error, dbapi_connection, cursor)
        raise exc.DBAPIError.instance(
            sql,
            None,
            error,
            base,
            hide_parameters=True,
            connection_invalidated=gone,
            dialect=dialect,
        ) from error


def insert_sql(table: Table, columns: Sequence[str]) -> str:
    """The INSERT `driver_insert_many` runs on SQLite (tests/test_sql.py checks it)."""
    marks = ",".join("?" * len(columns))
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608


@functools.lru_cache(maxsize=16)
def _copy_types(table: Table, columns: tuple[str, ...]) -> list[str]:
    """PostgreSQL's names of the columns' types (BIGINT, VARCHAR(64) -> bigint, varchar)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return [
        str(table.c[name].type.compile(dialect=dialect)).partition("(")[0].lower()
        for name in columns
    ]


def driver_time(session: Session | Unit) -> Callable[[dt.datetime | None], Any]:
    """How a time goes to the driver so that it compares and reads back as SQLAlchemy's own
    DateTime columns do: on SQLite UTC text in SQLAlchemy's format, on PostgreSQL as is."""
    return time_form(sqlite=dialect_name(session) == "sqlite")


def time_form(*, sqlite: bool) -> Callable[[dt.datetime | None], Any]:
    """`driver_time` for a database known by its kind (rows built before the transaction)."""
    return _sqlite_time if sqlite else _as_is


def _as_is(value: dt.datetime | None) -> dt.datetime | None:
    return value


def _sqlite_time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not dt.UTC and value.utcoffset():  # most times are UTC already
        value = value.astimezone(dt.UTC)
    # What strftime("%Y-%m-%d %H:%M:%S.%f") gives, at a fraction of its cost (the UTC offset
    # an aware time's isoformat adds cut off).
    return value.isoformat(" ", "microseconds")[:26]


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _sqlite_setup(engine: Engine, busy_timeout_s: float) -> None:
    """WAL, full durability, foreign keys, and transactions begun by us, not by pysqlite."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        _wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _wal(cursor: Any) -> None:
    """Put the database in WAL mode (it stays so). Processes opening a new database at once
    race to switch it, and SQLite answers the losers "locked" at once, without waiting: those
    try again."""
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 99:
                raise
            time.sleep(0.05)


def stored_time(value: str | dt.datetime) -> dt.datetime:
    """A time as the driver reads it back (SQLite: SQLAlchemy's UTC text, see `driver_time`;
    PostgreSQL: a datetime), as an aware UTC datetime."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
    return utc(value)


def utc(value: dt.datetime) -> dt.datetime:
    """A time read back from storage, as UTC (SQLite hands back naive datetimes; every stored
    time is UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
