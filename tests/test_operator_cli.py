"""`opconnect operator numbers|records ...` and what every operator command shares: results as
tables or JSON, one-line errors, times with words and offsets, help for every command and
option, no wrapping when the output is not a terminal. Run against real servers over TLS; the
commands that run for ever (`numbers watch`, `records follow`) also as processes that are
interrupted and killed."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import signal
import time
from pathlib import Path

import pytest

from app.cli import main, parser
from operator_client import times
from operator_client.numbers import MAX_ROWS
from operator_client.output import Output
from operator_client.records import CSV_COLUMNS
from tests.conftest import OPERATOR, OTHER_TENANT, TENANT, RunningSystem
from tests.helpers import (
    assign,
    cli_process,
    connect,
    eventually,
    read_line,
    run_json,
    said,
    upload,
    write_csv,
)
from tests.records_data import ids, publish_records, record, stamp, stream_all

pytestmark = pytest.mark.usefixtures("cli_environment")


# --- numbers -----------------------------------------------------------------------------------


def test_upload_list_get_and_release_numbers(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    path = tmp_path / "numbers.csv"
    address = system.addresses[OPERATOR, TENANT]  # a USER number needs a civic address
    write_csv(
        path,
        [
            ["+14255550100", "user", "yes", "yes", address],
            ["+14255550101", "voice_app", "yes", "no", ""],
            ["+14255550102", "sideways", "yes", "yes", ""],  # unreadable: never sent
            ["+0123", "user", "yes", "yes", address],  # refused by the platform (not E.164)
            ["+14255550103", "conference", "1", "", ""],
        ],
        header="phone_number,usage,inbound,outbound,civic_address_id",
    )
    (answer,) = run_json(
        system, capsys, "numbers", "upload", str(path), "--tenant", TENANT, status=1
    )
    assert (
        answer["added"],
        answer["already_present"],
        answer["refused"],
        answer["unreadable"],
    ) == (
        3,
        0,
        1,
        1,
    )
    results = answer["results"]
    assert isinstance(results, list)
    assert [(r["line"], r["outcome"]) for r in results] == [
        (2, "added"),
        (3, "added"),
        (4, "unreadable"),
        (5, "refused"),
        (6, "added"),
    ]
    assert "usage must be one of user, voice_app, conference" in results[2]["message"]
    assert results[3]["reason"]  # the platform's reason
    # The same file again, as a table: per-row problems with their line numbers.
    capsys.readouterr()
    assert main([*connect(system), "numbers", "upload", str(path), "--tenant", TENANT]) == 1
    out = capsys.readouterr().out
    assert "0 added, 3 already there, 1 refused, 1 unreadable rows" in out
    assert "+14255550102" in out and "sideways" in out

    listed = run_json(system, capsys, "numbers", "list")
    assert sorted(str(n["phone_number"]) for n in listed) == [
        "+14255550100",
        "+14255550101",
        "+14255550103",
    ]
    assign(system, "+14255550100")
    assigned = run_json(system, capsys, "numbers", "list", "--state", "assigned")
    assert [n["phone_number"] for n in assigned] == ["+14255550100"]
    assert run_json(system, capsys, "numbers", "list", "--tenant", OTHER_TENANT) == []
    capsys.readouterr()
    assert main([*connect(system), "numbers", "list"]) == 0
    assert "3 numbers" in capsys.readouterr().out

    (number,) = run_json(system, capsys, "numbers", "get", "+14255550101")
    assert number["usage"] == "NUMBER_USAGE_VOICE_APP" and number["tenant_id"] == TENANT
    capsys.readouterr()
    assert main([*connect(system), "numbers", "get", "+14255550100"]) == 0
    assert "assigned to" in capsys.readouterr().out
    assert main([*connect(system), "numbers", "get", "+14255550199"]) == 1
    error = said(capsys.readouterr().err)
    assert error.startswith("opconnect: NOT_FOUND") and len(error.splitlines()) == 1

    listing = tmp_path / "release.txt"
    listing.write_text("phone_number\n# a comment\n+14255550103\n\n")
    (released,) = run_json(
        system,
        capsys,
        *("numbers", "release", "+14255550101", "+14255550100", "--file", str(listing)),
        status=1,  # +14255550100 is assigned: refused
    )
    outcomes = {r["phone_number"]: r["outcome"] for r in released["results"]}
    assert outcomes == {
        "+14255550101": "released",
        "+14255550100": "refused",
        "+14255550103": "released",
    }
    assert [n["phone_number"] for n in run_json(system, capsys, "numbers", "list")] == [
        "+14255550100"
    ]


def test_upload_refuses_files_it_cannot_use_and_sends_nothing(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    base = [*connect(system), "numbers", "upload"]
    too_many = tmp_path / "many.csv"
    write_csv(too_many, [[f"+1425{n:07d}", "user", "yes", "yes"] for n in range(MAX_ROWS + 1)])
    missing = tmp_path / "missing.csv"
    write_csv(missing, [["+14255550100", "user"]], header="phone_number,usage")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"phone_number,usage,inbound,outbound\n\xff\xfe\x00\n")
    for path, message in [
        (too_many, "more than 10,000 numbers"),
        (missing, "missing columns: inbound, outbound"),
        (binary, "not UTF-8 text"),
        (tmp_path / "absent.csv", "cannot read"),
    ]:
        capsys.readouterr()
        assert main([*base, str(path), "--tenant", TENANT]) == 1
        error = said(capsys.readouterr().err)
        assert error.startswith("opconnect: ") and message in error, error
        assert len(error.splitlines()) == 1
    assert run_json(system, capsys, "numbers", "list") == []  # nothing was sent
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # --tenant is required: a usage error
        main([*base, str(too_many)])
    assert exited.value.code == 2


def test_watch_prints_a_listing_then_events_and_resumes_from_its_checkpoint(
    sqlite_system: RunningSystem, tmp_path: Path
) -> None:
    system = sqlite_system
    upload(system, "+14255550100", "+14255550101")
    checkpoint = tmp_path / "watch.cursor"
    watch = ["numbers", "watch", "--checkpoint", str(checkpoint)]
    process = cli_process(system, tmp_path, *watch)
    try:
        listed = [read_line(process.stdout), read_line(process.stdout)]
        assert all(line["listing"] is True for line in listed)
        assert sorted(str(line["phone_number"]) for line in listed) == [
            "+14255550100",
            "+14255550101",
        ]
        assign(system, "+14255550100")
        event = read_line(process.stdout)
        assert (event["type"], event["phone_number"]) == (
            "ASSIGNMENT_EVENT_TYPE_ASSIGNED",
            "+14255550100",
        )
        assert "listing" not in event
        eventually(lambda: bool(checkpoint.exists() and checkpoint.read_text().strip()))
        process.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130 and "Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assign(system, "+14255550101")  # while nobody watches
    process = cli_process(system, tmp_path, *watch)
    try:
        event = read_line(process.stdout)  # resumed: no listing, the change missed
        assert (event["type"], event["phone_number"]) == (
            "ASSIGNMENT_EVENT_TYPE_ASSIGNED",
            "+14255550101",
        )
    finally:
        process.kill()
        process.wait()


# --- records -----------------------------------------------------------------------------------


def test_records_get_summary_and_follow_to_csv(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    calls = [record(), record(tenant=OTHER_TENANT), record(answered=False)]
    publish_records(system.ingest(), calls)
    (got,) = run_json(system, capsys, "records", "get", calls[0].call_id)
    assert got["call_id"] == calls[0].call_id and got["caller"] == calls[0].caller
    capsys.readouterr()
    assert main([*connect(system), "records", "get", calls[1].call_id]) == 0
    assert OTHER_TENANT in capsys.readouterr().out
    assert main([*connect(system), "records", "get", "no-such-call"]) == 1
    assert said(capsys.readouterr().err).startswith("opconnect: NOT_FOUND")

    (summary,) = run_json(
        system, capsys, "records", "summary", "--start", "-1d", "--group-by", "tenant"
    )
    groups = summary["groups"]
    assert isinstance(groups, list)
    assert {g["key"]: int(g["call_count"]) for g in groups} == {TENANT: 2, OTHER_TENANT: 1}
    capsys.readouterr()
    assert main([*connect(system), "records", "summary", "--start", "today", "--end", "now"]) == 0
    assert "Call quality" in capsys.readouterr().out

    out = tmp_path / "records.csv"
    checkpoint = tmp_path / "records.cursor"
    follow = ["records", "follow", "--out", str(out), "--checkpoint", str(checkpoint)]
    (done,) = run_json(system, capsys, *follow, "--start", "-1h", "--no-follow")
    assert done["records"] == 3
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(CSV_COLUMNS)
    assert [row[0] for row in rows[1:]] == ids(calls)
    assert rows[3][CSV_COLUMNS.index("answer_time")] == ""  # unanswered
    assert rows[1][CSV_COLUMNS.index("direction")] == "inbound"
    # Again: nothing new, nothing repeated; then a new record is appended after the others.
    (done,) = run_json(system, capsys, *follow, "--no-follow")
    assert done["records"] == 0
    later = record()
    publish_records(system.ingest(), [later])
    (done,) = run_json(system, capsys, *follow, "--no-follow")
    assert done["records"] == 1
    with out.open(newline="") as handle:
        assert [row[0] for row in csv.reader(handle)][1:] == [*ids(calls), later.call_id]
    # A checkpoint of another file, and an output that is neither JSON lines nor CSV.
    other = tmp_path / "other.jsonl"
    for args, message in [
        (["--out", str(other), "--checkpoint", str(checkpoint)], "is the checkpoint of"),
        (
            ["--out", str(tmp_path / "x.txt"), "--checkpoint", str(tmp_path / "c")],
            ".jsonl or a .csv",
        ),
        (
            [
                "--out",
                str(tmp_path / "t.csv"),
                "--checkpoint",
                str(tmp_path / "t"),
                "--tenant",
                "x",
            ],
            "opconnect: INVALID_ARGUMENT",  # the server's answer, in one line
        ),
    ]:
        capsys.readouterr()
        assert main([*connect(system), "records", "follow", *args, "--no-follow"]) == 1
        assert message in said(capsys.readouterr().err)


def test_follow_drops_a_batch_written_but_not_checkpointed(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash between writing a batch and saving the checkpoint leaves the batch in the file
    and not in the checkpoint: the next run cuts the file back and fetches it again."""
    system = sqlite_system
    calls = [record() for _ in range(4)]
    publish_records(system.ingest(), calls[:2])
    out = tmp_path / "records.jsonl"
    checkpoint = tmp_path / "records.cursor"
    follow = ["records", "follow", "--out", str(out), "--checkpoint", str(checkpoint)]
    run_json(system, capsys, *follow, "--start", "-1h", "--no-follow")
    publish_records(system.ingest(), calls[2:])
    with out.open("a") as handle:  # what the crashed run wrote after its checkpoint
        handle.write('{"call_id":"' + calls[2].call_id + '"}\n{"call_id": "half a li')
    capsys.readouterr()
    assert main([*connect(system), *follow, "--no-follow"]) == 0
    assert "dropping" in said(capsys.readouterr().err)
    lines = out.read_text().splitlines()
    assert [json.loads(line)["call_id"] for line in lines] == ids(calls)
    out.write_text("")  # shorter than its checkpoint says: refused, nothing lost silently
    assert main([*connect(system), *follow, "--no-follow"]) == 1
    assert "something else changed the file" in said(capsys.readouterr().err)


