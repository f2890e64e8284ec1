"""The gateway of the separate-processes mode: every RPC of a service, forwarded to the process
that serves it, as raw frames.

The gateway's own wrapper (plumbing.rpc) has already authenticated the caller, applied the
method's access rule and the caller's limits; here the request bytes go on unchanged to the
service's process, over mutual TLS as the platform principal `gateway`, with the caller's
principal and the request id in metadata, the caller's deadline as the call's timeout and the
caller's other metadata; the answer (messages, status, details, trailing metadata) comes back
unchanged. A caller that hangs up cancels the forwarded call; a service process that cannot be
reached answers UNAVAILABLE / SERVICE_UNAVAILABLE with RetryInfo, and the gateway's health of
its services says what the process's own health says (`mirror_health`). With tracing on, each
forwarded call is a CLIENT span (child of the gateway's span of the call), and the service process
is sent its `traceparent` in place of the caller's; with tracing off the caller's passes on.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.trace import Tracer

from plumbing.errors import unavailable
from plumbing.logs import get_logger
from plumbing.metrics import Metrics, grpc_code, rpc_type
from plumbing.rpc import PRINCIPAL_HEADER, current_principal, current_request_id
from plumbing.tracing import TRACE_HEADERS, end_rpc_span, start_client_span, traceparent

log = get_logger("opconnect.forward")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# Metadata a caller may not pass on: the transport's own, and what only the gateway says.
_NOT_FORWARDED = {PRINCIPAL_HEADER, "x-request-id", "user-agent", "te", "content-type"}


def _metadata(context: Context, hop: _Hop) -> list[tuple[str, str | bytes]]:
    """The caller's metadata as the service process receives it: the caller's own headers,
    then the principal the gateway authenticated and the request id of this call (and, when
    the hop is traced, its trace context instead of the caller's)."""
    dropped = _NOT_FORWARDED if hop.span is None else _NOT_FORWARDED | TRACE_HEADERS
    out: list[tuple[str, str | bytes]] = [
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if key not in dropped and not key.startswith((":", "grpc-"))
    ]
    if hop.span is not None:
        out += traceparent(hop.span)
    out.append((PRINCIPAL_HEADER, str(current_principal())))
    out.append(("x-request-id", current_request_id()))
    return out


async def _relay_error(context: Context, error: grpc.aio.AioRpcError, path: str) -> None:
    """Answer the caller as the service answered the gateway (this raises AbortError)."""
    trailing = tuple(error.trailing_metadata() or ())
    if error.code() is grpc.StatusCode.UNAVAILABLE and not any(
        key == "grpc-status-details-bin" for key, _ in trailing
    ):
        # The process itself is not there (not an answer of the service's own).
        log.warning("service unreachable", method=path, error=error.details() or "")
        raise unavailable("SERVICE_UNAVAILABLE", "the service is unavailable; retry")
    await context.abort(error.code(), error.details() or "", trailing)


class _Hop:
    """One forwarded call's client-side metrics (go-grpc-prometheus `grpc_client_*`) and,
    tracing on, its span."""

    def __init__(
        self, metrics: Metrics, labels: tuple[str, str, str], tracer: Tracer | None, path: str
    ) -> None:
        self._metrics = metrics
        self._labels = labels
        self.span = None if tracer is None else start_client_span(tracer, path)
        self.started = time.perf_counter()
        self.sent = 0
        self.received = 0
        metrics.client_started.labels(*labels).inc()

    async def count(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for request in requests:
            self.sent += 1
            yield request

    def done(self, code: grpc.StatusCode | None) -> None:
        """The forwarded call ended with `code` (None: the caller went away first)."""
        m, labels = self._metrics, self._labels
        status = "CANCELLED" if code is None else code.name
        m.client_handled.labels(*labels, grpc_code(status)).inc()
        m.client_handling_seconds.labels(*labels).observe(time.perf_counter() - self.started)
        if self.sent:
            m.client_msg_sent.labels(*labels).inc(self.sent)
        if self.received:
            m.client_msg_received.labels(*labels).inc(self.received)
        if self.span is not None:
            end_rpc_span(self.span, status, server=False)


def _ended(error: BaseException) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.aio.AioRpcError) else None


class Forwarder:
    """Generic handlers for the services in `routes` (full service name → the channel to its
    process). Each method is forwarded with its own cardinality, read from the descriptors."""

    def __init__(
        self,
        routes: Mapping[ServiceDescriptor, grpc.aio.Channel],
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._closing = asyncio.Event()
        self._metrics = metrics or Metrics(enabled=False)
        self._tracer = tracer

    def close(self) -> None:
        """The gateway is shutting down: every forwarded stream ends at once with UNAVAILABLE /
        SHUTTING_DOWN (clients resume through another gateway, or this one restarted, from
        their last cursor); unary calls in flight finish."""
        self._closing.set()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        out: list[grpc.GenericRpcHandler] = []
        for service, channel in self._routes.items():
            methods = {}
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                labels = _labels(service, method)
                hop = functools.partial(_Hop, self._metrics, labels, self._tracer, path)
                methods[method.name] = _handler(channel, path, method, self._closing, hop)
            out.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        return out


def _labels(service: ServiceDescriptor, method: Any) -> tuple[str, str, str]:
    kind = rpc_type(method.client_streaming, method.server_streaming)
    return service.full_name, method.name, kind


def _handler(
    channel: grpc.aio.Channel,
    path: str,
    method: Any,
    closing: asyncio.Event,
    hop: Callable[[], _Hop],
) -> grpc.RpcMethodHandler:
    """A method handler that forwards `path` on `channel`, bytes in and bytes out."""
    if not method.client_streaming and not method.server_streaming:
        forward_unary = channel.unary_unary(path)

        async def unary_unary(request: bytes, context: Context) -> bytes:
            figures = hop()
            figures.sent = 1
            call = forward_unary(
                request, timeout=context.time_remaining(), metadata=_metadata(context, figures)
            )
            try:
                response: bytes = await call
            except BaseException as error:
                figures.done(_ended(error))
                if isinstance(error, grpc.aio.AioRpcError):
                    await _relay_error(context, error, path)
                raise
            figures.received = 1
            figures.done(grpc.StatusCode.OK)
            return response

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    if not method.client_streaming:
        forward_stream = channel.unary_stream(path)

        async def unary_stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
            figures = hop()
            figures.sent = 1
            call = forward_stream(
                request, timeout=context.time_remaining(), metadata=_metadata(context, figures)
            )
            async for response in _responses(call, context, path, closing, figures):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream)

    if not method.server_streaming:
        forward_client_stream = channel.stream_unary(path)

        async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
            figures = hop()
            call = forward_client_stream(
                figures.count(requests),
                timeout=context.time_remaining(),
                metadata=_metadata(context, figures),
            )
            try:
                response: bytes = await call
            except BaseException as error:
                figures.done(_ended(error))
                if isinstance(error, grpc.aio.AioRpcError):
                    await _relay_error(context, error, path)
                raise
            finally:
                call.cancel()
            figures.received = 1
            figures.done(grpc.StatusCode.OK)
            return response

        return grpc.stream_unary_rpc_method_handler(stream_unary)

    forward_bidi = channel.stream_stream(path)

    async def stream_stream(
        requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        figures = hop()
        call = forward_bidi(
            figures.count(requests),
            timeout=context.time_remaining(),
            metadata=_metadata(context, figures),
        )
        async for response in _responses(call, context, path, closing, figures):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream)


async def _responses(
    call: Any, context: Context, path: str, closing: asyncio.Event, figures: _Hop
) -> AsyncIterator[bytes]:
    """The forwarded call's responses, until it ends or the gateway shuts down (`closing`);
    when the caller goes (or anything else ends this), the forwarded call is cancelled, so the
    service process frees the stream at once."""
    stop = asyncio.ensure_future(closing.wait())
    code: grpc.StatusCode | None = None
    try:
        while True:
            read = asyncio.ensure_future(call.read())
            await asyncio.wait((read, stop), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                raise unavailable(
                    "SHUTTING_DOWN",
                    "the gateway is shutting down; reconnect and resume from the last cursor",
                )
            response = read.result()
            if response is grpc.aio.EOF:
                code = grpc.StatusCode.OK
                return
            figures.received += 1
            yield response
    except grpc.aio.AioRpcError as error:
        code = error.code()
        await _relay_error(context, error, path)
    finally:
        figures.done(code)
        stop.cancel()
        call.cancel()


async def mirror_health(
    channel: grpc.aio.Channel,
    names: Sequence[str],
    health: HealthServicer,
    retry_s: float = 1.0,
) -> None:
    """Keep the gateway's health of `names` (the services one process serves) that process's
    own: its Health.Watch followed until cancelled; NOT_SERVING while it cannot be reached."""
    watch = health_pb2_grpc.HealthStub(channel).Watch
    unknown_since: float | None = None  # when it was last lost (logged once, and its recovery)
    while True:
        try:
            async for answer in watch(health_pb2.HealthCheckRequest()):
                if unknown_since is not None:  # at the loss's level: seen wherever it was
                    log.warning(
                        "service health known again",
                        services=list(names),
                        status=health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status),
                        after_s=round(time.monotonic() - unknown_since, 1),
                    )
                    unknown_since = None
                for name in names:
                    await health.set(name, answer.status)
        except grpc.aio.AioRpcError as error:
            if unknown_since is None:
                unknown_since = time.monotonic()
                log.warning(
                    "service health unknown; retrying until it answers",
                    services=list(names),
                    code=error.code().name,
                    retry_s=retry_s,
                )
        for name in names:
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(retry_s)
