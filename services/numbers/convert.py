"""The protobuf edge of the numbers service: messages in, domain types out, and back."""

from __future__ import annotations

import functools

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import consents_pb2 as consents_pb
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing.wellknown import timestamp
from services.numbers.addresses import (
    TEXT_FIELDS,
    Author,
    CivicAddress,
    EmergencyLocation,
    GeoPoint,
    Location,
    from_json,
)
from services.numbers.consents import Consent, ConsentEvent, ConsentState, Reason
from services.numbers.rules import (
    Event,
    EventType,
    Number,
    Outcome,
    Result,
    State,
    Target,
    TargetKind,
    Upload,
    Usage,
)

USAGE_IN = {
    pb.NUMBER_USAGE_USER: Usage.USER,
    pb.NUMBER_USAGE_VOICE_APP: Usage.VOICE_APP,
    pb.NUMBER_USAGE_CONFERENCE: Usage.CONFERENCE,
}
USAGE_OUT = {v: k for k, v in USAGE_IN.items()}
KIND_IN = {
    pb.AssignmentTarget.KIND_USER: TargetKind.USER,
    pb.AssignmentTarget.KIND_APPLICATION: TargetKind.APPLICATION,
    pb.AssignmentTarget.KIND_CONFERENCE_BRIDGE: TargetKind.CONFERENCE_BRIDGE,
}
KIND_OUT = {v: k for k, v in KIND_IN.items()}
STATE_IN = {
    state_pb.ASSIGNMENT_STATE_UNASSIGNED: State.UNASSIGNED,
    state_pb.ASSIGNMENT_STATE_ASSIGNED: State.ASSIGNED,
}
STATE_OUT = {v: k for k, v in STATE_IN.items()}
EVENT_OUT = {
    EventType.ASSIGNED: pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED,
    EventType.UNASSIGNED: pb.ASSIGNMENT_EVENT_TYPE_UNASSIGNED,
    EventType.UPDATED: pb.ASSIGNMENT_EVENT_TYPE_UPDATED,
}
OUTCOME_OUT = {
    Outcome.DONE: pb.NUMBER_OUTCOME_DONE,
    Outcome.ALREADY_PRESENT: pb.NUMBER_OUTCOME_ALREADY_PRESENT,
    Outcome.REFUSED: pb.NUMBER_OUTCOME_REFUSED,
}


def upload_in(message: pb.NumberUpload) -> Upload:
    return Upload(
        phone_number=message.phone_number,
        usage=USAGE_IN.get(message.usage),
        inbound=message.capabilities.inbound,
        outbound=message.capabilities.outbound,
        calling_profile_id=message.calling_profile_id.lower(),
        civic_address_id=message.civic_address_id.lower(),
        location_id=message.location_id.lower(),
        allow_tenant_address_update=message.allow_tenant_address_update,
        iso_country_code=message.iso_country_code.upper(),
        ticket_id=message.ticket_id,
    )


def target_in(message: pb.AssignNumberRequest) -> Target | None:
    kind = KIND_IN.get(message.target.kind)
    return Target(kind, message.target.id) if kind is not None else None


def state_in(value: int) -> State | None:
    return STATE_IN.get(state_pb.AssignmentState.ValueType(value))


def target_out(target: Target | None) -> pb.AssignmentTarget | None:
    return pb.AssignmentTarget(kind=KIND_OUT[target.kind], id=target.id) if target else None


def number_out(number: Number) -> pb.PhoneNumber:
    out = pb.PhoneNumber(
        phone_number=number.phone_number,
        tenant_id=number.tenant_id,
        usage=USAGE_OUT[number.usage],
        capabilities=pb.Capabilities(inbound=number.inbound, outbound=number.outbound),
        state=STATE_OUT[number.state],
        sip_uri=number.sip_uri,
        target=target_out(number.target),
        create_time=timestamp(number.created_at),
        update_time=timestamp(number.updated_at),
        calling_profile_id=number.calling_profile_id,
        civic_address_id=number.civic_address_id,
        location_id=number.location_id,
        allow_tenant_address_update=number.allow_tenant_address_update,
        iso_country_code=number.iso_country_code,
        ticket_id=number.ticket_id,
    )
    wire = snapshot_out(number.snapshot) if number.snapshot else b""
    if wire:
        out.emergency_location.MergeFromString(wire)
    return out


def result_out(result: Result) -> pb.NumberResult:
    return pb.NumberResult(
        phone_number=result.phone_number,
        outcome=OUTCOME_OUT[result.outcome],
        reason=result.reason,
        message=result.message,
    )


def event_out(event: Event, cursor: str) -> pb.AssignmentEvent:
    out = pb.AssignmentEvent(
        type=EVENT_OUT[event.type],
        phone_number=event.phone_number,
        tenant_id=event.tenant_id,
        sip_uri=event.sip_uri,
        target=target_out(event.target),
        event_time=timestamp(event.occurred_at),
        cursor=cursor,
    )
    wire = snapshot_out(event.snapshot) if event.snapshot else b""
    if wire:
        out.emergency_location.MergeFromString(wire)
    return out


# Distinct snapshots are as many as the locations numbers point at; each costs its JSON text
# and about 0.6 KB of wire form here.
SNAPSHOTS_CACHED = 4096


