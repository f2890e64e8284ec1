"""Fixtures: a PKI made for the test run, databases (SQLite always, PostgreSQL when
OPCONNECT_TEST_POSTGRES_URL is set), and the whole system started in-process on port 0 over real
mutual TLS, driven by ordinary (synchronous) gRPC clients as an operator's would be."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import pytest
import sqlalchemy as sa
import structlog
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from app import runtime as server
from gateway import pki
from gateway.registry import Anchor, OperatorStatus, ca_anchors
from opconnect.numbers.v1 import civic_addresses_pb2, numbers_pb2, numbers_pb2_grpc
from opconnect.records.v1 import records_pb2_grpc
from plumbing import partitions, tokens
from plumbing.audit import AuditLog
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.logs import configure_logging
from services.numbers import address_storage, consent_storage, convert
from services.numbers.addresses import Author, CivicAddress, check_address
from services.numbers.consents import Actor, ConsentState, Move, Reason
from services.records.service import Records
from services.usage.service import Usage

T = TypeVar("T")
R = TypeVar("R")
POSTGRES_URL = os.environ.get("OPCONNECT_TEST_POSTGRES_URL", "")
NO_POSTGRES = "OPCONNECT_TEST_POSTGRES_URL is not set (CI sets it; PostgreSQL on 127.0.0.1:5432)"

TENANT = "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"
OTHER_TENANT = "0b5e2c1d-3a4f-4e6d-8c7b-9a0f1e2d3c4b"
USER_ID = "11111111-2222-4333-8444-555555555555"

# Tests that seal or open tokens with no server started (some while collected) use a key of their
# own; a server's start-up installs its deployment's keys instead.
tokens.install(tokens.Keyring.generate())

# No timing assertions, hypothesis's own included: its per-example deadline and its "too slow"
# health check fail a correct test on a loaded machine (two pytest workers beside a database on
# two cores), so neither applies to any test (a test's own @settings keeps its other choices).
hypothesis_settings.register_profile(
    "opconnect", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("opconnect")

# Client identities the test PKI issues (by its operator and platform CAs unless named
# "foreign"); every operator registered is bound to the operator CA.
OPERATOR = "contoso-telecom"
OTHER_OPERATOR = "fabrikam"
UNKNOWN_OPERATOR = "unknown-op"
SUSPENDED_OPERATOR = "suspended-op"
REVOKED_OPERATOR = "revoked-op"
PLATFORM = "admin-center"


@dataclass(frozen=True)
class Pki:
    paths: pki.PkiPaths
    foreign_ca: pki.Issued
    foreign_client: pki.Issued  # names OPERATOR, signed by a CA the server does not trust

    def client(self, kind: str, ident: str) -> tuple[bytes, bytes]:
        cert, key = self.paths.client(f"{kind}-{ident}")
        return cert.read_bytes(), key.read_bytes()

    def anchors(self) -> list[Anchor]:
        """The operator CA, as the anchor operators are registered with."""
        return ca_anchors(self.paths.operator_ca_cert.read_bytes())


def make_test_pki(directory: Path) -> Pki:
    paths = pki.ensure_dev_pki(directory, operator_id=OPERATOR, platform_name=PLATFORM)
    for ident in (OTHER_OPERATOR, UNKNOWN_OPERATOR, SUSPENDED_OPERATOR, REVOKED_OPERATOR):
        pki.issue_client(paths, "operator", ident)
    revoked_cert, _ = paths.client(f"operator-{REVOKED_OPERATOR}")
    pki.revoke(paths, revoked_cert.read_bytes())
    foreign = pki.create_ca("someone else's CA")
    foreign_client = pki.issue_client_cert(foreign, pki.operator_uri(OPERATOR))
    return Pki(paths, foreign, foreign_client)


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Servers in tests log warnings and errors only (as JSON on stderr, redacted)."""
    configure_logging("json", "warning")


@pytest.fixture(scope="session")
def session_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def own_pki(session_pki: Pki, tmp_path: Path) -> Pki:
    """A copy of the test PKI that a test may change (revoke, rotate)."""
    directory = tmp_path / "pki"
    shutil.copytree(session_pki.paths.directory, directory)
    return Pki(pki.PkiPaths.at(directory), session_pki.foreign_ca, session_pki.foreign_client)


# The test schemas of this session, dropped when it ends (`_drop_test_schemas`): each holds
# hundreds of tables and partitions, which would otherwise pile up in the database run after run.
# A schema's name carries the minute it was made, so that a later session can drop those an
# interrupted one left behind.
SCHEMA_PREFIX = "t_"
SCHEMA_STALE_S = 12 * 3600  # older than any session could run
_made_schemas: list[str] = []


