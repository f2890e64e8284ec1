"""Numbers benchmark: unary GetNumber throughput and assignment-notification latency.

Run from the repository root:

    .venv/bin/python bench/numbers_bench.py [--seconds N] [--json] [--profile]

Every figure is set against a raw baseline measured in the same run, because the machines this
runs on are small and noisy:

1. GetNumber calls/s through the one-process system (gateway interceptor, identity, rate limit,
   SQLite read, conversion) versus a bare grpc.aio server with the same mutual-TLS credentials
   answering GetNumber with a prebuilt response of the same serialized size from memory.
   Reported as `getnumber_ratio` = best system calls/s / best bare calls/s (target >= 0.7).
2. Time from just before AssignNumber / UnassignNumber is sent to the moment an operator's open
   WatchAssignments stream delivers the event, one change at a time, with the round-trip time of
   a unary GetNumber measured the same way as the raw baseline. Reported as `notify_p99_ms`
   (target < 20 ms on SQLite).

Servers and load generators run in their own processes (this script started again with
`--role serve` or `--role load`), so client and server each get a core. Everything (PKI, SQLite
database) lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import math
import os
import platform
import pstats
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from google import protobuf
from google.protobuf.internal import api_implementation

from gateway import server as gateway_server
from gateway.pki import PkiPaths, ensure_dev_pki
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc
from plumbing.config import Settings
from plumbing.logs import configure_logging

OPERATOR = "contoso-telecom"
PLATFORM = "admin-center"
TENANT = "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"
USER_ID = "11111111-2222-4333-8444-555555555555"
SIP_URI = "sip:{number}@sbc1.contoso.example;user=phone"
GET_NUMBER = "+14255550100"
POOL = [f"+1425555{1000 + i}" for i in range(100)]  # numbers assigned and unassigned in turn

GETNUMBER_TARGET = 0.7
NOTIFY_P99_TARGET_MS = 20.0

# The options gateway.server.start gives its server; the bare server gets the same.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

Context = grpc.aio.ServicerContext[Any, Any]


# --------------------------------------------------------------------------- shared helpers


def credentials(pki_dir: Path, kind: str, ident: str) -> grpc.ChannelCredentials:
    """Channel credentials for a client identity of the development PKI in `pki_dir`."""
    paths = PkiPaths.at(pki_dir)
    cert, key = paths.client(f"{kind}-{ident}")
    return grpc.ssl_channel_credentials(
        root_certificates=paths.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and all its threads (Linux /proc), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def read_line() -> str:
    """One line of stdin without blocking the event loop ('' at end of file)."""
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


# --------------------------------------------------------------------------- server processes


class BareNumberService(pb_grpc.NumberServiceServicer):
    """NumberService.GetNumber answered from memory: the raw gRPC + mutual TLS baseline."""

    def __init__(self, response: pb.GetNumberResponse) -> None:
        self._response = response

    async def GetNumber(
        self, request: pb.GetNumberRequest, context: Context
    ) -> pb.GetNumberResponse:
        return self._response


async def serve_commands() -> None:
    """Follow the orchestrator's commands on stdin until it closes it.

    `profile-start` turns cProfile on (for the event-loop thread, where the gRPC handlers run);
    `profile-stop PATH` turns it off, writes the stats to PATH and answers `PROFILED`.
    """
    profiler: cProfile.Profile | None = None
    while line := await read_line():
        command, _, argument = line.strip().partition(" ")
        if command == "profile-start":
            profiler = cProfile.Profile()
            profiler.enable()
        elif command == "profile-stop" and profiler is not None:
            profiler.disable()
            profiler.dump_stats(argument)
            profiler = None
            print("PROFILED", flush=True)


async def serve_system(root: Path) -> None:
    paths = PkiPaths.at(root / "pki")
    settings = bench_settings(root, paths)
    configure_logging(settings.log_format, settings.log_level)
    runtime = await gateway_server.start(settings)
    await runtime.registry.add(OPERATOR, "benchmark operator")
    print(f"READY {runtime.port}", flush=True)
    await serve_commands()
    await runtime.stop(grace_s=1.0)


async def serve_bare(root: Path) -> None:
    paths = PkiPaths.at(root / "pki")
    response = pb.GetNumberResponse.FromString((root / "response.bin").read_bytes())
    bare = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_NumberServiceServicer_to_server(BareNumberService(response), bare)
    tls = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = bare.add_secure_port("127.0.0.1:0", tls)
    await bare.start()
    print(f"READY {port}", flush=True)
    await serve_commands()
    await bare.stop(1.0)


def bench_settings(root: Path, paths: PkiPaths) -> Settings:
    """The settings the system runs with in this benchmark."""

    return Settings(
        data_dir=root / "data",
        listen="127.0.0.1:0",
        tls_cert_file=str(paths.server_cert),
        tls_key_file=str(paths.server_key),
        operator_ca_file=str(paths.ca_cert),
        crl_file=str(paths.crl),
        log_level="warning",
        log_format="json",
        rate_per_operator=1e9,
        rate_burst=10**9,
    )


class ServerProcess:
    """A server (`system` or `bare`) running in a child process of its own."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        spec = json.dumps({"kind": kind, "root": str(root)})
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--role", "serve", "--spec", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._line()
        if not line.startswith("READY "):
            self.process.kill()
            raise RuntimeError(f"{kind} server did not start (said {line!r})")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.pid = self.process.pid

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline()

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def profile(self, start: bool, path: Path | None = None) -> None:
        if start:
            self.send("profile-start")
            return
        self.send(f"profile-stop {path}")
        if self._line().strip() != "PROFILED":
            raise RuntimeError(f"{self.kind} server did not write its profile")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# --------------------------------------------------------------------------- load processes


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    """Drive GetNumber from `concurrency` coroutines on one channel; count calls in the window.

    Says READY once connected and warm, waits for GO on stdin, runs `warmup` seconds, then counts
    calls that complete during the next `seconds`, and samples its own and the server's CPU time
    over exactly that window.
    """
    root = Path(spec["root"])
    request = pb.GetNumberRequest(phone_number=spec["phone_number"])
    server_pid: int = spec["server_pid"]
    async with grpc.aio.secure_channel(
        spec["address"], credentials(root / "pki", "operator", OPERATOR)
    ) as channel:
        stub = pb_grpc.NumberServiceStub(channel)
        for _ in range(20):
            await stub.GetNumber(request, timeout=10)
        print("READY", flush=True)
        if (await read_line()).strip() != "GO":
            raise RuntimeError("expected GO")

        start = time.perf_counter()
        begin, end = start + spec["warmup"], start + spec["warmup"] + spec["seconds"]
        counts = {"calls": 0, "errors": 0}

        async def worker() -> None:
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

        samples: dict[str, float | None] = {}

        async def sampler() -> None:
            await asyncio.sleep(max(0.0, begin - time.perf_counter()))
            samples["t0"], samples["c0"] = time.perf_counter(), time.process_time()
            samples["s0"] = cpu_seconds(server_pid)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            samples["t1"], samples["c1"] = time.perf_counter(), time.process_time()
            samples["s1"] = cpu_seconds(server_pid)

        await asyncio.gather(sampler(), *(worker() for _ in range(spec["concurrency"])))

    wall = float(samples["t1"] or 0.0) - float(samples["t0"] or 0.0)
    s0, s1 = samples["s0"], samples["s1"]
    return {
        "calls": counts["calls"],
        "errors": counts["errors"],
        "seconds": spec["seconds"],
        "client_cpu": (float(samples["c1"] or 0.0) - float(samples["c0"] or 0.0)) / wall,
        "server_cpu": (s1 - s0) / wall if s0 is not None and s1 is not None else None,
    }


