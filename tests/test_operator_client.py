"""`opconnect operator`: an operator submits durations from CSV (resuming after an
interruption, never counting a record twice), and reads its usage and reconciliation."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli import main
from operator_client.commands import journal_path, lines_done, lock_path
from operator_client.durations_csv import DurationsFile, read_lines, write_records
from services.usage import tables
from tests.conftest import OPERATOR, Pki, RunningSystem
from tests.helpers import (
    INTERRUPTIBLE_CLI,
    eventually,
    feed_system,
    free_port,
    kept,
    stored,
    submit,
    usage_stub,
)
from tests.records_data import duration_record, ids, publish_records, record


@pytest.fixture
def system(session_pki: Pki, tmp_path: Path) -> Iterator[RunningSystem]:
    running = feed_system(session_pki, tmp_path / "system")
    yield running
    running.stop()


def _client(system: RunningSystem, target: str = "") -> list[str]:
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    return [
        "operator",
        *("--target", target or system.address),
        *("--ca", str(system.pki.paths.ca_cert)),
        *("--cert", str(cert)),
        *("--key", str(key)),
    ]


def _stored(system: RunningSystem) -> int:
    def count(session: sa.orm.Session) -> int:
        return int(session.scalar(sa.select(sa.func.count()).select_from(tables.DURATIONS)) or 0)

    return system.call(system.runtime.db.run(count))


def test_submit_a_csv_resume_it_and_resend_it(
    system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [duration_record() for _ in range(2_500)]
    path = tmp_path / "durations.csv"
    write_records(path, records)
    assert [line.record for line in read_lines(path)] == records  # the file round-trips
    # An earlier run was cut after 1,000 lines (as its journal says): only the rest is sent.
    journal_path(path).write_text("1000\n")
    assert main([*_client(system), "submit", str(path)]) == 0
    assert "resuming after line 1001" in capsys.readouterr().err  # a message: stderr
    assert _stored(system) == 1_500
    assert journal_path(path).read_text().split()[0] == "2500"  # lines, then their end offset
    # Without the journal, everything is sent again: each record still counted once.
    journal_path(path).unlink()
    assert main([*_client(system), "submit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1,000 accepted, 1,500 already there, 0 refused" in out
    assert _stored(system) == 2_500


def test_a_target_naming_several_gateways(system: RunningSystem, tmp_path: Path) -> None:
    """A list of addresses (here the one gateway twice): calls spread over them, each
    gateway's certificate checked for the first address."""
    path = tmp_path / "durations.csv"
    write_records(path, [duration_record() for _ in range(3)])
    port = system.runtime.port
    several = f"ipv4:127.0.0.1:{port},127.0.0.1:{port}"
    assert main([*_client(system, several), "submit", str(path)]) == 0
    assert _stored(system) == 3


