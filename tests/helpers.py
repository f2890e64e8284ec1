"""Helpers shared by the test modules (which never import one another): waiting for an event,
feeding a client stream, the clients' common calls per service, and systems started in shapes of
their own (a usage service following the call feed, the separate-processes mode), scraping a
process's metrics, and a real Prometheus server to scrape them. Fixtures live in conftest.py;
call records and duration records to send in records_data.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, cast

import pytest
import sqlalchemy as sa
from alembic import command
from prometheus_client.parser import text_string_to_metric_families

from app.cli import main
from gateway import pki
from gateway.registry import OperatorStatus
from opconnect.numbers.v1 import numbers_pb2
from opconnect.usage.v1 import usage_pb2, usage_pb2_grpc
from plumbing import partitions, tokens
from plumbing.config import Settings
from plumbing.db import alembic_config
from services.records import storage as records_storage
from services.usage import feed
from services.usage import tables as usage_tables
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    SUSPENDED_OPERATOR,
    TENANT,
    USER_ID,
    Pki,
    RunningSystem,
    settings_for,
    start_system,
)

T = TypeVar("T")
M = TypeVar("M")

# --- waiting for an event --------------------------------------------------------------------


def poll(
    read: Callable[[], T], until: Callable[[T], bool], timeout: float = 10, interval: float = 0.02
) -> T:
    """Call `read` every `interval` seconds until `until` holds for what it returns or `timeout`
    seconds pass; the last value read (so that an assertion on it shows what was seen)."""
    deadline = time.monotonic() + timeout
    while not until(value := read()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until `check()` is true; fail when `timeout` seconds pass first."""
    name = getattr(check, "__qualname__", repr(check))
    assert poll(check, bool, timeout), f"{name} was still false after {timeout} s"


def moment() -> dt.datetime:
    """A moment strictly after every reading of the clock before the call and strictly before
    every reading after it (it waits the microsecond or two the clock takes to move on)."""
    before = dt.datetime.now(dt.UTC)
    while (now := dt.datetime.now(dt.UTC)) <= before:
        pass
    while dt.datetime.now(dt.UTC) <= now:
        pass
    return now


# --- client streams ----------------------------------------------------------------------------


class Feed(Generic[M]):
    """Request messages handed to a client stream one at a time, by the test."""

    def __init__(self) -> None:
        self._queue: queue.Queue[M | None] = queue.Queue()

    def send(self, message: M) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[M]:
        while (message := self._queue.get()) is not None:
            yield message


# --- numbers -----------------------------------------------------------------------------------

USER = numbers_pb2.NUMBER_USAGE_USER
BOTH = numbers_pb2.Capabilities(inbound=True, outbound=True)


def upload(
    system: RunningSystem,
    *numbers: str,
    tenant: str = TENANT,
    usage: numbers_pb2.NumberUsage.ValueType = USER,
) -> numbers_pb2.UploadNumbersResponse:
    request = numbers_pb2.UploadNumbersRequest(
        tenant_id=tenant,
        numbers=[number_upload(system, n, tenant, usage) for n in numbers],
    )
    return cast(numbers_pb2.UploadNumbersResponse, system.numbers().UploadNumbers(request))


def number_upload(
    system: RunningSystem,
    number: str,
    tenant: str = TENANT,
    usage: numbers_pb2.NumberUsage.ValueType = USER,
    operator: str = OPERATOR,
) -> numbers_pb2.NumberUpload:
    """One number to upload as OPERATOR: a USER number with the tenant's test address
    (conftest's `grant_addresses`), or, for a tenant without one, letting the customer set it."""
    upload = numbers_pb2.NumberUpload(phone_number=number, usage=usage, capabilities=BOTH)
    if usage == USER:
        address = system.addresses.get((operator, tenant))
        if address is not None:
            upload.civic_address_id = address
        else:
            upload.allow_tenant_address_update = True
    return upload


