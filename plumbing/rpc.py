"""The per-RPC wrapper every service runs behind: one server interceptor that, for each call,
takes a request id, authenticates the caller, applies the method's access rule and the caller's
limits, runs the handler with the principal in scope, maps errors to rich statuses, and writes one
log line (method, principal, status, duration, request id).

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import grpc
from grpc.aio import AbortError

from plumbing.errors import ApiError, internal, invalid, permission_denied, resource_exhausted
from plumbing.limits import CallSlots
from plumbing.logs import get_logger

log = get_logger("opconnect.rpc")

PrincipalKind = Literal["operator", "platform"]

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


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by the wrapper before the handler runs)."""
    return _principal.get()


def current_request_id() -> str:
    """The request id of the RPC being handled (also in its log line and trailers)."""
    return _request_id.get()


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


class StreamSlots:
    """Counts each principal's open streams against a maximum."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self.open.get(key, 0)
        if count >= self.maximum:
            return False
        self.open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.open.get(key, 1) - 1
        if count:
            self.open[key] = count
        else:
            self.open.pop(key, None)


# Request ids: a random prefix per process and a counter (cheaper than a UUID per call).
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def _request_id_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. `access` maps full method names to their rule; a method not in
    it is refused (fail closed)."""

    def __init__(
        self,
        authenticate: Authenticate,
        access: Mapping[str, Access],
        rate: RateLimiter,
        streams: StreamSlots,
        max_request_bytes: int,
        *,
        calls: CallSlots | None = None,
    ) -> None:
        self._max_request_bytes = max_request_bytes
        self.calls = calls or CallSlots(2**31)
        self._authenticate = authenticate
        self._access = dict(access)
        self._rate = rate
        self.streams = streams

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
        # Requests reach the wrapper as bytes and are decoded there, so that a malformed body is
        # answered INVALID_ARGUMENT with details like every other error (gRPC would say UNKNOWN).
        decode = handler.request_deserializer
        serialize = _encoder(handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(
                    method,
                    access,
                    handler.unary_unary,
                    _decoder(decode, self._max_request_bytes, streaming=False),
                ),
                response_serializer=serialize,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(
                    method,
                    access,
                    handler.unary_stream,
                    _decoder(decode, self._max_request_bytes, streaming=False),
                ),
                response_serializer=serialize,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(
                    method,
                    access,
                    handler.stream_unary,
                    _decoder(decode, self._max_request_bytes, streaming=True),
                ),
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(
                method,
                access,
                handler.stream_stream,
                _decoder(decode, self._max_request_bytes, streaming=True),
            ),
            response_serializer=serialize,
        )

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, access: Access | None
    ) -> Principal:
        principal = await self._authenticate(context)
        if access is None:
            raise permission_denied("METHOD_NOT_ALLOWED", f"{method} is not served to callers")
        if access is Access.OPERATOR and principal.kind != "operator":
            raise permission_denied("OPERATOR_ONLY", "only operators may call this method")
        if access is Access.PLATFORM and principal.kind != "platform":
            raise permission_denied("PLATFORM_ONLY", "only platform systems may call this method")
        if principal.kind == "operator":
            wait = self._rate.take(principal.name)
            if wait is not None:
                raise resource_exhausted(
                    "gateway.opconnect", "RATE_LIMITED", "request rate limit exceeded", wait
                )
        return principal

    def _wrap_unary(
        self,
        method: str,
        access: Access | None,
        behavior: Callable[..., Awaitable[Any]],
        decode: Callable[[Any], Any],
    ) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call_log = _CallLog(method, _request_id_of(context))
            _request_id.set(call_log.request_id)
            slot: str | None = None
            try:
                principal = await self._admit(context, method, access)
                call_log.principal = str(principal)
                _principal.set(principal)
                context.set_trailing_metadata((("x-request-id", call_log.request_id),))
                if principal.kind == "operator":  # its calls in flight (plumbing.limits)
                    self.calls.enter(principal.name)
                    slot = principal.name
                return await behavior(decode(request), context)
            except BaseException as error:  # every way out is logged and mapped once
                await call_log.fail(context, error)
                raise
            finally:
                if slot is not None:
                    self.calls.leave(slot)
                call_log.write(context)

        return call

    def _wrap_stream(
        self,
        method: str,
        access: Access | None,
        behavior: Callable[..., AsyncIterator[Any]],
        decode: Callable[[Any], Any],
    ) -> Callable[..., AsyncIterator[Any]]:
        async def call(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call_log = _CallLog(method, _request_id_of(context))
            _request_id.set(call_log.request_id)
            slot: str | None = None
            try:
                principal = await self._admit(context, method, access)
                call_log.principal = str(principal)
                _principal.set(principal)
                context.set_trailing_metadata((("x-request-id", call_log.request_id),))
                if principal.kind == "operator":
                    if not self.streams.acquire(principal.name):
                        raise resource_exhausted(
                            "gateway.opconnect",
                            "TOO_MANY_STREAMS",
                            f"at most {self.streams.maximum} concurrent streams per operator",
                            1.0,
                        )
                    slot = principal.name
                responses = behavior(decode(request), context)
                if inspect.isawaitable(responses):
                    # A handler that writes with context.write (grpc_health's Watch).
                    await responses
                    return
                async for response in responses:
                    # A revoked certificate or a suspended operator ends an open stream too, at
                    # its next message (heartbeats included); the checks are cached.
                    await self._authenticate(context)
                    call_log.messages += 1
                    yield response
            except BaseException as error:
                await call_log.fail(context, error)
                raise
            finally:
                if slot is not None:
                    self.streams.release(slot)
                call_log.write(context)

        return call


def _malformed() -> ApiError:
    return invalid("opconnect", "REQUEST_MALFORMED", "the request is not a valid protobuf message")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
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
    """What one call did, for its log line."""

    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.principal = "-"
        self.status = "OK"
        self.messages = 0
        self.started = time.perf_counter()

    async def fail(self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
        """Answer the error as the contract says (this raises AbortError for ApiError and bugs)."""
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            self.status = "CANCELLED"
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
        self.status = error.code.name
        status = error.to_status()
        metadata = (*status.trailing_metadata, ("x-request-id", self.request_id))
        await context.abort(status.code, status.details, metadata)

    def write(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.status == "OK" and context.cancelled():
            self.status = "CANCELLED"
        fields: dict[str, Any] = {
            "method": self.method,
            "principal": self.principal,
            "status": self.status,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "request_id": self.request_id,
        }
        if self.messages:
            fields["messages"] = self.messages
        log.info("rpc", **fields)