def test_bad_lines_are_reported_with_their_numbers(
    system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = duration_record()
    late = duration_record()
    late.duration.FromSeconds(late.duration.seconds + 5)  # longer than the call: refused
    path = tmp_path / "durations.csv"
    write_records(path, [good, late])
    with path.open("a") as handle:
        handle.write("r-x,c-x,tenant,+1,+2,sideways,2026-11-23T10:00:00Z,2026-11-23T10:01:00Z,60\n")
    assert main([*_client(system), "submit", str(path)]) == 1
    out = capsys.readouterr().out
    assert "1 accepted" in out and "1 refused" in out and "1 unreadable" in out
    assert "line 3: DURATION_INVALID" in out
    assert "line 4: direction must be inbound or outbound" in out


def test_usage_and_reconciliation_reports(
    system: RunningSystem, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # room for whole call ids in the tables
    calls = [record(talk_s=120.0), record(talk_s=60.0), record(answered=False)]
    publish_records(system.ingest(), calls)
    eventually(lambda: len(kept(system)) == 3)
    answer = calls[0].answer_time.ToDatetime(dt.UTC)
    report = duration_record(call_id=calls[0].call_id, start=answer, talk_s=120.0)
    report.duration.FromSeconds(110)  # 10 s short: a mismatch
    busy = duration_record(call_id=calls[2].call_id, talk_s=30.0)  # the platform: not answered
    submit(usage_stub(system), [report, busy])
    assert main([*_client(system), "usage"]) == 0
    out = capsys.readouterr().out
    assert "inbound" in out and "2.8" in out  # 110 s (the operator's) + 60 s = 2.8 minutes
    assert main([*_client(system), "reconcile", "--show", "5"]) == 0
    out = capsys.readouterr().out
    assert "durations differ" in out and "missing from your records" in out
    assert "not answered on the platform" in out and "unanswered" in out
    assert all(call.call_id in out for call in calls)
    # The same, for machines: one JSON document on stdout each.
    assert main([*_client(system), "usage", "--start", "-1d", "--output", "json"]) == 0
    (usage,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(int(row["call_count"]) for row in usage["rows"]) == 2
    assert main([*_client(system), "reconcile", "--start", "yesterday", "--output", "json"]) == 0
    (found,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert int(found["mismatch_count"]) == 1 and int(found["platform_only_count"]) == 1
    assert int(found["unanswered_on_platform_count"]) == 1
    assert sorted(x["call_id"] for x in found["discrepancies"]) == sorted(ids(calls))


def test_submit_reads_as_it_sends_with_progress_from_the_file_size(tmp_path: Path) -> None:
    """No first pass over the file (it once read 150,000 lines to count them before sending):
    the first line comes after reading little more than that line, and the bytes read so far
    out of the file's size are the progress."""
    path = tmp_path / "durations.csv"
    write_records(path, [duration_record() for _ in range(5_000)])
    source = DurationsFile(path)
    lines = source.lines()
    first = next(lines)
    assert first.number == 2 and first.record is not None
    assert first.end == source.offset < source.size // 100
    rest = list(lines)
    assert rest[-1].end == source.offset == source.size
    # Resuming at a byte offset (the journal's) seeks there: the same lines, the same numbers.
    again = list(DurationsFile(path, 4_000, rest[3_998].end).lines())
    assert [x.number for x in again] == [x.number for x in rest[3_999:]]
    assert [x.record for x in again] == [x.record for x in rest[3_999:]]


def test_a_second_submit_of_the_same_file_is_refused(
    system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "durations.csv"
    write_records(path, [duration_record() for _ in range(3)])
    descriptor = os.open(lock_path(path), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a submit running in another process does
        capsys.readouterr()
        assert main([*_client(system), "submit", str(path)]) == 1
        error = capsys.readouterr().err.splitlines()[-1]
        assert (
            error
            == f"opconnect: a submit of {path} is already running (it holds {lock_path(path)})"
        )
        assert _stored(system) == 0
    finally:
        os.close(descriptor)
    assert main([*_client(system), "submit", str(path)]) == 0
    assert _stored(system) == 3


def _submit_process(system: RunningSystem, path: Path, target: str = "") -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OPCONNECT_DATA_DIR": str(path.parent / "cli"),
        "OPCONNECT_LOG_FORMAT": "json",
        "OPCONNECT_LOG_LEVEL": "error",
    }
    return subprocess.Popen(
        [*INTERRUPTIBLE_CLI, *_client(system, target), "submit", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _locked(path: Path) -> bool:
    """A submit holds the file's lock (it is running, past its start-up)."""
    if not lock_path(path).exists():
        return False
    descriptor = os.open(lock_path(path), os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # closing releases a lock this test took
    return False


def _interrupt(process: subprocess.Popen[str]) -> str:
    """Ctrl-C; what the process said on stderr (it must stop cleanly, status 130)."""
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "run again to resume" in err
    return err


def test_ctrl_c_is_clean_in_every_phase_and_leaves_the_journal_consistent(
    system: RunningSystem, tmp_path: Path
) -> None:
    records = [duration_record() for _ in range(40_000)]
    path = tmp_path / "durations.csv"
    write_records(path, records)
    # While the platform cannot be reached (the library waits and tries again).
    process = _submit_process(system, path, f"127.0.0.1:{free_port()}")
    eventually(lambda: _locked(path), 30)
    time.sleep(1)  # into the retries
    assert "interrupted after 0 lines" in _interrupt(process)
    assert _stored(system) == 0
    # As soon as it starts.
    process = _submit_process(system, path)
    eventually(lambda: _locked(path), 30)
    _interrupt(process)
    # While sending: the journal says only lines whose records the platform stored.
    process = _submit_process(system, path)
    eventually(lambda: journal_path(path).exists() and lines_done(path) > 0, 60)
    _interrupt(process)
    done = lines_done(path)
    assert done < len(records)
    stored_ids = set(stored(system))
    assert {r.record_id for r in records[:done]} <= stored_ids
    # Run again: it resumes after the journal's lines and ends with every record stored once.
    assert main([*_client(system), "submit", str(path)]) == 0
    assert _stored(system) == len(records)
    assert lines_done(path) == len(records)