def assign(
    system: RunningSystem,
    number: str,
    sip: str = "sip:+14255550100@sbc1.contoso.example;user=phone",
    tenant: str = TENANT,
) -> numbers_pb2.AssignNumberResponse:
    response = system.admin().AssignNumber(
        numbers_pb2.AssignNumberRequest(
            phone_number=number,
            tenant_id=tenant,
            sip_uri=sip,
            target=numbers_pb2.AssignmentTarget(
                kind=numbers_pb2.AssignmentTarget.KIND_USER, id=USER_ID
            ),
        )
    )
    return cast(numbers_pb2.AssignNumberResponse, response)


# --- usage -------------------------------------------------------------------------------------


def usage_stub(system: RunningSystem, operator: str = OPERATOR) -> usage_pb2_grpc.UsageServiceStub:
    return usage_pb2_grpc.UsageServiceStub(system.channel("operator", operator))


def submit(
    stub: usage_pb2_grpc.UsageServiceStub, *batches: list[usage_pb2.CallDurationRecord]
) -> list[usage_pb2.SubmitCallDurationsResponse]:
    """Submit batches on one stream; the responses, one per batch."""
    requests = (
        usage_pb2.SubmitCallDurationsRequest(batch_id=f"b{i}", records=batch)
        for i, batch in enumerate(batches)
    )
    return list(stub.SubmitCallDurations(requests, timeout=30))


def stored(system: RunningSystem, operator: str = OPERATOR) -> list[str]:
    """The record ids the operator has stored."""

    def read(session: sa.orm.Session) -> list[str]:
        c = usage_tables.DURATIONS.c
        query = sa.select(c.record_id).where(c.operator_id == operator).order_by(c.record_id)
        return list(session.scalars(query))

    return system.call(system.runtime.db.run(read))


def feed_system(test_pki: Pki, directory: Path, url: str | None = None) -> RunningSystem:
    """A system whose usage service follows the call feed as the test PKI's platform client."""
    cert, key = test_pki.paths.client("platform-admin-center")
    settings = settings_for(
        directory,
        test_pki.paths,
        url or f"sqlite:///{directory / 'opconnect.db'}",
        feed_ca_file=str(test_pki.paths.ca_cert),
        feed_cert_file=str(cert),
        feed_key_file=str(key),
    )
    return start_system(settings, test_pki)


def kept(system: RunningSystem) -> dict[str, dict[str, Any]]:
    """The platform's calls the usage service has learnt from the feed, by call id."""

    def read(session: sa.orm.Session) -> dict[str, dict[str, Any]]:
        rows = session.execute(sa.select(usage_tables.PLATFORM_CALLS)).mappings()
        return {row["call_id"]: dict(row) for row in rows}

    return system.call(system.runtime.db.run(read))


async def start_follower(follower: feed.CallFeedFollower) -> None:
    """Start a call feed follower (on the system's loop: `system.call(start_follower(...))`)."""
    follower.start()


# --- the separate-processes mode ---------------------------------------------------------------


@dataclass
class Split:
    gateway: RunningSystem
    numbers: RunningSystem
    records: RunningSystem
    usage: RunningSystem
    gateway_settings: Settings

    def services(self) -> list[RunningSystem]:
        return [self.numbers, self.records, self.usage]

    def stop(self) -> None:
        for system in (self.gateway, *self.services()):
            system.stop()


def start_split(test_pki: Pki, directory: Path, url: str, **changes: Any) -> Split:
    """The three service processes and a gateway in front of them, on one database (every
    process with the settings `changes`)."""
    paths = test_pki.paths
    gateway_cert, gateway_key = pki.issue_client(paths, "platform", "gateway")
    usage_cert, usage_key = pki.issue_client(paths, "platform", "usage")
    base = settings_for(directory, paths, url, **changes)
    numbers = RunningSystem(base, test_pki, "numbers")
    records = RunningSystem(base, test_pki, "records")
    usage = RunningSystem(
        base.replace(
            records_target=records.address,
            feed_ca_file=str(paths.ca_cert),
            feed_cert_file=str(usage_cert),
            feed_key_file=str(usage_key),
        ),
        test_pki,
        "usage",
    )
    gateway_settings = base.replace(
        numbers_target=numbers.address,
        records_target=records.address,
        usage_target=usage.address,
        internal_ca_file=str(paths.ca_cert),
        internal_cert_file=str(gateway_cert),
        internal_key_file=str(gateway_key),
    )
    gateway = RunningSystem(gateway_settings, test_pki, "gateway")
    registry = gateway.runtime.registry
    for ident in (OPERATOR, OTHER_OPERATOR, SUSPENDED_OPERATOR):
        gateway.call(registry.add(ident, "", test_pki.anchors()))
    gateway.call(registry.set_status(SUSPENDED_OPERATOR, OperatorStatus.SUSPENDED))
    return Split(gateway, numbers, records, usage, gateway_settings)