def test_follow_to_a_file_is_exactly_once_across_kills(
    sqlite_system: RunningSystem, tmp_path: Path
) -> None:
    """`records follow` SIGKILLed again and again while records are published: after the last
    run the file holds every record once, in the stream's order."""
    system = sqlite_system
    out = tmp_path / "records.jsonl"
    checkpoint = tmp_path / "records.cursor"
    follow = ["records", "follow", "--out", str(out), "--checkpoint", str(checkpoint)]
    ingest = system.ingest()
    published: list[str] = []

    def lines() -> int:
        return len(out.read_bytes().splitlines()) if out.exists() else 0

    for kill in range(5):
        process = cli_process(system, tmp_path, *follow, "--start", "-1h")
        try:
            for _ in range(4):  # publish while it follows
                batch = [record() for _ in range(25)]
                publish_records(ingest, batch)
                published += ids(batch)
                time.sleep(0.05 * kill)  # kills land at different moments
            seen, total = lines(), len(published)

            def more(seen: int = seen, total: int = total) -> bool:
                return lines() > seen or lines() >= total

            eventually(more, 30)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        batch = [record() for _ in range(10)]  # published while it is down
        publish_records(ingest, batch)
        published += ids(batch)
    # Ctrl-C: a clean stop, which saves the cursor of the last batch written.
    process = cli_process(system, tmp_path, *follow)
    eventually(lambda: lines() >= len(published), 30)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err and "records appended" in err
    assert json.loads(checkpoint.read_text())["length"] == out.stat().st_size
    process = cli_process(system, tmp_path, *follow, "--no-follow")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    found = [json.loads(line)["call_id"] for line in out.read_text().splitlines()]
    an_hour_ago = stamp(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    in_stream_order, _, _ = stream_all(system.records(), start_time=an_hour_ago)
    assert ids(in_stream_order) == found  # each once, in order
    assert sorted(found) == sorted(published)


# --- what every command shares -------------------------------------------------------------------


def operator_commands() -> list[list[str]]:
    """Every command path under `opconnect operator`, itself included."""
    found: list[list[str]] = []

    def walk(node: argparse.ArgumentParser, path: list[str]) -> None:
        found.append(path)
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])

    top = parser()
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    walk(commands.choices["operator"], ["operator"])
    return found


