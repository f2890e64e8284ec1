"""The per-RPC wrapper every service runs behind: one server interceptor that, for each call,
takes a request id, authenticates the caller, applies the method's access rule and the caller's
limits, runs the handler with the principal in scope, maps errors to rich statuses, and writes one
log line (method, principal, status, duration, request id); with tracing on (plumbing.tracing),
the call is a SERVER span, the caller's `traceparent` its parent.

Handlers raise `ApiError` (plumbing.errors); anything else is a bug, logged with its traceback and
answered INTERNAL with a generic message. Nothing escapes as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import grpc
from cryptography import x509
from grpc.aio import AbortError
from opentelemetry.trace import Span, Tracer

from plumbing.errors import (
    ApiError,
    Kind,
    internal,
    invalid,
    permission_denied,
    resource_exhausted,
)
from plumbing.limits import Slots, too_many_calls
from plumbing.logs import get_logger
from plumbing.metrics import Metrics, grpc_code, rpc_type
from plumbing.status import code_of, to_status
from plumbing.tracing import end_rpc_span, start_server_span

log = get_logger("opconnect.rpc")

# "unverified": a caller whose certificate chains to a trusted CA but who is not admitted
# (revoked, unknown, suspended, not bound to its issuer): served health and reflection only.
PrincipalKind = Literal["operator", "platform", "unverified"]

# Separate processes: the principal the gateway authenticated, as it tells the service process
# ("operator/<id>" or "platform/<name>"); believed from the gateway's own certificate only.
PRINCIPAL_HEADER = "x-opconnect-principal"


@dataclass(frozen=True)
class Principal:
    """Who is calling, as their client certificate says."""

    kind: PrincipalKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


class Access(Enum):
    """Who may call a method."""

    OPERATOR = "operator"  # operator RPCs: an active operator
    PLATFORM = "platform"  # internal RPCs: a platform principal
    ANY = "any"  # health, reflection: any authenticated principal


_principal: ContextVar[Principal] = ContextVar("principal")
_request_id: ContextVar[str] = ContextVar("request_id", default="")
_guard: ContextVar[_StreamGuard | None] = ContextVar("stream_guard", default=None)


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by the wrapper before the handler runs)."""
    return _principal.get()


def current_request_id() -> str:
    """The request id of the RPC being handled (also in its log line and trailers)."""
    return _request_id.get()


def ending_status() -> str:
    """How the stream being handled is ending when its handler sees CancelledError: the
    status the caller is given (UNAUTHENTICATED when the caller was revoked or suspended
    mid-stream, DEADLINE_EXCEEDED when its deadline passed), else CANCELLED."""
    guard = _guard.get()
    if guard is not None:
        if guard.refused is not None:
            return str(code_of(guard.refused).name)
        remaining = guard.context.time_remaining()
        if remaining is not None and remaining <= 0:
            return "DEADLINE_EXCEEDED"
    return "CANCELLED"


def current_operator() -> str:
    """The calling operator's id; only valid in an operator RPC."""
    principal = _principal.get()
    if principal.kind != "operator":
        raise permission_denied("OPERATOR_ONLY", "only operators may call this method")
    return principal.name


def access_rules(rule_by_service: Mapping[Any, Access]) -> dict[str, Access]:
    """The access rule of every method of the given services (protobuf ServiceDescriptors),
    keyed by full method name as the wrapper sees it."""
    return {
        f"/{service.full_name}/{method.name}": rule
        for service, rule in rule_by_service.items()
        for method in service.methods
    }


Authenticate = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]