@dataclass
class LoadRun:
    server: str
    clients: int
    round: int
    calls_per_s: float
    errors: int
    client_cpu: list[float]  # per client process, fraction of one core
    server_cpu: float | None  # fraction of one core (all threads)


def run_load(
    server: ServerProcess, root: Path, clients: int, round_no: int, args: argparse.Namespace
) -> LoadRun:
    """Start `clients` load processes against `server`, release them together, sum their calls."""
    spec = json.dumps(
        {
            "root": str(root),
            "address": server.address,
            "server_pid": server.pid,
            "phone_number": GET_NUMBER,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
        }
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--role", "load", "--spec", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("a load process failed to start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=args.seconds + args.warmup + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"a load process exited with {proc.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    server_cpus = [r["server_cpu"] for r in results if r["server_cpu"] is not None]
    return LoadRun(
        server=server.kind,
        clients=clients,
        round=round_no,
        calls_per_s=sum(r["calls"] for r in results) / args.seconds,
        errors=sum(r["errors"] for r in results),
        client_cpu=[r["client_cpu"] for r in results],
        server_cpu=sum(server_cpus) / len(server_cpus) if server_cpus else None,
    )


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
        response = await stub.GetNumber(pb.GetNumberRequest(phone_number=GET_NUMBER))
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
    result = NotifyResult([], [], [], [], 0, 0)
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
                pending.pop((number, kind), None)
                result.timeouts += 1
                continue
            if i < warmup:
                continue
            result.notify.append(received - t0)
            (result.assigned if assigning else result.unassigned).append(received - t0)
            result.rpc.append(answered - t0)
            result.event_before_answer += received < answered
        call.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        await operator.close()
        await platform_.close()
    return result


def server_profile(
    system: ServerProcess, root: Path, args: argparse.Namespace
) -> tuple[LoadRun, str]:
    """One more 1-client system run with cProfile on in the server's event-loop thread."""
    path = root / "server.prof"
    system.profile(True)
    run = run_load(system, root, 1, 0, args)
    system.profile(False, path)
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return run, out.getvalue()


def machine() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{_protobuf_version()} ({api_implementation.Type()})",
        "sqlite": sqlite3.sqlite_version,
    }


