"""SQLite's writers in several processes take turns through a lock file
(plumbing/writer_turns.py): a writer waits for the turn, gives up after the busy timeout as
STORAGE_BUSY, a turn it gave up on is handed back (never kept), and writers in real processes
writing at once store everything."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from plumbing.db import Database, Unit
from plumbing.errors import ApiError, Kind
from plumbing.metrics import Metrics
from plumbing.writer_turns import WriterTurns

ROOT = Path(__file__).resolve().parent.parent


def _scratch(path: Path) -> str:
    url = f"sqlite:///{path}"
    database = Database(url, threads=1)
    database.transaction(_create, write=True)
    database.close()
    return url


def _create(session: Session) -> None:
    session.execute(text("CREATE TABLE IF NOT EXISTS scratch (writer TEXT, n INTEGER)"))


def _insert(unit: Unit, writer: str, n: int) -> None:
    unit.fetch("INSERT INTO scratch (writer, n) VALUES (?, ?)", [writer, n])


def _count(unit: Unit) -> list[tuple[str, int]]:
    return [
        (str(w), int(c))
        for w, c in unit.fetch(
            "SELECT writer, COUNT(*) FROM scratch GROUP BY writer ORDER BY writer", []
        )
    ]


def _hold(unit: Unit, holding: threading.Event, release: threading.Event) -> None:
    unit.fetch("INSERT INTO scratch (writer, n) VALUES ('holder', 0)", [])
    holding.set()
    assert release.wait(10)


def test_the_turns_file_is_private(tmp_path: Path) -> None:
    turns = WriterTurns(tmp_path / "opconnect.db")
    try:
        assert turns.path == tmp_path / "opconnect.db.writers"
        assert stat.S_IMODE(os.stat(turns.path).st_mode) == 0o600
    finally:
        turns.close()


def test_a_writer_waits_for_the_turn_gives_up_as_busy_and_never_keeps_it(tmp_path: Path) -> None:
    """One process's writer holds the turn: another's gives up after its busy timeout with
    RESOURCE_EXHAUSTED (STORAGE_BUSY), without running its unit; the turn it gave up on, given
    to it later, goes straight back, so a third writer gets it once the first is done."""
    url = _scratch(tmp_path / "opconnect.db")
    holder = Database(url, threads=2)
    waiter = Database(url, threads=2, busy_timeout_s=0.3, metrics=Metrics(enabled=True))
    third = Database(url, threads=2, busy_timeout_s=10)
    holding, release = threading.Event(), threading.Event()

    async def scenario() -> None:
        held = asyncio.ensure_future(holder.run_unit(_hold, holding, release, write=True))
        assert await asyncio.to_thread(holding.wait, 10)
        with pytest.raises(ApiError) as raised:
            await waiter.run_unit(_insert, "waiter", 1, write=True)
        assert (raised.value.kind, raised.value.reason) == (Kind.LIMITED, "STORAGE_BUSY")
        release.set()
        await held
        # The waiter's abandoned wait is given the turn now and hands it back: the third
        # writer (another process's turns) is not kept waiting for ever.
        await third.run_unit(_insert, "third", 1, write=True)
        await waiter.run_unit(_insert, "waiter", 2, write=True)
        assert await third.run_unit(_count) == [("holder", 1), ("third", 1), ("waiter", 1)]
        # Both of the waiter's waits for the turn are counted, the first its whole busy timeout.
        exported = dict(
            line.rsplit(" ", 1)
            for line in waiter.metrics.text().splitlines()
            if line.startswith("opconnect_db_writer_turn_wait_seconds_")
        )
        assert float(exported["opconnect_db_writer_turn_wait_seconds_count"]) == 2
        assert float(exported["opconnect_db_writer_turn_wait_seconds_sum"]) >= 0.3

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        for database in (holder, waiter, third):
            database.close()


_WRITER = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from plumbing.db import Database, Unit

def insert(unit: Unit, writer: str, n: int) -> None:
    unit.fetch("INSERT INTO scratch (writer, n) VALUES (?, ?)", [writer, n])

async def main() -> None:
    database = Database(sys.argv[2], threads=2, busy_timeout_s=60)
    try:
        for n in range(int(sys.argv[4])):
            await database.run_unit(insert, sys.argv[3], n, write=True)
    finally:
        database.close()

asyncio.run(main())
"""


def test_writers_in_several_processes_store_everything(tmp_path: Path) -> None:
    """Three processes writing one SQLite file at once, each unit taking its turn: every
    write is stored, none refused as busy."""
    url = _scratch(tmp_path / "opconnect.db")
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(ROOT), url, f"w{i}", "150"],
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    for child in children:
        _, errors = child.communicate(timeout=120)
        assert child.returncode == 0, errors.decode()[-2000:]
    database = Database(url, threads=1)
    try:
        assert asyncio.run(database.run_unit(_count)) == [("w0", 150), ("w1", 150), ("w2", 150)]
    finally:
        database.close()


def test_turns_closed_refuse_and_the_waiting_thread_ends(tmp_path: Path) -> None:
    turns = WriterTurns(tmp_path / "opconnect.db")
    assert turns.take(1.0)
    turns.give_back()
    turns.close()
    assert not turns.take(1.0)
    turns._waiter.join(5)
    assert not turns._waiter.is_alive()
