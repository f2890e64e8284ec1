"""Tracing: OpenTelemetry spans exported over OTLP/gRPC, off unless `otlp_endpoint` is set.

Each process has its own tracer provider (`Tracing`, resource `service.name` =
`opconnect-<role>`), never OpenTelemetry's process-global one: several processes of the system
may run in one Python process (the tests), each exporting as itself. Its tracer is handed to
what makes spans:

- the wrapper (plumbing.rpc): a SERVER span per RPC, named `package.Service/Method`, the
  caller's W3C `traceparent` honoured (its parent);
- the gateway's forwarding hop (gateway.forward) and the usage service's call feed
  (services/usage/feed.py): a CLIENT span per call, its context sent on as `traceparent`;
- each unit of database work (plumbing.db) done for a traced call: a CLIENT span, child of
  the call's span (units of background work outside any call are not traced).

Attributes follow the OpenTelemetry RPC and database conventions (`rpc.system`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code`, `db.system`) and are bounded: method names, status codes,
error reasons, unit names; never phone numbers, tenants, SIP URIs, call ids or an error's
message. Within a process the current span travels in context variables (OpenTelemetry's
context API), so log lines (plumbing.logs) and database units see it.

When tracing is off, `Tracing.tracer` is None: no provider, exporter or thread exists, and the
code that would make spans makes none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from plumbing.metrics import loopback

# The W3C Trace Context headers (`traceparent`, `tracestate`): read from a caller, written to
# the next process. Only this format, whatever OTEL_PROPAGATORS says.
W3C = TraceContextTextMapPropagator()
TRACE_HEADERS = frozenset(W3C.fields)
OTLP_PORT = 4317

# Server spans: the codes that are the server's failure (the RPC conventions); a client span
# is an error for every code but OK.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_CODES = {code.name: code.value[0] for code in grpc.StatusCode}

Metadata = Sequence[tuple[str, str | bytes]]


class Tracing:
    """One process's tracing: its tracer provider and tracer, or none (off)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer: Tracer | None = None
        if provider is not None:
            self.tracer = provider.get_tracer("opconnect")

    def shutdown(self) -> None:
        """Export the spans still queued and stop (blocking: a collector that does not answer
        holds it up to the exporter's timeout, OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default)."""
        if self.provider is not None:
            self.provider.shutdown()


def start_tracing(endpoint: str, ca_file: str, role: str) -> Tracing:
    """Tracing for one process in `role`, exporting to `endpoint` (see `otlp_target`); off
    (no provider at all) when `endpoint` is empty. ValueError on an endpoint refused."""
    if not endpoint:
        return Tracing()
    url, insecure = otlp_target(endpoint)
    credentials = None
    if not insecure and ca_file:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
    exporter = OTLPSpanExporter(endpoint=url, insecure=insecure, credentials=credentials)
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"opconnect-{role}"}),
        shutdown_on_exit=False,  # Runtime.stop shuts it down
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


def otlp_target(endpoint: str) -> tuple[str, bool]:
    """The collector's URL and whether it is reached without TLS: `https://host[:port]` (or
    `host:port`) over TLS, `http://host[:port]` in plain text, for a collector on a loopback
    address only. ValueError for anything else."""
    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    parts = urlsplit(url)
    try:
        port = parts.port or OTLP_PORT
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port < 0:
        raise ValueError(
            f"otlp_endpoint {endpoint!r}: give https://host:port (or http://127.0.0.1:port for"
            " a collector on this machine)"
        )
    if parts.path.strip("/") or parts.query:
        raise ValueError(f"otlp_endpoint {endpoint!r}: OTLP over gRPC takes no path")
    host = parts.hostname
    if parts.scheme == "http" and not loopback(host):
        raise ValueError(
            f"otlp_endpoint {endpoint!r}: spans leave this machine over TLS only (https://);"
            " plain http:// is for a collector on a loopback address"
        )
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}", parts.scheme == "http"


def rpc_attributes(method: str) -> dict[str, str]:
    """The RPC conventions' attributes of a full method name (`/package.Service/Method`)."""
    service, _, name = method.strip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def start_server_span(tracer: Tracer, method: str, metadata: Metadata | None) -> Span:
    """The SERVER span of an RPC received, child of the caller's `traceparent` (if it sent a
    valid one; else the root of a new trace), made current in the calling context. The RPC
    runs in a task of its own, whose context ends with it: nothing is detached."""
    carrier = {key: value for key, value in metadata or () if key in TRACE_HEADERS}
    parent = W3C.extract(carrier, context=Context()) if carrier else Context()
    span = tracer.start_span(method.strip("/"), parent, SpanKind.SERVER, rpc_attributes(method))
    otel_context.attach(trace.set_span_in_context(span))
    return span


def start_client_span(tracer: Tracer, method: str) -> Span:
    """The CLIENT span of an RPC made, child of the current span (not made current)."""
    return tracer.start_span(
        method.strip("/"), kind=SpanKind.CLIENT, attributes=rpc_attributes(method)
    )


def traceparent(span: Span) -> list[tuple[str, str]]:
    """The metadata that carries `span`'s context to the process it calls."""
    carrier: dict[str, str] = {}
    W3C.inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


def end_rpc_span(span: Span, status: str, *, server: bool, reason: str = "") -> None:
    """End an RPC's span with its status name (`OK`, `NOT_FOUND`, ...) and, for an error
    answered, its ErrorInfo reason (a bounded word, never the message)."""
    span.set_attribute("rpc.grpc.status_code", _CODES.get(status, _CODES["UNKNOWN"]))
    if reason:
        span.set_attribute("opconnect.error.reason", reason)
    if status != "OK" and (not server or status in _SERVER_ERRORS):
        span.set_status(Status(StatusCode.ERROR, status))
    span.end()


@contextlib.contextmanager
def client_call(tracer: Tracer | None, method: str) -> Iterator[list[tuple[str, str]]]:
    """Around one RPC made (awaited or iterated inside the block): its CLIENT span, current in
    the block, and the metadata to send with the call (empty when tracing is off)."""
    if tracer is None:
        yield []
        return
    span = start_client_span(tracer, method)
    token = otel_context.attach(trace.set_span_in_context(span))
    status = "OK"
    try:
        yield traceparent(span)
    except grpc.aio.AioRpcError as error:
        status = error.code().name
        raise
    except BaseException:  # cancelled, or the caller stopped reading: the call is abandoned
        status = "CANCELLED"
        raise
    finally:
        otel_context.detach(token)
        end_rpc_span(span, status, server=False)


def unit_span(tracer: Tracer, name: str, attributes: dict[str, Any]) -> Any:
    """A CLIENT span around a unit of database work, current while it runs; exceptions are
    neither recorded nor described (their messages may hold personal data): `failed` sets the
    status."""
    return tracer.start_as_current_span(
        name,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def failed(span: Span, reason: str) -> None:
    """Mark a span failed with a bounded reason (an ErrorInfo reason or an exception type)."""
    span.set_status(Status(StatusCode.ERROR, reason))


def traced() -> bool:
    """Whether the work being done belongs to a span (a traced call)."""
    return trace.get_current_span().get_span_context().is_valid
