"""The numbers flow as an operator and the admin center use it, through the gateway."""

from __future__ import annotations

import grpc
import pytest

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from plumbing.changelog import decode_cursor
from services.numbers.rules import DOMAIN, LOG
from tests.conftest import OTHER_TENANT, TENANT, USER_ID, RunningSystem, rich_error
from tests.helpers import BOTH, USER, assign, number_upload, upload


def test_upload_answers_each_number(system: RunningSystem) -> None:
    first = upload(system, "+14255550100", "+14255550101")
    assert [r.outcome for r in first.results] == [pb.NUMBER_OUTCOME_DONE] * 2
    assert first.added_count == 2
    again = system.numbers().UploadNumbers(
        pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                number_upload(system, "+14255550100"),  # same
                pb.NumberUpload(
                    phone_number="+14255550101", usage=pb.NUMBER_USAGE_VOICE_APP, capabilities=BOTH
                ),
                pb.NumberUpload(
                    phone_number="0042",
                    usage=USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                ),
                pb.NumberUpload(phone_number="+14255550102", capabilities=BOTH),  # no usage
                pb.NumberUpload(phone_number="+14255550103", usage=USER),  # no capability
                pb.NumberUpload(
                    phone_number="+14255550104",
                    usage=USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                ),
                pb.NumberUpload(
                    phone_number="+14255550104",
                    usage=USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                ),
            ],
        )
    )
    assert [(r.outcome, r.reason) for r in again.results] == [
        (pb.NUMBER_OUTCOME_ALREADY_PRESENT, ""),
        (pb.NUMBER_OUTCOME_REFUSED, "DATA_CONFLICT"),
        (pb.NUMBER_OUTCOME_REFUSED, "PHONE_NUMBER_INVALID"),
        (pb.NUMBER_OUTCOME_REFUSED, "USAGE_INVALID"),
        (pb.NUMBER_OUTCOME_REFUSED, "CAPABILITIES_INVALID"),
        (pb.NUMBER_OUTCOME_DONE, ""),
        (pb.NUMBER_OUTCOME_REFUSED, "DUPLICATE_IN_REQUEST"),
    ]
    assert (again.added_count, again.already_present_count, again.refused_count) == (1, 1, 5)


def test_a_number_held_by_another_operator_is_refused(system: RunningSystem) -> None:
    upload(system, "+14255550100")
    other = system.numbers("fabrikam").UploadNumbers(
        pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                pb.NumberUpload(
                    phone_number="+14255550100",
                    usage=USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                )
            ],
        )
    )
    assert other.results[0].reason == "HELD_BY_ANOTHER_OPERATOR"


def test_upload_request_limits(system: RunningSystem) -> None:
    with pytest.raises(grpc.RpcError) as empty:
        system.numbers().UploadNumbers(pb.UploadNumbersRequest(tenant_id=TENANT))
    assert rich_error(empty.value).reason == "NUMBERS_EMPTY"
    with pytest.raises(grpc.RpcError) as bad_tenant:
        upload(system, "+14255550100", tenant="not-a-guid")
    err = rich_error(bad_tenant.value)
    assert (err.code, err.reason, err.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TENANT_ID_INVALID",
        {"tenant_id": "TENANT_ID_INVALID"},
    )
    with pytest.raises(grpc.RpcError) as too_many:
        upload(system, *(f"+1425{i:07d}" for i in range(10_001)))
    assert rich_error(too_many.value).reason == "TOO_MANY_NUMBERS"


def test_upload_of_ten_thousand_numbers(system: RunningSystem) -> None:
    numbers = [f"+1425{i:07d}" for i in range(10_000)]
    response = upload(system, *numbers)
    assert response.added_count == 10_000
    page = system.numbers().ListNumbers(pb.ListNumbersRequest(page_size=1000))
    assert len(page.numbers) == 1000 and page.next_page_token


