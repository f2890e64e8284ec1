"""The numbers domain: its types, and the rules a request must meet before storage sees it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from plumbing.errors import ApiError, Violation, failed_precondition, invalid, invalid_field
from plumbing.validation import check_e164, check_guid, check_sip_uri

DOMAIN = "numbers.opconnect"
LOG = "numbers"  # the assignment change log


class Usage(StrEnum):
    USER = "user"
    VOICE_APP = "voice_app"
    CONFERENCE = "conference"


class TargetKind(StrEnum):
    USER = "user"
    APPLICATION = "application"
    CONFERENCE_BRIDGE = "conference_bridge"


class State(StrEnum):
    UNASSIGNED = "unassigned"
    ASSIGNED = "assigned"


class EventType(StrEnum):
    ASSIGNED = "assigned"
    UNASSIGNED = "unassigned"
    UPDATED = "updated"


class Outcome(StrEnum):
    DONE = "done"
    ALREADY_PRESENT = "already_present"
    REFUSED = "refused"


# What each usage may be assigned to.
TARGET_FOR_USAGE = {
    Usage.USER: TargetKind.USER,
    Usage.VOICE_APP: TargetKind.APPLICATION,
    Usage.CONFERENCE: TargetKind.CONFERENCE_BRIDGE,
}


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    id: str


@dataclass(frozen=True)
class Upload:
    phone_number: str
    usage: Usage | None
    inbound: bool
    outbound: bool


@dataclass(frozen=True)
class Number:
    phone_number: str
    operator_id: str
    tenant_id: str
    usage: Usage
    inbound: bool
    outbound: bool
    state: State
    sip_uri: str
    target: Target | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class Event:
    position: int
    type: EventType
    phone_number: str
    tenant_id: str
    sip_uri: str
    target: Target | None
    occurred_at: dt.datetime


@dataclass(frozen=True)
class Result:
    """The answer for one number of an upload or release."""

    phone_number: str
    outcome: Outcome
    reason: str = ""
    message: str = ""


def refused(number: str, reason: str, message: str) -> Result:
    return Result(number, Outcome.REFUSED, reason, message)


@dataclass(frozen=True)
class Assignment:
    phone_number: str
    tenant_id: str
    sip_uri: str
    target: Target


def normalize_tenant(tenant_id: str, field_path: str = "tenant_id") -> str:
    problem = check_guid(tenant_id)
    if problem:
        raise invalid_field(DOMAIN, "TENANT_ID_INVALID", field_path, problem)
    return tenant_id.lower()


def require_number(phone_number: str, field_path: str = "phone_number") -> str:
    problem = check_e164(phone_number)
    if problem:
        raise invalid_field(DOMAIN, "PHONE_NUMBER_INVALID", field_path, problem)
    return phone_number


def check_batch(count: int, maximum: int, field_path: str) -> None:
    if count == 0:
        raise invalid_field(DOMAIN, "NUMBERS_EMPTY", field_path, "at least one number is required")
    if count > maximum:
        raise invalid_field(
            DOMAIN, "TOO_MANY_NUMBERS", field_path, f"at most {maximum} numbers a request"
        )


def check_upload(upload: Upload, seen: set[str]) -> Result | None:
    """A refusal for one number of an upload, or None if it may be stored."""
    number = upload.phone_number
    problem = check_e164(number)
    if problem:
        return refused(number, "PHONE_NUMBER_INVALID", problem)
    if number in seen:
        return refused(number, "DUPLICATE_IN_REQUEST", "the number appears twice in this request")
    seen.add(number)
    if upload.usage is None:
        return refused(number, "USAGE_INVALID", "usage is required: USER, VOICE_APP or CONFERENCE")
    if not (upload.inbound or upload.outbound):
        return refused(
            number, "CAPABILITIES_INVALID", "a number needs inbound or outbound calling, or both"
        )
    return None


def check_release(number: str, seen: set[str]) -> Result | None:
    problem = check_e164(number)
    if problem:
        return refused(number, "PHONE_NUMBER_INVALID", problem)
    if number in seen:
        return refused(number, "DUPLICATE_IN_REQUEST", "the number appears twice in this request")
    seen.add(number)
    return None


def check_assignment(
    phone_number: str, tenant_id: str, sip_uri: str, target: Target | None
) -> Assignment:
    """Every field of an AssignNumber request, all violations reported at once."""
    violations: list[Violation] = []
    if problem := check_e164(phone_number):
        violations.append(Violation("phone_number", problem, "PHONE_NUMBER_INVALID"))
    if problem := check_guid(tenant_id):
        violations.append(Violation("tenant_id", problem, "TENANT_ID_INVALID"))
    if problem := check_sip_uri(sip_uri):
        violations.append(Violation("sip_uri", problem, "SIP_URI_INVALID"))
    if target is None:
        violations.append(
            Violation(
                "target.kind", "required: USER, APPLICATION or CONFERENCE_BRIDGE", "TARGET_INVALID"
            )
        )
    elif problem := check_guid(target.id):
        violations.append(Violation("target.id", problem, "TARGET_INVALID"))
    if violations:
        first = violations[0]
        raise invalid(DOMAIN, first.reason, f"{first.field}: {first.description}", *violations)
    assert target is not None
    return Assignment(
        phone_number, tenant_id.lower(), sip_uri, Target(target.kind, target.id.lower())
    )


def check_can_assign(number: Number, assignment: Assignment) -> ApiError | None:
    """Domain rules for assigning `number` as `assignment` asks; None when allowed."""
    if number.tenant_id != assignment.tenant_id:
        return failed_precondition(
            DOMAIN, "TENANT_MISMATCH", "the number was uploaded for another tenant"
        )
    expected = TARGET_FOR_USAGE[number.usage]
    if assignment.target.kind != expected:
        return failed_precondition(
            DOMAIN,
            "USAGE_MISMATCH",
            f"a {number.usage.value} number can only be assigned to a {expected.value}",
        )
    if number.usage is Usage.USER and not (number.inbound and number.outbound):
        return failed_precondition(
            DOMAIN, "CAPABILITY_MISSING", "a user number needs inbound and outbound calling"
        )
    return None
