"""Every metric a process exports, in one place: the catalogue (`Metrics`) and its HTTP endpoint.

A process makes one `Metrics` at start-up and hands it to what records into it (the RPC
wrapper, the database, the change-log followers, the services through `Host`, the trust store,
the registry). Families live on the object's own registry, never the global one, so that
several systems in one process (the tests) never mix their figures. `Metrics(enabled=False)`
gives the same attributes as no-ops: code records unconditionally, and a process that exports
nothing pays nothing.

Names and labels:
- RPC families follow go-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
  `grpc_server_handling_seconds`, `grpc_server_msg_received_total`, `grpc_server_msg_sent_total`
  and the same `grpc_client_*` for the gateway's forwarding hop and the usage feed), labelled
  `grpc_service`, `grpc_method`, `grpc_type` (unary, client_stream, server_stream, bidi_stream)
  and `grpc_code`.
- Domain families are `opconnect_*`, in base units (seconds, bytes) with `_total` on counters.
- Labels are bounded: operator ids (only of admitted callers, which the registry knows), enums
  and reason codes that the code defines. Never a phone number, tenant, call id or request id.

Figures that are a state rather than an event (stream lag, certificate expiry, registry
operators by state, audit events pending) are read when Prometheus scrapes, from callbacks
registered with `Metrics.on_scrape`.
"""

from __future__ import annotations

import bisect
import ipaddress
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from plumbing.logs import get_logger

log = get_logger("opconnect.metrics")

# No `*_created` series: nothing here reads them, and they double every counter's series.
disable_created_metrics()  # type: ignore[no-untyped-call]

F = TypeVar("F", Counter, Gauge, Histogram)

# Seconds: from a fast SQLite read (~0.1 ms) to a stream that waits on a slow database.
GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64)
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Commit to delivery: "at once" is tens of milliseconds; a lagging stream is seconds to minutes.
# A change log's head lock: a batch's insert is milliseconds; tens of them cap a log's writes.
LOCK = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DELIVERY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

RPC = ("grpc_service", "grpc_method", "grpc_type")
# `grpc_code` as go-grpc-prometheus writes it (Go's codes.Code names), from the status name.
GRPC_CODES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}
RPC_CODE = (*RPC, "grpc_code")

# A callback run at scrape time: the families it yields are added to the scrape.
ScrapeFn = Callable[[], Iterable[Metric]]


class _Null:
    """What a family is when metrics are off: every method does nothing."""

    def labels(self, *_args: Any, **_kwargs: Any) -> _Null:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def dec(self, _amount: float = 1) -> None:
        pass

    def set(self, _value: float) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass

    def set_function(self, _function: Callable[[], float]) -> None:
        pass


_NULL = _Null()


