"""`opconnect operator submit|usage|reconcile`: the operator's call durations, usage and
reconciliation.

`submit` starts sending at once: it reads the CSV file line by line as the library sends it
(`Client.submit_durations`: batches of 1,000 pipelined, the unacknowledged ones sent again
after a broken stream, the server's real status), with progress from the bytes of the file
acknowledged so far. After every acknowledged batch it records, in `<file>.progress`, how many
data lines are done and the byte offset after them (replaced atomically); run again after an
interruption and it seeks there. Resending is always safe (records are idempotent by
record_id): the journal only saves time. `<file>.progress.lock` is held while a submit runs, so
a second submit of the same file at once is refused with a message.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect_client import Client, timestamp
from operator_client.durations_csv import DurationsFile
from operator_client.locks import held
from operator_client.output import Output, as_dict, seconds, when

SHOWN_PROBLEMS = 10

# --- submit ----------------------------------------------------------------------------------


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress.lock")


def journal(path: Path) -> tuple[int, int]:
    """How many data lines of the file earlier runs had acknowledged, and the byte offset after
    them ((0, 0) if none; an offset of 0 with lines: a journal of an older version, which
    resumes by reading past the lines)."""
    try:
        fields = journal_path(path).read_text().split()
        lines = max(int(fields[0]), 0) if fields else 0
        offset = max(int(fields[1]), 0) if len(fields) > 1 else 0
    except (OSError, ValueError):
        return 0, 0
    return lines, offset


def lines_done(path: Path) -> int:
    return journal(path)[0]


def _record_done(path: Path, lines: int, offset: int) -> None:
    target = journal_path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(f"{lines} {offset}\n")
    os.replace(temporary, target)  # atomic: a crash leaves the old journal or the new


@dataclass
class Tally:
    accepted: int = 0
    duplicate: int = 0
    refused: int = 0
    unreadable: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)


async def submit(client: Client, path: Path, out: Output) -> int:
    """Submit the file's records, resuming after the lines an earlier run finished; 1 when a
    line was unreadable or a record refused."""
    with held(lock_path(path), f"a submit of {path}"):
        return await _submit(client, path, out)


async def _submit(client: Client, path: Path, out: Output) -> int:
    skip_lines, skip_bytes = journal(path)
    source = DurationsFile(path, skip_lines, skip_bytes)
    if skip_bytes > source.size:
        skip_lines = skip_bytes = 0  # the file was replaced by a shorter one: from the start
        source = DurationsFile(path)
    if skip_lines:
        out.note(
            f"resuming after line {skip_lines + 1} ({skip_lines:,} lines done by an earlier run)"
        )
    tally = Tally()
    sent: deque[tuple[int, int]] = deque()  # (line, offset after it) of each record sent
    done_lines, done_bytes = skip_lines, skip_bytes
    read = {"lines": skip_lines}  # data lines read so far

    def records() -> Iterator[pb.CallDurationRecord]:
        for line in source.lines():
            read["lines"] = line.number - 1
            if line.record is None:
                tally.unreadable += 1
                tally.problems.append({"line": line.number, "problem": line.problem})
            else:
                sent.append((line.number, line.end))
                yield line.record

    progress = Progress(
        TextColumn("submitting"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=out.err,
        disable=not out.err.is_terminal,
    )
    with progress:
        task = progress.add_task("submit", total=source.size, completed=skip_bytes)
        async for acknowledged in client.submit_durations(records()):
            for result in acknowledged.results:
                number, end = sent.popleft()
                if result.outcome == pb.CALL_DURATION_OUTCOME_ACCEPTED:
                    tally.accepted += 1
                elif result.outcome == pb.CALL_DURATION_OUTCOME_DUPLICATE:
                    tally.duplicate += 1
                else:
                    tally.refused += 1
                    tally.problems.append(
                        {
                            "line": number,
                            "problem": f"{result.reason} ({result.field}): {result.message}",
                            "reason": result.reason,
                            "field": result.field,
                        }
                    )
                done_lines, done_bytes = number - 1, end
            _record_done(path, done_lines, done_bytes)
            progress.update(task, completed=done_bytes)
        done_lines, done_bytes = read["lines"], source.offset  # every line: the end
        _record_done(path, done_lines, done_bytes)
        progress.update(task, completed=source.size)
    tally.problems.sort(key=lambda p: int(p["line"]))
    if out.json:
        out.data(
            {
                "file": str(path),
                "accepted": tally.accepted,
                "duplicate": tally.duplicate,
                "refused": tally.refused,
                "unreadable": tally.unreadable,
                "problems": tally.problems,
            }
        )
    else:
        out.line(
            f"{path.name}: {tally.accepted:,} accepted, {tally.duplicate:,} already there, "
            f"{tally.refused:,} refused, {tally.unreadable:,} unreadable lines"
        )
        for problem in tally.problems[:SHOWN_PROBLEMS]:
            out.line(f"  line {problem['line']}: {problem['problem']}")
        if len(tally.problems) > SHOWN_PROBLEMS:
            out.line(
                f"  ... and {len(tally.problems) - SHOWN_PROBLEMS:,} more (--output json lists all)"
            )
    return 0 if tally.refused == tally.unreadable == 0 else 1


# --- usage and reconciliation ------------------------------------------------------------------


def _minutes(seconds_: int) -> str:
    return f"{seconds_ / 60:,.1f}"


async def usage(
    client: Client,
    *,
    start: dt.datetime,
    end: dt.datetime,
    monthly: bool,
    tenant: str,
    out: Output,
) -> int:
    request = pb.GetUsageSummaryRequest(
        start_time=timestamp(start),
        end_time=timestamp(end),
        granularity=pb.GRANULARITY_MONTH if monthly else pb.GRANULARITY_DAY,
        tenant_id=tenant,
        page_size=1_000,
    )
    rows: list[pb.UsageRow] = []
    while True:
        response = await client.get_usage_summary(request)
        rows += response.rows
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    if out.json:
        out.data(
            {
                "start_time": start.isoformat(),
                "end_time": end.isoformat(),
                "rows": [as_dict(row) for row in rows],
            }
        )
        return 0
    table = []
    for row in rows:
        yours = sum(s.call_count for s in row.by_source if s.source == pb.DURATION_SOURCE_OPERATOR)
        table.append(
            [
                row.tenant_id,
                row.period_start_time.ToDatetime(dt.UTC).strftime(
                    "%Y-%m" if monthly else "%Y-%m-%d"
                ),
                "inbound" if row.direction == 1 else "outbound",
                f"{row.call_count:,}",
                _minutes(row.billed_duration.seconds),
                f"{yours:,} of {row.call_count:,}",
            ]
        )
    out.table(
        f"Usage {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC",
        ["tenant", "period", "direction", "calls", "minutes", "of them yours"],
        table,
        right=("calls", "minutes"),
    )
    return 0


KINDS = {1: "differs", 2: "missing", 3: "unknown", 4: "unanswered"}


async def reconcile(
    client: Client,
    *,
    start: dt.datetime,
    end: dt.datetime,
    tenant: str,
    show: int,
    out: Output,
) -> int:
    period: dict[str, Any] = {
        "start_time": timestamp(start),
        "end_time": timestamp(end),
        "tenant_id": tenant,
    }
    found = await client.get_reconciliation(pb.GetReconciliationRequest(**period))
    listed: list[pb.Discrepancy] = []
    if show:
        request = pb.StreamDiscrepanciesRequest(**period, max_batch_size=min(show, 1_000))
        batches = client.stream_discrepancies(request)
        try:
            async for batch in batches:
                listed += batch.items
                if len(listed) >= show:
                    break
        finally:
            await batches.aclose()
    listed = listed[:show]
    if out.json:
        out.data(
            {
                **as_dict(found),
                "start_time": start.isoformat(),
                "end_time": end.isoformat(),
                "discrepancies": [as_dict(x) for x in listed],
            }
        )
        return 0
    tolerance = found.tolerance
    out.table(
        f"Reconciliation {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC "
        f"(tolerance {tolerance.absolute.ToMilliseconds() / 1000:g} s or "
        f"{tolerance.relative:.1%})",
        ["", "calls"],
        [
            ["matched", f"{found.matched_count:,}"],
            ["durations differ", f"{found.mismatch_count:,}"],
            ["missing from your records", f"{found.platform_only_count:,}"],
            ["unknown to the platform", f"{found.operator_only_count:,}"],
            ["not answered on the platform", f"{found.unanswered_on_platform_count:,}"],
            ["minutes, platform", _minutes(found.platform_total_duration.seconds)],
            ["minutes, yours", _minutes(found.operator_total_duration.seconds)],
        ],
        right=("calls",),
    )
    if listed:
        out.table(
            f"First {len(listed)} discrepancies",
            ["kind", "call id", "your record", "start", "platform s", "yours s"],
            (
                [
                    KINDS.get(x.kind, "?"),
                    x.call_id,
                    x.record_id,
                    when(x.start_time),
                    seconds(x.platform_duration) if x.HasField("platform_duration") else "",
                    seconds(x.operator_duration) if x.HasField("operator_duration") else "",
                ]
                for x in listed
            ),
        )
    return 0