def test_get_assign_update_unassign_release(system: RunningSystem) -> None:
    upload(system, "+14255550100")
    got = system.numbers().GetNumber(pb.GetNumberRequest(phone_number="+14255550100")).number
    assert (got.state, got.sip_uri, got.tenant_id) == (
        state_pb.ASSIGNMENT_STATE_UNASSIGNED,
        "",
        TENANT,
    )

    assigned = assign(system, "+14255550100").number
    assert assigned.state == state_pb.ASSIGNMENT_STATE_ASSIGNED
    assert assigned.target.id == USER_ID

    released = system.numbers().ReleaseNumbers(
        pb.ReleaseNumbersRequest(phone_numbers=["+14255550100", "+14255550199"])
    )
    assert [(r.outcome, r.reason) for r in released.results] == [
        (pb.NUMBER_OUTCOME_REFUSED, "NUMBER_ASSIGNED"),
        (pb.NUMBER_OUTCOME_REFUSED, "NUMBER_NOT_FOUND"),
    ]

    updated = assign(
        system, "+14255550100", sip="sips:+14255550100@sbc2.contoso.example:5061"
    ).number
    assert updated.sip_uri == "sips:+14255550100@sbc2.contoso.example:5061"

    unassigned = (
        system.admin()
        .UnassignNumber(pb.UnassignNumberRequest(phone_number="+14255550100", tenant_id=TENANT))
        .number
    )
    assert (unassigned.state, unassigned.sip_uri, unassigned.HasField("target")) == (
        state_pb.ASSIGNMENT_STATE_UNASSIGNED,
        "",
        False,
    )

    released = system.numbers().ReleaseNumbers(
        pb.ReleaseNumbersRequest(phone_numbers=["+14255550100"])
    )
    assert released.released_count == 1
    with pytest.raises(grpc.RpcError) as gone:
        system.numbers().GetNumber(pb.GetNumberRequest(phone_number="+14255550100"))
    assert rich_error(gone.value).reason == "NUMBER_NOT_FOUND"


def test_assignment_rules(system: RunningSystem) -> None:
    upload(system, "+14255550100")
    upload(system, "+14255550200", usage=pb.NUMBER_USAGE_VOICE_APP)
    with pytest.raises(grpc.RpcError) as missing:
        assign(system, "+14255550999")
    assert (missing.value.code(), rich_error(missing.value).reason) == (
        grpc.StatusCode.NOT_FOUND,
        "NUMBER_NOT_FOUND",
    )
    with pytest.raises(grpc.RpcError) as tenant:
        assign(system, "+14255550100", tenant=OTHER_TENANT)
    assert (tenant.value.code(), rich_error(tenant.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TENANT_MISMATCH",
    )
    with pytest.raises(grpc.RpcError) as usage:
        assign(system, "+14255550200")
    assert rich_error(usage.value).reason == "USAGE_MISMATCH"
    with pytest.raises(grpc.RpcError) as bad:
        system.admin().AssignNumber(
            pb.AssignNumberRequest(phone_number="123", tenant_id="x", sip_uri="http://x")
        )
    err = rich_error(bad.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == {
        "phone_number": "PHONE_NUMBER_INVALID",
        "tenant_id": "TENANT_ID_INVALID",
        "sip_uri": "SIP_URI_INVALID",
        "target.kind": "TARGET_INVALID",
    }


def test_assign_again_with_same_data_changes_nothing(system: RunningSystem) -> None:
    upload(system, "+14255550100")
    first = assign(system, "+14255550100").number
    second = assign(system, "+14255550100").number
    assert first.update_time == second.update_time


def test_list_pages_filters_and_watch_cursor(system: RunningSystem) -> None:
    upload(system, *(f"+1425555{i:04d}" for i in range(25)))
    upload(system, *(f"+1206555{i:04d}" for i in range(5)), tenant=OTHER_TENANT)
    assign(system, "+14255550003")
    numbers = system.numbers()
    seen: list[str] = []
    token, cursors = "", set()
    while True:
        page = numbers.ListNumbers(
            pb.ListNumbersRequest(page_size=7, page_token=token, tenant_id=TENANT)
        )
        seen += [n.phone_number for n in page.numbers]
        cursors.add(page.watch_cursor)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(f"+1425555{i:04d}" for i in range(25))
    positions = {decode_cursor(c, LOG, DOMAIN) for c in cursors}
    assert len(positions) == 1, "every page of one listing carries the same watch position"
    assigned = numbers.ListNumbers(pb.ListNumbersRequest(state=state_pb.ASSIGNMENT_STATE_ASSIGNED))
    assert [n.phone_number for n in assigned.numbers] == ["+14255550003"]
    everything = numbers.ListNumbers(pb.ListNumbersRequest(page_size=0))
    assert len(everything.numbers) == 30  # the default page size is 100

    first = numbers.ListNumbers(pb.ListNumbersRequest(page_size=2, tenant_id=TENANT))
    with pytest.raises(grpc.RpcError) as mixed:
        numbers.ListNumbers(pb.ListNumbersRequest(page_size=2, page_token=first.next_page_token))
    assert rich_error(mixed.value).reason == "PAGE_TOKEN_INVALID"
    with pytest.raises(grpc.RpcError) as negative:
        numbers.ListNumbers(pb.ListNumbersRequest(page_size=-1))
    assert rich_error(negative.value).fields == {"page_size": "PAGE_SIZE_INVALID"}
