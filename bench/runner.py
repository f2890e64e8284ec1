"""How a benchmark runs: its command line and child-process roles, the run's workspace (PKI,
data folders, database), the servers in child processes and the line protocol that drives
them, the `--profile` plumbing, rounds taken in turn, CPU readings, and the JSON output.

A benchmark is a scenario file, `bench/<name>_bench.py`, run as a script from the repository
root: Python puts `bench/` first on `sys.path`, so it imports this module as `runner` (and
`report`, `rows`). It describes itself as a `Scenario` and ends with
`sys.exit(runner.main(SCENARIO))`. The child processes it starts (`Child`, `ServerProcess`) are
the same script again with `--role ROLE --spec JSON`; `main` runs the scenario's role of that
name on the spec instead of the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeAlias, TypeVar

import grpc
import sqlalchemy as sa
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from report import profile_text

from app import runtime as gateway_server
from gateway.pki import GATEWAY_NAME, PeerKind, PkiPaths, ensure_dev_pki, issue_client
from gateway.registry import ca_anchors
from opconnect.numbers.v1 import (
    civic_addresses_pb2,
    civic_addresses_pb2_grpc,
    consents_pb2,
    consents_pb2_grpc,
)
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
Spec: TypeAlias = dict[str, Any]  # what a child process is told: JSON on its command line
Role: TypeAlias = Callable[[Spec], Coroutine[Any, Any, None]]


# --------------------------------------------------------------------------- the command line


def _no_check(args: argparse.Namespace) -> str | None:
    return None


@dataclass(frozen=True)
class Scenario:
    """One benchmark, as `main` runs it."""

    description: str  # the --help text
    options: Callable[[argparse.ArgumentParser], None]  # adds the benchmark's own options
    quick: dict[str, Any]  # the option values --quick sets: a tiny run (the smoke test's)
    roles: dict[str, Role]  # child processes: `--role NAME --spec JSON` runs NAME(spec)
    run: Callable[[argparse.Namespace], dict[str, Any]]  # the benchmark: its report
    print_report: Callable[[dict[str, Any], argparse.Namespace], None]
    profile: str = ""  # what --profile profiles ("": no --profile option)
    # Settles the options that depend on others; an error message for a bad combination.
    check: Callable[[argparse.Namespace], str | None] = _no_check


def parser(scenario: Scenario) -> argparse.ArgumentParser:
    """The scenario's options, then the ones every benchmark has."""
    p = argparse.ArgumentParser(
        description=scenario.description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    scenario.options(p)
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.add_argument(
        "--database",
        default="",
        metavar="URL",
        help="the database the systems and the raw baselines use: SQLite in the run's folder"
        " (default), or a PostgreSQL URL (postgresql+psycopg://...), in which the run makes a"
        " schema of its own and drops it at the end",
    )
    if scenario.profile:
        p.add_argument("--profile", action="store_true", help=scenario.profile)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run that only shows it works: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in scenario.quick.items()),
    )
    p.add_argument("--role", choices=["bench", *scenario.roles], default="bench", help="internal")
    p.add_argument("--spec", default="{}", help="internal: JSON for the other roles")
    return p


def main(scenario: Scenario, argv: list[str] | None = None) -> int:
    """Run the benchmark, print its report (and with --json the report as JSON: every figure
    but the profile texts, which were printed); or, in a child process, its role."""
    p = parser(scenario)
    args = p.parse_args(argv)
    if args.role != "bench":
        asyncio.run(scenario.roles[args.role](json.loads(args.spec)))
        return 0
    if args.quick:  # the quick values as defaults: options given on the command line win
        p.set_defaults(**scenario.quick)
        args = p.parse_args(argv)
    error = scenario.check(args)
    if error is not None:
        p.error(error)
    started = time.perf_counter()
    report = scenario.run(args)
    report["elapsed_s"] = time.perf_counter() - started
    scenario.print_report(report, args)
    if args.json:
        if report.get("profile"):  # without the profile texts, printed above
            report["profile"] = _without_texts(report["profile"])
        print(json.dumps(report, indent=2))
    return 0


def _without_texts(profile: Any) -> Any:
    """A report's profile part without its texts (`text` keys, at any depth)."""
    if isinstance(profile, dict):
        return {k: _without_texts(v) for k, v in profile.items() if k != "text"}
    return profile


