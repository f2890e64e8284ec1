"""The README's example programs run as written, against a real server over mutual TLS: the
Python ones on opconnect_client (watch, follow to a file, submit) and the Node.js one
(@grpc/grpc-js) doing list-then-watch with resume: killed and started again it goes on after
its saved cursor, it waits out a server restart, and it lists again after CURSOR_EXPIRED."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from google.protobuf import field_mask_pb2
from google.protobuf.json_format import MessageToDict

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from services.numbers import storage as numbers_storage
from tests.conftest import OPERATOR, TENANT, Pki, RunningSystem, settings_for, start_system
from tests.helpers import assign, upload
from tests.records_data import duration_record, ids, publish_records, record

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ["+14255550100", "+14255550101", "+14255550102", "+14255550103"]


class Program:
    """An example program run in a process of its own; its stdout read line by line."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.lines.put(line)

    def json_lines(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            try:
                found.append(
                    json.loads(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
                )
            except queue.Empty:
                assert self.process.stderr is not None
                self.process.kill()
                raise AssertionError(f"got {found}; stderr: {self.process.stderr.read()}") from None
        return found

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def files(system: RunningSystem) -> list[str]:
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    return ["--ca", str(system.pki.paths.ca_cert), "--cert", str(cert), "--key", str(key)]


def node_watch(system: RunningSystem, address: str, checkpoint: Path) -> Program:
    return Program(
        [
            "node",
            "examples/node/watch_assignments.js",
            *("--address", address),
            *files(system),
            *("--checkpoint", str(checkpoint)),
        ]
    )


def test_the_node_example_watches_with_resume(session_pki: Pki, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    system = start_system(settings_for(tmp_path, session_pki.paths, url), session_pki)
    port = system.runtime.port
    address = f"localhost:{port}"
    checkpoint = tmp_path / "watch.cursor"
    upload(system, *NUMBERS)
    assign(system, NUMBERS[0])
    watcher = node_watch(system, address, checkpoint)
    again: RunningSystem | None = None
    try:
        listed = watcher.json_lines(4)
        assert all(x["listing"] for x in listed)
        assert sorted(x["phone_number"] for x in listed) == NUMBERS
        assign(system, NUMBERS[1])
        (event,) = watcher.json_lines(1)
        assert (event["type"], event["phone_number"]) == (
            "ASSIGNMENT_EVENT_TYPE_ASSIGNED",
            NUMBERS[1],
        )
        time.sleep(0.5)  # its cursor saved
        watcher.kill()

        assign(system, NUMBERS[2])  # while it is away
        watcher = node_watch(system, address, checkpoint)
        (event,) = watcher.json_lines(1)
        assert event["phone_number"] == NUMBERS[2]  # resumed after its cursor: nothing again

        system.stop()  # the server goes away under it, and comes back on the same port
        settings = settings_for(tmp_path, session_pki.paths, url, listen=f"127.0.0.1:{port}")
        again = start_system(settings, session_pki)
        assign(again, NUMBERS[3])
        (event,) = watcher.json_lines(1)
        assert event["phone_number"] == NUMBERS[3]
        watcher.kill()

        # A cursor older than the changes kept (a change after it, then every change purged):
        # it lists again, then watches.
        again.admin().UnassignNumber(
            numbers_pb.UnassignNumberRequest(phone_number=NUMBERS[2], tenant_id=TENANT)
        )
        future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        again.call(again.runtime.db.run(numbers_storage.purge_events, future, write=True))
        watcher = node_watch(again, address, checkpoint)
        relisted = watcher.json_lines(4)
        assert all(x["listing"] for x in relisted)
        assert {x["phone_number"]: x["state"] for x in relisted}[NUMBERS[3]] == (
            "ASSIGNMENT_STATE_ASSIGNED"
        )
    finally:
        watcher.kill()
        (again or system).stop()


def test_the_python_watch_example_resumes_after_its_checkpoint(
    sqlite_system: RunningSystem, tmp_path: Path
) -> None:
    system = sqlite_system
    upload(system, *NUMBERS)
    command = [
        sys.executable,
        "examples/python/watch_assignments.py",
        *("--target", system.address),
        *files(system),
        *("--checkpoint", str(tmp_path / "watch.cursor")),
    ]
    watcher = Program(command)
    try:
        assert len(watcher.json_lines(4)) == 4
        assign(system, NUMBERS[0])
        assign(system, NUMBERS[1])
        seen = [x["phone_number"] for x in watcher.json_lines(2)]
        assert seen == NUMBERS[:2]
        watcher.kill()
        assign(system, NUMBERS[2])
        watcher = Program(command)
        # At least once: the last batch it printed before the kill (not yet saved, since it
        # never asked for the next one) comes again, then what happened while it was away.
        later = [x["phone_number"] for x in watcher.json_lines(1)]
        while later[-1] != NUMBERS[2]:
            later += [x["phone_number"] for x in watcher.json_lines(1)]
        assert later[:-1] == seen[len(seen) - len(later) + 1 :]
    finally:
        watcher.kill()


def test_the_python_emergency_routes_example_keeps_its_table_exactly_once(
    sqlite_system: RunningSystem, tmp_path: Path
) -> None:
    system = sqlite_system
    upload(system, *NUMBERS[:3])  # USER numbers at the tenant's test address
    assign(system, NUMBERS[0])
    database = tmp_path / "routes.db"
    command = [
        sys.executable,
        "examples/python/emergency_routes.py",
        *("--target", system.address),
        *files(system),
        *("--database", str(database)),
    ]
    address_id = system.addresses[OPERATOR, TENANT]
    routes = Program(command)
    try:
        listed = {x["phone_number"]: x["route"] for x in routes.json_lines(3)}
        assert listed[NUMBERS[1]] is None and listed[NUMBERS[2]] is None  # not assigned
        assert listed[NUMBERS[0]]["civic_address_id"] == address_id
        assert listed[NUMBERS[0]]["address"] == "1 Microsoft Way, Redmond, WA 98052, US"
        assign(system, NUMBERS[1])
        (assigned,) = routes.json_lines(1)
        assert assigned["phone_number"] == NUMBERS[1] and assigned["route"]["address"]
        # The operator edits the address: each assigned number at it is routed anew.
        stub = civic_addresses_pb2_grpc.CivicAddressServiceStub(system.channel())
        stub.UpdateCivicAddress(
            addresses_pb.UpdateCivicAddressRequest(
                civic_address=addresses_pb.CivicAddress(
                    civic_address_id=address_id, postal_code="98053"
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["postal_code"]),
            )
        )
        updated = {x["phone_number"]: x["route"]["address"] for x in routes.json_lines(2)}
        assert updated == dict.fromkeys(NUMBERS[:2], "1 Microsoft Way, Redmond, WA 98053, US")
        routes.kill()  # after it printed them: those batches and their cursors committed
        system.admin().UnassignNumber(
            numbers_pb.UnassignNumberRequest(phone_number=NUMBERS[0], tenant_id=TENANT)
        )
        routes = Program(command)
        # Exactly once: it resumes after the last batch applied, nothing of it again.
        assert routes.json_lines(1) == [{"phone_number": NUMBERS[0], "route": None}]
    finally:
        routes.kill()
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT phone_number, address, elin FROM emergency_routes").fetchall()
    assert rows == [(NUMBERS[1], "1 Microsoft Way, Redmond, WA 98053, US", "")]


def test_the_python_follow_and_submit_examples(
    sqlite_system: RunningSystem, tmp_path: Path
) -> None:
    system = sqlite_system
    published = [record() for _ in range(30)]
    publish_records(system.ingest(), published)
    out = tmp_path / "records.jsonl"
    follower = Program(
        [
            sys.executable,
            "examples/python/follow_records.py",
            *("--target", system.address),
            *files(system),
            *("--checkpoint", str(tmp_path / "records.db")),
            *("--out", str(out)),
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not out.exists() or len(out.read_text().splitlines()) < 30:
            assert time.monotonic() < deadline, "the records never reached the file"
            time.sleep(0.1)
    finally:
        follower.kill()
    assert [json.loads(x)["call_id"] for x in out.read_text().splitlines()] == ids(published)

    durations = tmp_path / "durations.jsonl"
    good = [duration_record() for _ in range(40)]
    bad = duration_record()
    bad.duration.seconds = 100_000  # longer than the call
    lines = [MessageToDict(r, preserving_proto_field_name=True) for r in [*good, bad]]
    durations.write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = subprocess.run(
        [
            sys.executable,
            "examples/python/submit_durations.py",
            *("--target", system.address),
            *files(system),
            str(durations),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    *refused, totals = done.stdout.strip().splitlines()
    assert json.loads(totals) == {
        "CALL_DURATION_OUTCOME_ACCEPTED": 40,
        "CALL_DURATION_OUTCOME_REFUSED": 1,
    }
    assert refused == [
        f"{bad.record_id}: DURATION_INVALID (duration): " + refused[0].split(": ", 2)[2]
    ]