def _test_name() -> str:
    """A new schema name: the prefix, the minute (hex) and a random tail."""
    return f"{SCHEMA_PREFIX}{int(time.time() // 60):x}_{uuid.uuid4().hex[:8]}"


def reset_postgres(url: str) -> str:
    """A fresh, empty schema of its own for one test; returns the URL that uses it (what the
    tests of the migrations themselves start from)."""
    schema = _test_name()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    _made_schemas.append(schema)
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


# What a migrated schema holds, read from the first one a session makes: its relations (name,
# kind; the tables' columns), its tables (not partitions, not alembic_version), the rows the
# migrations seeded, its sequences.
_SHAPE = sa.text(
    "SELECT c.relname, c.relkind, COALESCE(string_agg(a.attname || ' ' ||"
    " format_type(a.atttypid, a.atttypmod), ',' ORDER BY a.attnum), '')"
    " FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
    " AND NOT a.attisdropped AND c.relkind IN ('r', 'p')"
    " WHERE c.relnamespace = CAST(current_schema() AS regnamespace)"
    " GROUP BY c.relname, c.relkind ORDER BY c.relname"
)


@dataclass(frozen=True)
class _Migrated:
    shape: tuple[tuple[str, str, str], ...]
    tables: tuple[str, ...]
    seeded: dict[str, list[tuple[Any, ...]]]
    sequences: tuple[str, ...]


_migrated: list[_Migrated] = []  # the session's, once read
_free_schemas: list[str] = []  # migrated schemas of this process, emptied, for the next test


def _in_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def _read_migrated(conn: sa.Connection) -> _Migrated:
    shape = tuple((str(n), str(k), str(c)) for n, k, c in conn.execute(_SHAPE))
    tables = tuple(
        n for n, k, _ in shape if k in ("r", "p") and n != "alembic_version" and not _partition(n)
    )
    # Rows referring to others are deleted first: a table after every table whose rows refer to
    # it by a foreign key.
    refers = conn.execute(
        sa.text(
            "SELECT DISTINCT a.relname, b.relname FROM pg_constraint k"
            " JOIN pg_class a ON a.oid = k.conrelid JOIN pg_class b ON b.oid = k.confrelid"
            " WHERE k.contype = 'f' AND k.connamespace = CAST(current_schema() AS regnamespace)"
        )
    ).all()
    ordered: list[str] = []
    while len(ordered) < len(tables):
        ready = [
            t
            for t in tables
            if t not in ordered
            and all(a in ordered or a == t for a, b in refers if b == t and not _partition(a))
        ]
        ordered += ready or [t for t in tables if t not in ordered]  # a cycle: as they come
    tables = tuple(ordered)
    seeded = {t: [tuple(r) for r in conn.execute(sa.text(f'SELECT * FROM "{t}"'))] for t in tables}
    sequences = tuple(n for n, k, _ in shape if k == "S")
    return _Migrated(shape, tables, {t: rows for t, rows in seeded.items() if rows}, sequences)


def _partition(name: str) -> bool:
    """A time partition's name (`plumbing.partitions.partition_name`)."""
    return re.search(r"_p\d{8}$", name) is not None


def migrated_postgres(url: str) -> str:
    """A schema of its own for one test, migrated to the newest migration with its time
    partitions made as the services make them at start-up (back to the usage retention, and
    ahead): one a test before had, emptied since (`release_postgres`), or else a new one."""
    if _free_schemas:
        return _in_schema(url, _free_schemas.pop())
    schema_url = reset_postgres(url)
    database = Database(schema_url, threads=1)
    try:
        database.migrate()
        now, retention = dt.datetime.now(dt.UTC), Settings().usage_retention_s
        partitions.create_all_ahead(database, now, retention)
        if not _migrated:
            with database.engine.connect() as conn:
                _migrated.append(_read_migrated(conn))
    finally:
        database.close()
    return schema_url


