"""Unit tier: the numbers service's rules, on domain objects alone (no sockets, no database).
Run the fast tier alone with `pytest -m unit`."""

from __future__ import annotations

import datetime as dt

import pytest

from plumbing.errors import ApiError, Kind
from services.numbers.rules import (
    Number,
    Outcome,
    State,
    Target,
    TargetKind,
    Upload,
    Usage,
    check_assignment,
    check_batch,
    check_can_assign,
    check_release,
    check_upload,
)

pytestmark = pytest.mark.unit

TENANT = "6F1A4B2C-8D3E-4F5A-9B6C-7D8E9F0A1B2C"
USER = "11111111-2222-4333-8444-555555555555"
NOW = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)


def upload(number: str = "+14255550100", **changes: object) -> Upload:
    fields: dict[str, object] = {
        "usage": Usage.USER,
        "inbound": True,
        "outbound": True,
        "civic_address_id": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",  # a USER number needs one
    }
    fields.update(changes)
    return Upload(number, **fields)  # type: ignore[arg-type]


def number(usage: Usage = Usage.USER, *, inbound: bool = True, outbound: bool = True) -> Number:
    return Number(
        "+14255550100", "op", TENANT.lower(), usage, inbound, outbound,
        State.UNASSIGNED, "", None, NOW, NOW,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("changed", "reason"),
    [
        (upload("0425"), "PHONE_NUMBER_INVALID"),
        (upload(usage=None), "USAGE_INVALID"),
        (upload(inbound=False, outbound=False), "CAPABILITIES_INVALID"),
    ],
)
def test_an_upload_refuses_each_bad_number_with_its_reason(changed: Upload, reason: str) -> None:
    result = check_upload(changed, set())
    assert result is not None and (result.outcome, result.reason) == (Outcome.REFUSED, reason)


def test_a_number_twice_in_one_request_is_refused_the_second_time() -> None:
    seen: set[str] = set()
    assert check_upload(upload(), seen) is None
    second = check_upload(upload(), seen)
    assert second is not None and second.reason == "DUPLICATE_IN_REQUEST"
    assert check_release("+14255550101", seen) is None
    again = check_release("+14255550101", seen)
    assert again is not None and again.reason == "DUPLICATE_IN_REQUEST"


@pytest.mark.parametrize(("count", "reason"), [(0, "NUMBERS_EMPTY"), (11, "TOO_MANY_NUMBERS")])
def test_a_batch_is_one_to_the_maximum(count: int, reason: str) -> None:
    check_batch(10, 10, "numbers")
    with pytest.raises(ApiError) as refused:
        check_batch(count, 10, "numbers")
    assert (refused.value.kind, refused.value.reason) == (Kind.INVALID, reason)


def test_an_assignment_reports_every_bad_field_at_once_and_normalizes_ids() -> None:
    with pytest.raises(ApiError) as refused:
        check_assignment("123", "x", "http://x", None)
    assert refused.value.kind is Kind.INVALID
    assert {v.field for v in refused.value.violations} == {
        "phone_number", "tenant_id", "sip_uri", "target.kind",
    }  # fmt: skip
    good = check_assignment(
        "+14255550100", TENANT, "sip:+14255550100@sbc.example", Target(TargetKind.USER, USER)
    )
    assert (good.tenant_id, good.target.id) == (TENANT.lower(), USER.lower())


@pytest.mark.parametrize(
    ("stored", "target", "reason"),
    [
        (number(Usage.VOICE_APP), TargetKind.USER, "USAGE_MISMATCH"),
        (number(Usage.USER, outbound=False), TargetKind.USER, "CAPABILITY_MISSING"),
        (number(Usage.CONFERENCE), TargetKind.CONFERENCE_BRIDGE, None),
    ],
)
def test_what_a_number_may_be_assigned_to(
    stored: Number, target: TargetKind, reason: str | None
) -> None:
    assignment = check_assignment(
        stored.phone_number, TENANT, "sip:+14255550100@sbc.example", Target(target, USER)
    )
    problem = check_can_assign(stored, assignment)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and (problem.kind, problem.reason) == (Kind.WRONG_STATE, reason)


def test_a_number_of_another_tenant_is_not_assigned() -> None:
    other = "0b5e2c1d-3a4f-4e6d-8c7b-9a0f1e2d3c4b"
    assignment = check_assignment(
        "+14255550100", other, "sip:+14255550100@sbc.example", Target(TargetKind.USER, USER)
    )
    problem = check_can_assign(number(), assignment)
    assert problem is not None and problem.reason == "TENANT_MISMATCH"