class _Callbacks(Collector):
    """The scrape-time families: whatever the registered callbacks yield."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[tuple[str, ScrapeFn]] = []

    def add(self, name: str, callback: ScrapeFn) -> None:
        with self._lock:
            self._callbacks.append((name, callback))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            callbacks = list(self._callbacks)
        for name, callback in callbacks:
            try:
                families = list(callback())
            except Exception:  # one broken figure must not empty the whole scrape
                log.exception("metrics callback failed", callback=name)
                continue
            yield from families

    def describe(self) -> Iterable[Metric]:
        return []  # names only known by calling: never checked for clashes at registration


@dataclass(frozen=True)
class Endpoint:
    """A running metrics endpoint: where it listens, and how to stop it."""

    address: str
    port: int
    stop: Callable[[], None]
    scheme: str = "http"

    @property
    def url(self) -> str:
        host = self.address if ":" not in self.address else f"[{self.address}]"
        return f"{self.scheme}://{host}:{self.port}/metrics"


class Metrics:
    """The catalogue: one attribute per family (see the module docstring for the rules)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self._callbacks = _Callbacks()
        if enabled:
            self.registry.register(self._callbacks)

        # --- RPCs, server side (every method, every process) ---------------------------------
        self.server_started = self._counter(
            "grpc_server_started_total", "RPCs started on the server.", RPC
        )
        self.server_handled = self._counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status.",
            RPC_CODE,
        )
        self.server_handling_seconds = self._histogram(
            "grpc_server_handling_seconds",
            "Seconds from an RPC's start to its end, as the server saw it (for a stream: how"
            " long it stayed open).",
            RPC,
            SECONDS,
        )
        self.server_msg_received = self._counter(
            "grpc_server_msg_received_total", "Request messages received by the server.", RPC
        )
        self.server_msg_sent = self._counter(
            "grpc_server_msg_sent_total", "Response messages sent by the server.", RPC
        )
        # --- RPCs, client side: the gateway's forwarding hop, the usage feed -----------------
        self.client_started = self._counter(
            "grpc_client_started_total", "RPCs started by this process as a client.", RPC
        )
        self.client_handled = self._counter(
            "grpc_client_handled_total",
            "RPCs this process made as a client that completed, by status.",
            RPC_CODE,
        )
        self.client_handling_seconds = self._histogram(
            "grpc_client_handling_seconds",
            "Seconds from the start of an RPC this process made as a client to its end.",
            RPC,
            SECONDS,
        )
        self.client_msg_received = self._counter(
            "grpc_client_msg_received_total", "Messages received by this process as a client.", RPC
        )
        self.client_msg_sent = self._counter(
            "grpc_client_msg_sent_total", "Messages sent by this process as a client.", RPC
        )

        # --- the flows ----------------------------------------------------------------------
        self.records_published = self._counter(
            "opconnect_records_published_total",
            "Call records published by the platform, by outcome (accepted, duplicate, refused)"
            " and refusal reason (empty unless refused).",
            ("outcome", "reason"),
        )
        self.durations_submitted = self._counter(
            "opconnect_durations_submitted_total",
            "Call durations submitted by operators, by operator, outcome and refusal reason.",
            ("operator", "outcome", "reason"),
        )
        self.numbers_changed = self._counter(
            "opconnect_numbers_changed_total",
            "Numbers changed, by operator and change (uploaded, released, assigned, unassigned,"
            " updated).",
            ("operator", "change"),
        )
        self.consent_transitions = self._counter(
            "opconnect_consent_transitions_total",
            "Consent moves, by operator, the state moved from (`none` when created) and to.",
            ("operator", "from", "to"),
        )
        self.civic_address_changes = self._counter(
            "opconnect_civic_address_changes_total",
            "Civic addresses changed, by operator and change (created, updated, deleted).",
            ("operator", "change"),
        )
        self.emergency_location_updates = self._counter(
            "opconnect_emergency_location_updates_total",
            "UPDATED assignment events for a changed emergency location, by operator and cause"
            " (number: UpdateNumber; customer: UpdateNumberEmergencyAddress; address: an edit of"
            " the address or location the numbers refer to).",
            ("operator", "cause"),
        )

        self.commit_group_batches = self._histogram(
            "opconnect_commit_group_batches",
            "Batches committed together in one transaction by a group commit (batches of"
            " several streams that were ready at once: plumbing.pipeline.CommitGroups), by log.",
            ("log",),
            GROUP_SIZES,
        )

        # --- streams --------------------------------------------------------------------------
        self.streams_open = self._gauge(
            "opconnect_streams_open",
            "Streams open now, by service, method and operator (`platform` for platform callers).",
            ("grpc_service", "grpc_method", "operator"),
        )
        self.stream_delivered = self._counter(
            "opconnect_stream_delivered_total",
            "Items (records, events) delivered on streams, by operator and stream kind.",
            ("operator", "kind"),
        )
        self.delivery_seconds = self._histogram(
            "opconnect_delivery_latency_seconds",
            "Seconds from a change's commit to its delivery on a stream that was open when it"
            " was committed, by stream kind.",
            ("kind",),
            DELIVERY,
        )
        self.stream_reads = self._counter(
            "opconnect_stream_reads_total",
            "Batches read by following streams, by stream kind and source: `tail` (served from"
            " the shared tail of live followers, in memory) or `database` (the stream's own"
            " read: catching up, or tails off).",
            ("kind", "source"),
        )
        self.stream_tail_fills = self._counter(
            "opconnect_stream_tail_fills_total",
            "Database reads that filled a shared tail of live followers (at most one per wake-up"
            " of the log, shared by its followers of every operator), by stream kind.",
            ("kind",),
        )
        # opconnect_stream_tail_items{kind} is read at scrape time (plumbing.changelog).
        # opconnect_stream_lag_positions{operator,kind} and opconnect_stream_lag_seconds are
        # read at scrape time (plumbing.changelog).

        # --- change logs and retention -------------------------------------------------------
        # opconnect_changelog_head_position{log} and opconnect_changelog_purged_position{log}
        # are read at scrape time.
        self.purge_runs = self._counter(
            "opconnect_purge_runs_total",
            "Retention purges run, by service and result (ok, failed).",
            ("service", "result"),
        )
        self.purge_removed = self._counter(
            "opconnect_purge_removed_total",
            "Rows removed by retention purges, by table.",
            ("table",),
        )
        self.purge_last_success = self._gauge(
            "opconnect_purge_last_success_timestamp_seconds",
            "When a service's retention purge last completed (Unix time).",
            ("service",),
        )
        # Time partitions (PostgreSQL only; plumbing.partitions), by table, set by each
        # maintenance (at start-up and every purge) of the tables of the services it runs.
        self.partitions = self._gauge(
            "opconnect_partitions", "Time partitions a partitioned table has.", ("table",)
        )
        self.partitions_until = self._gauge(
            "opconnect_partitions_until_timestamp_seconds",
            "The upper bound of a table's newest partition (Unix time): rows later than it"
            " are refused until maintenance creates more (it keeps a week of days or four"
            " weeks ahead).",
            ("table",),
        )
        self.partitions_oldest = self._gauge(
            "opconnect_partitions_oldest_timestamp_seconds",
            "The lower bound of a table's oldest partition (Unix time): further back than its"
            " retention and one period means partitions are not being dropped.",
            ("table",),
        )
        self.partitions_created = self._counter(
            "opconnect_partitions_created_total", "Time partitions created, by table.", ("table",)
        )
        self.partitions_dropped = self._counter(
            "opconnect_partitions_dropped_total",
            "Time partitions dropped past retention, by table.",
            ("table",),
        )

        # --- database -------------------------------------------------------------------------
        self.db_unit_seconds = self._histogram(
            "opconnect_db_unit_seconds",
            "Seconds a unit of database work took, from its turn at the fair gate to commit, by"
            " kind (read, write).",
            ("kind",),
            SECONDS,
        )
        self.db_unit_busy = self._counter(
            "opconnect_db_unit_busy_seconds_total",
            "Seconds of database work, by kind (read, write) and unit (the storage function's"
            " name, a fixed set): which work holds the database's threads, and on SQLite its one"
            " writer.",
            ("kind", "unit"),
        )
        self.db_unit_cpu = self._counter(
            "opconnect_db_unit_cpu_seconds_total",
            "CPU seconds the database threads spent on units of work, by kind and unit: the"
            " driver's and Python's work (SQLite's own, which runs in the thread, included); busy"
            " less this is waiting (I/O, locks, the GIL).",
            ("kind", "unit"),
        )
        self.db_unit_wait_seconds = self._histogram(
            "opconnect_db_unit_wait_seconds",
            "Seconds a unit of database work waited for its turn (fair gate, threads).",
            ("kind",),
            SECONDS,
        )
        self.db_writer_turn_wait_seconds = self._histogram(
            "opconnect_db_writer_turn_wait_seconds",
            "SQLite: seconds a write unit waited for the writers' turn of the database file,"
            " which processes sharing the file take in turn (plumbing/writer_turns.py).",
            (),
            SECONDS,
        )
        self.db_unit_failures = self._counter(
            "opconnect_db_unit_failures_total",
            "Units of database work that failed, by kind and reason (busy, unavailable, error).",
            ("kind", "reason"),
        )
        # opconnect_db_pool_connections{state="in_use"|"idle"} and
        # opconnect_db_pool_max_connections are read at scrape time.
        self.listener_connected = self._gauge(
            "opconnect_changelog_listener_connected",
            "1 while this process's LISTEN connection to PostgreSQL is up (other replicas'"
            " commits wake its streams, its read cache is used); 0 while it reconnects, and"
            " in processes that have none (SQLite, gateways).",
            (),
        )
        self.listener_reconnects = self._counter(
            "opconnect_changelog_listener_reconnects_total",
            "Times this process's LISTEN connection to PostgreSQL was lost or could not be"
            " opened (it is opened again with backoff).",
            (),
        )
        self.log_lock_seconds = self._histogram(
            "opconnect_changelog_lock_hold_seconds",
            "Seconds a write held its change log's head lock, from being granted it to commit"
            " (or rollback), by log: writers of one log wait for each other this long.",
            ("log",),
            LOCK,
        )

        # --- trust ----------------------------------------------------------------------------
        self.trust_reloads = self._counter(
            "opconnect_trust_reloads_total",
            "Reloads of a trust file after it changed, by file (tls_cert, tls_key, operator_ca,"
            " platform_ca, crl, deny_list, gateway_ca) and result (ok, failed: the previous"
            " version stays in force).",
            ("file", "result"),
        )
        # opconnect_certificate_expiry_seconds{file,subject}, opconnect_crl_next_update_seconds,
        # opconnect_deny_list_entries and opconnect_registry_operators{state} are read at scrape
        # time.

        # --- refusals at the gate -------------------------------------------------------------
        self.calls_refused = self._counter(
            "opconnect_calls_refused_total",
            "Calls refused by the per-operator limits before any handler ran, by operator and"
            " reason (RATE_LIMITED, TOO_MANY_STREAMS, TOO_MANY_CALLS).",
            ("operator", "reason"),
        )

        # --- audit and the usage feed --------------------------------------------------------
        self.audit_written = self._counter(
            "opconnect_audit_events_written_total", "Audit events written to the database.", ()
        )
        # opconnect_audit_events_pending is read at scrape time.
        self.feed_position = self._gauge(
            "opconnect_usage_feed_position",
            "The records log position the usage service's feed has stored through (set when"
            " this process holds the records service's token keys, which seal the cursor).",
            (),
        )
        self.feed_lag_seconds = self._gauge(
            "opconnect_usage_feed_lag_seconds",
            "Seconds between now and the time through which the usage feed is known to have"
            " stored every call: its last heartbeat (it was caught up), or else the commit of"
            " the newest call it stored. Healthy it stays below about heartbeat_interval_s;"
            " it grows while the feed is stalled, disconnected or behind.",
            (),
        )
        self.feed_last_batch = self._gauge(
            "opconnect_usage_feed_last_batch_timestamp_seconds",
            "When the usage feed last stored a batch or heartbeat (Unix time).",
            (),
        )
        self.feed_unit_calls = self._histogram(
            "opconnect_usage_feed_unit_calls",
            "Calls the usage feed stored per write unit: the feed's responses that arrived"
            " while the unit before was storing are stored together, up to its batch size.",
            (),
            (0, 10, 50, 100, 250, 500, 1000, 2000),
        )

    # -- families ----------------------------------------------------------------------------

    def _family(self, kind: type[F], name: str, text: str, labels: Sequence[str], **kw: Any) -> F:
        if not self.enabled:
            return cast(F, _NULL)
        return kind(name, text, labelnames=labels, registry=self.registry, **kw)

    def _counter(self, name: str, text: str, labels: Sequence[str]) -> Counter:
        return self._family(Counter, name.removesuffix("_total"), text, labels)

    def _gauge(self, name: str, text: str, labels: Sequence[str]) -> Gauge:
        return self._family(Gauge, name, text, labels)

    def _histogram(
        self, name: str, text: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Histogram:
        return self._family(Histogram, name, text, labels, buckets=buckets)

    def on_scrape(self, name: str, callback: ScrapeFn) -> None:
        """Run `callback` at every scrape (from the HTTP server's thread: it must only read
        state that is safe to read there) and export what it yields."""
        if self.enabled:
            self._callbacks.add(name, callback)

    # -- export ------------------------------------------------------------------------------

    def text(self) -> str:
        """The exposition text of every family (what a scrape returns)."""
        return generate_latest(self.registry).decode()

    def serve(self, listen: str, tls: Tls | None = None) -> Endpoint:
        """Serve the families over HTTP at `listen` (host:port; port 0 picks one).

        On a loopback address (a scraper on the same host) plain HTTP; on any other, HTTPS with
        `tls`: the process's own certificate, and a client certificate required from the CA
        bundle given (no port of the system is open to the network without mutual TLS). The
        files are read again when they change, for the next connection (a rotated certificate
        needs no restart). ValueError for a non-loopback address without `tls`."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        secure = not loopback(host)
        if secure and tls is None:
            raise ValueError(
                f"metrics_listen {listen!r}: a non-loopback address needs TLS files (the"
                " server's certificate and the platform CA bundle)"
            )

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        server = make_server(
            host, int(port), make_wsgi_app(self.registry), Server, handler_class=_Quiet
        )
        server.tls = _ReloadingTls(tls) if secure and tls is not None else None  # None: HTTP
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return Endpoint(host, int(server.server_port), stop, "https" if secure else "http")


@dataclass(frozen=True)
class Tls:
    """The files of a metrics endpoint served over mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str


class _ReloadingTls:
    """The endpoint's TLS context, made again when one of its files changes (checked at each
    connection: scrapes are few). A file that does not load keeps the previous context."""

    def __init__(self, tls: Tls) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamps = self._stamp()
        self._context = self._load()  # raises at start if the files are unusable

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        files = (self._tls.cert_file, self._tls.key_file, self._tls.client_ca_file)
        stamps = []
        for name in files:
            try:
                info = os.stat(name)
            except OSError:
                stamps.append((-1, -1))
                continue
            stamps.append((info.st_ino, info.st_mtime_ns))
        return tuple(stamps)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=self._tls.client_ca_file)
        context.load_cert_chain(self._tls.cert_file, self._tls.key_file)
        return context

    def context(self) -> ssl.SSLContext:
        with self._lock:
            stamps = self._stamp()
            if stamps != self._stamps:
                self._stamps = stamps
                try:
                    self._context = self._load()
                    log.info("metrics TLS files reloaded")
                except (OSError, ssl.SSLError) as error:
                    log.error(
                        "metrics TLS files not reloaded; keeping the previous ones",
                        error=str(error)[:200],
                    )
            return self._context


