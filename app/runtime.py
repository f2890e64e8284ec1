"""Starting and stopping one process of the system, in any role (app.roles): the one-process
system (gateway and every service on one gRPC server, no forwarding hop), one service, or the
gateway forwarding to the services' processes.

`start(settings, role)` makes what is missing (the development PKI, the schema), opens the
mutual-TLS port and returns a `Runtime`; `Runtime.stop()` shuts down gracefully: health turns
NOT_SERVING, new calls are refused, open streams end with UNAVAILABLE (clients resume from
their last cursor), in-flight unary calls finish within the grace period, services stop their
background work, and the database closes last.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from app.roles import ROLES, SERVICES, Role
from gateway.forward import Forwarder, mirror_health
from gateway.identity import (
    Authenticator,
    ServiceAuthenticator,
    check_bundles_apart,
    parse_fingerprints,
)
from gateway.pki import GATEWAY_NAME, PkiPaths, ensure_dev_pki, issue_client
from gateway.registry import Registry, ca_anchors
from gateway.trust import TrustFiles, TrustStore
from plumbing import tokens
from plumbing.balancing import balanced
from plumbing.changelog import Notifier, PostgresListener, Streams
from plumbing.config import DEV_OPERATOR, Settings
from plumbing.db import Database
from plumbing.files import private_directory
from plumbing.limits import Slots
from plumbing.logs import get_logger
from plumbing.metrics import Endpoint, Metrics, Tls
from plumbing.rpc import Access, Authenticate, RateLimiter, RpcInterceptor
from plumbing.service import ClientCertificate, Host, Service, client_certificate
from plumbing.tracing import Tracing, start_tracing

log = get_logger("opconnect.server")

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
    role: Role
    services: dict[str, Service]  # the services this process serves itself, by name
    streams: Slots  # open streams per operator (this process)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    listener: PostgresListener | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)  # the gateway's routes
    forwarder: Forwarder | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics(enabled=False))
    metrics_endpoint: Endpoint | None = None  # where Prometheus scrapes (metrics_listen)
    tracing: Tracing = field(default_factory=Tracing)  # its own tracer provider (otlp_endpoint)

    @property
    def address(self) -> str:
        return _address(self.settings, self.port)

    def service(self, name: str) -> Service:
        """A service this process serves (KeyError otherwise)."""
        return self.services[name]

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.forwarder is not None:
            self.forwarder.close()
        self.notifier.close()
        await self.server.stop(grace)
        for channel in self.channels:
            await channel.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.listener is not None:
            await self.listener.stop()
        for service in reversed(self.services.values()):
            await service.stop()
        loop = asyncio.get_running_loop()
        if self.metrics_endpoint is not None:
            await loop.run_in_executor(None, self.metrics_endpoint.stop)
        await loop.run_in_executor(None, self.db.close)
        await loop.run_in_executor(None, self.tracing.shutdown)  # the last spans exported
        log.info("stopped")


def freeze_start_up_objects() -> int:
    """Take every object alive after start-up (modules, classes, the libraries' tables: about
    125,000 of them) out of the garbage collector's view, after a collection of what start-up
    left behind; how many were frozen. A server process calls it once, when serving.

    Python's full (generation 2) collection walks every tracked object; with the start-up
    objects among them it stopped the whole process (the event loop and every database thread)
    for 100 to 250 ms, a dozen times a minute under sustained load (bench/sustained_bench.py),
    a stall every call in flight waited out. Frozen, they are never walked again; objects made
    later are collected as before (cycles among the frozen ones are kept: start-up makes few).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _address(settings: Settings, port: int) -> str:
    """How a client on this machine reaches a process listening on `settings.listen`."""
    host = settings.listen.rsplit(":", 1)[0].strip("[]")
    local = host in ("127.0.0.1", "::1", "", "0.0.0.0", "::")  # noqa: S104 - naming, not binding
    return f"{'localhost' if local else host}:{port}"


