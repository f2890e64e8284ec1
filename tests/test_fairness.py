"""Fair sharing between operators: one operator held at its limits cannot starve another; the
excess of its calls is answered RESOURCE_EXHAUSTED (TOO_MANY_CALLS) with RetryInfo; contention
never answers STORAGE_UNAVAILABLE; the SQLite files are private."""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from opconnect.numbers.v1 import numbers_pb2 as pb
from plumbing import limits
from plumbing.db import Database
from plumbing.errors import ApiError
from plumbing.limits import FairGate
from plumbing.status import code_of
from services.numbers import storage
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    OTHER_TENANT,
    TENANT,
    Pki,
    RunningSystem,
    rich_error,
    settings_for,
    start_system,
)

BUSY, QUIET = f"operator/{OPERATOR}", f"operator/{OTHER_OPERATOR}"
BOTH = pb.Capabilities(inbound=True, outbound=True)
NO_RATE_LIMIT: dict[str, Any] = {"rate_per_operator": 1e9, "rate_burst": 10**9}
HOLD_S = 60.0  # the longest a held unit of work waits for the test to let it go


def upload_request(numbers: list[str], tenant: str) -> pb.UploadNumbersRequest:
    return pb.UploadNumbersRequest(
        tenant_id=tenant,
        numbers=[
            pb.NumberUpload(
                phone_number=n,
                usage=pb.NUMBER_USAGE_USER,
                capabilities=BOTH,
                allow_tenant_address_update=True,
            )
            for n in numbers
        ],
    )


def get(number: str) -> pb.GetNumberRequest:
    return pb.GetNumberRequest(phone_number=number)


def first_done(calls: list[Any], timeout: float = 30) -> Any:
    """The first of the call futures to finish."""
    done: queue.Queue[Any] = queue.Queue()
    for call in calls:
        call.add_done_callback(done.put)
    return done.get(timeout=timeout)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def assert_too_many_calls(error: grpc.RpcError) -> None:
    rich = rich_error(error)
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED, rich
    assert (rich.reason, rich.domain) == ("TOO_MANY_CALLS", "gateway.opconnect")
    assert rich.retry_delay_s is not None and rich.retry_delay_s > 0


class Hold:
    """Wraps a storage function so that the busy operator's units of work wait inside it until
    the test lets them go; records whose units ran, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, first_only: bool) -> None:
        self.entered = threading.Semaphore(0)
        self.released = threading.Event()
        self.order: list[str] = []
        self._first_only = first_only
        original = getattr(storage, name)

        def held(session: Session, operator_id: str, *args: Any) -> Any:
            self.order.append(operator_id)
            if operator_id == OPERATOR and not (
                self._first_only and self.order.count(OPERATOR) > 1
            ):
                self.entered.release()
                self.released.wait(HOLD_S)
            return original(session, operator_id, *args)

        monkeypatch.setattr(storage, name, held)

    def wait_entered(self, count: int) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=30), "the busy operator's work never started"


@pytest.fixture
def limited(session_pki: Pki, migrated_url: str, tmp_path: Path) -> Iterator[RunningSystem]:
    running = start_system(
        settings_for(
            tmp_path,
            session_pki.paths,
            migrated_url,
            max_calls_per_operator=3,
            max_db_work_per_operator=2,
            **NO_RATE_LIMIT,
        ),
        session_pki,
    )
    yield running
    running.stop()


def waiting(system: RunningSystem, lane: str) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        return system.runtime.db.gate.waiting(lane)

    return system.call(read())


def test_an_operator_at_its_limits_does_not_hold_up_another(
    limited: RunningSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The busy operator has its most calls in flight (two reads held in the database, the most
    it may run at once, and one more waiting): its next call is refused with RetryInfo at once,
    while the other operator's writes and reads all succeed."""
    busy, quiet = limited.numbers(OPERATOR), limited.numbers(OTHER_OPERATOR)
    mine = [f"+1425556{i:04d}" for i in range(4)]
    busy.UploadNumbers(upload_request(mine, TENANT))
    quiet.UploadNumbers(upload_request(["+14255570000"], OTHER_TENANT))
    hold = Hold(monkeypatch, "find_number", first_only=False)
    try:
        held = [busy.GetNumber.future(get(n)) for n in mine[:2]]
        hold.wait_entered(2)
        # Two more at once: one is its third call in flight (it waits for the database), the
        # other is one too many and is answered first.
        more = [busy.GetNumber.future(get(n)) for n in mine[2:]]
        refused = first_done(more)
        assert_too_many_calls(refused.exception())
        held += [call for call in more if call is not refused]
        with pytest.raises(grpc.RpcError) as again:
            busy.ListNumbers(pb.ListNumbersRequest())
        assert_too_many_calls(again.value)

        written = quiet.UploadNumbers(upload_request(["+14255570001"], OTHER_TENANT))
        assert written.added_count == 1
        assert quiet.GetNumber(get("+14255570001")).number.phone_number == "+14255570001"
        assert len(quiet.ListNumbers(pb.ListNumbersRequest()).numbers) == 2
        assert not any(call.done() for call in held)
    finally:
        hold.released.set()
    for call in held:
        assert call.result(timeout=30).number.phone_number in mine
    assert busy.GetNumber(get(mine[0])).number.phone_number == mine[0]  # its slots are back