# --------------------------------------------------------------------------- the workspace


@dataclass(frozen=True)
class Workspace:
    """A run's temporary directory `root`: the development PKI in `root/pki`, and each system's
    data in a folder of its own (`root/<data>`) with a database of its own: SQLite in that
    folder, or with `postgres_url` a schema of its own on that PostgreSQL server (made on first
    use, dropped with the others when the run ends: see `workspace`). Every system setting comes
    from here (`spec`, `settings`), in the benchmark's process and in its children."""

    root: Path
    postgres_url: str = ""  # the server's URL; empty: SQLite
    schema_prefix: str = ""  # the run's schemas: <prefix><data>
    made: set[str] = field(default_factory=set)  # the schemas made so far

    @property
    def backend(self) -> str:
        """What the run's databases are: `sqlite` or `postgresql`."""
        return "postgresql" if self.postgres_url else "sqlite"

    def database(self, data: str = "data") -> str:
        """The SQLAlchemy URL of data folder `data`'s database (its PostgreSQL schema made now if
        new)."""
        if not self.postgres_url:
            return f"sqlite:///{self.root / data / 'opconnect.db'}"
        schema = self.schema_prefix + data
        if schema not in self.made:
            engine = sa.create_engine(self.postgres_url)
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
            finally:
                engine.dispose()
            self.made.add(schema)
        return with_search_path(self.postgres_url, schema)

    @property
    def database_url(self) -> str:
        """The URL of the main data folder's database on PostgreSQL; empty on SQLite (each
        system then makes its own file in its data folder)."""
        return self.database() if self.postgres_url else ""

    def spec(self, data: str = "data", **more: Any) -> Spec:
        """What a child process needs to run a system of this workspace on data folder `data`
        (and to find the PKI), with `more`."""
        return {
            "root": str(self.root),
            "data_dir": str(self.root / data),
            "database_url": self.database(data) if self.postgres_url else "",
            "backend": self.backend,
            **more,
        }

    def settings(self, data: str = "data") -> Settings:
        return system_settings(self.spec(data))

    def described(self) -> str:
        """The databases, for a report's settings."""
        if not self.postgres_url:
            return "sqlite (WAL, synchronous=FULL) in a temp dir"
        where = self.postgres_url.split("@")[-1].split("?")[0]
        return f"postgresql {where}, a schema of its own per system (psycopg)"


@contextmanager
def workspace(
    prefix: str, clients: Sequence[tuple[PeerKind, str]] = (), database_url: str = ""
) -> Iterator[Workspace]:
    """A temporary directory with a development PKI for OPERATOR and PLATFORM, and a client
    certificate for each (kind, name) of `clients`; removed on leaving. With a PostgreSQL
    `database_url`, each data folder's database is a schema of its own there, all dropped on
    leaving."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        paths = ensure_dev_pki(root / "pki", operator_id=OPERATOR, platform_name=PLATFORM)
        for kind, name in clients:
            issue_client(paths, kind, name)
        if not database_url.startswith("postgresql"):
            yield Workspace(root)
            return
        ws = Workspace(root, database_url, f"bench_{uuid.uuid4().hex[:12]}_")
        try:
            yield ws
        finally:
            drop_schemas(database_url, ws.made)


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema of its own on the PostgreSQL server of `url`, dropped on leaving; yields
    the URL that uses it."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    finally:
        engine.dispose()
    try:
        yield with_search_path(url, schema)
    finally:
        drop_schemas(url, {schema})


def with_search_path(url: str, schema: str) -> str:
    """`url` with `schema` as its connections' search_path."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def drop_schemas(url: str, schemas: set[str]) -> None:
    engine = sa.create_engine(url)
    try:
        for schema in sorted(schemas):
            with engine.begin() as conn:
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        engine.dispose()


