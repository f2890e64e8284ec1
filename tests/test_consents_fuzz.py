"""Consents under hypothesis, through the real server: every request field fuzzed answers a clear
error (INVALID_ARGUMENT with ErrorInfo and a BadRequest violation naming the field, or
NOT_FOUND for a well-formed unknown tenant), never INTERNAL or UNKNOWN; and random sequences of
moves by both sides leave a consent exactly where a model of the state machine says."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opconnect.numbers.v1 import consents_pb2 as pb
from opconnect.numbers.v1 import consents_pb2_grpc
from plumbing.validation import IDENTITY, check_guid
from tests.conftest import OPERATOR, PLATFORM, TENANT, RunningSystem, rich_error

DOMAIN = "numbers.opconnect"
fuzz = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
texts = st.text(max_size=80)
near_guids = st.from_regex(r"[0-9a-fA-FgG-]{30,40}", fullmatch=True)


@dataclass
class Clients:
    consents: consents_pb2_grpc.ConsentServiceStub
    admin: consents_pb2_grpc.ConsentAdminServiceStub


@pytest.fixture(scope="module")
def clients(fuzz_system: RunningSystem) -> Clients:
    return Clients(
        consents_pb2_grpc.ConsentServiceStub(fuzz_system.channel("operator", OPERATOR)),
        consents_pb2_grpc.ConsentAdminServiceStub(fuzz_system.channel("platform", PLATFORM)),
    )


def assert_still_serving(clients: Clients) -> None:
    got = clients.consents.GetConsent(pb.GetConsentRequest(tenant_id=TENANT), timeout=10)
    assert got.consent.state == pb.CONSENT_STATE_ACTIVE


def assert_invalid(error: grpc.RpcError, field: str, reason: str) -> None:
    rich = rich_error(error)
    assert (rich.code, rich.reason, rich.domain, rich.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        DOMAIN,
        {field: reason},
    )


@fuzz
@given(value=st.one_of(texts, near_guids))
def test_get_and_update_with_any_tenant(clients: Clients, value: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: clients.consents.GetConsent(pb.GetConsentRequest(tenant_id=value), timeout=10),
        lambda: clients.consents.UpdateConsentStatus(
            pb.UpdateConsentStatusRequest(tenant_id=value, state=pb.CONSENT_STATE_ACTIVE),
            timeout=10,
        ),
        lambda: clients.admin.WithdrawConsent(
            pb.WithdrawConsentRequest(tenant_id=value, operator_id=OPERATOR), timeout=10
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        if check_guid(value) is None:  # well formed: no consent with that tenant
            assert rich_error(caught.value).code == grpc.StatusCode.NOT_FOUND
        else:
            assert_invalid(caught.value, "tenant_id", "TENANT_ID_INVALID")
    assert_still_serving(clients)


@fuzz
@given(value=texts)
def test_create_with_any_operator_id(clients: Clients, value: str) -> None:
    tenant = str(uuid.uuid4())
    request = pb.CreateConsentRequest(tenant_id=tenant, operator_id=value)
    if IDENTITY.fullmatch(value):
        made = clients.admin.CreateConsent(request, timeout=10)
        assert (made.consent.operator_id, made.consent.state) == (value, pb.CONSENT_STATE_REQUESTED)
    else:
        with pytest.raises(grpc.RpcError) as caught:
            clients.admin.CreateConsent(request, timeout=10)
        assert_invalid(caught.value, "operator_id", "OPERATOR_ID_INVALID")
    assert_still_serving(clients)


@fuzz
@given(state=st.integers(-5, 10), reason=st.integers(-5, 10))
def test_update_with_any_state_and_reason(clients: Clients, state: int, reason: int) -> None:
    tenant = str(uuid.uuid4())
    clients.admin.CreateConsent(pb.CreateConsentRequest(tenant_id=tenant, operator_id=OPERATOR))
    request = pb.UpdateConsentStatusRequest(tenant_id=tenant, state=state, reason=reason)  # type: ignore[arg-type]
    try:
        answer = clients.consents.UpdateConsentStatus(request, timeout=10)
    except grpc.RpcError as error:
        rich = rich_error(error)
        assert rich.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert rich.reason in {
            "STATE_INVALID",
            "REASON_INVALID",
            "REASON_REQUIRED",
            "CONSENT_TRANSITION_INVALID",
        }, rich
    else:  # from REQUESTED: accepted, or declined with a known reason
        assert (state, reason) == (pb.CONSENT_STATE_ACTIVE, 0) or (
            state == pb.CONSENT_STATE_DECLINED and 1 <= reason <= 6
        )
        assert answer.consent.state == state
    assert_still_serving(clients)


@fuzz
@given(
    cursor=st.text(min_size=1, max_size=200),
    token=st.text(min_size=1, max_size=200),
    size=st.integers(-(2**31), -1),
)
def test_watch_and_list_with_bad_cursors_tokens_and_sizes(
    clients: Clients, cursor: str, token: str, size: int
) -> None:
    stream = clients.consents.WatchConsents(pb.WatchConsentsRequest(cursor=cursor), timeout=10)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
    finally:
        stream.cancel()
    assert_invalid(caught.value, "cursor", "CURSOR_INVALID")
    with pytest.raises(grpc.RpcError) as bad_token:
        clients.consents.ListConsents(pb.ListConsentsRequest(page_token=token), timeout=10)
    assert_invalid(bad_token.value, "page_token", "PAGE_TOKEN_INVALID")
    with pytest.raises(grpc.RpcError) as bad_size:
        clients.consents.ListConsents(pb.ListConsentsRequest(page_size=size), timeout=10)
    assert_invalid(bad_size.value, "page_size", "PAGE_SIZE_INVALID")
    assert_still_serving(clients)


# --- random sequences of moves against a model -------------------------------------------------

R, A, D, T, W = "requested", "active", "declined", "terminated", "withdrawn"
# The model: (move, state before or None) -> the state after; absent: refused.
MODEL: dict[tuple[str, str | None], str] = {
    ("request", None): R,
    ("request", R): R,
    ("request", A): A,
    ("request", D): R,
    ("request", T): R,
    ("request", W): R,
    ("accept", R): A,
    ("accept", A): A,
    ("decline", R): D,
    ("decline", D): D,
    ("terminate", A): T,
    ("terminate", T): T,
    ("withdraw", R): W,
    ("withdraw", A): W,
    ("withdraw", W): W,
}
STATE_NAMES = {
    pb.CONSENT_STATE_REQUESTED: R,
    pb.CONSENT_STATE_ACTIVE: A,
    pb.CONSENT_STATE_DECLINED: D,
    pb.CONSENT_STATE_TERMINATED: T,
    pb.CONSENT_STATE_WITHDRAWN: W,
}


def _apply(clients: Clients, tenant: str, move: str) -> pb.Consent:
    if move == "request":
        request = pb.CreateConsentRequest(tenant_id=tenant, operator_id=OPERATOR)
        made: pb.CreateConsentResponse = clients.admin.CreateConsent(request, timeout=10)
        return made.consent
    if move == "withdraw":
        gone = pb.WithdrawConsentRequest(tenant_id=tenant, operator_id=OPERATOR)
        withdrawn: pb.WithdrawConsentResponse = clients.admin.WithdrawConsent(gone, timeout=10)
        return withdrawn.consent
    state, reason = {
        "accept": (pb.CONSENT_STATE_ACTIVE, pb.CONSENT_REASON_UNSPECIFIED),
        "decline": (pb.CONSENT_STATE_DECLINED, pb.CONSENT_REASON_NO_AGREEMENT),
        "terminate": (pb.CONSENT_STATE_TERMINATED, pb.CONSENT_REASON_CUSTOMER_REQUEST),
    }[move]
    update = pb.UpdateConsentStatusRequest(tenant_id=tenant, state=state, reason=reason)
    moved: pb.UpdateConsentStatusResponse = clients.consents.UpdateConsentStatus(update, timeout=10)
    return moved.consent


@fuzz
@given(moves=st.lists(st.sampled_from(["request", "accept", "decline", "terminate", "withdraw"])))
def test_random_moves_follow_the_model(clients: Clients, moves: list[str]) -> None:
    tenant = str(uuid.uuid4())
    state: str | None = None
    for move in moves:
        expected = MODEL.get((move, state))
        try:
            consent = _apply(clients, tenant, move)
        except grpc.RpcError as error:
            rich = rich_error(error)
            assert expected is None, (move, state, rich)
            wanted = "CONSENT_NOT_FOUND" if state is None else "CONSENT_TRANSITION_INVALID"
            assert rich.reason == wanted, (move, state)
            continue
        assert expected is not None, (move, state)
        assert STATE_NAMES[consent.state] == expected, (move, state)
        state = expected
    if state is not None:
        got = clients.consents.GetConsent(pb.GetConsentRequest(tenant_id=tenant), timeout=10)
        assert STATE_NAMES[got.consent.state] == state