def trust_files(
    settings: Settings, role: Role = ROLES["all"]
) -> tuple[TrustFiles, PkiPaths | None]:
    """The configured TLS files, or the development PKI (made on first run) where none are.

    ValueError when a configuration would let one kind of CA sign another kind's identities:
    no platform bundle of its own, a platform bundle sharing a CA with the operator bundle, or
    (a service process) no pinned gateway, or a gateway CA shared with either bundle."""
    deny = Path(settings.deny_list_file) if settings.deny_list_file else None
    dev: PkiPaths | None = None
    gateway_ca = Path(settings.gateway_ca_file) if settings.gateway_ca_file else None
    if settings.tls_cert_file and settings.tls_key_file and settings.operator_ca_file:
        if not settings.platform_ca_file:
            raise ValueError(
                "platform_ca_file is not set: platform certificates must come from a CA bundle"
                " of their own, never the operators' (set it to the platform CA bundle)"
            )
        files = TrustFiles(
            server_cert=Path(settings.tls_cert_file),
            server_key=Path(settings.tls_key_file),
            operator_ca=Path(settings.operator_ca_file),
            platform_ca=Path(settings.platform_ca_file),
            crl=Path(settings.crl_file) if settings.crl_file else None,
            deny_list=deny,
        )
    else:
        dev = ensure_dev_pki(settings.pki_dir)
        gateway_ca = gateway_ca or dev.gateway_ca_cert
        files = TrustFiles(
            dev.server_cert,
            dev.server_key,
            dev.operator_ca_cert,
            dev.platform_ca_cert,
            dev.crl,
            deny,
        )
    operator_cas, platform_cas = files.operator_ca.read_bytes(), files.platform_ca.read_bytes()
    check_bundles_apart(operator_cas, platform_cas, "operator_ca_file", "platform_ca_file")
    if not role.behind_gateway:
        return files, dev
    if gateway_ca is None and not parse_fingerprints(settings.gateway_fingerprints):
        raise ValueError(
            f"a {role.name} process believes the principal header only from a pinned gateway: set"
            " gateway_ca_file (a CA that signs the gateway's certificate and nothing else)"
            " and/or gateway_fingerprints (the SHA-256 of the gateway's certificate)"
        )
    if gateway_ca is not None:
        gateway_cas = gateway_ca.read_bytes()
        check_bundles_apart(operator_cas, gateway_cas, "operator_ca_file", "gateway_ca_file")
        check_bundles_apart(platform_cas, gateway_cas, "platform_ca_file", "gateway_ca_file")
    return replace(files, gateway_ca=gateway_ca), dev