class _Server(ThreadingWSGIServer):
    """The metrics HTTP server: each connection wrapped in TLS when `tls` is set (the handshake
    runs in the connection's own thread, so a slow or refused client holds up no other)."""

    tls: _ReloadingTls | None = None

    def get_request(self) -> tuple[Any, Any]:
        connection, address = super().get_request()
        if self.tls is not None:
            connection = self.tls.context().wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A refused handshake or a client that went away: one warning, no traceback."""
        log.warning("metrics request failed", error=str(sys.exc_info()[1])[:200])


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def rpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The `grpc_type` label of a method of this cardinality."""
    if client_streaming:
        return "bidi_stream" if server_streaming else "client_stream"
    return "server_stream" if server_streaming else "unary"


def grpc_code(status: str) -> str:
    """The `grpc_code` label of a status name (`INVALID_ARGUMENT` -> `InvalidArgument`)."""
    return GRPC_CODES.get(status, "Unknown")


def loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The families read at scrape time (from `on_scrape` callbacks), all gauges: the catalogue's
# other half. `gauge()` makes no other, so this list is complete.
SCRAPE_FAMILIES = (
    "opconnect_stream_lag_positions",
    "opconnect_stream_lag_seconds",
    "opconnect_changelog_head_position",
    "opconnect_changelog_purged_position",
    "opconnect_stream_tail_items",
    "opconnect_db_pool_connections",
    "opconnect_db_pool_max_connections",
    "opconnect_certificate_expiry_seconds",
    "opconnect_crl_next_update_seconds",
    "opconnect_deny_list_entries",
    "opconnect_registry_operators",
    "opconnect_audit_events_pending",
)


