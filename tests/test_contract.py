"""The contract says what the server does: every field annotated REQUIRED is refused when
missing (and no other top-level request field is), every OUTPUT_ONLY field is ignored when sent,
the comments fit the width, and an RPC's comment lists the reasons its handler raises."""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor, field_mask_pb2, message

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc as addresses_grpc
from opconnect.numbers.v1 import consents_pb2 as consents_pb
from opconnect.numbers.v1 import consents_pb2_grpc as consents_grpc
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.usage.v1 import usage_pb2 as usage_pb
from opconnect.usage.v1 import usage_pb2_grpc as usage_grpc
from tests.conftest import (
    OPERATOR,
    PLATFORM,
    TENANT,
    USER_ID,
    Pki,
    RichError,
    RunningSystem,
    address_message,
    grant_consents,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import BOTH, USER, upload, usage_stub
from tests.records_data import duration_record, publish, published, record, stamp

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
FILES = (
    numbers_pb.DESCRIPTOR,
    consents_pb.DESCRIPTOR,
    addresses_pb.DESCRIPTOR,
    records_pb.DESCRIPTOR,
    usage_pb.DESCRIPTOR,
)
WIDTH = 100  # buf's and the README's
NUMBER = "+14255550100"
CUSTOMER_SET = "+14255550188"  # a number whose address the customer may set
WITHDRAWING = "3c9d1e2f-4a5b-4c6d-8e7f-0a1b2c3d4e5f"  # a tenant whose consent the test withdraws
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def behaviors(field: Any) -> set[int]:
    return set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def messages() -> Iterator[descriptor.Descriptor]:
    def walk(found: descriptor.Descriptor) -> Iterator[descriptor.Descriptor]:
        yield found
        for nested in found.nested_types:
            yield from walk(nested)

    for file in FILES:
        for found in file.message_types_by_name.values():
            yield from walk(found)


def annotated(behavior: int) -> set[str]:
    """`Message.field` of every field of our protos with this behavior."""
    return {f"{m.name}.{f.name}" for m in messages() for f in m.fields if behavior in behaviors(f)}


M = TypeVar("M", bound=message.Message)


def without(found: M, name: str) -> M:
    """A copy of `found` with its field `name` cleared."""
    copy: message.Message = type(found)()
    copy.CopyFrom(found)
    copy.ClearField(name)
    return copy  # type: ignore[return-value]


REQUIRED = field_behavior_pb2.REQUIRED
OUTPUT_ONLY = field_behavior_pb2.OUTPUT_ONLY


def refusal(call: Callable[[], object]) -> RichError | None:
    try:
        call()
    except grpc.RpcError as error:
        return rich_error(error)
    return None


def names(error: RichError | None, field: str) -> bool:
    """Whether `error` is INVALID_ARGUMENT with a violation on `field` (or inside it)."""
    return (
        error is not None
        and error.code is grpc.StatusCode.INVALID_ARGUMENT
        and any(v == field or v.startswith((f"{field}.", f"{field}[")) for v in error.fields)
    )


@pytest.fixture(scope="module")
def served(session_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    tmp = tmp_path_factory.mktemp("contract")
    system = start_system(
        settings_for(tmp, session_pki.paths, f"sqlite:///{tmp / 'opconnect.db'}"), session_pki
    )
    upload(system, NUMBER)
    system.numbers().UploadNumbers(
        numbers_pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                numbers_pb.NumberUpload(
                    phone_number=CUSTOMER_SET,
                    usage=USER,
                    capabilities=BOTH,
                    allow_tenant_address_update=True,
                )
            ],
        )
    )
    grant_consents(system.runtime.db, ((OPERATOR, WITHDRAWING),))
    yield system
    system.stop()


civic_address = address_message