def system_settings(spec: Spec) -> Settings:
    """The settings a system runs with in the benchmarks: its workspace's PKI, data folder and
    database (see `Workspace.spec`), logs at warning, the per-operator limits out of the way
    (the rate, and the calls in flight: a load client keeps 32 in flight, and a split gateway
    holds each for the whole hop, so the default 8 would refuse calls and count them as
    errors), unless `spec["fair"]` (the fairness benchmark measures those limits at work)."""
    paths = PkiPaths.at(Path(spec["root"]) / "pki")
    return Settings(
        data_dir=Path(spec["data_dir"]),
        database_url=spec.get("database_url", ""),
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
        max_calls_per_operator=Settings.max_calls_per_operator if spec.get("fair") else 10**6,
        # Behind a transaction pooler (replicas_bench --pgbouncer): LISTEN direct, no prepares.
        database_listen_url=spec.get("database_listen_url", ""),
        db_prepare_threshold=spec.get("db_prepare_threshold", Settings.db_prepare_threshold),
    )


def credentials(root: Path | str, kind: str, ident: str) -> grpc.ChannelCredentials:
    """Channel credentials for a client identity (`<kind>-<ident>`) of the development PKI of
    the workspace at `root` (a spec's `root`)."""
    paths = PkiPaths.at(Path(root) / "pki")
    cert, key = paths.client(f"{kind}-{ident}")
    return grpc.ssl_channel_credentials(
        root_certificates=paths.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


async def grant_consent(address: str, root: Path | str, operator: str, tenant: str) -> str:
    """The consent uploads need: requested as the admin center, accepted as the operator; and
    the civic address USER numbers are uploaded with (its request id the pair's own: each step
    safe to repeat). Returns the address's id."""
    async with grpc.aio.secure_channel(address, credentials(root, "platform", PLATFORM)) as admin:
        await consents_pb2_grpc.ConsentAdminServiceStub(admin).CreateConsent(
            consents_pb2.CreateConsentRequest(tenant_id=tenant, operator_id=operator)
        )
    async with grpc.aio.secure_channel(address, credentials(root, "operator", operator)) as op:
        await consents_pb2_grpc.ConsentServiceStub(op).UpdateConsentStatus(
            consents_pb2.UpdateConsentStatusRequest(
                tenant_id=tenant, state=consents_pb2.CONSENT_STATE_ACTIVE
            )
        )
        made = await civic_addresses_pb2_grpc.CivicAddressServiceStub(op).CreateCivicAddress(
            civic_addresses_pb2.CreateCivicAddressRequest(
                civic_address=civic_addresses_pb2.CivicAddress(
                    tenant_id=tenant,
                    country_code="US",
                    house_number="1",
                    street_name="Microsoft Way",
                    city="Redmond",
                    state_or_province="WA",
                    postal_code="98052",
                    company_name="Bench",
                ),
                request_id=str(
                    uuid.uuid5(uuid.NAMESPACE_URL, f"opconnect-bench/{operator}/{tenant}")
                ),
            )
        )
    return str(made.civic_address.civic_address_id)


# --------------------------------------------------------------------------- server processes


# The one-process system as measured: as it runs by default (`system`), with its Prometheus
# metrics on (`metrics`: `metrics_listen` on a free loopback port), or with tracing on
# (`tracing`: every call traced and exported to an OTLP sink, `spec["otlp_endpoint"]`).
OBSERVED = ("system", "metrics", "tracing")


async def serve(spec: Spec, service: str = "", bare: Role | None = None) -> None:
    """The `serve` role: by `spec["kind"]`, the one-process system (`system`, `metrics`,
    `tracing`: see OBSERVED), the scenario's bare server (`bare`), an OTLP receiver that
    drops what it gets (`otlp-sink`), or one process of the split system of `service`
    (`split-<service>`, `split`)."""
    kind = spec["kind"]
    if kind in OBSERVED:
        await serve_system(spec)
    elif kind == "otlp-sink":
        await serve_otlp_sink()
    elif kind == "bare" and bare is not None:
        await bare(spec)
    elif kind in ("split", f"split-{service}") and service:
        await serve_split(spec, service)
    else:
        raise ValueError(f"no server of kind {kind!r} here")


async def serve_system(spec: Spec) -> None:
    """The one-process system of the spec (`system_settings`) with OPERATOR registered, and
    the operators of `spec["operators"]` (id -> name), all bound to the operator CA; with
    `spec["profile"]`, its loop, database threads and default executor profiled (see
    `serve_commands`)."""
    settings = system_settings(spec)
    if spec["kind"] == "metrics":
        settings = settings.replace(metrics_listen="127.0.0.1:0")
    elif spec["kind"] == "tracing":
        settings = settings.replace(otlp_endpoint=spec["otlp_endpoint"])
    configure_logging(settings.log_format, settings.log_level)
    runtime = await gateway_server.start(settings)
    anchors = ca_anchors(Path(settings.operator_ca_file).read_bytes())
    operators = {OPERATOR: "benchmark operator", **spec.get("operators", {})}
    for operator, name in operators.items():
        await runtime.registry.add(operator, name, anchors)
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


async def serve_split(spec: Spec, service: str) -> None:
    """One process of a split system (the separate-processes mode): for `spec["kind"]`
    `split-<service>`, that service alone; for `split`, the gateway alone, forwarding it to
    `spec["<service>_target"]` as the platform principal `gateway`. Same settings otherwise
    (the database, the PKI); the operator is already registered in the database."""
    settings = system_settings(spec)
    paths = PkiPaths.at(Path(spec["root"]) / "pki")
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


async def serve_bare(bare: grpc.aio.Server, spec: Spec) -> None:
    """Start `bare` on a free port with the system's mutual-TLS credentials, say `READY <port>`,
    follow the orchestrator's commands until it closes stdin, then stop."""
    paths = PkiPaths.at(Path(spec["root"]) / "pki")
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


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts the spans it is sent and keeps none."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Context
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve_otlp_sink() -> None:
    """The `otlp-sink` server: an OTLP/gRPC trace receiver on a free loopback port (plain text,
    as a collector beside the process would be), saying `READY <port>`; `SPANS` answers how
    many spans it received."""
    sink = _Sink()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY {port}", flush=True)
    async for line in commands():
        if line == "SPANS":
            print(json.dumps({"spans": sink.spans}), flush=True)
    await server.stop(1.0)


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


class ProfilingExecutor(ThreadPoolExecutor):
    """A thread pool whose work items run under `ThreadProfiles.call`."""

    def __init__(self, workers: int | None, prefix: str, profiles: ThreadProfiles) -> None:
        super().__init__(workers, thread_name_prefix=prefix)
        self._profiles = profiles

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(functools.partial(self._profiles.call, fn, *args, **kwargs))


async def serve_commands(
    profiles: ThreadProfiles | None = None, answer: Callable[[str], Any] | None = None
) -> None:
    """Follow the orchestrator's commands on stdin until it closes it.

    `profile-start` turns cProfile on (the event-loop thread, where the gRPC handlers run, and
    with `profiles` the threads of the executors); `profile-stop PATH` turns it off, writes the
    merged stats to PATH and answers `PROFILED`. Any other command goes to `answer`, whose
    return is the answer (a JSON line).
    """
    profiler: cProfile.Profile | None = None
    async for line in commands():
        command, _, argument = line.partition(" ")
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
        elif answer is not None:
            print(json.dumps(answer(line)), flush=True)


async def commands() -> AsyncIterator[str]:
    """The orchestrator's commands, a line each (stripped), until it closes stdin. Read on a
    thread of its own, not the loop's default executor (which a profiled server watches)."""
    stdin = ThreadPoolExecutor(1, thread_name_prefix="stdin")
    try:
        while line := await read_line(stdin):
            yield line.strip()
    finally:
        stdin.shutdown(wait=False)


async def read_line(executor: Executor | None = None) -> str:
    """One line of stdin without blocking the event loop ('' at end of file), read on
    `executor` (by default the loop's default executor)."""
    return await asyncio.get_running_loop().run_in_executor(executor, sys.stdin.readline)


# --------------------------------------------------------------------------- child processes


class Child:
    """The running script started again in a child process with `--role role`, driven by lines:
    commands go to its stdin, answers come from its stdout; closing its stdin tells it to finish
    (it is killed if it has not within `stop_wait_s`)."""

    def __init__(self, role: str, spec: Spec, stop_wait_s: float = 30.0) -> None:
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
    """A server of kind `kind` (`system`, `bare`, a split's) in a child process of its own
    (`--role serve`): the spec's `kind` is `kind`, and it says `READY <port>` once serving."""

    def __init__(self, kind: str, spec: Spec, stop_wait_s: float = 30.0) -> None:
        super().__init__("serve", {**spec, "kind": kind}, stop_wait_s)
        self.kind = kind
        self.port = int(self.expect("READY ").split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def profile_start(self) -> None:
        self.send("profile-start")

    def profile_stop(self, path: Path) -> None:
        self.send(f"profile-stop {path}")
        self.expect("PROFILED")


class Stoppable(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


class Children:
    """The child processes of a run (or groups of them), each stopped when the run ends, however
    it ends, in the reverse order of their starts."""

    def __init__(self) -> None:
        self.started: list[Stoppable] = []

    def add(self, child: S) -> S:
        self.started.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.started):
            child.stop()


def profiled(
    server: ServerProcess, path: Path, top: int, measure: Callable[[], T]
) -> tuple[T, str]:
    """`measure()` with cProfile on in `server` (see `serve_commands`): what it returned, and
    the `top` functions of the profile by own and by cumulative time."""
    server.profile_start()
    result = measure()
    server.profile_stop(path)
    return result, profile_text(path, top)


def in_turn(kinds: Sequence[str], round_no: int) -> list[str]:
    """`kinds` in order in odd rounds and reversed in even ones, so that a drift in the
    machine's load does not always favour the same one."""
    return list(kinds) if round_no % 2 else list(kinds)[::-1]


# --------------------------------------------------------------------------- CPU readings


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


def server_cpu_seconds(pids: Sequence[int]) -> list[float] | None:
    """CPU seconds of each server process, or None if one cannot be read."""
    readings = [cpu_seconds(pid) for pid in pids]
    return [r for r in readings if r is not None] if None not in readings else None


@dataclass(frozen=True)
class CpuUse:
    """CPU used over `seconds` of wall time, in shares of one core: this (client) process's,
    the server's (all its processes; None if unreadable) and each of its processes', and the
    whole machine's."""

    seconds: float
    client_cpu: float
    server_cpu: float | None
    server_cpu_by_process: list[float] | None
    machine_cpu: float | None

    @property
    def other_cpu(self) -> float | None:
        """Cores busy with anything but the server and this client: noise."""
        if self.machine_cpu is None or self.server_cpu is None:
            return None
        return max(0.0, self.machine_cpu - self.server_cpu - self.client_cpu)

    def figures(self) -> dict[str, Any]:
        """What a client's answer reports of it."""
        return {
            "seconds": self.seconds,
            "client_cpu": self.client_cpu,
            "server_cpu": self.server_cpu,
            "other_cpu": self.other_cpu,
        }


class CpuWindow:
    """Readings of CPU time from its making until `end`: this process's, the server processes'
    (`pids`) and the machine's."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.machine = machine_busy_seconds()
        self.client = time.process_time()
        self.servers = server_cpu_seconds(self.pids)
        self.started = time.perf_counter()

    def end(self) -> CpuUse:
        seconds = time.perf_counter() - self.started
        machine, client = machine_busy_seconds(), time.process_time()
        servers = server_cpu_seconds(self.pids)
        by_process = (
            [(b - a) / seconds for a, b in zip(self.servers, servers, strict=True)]
            if self.servers is not None and servers is not None
            else None
        )
        return CpuUse(
            seconds=seconds,
            client_cpu=(client - self.client) / seconds,
            server_cpu=sum(by_process) if by_process is not None else None,
            server_cpu_by_process=by_process,
            machine_cpu=(machine - self.machine) / seconds
            if machine is not None and self.machine is not None
            else None,
        )


# --------------------------------------------------------------------------- client streams


async def write_windowed(
    call: Any, requests: Sequence[Any], in_flight: int, answered: Callable[[Any], None]
) -> None:
    """Write `requests` on the bidirectional stream `call` with at most `in_flight` of them
    unanswered (one response per request), calling `answered` with each response; then close
    the writing side and wait for the last response."""
    window = asyncio.Semaphore(in_flight)

    async def read() -> None:
        async for response in call:
            answered(response)
            window.release()

    reader = asyncio.create_task(read())
    for request in requests:
        await window.acquire()
        if reader.done():
            break
        await call.write(request)
    await call.done_writing()
    await reader
