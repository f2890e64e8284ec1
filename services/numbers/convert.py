"""The protobuf edge of the numbers service: messages in, domain types out, and back."""

from __future__ import annotations

from opconnect.numbers.v1 import consents_pb2 as consents_pb
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing.wellknown import timestamp
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
    )


def target_in(message: pb.AssignNumberRequest) -> Target | None:
    kind = KIND_IN.get(message.target.kind)
    return Target(kind, message.target.id) if kind is not None else None


def state_in(value: int) -> State | None:
    return STATE_IN.get(state_pb.AssignmentState.ValueType(value))


def target_out(target: Target | None) -> pb.AssignmentTarget | None:
    return pb.AssignmentTarget(kind=KIND_OUT[target.kind], id=target.id) if target else None


def number_out(number: Number) -> pb.PhoneNumber:
    return pb.PhoneNumber(
        phone_number=number.phone_number,
        tenant_id=number.tenant_id,
        usage=USAGE_OUT[number.usage],
        capabilities=pb.Capabilities(inbound=number.inbound, outbound=number.outbound),
        state=STATE_OUT[number.state],
        sip_uri=number.sip_uri,
        target=target_out(number.target),
        create_time=timestamp(number.created_at),
        update_time=timestamp(number.updated_at),
    )


def result_out(result: Result) -> pb.NumberResult:
    return pb.NumberResult(
        phone_number=result.phone_number,
        outcome=OUTCOME_OUT[result.outcome],
        reason=result.reason,
        message=result.message,
    )


def event_out(event: Event, cursor: str) -> pb.AssignmentEvent:
    return pb.AssignmentEvent(
        type=EVENT_OUT[event.type],
        phone_number=event.phone_number,
        tenant_id=event.tenant_id,
        sip_uri=event.sip_uri,
        target=target_out(event.target),
        event_time=timestamp(event.occurred_at),
        cursor=cursor,
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