def unary_requests(
    system: RunningSystem, call_id: str
) -> dict[str, tuple[message.Message, Callable[[Any], object]]]:
    """A valid request of each RPC whose request has required fields, and how to send it."""
    numbers, admin, records = system.numbers(), system.admin(), system.records()
    usage = usage_stub(system)
    report = usage_grpc.UsageReportServiceStub(system.channel("platform", PLATFORM))
    start, end = stamp(NOW - dt.timedelta(days=2)), stamp(NOW)
    target = numbers_pb.AssignmentTarget(kind=numbers_pb.AssignmentTarget.KIND_USER, id=USER_ID)
    tolerance = usage_pb.Tolerance(relative=0.01)
    tolerance.absolute.FromSeconds(1)
    period: dict[str, Any] = {"start_time": start, "end_time": end}
    consents = consents_grpc.ConsentServiceStub(system.channel("operator", OPERATOR))
    consent_admin = consents_grpc.ConsentAdminServiceStub(system.channel("platform", PLATFORM))
    addresses = addresses_grpc.CivicAddressServiceStub(system.channel("operator", OPERATOR))
    address_admin = addresses_grpc.CivicAddressAdminServiceStub(
        system.channel("platform", PLATFORM)
    )
    address_id = system.addresses[OPERATOR, TENANT]
    spare = addresses.CreateCivicAddress(
        addresses_pb.CreateCivicAddressRequest(civic_address=civic_address())
    ).civic_address.civic_address_id
    return {
        "UpdateNumber": (
            numbers_pb.UpdateNumberRequest(
                number=numbers_pb.PhoneNumber(phone_number=NUMBER, ticket_id="T-1"),
                update_mask=field_mask_pb2.FieldMask(paths=["ticket_id"]),
            ),
            numbers.UpdateNumber,
        ),
        "UpdateNumberEmergencyAddress": (
            numbers_pb.UpdateNumberEmergencyAddressRequest(
                phone_number=CUSTOMER_SET, tenant_id=TENANT, civic_address_id=address_id
            ),
            admin.UpdateNumberEmergencyAddress,
        ),
        "CreateCivicAddress": (
            addresses_pb.CreateCivicAddressRequest(civic_address=civic_address()),
            addresses.CreateCivicAddress,
        ),
        "GetCivicAddress": (
            addresses_pb.GetCivicAddressRequest(civic_address_id=address_id),
            addresses.GetCivicAddress,
        ),
        "UpdateCivicAddress": (
            addresses_pb.UpdateCivicAddressRequest(
                civic_address=addresses_pb.CivicAddress(
                    civic_address_id=spare, description="Reception at the front"
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            addresses.UpdateCivicAddress,
        ),
        "DeleteCivicAddress": (
            addresses_pb.DeleteCivicAddressRequest(civic_address_id=spare),
            addresses.DeleteCivicAddress,
        ),
        "CreateCustomerCivicAddress": (
            addresses_pb.CreateCustomerCivicAddressRequest(
                operator_id=OPERATOR, civic_address=civic_address()
            ),
            address_admin.CreateCustomerCivicAddress,
        ),
        "UploadNumbers": (
            numbers_pb.UploadNumbersRequest(
                tenant_id=TENANT,
                numbers=[
                    numbers_pb.NumberUpload(
                        phone_number=NUMBER,
                        usage=USER,
                        capabilities=BOTH,
                        allow_tenant_address_update=True,
                    )
                ],
            ),
            numbers.UploadNumbers,
        ),
        "ReleaseNumbers": (
            numbers_pb.ReleaseNumbersRequest(phone_numbers=["+14255550199"]),
            numbers.ReleaseNumbers,
        ),
        "GetNumber": (numbers_pb.GetNumberRequest(phone_number=NUMBER), numbers.GetNumber),
        "AssignNumber": (
            numbers_pb.AssignNumberRequest(
                phone_number=NUMBER,
                tenant_id=TENANT,
                sip_uri="sip:+14255550100@sbc1.contoso.example;user=phone",
                target=target,
            ),
            admin.AssignNumber,
        ),
        "UnassignNumber": (
            numbers_pb.UnassignNumberRequest(phone_number=NUMBER, tenant_id=TENANT),
            admin.UnassignNumber,
        ),
        "GetConsent": (consents_pb.GetConsentRequest(tenant_id=TENANT), consents.GetConsent),
        "UpdateConsentStatus": (
            consents_pb.UpdateConsentStatusRequest(
                tenant_id=TENANT, state=consents_pb.CONSENT_STATE_ACTIVE
            ),
            consents.UpdateConsentStatus,
        ),
        "CreateConsent": (
            consents_pb.CreateConsentRequest(tenant_id=TENANT, operator_id=OPERATOR),
            consent_admin.CreateConsent,
        ),
        "WithdrawConsent": (
            consents_pb.WithdrawConsentRequest(tenant_id=WITHDRAWING, operator_id=OPERATOR),
            consent_admin.WithdrawConsent,
        ),
        "GetCallRecord": (records_pb.GetCallRecordRequest(call_id=call_id), records.GetCallRecord),
        "GetQualitySummary": (
            records_pb.GetQualitySummaryRequest(
                **period, group_by=records_pb.QUALITY_GROUP_BY_TENANT, tenant_id=TENANT
            ),
            records.GetQualitySummary,
        ),
        "GetReconciliation": (
            usage_pb.GetReconciliationRequest(**period, tenant_id=TENANT, tolerance=tolerance),
            usage.GetReconciliation,
        ),
        "StreamDiscrepancies": (
            usage_pb.StreamDiscrepanciesRequest(
                **period, tenant_id=TENANT, tolerance=tolerance, max_batch_size=5
            ),
            lambda r: list(usage.StreamDiscrepancies(r, timeout=30)),
        ),
        "GetUsageSummary": (
            usage_pb.GetUsageSummaryRequest(
                **period, granularity=usage_pb.GRANULARITY_DAY, tenant_id=TENANT, page_size=5
            ),
            usage.GetUsageSummary,
        ),
        "GetTenantUsage": (
            usage_pb.GetTenantUsageRequest(
                **period,
                tenant_id=TENANT,
                granularity=usage_pb.GRANULARITY_MONTH,
                operator_id="contoso-telecom",
                page_size=5,
            ),
            report.GetTenantUsage,
        ),
    }


def test_required_request_fields_are_refused_when_missing_and_no_other(
    served: RunningSystem,
) -> None:
    system = served
    one = record()
    (ok,) = publish(system.ingest(), [published(one)])
    assert ok.accepted_count == 1
    checked: set[str] = set()
    for name, (request, send) in unary_requests(system, one.call_id).items():
        assert refusal(functools.partial(send, request)) is None or name in {
            "ReleaseNumbers"  # a number the operator does not hold: refused per number, not here
        }, name
        for field in request.DESCRIPTOR.fields:
            error = refusal(functools.partial(send, without(request, field.name)))
            if REQUIRED in behaviors(field):
                assert names(error, field.name), (name, field.name, error)
                checked.add(f"{request.DESCRIPTOR.name}.{field.name}")
            else:
                assert not names(error, field.name), (name, field.name, error)
    # Inside a request: the assignment's target.
    request, send = unary_requests(system, one.call_id)["AssignNumber"]
    for field in numbers_pb.AssignmentTarget.DESCRIPTOR.fields:
        assert REQUIRED in behaviors(field)
        cleared = numbers_pb.AssignNumberRequest.FromString(request.SerializeToString())
        cleared.target.CopyFrom(without(cleared.target, field.name))
        error = refusal(functools.partial(send, cleared))
        assert error is not None and error.code is grpc.StatusCode.INVALID_ARGUMENT, field.name
        assert any(v.startswith("target") for v in error.fields), error
        checked.add(f"AssignmentTarget.{field.name}")
    # Inside a request: the civic address and its locations.
    create, send = unary_requests(system, one.call_id)["CreateCivicAddress"]
    for field in addresses_pb.CivicAddress.DESCRIPTOR.fields:
        if REQUIRED in behaviors(field):
            made = addresses_pb.CreateCivicAddressRequest.FromString(create.SerializeToString())
            made.civic_address.ClearField(field.name)  # type: ignore[arg-type]
            error = refusal(functools.partial(send, made))
            assert names(error, f"civic_address.{field.name}"), (field.name, error)
            checked.add(f"CivicAddress.{field.name}")
    for field in addresses_pb.Location.DESCRIPTOR.fields:
        if REQUIRED in behaviors(field):
            made = addresses_pb.CreateCivicAddressRequest.FromString(create.SerializeToString())
            made.civic_address.locations[0].ClearField(field.name)  # type: ignore[arg-type]
            error = refusal(functools.partial(send, made))
            assert names(error, f"civic_address.locations[0].{field.name}"), (field.name, error)
            checked.add(f"Location.{field.name}")
    checked |= _batch_items_refused_when_a_required_field_is_missing(system)
    assert checked == annotated(REQUIRED)


def _batch_items_refused_when_a_required_field_is_missing(system: RunningSystem) -> set[str]:
    """The REQUIRED fields of what a batch carries: each item without one is refused on its
    own, naming the field where the result has one."""
    checked: set[str] = set()
    # Call durations: every field of a record.
    usage = usage_stub(system)
    for field in usage_pb.CallDurationRecord.DESCRIPTOR.fields:
        item = without(duration_record(), field.name)
        (submitted,) = usage.SubmitCallDurations(
            iter([usage_pb.SubmitCallDurationsRequest(records=[item])]), timeout=30
        )
        (result,) = submitted.results
        assert result.outcome == usage_pb.CALL_DURATION_OUTCOME_REFUSED, field.name
        assert result.field == field.name, (field.name, result)
        assert REQUIRED in behaviors(field)
        checked.add(f"CallDurationRecord.{field.name}")
    # Published call records: the record, its fields, its media streams'.
    ingest = system.ingest()
    items: dict[str, tuple[records_pb.PublishedCallRecord, str]] = {}
    for field in records_pb.PublishedCallRecord.DESCRIPTOR.fields:
        items[f"PublishedCallRecord.{field.name}"] = (without(published(record()), field.name), "")
    for field in records_pb.CallRecord.DESCRIPTOR.fields:
        if REQUIRED in behaviors(field):
            one = published(record())
            one.record.CopyFrom(without(one.record, field.name))
            items[f"CallRecord.{field.name}"] = (one, f"record.{field.name}")
    for field in records_pb.MediaStream.DESCRIPTOR.fields:
        if REQUIRED in behaviors(field):
            one = published(record())
            stream = one.record.media_streams[0]
            stream.CopyFrom(without(stream, field.name))
            items[f"MediaStream.{field.name}"] = (one, f"record.media_streams[0].{field.name}")
    (answer,) = publish(ingest, [item for item, _ in items.values()])
    for (key, (_, path)), result in zip(items.items(), answer.results, strict=True):
        assert result.outcome == records_pb.CALL_RECORD_OUTCOME_REFUSED, key
        assert not path or result.field == path, (key, result)
        checked.add(key)
    # Numbers to upload: each refused on its own.
    for field in numbers_pb.NumberUpload.DESCRIPTOR.fields:
        if REQUIRED not in behaviors(field):
            continue
        upload_item = without(
            numbers_pb.NumberUpload(
                phone_number="+14255550177",
                usage=USER,
                capabilities=BOTH,
                allow_tenant_address_update=True,
            ),
            field.name,
        )
        uploaded = system.numbers().UploadNumbers(
            numbers_pb.UploadNumbersRequest(tenant_id=TENANT, numbers=[upload_item])
        )
        assert [r.outcome for r in uploaded.results] == [numbers_pb.NUMBER_OUTCOME_REFUSED]
        assert REQUIRED in behaviors(field)
        checked.add(f"NumberUpload.{field.name}")
    # A batch without items ends its stream.
    for key, call in {
        "SubmitCallDurationsRequest.records": lambda: list(
            usage.SubmitCallDurations(iter([usage_pb.SubmitCallDurationsRequest()]), timeout=30)
        ),
        "PublishCallRecordsRequest.records": lambda: publish(ingest, []),
    }.items():
        error = refusal(call)
        assert error is not None and error.reason == "BATCH_EMPTY", key
        checked.add(key)
    return checked


def test_output_only_fields_are_ignored_when_published(served: RunningSystem) -> None:
    system = served
    sent = record()
    given = stamp(NOW - dt.timedelta(days=1))
    sent.publish_time.CopyFrom(given)
    sent.quality_class = records_pb.QUALITY_CLASS_POOR
    sent.quality_reasons.add(metric=records_pb.QUALITY_METRIC_JITTER)
    for stream in sent.media_streams:
        stream.quality_class = records_pb.QUALITY_CLASS_UNCLASSIFIED
        stream.quality_reasons.add(metric=records_pb.QUALITY_METRIC_ROUND_TRIP)
    (answer,) = publish(system.ingest(), [published(sent)])
    assert answer.accepted_count == 1, answer
    kept = system.records().GetCallRecord(records_pb.GetCallRecordRequest(call_id=sent.call_id))
    got = kept.record
    assert got.publish_time != given
    assert (got.quality_class, list(got.quality_reasons)) == (records_pb.QUALITY_CLASS_GOOD, [])
    assert all(s.quality_class == records_pb.QUALITY_CLASS_GOOD for s in got.media_streams)
    ignored = {"publish_time", "quality_class", "quality_reasons"}
    assert annotated(OUTPUT_ONLY) == {
        *(f"CallRecord.{name}" for name in ignored),
        "MediaStream.quality_class",
        "MediaStream.quality_reasons",
        # Never input: a number's state and times are the server's.
        "PhoneNumber.state",
        "PhoneNumber.create_time",
        "PhoneNumber.update_time",
        # A consent is never input: every field of it is the server's.
        *(f"Consent.{f.name}" for f in consents_pb.Consent.DESCRIPTOR.fields),
        # A number's emergency location is its address's, as stored.
        "PhoneNumber.emergency_location",
        # An address's ids, author and times are the server's: ignored when it is created (an
        # update names the address, and the locations it keeps, by their ids).
        "CivicAddress.civic_address_id",
        "CivicAddress.created_by",
        "CivicAddress.create_time",
        "CivicAddress.update_time",
        "Location.location_id",
    }


def test_proto_comment_lines_fit_the_width() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted(PROTOS.rglob("*.proto"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.lstrip().startswith("//") and len(line) > WIDTH
    ]
    assert long == []


def test_a_record_not_taken_is_refused_in_every_service() -> None:
    """One word for a record the platform did not take: every per-item outcome enum names it
    `..._OUTCOME_REFUSED` and every batch answer counts it in `refused_count`."""
    outcomes = [
        enum
        for file in FILES
        for enum in file.enum_types_by_name.values()
        if enum.name.endswith("Outcome")
    ]
    assert len(outcomes) == 3
    for enum in outcomes:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper()
        names = {value.name.removeprefix(prefix + "_") for value in enum.values}
        assert "REFUSED" in names, enum.name
        assert not names & {"REJECTED", "DENIED", "FAILED", "INVALID"}, enum.name
    counts = {field.name for found in messages() for field in found.fields}
    assert {"refused_count"} <= counts
    assert not {name for name in counts if re.fullmatch(r"(rejected|denied|failed)_count", name)}


def rpc_comment(path: Path, rpc: str) -> str:
    """The comment block right above `rpc <name>(` in a .proto file."""
    lines = path.read_text().splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"rpc {rpc}(")]
    block: list[str] = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("//"):
            break
        block.insert(0, line.strip().removeprefix("//").strip())
    return " ".join(block)


def listed_reasons(comment: str) -> set[str]:
    return set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", comment))


def first_of_watch(stub: Any, request: numbers_pb.WatchAssignmentsRequest) -> object:
    return next(iter(stub.WatchAssignments(request, timeout=30)))


def test_watch_assignments_lists_every_reason_its_handler_raises(served: RunningSystem) -> None:
    comment = rpc_comment(PROTOS / "opconnect/numbers/v1/numbers.proto", "WatchAssignments")
    numbers = served.numbers()
    raised = set()
    for request in (
        numbers_pb.WatchAssignmentsRequest(cursor="junk"),
        numbers_pb.WatchAssignmentsRequest(tenant_id="not-a-tenant"),
        numbers_pb.WatchAssignmentsRequest(max_batch_size=-1),
    ):
        error = refusal(functools.partial(first_of_watch, numbers, request))
        assert error is not None, request
        raised.add(error.reason)
    assert raised == {"CURSOR_INVALID", "TENANT_ID_INVALID", "MAX_BATCH_SIZE_INVALID"}
    # ...and those of the change log it follows and of the per-RPC wrapper.
    raised |= {"CURSOR_EXPIRED", "TOO_MANY_STREAMS", "SHUTTING_DOWN", "STORAGE_UNAVAILABLE"}
    assert raised <= listed_reasons(comment)


def test_stream_discrepancies_lists_its_cursor_reason(served: RunningSystem) -> None:
    comment = rpc_comment(PROTOS / "opconnect/usage/v1/usage.proto", "StreamDiscrepancies")
    request = usage_pb.StreamDiscrepanciesRequest(
        start_time=stamp(NOW - dt.timedelta(days=1)), end_time=stamp(NOW), cursor="junk"
    )
    error = refusal(lambda: list(usage_stub(served).StreamDiscrepancies(request, timeout=30)))
    assert error is not None and error.reason in listed_reasons(comment)
    assert "PAGE_TOKEN_INVALID" not in listed_reasons(comment)


def test_consent_rpcs_list_every_reason_their_handlers_raise(served: RunningSystem) -> None:
    path = PROTOS / "opconnect/numbers/v1/consents.proto"
    consents = consents_grpc.ConsentServiceStub(served.channel("operator", OPERATOR))
    admin = consents_grpc.ConsentAdminServiceStub(served.channel("platform", PLATFORM))
    unknown = "7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a"
    state = consents_pb.CONSENT_STATE_TERMINATED
    cases: dict[str, list[Callable[[], object]]] = {
        "GetConsent": [
            lambda: consents.GetConsent(consents_pb.GetConsentRequest(tenant_id="x")),
            lambda: consents.GetConsent(consents_pb.GetConsentRequest(tenant_id=unknown)),
        ],
        "ListConsents": [
            lambda: consents.ListConsents(consents_pb.ListConsentsRequest(page_size=-1)),
            lambda: consents.ListConsents(consents_pb.ListConsentsRequest(page_token="junk")),
        ],
        "WatchConsents": [
            lambda: next(
                iter(consents.WatchConsents(consents_pb.WatchConsentsRequest(cursor="junk")))
            ),
            lambda: next(
                iter(consents.WatchConsents(consents_pb.WatchConsentsRequest(max_batch_size=-1)))
            ),
        ],
        "UpdateConsentStatus": [
            lambda: consents.UpdateConsentStatus(
                consents_pb.UpdateConsentStatusRequest(tenant_id="x", state=state)
            ),
            lambda: consents.UpdateConsentStatus(
                consents_pb.UpdateConsentStatusRequest(tenant_id=TENANT)
            ),
            lambda: consents.UpdateConsentStatus(
                consents_pb.UpdateConsentStatusRequest(tenant_id=TENANT, state=state)
            ),
            lambda: consents.UpdateConsentStatus(
                consents_pb.UpdateConsentStatusRequest(
                    tenant_id=TENANT,
                    state=consents_pb.CONSENT_STATE_ACTIVE,
                    reason=consents_pb.CONSENT_REASON_OTHER,
                )
            ),
            lambda: consents.UpdateConsentStatus(
                consents_pb.UpdateConsentStatusRequest(
                    tenant_id=unknown, state=state, reason=consents_pb.CONSENT_REASON_OTHER
                )
            ),
            lambda: consents.UpdateConsentStatus(
                consents_pb.UpdateConsentStatusRequest(
                    tenant_id=TENANT,
                    state=consents_pb.CONSENT_STATE_DECLINED,
                    reason=consents_pb.CONSENT_REASON_OTHER,
                )
            ),
        ],
        "CreateConsent": [
            lambda: admin.CreateConsent(consents_pb.CreateConsentRequest(tenant_id="x")),
            lambda: admin.CreateConsent(
                consents_pb.CreateConsentRequest(tenant_id=TENANT, operator_id="Not An Id")
            ),
        ],
        "WithdrawConsent": [
            lambda: admin.WithdrawConsent(
                consents_pb.WithdrawConsentRequest(tenant_id=unknown, operator_id=OPERATOR)
            ),
        ],
    }
    for rpc, calls in cases.items():
        raised = set()
        for call in calls:
            error = refusal(call)
            assert error is not None, rpc
            raised.add(error.reason)
        if rpc == "WatchConsents":  # the change log's and the wrapper's too
            raised |= {"CURSOR_EXPIRED", "TOO_MANY_STREAMS", "SHUTTING_DOWN", "STORAGE_UNAVAILABLE"}
        missing = raised - listed_reasons(rpc_comment(path, rpc))
        assert not missing, (rpc, missing)