def test_every_command_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    paths = operator_commands()
    assert ["operator", "records", "follow"] in paths and len(paths) >= 14
    top = parser()
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    for path in paths:
        node = commands.choices["operator"]
        for name in path[1:]:
            (sub,) = [a for a in node._actions if isinstance(a, argparse._SubParsersAction)]
            node = sub.choices[name]
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in action._choices_actions), path
            else:
                assert action.help, f"{' '.join(path)} {action.dest} has no help"
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: opconnect {' '.join(path)}")


def test_times_accept_words_and_offsets_and_a_bad_one_names_its_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = dt.datetime(2026, 11, 29, 15, 30, tzinfo=dt.UTC)
    midnight = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
    assert times.parse_time("now", now) == now
    assert times.parse_time("today", now) == midnight
    assert times.parse_time("yesterday", now) == midnight - dt.timedelta(days=1)
    assert times.parse_time("-2h", now) == now - dt.timedelta(hours=2)
    assert times.parse_time("-7d", now) == now - dt.timedelta(days=7)
    assert times.parse_time("2026-11-23", now) == dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    assert times.parse_time("2026-11-23T10:00+01:00", now) == dt.datetime(
        2026, 11, 23, 9, tzinfo=dt.UTC
    )
    assert times.parse_time("2026-11-23T10:00:00Z", now).hour == 10
    for command in (["usage"], ["reconcile"], ["records", "summary"]):
        with pytest.raises(SystemExit) as exited:
            main(["operator", *command, "--start", "-2h", "--end", "the day after"])
        assert exited.value.code == 2
        error = said(capsys.readouterr().err)
        assert "argument --end: 'the day after' is not a time" in error
        assert "yesterday" in error and "-7d" in error