@functools.lru_cache(maxsize=SNAPSHOTS_CACHED)
def snapshot_out(snapshot: str) -> bytes:
    """A stored emergency location (`addresses.to_json`, not empty) as its `EmergencyLocation`
    message's wire form, made once per distinct snapshot: reading the JSON and building the
    message cost twice the rest of a number's conversion, on every answer and every event
    (an assignment answers the number it changed, so a cache of whole numbers would miss).
    Bytes, immutable, merged into the message being built; a snapshot is never changed in
    place (a new location is a new text), so an entry never goes stale."""
    message = emergency_location_out(from_json(snapshot))
    return message.SerializeToString() if message is not None else b""


# --- civic addresses ---------------------------------------------------------------------------

AUTHOR_OUT = {
    Author.OPERATOR: addresses_pb.CIVIC_ADDRESS_AUTHOR_OPERATOR,
    Author.CUSTOMER: addresses_pb.CIVIC_ADDRESS_AUTHOR_CUSTOMER,
}


def address_in(message: addresses_pb.CivicAddress) -> CivicAddress:
    """A request's address as it came (not yet checked: addresses.check_address); output-only
    fields are left out."""
    point = message.geo_point if message.HasField("geo_point") else None
    return CivicAddress(
        **{name: getattr(message, name) for name in TEXT_FIELDS},
        tenant_id=message.tenant_id,
        geo_point=GeoPoint(point.latitude, point.longitude) if point is not None else None,
        locations=tuple(Location(x.location_id, x.description, x.elin) for x in message.locations),
        id=message.civic_address_id,
    )


def location_out(location: Location) -> addresses_pb.Location:
    return addresses_pb.Location(
        location_id=location.id, description=location.description, elin=location.elin
    )


def address_out(address: CivicAddress) -> addresses_pb.CivicAddress:
    point = address.geo_point
    return addresses_pb.CivicAddress(
        **{name: getattr(address, name) for name in TEXT_FIELDS},
        civic_address_id=address.id,
        tenant_id=address.tenant_id,
        geo_point=addresses_pb.GeoPoint(latitude=point.latitude, longitude=point.longitude)
        if point is not None
        else None,
        locations=[location_out(x) for x in address.locations],
        created_by=AUTHOR_OUT[address.created_by]
        if address.created_by
        else addresses_pb.CIVIC_ADDRESS_AUTHOR_UNSPECIFIED,
        create_time=timestamp(address.created_at) if address.created_at else None,
        update_time=timestamp(address.updated_at) if address.updated_at else None,
    )


def emergency_location_out(
    location: EmergencyLocation | None,
) -> addresses_pb.EmergencyLocation | None:
    if location is None:
        return None
    return addresses_pb.EmergencyLocation(
        civic_address=address_out(location.address),
        location=location_out(location.location) if location.location is not None else None,
    )


# --- consents ----------------------------------------------------------------------------------

CONSENT_STATE_IN = {
    consents_pb.CONSENT_STATE_REQUESTED: ConsentState.REQUESTED,
    consents_pb.CONSENT_STATE_ACTIVE: ConsentState.ACTIVE,
    consents_pb.CONSENT_STATE_DECLINED: ConsentState.DECLINED,
    consents_pb.CONSENT_STATE_TERMINATED: ConsentState.TERMINATED,
    consents_pb.CONSENT_STATE_WITHDRAWN: ConsentState.WITHDRAWN,
}
CONSENT_STATE_OUT = {v: k for k, v in CONSENT_STATE_IN.items()}
REASON_IN = {
    consents_pb.CONSENT_REASON_UNSPECIFIED: Reason.NONE,
    consents_pb.CONSENT_REASON_REGION_NOT_SERVED: Reason.REGION_NOT_SERVED,
    consents_pb.CONSENT_REASON_CUSTOMER_NOT_VERIFIED: Reason.CUSTOMER_NOT_VERIFIED,
    consents_pb.CONSENT_REASON_NO_AGREEMENT: Reason.NO_AGREEMENT,
    consents_pb.CONSENT_REASON_NON_PAYMENT: Reason.NON_PAYMENT,
    consents_pb.CONSENT_REASON_CUSTOMER_REQUEST: Reason.CUSTOMER_REQUEST,
    consents_pb.CONSENT_REASON_OTHER: Reason.OTHER,
}
REASON_OUT = {v: k for k, v in REASON_IN.items()}


def consent_state_in(value: int) -> ConsentState | None:
    return CONSENT_STATE_IN.get(consents_pb.ConsentState.ValueType(value))


def reason_in(value: int) -> Reason | None:
    """None: a number outside the closed list (a newer client's, or garbage)."""
    return REASON_IN.get(consents_pb.ConsentReason.ValueType(value))


def consent_out(consent: Consent) -> consents_pb.Consent:
    return consents_pb.Consent(
        tenant_id=consent.tenant_id,
        operator_id=consent.operator_id,
        state=CONSENT_STATE_OUT[consent.state],
        reason=REASON_OUT[consent.reason],
        create_time=timestamp(consent.created_at),
        update_time=timestamp(consent.updated_at),
    )


def consent_event_out(event: ConsentEvent, cursor: str) -> consents_pb.ConsentEvent:
    previous = event.previous
    return consents_pb.ConsentEvent(
        consent=consent_out(event.consent),
        previous_state=CONSENT_STATE_OUT[previous]
        if previous is not None
        else consents_pb.CONSENT_STATE_UNSPECIFIED,
        event_time=timestamp(event.occurred_at),
        cursor=cursor,
    )
