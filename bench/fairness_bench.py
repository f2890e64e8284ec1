"""Fairness benchmark: one operator's latency alone and while another operator floods the system.

Run from the repository root:

    .venv/bin/python bench/fairness_bench.py [--samples N] [--max-seconds S] [--busy-workers N]
                                             [--json] [--database URL]

The one-process system runs in a child process (this script again, `--role serve`) on a fresh
database (SQLite in a temporary directory, or `--database`: a schema of its own on that PostgreSQL),
with two operators registered: `busy-telecom` and `contoso-telecom` (the quiet one). The quiet
operator makes `--samples` pairs of calls one after the other (fewer if a phase reaches
`--max-seconds`): an UploadNumbers of one new number (a write), then a GetNumber of it (a read),
each timed from just before the call to its answer. First alone (the baseline), then while a second
child process (`--role busy`) runs `--busy-workers` coroutines that each upload 10,000 new numbers
per call back to back as the busy operator, honouring RetryInfo when refused (as the README tells
callers to). Reported: the quiet operator's p50/p99 for writes and reads, alone and under load, and
`write_p99_ratio` / `read_p99_ratio` = p99 under load / p99 alone; the busy operator's calls by
outcome; and how many calls of either were answered UNAVAILABLE (none should be)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import runner
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from report import machine, print_header, summary_ms
from runner import OPERATOR, TENANT, Child, ServerProcess, Spec, credentials

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc

BUSY = "busy-telecom"
QUIET = OPERATOR
BUSY_TENANT = "0b5e2c1d-3a4f-4e6d-8c7b-9a0f1e2d3c4b"
UPLOAD_SIZE = 10_000
STOP_WAIT_S = 60.0
BOTH = pb.Capabilities(inbound=True, outbound=True)
PERCENTILES = (50, 99)  # of the quiet operator's latencies


def outcome(error: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """`CODE/REASON` of a failed call, and its RetryInfo delay if it has one."""
    reason, delay = "", None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return f"{error.code().name}/{reason}", delay


def upload_request(numbers: Sequence[str], tenant: str) -> pb.UploadNumbersRequest:
    return pb.UploadNumbersRequest(
        tenant_id=tenant,
        numbers=[
            # The customer sets their emergency addresses (the bench is about the upload's turn).
            pb.NumberUpload(
                phone_number=n,
                usage=pb.NUMBER_USAGE_USER,
                capabilities=BOTH,
                allow_tenant_address_update=True,
            )
            for n in numbers
        ],
    )


# --------------------------------------------------------------------------- child processes


async def busy(spec: Spec) -> None:
    """Upload 10,000 new numbers per call from `workers` coroutines until told to stop; then
    print the outcomes as JSON."""
    channel = grpc.aio.secure_channel(
        spec["address"],
        credentials(spec["root"], "operator", BUSY),
        options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    stub = pb_grpc.NumberServiceStub(channel)
    outcomes: Counter[str] = Counter()
    stopping = asyncio.Event()
    serial = iter(range(10**6))

    async def worker() -> None:
        while not stopping.is_set():
            base = 2_000_000_000 + next(serial) * UPLOAD_SIZE
            request = upload_request([f"+1{base + i}" for i in range(UPLOAD_SIZE)], BUSY_TENANT)
            try:
                await stub.UploadNumbers(request, timeout=120)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                name, delay = outcome(error)
                outcomes[name] += 1
                if delay is not None:
                    await asyncio.sleep(delay)

    tasks = [asyncio.create_task(worker()) for _ in range(spec["workers"])]
    await asyncio.sleep(spec["warmup"])
    print("LOADED", flush=True)
    await runner.read_line()
    stopping.set()
    await asyncio.gather(*tasks)
    await channel.close()
    print(json.dumps(dict(outcomes)), flush=True)


# --------------------------------------------------------------------------- the quiet operator


async def quiet(
    address: str, root: Path, samples: int, first: int, max_s: float = math.inf
) -> dict[str, Any]:
    """`samples` write-then-read pairs, one call at a time (fewer if `max_s` runs out first);
    latencies and failures."""
    channel = grpc.aio.secure_channel(address, credentials(root, "operator", QUIET))
    stub = pb_grpc.NumberServiceStub(channel)
    writes: list[float] = []
    reads: list[float] = []
    failed: Counter[str] = Counter()
    ends = time.perf_counter() + max_s
    for i in range(samples):
        if time.perf_counter() > ends:
            break
        number = f"+1{first + i}"
        started = time.perf_counter()
        try:
            await stub.UploadNumbers(upload_request([number], TENANT), timeout=120)
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            await stub.GetNumber(pb.GetNumberRequest(phone_number=number), timeout=120)
            reads.append(time.perf_counter() - started)
        except grpc.aio.AioRpcError as error:
            failed[outcome(error)[0]] += 1
    await channel.close()
    return {
        "write_ms": summary_ms(writes, PERCENTILES),
        "read_ms": summary_ms(reads, PERCENTILES),
        "failed": dict(failed),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        runner.workspace(
            "opconnect-bench-", [("operator", BUSY)], database_url=args.database
        ) as ws,
        runner.Children() as children,
    ):
        root = ws.root
        settings = ws.settings()
        spec = ws.spec(operators={BUSY: "busy benchmark operator"}, fair=True)
        server = children.add(ServerProcess("system", spec, STOP_WAIT_S))
        asyncio.run(runner.grant_consent(server.address, root, QUIET, TENANT))
        asyncio.run(runner.grant_consent(server.address, root, BUSY, BUSY_TENANT))
        asyncio.run(quiet(server.address, root, 20, 3_000_000_000))  # warm-up
        alone = asyncio.run(
            quiet(server.address, root, args.samples, 3_100_000_000, args.max_seconds)
        )
        load = children.add(
            Child(
                "busy",
                ws.spec(address=server.address, workers=args.busy_workers, warmup=args.warmup),
                STOP_WAIT_S,
            )
        )
        load.expect("LOADED")
        loaded = asyncio.run(
            quiet(server.address, root, args.samples, 3_200_000_000, args.max_seconds)
        )
        load.send("stop")
        busy_outcomes: dict[str, int] = json.loads(load.line())
    return {
        "backend": ws.backend,
        "machine": machine(),
        "settings": {
            "database": ws.described(),
            "max_calls_per_operator": getattr(settings, "max_calls_per_operator", "-"),
            "max_db_work_per_operator": getattr(settings, "max_db_work_per_operator", "-"),
            "db_threads": settings.db_threads,
        },
        "params": {
            "samples": args.samples,
            "max_seconds": args.max_seconds,
            "busy_workers": args.busy_workers,
            "upload_size": UPLOAD_SIZE,
            "warmup_s": args.warmup,
        },
        "alone": alone,
        "loaded": loaded,
        "busy": busy_outcomes,
        "write_p99_ratio": loaded["write_ms"]["p99"] / alone["write_ms"]["p99"],
        "read_p99_ratio": loaded["read_ms"]["p99"] / alone["read_ms"]["p99"],
    }


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print_header("opconnect fairness benchmark", report)
    print()
    print(f"quiet operator ({QUIET}), one call at a time, ms:")
    print(f"  {'':<32}{'n':>6}{'p50':>10}{'p99':>10}{'max':>10}")
    for phase, label in (("alone", "alone"), ("loaded", "under the busy operator")):
        for kind in ("write", "read"):
            s = report[phase][f"{kind}_ms"]
            print(
                f"  {kind + ', ' + label:<32}{s['n']:>6}{s['p50']:>10.1f}{s['p99']:>10.1f}"
                f"{s['max']:>10.1f}"
            )
    print(f"  write_p99_ratio = {report['write_p99_ratio']:.1f} (p99 under load / p99 alone)")
    print(f"  read_p99_ratio  = {report['read_p99_ratio']:.1f}")
    failed = {**report["alone"]["failed"], **report["loaded"]["failed"]}
    print(f"  quiet calls failed: {failed or 'none'}")
    print(f"busy operator ({BUSY}) UploadNumbers of {UPLOAD_SIZE} by outcome: {report['busy']}")
    unavailable = sum(n for k, n in report["busy"].items() if k.startswith("UNAVAILABLE"))
    unavailable += sum(n for k, n in failed.items() if k.startswith("UNAVAILABLE"))
    print(f"UNAVAILABLE answers (must be 0): {unavailable}")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=200, help="write+read pairs per phase")
    p.add_argument("--max-seconds", type=float, default=300, help="at most this long a phase")
    p.add_argument("--busy-workers", type=int, default=16, help="busy uploads kept in flight")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of busy load before timing")


SCENARIO = runner.Scenario(
    description=__doc__ or "",
    options=options,
    quick={"samples": 5, "busy_workers": 2, "warmup": 0.5},
    roles={"serve": runner.serve, "busy": busy},
    run=run,
    print_report=print_report,
)

if __name__ == "__main__":
    sys.exit(runner.main(SCENARIO))