def test_client_side_problems_are_one_line(
    sqlite_system: RunningSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = sqlite_system
    cert, _ = system.pki.paths.client(f"operator-{OPERATOR}")
    _, other_key = system.pki.paths.client("operator-fabrikam")
    wrong_key = [*connect(system)[:-1], str(other_key)]
    assert main([*wrong_key, "numbers", "list"]) == 1
    error = said(capsys.readouterr().err)
    assert error == f"opconnect: the key {other_key} does not belong to the certificate {cert}\n"
    assert main([*connect(system), "submit", str(tmp_path / "absent.csv")]) == 1
    error = said(capsys.readouterr().err)
    assert error.startswith("opconnect: cannot read") and len(error.splitlines()) == 1


def test_output_is_not_wrapped_when_not_a_terminal() -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    out = Output("table", stdout, stderr)
    message = "opconnect: " + " ".join(f"word{n}" for n in range(60))  # far beyond 80 columns
    out.note(message)
    out.line("[bold]not markup[/bold]")
    out.table("wide", ["call id", "reason"], [["c" * 120, "a [reason] " * 10]])
    assert stderr.getvalue() == message + "\n"
    lines = stdout.getvalue().splitlines()
    assert lines[0] == "[bold]not markup[/bold]"
    assert any("c" * 120 in line and "a [reason] " * 9 in line for line in lines)