def test_one_write_is_not_queued_behind_another_operators_backlog(
    session_pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: writes run one at a time in the process. The busy operator's upload holds the
    writer and two more of its uploads wait; the other operator's upload, sent after them, is
    the next to write. Reads of both go on while the writer is held."""
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    system = start_system(
        settings_for(tmp_path, session_pki.paths, url, max_calls_per_operator=4, **NO_RATE_LIMIT),
        session_pki,
    )
    try:
        busy, quiet = system.numbers(OPERATOR), system.numbers(OTHER_OPERATOR)
        busy.UploadNumbers(upload_request(["+14255580000"], TENANT))
        quiet.UploadNumbers(upload_request(["+14255590000"], OTHER_TENANT))
        hold = Hold(monkeypatch, "upload_numbers", first_only=True)
        try:
            calls = [busy.UploadNumbers.future(upload_request(["+14255580001"], TENANT))]
            hold.wait_entered(1)
            calls += [
                busy.UploadNumbers.future(upload_request([f"+1425558000{i}"], TENANT))
                for i in (2, 3)
            ]
            wait_until(lambda: waiting(system, BUSY) == (0, 2), "two busy uploads wait")
            # Reads do not wait for the writer, the busy operator's own neither.
            assert quiet.GetNumber(get("+14255590000")).number.phone_number
            assert busy.GetNumber(get("+14255580000")).number.phone_number
            calls.append(quiet.UploadNumbers.future(upload_request(["+14255590001"], OTHER_TENANT)))
            wait_until(lambda: waiting(system, QUIET) == (0, 1), "the quiet upload waits")
        finally:
            hold.released.set()
        for call in calls:
            assert call.result(timeout=30).added_count == 1
        assert hold.order == [OPERATOR, OTHER_OPERATOR, OPERATOR, OPERATOR]
    finally:
        system.stop()


def test_big_uploads_of_one_operator_never_fail_another(
    session_pki: Pki, migrated_url: str, tmp_path: Path
) -> None:
    """Many concurrent 10,000-number uploads from one operator while the other writes and reads:
    the other's calls all succeed, and the busy operator's calls either succeed or are refused
    TOO_MANY_CALLS; nothing is answered STORAGE_UNAVAILABLE."""
    system = start_system(
        settings_for(
            tmp_path, session_pki.paths, migrated_url, max_calls_per_operator=3, **NO_RATE_LIMIT
        ),
        session_pki,
    )
    try:
        busy, quiet = system.numbers(OPERATOR), system.numbers(OTHER_OPERATOR)
        uploads = [
            upload_request([f"+1{2_000_000_000 + k * 10_000 + i}" for i in range(10_000)], TENANT)
            for k in range(6)
        ]
        calls = [busy.UploadNumbers.future(request, timeout=120) for request in uploads]
        for i in range(10):
            number = f"+1{3_000_000_000 + i}"
            assert quiet.UploadNumbers(upload_request([number], OTHER_TENANT)).added_count == 1
            assert quiet.GetNumber(get(number)).number.phone_number == number
        for call in calls:
            error = call.exception(timeout=120)
            if error is None:
                assert call.result().added_count == 10_000
            else:
                assert_too_many_calls(error)
    finally:
        system.stop()


# --------------------------------------------------------------------------- the gate itself


async def test_the_gate_takes_lanes_in_turn_and_lets_reads_pass_a_writer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "SQLITE_READERS", 3)  # three reads at once here
    gate = FairGate(4, 2, one_writer=True)
    order: list[str] = []

    async def unit(lane: str, write: bool, tag: str) -> None:
        await gate.enter(lane, write)
        order.append(tag)

    await gate.enter("a", True)  # a writes
    tasks = [asyncio.create_task(unit("a", True, f"a{i}")) for i in (2, 3, 4)]
    tasks.append(asyncio.create_task(unit("b", True, "b1")))
    while gate.waiting("a") != (0, 3) or gate.waiting("b") != (0, 1):
        await asyncio.sleep(0)
    await gate.enter("b", False)  # a read passes the writer
    await gate.enter("a", False)  # a's own too: its second unit at once
    read = asyncio.create_task(unit("a", False, "a-read"))  # a third would be over a's bound
    while gate.waiting("a") != (1, 3):
        await asyncio.sleep(0)
    gate.leave("a", True)  # the writer is free: b's write goes before a's backlog; and a has
    # room again for its read
    while len(order) < 2:
        await asyncio.sleep(0)
    assert order == ["b1", "a-read"]
    gate.leave("a", False)
    gate.leave("b", True)  # b's write is done: a's writes, one at a time
    while order[-1] != "a2":
        await asyncio.sleep(0)
    gate.leave("a", True)
    while order[-1] != "a3":
        await asyncio.sleep(0)
    # A unit that gives up while it waits leaves no trace.
    tasks[2].cancel()
    gate.leave("a", True)
    await asyncio.gather(*tasks[:2], tasks[3], read)
    with pytest.raises(asyncio.CancelledError):
        await tasks[2]
    assert gate.waiting("a") == (0, 0) and not gate.writing
    assert order == ["b1", "a-read", "a2", "a3"]
    gate.leave("b", False)
    gate.leave("a", False)
    assert gate.running == 0 and gate.lanes == {}


async def test_with_one_writer_reads_run_few_at_once_and_leave_the_writer_a_slot() -> None:
    """SQLite: however many threads, at most SQLITE_READERS reads run at once (more only
    share the GIL with the writer, which holds the one write lock), yet more than one caller
    may hold; and a write is never kept waiting by reads: a slot is left for it."""
    gate = FairGate(8, 2, one_writer=True)
    assert gate.per_lane < gate.read_slots == limits.SQLITE_READERS < 7
    for lane in ("a", "a", "b")[: gate.read_slots]:  # one caller at its bound leaves room
        await asyncio.wait_for(gate.enter(lane, False), 1)
    assert gate.reading == gate.read_slots
    third = asyncio.create_task(gate.enter("c", False))  # another lane, with room of its own
    while gate.waiting("c") != (1, 0):
        await asyncio.sleep(0)
    await asyncio.wait_for(gate.enter("d", True), 1)  # the writer's slot
    assert gate.writing and not third.done()
    gate.leave("a", False)  # a read ends: the waiting one runs
    await asyncio.wait_for(third, 1)
    assert gate.reading == gate.read_slots
    # Without one writer (PostgreSQL), reads use every slot.
    shared = FairGate(3, 3, one_writer=False)
    for _ in range(3):
        await asyncio.wait_for(shared.enter("a", False), 1)
    assert shared.reading == 3


# --------------------------------------------------------------------------- SQLite's lock


def test_a_lock_held_by_another_process_answers_busy_not_unavailable(tmp_path: Path) -> None:
    """Another process keeps SQLite's write lock past the busy timeout: a limit, answered
    RESOURCE_EXHAUSTED (STORAGE_BUSY) with RetryInfo, never UNAVAILABLE."""
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    database = Database(url, threads=2, busy_timeout_s=0.2)
    database.migrate()
    other = sqlite3.connect(tmp_path / "opconnect.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")

        def write(session: Session) -> None:
            session.execute(text("DELETE FROM operators WHERE operator_id = 'nobody'"))

        with pytest.raises(ApiError) as raised:
            asyncio.run(database.run(write, write=True))
        assert code_of(raised.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert raised.value.reason == "STORAGE_BUSY"
        assert raised.value.retry_after_s
        other.execute("ROLLBACK")
        asyncio.run(database.run(write, write=True))  # and works once the lock is free
    finally:
        other.close()
        database.close()


# --------------------------------------------------------------------------- private files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_and_database_files_are_private(
    session_pki: Pki, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    settings = settings_for(data, session_pki.paths, "")  # the default: SQLite in data_dir
    db_file = data / "opconnect.db"
    files = [db_file, data / "opconnect.db-wal", data / "opconnect.db-shm"]
    old = os.umask(0o022)
    try:
        system = start_system(settings, session_pki)
        try:
            assert mode(data) == 0o700
            assert [mode(f) for f in files] == [0o600] * 3  # -wal and -shm: open in WAL mode
        finally:
            system.stop()
        # Files left open to others (an older version, a copy) are tightened at start.
        data.chmod(0o755)
        for file in files:
            if not file.exists():
                file.touch()
            file.chmod(0o644)
        system = start_system(settings, session_pki)
        try:
            assert mode(data) == 0o700
            assert [mode(f) for f in files] == [0o600] * 3
        finally:
            system.stop()
    finally:
        os.umask(old)