class RateLimiter:
    """A token bucket per principal: `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float | None:
        """None if allowed; otherwise the seconds to wait before trying again."""
        now = time.monotonic()
        tokens, then = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens - 1.0, now)
        return None


# Request ids: a random prefix per process and a counter (cheaper than a UUID per call).
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def _request_id_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class _StreamGuard:
    """Keeps an open call's caller checked: a watchdog re-authenticates it every
    `interval_s`, and every request message is re-checked before the handler sees it. A
    refusal (revoked, suspended, ...) ends the call with that refusal, whatever the handler is
    waiting for, nothing of a refused request reaching the handler.

    The RPC's task is cancelled only while it waits inside the handler (`in_handler`), never
    while gRPC writes a response, so the cancellation always lands in code that turns it into
    the refusal."""

    def __init__(
        self,
        authenticate: Authenticate,
        context: grpc.aio.ServicerContext[Any, Any],
        interval_s: float,
    ) -> None:
        self._authenticate = authenticate
        self.context = context
        self.refused: ApiError | None = None
        self.in_handler = False
        self._task = asyncio.current_task()
        self._cancelled = False
        # Once the RPC is over its context must not be read again (its call is gone): the
        # watchdog stops then, even when gRPC leaves the handler's generator to be collected.
        self._finished = False
        self._watchdog = asyncio.create_task(self._watch(interval_s))
        context.add_done_callback(self._on_done)

    def _on_done(self, _context: object) -> None:
        self._finished = True
        self._watchdog.cancel()

    async def _watch(self, interval_s: float) -> None:
        while self.refused is None and not self._finished:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except ApiError:
                return  # the call is refused: `refuse` has ended it

    async def check(self) -> None:
        """Re-authenticate the caller; on a refusal, end the call (see the class docstring)."""
        if self.refused is not None:
            raise self.refused
        if self._finished:
            return
        try:
            await self._authenticate(self.context)
        except ApiError as error:
            self.refuse(error)
            raise
        except Exception:
            log.exception("re-checking a caller failed", request_id=current_request_id())
            bug = internal()
            self.refuse(bug)
            raise bug from None

    def refuse(self, error: ApiError) -> None:
        if self.refused is None:
            self.refused = error
        if self.in_handler and self._task is not None and self._task is not asyncio.current_task():
            self._cancelled = True
            self._task.cancel()

    def turn(self, error: BaseException) -> BaseException:
        """What a CancelledError of this call is: the refusal, when the guard caused it."""
        if isinstance(error, asyncio.CancelledError) and self._cancelled and self._task:
            self._cancelled = False
            self._task.uncancel()
            assert self.refused is not None
            return self.refused
        return error

    async def requests(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`messages`, each one let through only after the caller is checked again."""
        async for message in messages:
            await self.check()
            yield message

    def close(self) -> None:
        self._finished = True
        self._watchdog.cancel()


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. `access` maps full method names to their rule; a method not in
    it is refused (fail closed). Open calls re-check their caller every `recheck_interval_s`
    and before each request message (see `_StreamGuard`)."""

    def __init__(
        self,
        authenticate: Authenticate,
        access: Mapping[str, Access],
        rate: RateLimiter,
        streams: Slots,
        max_request_bytes: int,
        *,
        recheck_interval_s: float = 2.0,
        calls: Slots | None = None,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.metrics = metrics or Metrics(enabled=False)
        self._tracer = tracer  # None: tracing is off
        self._figures: dict[str, _Figures] = {}
        self._max_request_bytes = max_request_bytes
        self.calls = calls or Slots(2**31)
        self._authenticate = authenticate
        self._access = dict(access)
        self._rate = rate
        self.streams = streams
        self._recheck_s = recheck_interval_s

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        access = self._access.get(method)
        figures = self._figures.get(method)
        if figures is None:  # the first call of a method the server has (a bounded set)
            kind = rpc_type(handler.request_streaming, handler.response_streaming)
            figures = self._figures[method] = _Figures(self.metrics, method, kind)
        # Requests reach the wrapper as bytes and are decoded there, so that a malformed body is
        # answered INVALID_ARGUMENT with details like every other error (gRPC would say UNKNOWN).
        decode = handler.request_deserializer
        serialize = _encoder(handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(
                    figures,
                    access,
                    handler.unary_unary,
                    _decoder(decode, self._max_request_bytes, streaming=False),
                ),
                response_serializer=serialize,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(
                    figures,
                    access,
                    handler.unary_stream,
                    _decoder(decode, self._max_request_bytes, streaming=False),
                    streaming_requests=False,
                ),
                response_serializer=serialize,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_client_stream(
                    figures,
                    access,
                    handler.stream_unary,
                    _decoder(decode, self._max_request_bytes, streaming=True),
                ),
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(
                figures,
                access,
                handler.stream_stream,
                _decoder(decode, self._max_request_bytes, streaming=True),
                streaming_requests=True,
            ),
            response_serializer=serialize,
        )

    async def _admit(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        access: Access | None,
        call_log: _CallLog,
    ) -> Principal:
        try:
            principal = await self._authenticate(context)
        except ApiError as error:
            call_log.peer = peer_certificate(context)
            if access is not Access.ANY or error.kind is not Kind.UNAUTHENTICATED:
                raise
            # Health and reflection: any caller whose certificate chained to a trusted CA at
            # the handshake, so that a refused one sees its real reason on the actual RPC.
            call_log.refusal = error.reason
            principal = Principal("unverified", call_log.peer[0])
        if access is None:
            raise permission_denied("METHOD_NOT_ALLOWED", f"{method} is not served to callers")
        if access is Access.OPERATOR and principal.kind != "operator":
            raise permission_denied("OPERATOR_ONLY", "only operators may call this method")
        if access is Access.PLATFORM and principal.kind != "platform":
            raise permission_denied("PLATFORM_ONLY", "only platform systems may call this method")
        if principal.kind != "platform":
            wait = self._rate.take(_limit_key(principal))
            if wait is not None:
                self._refused(principal, "RATE_LIMITED")
                raise resource_exhausted(
                    "gateway.opconnect", "RATE_LIMITED", "request rate limit exceeded", wait
                )
        return principal

    def _begin(self, figures: _Figures, context: grpc.aio.ServicerContext[Any, Any]) -> _CallLog:
        """A call begins: its request id and (tracing on) its span, current from here on."""
        span = None
        if self._tracer is not None:
            span = start_server_span(self._tracer, figures.method, context.invocation_metadata())
        call_log = _CallLog(figures, _request_id_of(context), span)
        _request_id.set(call_log.request_id)
        return call_log

    def _refused(self, principal: Principal, reason: str) -> None:
        self.metrics.calls_refused.labels(_who(principal), reason).inc()

    async def _start(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        access: Access | None,
        call_log: _CallLog,
    ) -> Principal:
        try:
            principal = await self._admit(context, method, access, call_log)
        except ApiError:
            call_log.peer = call_log.peer or peer_certificate(context)
            raise
        call_log.principal = str(principal)
        _principal.set(principal)
        context.set_trailing_metadata((("x-request-id", call_log.request_id),))
        return principal

    def _wrap_unary(
        self,
        figures: _Figures,
        access: Access | None,
        behavior: Callable[..., Awaitable[Any]],
        decode: Callable[[Any], Any],
    ) -> Callable[..., Awaitable[Any]]:
        method = figures.method

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call_log = self._begin(figures, context)
            call_log.received = 1
            slot: str | None = None
            try:
                principal = await self._start(context, method, access, call_log)
                if principal.kind == "operator":  # its calls in flight (plumbing.limits)
                    if not self.calls.acquire(principal.name):
                        self._refused(principal, "TOO_MANY_CALLS")
                        raise too_many_calls(self.calls.maximum)
                    slot = principal.name
                response = await behavior(decode(request), context)
                call_log.messages = 1
                return response
            except BaseException as error:  # every way out is logged and mapped once
                await call_log.fail(context, error)
                raise
            finally:
                if slot is not None:
                    self.calls.release(slot)
                call_log.write(context)

        return call

    def _wrap_client_stream(
        self,
        figures: _Figures,
        access: Access | None,
        behavior: Callable[..., Awaitable[Any]],
        decode: Callable[[Any], Any],
    ) -> Callable[..., Awaitable[Any]]:
        """A client stream with one response: every request message is let through only after
        the caller is checked again."""
        method = figures.method

        async def call(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call_log = self._begin(figures, context)
            guard: _StreamGuard | None = None
            try:
                await self._start(context, method, access, call_log)
                guard = _StreamGuard(self._authenticate, context, self._recheck_s)
                _guard.set(guard)
                guard.in_handler = True
                try:
                    counted = call_log.count(decode(requests))
                    response = await behavior(guard.requests(counted), context)
                except BaseException as error:
                    raise guard.turn(error) from None
                call_log.messages = 1
                return response
            except BaseException as error:
                if guard is not None and guard.refused is not None:
                    call_log.peer = peer_certificate(context)
                await call_log.fail(context, error)
                raise
            finally:
                if guard is not None:
                    guard.close()
                call_log.write(context)

        return call

    def _wrap_stream(
        self,
        figures: _Figures,
        access: Access | None,
        behavior: Callable[..., AsyncIterator[Any]],
        decode: Callable[[Any], Any],
        *,
        streaming_requests: bool,
    ) -> Callable[..., AsyncIterator[Any]]:
        method = figures.method

        async def call(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call_log = self._begin(figures, context)
            slot: str | None = None
            guard: _StreamGuard | None = None
            open_streams: Any = None
            try:
                principal = await self._start(context, method, access, call_log)
                if principal.kind != "platform":
                    slot = _limit_key(principal)
                    if not self.streams.acquire(slot):
                        slot = None
                        self._refused(principal, "TOO_MANY_STREAMS")
                        raise resource_exhausted(
                            "gateway.opconnect",
                            "TOO_MANY_STREAMS",
                            f"at most {self.streams.maximum} concurrent streams per operator",
                            1.0,
                        )
                open_streams = figures.open_streams(_who(principal))
                open_streams.inc()
                # A caller admitted only to health and reflection is not re-checked: it is
                # already refused everything else.
                if principal.kind != "unverified":
                    guard = _StreamGuard(self._authenticate, context, self._recheck_s)
                    _guard.set(guard)
                if streaming_requests:
                    requests = call_log.count(decode(request))
                    if guard is not None:
                        requests = guard.requests(requests)
                else:
                    call_log.received = 1
                    requests = decode(request)
                async for response in _guarded(behavior(requests, context), guard):
                    call_log.messages += 1
                    yield response
            except BaseException as error:
                if guard is not None and guard.refused is not None:
                    call_log.peer = peer_certificate(context)
                await call_log.fail(context, error)
                raise
            finally:
                if guard is not None:
                    guard.close()
                if slot is not None:
                    self.streams.release(slot)
                if open_streams is not None:
                    open_streams.dec()
                call_log.write(context)

        return call


async def _guarded(
    responses: AsyncIterator[Any] | Awaitable[None], guard: _StreamGuard | None
) -> AsyncIterator[Any]:
    """A handler's responses, ended by the guard's refusal however the handler waits. The
    handler is closed here, in the call's own context, whatever ends the stream (so its audit
    of the end sees the call's principal and status)."""
    if inspect.isawaitable(responses):  # a handler that writes with context.write (Health.Watch)
        if guard is not None:
            guard.in_handler = True
        try:
            await responses
        except BaseException as error:
            raise (guard.turn(error) if guard is not None else error) from None
        return
    assert isinstance(responses, AsyncGenerator)
    try:
        while True:
            if guard is not None:
                guard.in_handler = True
            try:
                response = await anext(responses)
            except StopAsyncIteration:
                return
            except BaseException as error:
                raise (guard.turn(error) if guard is not None else error) from None
            finally:
                if guard is not None:
                    guard.in_handler = False
            if guard is not None and guard.refused is not None:
                raise guard.refused
            yield response
    finally:
        await responses.aclose()


