"""What the benchmarks share: identities, server options, /proc readings, the one-process system
and bare servers in child processes, the line protocol that drives them, and the report header.

The benchmarks are run as scripts (`.venv/bin/python bench/numbers_bench.py`), so Python puts
`bench/` first on `sys.path` and they import this module as `common`; the child processes they
start (the same script again, with `--role ...`) do the same.
"""

from __future__ import annotations

import asyncio
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeAlias, TypeVar

import grpc
from google import protobuf
from google.protobuf.internal import api_implementation

from app import runtime as gateway_server
from gateway.pki import GATEWAY_NAME, PkiPaths
from gateway.registry import ca_anchors
from plumbing.config import Settings
from plumbing.logs import configure_logging

T = TypeVar("T")
P = ParamSpec("P")

OPERATOR = "contoso-telecom"
PLATFORM = "admin-center"
TENANT = "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"

# The options app.runtime.start gives its server (default settings); the bare servers get the
# same.
SERVER_OPTIONS: list[tuple[str, Any]] = list(gateway_server.server_options(Settings()))

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


# --------------------------------------------------------------------------- helpers


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


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy, all cores together (Linux /proc/stat)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def read_line(executor: Executor | None = None) -> str:
    """One line of stdin without blocking the event loop ('' at end of file), read on
    `executor` (by default the loop's default executor)."""
    return await asyncio.get_running_loop().run_in_executor(executor, sys.stdin.readline)


def machine() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{protobuf.__version__} ({api_implementation.Type()})",
        "sqlite": sqlite3.sqlite_version,
    }


