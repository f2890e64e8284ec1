"""The server's answer when a call fails, decoded: its gRPC status and the `google.rpc` details
every opconnect error carries (ErrorInfo's reason, BadRequest's field violations, RetryInfo's
delay), and which failures are worth retrying.

grpc.aio reports `INTERNAL: Internal error from Core` instead of the server's status when the
server ends a client-streaming or bidirectional call while the client still has a write pending
(grpc/grpc#36066). `lost_status` recognises that report: the call ended, but its real status
was overwritten on the client. The library never shows it as the server's answer: it opens the
call again in a way that cannot lose the status (see `durations`), so the caller sees what the
server really said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

CORE_INTERNAL = "Internal error from Core"  # grpc/grpc#36066's message

# Failures that end a call without saying anything about the request itself: the server or
# the way to it was unavailable, or a limit asks to come back later (RetryInfo says when).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class ClientError(Exception):
    """A problem on the client's side, found before any call (files, options): one line."""


@dataclass(eq=False)
class ServerError(Exception):
    """A call that failed, with what the server said."""

    code: grpc.StatusCode
    message: str
    reason: str = ""  # google.rpc.ErrorInfo.reason, e.g. CURSOR_EXPIRED
    domain: str = ""
    violations: dict[str, str] = field(default_factory=dict)  # field path -> what is wrong
    retry_after_s: float | None = None  # google.rpc.RetryInfo.retry_delay

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" ({self.reason})"
        for path, problem in self.violations.items():
            text += f"; {path}: {problem}"
        return text

    @property
    def retryable(self) -> bool:
        """Worth calling again later: the server was unavailable, or a limit with a RetryInfo
        (a RESOURCE_EXHAUSTED without one, such as a message too large, never passes)."""
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self.retry_after_s is not None
        return self.code in RETRYABLE


def lost_status(error: grpc.RpcError) -> bool:
    """The call ended while a write was pending and grpc.aio replaced the server's status with
    its own INTERNAL (grpc/grpc#36066): nothing is known of what the server said."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    return code == grpc.StatusCode.INTERNAL and details == CORE_INTERNAL


def server_error(error: grpc.RpcError) -> ServerError:
    """What the server said in a failed call (its status and google.rpc details)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or ""
    reason = domain = ""
    violations: dict[str, str] = {}
    retry: float | None = None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain = info.reason, info.domain
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.update({v.field: v.description for v in bad.field_violations})
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                later = error_details_pb2.RetryInfo()
                detail.Unpack(later)
                retry = later.retry_delay.ToNanoseconds() / 1e9
    return ServerError(code, message, reason, domain, violations, retry)
