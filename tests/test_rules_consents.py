"""Unit tier: the consent state machine (services/numbers/consents.py) on domain objects alone:
every (state, move, actor) answered as the table of moves says, reasons checked before any
state is read. Run the fast tier alone with `pytest -m unit`."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from plumbing.errors import ApiError, Kind
from services.numbers.consents import (
    Actor,
    Consent,
    ConsentState,
    Move,
    Reason,
    check_move,
    check_operator_id,
    check_operator_move,
    ends_numbers,
)

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
S = ConsentState
# Who may move a consent from a state (None: none yet) to another: the whole table, written out.
ALLOWED = {
    (None, S.REQUESTED, Actor.CUSTOMER),
    (S.REQUESTED, S.ACTIVE, Actor.OPERATOR),
    (S.REQUESTED, S.DECLINED, Actor.OPERATOR),
    (S.ACTIVE, S.TERMINATED, Actor.OPERATOR),
    (S.REQUESTED, S.WITHDRAWN, Actor.CUSTOMER),
    (S.ACTIVE, S.WITHDRAWN, Actor.CUSTOMER),
    (S.DECLINED, S.REQUESTED, Actor.CUSTOMER),
    (S.TERMINATED, S.REQUESTED, Actor.CUSTOMER),
    (S.WITHDRAWN, S.REQUESTED, Actor.CUSTOMER),
}


def consent(state: ConsentState) -> Consent:
    return Consent(
        "contoso-telecom", "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c", state, Reason.NONE, NOW, NOW
    )


@pytest.mark.parametrize(
    ("current", "target", "actor"),
    list(itertools.product([None, *ConsentState], ConsentState, Actor)),
)
def test_every_move_of_every_actor_from_every_state(
    current: ConsentState | None, target: ConsentState, actor: Actor
) -> None:
    move = Move(target, Reason.NONE, actor)
    found = consent(current) if current is not None else None
    if current is target or (
        actor is Actor.CUSTOMER and target is S.REQUESTED and current is S.ACTIVE
    ):
        assert check_move(found, move) is False  # nothing to change
    elif (current, target, actor) in ALLOWED:
        assert check_move(found, move) is True
    else:
        with pytest.raises(ApiError) as refused:
            check_move(found, move)
        assert (refused.value.kind, refused.value.reason) == (
            Kind.WRONG_STATE,
            "CONSENT_TRANSITION_INVALID",
        )
        assert refused.value.metadata["state"] == (current.name if current else "NONE")


def test_reasons_are_required_where_the_operator_ends_something_and_refused_elsewhere() -> None:
    assert check_operator_move(S.ACTIVE, Reason.NONE) == Move(S.ACTIVE, Reason.NONE, Actor.OPERATOR)
    for state in (S.DECLINED, S.TERMINATED):
        assert check_operator_move(state, Reason.OTHER).reason is Reason.OTHER
        with pytest.raises(ApiError, match="REASON_REQUIRED"):
            check_operator_move(state, Reason.NONE)
    with pytest.raises(ApiError, match="REASON_INVALID"):
        check_operator_move(S.ACTIVE, Reason.NON_PAYMENT)
    for asked in (None, S.REQUESTED, S.WITHDRAWN):
        with pytest.raises(ApiError, match="STATE_INVALID"):
            check_operator_move(asked, Reason.NONE)


def test_only_ending_an_active_consent_concerns_its_numbers() -> None:
    ending = [
        (state, target)
        for state, target in itertools.product(ConsentState, ConsentState)
        if ends_numbers(consent(state), Move(target, Reason.NONE, Actor.OPERATOR))
    ]
    assert ending == [(S.ACTIVE, S.DECLINED), (S.ACTIVE, S.TERMINATED), (S.ACTIVE, S.WITHDRAWN)]


def test_operator_ids_are_identities() -> None:
    assert check_operator_id("contoso-telecom") == "contoso-telecom"
    for bad in ("", "Contoso", "-x", "a" * 64, "a b"):
        with pytest.raises(ApiError, match="OPERATOR_ID_INVALID"):
            check_operator_id(bad)
