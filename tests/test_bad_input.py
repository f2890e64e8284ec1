"""Bad input through the real server: every field fuzzed answers a clear error (INVALID_ARGUMENT
with ErrorInfo and a BadRequest violation naming the field, or NOT_FOUND for a well-formed
unknown number), never INTERNAL or UNKNOWN, and the server keeps serving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc
from plumbing.changelog import encode_cursor
from plumbing.validation import check_e164, check_guid, check_sip_uri
from tests.conftest import (
    TENANT,
    USER_ID,
    Pki,
    RunningSystem,
    rich_error,
    settings_for,
    start_system,
)

KNOWN = "+14255550100"  # uploaded once for the module
UNKNOWN = "+14255559999"  # never uploaded
SIP = "sip:+14255559999@sbc1.contoso.example;user=phone"
DOMAIN = "numbers.opconnect"
BOTH = pb.Capabilities(inbound=True, outbound=True)

fuzz = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Random text, and near misses of each format.
near_numbers = st.from_regex(r"\+?[0-9٣ ]{0,17}", fullmatch=True)
texts = st.text(max_size=80)


@dataclass
class Clients:
    system: RunningSystem
    numbers: numbers_pb2_grpc.NumberServiceStub
    admin: numbers_pb2_grpc.NumberAdminServiceStub
    channel: grpc.Channel


@pytest.fixture(scope="module")
def clients(fuzz_system: RunningSystem) -> Clients:
    """The module's system (hypothesis runs many examples, no rate limit) and its clients."""
    running = fuzz_system
    channel = running.channel()
    numbers = numbers_pb2_grpc.NumberServiceStub(channel)
    numbers.UploadNumbers(
        pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                pb.NumberUpload(
                    phone_number=KNOWN,
                    usage=pb.NUMBER_USAGE_USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                )
            ],
        )
    )
    return Clients(running, numbers, running.admin(), channel)


def assert_still_serving(clients: Clients) -> None:
    got = clients.numbers.GetNumber(pb.GetNumberRequest(phone_number=KNOWN), timeout=10)
    assert got.number.phone_number == KNOWN


def assert_invalid(error: grpc.RpcError, field: str, reason: str) -> None:
    rich = rich_error(error)
    assert (rich.code, rich.reason, rich.domain, rich.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        DOMAIN,
        {field: reason},
    )


@fuzz
@given(value=st.one_of(texts, near_numbers))
def test_get_number_with_any_text(clients: Clients, value: str) -> None:
    if value == KNOWN:
        return
    with pytest.raises(grpc.RpcError) as caught:
        clients.numbers.GetNumber(pb.GetNumberRequest(phone_number=value), timeout=10)
    if check_e164(value) is None:
        rich = rich_error(caught.value)
        assert (rich.code, rich.reason, rich.domain) == (
            grpc.StatusCode.NOT_FOUND,
            "NUMBER_NOT_FOUND",
            DOMAIN,
        )
    else:
        assert_invalid(caught.value, "phone_number", "PHONE_NUMBER_INVALID")
    assert_still_serving(clients)


@fuzz
@given(value=st.text(min_size=1, max_size=200))
def test_watch_assignments_with_a_bad_cursor_fails_on_the_first_read(
    clients: Clients, value: str
) -> None:
    stream = clients.numbers.WatchAssignments(pb.WatchAssignmentsRequest(cursor=value), timeout=10)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
    finally:
        stream.cancel()
    assert_invalid(caught.value, "cursor", "CURSOR_INVALID")
    assert_still_serving(clients)


@fuzz
@given(value=st.text(min_size=1, max_size=200))
def test_list_numbers_with_a_bad_page_token(clients: Clients, value: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        clients.numbers.ListNumbers(pb.ListNumbersRequest(page_token=value), timeout=10)
    assert_invalid(caught.value, "page_token", "PAGE_TOKEN_INVALID")
    assert_still_serving(clients)


@fuzz
@given(value=st.text(min_size=1, max_size=80))
def test_list_numbers_with_a_bad_tenant(clients: Clients, value: str) -> None:
    assume(check_guid(value) is not None)  # only strings that are not GUIDs
    with pytest.raises(grpc.RpcError) as caught:
        clients.numbers.ListNumbers(pb.ListNumbersRequest(tenant_id=value), timeout=10)
    assert_invalid(caught.value, "tenant_id", "TENANT_ID_INVALID")
    assert_still_serving(clients)


def assign_request(**changes: str) -> pb.AssignNumberRequest:
    fields = {"phone_number": UNKNOWN, "tenant_id": TENANT, "sip_uri": SIP, "target_id": USER_ID}
    fields.update(changes)
    return pb.AssignNumberRequest(
        phone_number=fields["phone_number"],
        tenant_id=fields["tenant_id"],
        sip_uri=fields["sip_uri"],
        target=pb.AssignmentTarget(kind=pb.AssignmentTarget.KIND_USER, id=fields["target_id"]),
    )


@fuzz
@given(
    field=st.sampled_from(["sip_uri", "tenant_id", "target_id"]),
    value=st.one_of(texts, st.sampled_from(["sip:", "sip:a@", "sips:x@y:0", "sip:a@b@c"])),
)
def test_assign_number_with_any_text(clients: Clients, field: str, value: str) -> None:
    check = {"sip_uri": check_sip_uri, "tenant_id": check_guid, "target_id": check_guid}[field]
    with pytest.raises(grpc.RpcError) as caught:
        clients.admin.AssignNumber(assign_request(**{field: value}), timeout=10)
    if check(value) is None:  # the request is valid: the number is just not there
        assert rich_error(caught.value).reason == "NUMBER_NOT_FOUND"
    else:
        wire_field, reason = {
            "sip_uri": ("sip_uri", "SIP_URI_INVALID"),
            "tenant_id": ("tenant_id", "TENANT_ID_INVALID"),
            "target_id": ("target.id", "TARGET_INVALID"),
        }[field]
        assert_invalid(caught.value, wire_field, reason)
    assert_still_serving(clients)


@fuzz
@given(values=st.lists(st.one_of(texts, near_numbers), min_size=1, max_size=20))
def test_upload_numbers_refuses_each_bad_number_without_failing_the_request(
    clients: Clients, values: list[str]
) -> None:
    bad = [v for v in values if check_e164(v) is not None]
    response = clients.numbers.UploadNumbers(
        pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                pb.NumberUpload(
                    phone_number=v,
                    usage=pb.NUMBER_USAGE_USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                )
                for v in bad
            ]
            + [
                pb.NumberUpload(
                    phone_number=KNOWN,
                    usage=pb.NUMBER_USAGE_USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                )
            ],
        ),
        timeout=10,
    )
    assert [(r.phone_number, r.outcome, r.reason) for r in response.results] == [
        *((v, pb.NUMBER_OUTCOME_REFUSED, "PHONE_NUMBER_INVALID") for v in bad),
        (KNOWN, pb.NUMBER_OUTCOME_ALREADY_PRESENT, ""),
    ]
    assert (response.added_count, response.already_present_count, response.refused_count) == (
        0,
        1,
        len(bad),
    )
    assert_still_serving(clients)


