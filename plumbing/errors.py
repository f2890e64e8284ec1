"""Errors as the contract states them: a gRPC status with a google.rpc.ErrorInfo (UPPER_SNAKE
reason, domain `<area>.opconnect`), plus BadRequest field violations for invalid input and
RetryInfo for limits.

Handlers and rules raise `ApiError`; the per-RPC wrapper (plumbing.rpc) turns it into the status
in one place. Nothing else builds statuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    """One bad field: its path in the request (e.g. `numbers[3].phone_number`) and why."""

    field: str
    description: str
    reason: str = ""


@dataclass
class ApiError(Exception):
    """An error answered to the caller as a gRPC status with rich details."""

    code: grpc.StatusCode
    reason: str
    message: str
    domain: str = "opconnect"
    violations: list[Violation] = field(default_factory=list)
    retry_after_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_status(self) -> grpc.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain, metadata=self.metadata
        )
        details.append(_pack(info))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description, reason=v.reason
                    )
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=details
        )
        return rpc_status.to_status(status)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def invalid(domain: str, reason: str, message: str, *violations: Violation) -> ApiError:
    """INVALID_ARGUMENT with field violations."""
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, domain, list(violations))


def invalid_field(domain: str, reason: str, field_path: str, description: str) -> ApiError:
    """INVALID_ARGUMENT for one bad field: the common case."""
    return invalid(
        domain, reason, f"{field_path}: {description}", Violation(field_path, description, reason)
    )


def not_found(domain: str, reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, reason, message, domain)


def failed_precondition(domain: str, reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, domain)


def unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, reason, message, "gateway.opconnect")


def permission_denied(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, reason, message, "gateway.opconnect")


def resource_exhausted(domain: str, reason: str, message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, domain, retry_after_s=retry_after_s
    )


def unavailable(reason: str, message: str, retry_after_s: float = 1.0) -> ApiError:
    return ApiError(
        grpc.StatusCode.UNAVAILABLE, reason, message, "opconnect", retry_after_s=retry_after_s
    )


def internal() -> ApiError:
    return ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error", "opconnect")