def print_header(title: str, report: dict[str, Any]) -> None:
    """The title, then the machine, settings and benchmark parameters of `report`."""
    m = report["machine"]
    print(title)
    print(
        f"machine:  nproc={m['nproc']} (cpu_count {m['cpu_count']}), {m['platform']}, "
        f"python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"sqlite {m['sqlite']}"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
    print("bench:    " + ", ".join(f"{k}={v}" for k, v in report["params"].items()))


def profile_text(path: Path, top: int) -> str:
    """The `top` functions of the cProfile stats in `path`, by own time and by cumulative time."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------- server processes


def bench_settings(data_dir: Path, paths: PkiPaths) -> Settings:
    """The settings the system runs with in the benchmarks."""
    return Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        tls_cert_file=str(paths.server_cert),
        tls_key_file=str(paths.server_key),
        operator_ca_file=str(paths.operator_ca_cert),
        platform_ca_file=str(paths.platform_ca_cert),
        gateway_ca_file=str(paths.gateway_ca_cert),  # the service processes pin the gateway
        crl_file=str(paths.crl),
        log_level="warning",
        log_format="json",
        rate_per_operator=1e9,
        rate_burst=10**9,
    )


async def start_system(settings: Settings) -> gateway_server.Runtime:
    """The one-process system started with `settings`, OPERATOR registered."""
    configure_logging(settings.log_format, settings.log_level)
    runtime = await gateway_server.start(settings)
    anchors = ca_anchors(Path(settings.operator_ca_file).read_bytes())
    await runtime.registry.add(OPERATOR, "benchmark operator", anchors)
    return runtime


async def run_bare_server(bare: grpc.aio.Server, pki_dir: Path) -> None:
    """Start `bare` on a free port with the system's mutual-TLS credentials, say `READY <port>`,
    follow the orchestrator's commands until it closes stdin, then stop."""
    paths = PkiPaths.at(pki_dir)
    tls = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.operator_ca_cert.read_bytes() + paths.platform_ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = bare.add_secure_port("127.0.0.1:0", tls)
    await bare.start()
    print(f"READY {port}", flush=True)
    await serve_commands()
    await bare.stop(1.0)


class ThreadProfiles:
    """cProfile in every thread that runs work handed to an executor (database threads, the
    loop's default executor), each thread with its own profiler, while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.profilers: dict[int, cProfile.Profile] = {}

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.active:
            return fn(*args, **kwargs)
        profiler = self.profilers.setdefault(threading.get_ident(), cProfile.Profile())
        profiler.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            profiler.disable()


async def serve_split(
    settings: Settings, paths: PkiPaths, service: str, spec: dict[str, Any]
) -> None:
    """One process of a split system (the separate-processes mode): for `spec["kind"]`
    `split-<service>`, that service alone; for `split`, the gateway alone, forwarding it to
    `spec["<service>_target"]` as the platform principal `gateway`. Same settings otherwise
    (the database file, the PKI); the operator is already registered in the database."""
    role: str = service
    if spec["kind"] == "split":
        role = "gateway"
        cert, key = paths.client(f"platform-{GATEWAY_NAME}")
        settings = settings.replace(
            **{f"{service}_target": spec[f"{service}_target"]},
            internal_ca_file=str(paths.ca_cert),
            internal_cert_file=str(cert),
            internal_key_file=str(key),
        )
    configure_logging(settings.log_format, settings.log_level)
    runtime = await gateway_server.start(settings, role)
    if role == "gateway":  # bound to the operator CA (filled databases register no anchor)
        anchors = ca_anchors(paths.operator_ca_cert.read_bytes())
        await runtime.registry.add(OPERATOR, "benchmark operator", anchors)
    print(f"READY {runtime.port}", flush=True)
    await serve_commands()
    await runtime.stop(grace_s=1.0)


async def serve_commands(profiles: ThreadProfiles | None = None) -> None:
    """Follow the orchestrator's commands on stdin until it closes it.

    `profile-start` turns cProfile on (the event-loop thread, where the gRPC handlers run, and
    with `profiles` the threads of the executors); `profile-stop PATH` turns it off, writes the
    merged stats to PATH and answers `PROFILED`. Stdin is read on a thread of its own (not the
    loop's default executor, which `profiles` may watch).
    """
    stdin = ThreadPoolExecutor(1, thread_name_prefix="stdin")
    profiler: cProfile.Profile | None = None
    while line := await read_line(stdin):
        command, _, argument = line.strip().partition(" ")
        if command == "profile-start":
            profiler = cProfile.Profile()
            if profiles is not None:
                profiles.profilers.clear()
                profiles.active = True
            profiler.enable()
        elif command == "profile-stop" and profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler)
            if profiles is not None:
                profiles.active = False
                for thread_profiler in profiles.profilers.values():
                    stats.add(thread_profiler)
            stats.dump_stats(argument)
            profiler = None
            print("PROFILED", flush=True)
    stdin.shutdown(wait=False)


# --------------------------------------------------------------------------- child processes


class Child:
    """The running script started again in a child process with `--role role`, driven by lines:
    commands go to its stdin, answers come from its stdout; closing its stdin tells it to finish
    (it is killed if it has not within `stop_wait_s`)."""

    def __init__(self, role: str, spec: dict[str, Any], stop_wait_s: float = 30.0) -> None:
        script = os.path.abspath(sys.argv[0])
        self.process = subprocess.Popen(
            [sys.executable, script, "--role", role, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self.stop_wait_s = stop_wait_s

    def line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"child process {self.pid} ended (exit {self.process.returncode})")
        return line.strip()

    def expect(self, prefix: str) -> str:
        line = self.line()
        if not line.startswith(prefix):
            self.stop()
            raise RuntimeError(f"child process {self.pid} said {line!r}, expected {prefix!r}")
        return line

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def ask(self, command: str) -> dict[str, Any]:
        """Send a command and read its one-line JSON answer."""
        self.send(command)
        answer: dict[str, Any] = json.loads(self.line())
        if "error" in answer:
            raise RuntimeError(f"child process {self.pid}: {answer['error']}")
        return answer

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(self.stop_wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class ServerProcess(Child):
    """A server (`system` or `bare`) in a child process of its own (`--role serve`)."""

    def __init__(self, kind: str, spec: dict[str, Any], stop_wait_s: float = 30.0) -> None:
        super().__init__("serve", {"kind": kind, **spec}, stop_wait_s)
        self.kind = kind
        self.port = int(self.expect("READY ").split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def profile_start(self) -> None:
        self.send("profile-start")

    def profile_stop(self, path: Path) -> None:
        self.send(f"profile-stop {path}")
        self.expect("PROFILED")


# --------------------------------------------------------------------------- shared by the benches


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """An INSERT of one row of `columns` into `table`, with `?` placeholders."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def other_cpu(
    busy: tuple[float | None, float | None],
    seconds: float,
    server_cpu: float | None,
    client_cpu: float,
) -> float | None:
    """Cores busy with anything but the server and this client over a run (noise)."""
    if busy[0] is None or busy[1] is None or server_cpu is None:
        return None
    return max(0.0, (busy[1] - busy[0]) / seconds - server_cpu - client_cpu)


def server_cpu_seconds(pids: Sequence[int]) -> list[float] | None:
    """CPU seconds of each server process, or None if one cannot be read."""
    readings = [cpu_seconds(pid) for pid in pids]
    return [r for r in readings if r is not None] if None not in readings else None


class ProfilingExecutor(ThreadPoolExecutor):
    """A thread pool whose work items run under `ThreadProfiles.call`."""

    def __init__(self, workers: int | None, prefix: str, profiles: ThreadProfiles) -> None:
        super().__init__(workers, thread_name_prefix=prefix)
        self._profiles = profiles

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(functools.partial(self._profiles.call, fn, *args, **kwargs))


async def serve_system(spec: dict[str, Any]) -> None:
    """The one-process system on `spec["data_dir"]`; with `spec["profile"]`, its loop, database
    threads and default executor profiled (commands on stdin: see `serve_commands`)."""
    paths = PkiPaths.at(Path(spec["root"]) / "pki")
    settings = bench_settings(Path(spec["data_dir"]), paths)
    runtime = await start_system(settings)
    profiles: ThreadProfiles | None = None
    if spec.get("profile"):
        # Validation runs on the loop's default executor and storage on the database threads:
        # profile both, not only the event loop.
        profiles = ThreadProfiles()
        old = runtime.db._executor
        runtime.db._executor = ProfilingExecutor(settings.db_threads, "db", profiles)
        old.shutdown(wait=False)
        asyncio.get_running_loop().set_default_executor(
            ProfilingExecutor(None, "default", profiles)
        )
    print(f"READY {runtime.port}", flush=True)
    await serve_commands(profiles)
    await runtime.stop(grace_s=1.0)