def start_two(
    test_pki: Pki, directory: Path, url: str, **changes: Any
) -> tuple[RunningSystem, RunningSystem]:
    """Two one-process replicas on one PostgreSQL database (`url`), sharing the deployment's
    token keys, each with the settings `changes`; returned once both are listening for the
    other's changes."""
    changes.setdefault("token_keys", tokens.new_key())
    pair = tuple(
        start_system(settings_for(directory / name, test_pki.paths, url, **changes), test_pki)
        for name in ("a", "b")
    )
    for running in pair:
        listener = running.runtime.listener
        assert listener is not None
        running.call(listener.ready.wait(), timeout=10)
    return pair[0], pair[1]


def several(systems: Sequence[RunningSystem]) -> str:
    """A gRPC target naming every one of `systems` (replicas: calls spread by round_robin)."""
    return "ipv4:" + ",".join(f"127.0.0.1:{system.runtime.port}" for system in systems)


@dataclass
class Replicas:
    """The separate-processes mode with several replicas of each role on one database."""

    gateways: list[RunningSystem]
    numbers: list[RunningSystem]
    records: list[RunningSystem]
    usage: list[RunningSystem]
    gateway_settings: Settings

    def processes(self) -> list[RunningSystem]:
        return [*self.gateways, *self.numbers, *self.records, *self.usage]

    def stop(self) -> None:
        for system in self.processes():
            if system.loop.is_running():
                system.stop()


def start_replicas(
    test_pki: Pki, directory: Path, url: str, count: int = 2, **changes: Any
) -> Replicas:
    """`count` processes of each role on one database: each gateway routes every service to
    all of its replicas (one target naming them all), each usage process follows the call feed
    of every records process; every process with the settings `changes` (and its metrics on a
    port of its own)."""
    paths = test_pki.paths
    gateway_cert, gateway_key = pki.issue_client(paths, "platform", "gateway")
    usage_cert, usage_key = pki.issue_client(paths, "platform", "usage")
    base = settings_for(directory, paths, url, metrics_listen="127.0.0.1:0", **changes)
    numbers = [RunningSystem(base, test_pki, "numbers") for _ in range(count)]
    records = [RunningSystem(base, test_pki, "records") for _ in range(count)]
    usage_settings = base.replace(
        records_target=several(records),
        feed_ca_file=str(paths.ca_cert),
        feed_cert_file=str(usage_cert),
        feed_key_file=str(usage_key),
    )
    usage = [RunningSystem(usage_settings, test_pki, "usage") for _ in range(count)]
    gateway_settings = base.replace(
        numbers_target=several(numbers),
        records_target=several(records),
        usage_target=several(usage),
        internal_ca_file=str(paths.ca_cert),
        internal_cert_file=str(gateway_cert),
        internal_key_file=str(gateway_key),
    )
    gateways = [RunningSystem(gateway_settings, test_pki, "gateway") for _ in range(count)]
    registry = gateways[0].runtime.registry
    for ident in (OPERATOR, OTHER_OPERATOR, SUSPENDED_OPERATOR):
        gateways[0].call(registry.add(ident, "", test_pki.anchors()))
    gateways[0].call(registry.set_status(SUSPENDED_OPERATOR, OperatorStatus.SUSPENDED))
    return Replicas(gateways, numbers, records, usage, gateway_settings)


# --- a real pgbouncer ----------------------------------------------------------------------------

