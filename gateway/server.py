"""The one-process system: gateway and every service on one gRPC server (no forwarding hop).

`start(settings)` makes what is missing (the development PKI, the schema), opens the mutual-TLS
port and returns a `Runtime`; `Runtime.stop()` shuts down gracefully: health turns NOT_SERVING,
new calls are refused, open streams end with UNAVAILABLE (clients resume from their last
cursor), in-flight unary calls finish within the grace period, and the database closes last.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.forward import Forwarder, mirror_health
from gateway.identity import GATEWAY_NAME, Authenticator, ServiceAuthenticator
from gateway.pki import PkiPaths, ensure_dev_pki, issue_client
from gateway.registry import Registry
from gateway.trust import TrustFiles, TrustStore
from opconnect.numbers.v1 import numbers_pb2
from opconnect.records.v1 import records_pb2
from opconnect.usage.v1 import usage_pb2
from plumbing import audit as audit_log
from plumbing.audit import AuditLog
from plumbing.changelog import Notifier, PostgresListener
from plumbing.config import Settings
from plumbing.db import Database, private_directory
from plumbing.limits import CallSlots
from plumbing.logs import get_logger
from plumbing.rpc import Access, Authenticate, RateLimiter, RpcInterceptor, StreamSlots
from services.numbers import servicer as numbers
from services.numbers import storage as numbers_storage
from services.records import servicer as records
from services.records import storage as records_storage
from services.usage import servicer as usage
from services.usage import storage as usage_storage
from services.usage.feed import CallFeedFollower, FeedClient

log = get_logger("opconnect.server")

DEV_OPERATOR = "contoso-telecom"
DEV_PLATFORM = "admin-center"

Role = Literal["all", "gateway", "numbers", "records", "usage"]
ROLES: tuple[Role, ...] = ("all", "gateway", "numbers", "records", "usage")
SERVICES = ("numbers", "records", "usage")
PROTOS = {"numbers": numbers_pb2, "records": records_pb2, "usage": usage_pb2}
ACCESS: dict[str, Callable[[], dict[str, Access]]] = {
    "numbers": numbers.access,
    "records": records.access,
    "usage": usage.access,
}

# Served to any authenticated principal: stock tools (grpc-health-probe, buf curl) work.
OPEN_METHODS = {
    "/grpc.health.v1.Health/Check": Access.ANY,
    "/grpc.health.v1.Health/Watch": Access.ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Access.ANY,
}


@dataclass
class Runtime:
    settings: Settings
    db: Database
    notifier: Notifier
    trust: TrustStore
    registry: Registry
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    dev_pki: PkiPaths | None
    audit: AuditLog | None = None
    feed: CallFeedFollower | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    listener: PostgresListener | None = None
    role: Role = "all"
    services: tuple[str, ...] = ()  # the services this process serves itself
    streams: StreamSlots | None = None  # open streams per operator (this process)
    channels: list[grpc.aio.Channel] = field(default_factory=list)  # the gateway's routes
    forwarder: Forwarder | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0].strip("[]")
        local = host in ("127.0.0.1", "::1", "", "0.0.0.0", "::")  # noqa: S104 - naming, not binding
        return f"{'localhost' if local else host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.forwarder is not None:
            self.forwarder.close()
        if self.feed is not None:
            await self.feed.stop()
        self.notifier.close()
        await self.server.stop(grace)
        for channel in self.channels:
            await channel.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.listener is not None:
            await self.listener.stop()
        if self.audit is not None:
            await self.audit.close()
        await asyncio.get_running_loop().run_in_executor(None, self.db.close)
        log.info("stopped")


def trust_files(settings: Settings) -> tuple[TrustFiles, PkiPaths | None]:
    """The configured TLS files, or the development PKI (made on first run) where none are."""
    deny = Path(settings.deny_list_file) if settings.deny_list_file else None
    if settings.tls_cert_file and settings.tls_key_file and settings.operator_ca_file:
        operator_ca = Path(settings.operator_ca_file)
        files = TrustFiles(
            server_cert=Path(settings.tls_cert_file),
            server_key=Path(settings.tls_key_file),
            operator_ca=operator_ca,
            platform_ca=Path(settings.platform_ca_file)
            if settings.platform_ca_file
            else operator_ca,
            crl=Path(settings.crl_file) if settings.crl_file else None,
            deny_list=deny,
        )
        return files, None
    dev = ensure_dev_pki(settings.pki_dir, operator_id=DEV_OPERATOR, platform_name=DEV_PLATFORM)
    return TrustFiles(dev.server_cert, dev.server_key, dev.ca_cert, dev.ca_cert, dev.crl, deny), dev


def feed_client(settings: Settings, dev: PkiPaths | None, address: str) -> FeedClient | None:
    """How the usage service reaches the call feed: the configured files, or with the
    development PKI a platform certificate `usage` made for it; None when neither is there."""
    target = settings.feed_target or address
    if not target:
        return None
    if settings.feed_ca_file and settings.feed_cert_file and settings.feed_key_file:
        ca, cert, key = (
            Path(settings.feed_ca_file),
            Path(settings.feed_cert_file),
            Path(settings.feed_key_file),
        )
    elif dev is not None:
        cert, key = dev.client("platform-usage")
        if not (cert.exists() and key.exists()):
            issue_client(dev, "platform", "usage")
        ca = dev.ca_cert
    else:
        return None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return FeedClient(target, credentials)


async def _every(interval_s: float, name: str, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` every `interval_s` seconds until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception:
            log.exception("background job failed", job=name)


async def purge(runtime: Runtime) -> None:
    """Delete what is past its retention, of the services this process serves: assignment
    changes; call records and audit events; call durations, the platform's calls the usage
    service keeps and the usage of their days."""
    settings, db = runtime.settings, runtime.db
    now = dt.datetime.now(dt.UTC)
    if "numbers" in runtime.services:
        cutoff = now - dt.timedelta(seconds=settings.change_log_retention_s)
        purged = await db.run(numbers_storage.purge_events, cutoff, write=True)
        if purged:
            log.info("purged change log", log="numbers", events=purged)
    if "records" in runtime.services:
        cutoff = now - dt.timedelta(seconds=settings.record_retention_s)
        records_purged = 0
        while True:  # in chunks, one short transaction each
            chunk = await db.run(records_storage.purge_records, cutoff, write=True)
            records_purged += chunk
            if chunk < records_storage.PURGE_CHUNK:
                break
        if records_purged:
            log.info("purged call records", records=records_purged)
        cutoff = now - dt.timedelta(seconds=settings.audit_retention_s)
        audited = await db.run(audit_log.purge_events, cutoff, write=True)
        if audited:
            log.info("purged audit events", events=audited)
    if "usage" in runtime.services:
        cutoff = now - dt.timedelta(seconds=settings.usage_retention_s)
        durations = await db.run(usage_storage.purge_durations, cutoff, write=True)
        durations += await db.run(usage_storage.purge_platform_calls, cutoff, write=True)
        await db.run(usage_storage.purge_usage_days, cutoff, write=True)
        if durations:
            log.info("purged call durations", records=durations)


def _channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


def internal_credentials(settings: Settings, dev: PkiPaths | None) -> grpc.ChannelCredentials:
    """How the gateway reaches the service processes: as the platform principal `gateway`,
    with the configured files or, with the development PKI, a certificate made for it."""
    if settings.internal_ca_file and settings.internal_cert_file and settings.internal_key_file:
        return _channel_credentials(
            Path(settings.internal_ca_file),
            Path(settings.internal_cert_file),
            Path(settings.internal_key_file),
        )
    if dev is None:
        raise ValueError(
            "the gateway needs internal_ca_file, internal_cert_file and internal_key_file (a"
            f" platform certificate named {GATEWAY_NAME!r}) to reach the services"
        )
    cert, key = dev.client(f"platform-{GATEWAY_NAME}")
    if not (cert.exists() and key.exists()):
        issue_client(dev, "platform", GATEWAY_NAME)
    return _channel_credentials(dev.ca_cert, cert, key)


def _server(settings: Settings, interceptor: RpcInterceptor) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[interceptor],
        options=[
            # The wrapper refuses messages over max_message_bytes with details; this is the
            # transport's hard backstop (answered without details).
            ("grpc.max_receive_message_length", settings.max_message_bytes + 4 * 1024 * 1024),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ],
    )


_STATUS = {
    True: health_pb2.HealthCheckResponse.SERVING,
    False: health_pb2.HealthCheckResponse.NOT_SERVING,
}


def _routes(
    settings: Settings, credentials: grpc.ChannelCredentials
) -> dict[ServiceDescriptor, grpc.aio.Channel]:
    """The gateway's routes: each service of each area whose `*_target` is set, to one channel
    per target."""
    # The gateway admits requests up to max_message_bytes; a service answers at most that.
    limit = settings.max_message_bytes + 4 * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 60_000),
    ]
    routes: dict[ServiceDescriptor, grpc.aio.Channel] = {}
    for name in SERVICES:
        target = getattr(settings, f"{name}_target")
        if not target:
            log.warning("service not routed: no target set", service=name)
            continue
        channel = grpc.aio.secure_channel(target, credentials, options=options)
        for service in PROTOS[name].DESCRIPTOR.services_by_name.values():
            routes[service] = channel
    return routes


async def start(settings: Settings, role: Role = "all") -> Runtime:
    """Start one process of the system: `all` (gateway and every service, the default), one
    service (`numbers`, `records`, `usage`: its RPCs, from the gateway or platform callers), or
    the `gateway` alone (forwarding every service's RPCs to the processes in the `*_target`
    settings)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    loop = asyncio.get_running_loop()
    # The data directory is private (0700): made when the default database or the development
    # PKI will live there, tightened if it is open to others.
    in_data_dir = not settings.database_url or not (
        settings.tls_cert_file and settings.tls_key_file and settings.operator_ca_file
    )
    await loop.run_in_executor(
        None, functools.partial(private_directory, settings.data_dir, create=in_data_dir)
    )
    files, dev = await loop.run_in_executor(None, trust_files, settings)
    trust = TrustStore(files, settings.reload_interval_s)
    db = Database(
        settings.sqlalchemy_url,
        settings.db_threads,
        work_per_lane=settings.max_db_work_per_operator,
    )
    await loop.run_in_executor(None, db.migrate)
    notifier = Notifier()
    notifier.bind(loop)
    registry = Registry(db, settings.registry_cache_s)
    if dev is not None:
        await registry.add(DEV_OPERATOR, "Contoso Telecom (development)")

    services = SERVICES if role in ("all", "gateway") else (role,)
    access = dict(OPEN_METHODS)
    for name in services:
        access.update(ACCESS[name]())
    authenticate: Authenticate = Authenticator(trust, registry)
    if role not in ("all", "gateway"):
        authenticate = ServiceAuthenticator(authenticate, registry)
    interceptor = RpcInterceptor(
        authenticate,
        access,
        RateLimiter(settings.rate_per_operator, settings.rate_burst),
        StreamSlots(settings.max_streams_per_operator),
        settings.max_message_bytes,
        calls=CallSlots(settings.max_calls_per_operator),
    )
    server = _server(settings, interceptor)
    listener = None
    if db.is_postgres and role != "gateway":
        listener = PostgresListener(settings.sqlalchemy_url, notifier)
    cache_usable = listener.ready.is_set if listener is not None else lambda: True
    serves_records = "records" in services and role != "gateway"
    audit = AuditLog(db) if serves_records else None

    async def known_operator(operator_id: str) -> bool:
        return await registry.lookup(operator_id) is not None

    names: list[str] = []
    routed: dict[grpc.aio.Channel, list[str]] = {}  # the gateway's: channel -> its services
    forwarder: Forwarder | None = None
    if role == "gateway":
        credentials = await loop.run_in_executor(None, internal_credentials, settings, dev)
        routes = _routes(settings, credentials)
        forwarder = Forwarder(routes)
        server.add_generic_rpc_handlers(forwarder.handlers())
        for service, channel in routes.items():
            routed.setdefault(channel, []).append(service.full_name)
            names.append(service.full_name)
    else:
        if "numbers" in services:
            names += numbers.register(server, db, notifier, settings, cache_usable)
        if audit is not None:  # the records service
            names += records.register(
                server, db, notifier, settings, audit=audit, known_operator=known_operator
            )
        if "usage" in services:
            names += usage.register(server, db, settings)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:  # a forwarded service: not serving until its process says so
        await health.set(name, _STATUS[role != "gateway"])
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_secure_port(settings.listen, trust.server_credentials())
    if port == 0:
        raise OSError(f"could not listen on {settings.listen}")
    await server.start()
    runtime = Runtime(settings, db, notifier, trust, registry, server, health, port, dev)
    runtime.role = role
    runtime.services = services if role != "gateway" else ()
    runtime.streams = interceptor.streams
    runtime.channels = list(routed)
    runtime.forwarder = forwarder
    runtime.listener = listener
    runtime.audit = audit
    if audit is not None:
        audit.start()
    if runtime.services:
        runtime.tasks.append(
            asyncio.create_task(_every(settings.purge_interval_s, "purge", lambda: purge(runtime)))
        )
    for channel, group in routed.items():
        runtime.tasks.append(asyncio.create_task(mirror_health(channel, group, health)))
    if listener is not None:
        listener.start()
    if "usage" in runtime.services:
        own = runtime.address if role == "all" else settings.records_target
        client = await loop.run_in_executor(None, feed_client, settings, dev, own)
        if client is None:
            log.info("usage call feed off: no feed_* certificate or target configured")
        else:
            runtime.feed = CallFeedFollower(db, client)
            runtime.feed.start()
    log.info(
        "serving",
        role=role,
        address=runtime.address,
        database=db.engine.url.render_as_string(hide_password=True),
    )
    return runtime