def gauge(name: str, text: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    """A scrape-time gauge family (one of SCRAPE_FAMILIES): add samples with
    `.add_metric(label_values, value)`."""
    if name not in SCRAPE_FAMILIES:
        raise ValueError(f"{name} is not in SCRAPE_FAMILIES (plumbing/metrics.py)")
    return GaugeMetricFamily(name, text, labels=list(labels))


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(value)` for each of `values` (one labelled child), as one update per
    bucket touched: a stream's batch is hundreds of values, observed one by one it would cost
    more than sending them. Uses prometheus-client's layout of a child (the version is pinned);
    a child without it (the no-op family) observes one by one."""
    bounds: list[float] | None = getattr(histogram, "_upper_bounds", None)
    if bounds is None:
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket with value <= bound
    histogram._sum.inc(sum(values))
    buckets = histogram._buckets
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


def count_labels(family: Counter, labels: Iterable[tuple[str, ...]]) -> None:
    """Count one for each label tuple of `labels` on `family`, one `inc` per distinct tuple
    (a batch's outcomes: a handful of children, however large the batch)."""
    counts: dict[tuple[str, ...], int] = {}
    for key in labels:
        counts[key] = counts.get(key, 0) + 1
    for key, count in counts.items():
        family.labels(*key).inc(count)