def release_postgres(url: str) -> None:
    """A test is done with its `migrated_postgres` schema: emptied back to what the migrations
    left (every table's rows deleted, the seeded ones put back, the sequences restarted) and
    kept for the next test, unless anything else in it differs from a migrated schema (a
    partition made or dropped, a table changed), or it cannot be had at once: then it is left
    to be dropped at the session's end. DELETE, not TRUNCATE: a test leaves a few rows in a
    few of the hundreds of partitions, and TRUNCATE makes every one of them anew (seconds)."""
    schema = url.rpartition("search_path%3D")[2]
    migrated = _migrated[0]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            if tuple(tuple(str(v) for v in row) for row in conn.execute(_SHAPE)) != (
                migrated.shape
            ):
                return
            for table in migrated.tables:
                conn.execute(sa.text(f'DELETE FROM "{table}"'))
            for table, rows in migrated.seeded.items():
                marks = ", ".join(f":c{i}" for i in range(len(rows[0])))
                conn.execute(
                    sa.text(f'INSERT INTO "{table}" VALUES ({marks})'),
                    [{f"c{i}": value for i, value in enumerate(row)} for row in rows],
                )
            for sequence in migrated.sequences:
                conn.execute(sa.text(f'ALTER SEQUENCE "{sequence}" RESTART'))
    except sa.exc.DBAPIError as error:  # still in use: dropped at the end
        print(f"test schema {schema} not reused: {str(error.orig).strip()[:120]}")
        return
    finally:
        engine.dispose()
    _free_schemas.append(schema)


def _stale(schema: str, now: float) -> bool:
    """A test schema left behind by a session that could not drop it: made more than
    SCHEMA_STALE_S ago, or named as before names carried their minute."""
    minute, _, rest = schema.removeprefix(SCHEMA_PREFIX).partition("_")
    if not rest:
        return len(minute) == 12  # the old form, t_<12 hex digits>
    try:
        return now - int(minute, 16) * 60 > SCHEMA_STALE_S
    except ValueError:
        return False


def _drop_schemas(url: str, schemas: list[str]) -> None:
    engine = sa.create_engine(url)
    try:
        for schema in schemas:
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
                    conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            except sa.exc.DBAPIError as error:  # still in use: a later session drops it
                print(f"test schema {schema} not dropped: {str(error.orig).strip()[:120]}")
    finally:
        engine.dispose()


@pytest.fixture(scope="session", autouse=True)
def _drop_test_schemas() -> Iterator[None]:
    """Drop the stale test schemas of earlier sessions at the start, this session's at the
    end."""
    if not POSTGRES_URL:
        yield
        return
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            names = conn.execute(
                sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%'")
            ).scalars()
            stale = [name for name in names if _stale(name, time.time())]
    finally:
        engine.dispose()
    _drop_schemas(POSTGRES_URL, stale)
    yield
    _drop_schemas(POSTGRES_URL, _made_schemas)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend: SQLite, and PostgreSQL (skipped, saying why, when it is not set)."""
    if request.param == "postgres" and not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> str:
    """An empty database of each backend (what the tests of the migrations start from)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'opconnect.db'}"
    return reset_postgres(POSTGRES_URL)


@pytest.fixture
def migrated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database of each backend migrated to the newest migration (on PostgreSQL with its
    time partitions: `migrated_postgres`, emptied for the next test when this one ends).
    SQLite's is made empty: migrating it takes a fraction of a second, and whatever uses it
    migrates first."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'opconnect.db'}"
        return
    url = migrated_postgres(POSTGRES_URL)
    yield url
    release_postgres(url)


@pytest.fixture
def db(migrated_url: str) -> Iterator[Database]:
    """A migrated database of each backend (on PostgreSQL with its time partitions made, as the
    services make them at start-up: back to the usage retention, and ahead)."""
    database = Database(migrated_url, threads=4)
    database.migrate()
    if database.engine.dialect.name == "postgresql":
        now, retention = dt.datetime.now(dt.UTC), Settings().usage_retention_s
        partitions.create_all_ahead(database, now, retention)
    yield database
    database.close()


@pytest.fixture(scope="module")
def fuzz_system(
    session_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningSystem]:
    """One system on SQLite for a module of hypothesis tests, with no rate limit (they send
    many requests)."""
    directory = tmp_path_factory.mktemp("fuzz")
    running = start_system(
        settings_for(
            directory,
            session_pki.paths,
            f"sqlite:///{directory / 'opconnect.db'}",
            rate_per_operator=1e9,
            rate_burst=1_000_000_000,
        ),
        session_pki,
    )
    yield running
    running.stop()


