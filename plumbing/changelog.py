"""Change logs, cursors and the wake-up of live streams (DESIGN.md section 4, "Streams").

Every stored change gets a position in its log's sequence, allocated in the same transaction as
the change by `allocate()`. Allocation updates the log's head row, which holds a row lock until
commit, so transactions of one log commit in position order on SQLite and PostgreSQL alike: a
reader that reads the head and then every event at or below it never runs past a position below
which a transaction is still open, and a resuming reader misses nothing.

A cursor is an opaque string naming a log and a position, encrypted and authenticated (see
plumbing/tokens.py); a stream resumes strictly after it. Positions at or below a log's
`purged_through` may be gone: a cursor before it answers FAILED_PRECONDITION / CURSOR_EXPIRED.

Live streams wait on a `Notifier`, woken after a commit by the writer in this process or, with
PostgreSQL, by LISTEN/NOTIFY from any replica; they never poll the database in a loop. Those
that have caught up share a `Tail` per kind of stream and log: one read of the whole log per
wake-up, by the same rule as a stream's own (the head, then what is at or below it), serves them
all, whatever key (operator) each follows.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Generic, TypeVar, cast

import psycopg
from prometheus_client.core import Metric
from sqlalchemy import BigInteger, String, Table, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.db import LOG_LOCKS, Base, Database, Unit, dialect_name, driver_fetch, unit_of
from plumbing.errors import ApiError, failed_precondition, invalid_field, unavailable
from plumbing.logs import get_logger
from plumbing.metrics import Metrics, gauge, observe_many
from plumbing.tokens import seal, unseal

T = TypeVar("T")
log = get_logger("opconnect.changelog")

NOTIFY_CHANNEL = "opconnect_changes"


class LogHead(Base):
    """One row per change log: the last position allocated and the purge horizon."""

    __tablename__ = "change_log_heads"

    log: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, default=0)
    purged_through: Mapped[int] = mapped_column(BigInteger, default=0)


HEADS = cast(Table, LogHead.__table__)


@dataclass(frozen=True)
class Head:
    position: int
    purged_through: int


_READ_HEAD = "SELECT position, purged_through FROM change_log_heads WHERE log = ?"
_ALLOCATE = "UPDATE change_log_heads SET position = position + ? WHERE log = ? RETURNING position"
SQL = (_READ_HEAD, _ALLOCATE)  # the statements written by hand (tests/test_sql.py checks them)


def allocate(session: Session | Unit, log_name: str, count: int = 1) -> int:
    """Reserve `count` positions in `log_name` for this transaction (a Session's or a
    `Unit`'s); returns the first.

    Takes the log's row lock until commit: call it late in a write transaction, with the rows
    already built. When it was granted is kept in the transaction's `info` (`LOG_LOCKS`):
    `Database` observes how long it was held (opconnect_changelog_lock_hold_seconds).
    """
    # On the driver: this is every write's hot path (through Core it cost more than the update)
    unit = unit_of(session)
    ((last,),) = unit.fetch(_ALLOCATE, (count, log_name))
    locked(unit, log_name)
    return int(last) - count + 1


# One position allocated inside a statement of PostgreSQL (a data-modifying CTE named `head`, its
# parameter the log's name), for a unit that writes its change in one round trip: the same row
# lock as `allocate`'s, taken in the same way; call `locked` once the statement has run.
ALLOCATE_ONE_CTE = (
    "head AS (UPDATE change_log_heads SET position = position + 1 WHERE log = ? RETURNING position)"
)


def locked(unit: Unit, log_name: str) -> None:
    """The log's head row lock was granted just now (`allocate`, `ALLOCATE_ONE_CTE`): timed to
    commit by `Database`."""
    unit.info.setdefault(LOG_LOCKS, []).append((log_name, time.perf_counter()))


_NOTIFY = "SELECT pg_notify(?, ?)"  # PostgreSQL only
_MAX_PAYLOAD = 7000  # characters of a notify's payload (PostgreSQL takes fewer than 8000 bytes)


def notify_commit(
    session: Session | Unit, log_name: str, position: int, keys: Iterable[str]
) -> None:
    """On PostgreSQL, tell every replica (at commit) that `log_name` reached `position`."""
    if dialect_name(session) != "postgresql":
        return
    payload = f"{log_name}|{position}|{','.join(sorted(set(keys)))}"
    if len(payload) > _MAX_PAYLOAD:
        payload = f"{log_name}|{position}|*"
    driver_fetch(session, _NOTIFY, (NOTIFY_CHANNEL, payload))


def notify_parts(log_name: str, keys: Iterable[str]) -> tuple[str, str]:
    """The notify payload around the position (`log|position|keys`, `*` for keys too many to
    name, counting the longest position), for a statement that sends it with a position it
    allocates itself."""
    named = ",".join(sorted(set(keys)))
    if len(log_name) + len(named) + 2 + len(str(MAX_POSITION)) > _MAX_PAYLOAD:
        named = "*"
    return f"{log_name}|", f"|{named}"


def read_head(session: Session | Unit, log_name: str) -> Head:
    """The log's head; on the driver, as streams read it once a batch."""
    ((position, purged_through),) = driver_fetch(session, _READ_HEAD, (log_name,))
    return Head(int(position), int(purged_through))


def read_heads(session: Session) -> dict[str, Head]:
    """Every log's head (scrape time: a handful of rows)."""
    rows = session.execute(select(HEADS.c.log, HEADS.c.position, HEADS.c.purged_through))
    return {str(log): Head(int(position), int(purged)) for log, position, purged in rows}


def mark_purged(session: Session, log_name: str, through: int) -> None:
    """Record that positions <= `through` may have been deleted (never moves backwards)."""
    session.execute(
        update(LogHead)
        .where(LogHead.log == log_name, LogHead.purged_through < through)
        .values(purged_through=through)
    )


# --- cursors -----------------------------------------------------------------------------------

_POSITION = struct.Struct(">Q")
MAX_POSITION = 2**63 - 1  # positions are signed 64-bit in the database


def encode_cursor(log_name: str, position: int) -> str:
    return seal(f"cursor:{log_name}", _POSITION.pack(position))


def decode_cursor(cursor: str, log_name: str, domain: str, field_path: str = "cursor") -> int:
    """The position in `log_name` that `cursor` names; INVALID_ARGUMENT/CURSOR_INVALID if it is
    not a cursor of this log made by this server."""
    body = unseal(cursor, f"cursor:{log_name}")
    position = int(_POSITION.unpack(body)[0]) if body and len(body) == _POSITION.size else -1
    if not 0 <= position <= MAX_POSITION:
        raise invalid_field(domain, "CURSOR_INVALID", field_path, "not a cursor of this stream")
    return position


def expired(domain: str) -> ApiError:
    return failed_precondition(
        domain,
        "CURSOR_EXPIRED",
        "the cursor is older than the change log's retention; list again, then resume from the"
        " listing's cursor",
    )


# --- wake-up -----------------------------------------------------------------------------------

ANY_KEY = "*"
_EVERY = "\x00every"  # Notifier's count of all of a log's wake-ups (never an operator id)


class Notifier:
    """Wakes streams waiting on (log, key) when a change is committed.

    `publish` may be called from any thread (the database threads commit); waiters run on the
    event loop. A waiter takes `waiter()` before it reads the database and awaits it after, so a
    commit that lands between its read and its wait still wakes it.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._subscribers: dict[str, list[Callable[[tuple[str, ...]], None]]] = {}
        # Wake-ups counted by (log, key), (log, ANY_KEY) for those naming every key, and
        # (log, _EVERY) for all of a log's: see `generation`.
        self._wakes: dict[tuple[str, str], int] = {}
        # (log, key) -> the highest position of this process's own commits its waiters have
        # been woken for (`publish`; see `wake_notified`; one entry per key, as `_wakes`).
        self._woken: dict[tuple[str, str], int] = {}
        self.closed = False

    def subscribe(self, log_name: str, callback: Callable[[tuple[str, ...]], None]) -> None:
        """Call `callback(keys)` on the loop for every change of `log_name` (caches use this)."""
        self._subscribers.setdefault(log_name, []).append(callback)

    def close(self) -> None:
        """Shutting down: wake every waiter; their streams end with UNAVAILABLE (resume later)."""
        self.closed = True
        for event in self._events.values():
            event.set()
        self._events.clear()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def waiter(self, log_name: str, key: str) -> asyncio.Event:
        slot = (log_name, key)
        event = self._events.get(slot)
        if event is None or event.is_set():
            event = self._events[slot] = asyncio.Event()
        return event

    def publish(self, log_name: str, keys: Iterable[str], position: int = 0) -> None:
        """Thread-safe: wake waiters of these keys (ANY_KEY wakes every waiter of the log), for
        a change this process committed. `position`: the last position of the log it took (0:
        none, or not said), so that its echo by NOTIFY is no second wake-up (`wake_notified`)."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._wake_committed, log_name, tuple(keys), position)

    def _wake_committed(self, log_name: str, keys: tuple[str, ...], position: int) -> None:
        if position > 0:
            woken = self._woken
            for key in keys:
                if woken.get((log_name, key), 0) < position:
                    woken[log_name, key] = position
        self.wake(log_name, keys)

    def wake_notified(self, log_name: str, keys: tuple[str, ...], position: int) -> None:
        """Wake for a commit NOTIFY told of (`PostgresListener`), except the keys this process
        has already woken, by `publish`, for its own commit at `position` or later: the NOTIFY
        of that very commit, or of an earlier one (a log's positions commit in order, each
        allocation holding the head's row lock until commit, so the reads that wake-up began
        see it), or of another deployment's log on the same database (nothing of this one's).
        Position 0 (a change that takes none: caches forget) and ANY_KEY always wake."""
        if position > 0 and ANY_KEY not in keys:
            woken = self._woken
            keys = tuple(k for k in keys if woken.get((log_name, k), 0) < position)
            if not keys:
                return
        self.wake(log_name, keys)

    def logs(self) -> set[str]:
        """The logs that have waiters or subscribers now."""
        return {slot[0] for slot in self._events} | set(self._subscribers)

    def generation(self, log_name: str, key: str) -> int:
        """How many wake-ups have reached waiters of (log, key) so far, on the loop: a read
        begun at generation g sees every change whose wake-up was counted in g (its commit came
        first), so a shared read needs to be no newer than the generation its follower saw."""
        wakes = self._wakes
        if key == ANY_KEY:
            return wakes.get((log_name, _EVERY), 0)
        return wakes.get((log_name, key), 0) + wakes.get((log_name, ANY_KEY), 0)

    def wake(self, log_name: str, keys: tuple[str, ...]) -> None:
        wakes = self._wakes
        for counted in (*keys, _EVERY):
            wakes[log_name, counted] = wakes.get((log_name, counted), 0) + 1
        for callback in self._subscribers.get(log_name, ()):
            callback(keys)
        if ANY_KEY in keys:
            slots = [s for s in self._events if s[0] == log_name]
        else:
            slots = [(log_name, k) for k in (*keys, ANY_KEY)]
        for slot in slots:
            event = self._events.pop(slot, None)
            if event is not None:
                event.set()


class PostgresListener:
    """LISTENs on PostgreSQL and feeds the local notifier, so a change committed through one
    replica wakes streams attached to any other. Reconnects with backoff if the link drops.

    LISTEN needs a session of its own for as long as it listens: `url` names the server
    itself (`database_listen_url`), never a transaction pooler, which would hand the session
    to other clients between transactions. Its state is exported (`metrics`): connected or
    not, and how often it was lost."""

    def __init__(self, url: str, notifier: Notifier, metrics: Metrics | None = None) -> None:
        self._url = url.replace("postgresql+psycopg://", "postgresql://")
        self._notifier = notifier
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.backend_pid = 0  # the server process of its connection, while connected
        metrics = metrics or Metrics(enabled=False)
        self._connected = metrics.listener_connected
        self._reconnects = metrics.listener_reconnects

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.5
        lost_at: float | None = None  # since when it is disconnected (monotonic)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self.ready.set()
                    self._connected.set(1)
                    if lost_at is not None:  # at the loss's level: seen wherever it was
                        log.warning(
                            "postgres listener connected again",
                            after_s=round(time.monotonic() - lost_at, 1),
                        )
                        lost_at = None
                    delay = 0.5
                    # Anything committed while we were away: wake everyone once.
                    for log_name in self._notifier.logs():
                        self._notifier.wake(log_name, (ANY_KEY,))
                    async for note in conn.notifies():
                        log_name, _, rest = note.payload.partition("|")
                        position, _, keys = rest.partition("|")
                        self._notifier.wake_notified(
                            log_name,
                            tuple(keys.split(",")) if keys else (ANY_KEY,),
                            int(position) if position.isdigit() else 0,
                        )
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep listening whatever went wrong
                self.ready.clear()
                self._connected.set(0)
                self._reconnects.inc()
                lost_at = lost_at or time.monotonic()
                log.warning("postgres listener reconnecting", error=str(error)[:200], delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


# --- following a log ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items read from a log and the position after which to resume (a heartbeat if empty)."""

    items: Sequence[T]
    position: int


ReadFn = Callable[[Session, int, int, int], Sequence[T]]
UnitReadFn = Callable[[Session | Unit, int, int, int], Sequence[T]]  # driver statements only


@dataclass(frozen=True)
class Packs(Generic[T]):
    """How a stream's items count when one item may hold several consecutive changes (a page of
    records read as one, their bodies joined): `count(item)` how many it holds, `last_at(item)`
    the commit time of its last (`committed_at` gives its first's), `changes(item)` the
    position and commit time of each (asked only of items holding changes committed while the
    stream was open, for their delivery latency). A read's limit and a batch's size count
    changes, not items."""

    count: Callable[[T], int]
    last_at: Callable[[T], float]
    changes: Callable[[T], Iterable[tuple[int, float]]]


@dataclass(frozen=True)
class Follow:
    """What a stream reads and how: `read(session, after, upto, limit)` returns items with
    after < position <= upto in position order; `position_of` gives an item's position."""

    log_name: str
    key: str
    domain: str
    batch_size: int
    heartbeat_s: float
    follow: bool = True
    # Wall-clock time (epoch seconds) at which following stops: what is stored is then sent
    # and the stream ends. None: follow until the client goes away.
    until: float | None = None
    _: KW_ONLY
    # What the stream is to its metrics (`Streams`): a bounded name of its kind (assignments,
    # records, calls) and the operator it serves (`PLATFORM` for a platform caller's stream).
    kind: str
    operator: str
    # How many batches one database read may fetch while the stream catches up: its batches
    # are then sent one by one from that read (fewer reads, each of a larger page).
    read_batches: int = 1


PLATFORM = "platform"  # the `operator` label of a platform caller's stream


def _page(
    session: Session, spec: Follow, read: ReadFn[T], after: int, limit: int
) -> tuple[Sequence[T], Head]:
    head = read_head(session, spec.log_name)
    if after < head.purged_through:
        raise expired(spec.domain)
    if after > head.position:
        raise invalid_field(
            spec.domain, "CURSOR_INVALID", "cursor", "the cursor is ahead of the log"
        )
    return read(session, after, head.position, limit), head


def oldest_position(session: Session, log_name: str) -> int:
    """Where a stream from the oldest change kept starts: the purge horizon."""
    return read_head(session, log_name).purged_through


async def start_position(db: Database, log_name: str) -> int:
    """The log's current head: where a stream 'from now' starts."""
    return (await db.run(read_head, log_name)).position


# --- the streams' metrics ------------------------------------------------------------------------


class _Open(Generic[T]):
    """One open stream, as `Streams` sees it: written on the event loop by its `follow_log`,
    read by the scrape thread (plain attributes; a scrape may see one batch's update half done,
    which moves a figure by one batch at most)."""

    def __init__(
        self,
        streams: Streams,
        spec: Follow,
        position_of: Callable[[T], int],
        committed_at: Callable[[T], float],
        after: int,
        *,
        packs: Packs[T] | None = None,
    ) -> None:
        metrics = streams.metrics
        self.log_name, self.operator, self.kind = spec.log_name, spec.operator, spec.kind
        self._position_of = position_of
        self._committed_at = committed_at
        self._packs = packs
        self._delivered_items = metrics.stream_delivered.labels(spec.operator, spec.kind)
        self._latency = metrics.delivery_seconds.labels(spec.kind)
        self._timed = metrics.enabled
        self._batch_size = spec.batch_size
        # The head at the stream's first read: changes past it were committed while it was open.
        self._opened: int | None = None
        self.through = after  # every change of the stream's at or below this is delivered
        self.caught_up = True  # its last read reached the head it read, and all it read is sent
        self.held_since: float | None = None  # commit time of the oldest change read, unsent
        self.last_commit = 0.0  # commit time of the last change delivered

    def read(self, items: Sequence[T], head: Head) -> None:
        """A read returned: `items` are held until delivered."""
        if self._opened is None:
            self._opened = head.position
        if items:
            self.held_since = self._committed_at(items[0])
            self.caught_up = False
        elif self.held_since is None:  # nothing more up to the head it read: caught up
            self.through = max(self.through, head.position)
            self.caught_up = True

    def delivered(self, items: Sequence[T], head: Head, held: Sequence[T] = ()) -> None:
        """The stream's consumer took `items` (read with `head`): counted, latency observed.
        `held`: the first item read with them and not yet delivered, if any."""
        packs = self._packs
        count = len(items) if packs is None else sum(map(packs.count, items))
        self._delivered_items.inc(count)
        last = self._position_of(items[-1])
        opened = self._opened if self._opened is not None else last
        if last > opened and self._timed:  # some were committed while the stream was open
            now, committed_at, position_of = time.time(), self._committed_at, self._position_of
            if packs is None:
                latencies = [
                    max(0.0, now - committed_at(i)) for i in items if position_of(i) > opened
                ]
            else:
                latencies = [
                    max(0.0, now - at)
                    for i in items
                    if position_of(i) > opened
                    for position, at in packs.changes(i)
                    if position > opened
                ]
            observe_many(self._latency, latencies)
        self.last_commit = (
            self._committed_at(items[-1]) if packs is None else packs.last_at(items[-1])
        )
        self.held_since = None
        if held:  # more of the same read is still to send
            self.held_since = self._committed_at(held[0])
            self.through = last
        elif count < self._batch_size:  # the read reached its head: caught up through it
            self.through = max(last, head.position)
            self.caught_up = True
        else:
            self.through = last

    def lag(self, head: Head | None, now: float) -> tuple[int, float]:
        """(positions, seconds) behind `head` (see `Streams`)."""
        positions = max(0, head.position - self.through) if head is not None else 0
        if self.held_since is None and (self.caught_up or positions == 0):
            return 0, 0.0
        since = self.held_since if self.held_since is not None else self.last_commit
        return positions, max(0.0, now - since) if since else 0.0


class Streams:
    """This process's open streams on change logs, which `follow_log` registers: it counts the
    changes each delivers (`opconnect_stream_delivered_total`) and times them from commit to
    delivery (`opconnect_delivery_latency_seconds`, for changes committed while the stream was
    open: positions past the log's head at its first read), and at each scrape exports:

    - `opconnect_changelog_head_position{log}` and `opconnect_changelog_purged_position{log}`:
      every log's head and purge horizon, read from the database (one small query), so
      commits of every replica count.
    - `opconnect_stream_lag_positions{operator,kind}` and `opconnect_stream_lag_seconds`: for
      each operator and kind with a stream open in this process, the slowest one. A stream is
      caught up (0, 0) when its last read found nothing past what it had sent up to the head it
      read, or what it read was short of a batch and has been delivered, or it has delivered
      everything up to the log's head now, and holds nothing unsent: a change committed
      since then, on any replica, counts only once the stream has read it (woken by the
      commit). Otherwise it is behind: positions is the log head now minus the position through
      which it has delivered everything, an upper bound of what it still has to send (the log's
      positions of other operators, and changes its filter leaves out, count too); seconds is
      now minus the commit time of the oldest change it has read but not yet delivered (a
      consumer that does not read holds one batch: its age grows), or, between reads, of the
      last change it delivered. A change is delivered when the stream's consumer takes the
      next batch, that is once gRPC has accepted the previous one for sending.

    With metrics off, nothing is counted or exported; the streams are still tracked (a few
    attribute writes a batch).
    """

    def __init__(self, db: Database, metrics: Metrics, tail_items: int = 1_000) -> None:
        self._db = db
        self.metrics = metrics
        self._lock = threading.Lock()
        self._open: dict[int, _Open[Any]] = {}
        self._ids = itertools.count()
        # The shared tails of live followers (`Tail`), by (kind, log), while followed.
        self.tail_items = tail_items
        self._tails: dict[tuple[str, str], Tail[Any]] = {}
        metrics.on_scrape("changelog", self._figures)

    def join_tail(
        self,
        notifier: Notifier,
        spec: Follow,
        shared: Shared[T],
        position_of: Callable[[T], int],
    ) -> Tail[T] | None:
        """The shared tail of the stream's kind and log, made if none is followed yet, joined
        for the stream's key; None when tails are off (`tail_items` 0). Leave it with
        `leave_tail` when the stream ends."""
        if self.tail_items <= 0:
            return None
        slot = (spec.kind, spec.log_name)
        with self._lock:
            tail = self._tails.get(slot)
            if tail is None:
                tail = Tail(
                    self._db,
                    notifier,
                    spec,
                    shared,
                    position_of,
                    capacity=self.tail_items,
                    metrics=self.metrics,
                )
                self._tails[slot] = tail
            tail.join(spec.key)
        return cast(Tail[T], tail)

    def leave_tail(self, tail: Tail[Any], key: str) -> None:
        """A follower of `tail` and `key` ended: the key goes with its last follower, the tail
        with its last follower of any key."""
        with self._lock:
            tail.leave(key)
            slot = (tail.kind, tail.log_name)
            if tail.followers <= 0 and self._tails.get(slot) is tail:
                del self._tails[slot]

    def tails(self) -> list[Tail[Any]]:
        with self._lock:
            return list(self._tails.values())

    def open(
        self,
        spec: Follow,
        position_of: Callable[[T], int],
        committed_at: Callable[[T], float],
        after: int,
        packs: Packs[T] | None = None,
    ) -> tuple[int, _Open[T]]:
        stream = _Open(self, spec, position_of, committed_at, after, packs=packs)
        with self._lock:
            key = next(self._ids)
            self._open[key] = stream
        return key, stream

    def close(self, key: int) -> None:
        with self._lock:
            self._open.pop(key, None)

    def lags(self, heads: dict[str, Head]) -> dict[tuple[str, str], tuple[int, float]]:
        """The slowest open stream's lag, by (operator, kind)."""
        with self._lock:
            streams = list(self._open.values())
        now = time.time()
        worst: dict[tuple[str, str], tuple[int, float]] = {}
        for stream in streams:
            positions, seconds = stream.lag(heads.get(stream.log_name), now)
            key = (stream.operator, stream.kind)
            known = worst.get(key, (0, 0.0))
            worst[key] = (max(known[0], positions), max(known[1], seconds))
        return worst

    def _figures(self) -> Iterator[Metric]:
        """Scrape time (the HTTP server's thread): one query of the log heads."""
        heads = self._db.transaction(read_heads)
        head = gauge(
            "opconnect_changelog_head_position",
            "The last position allocated in each change log (every replica's commits).",
            ("log",),
        )
        purged = gauge(
            "opconnect_changelog_purged_position",
            "The position through which each change log may have been purged: a cursor at or"
            " before it answers CURSOR_EXPIRED.",
            ("log",),
        )
        for name, found in sorted(heads.items()):
            head.add_metric([name], found.position)
            purged.add_metric([name], found.purged_through)
        positions = gauge(
            "opconnect_stream_lag_positions",
            "The slowest open stream of this process per operator and kind: log positions"
            " between what it has delivered and the log head, an upper bound of the changes it"
            " has still to send (0 when caught up).",
            ("operator", "kind"),
        )
        seconds = gauge(
            "opconnect_stream_lag_seconds",
            "The slowest open stream of this process per operator and kind: seconds since the"
            " commit of the oldest change it has read and not yet delivered (0 when caught"
            " up).",
            ("operator", "kind"),
        )
        for (operator, kind), (behind, age) in sorted(self.lags(heads).items()):
            positions.add_metric([operator, kind], behind)
            seconds.add_metric([operator, kind], age)
        held = gauge(
            "opconnect_stream_tail_items",
            "Items held in this process's shared tails of live followers, by stream kind (at"
            " most stream_tail_items per log and operator followed here).",
            ("kind",),
        )
        by_kind: dict[str, int] = {}
        for tail in self.tails():
            by_kind[tail.kind] = by_kind.get(tail.kind, 0) + tail.held()
        for kind, count in sorted(by_kind.items()):
            held.add_metric([kind], count)
        yield from (head, purged, positions, seconds, held)


# --- the shared tail of live followers -----------------------------------------------------------


@dataclass(frozen=True)
class Shared(Generic[T]):
    """How a follower may be served from the shared tail of its kind and log (see `Tail`):
    `read_log(session, after, upto, limit)` reads every key's items with after < position <=
    upto, in position order (no filter of any follower's: the items of a key must be ones a
    follower of that key could read itself), `key_of(item)` names the key an item belongs to
    (an operator), and `keep(item)` says whether the follower wants one of its key's (its
    filter; None: every item). `on_unit`: `read_log` sends only driver statements, so it takes
    a `Unit` (no Session: the tail's reads, one per wake-up of the log, run as
    `Database.run_unit` units)."""

    read_log: ReadFn[T] | UnitReadFn[T]
    key_of: Callable[[T], str]
    keep: Callable[[T], bool] | None = None
    on_unit: bool = False


class _Kept(Generic[T]):
    """A key's items in a `Tail`: complete in (start, the tail's through], in position order."""

    __slots__ = ("followers", "items", "positions", "start")

    def __init__(self, start: int | None) -> None:
        self.items: list[T] = []
        self.positions: list[int] = []
        self.start = start  # None: the tail was never read yet
        self.followers = 0


class Tail(Generic[T]):
    """The recently committed items of one log, for the keys (operators, or ANY_KEY: every
    item) its live followers in this process follow, shared by them all, so that a commit costs
    one database read per wake-up however many follow it, of however many keys: a group commit
    carrying several operators' batches wakes them all, and one read serves them.

    Its log-level `through` is a log head read in the same snapshot as the items (or, after a
    read that was cut at the fill limit, the last item's position): nothing at or below it is
    still to commit (see the module docstring), and every key's items up to it have been read.
    For each followed key it holds that key's items with `start < position <= through`, in
    position order, so a follower served from it skips nothing. It is filled only by reads of
    the whole log, one at a time, each begun for the followers that saw a wake-up (`refresh`,
    counted log-wide: `Notifier.generation(log, ANY_KEY)`): a change committed by another
    replica reaches it the same way, by NOTIFY. Items of keys nobody here follows are dropped
    as a read is applied. A key that joins starts at the current `through` (a read in flight
    reads every key from there, so it completes the new key's too); a key whose last follower
    leaves is forgotten. It keeps at most `capacity` items per key, dropping the key's oldest
    (raising its `start`), so a busy key never evicts a quiet one's: a follower left below its
    key's `start` reads the database as any stream does, and nothing waits for it.
    """

    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        spec: Follow,
        shared: Shared[T],
        position_of: Callable[[T], int],
        *,
        capacity: int,
        metrics: Metrics,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self.log_name, self.kind = spec.log_name, spec.kind
        self._domain = spec.domain
        # Given a Session unless `on_unit` says it takes a Unit (then given one).
        self._read_log = cast(Callable[[Any, int, int, int], Sequence[T]], shared.read_log)
        self._key_of = shared.key_of
        self._run = db.run_unit if shared.on_unit else db.run
        self._position_of = position_of
        self.capacity = max(1, capacity)
        self._fill_limit = self.capacity
        self._keys: dict[str, _Kept[T]] = {}
        self.through: int | None = None  # None: never read
        self._more = False  # the last read was cut at the fill limit: more is stored
        self._read_generation = -1  # the log's wake count at which the last read began
        self._reading: tuple[int, asyncio.Future[None]] | None = None
        self.followers = 0  # of every key
        self.fills = 0  # reads applied (also counted by opconnect_stream_tail_fills_total)
        self._fills = metrics.stream_tail_fills.labels(spec.kind)

    def join(self, key: str) -> None:
        """A follower of `key` joins: a key new to the tail starts at its `through`."""
        kept = self._keys.get(key)
        if kept is None:
            kept = self._keys[key] = _Kept(self.through)
        kept.followers += 1
        self.followers += 1

    def leave(self, key: str) -> None:
        """A follower of `key` leaves: the key is forgotten with its last follower."""
        self.followers -= 1
        kept = self._keys.get(key)
        if kept is None:
            return
        kept.followers -= 1
        if kept.followers <= 0:
            del self._keys[key]

    def held(self) -> int:
        """How many items it holds, every key's."""
        return sum(len(kept.items) for kept in list(self._keys.values()))  # (scrape thread)

    def keys(self) -> list[str]:
        return list(self._keys)

    def items_of(self, key: str) -> list[T]:
        kept = self._keys.get(key)
        return list(kept.items) if kept is not None else []

    @property
    def read_generation(self) -> int:
        """The log's wake count at which the last applied read began."""
        return self._read_generation

    @property
    def more(self) -> bool:
        """The last read was cut at the fill limit: more is stored past `through` (a follower
        served nothing from it must not wait for a wake-up: its key's may be past the cut)."""
        return self._more

    def seed(self, head: int) -> None:
        """A follower's own read reached log head `head`: a tail never read yet starts there
        (empty, so complete for every key), and its first read fetches what came after."""
        if self.through is None and self._reading is None:
            self.through = head
            for kept in self._keys.values():
                kept.start = head

    def covers(self, key: str, seen: int) -> bool:
        """Whether the tail holds every item of `key` after `seen` up to `through`."""
        kept = self._keys.get(key)
        return kept is not None and kept.start is not None and kept.start <= seen

    def serve(
        self, key: str, seen: int, limit: int, keep: Callable[[T], bool] | None
    ) -> tuple[list[T], Head]:
        """The items of `key` after `seen` that `keep` wants, at most `limit`, and the head
        through which the answer is complete (as `_page` gives them); only while
        `covers(key, seen)`."""
        through = self.through if self.through is not None else seen
        kept = self._keys[key]
        index = bisect.bisect_right(kept.positions, seen)
        if keep is None:
            found = kept.items[index : index + limit]
        else:
            found = []
            for item in itertools.islice(kept.items, index, None):
                if keep(item):
                    found.append(item)
                    if len(found) == limit:
                        break
        return found, Head(max(through, seen), 0)

    async def refresh(self, generation: int) -> None:
        """Return once a read begun at the log's wake count `generation` or later (see
        `Notifier.generation`, ANY_KEY) has been applied, starting one if none has; at once if
        one has and it reached the head it read. A read's failure is each waiting follower's."""
        while True:
            if self._reading is not None:
                begun, reading = self._reading
                await asyncio.shield(reading)
                if begun >= generation:
                    return
                continue
            if self._read_generation >= generation and not self._more:
                return
            self._begin()

    def _begin(self) -> None:
        begun = self._notifier.generation(self.log_name, ANY_KEY)
        reading = asyncio.ensure_future(self._fill(begun, self.through))
        reading.add_done_callback(_discard)
        self._reading = (begun, reading)

    async def _fill(self, begun: int, after: int | None) -> None:
        try:
            items, head = await self._run(self._read, after)
            self._fills.inc()
            self.fills += 1
            self._apply(items, head, begun)
        finally:
            self._reading = None

    def _read(self, session: Session | Unit, after: int | None) -> tuple[Sequence[T], Head]:
        head = read_head(session, self.log_name)
        if after is None:  # the first read: the tail starts at the head
            return (), head
        return self._read_log(session, after, head.position, self._fill_limit), head

    def _apply(self, items: Sequence[T], head: Head, begun: int) -> None:
        self._read_generation = begun
        keys = self._keys
        if self.through is None:
            self.through = head.position
            for joined in keys.values():
                joined.start = head.position
            return
        every = keys.get(ANY_KEY)
        key_of, position_of = self._key_of, self._position_of
        for item in items:  # kept only for the keys followed now (joined while it read too)
            kept = keys.get(key_of(item))
            if kept is None and every is None:
                continue
            position = position_of(item)
            if kept is not None:
                kept.items.append(item)
                kept.positions.append(position)
            if every is not None and every is not kept:
                every.items.append(item)
                every.positions.append(position)
        self._more = len(items) >= self._fill_limit
        if self._more:
            self.through = position_of(items[-1])
        else:
            self.through = max(self.through, head.position)
        through, capacity, purged = self.through, self.capacity, head.purged_through
        for kept in keys.values():
            start = kept.start if kept.start is not None else through
            positions = kept.positions
            drop = max(len(positions) - capacity, 0)
            if purged > start:  # retention: what is purged is not served either
                drop = max(drop, bisect.bisect_right(positions, purged))
                start = purged
            if drop:
                start = max(start, positions[drop - 1])
                del kept.items[:drop]
                del positions[:drop]
            kept.start = min(start, through)


async def follow_log(
    db: Database,
    notifier: Notifier,
    spec: Follow,
    read: ReadFn[T],
    position_of: Callable[[T], int],
    *,
    after: int,
    streams: Streams,
    committed_at: Callable[[T], float],
    shared: Shared[T] | None = None,
    packs: Packs[T] | None = None,
) -> AsyncIterator[Batch[T]]:
    """Yield batches strictly after `after`: what is stored, then (if spec.follow) live changes,
    with a heartbeat batch (no items, newer position) after `heartbeat_s` of silence.

    A database read fetches up to `spec.read_batches` batches, sent one after the other. Holds
    at most two reads, however far behind the client is: the one being sent and, after a full
    read (more is likely stored), the next, read while the first is sent. The stream is
    registered with `streams` while open (its metrics); `committed_at(item)` is the item's
    commit time (epoch seconds) as its log's rows keep it.

    With `shared`, a following stream that has caught up is served from the shared tail of its
    kind and log (`Tail`), its key's items: the first read and any read below the key's start in
    the tail go to the database.
    With `packs`, an item may hold several changes (see `Packs`; a tail's items hold one each):
    batches and reads are counted in changes.
    """
    last_sent = time.monotonic()
    ahead: asyncio.Future[tuple[Sequence[T], Head]] | None = None
    key, meter = streams.open(spec, position_of, committed_at, after, packs)
    tail = None
    if shared is not None and spec.follow:
        tail = streams.join_tail(notifier, spec, shared, position_of)
    keep = shared.keep if shared is not None else None
    served = streams.metrics.stream_reads.labels(spec.kind, "tail")
    database = streams.metrics.stream_reads.labels(spec.kind, "database")
    size = spec.batch_size
    limit = size * max(1, spec.read_batches)  # the most one database read fetches
    # Every item of the stream's at or below `seen` has been read (`after` is the last one
    # sent, or where the stream started); None until the first read.
    seen: int | None = None
    try:
        while True:
            if notifier.closed:
                raise unavailable(
                    "SHUTTING_DOWN",
                    "the server is shutting down; reconnect and resume from the last cursor",
                )
            wake = notifier.waiter(spec.log_name, spec.key)
            # Counted log-wide: a tail's read serves every key, begun after any key's wake-up.
            generation = notifier.generation(spec.log_name, ANY_KEY)
            asked = limit
            from_tail = False
            if ahead is not None:
                items, head = await ahead
                ahead = None
                if not items:
                    continue  # read again, with the waiter taken before the read
            elif tail is not None and seen is not None:
                # A follower woken since the tail's last read began waits for a newer one,
                # even when the tail is ahead of it (it may hold nothing of its key's).
                if (
                    tail.through is None
                    or tail.through <= seen
                    or tail.read_generation < generation
                ):
                    await tail.refresh(generation)
                if tail.covers(spec.key, seen):
                    items, head = tail.serve(spec.key, seen, size, keep)
                    asked = size
                    from_tail = True
                    served.inc()
                else:  # behind the tail (or left below it): the database, as any stream
                    items, head = await db.run(_page, spec, read, seen, limit)
                    database.inc()
            else:
                items, head = await db.run(
                    _page, spec, read, after if seen is None else seen, limit
                )
                database.inc()
            meter.read(items, head)
            counted = len(items) if packs is None else sum(map(packs.count, items))
            if tail is not None and counted < asked:
                tail.seed(head.position)
            if items:
                last = position_of(items[-1])
                full = counted == asked
                seen = last if full else max(last, head.position)
                if full and (tail is None or not tail.covers(spec.key, last)):
                    # more is likely stored: read it meanwhile
                    ahead = asyncio.ensure_future(db.run(_page, spec, read, last, limit))
                    database.inc()
                batches = _batches(items, size, packs)
                for batch, held in itertools.pairwise([*batches, []]):
                    after = position_of(batch[-1])
                    yield Batch(batch, after)
                    meter.delivered(batch, head, held[:1])
                last_sent = time.monotonic()
                continue
            scanned = max(after, head.position)
            seen = scanned
            if not spec.follow or (spec.until is not None and time.time() >= spec.until):
                if scanned > after:
                    yield Batch([], scanned)
                return
            if from_tail and tail is not None and tail.more:
                continue  # its read was cut before the head (by other keys' items): read on
            wait = spec.heartbeat_s - (time.monotonic() - last_sent)
            if spec.until is not None:
                wait = min(wait, spec.until - time.time())
            if wait > 0:
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                    continue
                except TimeoutError:
                    pass
            if time.monotonic() - last_sent >= spec.heartbeat_s:
                after = scanned
                yield Batch([], after)
                last_sent = time.monotonic()
    finally:
        streams.close(key)
        if tail is not None:
            streams.leave_tail(tail, spec.key)
        if ahead is not None:  # the client went away: let the read finish unobserved
            ahead.add_done_callback(_discard)


def _batches(items: Sequence[T], size: int, packs: Packs[T] | None) -> list[Sequence[T]]:
    """`items` cut into batches of `size` changes (the last may be short): an item of `packs`
    holding several is never cut."""
    if packs is None:
        return [items[start : start + size] for start in range(0, len(items), size)]
    batches: list[Sequence[T]] = []
    batch: list[T] = []
    changes = 0
    for item in items:
        count = packs.count(item)
        if batch and changes + count > size:
            batches.append(batch)
            batch, changes = [], 0
        batch.append(item)
        changes += count
    if batch:
        batches.append(batch)
    return batches


def _discard(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so never reported as lost
