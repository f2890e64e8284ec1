"""What `opconnect operator ...` does, as an operator's client of the platform.

`submit` sends a CSV file of call durations on one SubmitCallDurations stream, in batches of
1,000 with a few in flight, showing progress. After every acknowledged batch it records, in
`<file>.progress`, how many lines of the file are done; run again after an interruption and it
resumes there. Resending is always safe (records are idempotent by record_id): the journal only
saves time. `usage` and `reconcile` print the operator's usage and reconciliation as tables.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from operator_client.durations_csv import Line, read_lines
from plumbing.balancing import balanced
from plumbing.wellknown import timestamp

BATCH = 1_000
IN_FLIGHT = 4
SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class Connection:
    """The platform's address and this operator's mutual-TLS files."""

    target: str
    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


# --- submit ----------------------------------------------------------------------------------


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress")


def lines_done(path: Path) -> int:
    """How many data lines of the file earlier runs had acknowledged (0 if none)."""
    try:
        return max(int(journal_path(path).read_text().strip() or 0), 0)
    except (OSError, ValueError):
        return 0


def _record_done(path: Path, lines: int) -> None:
    journal = journal_path(path)
    temporary = journal.with_name(journal.name + ".tmp")
    temporary.write_text(f"{lines}\n")
    os.replace(temporary, journal)  # atomic: a crash leaves the old count or the new


@dataclass
class Batch:
    """Consecutive data lines: the records to send and the lines they came from."""

    id: str
    lines: list[Line]
    records: list[pb.CallDurationRecord] = field(default_factory=list)


@dataclass
class Tally:
    accepted: int = 0
    duplicate: int = 0
    refused: int = 0
    unreadable: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(text)


def _batches(lines: Iterator[Line]) -> Iterator[Batch]:
    """Lines grouped so that each batch holds up to BATCH records (unreadable lines ride along
    with the next records, so that an acknowledgement always covers a prefix of the file)."""
    current: list[Line] = []
    for number in itertools.count():
        line = next(lines, None)
        if line is not None:
            current.append(line)
        sendable = [x for x in current if x.record is not None]
        if line is None or len(sendable) == BATCH:
            if current:
                batch = Batch(f"b{number}", current)
                batch.records = [x.record for x in sendable if x.record is not None]
                yield batch
            current = []
        if line is None:
            return


async def submit(connection: Connection, path: Path, console: Console) -> int:
    """Submit the file's records, resuming after the lines an earlier run finished."""
    total = sum(1 for _ in read_lines(path))
    skip = min(lines_done(path), total)
    if skip:
        console.print(f"resuming after line {skip + 1} ({skip:,} lines done by an earlier run)")
    lines = itertools.islice(read_lines(path), skip, None)
    tally = Tally()
    pending: deque[Batch] = deque()
    room = asyncio.Semaphore(IN_FLIGHT)
    done = skip

    async def requests() -> AsyncIterator[pb.SubmitCallDurationsRequest]:
        for batch in _batches(lines):
            await room.acquire()
            pending.append(batch)
            if batch.records:
                yield pb.SubmitCallDurationsRequest(batch_id=batch.id, records=batch.records)
            else:  # nothing readable: done as soon as what was sent before it is
                room.release()

    progress = Progress(
        TextColumn("[bold]submitting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lines"),
        TimeRemainingColumn(),
        console=console,
        transient=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("submit", total=total, completed=skip)
        async with grpc.aio.secure_channel(
            connection.target, connection.credentials(), options=balanced(connection.target)
        ) as channel:
            stub = pb_grpc.UsageServiceStub(channel)
            async for response in stub.SubmitCallDurations(requests()):
                while pending and not pending[0].records:  # empty batches before this one
                    done = _finish(pending.popleft(), None, tally, done, path)
                batch = pending.popleft()
                done = _finish(batch, response, tally, done, path)
                room.release()
                progress.update(task, completed=done)
            while pending:
                done = _finish(pending.popleft(), None, tally, done, path)
            progress.update(task, completed=done)
    console.print(
        f"{path.name}: {tally.accepted:,} accepted, {tally.duplicate:,} already there, "
        f"{tally.refused:,} refused, {tally.unreadable:,} unreadable lines"
    )
    for text in tally.problems:
        console.print(f"  {text}")
    return 0 if tally.refused == tally.unreadable == 0 else 1


def _finish(
    batch: Batch,
    response: pb.SubmitCallDurationsResponse | None,
    tally: Tally,
    done: int,
    path: Path,
) -> int:
    """Count an acknowledged batch and record the file's new done prefix."""
    for line in batch.lines:
        if line.record is None:
            tally.unreadable += 1
            tally.problem(f"line {line.number}: {line.problem}")
    if response is not None:
        sent = [x for x in batch.lines if x.record is not None]
        for line, result in zip(sent, response.results, strict=True):
            if result.outcome == pb.CALL_DURATION_OUTCOME_ACCEPTED:
                tally.accepted += 1
            elif result.outcome == pb.CALL_DURATION_OUTCOME_DUPLICATE:
                tally.duplicate += 1
            else:
                tally.refused += 1
                tally.problem(
                    f"line {line.number}: {result.reason} ({result.field}): {result.message}"
                )
    done += len(batch.lines)
    _record_done(path, done)
    return done


# --- usage and reconciliation ------------------------------------------------------------------


def _minutes(seconds: int) -> str:
    return f"{seconds / 60:,.1f}"


def usage(
    connection: Connection,
    *,
    start: dt.datetime,
    end: dt.datetime,
    monthly: bool,
    tenant: str,
    console: Console,
) -> int:
    with grpc.secure_channel(
        connection.target, connection.credentials(), options=balanced(connection.target)
    ) as channel:
        stub = pb_grpc.UsageServiceStub(channel)
        request = pb.GetUsageSummaryRequest(
            start_time=timestamp(start),
            end_time=timestamp(end),
            granularity=pb.GRANULARITY_MONTH if monthly else pb.GRANULARITY_DAY,
            tenant_id=tenant,
            page_size=1_000,
        )
        rows: list[pb.UsageRow] = []
        while True:
            response = stub.GetUsageSummary(request)
            rows += response.rows
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
    table = Table(title=f"Usage {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    for name in ("tenant", "period", "direction", "calls", "minutes", "of them yours"):
        table.add_column(name, justify="right" if name in ("calls", "minutes") else "left")
    for row in rows:
        yours = sum(s.call_count for s in row.by_source if s.source == pb.DURATION_SOURCE_OPERATOR)
        table.add_row(
            row.tenant_id,
            row.period_start_time.ToDatetime(dt.UTC).strftime("%Y-%m" if monthly else "%Y-%m-%d"),
            "inbound" if row.direction == 1 else "outbound",
            f"{row.call_count:,}",
            _minutes(row.billed_duration.seconds),
            f"{yours:,} of {row.call_count:,}",
        )
    console.print(table)
    return 0


def reconcile(
    connection: Connection,
    *,
    start: dt.datetime,
    end: dt.datetime,
    tenant: str,
    show: int,
    console: Console,
) -> int:
    with grpc.secure_channel(
        connection.target, connection.credentials(), options=balanced(connection.target)
    ) as channel:
        stub = pb_grpc.UsageServiceStub(channel)
        period: dict[str, Any] = {
            "start_time": timestamp(start),
            "end_time": timestamp(end),
            "tenant_id": tenant,
        }
        found = stub.GetReconciliation(pb.GetReconciliationRequest(**period))
        listed: list[pb.Discrepancy] = []
        if show:
            request = pb.StreamDiscrepanciesRequest(**period, max_batch_size=min(show, 1_000))
            for response in stub.StreamDiscrepancies(request):
                listed += response.discrepancies
                if len(listed) >= show:
                    break
    tolerance = found.tolerance
    table = Table(
        title=f"Reconciliation {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC "
        f"(tolerance {tolerance.absolute.ToMilliseconds() / 1000:g} s or "
        f"{tolerance.relative:.1%})"
    )
    table.add_column("")
    table.add_column("calls", justify="right")
    for name, value in (
        ("matched", found.matched_count),
        ("durations differ", found.mismatch_count),
        ("missing from your records", found.platform_only_count),
        ("unknown to the platform", found.operator_only_count),
        ("not answered on the platform", found.unanswered_on_platform_count),
    ):
        table.add_row(name, f"{value:,}")
    table.add_row("minutes, platform", _minutes(found.platform_total_duration.seconds))
    table.add_row("minutes, yours", _minutes(found.operator_total_duration.seconds))
    console.print(table)
    if listed:
        kinds = {1: "differs", 2: "missing", 3: "unknown", 4: "unanswered"}
        rows = Table(title=f"First {len(listed[:show])} discrepancies")
        for name in ("kind", "call id", "your record", "start", "platform s", "yours s"):
            rows.add_column(name)
        for x in listed[:show]:
            rows.add_row(
                kinds.get(x.kind, "?"),
                x.call_id,
                x.record_id,
                x.start_time.ToDatetime(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
                f"{x.platform_duration.ToNanoseconds() / 1e9:g}"
                if x.HasField("platform_duration")
                else "",
                f"{x.operator_duration.ToNanoseconds() / 1e9:g}"
                if x.HasField("operator_duration")
                else "",
            )
        console.print(rows)
    return 0
