"""The numbers domain: its types, and the rules a request must meet before storage sees it."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import iso3166
import phonenumbers

from plumbing.errors import ApiError, Violation, failed_precondition, invalid, invalid_field
from plumbing.validation import check_e164, check_guid, check_sip_uri

if TYPE_CHECKING:
    from services.numbers.addresses import EmergencyLocation

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
    calling_profile_id: str = ""
    civic_address_id: str = ""
    location_id: str = ""
    allow_tenant_address_update: bool = False
    iso_country_code: str = ""
    ticket_id: str = ""


# The fields of a number that an upload sets and UpdateNumber may change (AIP-134 paths).
UPDATABLE = frozenset(
    {
        "civic_address_id",
        "location_id",
        "allow_tenant_address_update",
        "calling_profile_id",
        "ticket_id",
    }
)
TICKET_ID_MAX = 64
# North American toll-free codes: the digits do not say the country (US, CA, ...).
NANP_TOLL_FREE = ("+1800", "+1833", "+1844", "+1855", "+1866", "+1877", "+1888")


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
    calling_profile_id: str = ""
    civic_address_id: str = ""
    location_id: str = ""
    allow_tenant_address_update: bool = False
    iso_country_code: str = ""
    ticket_id: str = ""
    # The emergency location as stored with the number (addresses.to_json; "" for none): an
    # assignment copies it into its event as it is, read only where it is shown.
    snapshot: str = ""

    @functools.cached_property
    def emergency_location(self) -> EmergencyLocation | None:
        return _emergency_location(self.snapshot)


@dataclass(frozen=True)
class Event:
    position: int
    type: EventType
    phone_number: str
    tenant_id: str
    sip_uri: str
    target: Target | None
    occurred_at: dt.datetime
    snapshot: str = ""  # the number's emergency location when the change was committed
    # The operator whose event it is, as the log-wide read gives it (the shared tail's key;
    # "" where the reader already knows it): never part of what the event is.
    operator_id: str = field(default="", compare=False)

    @functools.cached_property
    def emergency_location(self) -> EmergencyLocation | None:
        return _emergency_location(self.snapshot)


def _emergency_location(snapshot: str) -> EmergencyLocation | None:
    from services.numbers.addresses import from_json  # noqa: PLC0415 (addresses imports rules)

    return from_json(snapshot)


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
    refusal = check_number_fields(
        number,
        upload.usage,
        calling_profile_id=upload.calling_profile_id,
        civic_address_id=upload.civic_address_id,
        location_id=upload.location_id,
        allow_tenant_address_update=upload.allow_tenant_address_update,
        ticket_id=upload.ticket_id,
    )
    if refusal is None:
        refusal = check_iso_country(number, upload.iso_country_code)
    return None if refusal is None else refused(number, *refusal)


def check_number_fields(
    number: str,
    usage: Usage | None,
    *,
    calling_profile_id: str,
    civic_address_id: str,
    location_id: str,
    allow_tenant_address_update: bool,
    ticket_id: str,
) -> tuple[str, str] | None:
    """(reason, description) of the first of a number's fields that breaks a rule, or None.
    Shared by upload and UpdateNumber (which checks the number as it would be)."""
    if calling_profile_id and check_guid(calling_profile_id):
        return "CALLING_PROFILE_ID_INVALID", "calling_profile_id: not a GUID"
    if civic_address_id and check_guid(civic_address_id):
        return "CIVIC_ADDRESS_NOT_FOUND", "civic_address_id: not a civic address id"
    if location_id and (not civic_address_id or check_guid(location_id)):
        return "LOCATION_NOT_FOUND", "location_id: not a location of the number's address"
    if usage is Usage.USER and not civic_address_id and not allow_tenant_address_update:
        return (
            "CIVIC_ADDRESS_REQUIRED",
            "a USER number needs a civic_address_id, unless allow_tenant_address_update lets"
            " the customer set it",
        )
    if len(ticket_id) > TICKET_ID_MAX or not ticket_id.isprintable():
        return "TICKET_ID_INVALID", f"ticket_id: up to {TICKET_ID_MAX} printable characters"
    return None


def check_iso_country(number: str, code: str) -> tuple[str, str] | None:
    """(reason, description) when a number's ISO country is missing or wrong, or None: it is
    required for a North American toll-free number, and otherwise must be one of the countries
    the number's calling code serves (phonenumbers' list)."""
    if not code:
        if number.startswith(NANP_TOLL_FREE):
            return (
                "ISO_COUNTRY_CODE_REQUIRED",
                "iso_country_code: required for a North American toll-free number (e.g. US, CA)",
            )
        return None
    if code not in iso3166.countries_by_alpha2:
        return "ISO_COUNTRY_CODE_INVALID", "iso_country_code: not ISO 3166-1 alpha-2 (e.g. US)"
    try:
        calling_code = phonenumbers.parse(number).country_code or 0
    except phonenumbers.NumberParseException:
        return None  # a code no list knows: nothing to check against
    served = [r for r in phonenumbers.region_codes_for_country_code(calling_code) if r != "001"]
    if served and code not in served:
        return (
            "ISO_COUNTRY_CODE_INVALID",
            f"iso_country_code: +{calling_code} does not serve that country",
        )
    return None


def check_number_mask(paths: list[str]) -> frozenset[str]:
    if not paths:
        raise invalid_field(
            DOMAIN, "UPDATE_MASK_INVALID", "update_mask", "name at least one field to change"
        )
    for path in paths:
        if path not in UPDATABLE:
            raise invalid_field(
                DOMAIN,
                "UPDATE_MASK_INVALID",
                "update_mask",
                f"not a field you may change: {path!r}",
            )
    return frozenset(paths)


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
