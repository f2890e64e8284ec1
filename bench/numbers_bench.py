"""Numbers benchmark: unary GetNumber throughput and assignment-notification latency.

Run from the repository root:

    .venv/bin/python bench/numbers_bench.py [--seconds N] [--json] [--profile]

Every figure is set against a raw baseline measured in the same run, because the machines this
runs on are small and noisy:

1. GetNumber calls/s through the one-process system (gateway interceptor, identity, rate limit,
   SQLite read, conversion) versus a bare grpc.aio server with the same mutual-TLS credentials
   answering GetNumber with a prebuilt response of the same serialized size from memory.
   Reported as `getnumber_ratio` = best system calls/s / best bare calls/s (target >= 0.7).
   Beside them, in the same rounds, the split system: a numbers-service process (role
   "numbers") behind a gateway process (role "gateway") that forwards every RPC to it as raw
   bytes, on the same database and PKI. Reported as `split_ratio` = best split calls/s / best
   system calls/s: the cost of the forwarding hop (no target; DESIGN.md says about 1/3).
2. Time from just before AssignNumber / UnassignNumber is sent to the moment an operator's open
   WatchAssignments stream delivers the event, one change at a time, with the round-trip time of
   a unary GetNumber measured the same way as the raw baseline. Reported as `notify_p99_ms`
   (target < 20 ms on SQLite).

Servers and load generators run in their own processes (this script started again with
`--role serve` or `--role load`), so client and server each get a core (the split system's two
server processes and its clients share the machine's cores: on 2 cores it is CPU-bound).
Everything (PKI, SQLite database) lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from common import (
    OPERATOR,
    PLATFORM,
    SERVER_OPTIONS,
    TENANT,
    Child,
    Context,
    ServerProcess,
    bench_settings,
    credentials,
    machine,
    machine_busy_seconds,
    print_header,
    profile_text,
    read_line,
    run_bare_server,
    serve_commands,
    serve_split,
    server_cpu_seconds,
    start_system,
)

from gateway.identity import GATEWAY_NAME
from gateway.pki import PkiPaths, ensure_dev_pki, issue_client
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc

USER_ID = "11111111-2222-4333-8444-555555555555"
SIP_URI = "sip:{number}@sbc1.contoso.example;user=phone"
GET_NUMBER = "+14255550100"
POOL = [f"+1425555{1000 + i}" for i in range(100)]  # numbers assigned and unassigned in turn

GETNUMBER_TARGET = 0.7
NOTIFY_P99_TARGET_MS = 20.0
WARMUP_CHANGES = 20
STOP_WAIT_S = 15.0  # how long a child process may take to finish once told to
SPLIT_RATIO_DESIGN = 1 / 3  # DESIGN.md: "a hop between Python processes costs about 3x"
KINDS = ("bare", "system", "split")  # the server configurations of part 1, in table order


# --------------------------------------------------------------------------- helpers


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in samples_s)
    if not ordered:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


# --------------------------------------------------------------------------- server processes


async def unimplemented(context: Context) -> NoReturn:
    """End the call with UNIMPLEMENTED (what the bare server answers to all but GetNumber)."""
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the bare baseline")
    raise AssertionError("context.abort returned")


class BareNumberService(pb_grpc.NumberServiceServicer):
    """NumberService.GetNumber answered from memory: the raw gRPC + mutual TLS baseline."""

    def __init__(self, response: pb.GetNumberResponse) -> None:
        self._response = response

    async def GetNumber(
        self, request: pb.GetNumberRequest, context: Context
    ) -> pb.GetNumberResponse:
        return self._response

    async def UploadNumbers(
        self, request: pb.UploadNumbersRequest, context: Context
    ) -> pb.UploadNumbersResponse:
        await unimplemented(context)

    async def ReleaseNumbers(
        self, request: pb.ReleaseNumbersRequest, context: Context
    ) -> pb.ReleaseNumbersResponse:
        await unimplemented(context)

    async def ListNumbers(
        self, request: pb.ListNumbersRequest, context: Context
    ) -> pb.ListNumbersResponse:
        await unimplemented(context)

    async def WatchAssignments(
        self, request: pb.WatchAssignmentsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAssignmentsResponse]:
        await unimplemented(context)
        yield pb.WatchAssignmentsResponse()  # not reached: makes this a server-streaming handler


async def serve_system(root: Path) -> None:
    runtime = await start_system(bench_settings(root / "data", PkiPaths.at(root / "pki")))
    print(f"READY {runtime.port}", flush=True)
    await serve_commands()
    await runtime.stop(grace_s=1.0)


async def serve_bare(root: Path) -> None:
    response = pb.GetNumberResponse.FromString((root / "response.bin").read_bytes())
    bare = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_NumberServiceServicer_to_server(BareNumberService(response), bare)
    await run_bare_server(bare, root / "pki")


# --------------------------------------------------------------------------- load processes


async def measure(
    stub: pb_grpc.NumberServiceStub, server_pids: Sequence[int], spec: dict[str, Any]
) -> dict[str, Any]:
    """`concurrency` coroutines call GetNumber back to back for `warmup` + `seconds`; count the
    calls that complete in the last `seconds`, and sample this process's and the server's CPU
    time (each of its processes) over exactly that window."""
    request = pb.GetNumberRequest(phone_number=spec["phone_number"])
    start = time.perf_counter()
    begin, end = start + spec["warmup"], start + spec["warmup"] + spec["seconds"]
    counts = {"calls": 0, "errors": 0}

    async def caller() -> None:
        while True:
            try:
                await stub.GetNumber(request, timeout=10)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            now = time.perf_counter()
            if now >= end:
                return
            if now >= begin:
                counts["calls" if ok else "errors"] += 1

    marks: list[tuple[float, float, list[float] | None, float | None]] = []

    async def sampler() -> None:
        for moment in (begin, end):
            await asyncio.sleep(max(0.0, moment - time.perf_counter()))
            marks.append(
                (
                    time.perf_counter(),
                    time.process_time(),
                    server_cpu_seconds(server_pids),
                    machine_busy_seconds(),
                )
            )

    await asyncio.gather(sampler(), *(caller() for _ in range(spec["concurrency"])))
    (t0, c0, s0, m0), (t1, c1, s1, m1) = marks
    by_process = (
        [(b - a) / (t1 - t0) for a, b in zip(s0, s1, strict=True)]
        if s0 is not None and s1 is not None
        else None
    )
    return {
        "machine_cpu": (m1 - m0) / (t1 - t0) if m0 is not None and m1 is not None else None,
        "calls": counts["calls"],
        "errors": counts["errors"],
        "client_cpu": (c1 - c0) / (t1 - t0),
        "server_cpu": sum(by_process) if by_process is not None else None,
        "server_cpu_by_process": by_process,
    }


async def load_worker(spec: dict[str, Any]) -> None:
    """A load-generating process: one channel per server, kept for the whole benchmark.

    Says READY once connected and warm; then each `GO <server>` line on stdin runs one
    measurement against that server and answers with one JSON line; ends at end of input.
    """
    creds = credentials(Path(spec["root"]) / "pki", "operator", OPERATOR)
    targets: dict[str, dict[str, Any]] = spec["targets"]
    channels = {kind: grpc.aio.secure_channel(t["address"], creds) for kind, t in targets.items()}
    try:
        stubs = {kind: pb_grpc.NumberServiceStub(ch) for kind, ch in channels.items()}
        request = pb.GetNumberRequest(phone_number=spec["phone_number"])
        for stub in stubs.values():
            for _ in range(20):
                await stub.GetNumber(request, timeout=10)
        print("READY", flush=True)
        while line := await read_line():
            kind = line.strip().removeprefix("GO ")
            result = await measure(stubs[kind], targets[kind]["pids"], spec)
            print(json.dumps(result), flush=True)
    finally:
        for channel in channels.values():
            await channel.close()


@dataclass
class LoadRun:
    server: str
    clients: int
    round: int
    calls_per_s: float
    errors: int
    client_cpu: list[float]  # per client process, share of one core
    server_cpu: float | None  # share of one core (all the server's threads and processes)
    server_cpu_by_process: list[float] | None  # split: gateway, numbers service
    other_cpu: float | None  # cores busy on this machine with anything but server and clients


class LoadWorkers:
    """Client processes that generate load; `run` uses the first `clients` of them together.

    `servers` maps each server configuration to its processes: the first is the one the
    clients call, all of them count in the server's CPU."""

    def __init__(
        self,
        count: int,
        servers: dict[str, Sequence[ServerProcess]],
        root: Path,
        args: argparse.Namespace,
    ) -> None:
        self.seconds = float(args.seconds)
        spec = {
            "root": str(root),
            "targets": {
                kind: {"address": ps[0].address, "pids": [p.pid for p in ps]}
                for kind, ps in servers.items()
            },
            "phone_number": GET_NUMBER,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
        }
        self.workers = [Child("load", spec, STOP_WAIT_S) for _ in range(count)]
        for worker in self.workers:
            worker.expect("READY")

    def run(self, kind: str, clients: int, round_no: int) -> LoadRun:
        """One measurement of server `kind` by `clients` worker processes released together."""
        active = self.workers[:clients]
        for worker in active:
            worker.send(f"GO {kind}")
        results = [json.loads(worker.line()) for worker in active]
        server_cpus = [r["server_cpu"] for r in results if r["server_cpu"] is not None]
        server_cpu = sum(server_cpus) / len(server_cpus) if server_cpus else None
        per_process = [
            r["server_cpu_by_process"] for r in results if r["server_cpu_by_process"] is not None
        ]
        by_process = [sum(p) / len(per_process) for p in zip(*per_process, strict=True)] or None
        busy = results[0]["machine_cpu"]
        other = None
        if busy is not None and server_cpu is not None:
            other = max(0.0, busy - server_cpu - sum(r["client_cpu"] for r in results))
        return LoadRun(
            server=kind,
            clients=clients,
            round=round_no,
            calls_per_s=sum(r["calls"] for r in results) / self.seconds,
            errors=sum(r["errors"] for r in results),
            client_cpu=[r["client_cpu"] for r in results],
            server_cpu=server_cpu,
            server_cpu_by_process=by_process,
            other_cpu=other,
        )

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