NO_PGBOUNCER = "pgbouncer is not installed (Debian's `pgbouncer` package, which .ci/run installs)"


class PgBouncer:
    """A pgbouncer of a test's own in transaction pooling mode, on a free port, in front of the
    PostgreSQL server of `server_url`: its database `test` is the server's, each new server
    connection set to `schema` (pgbouncer refuses the `options` startup parameter the tests'
    URLs use). `url` is how a client reaches it. It runs as `nobody` when started by root (it
    refuses to run as root), from a directory of its own, removed when stopped."""

    def __init__(self, server_url: str, schema: str) -> None:
        binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
        if binary is None:
            pytest.skip(NO_PGBOUNCER)
        server = sa.make_url(server_url)
        self.directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.directory.chmod(0o755)  # readable by the user it runs as
        users = self.directory / "users.txt"
        users.write_text(f'"{server.username}" ""\n')
        port = free_port()
        config = self.directory / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"test = host={server.host} port={server.port or 5432} dbname={server.database}"
            f" connect_query='SET search_path TO {schema}'\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 500\n"
            "logfile =\npidfile =\n"
        )
        for path in (users, config):
            path.chmod(0o644)
        self.url = f"postgresql+psycopg://{server.username}@127.0.0.1:{port}/test"
        self.log = self.directory / "pgbouncer.log"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, *user, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not poll(lambda: self._ready(port), bool, timeout=30, interval=0.05):
            self.stop()
            raise AssertionError(f"pgbouncer did not start: {self.log.read_text()[-2000:]}")

    def _ready(self, port: int) -> bool:
        assert self.process.poll() is None, f"pgbouncer exited: {self.log.read_text()[-2000:]}"
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        end_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


# --- PKI layouts -------------------------------------------------------------------------------


def make_one_ca_pki(directory: Path) -> pki.Issued:
    """A development PKI as it was before the operator, platform and gateway CAs: one CA
    (returned) signing the server certificate and the development client pairs."""
    clients = directory / "clients"
    clients.mkdir(parents=True)
    old = pki.create_ca("opconnect dev CA")
    pki.write_public(directory / "ca.pem", old.cert_pem)
    pki.write_private(directory / "ca.key", old.key_pem)
    server = pki.issue_server_cert(old, ["localhost"], ["127.0.0.1", "::1"])
    pki.write_public(directory / "server.pem", server.cert_pem)
    pki.write_private(directory / "server.key", server.key_pem)
    for name, uri in [
        ("operator-contoso-telecom", pki.operator_uri("contoso-telecom")),
        ("platform-admin-center", pki.platform_uri("admin-center")),
    ]:
        pair = pki.issue_client_cert(old, uri)
        pki.write_public(clients / f"{name}.pem", pair.cert_pem)
        pki.write_private(clients / f"{name}.key", pair.key_pem)
    pki.write_public(directory / "revoked.json", b"[]\n")
    pki.write_public(directory / "crl.pem", pki.make_crl(old, []))
    return old