def settings_for(
    tmp_path: Path, paths: pki.PkiPaths, database_url: str, **changes: Any
) -> Settings:
    base = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        listen="127.0.0.1:0",
        tls_cert_file=str(paths.server_cert),
        tls_key_file=str(paths.server_key),
        operator_ca_file=str(paths.operator_ca_cert),
        platform_ca_file=str(paths.platform_ca_cert),
        gateway_ca_file=str(paths.gateway_ca_cert),  # the service processes' pinned gateway
        crl_file=str(paths.crl),
        reload_interval_s=0.05,
        registry_cache_s=0.0,
        heartbeat_interval_s=0.5,
        log_format="json",
        log_level="warning",
    )
    return base.replace(**changes)


# The consents every test system starts with (ACTIVE, through the state machine): uploading
# numbers needs one, and tests of other things upload for these tenants. Tests of consents use
# tenants of their own.
CONSENTED = tuple((o, t) for o in (OPERATOR, OTHER_OPERATOR) for t in (TENANT, OTHER_TENANT))


def grant_consents(database: Database, pairs: tuple[tuple[str, str], ...] = CONSENTED) -> None:
    """Request (as the customer) and accept (as the operator) a consent for each (operator,
    tenant); a consent already ACTIVE is left as it is."""
    request = Move(ConsentState.REQUESTED, Reason.NONE, Actor.CUSTOMER)
    accept = Move(ConsentState.ACTIVE, Reason.NONE, Actor.OPERATOR)
    for operator, tenant in pairs:
        for move in (request, accept):
            database.transaction(
                functools.partial(consent_storage.move_consent, create=True),
                operator,
                tenant,
                move,
                write=True,
            )


def address_message(tenant: str = TENANT, **fields: object) -> civic_addresses_pb2.CivicAddress:
    """A valid civic address of `tenant` (Redmond, two locations), with `fields` changed."""
    message = civic_addresses_pb2.CivicAddress(
        tenant_id=tenant,
        country_code="US",
        house_number="1",
        street_name="Microsoft Way",
        city="Redmond",
        state_or_province="WA",
        postal_code="98052",
        company_name="Contoso",
        geo_point=civic_addresses_pb2.GeoPoint(latitude=47.6395, longitude=-122.1281),
        locations=[
            civic_addresses_pb2.Location(description="Floor 1", elin="4255550199"),
            civic_addresses_pb2.Location(description="Floor 2"),
        ],
    )
    for name, value in fields.items():
        if isinstance(value, list):
            message.ClearField(name)  # type: ignore[arg-type]
            getattr(message, name).extend(value)
        elif isinstance(value, civic_addresses_pb2.GeoPoint):
            message.geo_point.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def sample_address(tenant: str) -> CivicAddress:
    """`address_message` as the domain has it, checked (what tests upload USER numbers to)."""
    return check_address(convert.address_in(address_message(tenant)))


def grant_addresses(
    database: Database, pairs: tuple[tuple[str, str], ...] = CONSENTED
) -> dict[tuple[str, str], str]:
    """A civic address for each consented (operator, tenant), made once (its request id is
    the pair's own): USER numbers are uploaded with one. Their ids, by pair."""
    made: dict[tuple[str, str], str] = {}
    for operator, tenant in pairs:
        request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"opconnect-tests/{operator}/{tenant}"))
        address, _ = database.transaction(
            address_storage.create_address,
            operator,
            sample_address(tenant),
            Author.OPERATOR,
            request_id,
            write=True,
        )
        made[operator, tenant] = address.id
    return made