# --------------------------------------------------------------------------- orchestrator


async def prepare(address: str, root: Path) -> bytes:
    """Upload the numbers the benchmarks use; return the system's GetNumber answer, serialized."""
    pki_dir = root / "pki"
    async with grpc.aio.secure_channel(
        address, credentials(pki_dir, "operator", OPERATOR)
    ) as channel:
        stub = pb_grpc.NumberServiceStub(channel)
        both = pb.Capabilities(inbound=True, outbound=True)
        uploaded = await stub.UploadNumbers(
            pb.UploadNumbersRequest(
                tenant_id=TENANT,
                numbers=[
                    pb.NumberUpload(phone_number=n, usage=pb.NUMBER_USAGE_USER, capabilities=both)
                    for n in [GET_NUMBER, *POOL]
                ],
            )
        )
        if uploaded.added_count != 1 + len(POOL):
            raise RuntimeError(f"upload failed: {uploaded}")
        # Assigned, so that the answer carries every field an operator sees in practice.
        async with grpc.aio.secure_channel(
            address, credentials(pki_dir, "platform", PLATFORM)
        ) as admin_channel:
            await pb_grpc.NumberAdminServiceStub(admin_channel).AssignNumber(
                assign_request(GET_NUMBER)
            )
    return await answer(address, root)