@fuzz
@given(value=st.text(min_size=1, max_size=80))
def test_upload_numbers_with_a_bad_tenant_fails_the_request(clients: Clients, value: str) -> None:
    assume(check_guid(value) is not None)  # only strings that are not GUIDs
    with pytest.raises(grpc.RpcError) as caught:
        clients.numbers.UploadNumbers(
            pb.UploadNumbersRequest(
                tenant_id=value,
                numbers=[pb.NumberUpload(phone_number=KNOWN, usage=pb.NUMBER_USAGE_USER)],
            ),
            timeout=10,
        )
    assert_invalid(caught.value, "tenant_id", "TENANT_ID_INVALID")
    assert_still_serving(clients)


def raw_get_number(clients: Clients, body: bytes) -> bytes:
    call = clients.channel.unary_unary(
        "/opconnect.numbers.v1.NumberService/GetNumber",
        request_serializer=None,
        response_deserializer=None,
    )
    return cast(bytes, call(body, timeout=10))


def test_garbage_request_body_does_not_stop_the_server(clients: Clients) -> None:
    with pytest.raises(grpc.RpcError):
        raw_get_number(clients, b"\xff\xff\xff")
    assert_still_serving(clients)
    # The same raw path works with a well-formed body.
    answer = pb.GetNumberResponse.FromString(
        raw_get_number(clients, pb.GetNumberRequest(phone_number=KNOWN).SerializeToString())
    )
    assert answer.number.phone_number == KNOWN


def test_garbage_request_body_answers_invalid_argument(clients: Clients) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw_get_number(clients, b"\xff\xff\xff")
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)


def test_a_cursor_beyond_any_position_is_invalid(clients: Clients) -> None:
    stream = clients.numbers.WatchAssignments(
        pb.WatchAssignmentsRequest(cursor=encode_cursor("numbers", 2**64 - 1)), timeout=10
    )
    try:
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
    finally:
        stream.cancel()
    assert_invalid(caught.value, "cursor", "CURSOR_INVALID")


def test_a_message_over_the_size_limit(session_pki: Pki, tmp_path: Path) -> None:
    small = start_system(
        settings_for(
            tmp_path,
            session_pki.paths,
            f"sqlite:///{tmp_path / 'opconnect.db'}",
            max_message_bytes=1024,
        ),
        session_pki,
    )
    try:
        numbers = small.numbers()
        with pytest.raises(grpc.RpcError) as caught:
            numbers.GetNumber(pb.GetNumberRequest(phone_number="+1" + "4" * 2000), timeout=10)
        too_large = rich_error(caught.value)
        assert (too_large.code, too_large.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MESSAGE_TOO_LARGE",
        )
        with pytest.raises(grpc.RpcError) as upload:
            numbers.UploadNumbers(
                pb.UploadNumbersRequest(
                    tenant_id=TENANT,
                    numbers=[
                        pb.NumberUpload(
                            phone_number=f"+1425555{i:04d}",
                            usage=pb.NUMBER_USAGE_USER,
                            capabilities=BOTH,
                            allow_tenant_address_update=True,
                        )
                        for i in range(100)
                    ],
                ),
                timeout=10,
            )
        assert rich_error(upload.value).reason == "MESSAGE_TOO_LARGE"
        # Still serving, on the same channel.
        added = numbers.UploadNumbers(
            pb.UploadNumbersRequest(
                tenant_id=TENANT,
                numbers=[
                    pb.NumberUpload(
                        phone_number=KNOWN,
                        usage=pb.NUMBER_USAGE_USER,
                        capabilities=BOTH,
                        allow_tenant_address_update=True,
                    )
                ],
            ),
            timeout=10,
        )
        assert added.added_count == 1
        got = numbers.GetNumber(pb.GetNumberRequest(phone_number=KNOWN), timeout=10)
        assert got.number.phone_number == KNOWN
    finally:
        small.stop()
