"""Consents: the relationship between a customer tenant and an operator, as an explicit state
machine (domain types and rules only; storage in consent_storage.py, the protobuf edge in
convert.py).

    (none) ----------------------> REQUESTED          customer (CreateConsent)
    REQUESTED -------------------> ACTIVE             operator (agreement signed; no reason)
    REQUESTED -------------------> DECLINED           operator (a reason)
    ACTIVE ----------------------> TERMINATED         operator (a reason)
    REQUESTED, ACTIVE -----------> WITHDRAWN          customer (WithdrawConsent)
    DECLINED, TERMINATED, WITHDRAWN -> REQUESTED      customer (CreateConsent again)

A move to the state the consent is already in changes nothing (retries are safe). Any other move
is refused with FAILED_PRECONDITION / CONSENT_TRANSITION_INVALID naming the current state. Ending
an ACTIVE consent is refused while any of the tenant's numbers of the operator is assigned
(CONSENT_NUMBERS_ASSIGNED; storage checks it, under the consent's row lock). Reasons are a closed
list: free text could carry personal data, and a list lets both sides act on it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from plumbing.errors import ApiError, failed_precondition, invalid_field
from plumbing.validation import IDENTITY
from services.numbers.rules import DOMAIN

LOG = "consents"  # the consent change log


class ConsentState(StrEnum):
    REQUESTED = "requested"
    ACTIVE = "active"
    DECLINED = "declined"
    TERMINATED = "terminated"
    WITHDRAWN = "withdrawn"


class Reason(StrEnum):
    NONE = ""
    REGION_NOT_SERVED = "region_not_served"
    CUSTOMER_NOT_VERIFIED = "customer_not_verified"
    NO_AGREEMENT = "no_agreement"
    NON_PAYMENT = "non_payment"
    CUSTOMER_REQUEST = "customer_request"
    OTHER = "other"


class Actor(StrEnum):
    """Who moves a consent: the operator (ConsentService) or the customer (the admin center)."""

    OPERATOR = "operator"
    CUSTOMER = "customer"


ENDED = frozenset({ConsentState.DECLINED, ConsentState.TERMINATED, ConsentState.WITHDRAWN})

# Every allowed move: (from, to) -> who may make it. None as `from`: the consent does not exist.
MOVES: dict[tuple[ConsentState | None, ConsentState], Actor] = {
    (None, ConsentState.REQUESTED): Actor.CUSTOMER,
    (ConsentState.REQUESTED, ConsentState.ACTIVE): Actor.OPERATOR,
    (ConsentState.REQUESTED, ConsentState.DECLINED): Actor.OPERATOR,
    (ConsentState.ACTIVE, ConsentState.TERMINATED): Actor.OPERATOR,
    (ConsentState.REQUESTED, ConsentState.WITHDRAWN): Actor.CUSTOMER,
    (ConsentState.ACTIVE, ConsentState.WITHDRAWN): Actor.CUSTOMER,
    **{(ended, ConsentState.REQUESTED): Actor.CUSTOMER for ended in ENDED},
}
# The states an operator may ask for, and those that need a reason.
OPERATOR_TARGETS = frozenset({ConsentState.ACTIVE, ConsentState.DECLINED, ConsentState.TERMINATED})
NEEDS_REASON = frozenset({ConsentState.DECLINED, ConsentState.TERMINATED})


@dataclass(frozen=True)
class Consent:
    operator_id: str
    tenant_id: str
    state: ConsentState
    reason: Reason
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class ConsentEvent:
    position: int
    consent: Consent
    previous: ConsentState | None  # None: the consent was created
    occurred_at: dt.datetime


@dataclass(frozen=True)
class Move:
    """A requested move: to `state`, with `reason`, by `actor`."""

    state: ConsentState
    reason: Reason
    actor: Actor


def check_operator_id(operator_id: str, field_path: str = "operator_id") -> str:
    if IDENTITY.fullmatch(operator_id) is None:
        raise invalid_field(
            DOMAIN,
            "OPERATOR_ID_INVALID",
            field_path,
            "an operator id: lowercase letters, digits and '-', at most 63 characters",
        )
    return operator_id


def check_operator_move(state: ConsentState | None, reason: Reason) -> Move:
    """An UpdateConsentStatus request's own fields (before the consent is read)."""
    if state not in OPERATOR_TARGETS:
        raise invalid_field(
            DOMAIN, "STATE_INVALID", "state", "the state to move to: ACTIVE, DECLINED or TERMINATED"
        )
    if state in NEEDS_REASON and reason is Reason.NONE:
        raise invalid_field(
            DOMAIN, "REASON_REQUIRED", "reason", f"a reason is required to move to {state.name}"
        )
    if state not in NEEDS_REASON and reason is not Reason.NONE:
        raise invalid_field(DOMAIN, "REASON_INVALID", "reason", f"{state.name} takes no reason")
    return Move(state, reason, Actor.OPERATOR)


def refused_move(current: ConsentState | None, target: ConsentState) -> ApiError:
    shown = current.name if current is not None else "NONE"
    error = failed_precondition(
        DOMAIN,
        "CONSENT_TRANSITION_INVALID",
        f"a consent in state {shown} cannot move to {target.name}",
    )
    error.metadata["state"] = shown
    return error


def check_move(current: Consent | None, move: Move) -> bool:
    """Whether `move` changes `current`: False when it is in that state already (a retry, or a
    request to create a consent that is REQUESTED or ACTIVE); raises when the move is not
    allowed from its state or not by that actor."""
    state = current.state if current is not None else None
    if state is move.state:
        return False
    asks_again = move.actor is Actor.CUSTOMER and move.state is ConsentState.REQUESTED
    if asks_again and state is ConsentState.ACTIVE:
        return False  # the customer asks for what it has: nothing to do
    if MOVES.get((state, move.state)) is not move.actor:
        raise refused_move(state, move.state)
    return True


def ends_numbers(current: Consent, move: Move) -> bool:
    """Whether the move ends an ACTIVE consent (then no number of the tenant may be assigned)."""
    return current.state is ConsentState.ACTIVE and move.state in ENDED


def numbers_assigned() -> ApiError:
    return failed_precondition(
        DOMAIN,
        "CONSENT_NUMBERS_ASSIGNED",
        "numbers of the tenant are assigned; unassign them in the Teams admin center first",
    )