async def answer(address: str, root: Path) -> bytes:
    """The operator's GetNumber answer from the server at `address`, serialized."""
    async with grpc.aio.secure_channel(
        address, credentials(root / "pki", "operator", OPERATOR)
    ) as channel:
        response = cast(
            pb.GetNumberResponse,
            await pb_grpc.NumberServiceStub(channel).GetNumber(
                pb.GetNumberRequest(phone_number=GET_NUMBER), timeout=10
            ),
        )
    return response.SerializeToString()


def assign_request(number: str) -> pb.AssignNumberRequest:
    return pb.AssignNumberRequest(
        phone_number=number,
        tenant_id=TENANT,
        sip_uri=SIP_URI.format(number=number),
        target=pb.AssignmentTarget(kind=pb.AssignmentTarget.KIND_USER, id=USER_ID),
    )


async def rtt(address: str, root: Path, count: int, warmup: int) -> tuple[list[float], int]:
    """Sequential GetNumber round trips (seconds) and the answer's serialized size."""
    async with grpc.aio.secure_channel(
        address, credentials(root / "pki", "operator", OPERATOR)
    ) as channel:
        stub = pb_grpc.NumberServiceStub(channel)
        request = pb.GetNumberRequest(phone_number=GET_NUMBER)
        samples: list[float] = []
        size = 0
        for i in range(warmup + count):
            t0 = time.perf_counter()
            response = await stub.GetNumber(request)
            elapsed = time.perf_counter() - t0
            size = response.ByteSize()
            if i >= warmup:
                samples.append(elapsed)
    return samples, size


