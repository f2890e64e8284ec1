"""`opconnect operator`: an operator submits durations from CSV (resuming after an
interruption, never counting a record twice), and reads its usage and reconciliation."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli import main
from operator_client.commands import journal_path
from operator_client.durations_csv import read_lines, write_records
from services.usage import tables
from tests.conftest import OPERATOR, Pki, RunningSystem
from tests.helpers import eventually, feed_system, kept, submit, usage_stub
from tests.records_data import duration_record, publish_records, record


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
    assert "resuming after line 1001" in capsys.readouterr().out
    assert _stored(system) == 1_500
    assert journal_path(path).read_text().strip() == "2500"
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