# --- metrics -----------------------------------------------------------------------------------

Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(system: RunningSystem) -> dict[Sample, float]:
    """One scrape of a running process's metrics endpoint: every sample by name and labels."""
    endpoint = system.runtime.metrics_endpoint
    assert endpoint is not None, "metrics_listen is not set"
    with urllib.request.urlopen(endpoint.url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """The value of the one sample `name` with exactly `labels` (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def samples_of(samples: dict[Sample, float], name: str, **labels: str) -> dict[Sample, float]:
    """Every sample `name` whose labels include `labels`."""
    want = set(labels.items())
    return {key: value for key, value in samples.items() if key[0] == name and want <= key[1]}


def end_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server the test started: terminated, killed if still there after 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# --- a real Prometheus -------------------------------------------------------------------------

NO_PROMETHEUS = "is not installed (Debian's `prometheus` package, which .ci/run installs)"


def prometheus_tool(name: str) -> str:
    """The path of `prometheus` or `promtool`; skips the test where it is not installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/bin")
    if found is None:
        pytest.skip(f"{name} {NO_PROMETHEUS}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Series = tuple[dict[str, str], float]


class Prometheus:
    """A Prometheus server of a test's own: it scrapes the metrics endpoints given (as job
    `opconnect`, each labelled with its role, as deploy/prometheus/prometheus.yml does) every
    second and evaluates the rule files given every second; its HTTP API answers queries."""

    def __init__(
        self, directory: Path, targets: dict[str, list[str]], rule_files: list[Path]
    ) -> None:
        binary = prometheus_tool("prometheus")
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(  # JSON is YAML
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(path) for path in rule_files],
                    "scrape_configs": [
                        {
                            "job_name": "opconnect",
                            "scrape_timeout": "1s",
                            "static_configs": [
                                {"targets": hosts, "labels": {"role": role}}
                                for role, hosts in targets.items()
                            ],
                        }
                    ],
                }
            )
        )
        self.log = directory / "prometheus.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not poll(self._ready, bool, timeout=60, interval=0.1):
            self.stop()
            raise AssertionError(f"prometheus did not start: {self.log.read_text()[-2000:]}")

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The `data` of an answer of the HTTP API (`/api/v1/...`)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Series]:
        """An instant query's answer: each series' labels and value."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, expr: str) -> float | None:
        """The value of an instant query that answers one series (None: it answers none)."""
        found = self.query(expr)
        assert len(found) <= 1, f"{expr} answered {found}"
        return found[0][1] if found else None

    def wait_for(
        self, expr: str, until: Callable[[float | None], bool], timeout: float = 60
    ) -> float | None:
        """The value of `expr` once `until` holds for it (scrapes are every second), or the last
        one seen after `timeout` seconds."""
        return poll(lambda: self.value(expr), until, timeout, interval=0.25)

    def value_when(self, expr: str, want: float, timeout: float = 60) -> float | None:
        """The value of `expr` once it is `want`, or the last one seen after `timeout` seconds."""
        return self.wait_for(expr, lambda value: value == want, timeout)

    def stop(self) -> None:
        end_process(self.process)


def metrics_target(system: RunningSystem) -> str:
    """host:port of a process's metrics endpoint, as Prometheus scrapes it."""
    endpoint = system.runtime.metrics_endpoint
    assert endpoint is not None, "metrics_listen is not set"
    return f"{endpoint.address}:{endpoint.port}"


def age_records(system: RunningSystem, call_ids: list[str], days: float) -> None:
    """Make records (and their streams) look published `days` ago (as if the clock had moved
    on). On PostgreSQL the partitions of that time are made first, as they were then."""
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    records, streams = records_storage.RECORDS, records_storage.STREAMS

    def update(session: sa.orm.Session) -> None:
        if session.get_bind().dialect.name == "postgresql":
            partitions.create_ahead(session, partitions.RECORDS, then, 0)
        chosen = sa.select(records.c.position).where(records.c.call_id.in_(call_ids))
        positions = list(session.scalars(chosen))
        for table in (records, streams):
            session.execute(
                sa.update(table).where(table.c.position.in_(positions)).values(publish_time=then)
            )
        keys = records_storage.KEYS  # their keys too (PostgreSQL's; SQLite's table is empty)
        session.execute(
            sa.update(keys).where(keys.c.call_id.in_(call_ids)).values(publish_time=then)
        )

    system.call(system.runtime.db.run(update, write=True))


# --- a server process to kill, a PostgreSQL server to stop ---------------------------------------


class ServerProcess:
    """`opconnect serve` (the whole system) in a process of its own, on `data_dir` (its SQLite
    database and development PKI there, unless `database_url` names another database), on
    `port` (0: any free one; give the same port again to restart it where clients expect it).
    `kill()` is SIGKILL: no graceful stop, no flush."""

    def __init__(self, data_dir: Path, port: int = 0, database_url: str = "") -> None:
        env = {
            **os.environ,
            "OPCONNECT_DATA_DIR": str(data_dir),
            "OPCONNECT_LISTEN": f"127.0.0.1:{port}",
            "OPCONNECT_LOG_FORMAT": "json",
            "OPCONNECT_LOG_LEVEL": "warning",
            "OPCONNECT_HEARTBEAT_INTERVAL_S": "0.5",
        }
        if database_url:
            env["OPCONNECT_DATABASE_URL"] = database_url
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"opconnect is serving on (\S+)", line)
            if found:
                # Keep reading its output, so that a full pipe never blocks the server.
                threading.Thread(target=self.process.stderr.read, daemon=True).start()
                self.address = found.group(1)
                self.port = int(self.address.rsplit(":", 1)[1])
                return
            if not line and self.process.poll() is not None:
                break
        self.process.kill()
        raise AssertionError("serve never said where it listens")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