def _protobuf_version() -> str:
    return str(protobuf.__version__)


def fmt_ms(value: float) -> str:
    return f"{value:7.2f}"


def print_report(report: dict[str, Any], runs: list[LoadRun], args: argparse.Namespace) -> None:
    m = report["machine"]
    print("opconnect numbers benchmark")
    print(
        f"machine:  nproc={m['nproc']} (cpu_count {m['cpu_count']}), {m['platform']}, "
        f"python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"sqlite {m['sqlite']}"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
    print("bench:    " + ", ".join(f"{k}={v}" for k, v in report["params"].items()))
    print()

    g = report["getnumber"]
    print(
        f"1. Unary GetNumber throughput ({args.concurrency} concurrent calls per client process,"
        f" {args.seconds:g} s after {args.warmup:g} s warm-up, best of {args.rounds} rounds;"
        " CPU = share of one core)"
    )
    print(
        f"   {'server':<8}{'clients':>8}{'best calls/s':>14}   {'every round':<22}"
        f"{'client CPU':>12}{'server CPU':>12}{'errors':>8}"
    )
    for clients in g["client_counts"]:
        for kind in ("bare", "system"):
            mine = [r for r in runs if r.server == kind and r.clients == clients]
            best = max(mine, key=lambda r: r.calls_per_s)
            rounds = " / ".join(f"{r.calls_per_s:,.0f}" for r in mine)
            client_cpu = " + ".join(f"{c:.0%}" for c in best.client_cpu)
            server_cpu = f"{best.server_cpu:.0%}" if best.server_cpu is not None else "n/a"
            print(
                f"   {kind:<8}{clients:>8}{best.calls_per_s:>14,.0f}   {rounds:<22}"
                f"{client_cpu:>12}{server_cpu:>12}{sum(r.errors for r in mine):>8}"
            )
    per = ", ".join(
        f"{c} client(s) {g['ratio_by_clients'][str(c)]:.2f}" for c in g["client_counts"]
    )
    print(f"   ratio system/bare: {per}")
    print(
        f"   best system {g['best']['system']:,.0f} / best bare {g['best']['bare']:,.0f} calls/s"
        f" = {g['ratio']:.2f} (target >= {GETNUMBER_TARGET}:"
        f" {'met' if g['ratio'] >= GETNUMBER_TARGET else 'MISSED'})"
    )
    print(f"   response size: {g['response_bytes']} bytes from both servers")
    print()

    n = report["notify"]
    print(
        f"2. Assignment -> WatchAssignments event latency ({n['changes']} changes, assign and"
        f" unassign in turn, one at a time, after {n['warmup_changes']} warm-up changes; ms)"
    )
    print(f"   {'':<40}{'n':>5}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    rows = [
        ("notify: send -> event (all)", n["latency_ms"]),
        ("  AssignNumber -> ASSIGNED", n["assigned_ms"]),
        ("  UnassignNumber -> UNASSIGNED", n["unassigned_ms"]),
        ("Assign/UnassignNumber round trip", n["change_rpc_ms"]),
        ("baseline: GetNumber round trip (system)", n["getnumber_rtt_ms"]["system"]),
        ("baseline: GetNumber round trip (bare)", n["getnumber_rtt_ms"]["bare"]),
    ]
    for label, s in rows:
        print(
            f"   {label:<40}{s['n']:>5}{fmt_ms(s['p50']):>8}{fmt_ms(s['p90']):>8}"
            f"{fmt_ms(s['p99']):>8}{fmt_ms(s['max']):>8}"
        )
    print(
        f"   events that arrived before the change RPC's answer: {n['event_before_answer']}"
        f" of {n['latency_ms']['n']}; timeouts: {n['timeouts']}"
    )
    p99 = n["latency_ms"]["p99"]
    verdict = "met" if p99 < NOTIFY_P99_TARGET_MS else "MISSED"
    print(
        f"   p99 {p99:.1f} ms = {n['p99_over_getnumber_p99']:.1f}x the GetNumber p99"
        f" (target < {NOTIFY_P99_TARGET_MS:g} ms: {verdict})"
    )
    if report.get("profile"):
        print()
        run = report["profile"]["run"]
        print(
            f"Server profile (cProfile, event-loop thread only; 1 client, {run['calls_per_s']:,.0f}"
            " calls/s while profiled):"
        )
        print(report["profile"]["text"])
    print()
    print(f"getnumber_ratio={g['ratio']:.2f}")
    print(f"notify_p99_ms={p99:.1f}")


def bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opconnect-bench-") as tmp:
        root = Path(tmp)
        paths = ensure_dev_pki(root / "pki", operator_id=OPERATOR, platform_name=PLATFORM)
        settings = bench_settings(root, paths)
        servers: list[ServerProcess] = []
        try:
            system = ServerProcess("system", root)
            servers.append(system)
            response = asyncio.run(prepare(system.address, root))
            (root / "response.bin").write_bytes(response)
            bare = ServerProcess("bare", root)
            servers.append(bare)

            runs: list[LoadRun] = []
            client_counts = [1, 2] if args.max_clients >= 2 else [1]
            for round_no in range(1, args.rounds + 1):
                for clients in client_counts:
                    # Alternate which server goes first, so drift in the machine's load
                    # does not always favour the same one.
                    order = (bare, system) if round_no % 2 else (system, bare)
                    for server in order:
                        runs.append(run_load(server, root, clients, round_no, args))

            def run_async(fn: Callable[..., Awaitable[Any]], *a: Any) -> Any:
                return asyncio.run(fn(*a))

            rtt_system, size_system = run_async(rtt, system.address, root, args.changes, 50)
            rtt_bare, size_bare = run_async(rtt, bare.address, root, args.changes, 50)
            notified: NotifyResult = run_async(
                notify_latency, system.address, root, args.changes, 20
            )
            profile: dict[str, Any] | None = None
            if args.profile:
                prof_run, text = server_profile(system, root, args)
                profile = {"run": asdict(prof_run), "text": text}
        finally:
            for server in servers:
                server.stop()

    best = {
        kind: {
            c: max(r.calls_per_s for r in runs if r.server == kind and r.clients == c)
            for c in client_counts
        }
        for kind in ("bare", "system")
    }
    best_bare, best_system = max(best["bare"].values()), max(best["system"].values())
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
            "rate_per_operator": settings.rate_per_operator,
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
            "changes": args.changes,
        },
        "getnumber": {
            "client_counts": client_counts,
            "runs": [asdict(r) for r in runs],
            "best_by_clients": {k: {str(c): v for c, v in b.items()} for k, b in best.items()},
            "ratio_by_clients": {
                str(c): best["system"][c] / best["bare"][c] for c in client_counts
            },
            "best": {"bare": best_bare, "system": best_system},
            "ratio": best_system / best_bare,
            "target": GETNUMBER_TARGET,
            "response_bytes": len(response),
            "response_bytes_seen": {"system": size_system, "bare": size_bare},
        },
        "notify": {
            "changes": args.changes,
            "warmup_changes": 20,
            "latency_ms": notify_ms,
            "assigned_ms": summary_ms(notified.assigned),
            "unassigned_ms": summary_ms(notified.unassigned),
            "change_rpc_ms": summary_ms(notified.rpc),
            "getnumber_rtt_ms": {"system": rtt_system_ms, "bare": summary_ms(rtt_bare)},
            "p99_over_getnumber_p99": notify_ms["p99"] / rtt_system_ms["p99"],
            "event_before_answer": notified.event_before_answer,
            "timeouts": notified.timeouts,
            "target_p99_ms": NOTIFY_P99_TARGET_MS,
        },
        "elapsed_s": time.perf_counter() - started,
    }
    report["profile"] = profile
    print_report(report, runs, args)
    report["profile"] = {"run": profile["run"]} if profile else None  # the text was printed
    report["getnumber_ratio"] = round(report["getnumber"]["ratio"], 4)
    report["notify_p99_ms"] = round(notify_ms["p99"], 3)
    print(f"(took {report['elapsed_s']:.0f} s)")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per load run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per load run")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight per client")
    p.add_argument("--rounds", type=int, default=2, help="load runs per server and client count")
    p.add_argument("--max-clients", type=int, default=2, help="also try 2 client processes")
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
        serve = serve_system if spec["kind"] == "system" else serve_bare
        asyncio.run(serve(Path(spec["root"])))
        return 0
    if args.role == "load":
        print(json.dumps(asyncio.run(load(spec))), flush=True)
        return 0
    if args.changes % 2:
        args.changes += 1
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
