"""Errors in the domain's own terms: what went wrong (a `Kind`: invalid input, not found, the
wrong state, a conflict, a limit, unavailable, ...), an UPPER_SNAKE reason, the domain
(`<area>.opconnect`), a message, and the bad fields, a retry delay or metadata where they apply.

Rules, storage and handlers raise `ApiError`; nothing here knows gRPC. The edge
(plumbing.status, used by the per-RPC wrapper) maps each kind to its gRPC status code and the
error to a status with google.rpc details, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(Enum):
    """What kind of error, in the domain's words (the edge maps each to a gRPC code)."""

    INVALID = "invalid"  # the request is wrong (INVALID_ARGUMENT)
    NOT_FOUND = "not_found"  # no such thing, or another operator's (NOT_FOUND)
    WRONG_STATE = "wrong_state"  # right request, wrong moment (FAILED_PRECONDITION)
    CONFLICT = "conflict"  # a concurrent change won (ABORTED)
    LIMITED = "limited"  # over a limit; retry after a delay (RESOURCE_EXHAUSTED)
    UNAVAILABLE = "unavailable"  # storage down, shutting down; retry (UNAVAILABLE)
    UNAUTHENTICATED = "unauthenticated"  # who is calling is not established (UNAUTHENTICATED)
    FORBIDDEN = "forbidden"  # known caller, not allowed (PERMISSION_DENIED)
    BUG = "bug"  # ours (INTERNAL, with a generic message)


@dataclass(frozen=True)
class Violation:
    """One bad field: its path in the request (e.g. `numbers[3].phone_number`) and why."""

    field: str
    description: str
    reason: str = ""


@dataclass
class ApiError(Exception):
    """An error answered to the caller (see the module docstring)."""

    kind: Kind
    reason: str
    message: str
    domain: str = "opconnect"
    violations: list[Violation] = field(default_factory=list)
    retry_after_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind.name} {self.reason}: {self.message}"


def invalid(domain: str, reason: str, message: str, *violations: Violation) -> ApiError:
    """INVALID_ARGUMENT with field violations."""
    return ApiError(Kind.INVALID, reason, message, domain, list(violations))


def invalid_field(domain: str, reason: str, field_path: str, description: str) -> ApiError:
    """INVALID_ARGUMENT for one bad field: the common case."""
    return invalid(
        domain, reason, f"{field_path}: {description}", Violation(field_path, description, reason)
    )


def not_found(domain: str, reason: str, message: str) -> ApiError:
    return ApiError(Kind.NOT_FOUND, reason, message, domain)


def failed_precondition(domain: str, reason: str, message: str) -> ApiError:
    return ApiError(Kind.WRONG_STATE, reason, message, domain)


def unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(Kind.UNAUTHENTICATED, reason, message, "gateway.opconnect")


def permission_denied(reason: str, message: str) -> ApiError:
    return ApiError(Kind.FORBIDDEN, reason, message, "gateway.opconnect")


def resource_exhausted(domain: str, reason: str, message: str, retry_after_s: float) -> ApiError:
    return ApiError(Kind.LIMITED, reason, message, domain, retry_after_s=retry_after_s)


def unavailable(reason: str, message: str, retry_after_s: float = 1.0) -> ApiError:
    return ApiError(Kind.UNAVAILABLE, reason, message, "opconnect", retry_after_s=retry_after_s)


def internal() -> ApiError:
    return ApiError(Kind.BUG, "INTERNAL", "internal error", "opconnect")