def _who(principal: Principal) -> str:
    """A caller as a metric label: an (admitted) operator's id, else its kind (`platform`,
    `unverified`): bounded, never a certificate's own words."""
    return principal.name if principal.kind == "operator" else principal.kind


class _Figures:
    """One method's RPC metrics (go-grpc-prometheus names), its label values bound once."""

    def __init__(self, metrics: Metrics, method: str, kind: str) -> None:
        self.method = method
        self.kind = kind
        service, _, name = method.strip("/").partition("/")
        labels = (service, name, kind)
        self._metrics = metrics
        self._labels = labels
        self.started = metrics.server_started.labels(*labels)
        self.seconds = metrics.server_handling_seconds.labels(*labels)
        self.received = metrics.server_msg_received.labels(*labels)
        self.sent = metrics.server_msg_sent.labels(*labels)
        self._handled: dict[str, Any] = {}

    def handled(self, status: str) -> Any:
        child = self._handled.get(status)
        if child is None:
            child = self._handled[status] = self._metrics.server_handled.labels(
                *self._labels, grpc_code(status)
            )
        return child

    def open_streams(self, who: str) -> Any:
        return self._metrics.streams_open.labels(self._labels[0], self._labels[1], who)


def _limit_key(principal: Principal) -> str:
    """Whose limits a call counts against: an operator's id (as always), or an unverified
    caller's claimed identity (health and reflection callers are limited too)."""
    return principal.name if principal.kind == "operator" else str(principal)


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    """The identity (SPIFFE URI path, or the subject) and serial (hex) of the caller's
    certificate, for the log line of a refused call; never key material."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return "-", "-"
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
    except ValueError:
        return "-", "-"
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        uris = []
    prefix = "spiffe://opconnect/"
    identity = ",".join(u.removeprefix(prefix) for u in uris) or cert.subject.rfc4514_string()
    return identity[:200], f"{cert.serial_number:x}"


def _malformed() -> ApiError:
    return invalid("opconnect", "REQUEST_MALFORMED", "the request is not a valid protobuf message")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        Kind.LIMITED,
        "MESSAGE_TOO_LARGE",
        f"a request message may be at most {limit} bytes; send smaller batches",
        "opconnect",
        metadata={"max_bytes": str(limit)},
    )


def _decoder(
    deserialize: Callable[[bytes], Any] | None, limit: int, *, streaming: bool
) -> Callable[[Any], Any]:
    """How the wrapper turns what gRPC hands it (bytes, or an iterator of bytes) into messages,
    refusing a message over the configured size with details (gRPC's own limit, set higher as
    a backstop, would answer without any)."""

    def one(raw: bytes) -> Any:
        if len(raw) > limit:
            raise _too_large(limit)
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:
            raise _malformed() from None

    async def each(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in requests:
            yield one(raw)

    return each if streaming else one


def _encoder(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """How responses are sent: messages are serialized; `bytes` are an already encoded
    response (built from stored records, see plumbing.wire) and are sent as they are."""

    def encode(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        if serialize is None:
            raise TypeError("a handler without a serializer answered a message")
        return serialize(response)

    return encode


class _CallLog:
    """What one call did, for its log line and its metrics."""

    def __init__(self, figures: _Figures, request_id: str, span: Span | None = None) -> None:
        self.figures = figures
        self.span = span
        self.method = figures.method
        self.request_id = request_id
        self.principal = "-"
        self.status = "OK"
        self.messages = 0  # responses sent
        self.received = 0  # requests received
        self.started = time.perf_counter()
        figures.started.inc()
        self.reason = ""  # the ErrorInfo reason of an error answered
        self.refusal = ""  # an unverified caller's reason (served health or reflection anyway)
        self.peer: tuple[str, str] | None = None  # a refused caller's certificate identity, serial

    async def fail(self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
        """Answer the error as the contract says (this raises AbortError for ApiError and bugs)."""
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            remaining = context.time_remaining()
            passed = remaining is not None and remaining <= 0
            self.status = "DEADLINE_EXCEEDED" if passed else "CANCELLED"
            return
        if isinstance(error, AbortError):
            code = context.code()
            self.status = code.name if isinstance(code, grpc.StatusCode) else "ABORTED_BY_HANDLER"
            return
        if not isinstance(error, ApiError):
            log.error(
                "unhandled error", method=self.method, request_id=self.request_id, exc_info=error
            )
            error = internal()
        self.status = code_of(error).name
        self.reason = error.reason
        status = to_status(error)
        metadata = (*status.trailing_metadata, ("x-request-id", self.request_id))
        await context.abort(status.code, status.details, metadata)

    async def count(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The request messages of a stream, counted as they arrive."""
        async for request in requests:
            self.received += 1
            yield request

    def write(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.status == "OK" and context.cancelled():
            self.status = "CANCELLED"
        seconds = time.perf_counter() - self.started
        figures = self.figures
        figures.handled(self.status).inc()
        figures.seconds.observe(seconds)
        if self.received:
            figures.received.inc(self.received)
        if self.messages:
            figures.sent.inc(self.messages)
        fields: dict[str, Any] = {
            "method": self.method,
            "principal": self.principal,
            "status": self.status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": self.request_id,
        }
        if self.messages and figures.kind in ("server_stream", "bidi_stream"):
            fields["messages"] = self.messages
        if self.reason:
            fields["reason"] = self.reason
        if self.refusal:
            fields["refusal"] = self.refusal
        if self.peer is not None:
            fields["certificate"], fields["serial"] = self.peer
        refused = self.status in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        (log.warning if refused else log.info)("rpc", **fields)
        if self.span is not None:
            end_rpc_span(self.span, self.status, server=True, reason=self.reason)