class RunningSystem:
    """One process of the system (by default all of it) on its own event loop thread, with
    client helpers."""

    def __init__(self, settings: Settings, test_pki: Pki, role: str = "all") -> None:
        self.pki = test_pki
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.runtime: server.Runtime = self.call(server.start(settings, role))
        self.address = f"localhost:{self.runtime.port}"
        self._channels: list[grpc.Channel] = []
        grant_consents(self.runtime.db)
        # The civic address USER numbers of the consented tenants are uploaded with.
        self.addresses = grant_addresses(self.runtime.db)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop (registry changes, direct storage reads)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def channel(
        self,
        kind: str = "operator",
        ident: str = OPERATOR,
        *,
        cert: tuple[bytes, bytes] | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> grpc.Channel:
        cert_pem, key_pem = cert or self.pki.client(kind, ident)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pki.paths.ca_cert.read_bytes(),
            private_key=key_pem,
            certificate_chain=cert_pem,
        )
        channel = grpc.secure_channel(self.address, credentials, options=options)
        self._channels.append(channel)
        return channel

    @property
    def audit(self) -> AuditLog:
        """The records service's audit log."""
        service = self.runtime.service("records")
        assert isinstance(service, Records) and service.audit is not None
        return service.audit

    @property
    def usage_service(self) -> Usage:
        """The usage service (its call feed follower: `.feed`)."""
        service = self.runtime.service("usage")
        assert isinstance(service, Usage)
        return service

    def numbers(self, ident: str = OPERATOR) -> numbers_pb2_grpc.NumberServiceStub:
        return numbers_pb2_grpc.NumberServiceStub(self.channel("operator", ident))

    def admin(self, ident: str = PLATFORM) -> numbers_pb2_grpc.NumberAdminServiceStub:
        return numbers_pb2_grpc.NumberAdminServiceStub(self.channel("platform", ident))

    def records(self, ident: str = OPERATOR) -> records_pb2_grpc.CallRecordServiceStub:
        return records_pb2_grpc.CallRecordServiceStub(self.channel("operator", ident))

    def ingest(self, ident: str = PLATFORM) -> records_pb2_grpc.CallRecordIngestServiceStub:
        return records_pb2_grpc.CallRecordIngestServiceStub(self.channel("platform", ident))

    def stop(self) -> None:
        self.call(self.runtime.stop(grace_s=1.0))
        for channel in self._channels:
            channel.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def start_system(settings: Settings, test_pki: Pki) -> RunningSystem:
    system = RunningSystem(settings, test_pki)
    registry = system.runtime.registry
    for ident in (OPERATOR, OTHER_OPERATOR, SUSPENDED_OPERATOR, REVOKED_OPERATOR):
        system.call(registry.add(ident, "", test_pki.anchors()))
    system.call(registry.set_status(SUSPENDED_OPERATOR, OperatorStatus.SUSPENDED))
    return system


@pytest.fixture
def system(session_pki: Pki, migrated_url: str, tmp_path: Path) -> Iterator[RunningSystem]:
    """The whole system, on SQLite and (when available) PostgreSQL."""
    running = start_system(settings_for(tmp_path, session_pki.paths, migrated_url), session_pki)
    yield running
    running.stop()


@pytest.fixture
def sqlite_system(session_pki: Pki, tmp_path: Path) -> Iterator[RunningSystem]:
    """The whole system on SQLite only (for tests where storage does not matter)."""
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    running = start_system(settings_for(tmp_path, session_pki.paths, url), session_pki)
    yield running
    running.stop()


@dataclass(frozen=True)
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    fields: dict[str, str]  # field path -> reason
    retry_delay_s: float | None


def rich_error(error: grpc.RpcError) -> RichError:
    """Decode the google.rpc details every opconnect error must carry."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status in {error!r}"
    reason = domain = ""
    fields: dict[str, str] = {}
    retry: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason, info.domain
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update({v.field: v.reason for v in bad.field_violations})
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            retry = info_retry.retry_delay.ToNanoseconds() / 1e9
    assert reason, "every error carries a google.rpc.ErrorInfo with a reason"
    return RichError(error.code(), error.details() or "", reason, domain, fields, retry)


class StreamReader(Generic[R]):
    """A server stream read on a thread, so a test can act while it is open."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._responses: queue.Queue[R | grpc.RpcError | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
            self._responses.put(None)
        except grpc.RpcError as error:
            self._responses.put(error)

    def next(self, timeout: float = 10) -> R | None:
        """The next response; None when the stream ended with OK; raises its error."""
        item = self._responses.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(5)


class Watcher(StreamReader[numbers_pb2.WatchAssignmentsResponse]):
    """An open WatchAssignments stream."""

    def __init__(
        self,
        stub: numbers_pb2_grpc.NumberServiceStub,
        request: numbers_pb2.WatchAssignmentsRequest | None = None,
    ) -> None:
        super().__init__(stub.WatchAssignments(request or numbers_pb2.WatchAssignmentsRequest()))

    def next(self, timeout: float = 10) -> numbers_pb2.WatchAssignmentsResponse:
        response = super().next(timeout)
        assert response is not None, "a watch never ends with OK"
        return response

    def events(self, count: int, timeout: float = 10) -> list[numbers_pb2.AssignmentEvent]:
        found: list[numbers_pb2.AssignmentEvent] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            found += self.next(max(0.01, deadline - time.monotonic())).events
        return found


@pytest.fixture
def cli_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The `opconnect` command run in the test's process: its data and logs kept apart, and
    structlog as it was after (the command configures it)."""
    monkeypatch.setenv("OPCONNECT_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("OPCONNECT_LOG_FORMAT", "json")
    monkeypatch.setenv("OPCONNECT_LOG_LEVEL", "warning")
    yield
    structlog.reset_defaults()