async def _every(interval_s: float, name: str, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` every `interval_s` seconds until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception:
            log.exception("background job failed", job=name)


async def purge(runtime: Runtime) -> None:
    """Delete what is past its retention, of each service this process serves (a service's
    failure is logged and counted; the others still run)."""
    metrics = runtime.metrics
    for service in runtime.services.values():
        try:
            await service.purge(runtime.db, runtime.settings)
        except Exception:
            metrics.purge_runs.labels(service.name, "failed").inc()
            log.exception("purge failed", service=service.name)
            continue
        metrics.purge_runs.labels(service.name, "ok").inc()
        metrics.purge_last_success.labels(service.name).set(time.time())


def platform_credentials(dev: PkiPaths | None, name: str) -> ClientCertificate | None:
    """A development platform client certificate `name` (made on first use); None without
    the development PKI."""
    if dev is None:
        return None
    cert, key = dev.client(f"platform-{name}")
    if not (cert.exists() and key.exists()):
        issue_client(dev, "platform", name)
    return client_certificate(dev.ca_cert, cert, key)


def internal_credentials(settings: Settings, dev: PkiPaths | None) -> ClientCertificate:
    """How the gateway reaches the service processes: as the platform principal `gateway`,
    with the configured files or, with the development PKI, a certificate made for it."""
    if settings.internal_ca_file and settings.internal_cert_file and settings.internal_key_file:
        return client_certificate(
            Path(settings.internal_ca_file),
            Path(settings.internal_cert_file),
            Path(settings.internal_key_file),
        )
    if dev is None:
        raise ValueError(
            "the gateway needs internal_ca_file, internal_cert_file and internal_key_file (a"
            f" platform certificate named {GATEWAY_NAME!r}) to reach the services"
        )
    found = platform_credentials(dev, GATEWAY_NAME)
    assert found is not None
    return found


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The options of every server of the system (the benches give their bare servers the
    same)."""
    return [
        # The wrapper refuses messages over max_message_bytes with details; this is the
        # transport's hard backstop (answered without details).
        ("grpc.max_receive_message_length", settings.max_message_bytes + 4 * 1024 * 1024),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


def check_listen(address: str) -> None:
    """Every address `address` names can be listened on, or an OSError saying which cannot and
    why, in one line. gRPC alone would fail with a traceback, or, where a name resolves to
    several addresses (`localhost`: 127.0.0.1 and ::1) and one is taken, quietly serve on the
    others."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return  # no port, or any free one: nothing to check here
    host = host.strip("[]")
    try:
        found = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OSError(f"cannot listen on {address}: {error.strerror}") from None
    for family, kind, protocol, _, where in found:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(where)
            except OSError as error:
                why = (
                    "the address is in use (is another opconnect running?); set another with"
                    " listen / OPCONNECT_LISTEN"
                    if error.errno == errno.EADDRINUSE
                    else error.strerror or str(error)
                )
                raise OSError(f"cannot listen on {address} ({where[0]!s}): {why}") from None


def _server(settings: Settings, interceptor: RpcInterceptor) -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[interceptor], options=server_options(settings))


_STATUS = {
    True: health_pb2.HealthCheckResponse.SERVING,
    False: health_pb2.HealthCheckResponse.NOT_SERVING,
}


def _routes(
    settings: Settings, credentials: grpc.ChannelCredentials
) -> dict[ServiceDescriptor, grpc.aio.Channel]:
    """The gateway's routes: each protobuf service of each service whose `<name>_target` is
    set, to one channel per target; a target naming several replicas spreads the calls
    across them (plumbing.balancing)."""
    # The gateway admits requests up to max_message_bytes; a service answers at most that.
    limit = settings.max_message_bytes + 4 * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 60_000),
        # A fixed flow-control window per forwarded stream (256 KiB), not one grown by BDP
        # probing to megabytes: a caller that stops reading holds back the service process
        # after one window, so the gateway never buffers much for it (memory stays bounded
        # with many stalled streams) and the service process sees the stream's real lag.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 256 * 1024),
    ]
    routes: dict[ServiceDescriptor, grpc.aio.Channel] = {}
    for service in SERVICES:
        target = getattr(settings, f"{service.name}_target")
        if not target:
            log.warning("service not routed: no target set", service=service.name)
            continue
        balancing = balanced(target, settings.internal_server_name)
        channel = grpc.aio.secure_channel(target, credentials, options=options + balancing)
        for descriptor in service.descriptors():
            routes[descriptor] = channel
    return routes


async def start(settings: Settings, role: str = "all") -> Runtime:
    """Start one process of the system in a role of app.roles: `all` (gateway and every
    service, the default), one service (its RPCs, from the gateway or platform callers), or
    the `gateway` alone (forwarding every service's RPCs to the processes in the `*_target`
    settings)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    kind = ROLES[role]
    loop = asyncio.get_running_loop()
    if settings.gil_switch_interval_s > 0:  # see the setting: database calls win the GIL back
        sys.setswitchinterval(settings.gil_switch_interval_s)
    # The data directory is private (0700): made when the default database or the development
    # PKI will live there, tightened if it is open to others.
    in_data_dir = not settings.database_url or not (
        settings.tls_cert_file and settings.tls_key_file and settings.operator_ca_file
    )
    await loop.run_in_executor(
        None, functools.partial(private_directory, settings.data_dir, create=in_data_dir)
    )
    files, dev = await loop.run_in_executor(None, trust_files, settings, kind)
    if kind.serves:  # the services seal and open cursors and page tokens
        tokens.install(await loop.run_in_executor(None, tokens.load_keyring, settings))
    metrics = Metrics(enabled=bool(settings.metrics_listen))
    tracing = await loop.run_in_executor(
        None, start_tracing, settings.otlp_endpoint, settings.otlp_ca_file, role
    )
    tracer = tracing.tracer
    trust = TrustStore(files, settings.reload_interval_s, metrics)
    db = Database(
        settings.sqlalchemy_url,
        settings.db_threads,
        work_per_lane=settings.max_db_work_per_operator,
        metrics=metrics,
        tracer=tracer,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        prepare_threshold=settings.db_prepare_threshold,
    )
    await loop.run_in_executor(None, db.migrate)
    notifier = Notifier()
    notifier.bind(loop)
    registry = Registry(db, settings.registry_cache_s, metrics)
    if dev is not None:  # bound to the development operator CA (again, if it was unbound)
        anchors = ca_anchors(dev.operator_ca_cert.read_bytes())
        await registry.add(DEV_OPERATOR, "Contoso Telecom (development)", anchors)

    services = {s.name: s() for s in SERVICES if s.name in kind.serves}
    access = dict(OPEN_METHODS)
    for served in SERVICES if kind.forwards else [type(s) for s in services.values()]:
        access.update(served.access())
    direct = Authenticator(trust, registry, parse_fingerprints(settings.gateway_fingerprints))
    authenticate: Authenticate = direct
    if kind.behind_gateway:
        authenticate = ServiceAuthenticator(direct, registry)
    interceptor = RpcInterceptor(
        authenticate,
        access,
        RateLimiter(settings.rate_per_operator, settings.rate_burst),
        Slots(settings.max_streams_per_operator),
        settings.max_message_bytes,
        # Open calls re-check their caller as often as the trust files are reloaded.
        recheck_interval_s=settings.reload_interval_s,
        calls=Slots(settings.max_calls_per_operator),
        metrics=metrics,
        tracer=tracer,
    )
    server = _server(settings, interceptor)
    listener = None
    if db.is_postgres and services:
        listener = PostgresListener(settings.listen_url, notifier, metrics)
    cache_usable = listener.ready.is_set if listener is not None else lambda: True

    async def known_operator(operator_id: str) -> bool:
        return await registry.lookup(operator_id) is not None

    port = 0
    host = Host(
        server=server,
        db=db,
        notifier=notifier,
        settings=settings,
        known_operator=known_operator,
        cache_usable=cache_usable,
        platform_credentials=lambda name: platform_credentials(dev, name),
        present_certificate=trust.present,
        serves=frozenset(services),
        address=lambda: _address(settings, port) if port else "",
        metrics=metrics,
        tracer=tracer,
        # Log heads and stream lag are exported by the processes that serve services.
        streams=Streams(
            db, metrics if services else Metrics(enabled=False), settings.stream_tail_items
        ),
    )
    names: list[str] = []
    routed: dict[grpc.aio.Channel, list[str]] = {}  # the gateway's: channel -> its services
    forwarder: Forwarder | None = None
    if kind.forwards:
        internal = await loop.run_in_executor(None, internal_credentials, settings, dev)
        trust.present("internal_cert", internal.cert_file)
        credentials = internal.credentials
        routes = _routes(settings, credentials)
        forwarder = Forwarder(routes, metrics, tracer)
        server.add_generic_rpc_handlers(forwarder.handlers())
        for descriptor, channel in routes.items():
            routed.setdefault(channel, []).append(descriptor.full_name)
            names.append(descriptor.full_name)
    for service in services.values():
        service.register(host)
        names += [d.full_name for d in service.descriptors()]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:  # a forwarded service: not serving until its process says so
        await health.set(name, _STATUS[not kind.forwards])
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    await loop.run_in_executor(None, check_listen, settings.listen)
    try:
        port = server.add_secure_port(settings.listen, trust.server_credentials())
    except RuntimeError:  # gRPC's "Failed to bind": what check_listen did not foresee
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen} (set listen / OPCONNECT_LISTEN)")
    await server.start()
    runtime = Runtime(
        settings,
        db,
        notifier,
        trust,
        registry,
        server,
        health,
        port,
        dev,
        kind,
        services,
        interceptor.streams,
        listener=listener,
        channels=list(routed),
        forwarder=forwarder,
        metrics=metrics,
        tracing=tracing,
    )
    if settings.metrics_listen:
        tls = Tls(str(files.server_cert), str(files.server_key), str(files.platform_ca))
        runtime.metrics_endpoint = await loop.run_in_executor(
            None, metrics.serve, settings.metrics_listen, tls
        )
    for name in services:  # at 0 from the start: a first failure is an increase
        metrics.purge_runs.labels(name, "failed")
    if services:
        runtime.tasks.append(
            asyncio.create_task(_every(settings.purge_interval_s, "purge", lambda: purge(runtime)))
        )
    for channel, group in routed.items():
        runtime.tasks.append(asyncio.create_task(mirror_health(channel, group, health)))
    if listener is not None:
        listener.start()
    for service in services.values():
        await service.start(host)
    log.info(
        "serving",
        role=role,
        address=runtime.address,
        database=db.engine.url.render_as_string(hide_password=True),
        metrics=runtime.metrics_endpoint.url if runtime.metrics_endpoint else "off",
        tracing=settings.otlp_endpoint or "off",
    )
    return runtime