@dataclass
class NotifyResult:
    notify: list[float]  # send -> event received, every change
    assigned: list[float]
    unassigned: list[float]
    rpc: list[float]  # send -> AssignNumber/UnassignNumber answered
    after_answer: list[float]  # answer -> event received (negative: the event came first)
    event_before_answer: int  # changes whose event arrived before the RPC's answer
    timeouts: int


async def notify_latency(address: str, root: Path, changes: int, warmup: int) -> NotifyResult:
    """Assign and unassign pool numbers in turn, one change at a time, timing each event."""
    pki_dir = root / "pki"
    operator = grpc.aio.secure_channel(address, credentials(pki_dir, "operator", OPERATOR))
    platform_ = grpc.aio.secure_channel(address, credentials(pki_dir, "platform", PLATFORM))
    stub = pb_grpc.NumberServiceStub(operator)
    admin = pb_grpc.NumberAdminServiceStub(platform_)
    loop = asyncio.get_running_loop()
    pending: dict[tuple[str, int], asyncio.Future[float]] = {}
    result = NotifyResult([], [], [], [], [], 0, 0)
    try:
        # Watch from a listing's cursor, so no change made after this point can be missed.
        listing = await stub.ListNumbers(pb.ListNumbersRequest(page_size=1))
        call = stub.WatchAssignments(pb.WatchAssignmentsRequest(cursor=listing.watch_cursor))

        async def read() -> None:
            async for response in call:
                now = time.perf_counter()
                for event in response.events:
                    future = pending.pop((event.phone_number, event.type), None)
                    if future is not None and not future.done():
                        future.set_result(now)

        reader = asyncio.create_task(read())
        for i in range(warmup + changes):
            number = POOL[(i // 2) % len(POOL)]
            assigning = i % 2 == 0
            kind = (
                pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED
                if assigning
                else pb.ASSIGNMENT_EVENT_TYPE_UNASSIGNED
            )
            future: asyncio.Future[float] = loop.create_future()
            pending[(number, kind)] = future
            t0 = time.perf_counter()
            if assigning:
                await admin.AssignNumber(assign_request(number))
            else:
                await admin.UnassignNumber(
                    pb.UnassignNumberRequest(phone_number=number, tenant_id=TENANT)
                )
            answered = time.perf_counter()
            try:
                received = await asyncio.wait_for(future, 5.0)
            except TimeoutError:
                if reader.done():
                    raise RuntimeError("the WatchAssignments stream ended") from None
                pending.pop((number, kind), None)
                result.timeouts += 1
                continue
            if i < warmup:
                continue
            result.notify.append(received - t0)
            (result.assigned if assigning else result.unassigned).append(received - t0)
            result.rpc.append(answered - t0)
            result.after_answer.append(received - answered)
            result.event_before_answer += received < answered
        call.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        await operator.close()
        await platform_.close()
    return result


def sqlite_commits(directory: Path, count: int) -> list[float]:
    """Raw SQLite write transactions (WAL, synchronous=FULL, as the system configures it) in
    `directory`, one row each: the floor under any committed change, on this disk."""
    connection = sqlite3.connect(directory / "raw.db", isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        samples: list[float] = []
        for i in range(count):
            t0 = time.perf_counter()
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (i % 100, "x" * 200))
            connection.execute("COMMIT")
            samples.append(time.perf_counter() - t0)
    finally:
        connection.close()
    return samples


def server_profile(system: ServerProcess, workers: LoadWorkers, root: Path) -> tuple[LoadRun, str]:
    """One more 1-client system run with cProfile on in the server's event-loop thread."""
    path = root / "server.prof"
    system.profile_start()
    run = workers.run(system.kind, 1, 0)
    system.profile_stop(path)
    return run, profile_text(path, 15)


def print_report(report: dict[str, Any], runs: list[LoadRun], args: argparse.Namespace) -> None:
    print_header("opconnect numbers benchmark", report)
    print()

    g = report["getnumber"]
    print(
        f"1. Unary GetNumber throughput: {args.concurrency} calls in flight per client process,"
        f" {args.seconds:g} s measured after {args.warmup:g} s warm-up, {args.rounds} rounds"
    )
    print(
        "   (CPU of the best round, in shares of one core over the measured window; server CPU"
        " counts all its threads; other CPU is the rest of the machine: noise from other work)"
    )
    print(
        "   (split: the numbers service in a process of its own (role numbers) behind a gateway"
        " process (role gateway) forwarding raw bytes; its server CPU is gateway + numbers)"
    )
    print(
        f"   {'server':<8}{'clients':>8}{'best calls/s':>14}   {'every round':<26}"
        f"{'client CPU':>12}{'server CPU':>14}{'other CPU':>11}{'errors':>8}"
    )
    for clients in g["client_counts"]:
        for kind in KINDS:
            mine = [r for r in runs if r.server == kind and r.clients == clients]
            best = max(mine, key=lambda r: r.calls_per_s)
            rounds = " / ".join(f"{r.calls_per_s:,.0f}" for r in mine)
            client_cpu = " + ".join(f"{c:.0%}" for c in best.client_cpu)
            if best.server_cpu_by_process is not None and len(best.server_cpu_by_process) > 1:
                server_cpu = " + ".join(f"{c:.0%}" for c in best.server_cpu_by_process)
            else:
                server_cpu = f"{best.server_cpu:.0%}" if best.server_cpu is not None else "n/a"
            other_cpu = f"{best.other_cpu:.0%}" if best.other_cpu is not None else "n/a"
            print(
                f"   {kind:<8}{clients:>8}{best.calls_per_s:>14,.0f}   {rounds:<26}"
                f"{client_cpu:>12}{server_cpu:>14}{other_cpu:>11}{sum(r.errors for r in mine):>8}"
            )
    per = ", ".join(
        f"{c} client process{'es' if c > 1 else ''} {g['ratio_by_clients'][str(c)]:.2f}"
        for c in g["client_counts"]
    )
    print(f"   ratio system/bare at the same client count: {per}")
    top = max((r for r in runs if r.server == "bare"), key=lambda r: r.calls_per_s)
    side = "client" if max(top.client_cpu) >= 0.9 else "server"
    print(
        f"   client side: the bare server peaked at {top.calls_per_s:,.0f} calls/s with"
        f" {top.clients} client process(es) at {' + '.join(f'{c:.0%}' for c in top.client_cpu)}"
        f" of a core ({side} side was the limit)"
    )
    verdict = "met" if g["ratio"] >= GETNUMBER_TARGET else "MISSED"
    print(
        f"   best system {g['best']['system']:,.0f} / best bare {g['best']['bare']:,.0f} calls/s"
        f" = {g['ratio']:.2f} (target >= {GETNUMBER_TARGET}: {verdict})"
    )
    per = ", ".join(
        f"{c} client process{'es' if c > 1 else ''} {g['split_ratio_by_clients'][str(c)]:.2f}"
        for c in g["client_counts"]
    )
    print(f"   ratio split/system at the same client count: {per}")
    print(
        f"   best split {g['best']['split']:,.0f} / best system {g['best']['system']:,.0f} calls/s"
        f" = {g['split_ratio']:.2f}, the cost of the forwarding hop (no target; DESIGN.md: a hop"
        f" between Python processes costs about 3x on unary calls, i.e. about"
        f" {SPLIT_RATIO_DESIGN:.2f})"
    )
    cores = report["machine"]["nproc"]
    busy = 2 + g["client_counts"][-1]
    bound = "CPU-bound" if busy > cores else "not short of cores"
    print(
        f"   split on {cores} cores: 2 server processes + up to {g['client_counts'][-1]} client"
        f" process(es) busy at once ({bound}: the figure includes the processes' competition for"
        " CPU, not only the hop's own work; see the server and client CPU above)"
    )
    sizes = g["response_bytes"]
    print(
        f"   response size: system {sizes['system']} bytes, bare {sizes['bare']} bytes,"
        f" split {sizes['split']} bytes"
    )
    print()

    n = report["notify"]
    print(
        f"2. Assignment -> WatchAssignments event latency: {n['changes']} changes (assign and"
        f" unassign in turn, one at a time) after {n['warmup_changes']} warm-up changes; ms"
    )
    print(f"   {'':<44}{'n':>5}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    rows = [
        ("notify: change sent -> event received", n["latency_ms"]),
        ("  AssignNumber -> ASSIGNED", n["assigned_ms"]),
        ("  UnassignNumber -> UNASSIGNED", n["unassigned_ms"]),
        ("Assign/UnassignNumber round trip", n["change_rpc_ms"]),
        ("event received after that answer", n["event_after_answer_ms"]),
        ("baseline: GetNumber round trip (system)", n["getnumber_rtt_ms"]["system"]),
        ("baseline: GetNumber round trip (bare)", n["getnumber_rtt_ms"]["bare"]),
        ("baseline: raw SQLite commit (WAL, FULL)", n["sqlite_commit_ms"]),
    ]
    for label, s in rows:
        print(
            f"   {label:<44}{s['n']:>5}{s['p50']:>8.2f}{s['p90']:>8.2f}{s['p99']:>8.2f}"
            f"{s['max']:>8.2f}"
        )
    print(
        f"   events that arrived before the change's answer: {n['event_before_answer']}"
        f" of {n['latency_ms']['n']}; timeouts: {n['timeouts']}"
    )
    p99 = n["latency_ms"]["p99"]
    verdict = "met" if p99 < NOTIFY_P99_TARGET_MS else "MISSED"
    print(
        f"   notify p99 {p99:.1f} ms = {n['p99_over_getnumber_p99']:.1f}x the GetNumber p99"
        f" (target < {NOTIFY_P99_TARGET_MS:g} ms: {verdict})"
    )
    if report["profile"]:
        run = report["profile"]["run"]
        print()
        print(
            "Server profile (cProfile of the event-loop thread only: database threads and C code"
            f" that releases the GIL are not seen; 1 client, {run['calls_per_s']:,.0f} calls/s"
            " while profiled):"
        )
        print(report["profile"]["text"].rstrip())
    print()
    print(f"(took {report['elapsed_s']:.0f} s)")
    print(f"getnumber_ratio={g['ratio']:.2f}")
    print(f"split_ratio={g['split_ratio']:.2f}")
    print(f"notify_p99_ms={p99:.1f}")


def bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    client_counts = list(range(1, max(1, args.max_clients) + 1))
    with tempfile.TemporaryDirectory(prefix="opconnect-bench-") as tmp:
        root = Path(tmp)
        paths = ensure_dev_pki(root / "pki", operator_id=OPERATOR, platform_name=PLATFORM)
        issue_client(paths, "platform", GATEWAY_NAME)  # the split gateway's certificate
        settings = bench_settings(root / "data", paths)
        children: list[ServerProcess | LoadWorkers] = []
        try:
            system = ServerProcess("system", {"root": str(root)}, STOP_WAIT_S)
            children.append(system)
            response = asyncio.run(prepare(system.address, root))
            (root / "response.bin").write_bytes(response)
            bare = ServerProcess("bare", {"root": str(root)}, STOP_WAIT_S)
            children.append(bare)
            # The split system on the system's database file, after `prepare` wrote to it.
            split_numbers = ServerProcess("split-numbers", {"root": str(root)}, STOP_WAIT_S)
            children.append(split_numbers)
            split = ServerProcess(
                "split",
                {"root": str(root), "numbers_target": split_numbers.address},
                STOP_WAIT_S,
            )
            children.append(split)
            split_response = asyncio.run(answer(split.address, root))
            if split_response != response:
                raise RuntimeError("the split system's GetNumber answer differs from the system's")
            servers: dict[str, Sequence[ServerProcess]] = {
                "bare": [bare],
                "system": [system],
                "split": [split, split_numbers],
            }
            workers = LoadWorkers(client_counts[-1], servers, root, args)
            children.append(workers)

            runs: list[LoadRun] = []
            for round_no in range(1, args.rounds + 1):
                for clients in client_counts:
                    # Alternate the order of the servers, so a drift in the machine's load does
                    # not always favour the same one.
                    order = KINDS if round_no % 2 else KINDS[::-1]
                    runs.extend(workers.run(kind, clients, round_no) for kind in order)

            rtt_system, size_system = asyncio.run(rtt(system.address, root, args.changes, 50))
            rtt_bare, size_bare = asyncio.run(rtt(bare.address, root, args.changes, 50))
            commits = sqlite_commits(root, 200)
            notified = asyncio.run(
                notify_latency(system.address, root, args.changes, WARMUP_CHANGES)
            )
            profile: dict[str, Any] | None = None
            if args.profile:
                profiled, text = server_profile(system, workers, root)
                profile = {"run": asdict(profiled), "text": text}
        finally:
            for child in reversed(children):
                child.stop()

    best = {
        kind: {
            c: max(r.calls_per_s for r in runs if r.server == kind and r.clients == c)
            for c in client_counts
        }
        for kind in KINDS
    }
    best_bare, best_system = max(best["bare"].values()), max(best["system"].values())
    best_split = max(best["split"].values())
    notify_ms = summary_ms(notified.notify)
    rtt_system_ms = summary_ms(rtt_system)
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "database": "sqlite (WAL) in a temp dir",
            "listen": settings.listen,
            "tls": "mutual, dev PKI in a temp dir",
            "log_level": settings.log_level,
            "log_format": settings.log_format,
            "rate_per_operator": f"{settings.rate_per_operator:g}",
            "rate_burst": settings.rate_burst,
            "db_threads": settings.db_threads,
            "registry_cache_s": settings.registry_cache_s,
            "heartbeat_interval_s": settings.heartbeat_interval_s,
        },
        "params": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "max_clients": client_counts[-1],
            "changes": args.changes,
        },
        "getnumber": {
            "client_counts": client_counts,
            "runs": [asdict(r) for r in runs],
            "best_by_clients": {k: {str(c): v for c, v in b.items()} for k, b in best.items()},
            "ratio_by_clients": {
                str(c): best["system"][c] / best["bare"][c] for c in client_counts
            },
            "best": {"bare": best_bare, "system": best_system, "split": best_split},
            "ratio": best_system / best_bare,
            "target": GETNUMBER_TARGET,
            "split_ratio_by_clients": {
                str(c): best["split"][c] / best["system"][c] for c in client_counts
            },
            "split_ratio": best_split / best_system,
            "split_ratio_design": SPLIT_RATIO_DESIGN,
            "response_bytes": {
                "system": size_system,
                "bare": size_bare,
                "split": len(split_response),
            },
        },
        "notify": {
            "changes": args.changes,
            "warmup_changes": WARMUP_CHANGES,
            "latency_ms": notify_ms,
            "assigned_ms": summary_ms(notified.assigned),
            "unassigned_ms": summary_ms(notified.unassigned),
            "change_rpc_ms": summary_ms(notified.rpc),
            "event_after_answer_ms": summary_ms(notified.after_answer),
            "getnumber_rtt_ms": {"system": rtt_system_ms, "bare": summary_ms(rtt_bare)},
            "sqlite_commit_ms": summary_ms(commits),
            "p99_over_getnumber_p99": notify_ms["p99"] / rtt_system_ms["p99"],
            "event_before_answer": notified.event_before_answer,
            "timeouts": notified.timeouts,
            "target_p99_ms": NOTIFY_P99_TARGET_MS,
        },
        "profile": profile,
        "elapsed_s": time.perf_counter() - started,
        "getnumber_ratio": round(best_system / best_bare, 4),
        "split_ratio": round(best_split / best_system, 4),
        "notify_p99_ms": round(notify_ms["p99"], 3),
    }
    print_report(report, runs, args)
    if args.json:
        if profile is not None:
            report["profile"] = {"run": profile["run"]}  # the text was printed above
        print(json.dumps(report, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GetNumber throughput and assignment-notification latency of the"
        " one-process system, each set against a raw baseline measured in the same run, and"
        " GetNumber throughput of the split system (gateway and numbers service in processes of"
        " their own) against the one-process system."
    )
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per load run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per load run")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight per client")
    p.add_argument("--rounds", type=int, default=3, help="load runs per server and client count")
    p.add_argument("--max-clients", type=int, default=2, help="client processes to try, 1..N")
    p.add_argument("--changes", type=int, default=500, help="assignment changes to time (even)")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.add_argument("--profile", action="store_true", help="cProfile the system server")
    p.add_argument("--role", choices=["bench", "serve", "load"], default="bench", help="internal")
    p.add_argument("--spec", default="{}", help="internal: JSON for --role serve/load")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    spec: dict[str, Any] = json.loads(args.spec)
    if args.role == "serve":
        root = Path(spec["root"])
        if spec["kind"] == "system":
            asyncio.run(serve_system(root))
        elif spec["kind"] == "bare":
            asyncio.run(serve_bare(root))
        else:
            paths = PkiPaths.at(root / "pki")
            asyncio.run(serve_split(bench_settings(root / "data", paths), paths, "numbers", spec))
        return 0
    if args.role == "load":
        asyncio.run(load_worker(spec))
        return 0
    args.changes += args.changes % 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