NO_POSTGRES_SERVER = "PostgreSQL's server programs (initdb, pg_ctl) are not installed"


class PrivatePostgres:
    """A PostgreSQL server of a test's own (initdb in a temporary directory, on a free port), so
    that the test may stop it (`stop()`: immediate, as a crash or a lost host looks to clients)
    and start it again on the same port and data. It runs as `postgres` when the tests run as
    root (PostgreSQL refuses root). `url` is its database `postgres`. fsync is off (a stopped
    server keeps what the operating system holds); commits stay synchronous, so a commit a
    client was told of survives the stop, as on a real server."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            pytest.skip(NO_POSTGRES_SERVER)
        self.bin = found[-1].parent
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.directory = Path(tempfile.mkdtemp(prefix="private-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin / program), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{program}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


# --- migrations -------------------------------------------------------------------------------


def migrate(url: str, revision: str, *, down: bool = False) -> None:
    """Migrate the database at `url` up (or `down`) to `revision`, as a deployment does."""
    engine = sa.create_engine(url)
    config = alembic_config(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


# --- the operator's command line -------------------------------------------------------------


def connect(system: RunningSystem) -> list[str]:
    cert, key = system.pki.paths.client(f"operator-{OPERATOR}")
    return [
        "operator",
        *("--target", system.address),
        *("--ca", str(system.pki.paths.ca_cert)),
        *("--cert", str(cert)),
        *("--key", str(key)),
    ]


def said(err: str) -> str:
    """What the command said on stderr, without the test server's JSON logs (the server runs in
    the test's process and logs there too)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("{"))


def run_json(
    system: RunningSystem, capsys: pytest.CaptureFixture[str], *args: str, status: int = 0
) -> list[dict[str, Any]]:
    """Run a command with `--output json`; the JSON lines it printed (stdout is JSON only)."""
    capsys.readouterr()
    assert main([*connect(system), *args, "--output", "json"]) == status
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def cli_process(system: RunningSystem, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """The `opconnect` command in a process of its own, against the test's server."""
    env = {
        **os.environ,
        "OPCONNECT_DATA_DIR": str(tmp_path / "cli"),
        "OPCONNECT_LOG_FORMAT": "json",
        "OPCONNECT_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [*INTERRUPTIBLE_CLI, *connect(system), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# The operator CLI as a child process that a test's SIGINT reaches as a terminal's Ctrl-C reaches
# a program: a child inherits an ignored or blocked SIGINT from the test process, and Python then
# never raises KeyboardInterrupt (a test's Ctrl-C, sent while the suite ran on pytest-xdist
# workers, went unheard). So it sets SIGINT's Python handler and unblocks it, then runs
# `python -m app.cli` (no preexec_fn: unsafe in a process with threads).
def interruptible(code: str) -> list[str]:
    """`python -c code`, with SIGINT's Python handler set and SIGINT unblocked first."""
    return [
        sys.executable,
        "-c",
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
        f" signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}}); {code}",
    ]


INTERRUPTIBLE_CLI = interruptible(
    "import runpy; runpy.run_module('app.cli', run_name='__main__', alter_sys=True)"
)


def read_line(stream: IO[str] | None) -> dict[str, object]:
    assert stream is not None
    line = stream.readline()
    assert line, "the command ended"
    parsed: dict[str, object] = json.loads(line)
    return parsed


def write_csv(
    path: Path, rows: list[list[str]], header: str = "phone_number,usage,inbound,outbound"
) -> None:
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
