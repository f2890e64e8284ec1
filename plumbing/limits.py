"""Fair sharing between callers: how many unary calls one operator may have in flight, and the
gate every unit of database work passes (plumbing.db).

The gate admits units lane by lane, a lane being one principal (`operator/<id>`,
`platform/<name>`; "" for work of the process itself: start-up, authentication, purges). A lane
runs at most `per_lane` units at once, all lanes together at most `slots` (the database threads),
and with `one_writer` (SQLite, which has one writer anyway) one writing unit at a time, so that
SQLite's own lock is never contended inside a process. A unit that cannot run waits; when room
frees up, the waiting unit of the lane served least recently (writes counted apart from reads)
goes first, so one lane's backlog never stands in front of another lane's next unit, and reads go
on while a writer runs (WAL).

With `one_writer` (SQLite, in this process), at most `SQLITE_READERS` reads run at once (always
more than one lane's bound), and a slot is always left for the writer. SQLite's units are this
process's Python (the driver, rows, conversions) and share one GIL: more reads side by side read
no faster, and every time the writer gave up the GIL (at each call into SQLite) a reader held it
for up to the switch interval, all while the writer held the one write lock every
acknowledgement queues for. Under live followers woken by every commit (a read each), write
units took 22-27 ms with 8 readers against 12-16 ms with 3 threads in all, and acknowledgements
fell seconds behind (bench/README.md, `sustained_bench.py`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from plumbing.errors import ApiError, resource_exhausted

# What a refused call is told to wait before trying again (RetryInfo).
CALL_RETRY_S = 1.0
SYSTEM_LANE = ""
# Reads at once with one writer (see the module docstring); always more than one caller's
# own bound, so that a caller holding its most reads never keeps every other caller waiting.
SQLITE_READERS = 3


class Slots:
    """Counts what each key (an operator) holds open against a maximum: its unary calls in
    flight, or its streams."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Take a slot; False when the key holds the maximum already."""
        count = self.open.get(key, 0)
        if count >= self.maximum:
            return False
        self.open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.open.get(key, 1) - 1
        if count:
            self.open[key] = count
        else:
            self.open.pop(key, None)


def too_many_calls(maximum: int) -> ApiError:
    return resource_exhausted(
        "gateway.opconnect",
        "TOO_MANY_CALLS",
        f"at most {maximum} concurrent calls per operator; retry after the delay given",
        CALL_RETRY_S,
    )


@dataclass
class _Waiter:
    write: bool
    order: int
    future: asyncio.Future[None] = field(repr=False)


class FairGate:
    """See the module docstring. Used from one event loop at a time; `leave` must be called
    once for every `enter` that returned."""

    def __init__(self, slots: int, per_lane: int, *, one_writer: bool) -> None:
        self.slots = max(1, slots)
        self.per_lane = max(1, min(per_lane or self.slots, self.slots))
        self.one_writer = one_writer
        self.running = 0
        self.reading = 0
        self.writing = False
        # With one writer, reads leave a slot for it, and at most SQLITE_READERS run at once
        # (more than one lane's own bound).
        readers = max(SQLITE_READERS, self.per_lane + 1)
        self.read_slots = max(1, min(self.slots - 1, readers)) if one_writer else self.slots
        self.lanes: dict[str, int] = {}  # lane -> units running
        self._waiting: dict[str, deque[_Waiter]] = {}
        # (lane, write) -> when the lane last got a unit of that kind in (a counter; one entry
        # per principal and kind, kept: the principals are the registered ones).
        self._served: dict[tuple[str, bool], int] = {}
        self._clock = itertools.count(1)
        self._order = itertools.count(1)

    def waiting(self, lane: str) -> tuple[int, int]:
        """(reads, writes) of the lane waiting to run."""
        queue = self._waiting.get(lane, ())
        writes = sum(w.write for w in queue)
        return len(queue) - writes, writes

    def _cap(self, lane: str) -> int:
        # The process's own work (authentication lookups of every caller, purges) is not one
        # caller's: it is bounded by the threads only.
        return self.slots if lane == SYSTEM_LANE else self.per_lane

    def _room(self, lane: str, write: bool) -> bool:
        if not write and self.reading >= self.read_slots:
            return False
        return self.running < self.slots and self.lanes.get(lane, 0) < self._cap(lane)

    def _writer_free(self, write: bool) -> bool:
        return not (write and self.one_writer and self.writing)

    def _grant(self, lane: str, write: bool) -> None:
        self.running += 1
        self.lanes[lane] = self.lanes.get(lane, 0) + 1
        if write and self.one_writer:
            self.writing = True
        if not write:
            self.reading += 1
        self._served[lane, write] = next(self._clock)

    async def enter(self, lane: str, write: bool) -> None:
        """Wait until a unit of `lane` may run (cancellable while it waits)."""
        if lane not in self._waiting and self._room(lane, write) and self._writer_free(write):
            self._grant(lane, write)
            return
        waiter = _Waiter(write, next(self._order), asyncio.get_running_loop().create_future())
        self._waiting.setdefault(lane, deque()).append(waiter)
        self._dispatch()
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave(lane, write)  # let in just as the caller gave up
            else:
                self._forget(lane, waiter)
            raise

    def leave(self, lane: str, write: bool) -> None:
        """A unit of `lane` has finished: let the next ones in."""
        self.running -= 1
        if not write:
            self.reading -= 1
        count = self.lanes.get(lane, 1) - 1
        if count:
            self.lanes[lane] = count
        else:
            self.lanes.pop(lane, None)
        if write and self.one_writer:
            self.writing = False
        self._dispatch()

    def _forget(self, lane: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(lane)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[lane]
        self._dispatch()

    def _dispatch(self) -> None:
        while True:
            best: tuple[tuple[int, int], str, _Waiter] | None = None
            for lane, queue in self._waiting.items():
                # The lane's first unit that can run: a read need not wait behind the lane's
                # own write that waits for the writer, nor a write behind reads over their
                # bound.
                waiter = next(
                    (
                        w
                        for w in queue
                        if not w.future.done()
                        and self._writer_free(w.write)
                        and self._room(lane, w.write)
                    ),
                    None,
                )
                if waiter is None:
                    continue
                rank = (self._served.get((lane, waiter.write), 0), waiter.order)
                if best is None or rank < best[0]:
                    best = (rank, lane, waiter)
            if best is None:
                return
            _, lane, waiter = best
            queue = self._waiting[lane]
            queue.remove(waiter)
            if not queue:
                del self._waiting[lane]
            self._grant(lane, waiter.write)
            waiter.future.set_result(None)
