"""SQLite's writers in several processes on one machine take turns through a lock file.

SQLite has one writer. In one process the gate (plumbing.limits) lets one write unit run at a
time; between processes (the split roles, or replicas, on one SQLite file) a writer that finds
the database locked is left to SQLite's busy handler, which sleeps and tries again, up to 100 ms
at a time: while one process keeps writing, another's writer can wait seconds (measured with
three processes writing 200-row transactions in turn: p99 130-190 ms and a maximum of 0.5-0.8 s
with the busy handler, 45-70 ms and 0.1-0.2 s with this lock). Here every writer of the file
first takes an exclusive `flock` of `<database>.writers`, blocking, so the kernel hands the turn
on the moment it is given back; SQLite's own lock still guards the data (a writer that is not
ours, the sqlite3 shell say, is still met by the busy timeout).

A blocking `flock` cannot time out, and a unit must give up after the busy timeout. So the wait
happens on a thread of its own: the unit waits at most its timeout for that thread to be given
the turn, and a turn given after the unit gave up is handed straight back. A process that dies
gives its turn back with it (the kernel drops its locks).
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from pathlib import Path


class _Ticket:
    """One unit's wait for the turn on the waiting thread."""

    def __init__(self) -> None:
        self.given = threading.Event()
        self.abandoned = False


class WriterTurns:
    """The turns of one SQLite file's writers (`take` before BEGIN, `give_back` after the
    commit or rollback). At most one unit of this object holds the turn at a time: the caller
    runs one writer at a time (the gate)."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".writers")
        # Private, as the database beside it; it stays empty (only its lock matters).
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        self._state = threading.Lock()
        self._waiting = 0  # tickets on the waiting thread, not yet given or handed back
        self._closed = False
        self._tickets: queue.SimpleQueue[_Ticket | None] = queue.SimpleQueue()
        # A daemon: a process stopping never waits for another process's turn.
        self._waiter = threading.Thread(
            target=self._wait_turns, name="sqlite-writer-turns", daemon=True
        )
        self._waiter.start()

    def take(self, timeout_s: float) -> bool:
        """Wait at most `timeout_s` for the turn; True when it is this process's."""
        with self._state:
            if self._closed:
                return False
            if not self._waiting:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    pass
            # Another process has the turn, or an abandoned ticket is still queued: wait
            # behind it on the waiting thread (the descriptor's lock is touched by one thread
            # at a time: this one only when nothing is queued there).
            self._waiting += 1
            ticket = _Ticket()
            self._tickets.put(ticket)
        if ticket.given.wait(max(0.0, timeout_s)):
            return True
        with self._state:
            if ticket.given.is_set():
                return True
            ticket.abandoned = True
        return False

    def _wait_turns(self) -> None:
        """The waiting thread: each ticket in turn, until closed."""
        while (ticket := self._tickets.get()) is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks, without the GIL, until given
            with self._state:
                self._waiting -= 1
                if ticket.abandoned or self._closed:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                else:
                    ticket.given.set()
        os.close(self._fd)  # closed here, after the last wait: the descriptor outlives it

    def give_back(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """No more turns; the lock file's descriptor is closed once no wait is under way."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        self._tickets.put(None)
