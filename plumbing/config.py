"""Configuration: defaults, then a TOML file, then OPCONNECT_* environment variables.

Every setting has a sane default so that `opconnect serve` runs with no file at all. A file is
named by `--config` or OPCONNECT_CONFIG; each key of the file can be overridden by an environment
variable named OPCONNECT_<KEY> in upper case (for example OPCONNECT_DATABASE_URL).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The development set-up's identities: the operator and the platform system that `make run`
# makes certificates for, and that the simulator and `opconnect operator` play by default.
DEV_OPERATOR = "contoso-telecom"
DEV_PLATFORM = "admin-center"


@dataclass(frozen=True)
class Settings:
    """Everything that can be configured, with its default."""

    # Where runtime state lives by default: the embedded database and the development PKI.
    data_dir: Path = Path("var")
    # SQLAlchemy URL; empty means SQLite (WAL) at <data_dir>/opconnect.db.
    # PostgreSQL: postgresql+psycopg://user@host:5432/dbname
    database_url: str = ""
    # PostgreSQL: the URL of the one connection that LISTENs for other replicas' changes. LISTEN
    # needs a session of its own: behind a transaction pooler (pgbouncer), set it to the server
    # itself; empty means database_url.
    database_listen_url: str = ""
    # Address the gateway listens on (mutual TLS only).
    listen: str = "127.0.0.1:50051"
    # TLS files; empty means the development PKI in <data_dir>/pki, made on first run.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # PEM bundle of the CAs that may sign operator certificates (each operator is bound to its
    # own anchors in the registry: `opconnect operators trust`).
    operator_ca_file: str = ""
    # PEM bundle of the CAs that may sign platform certificates: required with your own PKI, and
    # sharing no CA with the operator bundle (start-up refuses otherwise).
    platform_ca_file: str = ""
    # CRL (PEM) of the CA; reloaded while running when the file changes.
    crl_file: str = ""
    # A file of revoked certificate serials (decimal or 0x-hex) or SHA-256 fingerprints, one a
    # line, '#' comments; reloaded while running when it changes.
    deny_list_file: str = ""
    # How often, in seconds, certificate, CRL and deny-list files are checked for changes.
    reload_interval_s: float = 2.0
    # How long, in seconds, an operator's registry status is cached per process.
    registry_cache_s: float = 2.0
    # Where this process serves its Prometheus metrics over HTTP (host:port; port 0 picks a free
    # one); empty: no metrics are kept at all. Plain HTTP on a loopback address only; on any
    # other, HTTPS with the server's certificate, a client certificate required from the
    # platform CA bundle. `make run` sets 127.0.0.1:9464.
    metrics_listen: str = ""
    # Where this process sends its traces (OpenTelemetry, OTLP over gRPC); empty: no tracing
    # at all. `https://collector:4317` (or `collector:4317`) over TLS, the collector's
    # certificate checked against the system's CAs or `otlp_ca_file`; plain `http://` only to
    # a collector on a loopback address. The standard OTEL_* variables tune the rest (sampler,
    # batching, timeout, headers, a client certificate).
    otlp_endpoint: str = ""
    otlp_ca_file: str = ""
    # "json" (production) or "console" (readable on a terminal); "auto" picks console on a TTY.
    log_format: str = "auto"
    log_level: str = "info"
    # Limits.
    max_message_bytes: int = 16 * 1024 * 1024
    max_upload_numbers: int = 10_000
    default_page_size: int = 100
    max_page_size: int = 1_000
    stream_batch_size: int = 500
    max_streams_per_operator: int = 16
    # Unary calls one operator may have in flight at once; more answer RESOURCE_EXHAUSTED
    # (TOO_MANY_CALLS) with RetryInfo.
    max_calls_per_operator: int = 8
    # Units of database work one principal may run at once (more wait, taken in turn between
    # principals; on SQLite writes run one at a time); at most db_threads. Small: the units
    # share one GIL, so more of one principal's units at once slow everyone else's.
    max_db_work_per_operator: int = 2
    # Requests per second per operator (token bucket refill) and the bucket's size.
    rate_per_operator: float = 200.0
    rate_burst: int = 400
    # Streams: seconds between heartbeats while idle.
    heartbeat_interval_s: float = 15.0
    # Live streams that have caught up are served from a shared in-memory tail per log (one
    # database read of the log per wake-up for all of them, of every operator): the most items
    # it keeps per operator followed (0: no tails, every stream reads the database itself).
    stream_tail_items: int = 1_000
    # A call records stream catching up reads this many of its batches at once from the
    # database (each sent as its own response): fewer, larger reads. It holds at most two reads.
    stream_read_batches: int = 4
    # Change-log retention, seconds (numbers assignment log); older changes are purged and
    # cursors before them answer CURSOR_EXPIRED.
    change_log_retention_s: int = 30 * 24 * 3600
    # How often, in seconds, the purge task runs.
    purge_interval_s: float = 3600.0
    # Call records: kept this many seconds after they were published, then purged (cursors
    # before them answer CURSOR_EXPIRED, and older records are refused at publish).
    record_retention_s: int = 30 * 24 * 3600
    # Most records in one StreamCallRecords response (a client may ask for fewer; the default
    # is stream_batch_size).
    max_stream_batch_size: int = 1_000
    # Batches of one PublishCallRecords or SubmitCallDurations stream read and not yet
    # answered: the next ones are checked while one commits (1: one batch at a time).
    publish_pipeline_depth: int = 4
    # Most records of PublishCallRecords batches (of different streams, ready to commit at once)
    # that one transaction commits together (a group commit: one log lock hold, one sync to
    # disk); 1: each batch alone.
    publish_group_max_records: int = 5_000
    # How far in the future, in seconds, a published record's times may be (clock skew).
    clock_skew_s: float = 300.0
    # A following stream with an end_time ends this many seconds after end_time passes (records
    # committed just before end_time are still delivered).
    stream_end_grace_s: float = 2.0
    # Call quality classification (the Teams Call Quality Dashboard defaults): an audio stream
    # of more than quality_min_packets packets is POOR when any metric is above its threshold.
    quality_min_packets: int = 500
    quality_round_trip_ms: float = 500.0
    quality_packet_loss_rate: float = 0.1
    quality_jitter_ms: float = 30.0
    quality_mos_degradation: float = 1.0
    quality_concealed_ratio: float = 0.07
    # Operators' call-duration records are kept this many seconds after the call started (13
    # months: a year of monthly usage); older ones are purged, and refused at submission.
    usage_retention_s: int = 396 * 24 * 3600
    # The usage service follows every operator's calls (records' CallFeedService) over gRPC as a
    # platform principal: where (empty: this process's own address), the CA of the server's
    # certificate and its client certificate and key (empty with the development PKI: made for
    # it; empty otherwise: the feed is off and reconciliation lacks the platform's side).
    feed_target: str = ""
    feed_ca_file: str = ""
    feed_cert_file: str = ""
    feed_key_file: str = ""
    # Separate processes (`opconnect serve --role gateway`): where each service's process
    # listens, and the gateway's client certificate there (a platform certificate named
    # `gateway`; made with the development PKI when these are empty).
    numbers_target: str = ""
    records_target: str = ""
    usage_target: str = ""
    # A target may name several replicas (`ipv4:10.0.0.5:5001,10.0.0.6:5001`, or a DNS name with
    # an address per replica: `dns:///records.internal:5001`): calls are spread (round_robin)
    # and a replica that is down is skipped. The name the service processes' certificates must
    # carry (the gateway and the usage feed check it); empty: the host of the target, or of the
    # first address of a list.
    internal_server_name: str = ""
    internal_ca_file: str = ""
    internal_cert_file: str = ""
    internal_key_file: str = ""
    # A service process believes the principal header only from the gateway pinned here: a CA
    # bundle that signs the gateway's certificate and nothing else, and/or the SHA-256
    # fingerprints of the gateway's certificates (comma separated). One is required for a
    # service process outside the development PKI (which makes a gateway CA).
    gateway_ca_file: str = ""
    gateway_fingerprints: str = ""
    # Reconciliation: an operator's and the platform's durations of a call match when they
    # differ by at most the larger of these seconds and this share of the longer one.
    reconcile_tolerance_s: float = 1.0
    reconcile_tolerance_ratio: float = 0.01
    # Audit events (every operator read of records) are kept this many seconds.
    audit_retention_s: int = 365 * 24 * 3600
    # Numbers kept by the GetNumber read cache (per process; exact, see plumbing/cache.py).
    number_cache_entries: int = 100_000
    # Keys that seal cursors and page tokens (AES-256-GCM): a file of base64url keys, one a line,
    # the first sealing and every one opening; empty means <data_dir>/token-keys, made on first
    # run. `token_keys` (the keys themselves, comma-separated) overrides the file when set.
    token_keys_file: str = ""
    token_keys: str = field(default="", repr=False)
    # Threads that run database work.
    db_threads: int = 8
    # The process's GIL switch interval (sys.setswitchinterval), in seconds; 0 leaves Python's
    # (5 ms). Every database call lets go of the GIL while the driver works and must win it back
    # from whichever thread runs Python then (the event loop, a batch being checked), which
    # holds it up to this long: at Python's 5 ms each statement of a busy process waited
    # milliseconds, and under sustained publishing with live streams the writer fell behind
    # (bench/sustained_bench.py: ack p99 27 s at 5 ms, 0.3 s at 0.5 ms, on one loaded machine).
    gil_switch_interval_s: float = 0.0005
    # PostgreSQL: connections this process keeps in its pool (0: db_threads) and the extra ones
    # it may open at a peak, closed when returned. Every replica's pool_size + max_overflow, plus
    # one LISTEN connection per service process, must fit the server's max_connections (or
    # the pooler's client limit).
    db_pool_size: int = 0
    db_max_overflow: int = 2
    # PostgreSQL: executions of one statement on a connection before psycopg prepares it on the
    # server (its prepare_threshold); 0: never. Set 0 behind a transaction pooler (pgbouncer's
    # pool_mode=transaction), where a prepared statement may be missing on the next transaction's
    # server connection.
    db_prepare_threshold: int = 5
    # Seconds allowed for streams to end cleanly on shutdown.
    shutdown_grace_s: float = 5.0

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'opconnect.db'}"

    @property
    def listen_url(self) -> str:
        """Where the PostgreSQL listener connects (a session of its own)."""
        return self.database_listen_url or self.sqlalchemy_url

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def token_keys_path(self) -> Path:
        return Path(self.token_keys_file) if self.token_keys_file else self.data_dir / "token-keys"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_TYPES: dict[str, type] = {"Path": Path, "str": str, "int": int, "float": float}
# What a TOML file may give for each kind of setting (a bool is never a number).
_FILE_TYPES: dict[str, tuple[type, ...]] = {
    "Path": (str,),
    "str": (str,),
    "int": (int,),
    "float": (int, float),
}


def _coerce(kind: Any, value: Any, key: str, from_text: bool) -> Any:
    """A setting's value of the right type: environment text is converted; file values must
    already have the type (TOML is typed)."""
    target = _TYPES[str(kind)]
    fits = isinstance(value, _FILE_TYPES[str(kind)]) and not isinstance(value, bool)
    if not from_text and not fits:
        raise ValueError(f"setting {key}: {value!r} is not a {target.__name__}")
    try:
        result = target(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {key}: {value!r} is not a valid {target.__name__}") from exc
    if target in (int, float) and result < 0:
        raise ValueError(f"setting {key}: {value!r} must not be negative")
    return result


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from defaults, an optional TOML file and the environment."""
    env = os.environ if env is None else env
    path = path or env.get("OPCONNECT_CONFIG") or None
    values: dict[str, Any] = {}
    known = {f.name: f.type for f in fields(Settings)}
    if path:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(unknown)}")
        values.update({k: _coerce(known[k], v, k, from_text=False) for k, v in data.items()})
    for name, kind in known.items():
        raw = env.get(f"OPCONNECT_{name.upper()}")
        if raw is not None:
            values[name] = _coerce(kind, raw, name, from_text=True)
    return Settings(**values)


def describe() -> list[tuple[str, str]]:
    """(name, default) of every setting, for --help and the README."""
    defaults = Settings()
    shown = {f.name: getattr(defaults, f.name) for f in fields(Settings)}
    return [(k, repr(str(v) if isinstance(v, Path) else v)) for k, v in shown.items()]
