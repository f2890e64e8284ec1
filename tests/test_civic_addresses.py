"""Civic addresses through real servers over mutual TLS, on both backends: create (the
operator's and the customer's), AIP-155 retries, get, list in pages, update with the locations'
replace rule, delete, every error with its reason and field, isolation between operators and
principals, the audit of reads, the metrics; and hypothesis on every field of a created address
(fuzz_system)."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opconnect.numbers.v1 import civic_addresses_pb2 as pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc as pb_grpc
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from plumbing import audit
from services.numbers import address_storage
from services.numbers.addresses import TEXT_FIELDS
from services.numbers.service import Numbers
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    PLATFORM,
    TENANT,
    Pki,
    RunningSystem,
    address_message,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import BOTH, USER, sample, scrape

DOMAIN = "numbers.opconnect"
MISSING = "00000000-0000-4000-8000-000000000000"


def stub(system: RunningSystem, operator: str = OPERATOR) -> pb_grpc.CivicAddressServiceStub:
    return pb_grpc.CivicAddressServiceStub(system.channel("operator", operator))


def admin(system: RunningSystem) -> pb_grpc.CivicAddressAdminServiceStub:
    return pb_grpc.CivicAddressAdminServiceStub(system.channel("platform", PLATFORM))


address = address_message


def create(
    system: RunningSystem, message: pb.CivicAddress | None = None, request_id: str = ""
) -> pb.CivicAddress:
    request = pb.CreateCivicAddressRequest(
        civic_address=message or address(), request_id=request_id
    )
    response: pb.CreateCivicAddressResponse = stub(system).CreateCivicAddress(request)
    return response.civic_address


def update(
    system: RunningSystem, message: pb.CivicAddress, *paths: str, operator: str = OPERATOR
) -> pb.CivicAddress:
    request = pb.UpdateCivicAddressRequest(
        civic_address=message, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )
    response: pb.UpdateCivicAddressResponse = stub(system, operator).UpdateCivicAddress(request)
    return response.civic_address


def refused(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    rich = rich_error(caught.value)
    assert rich.domain == DOMAIN, rich
    return rich.code, rich.reason, rich.fields


def test_create_get_list_update_delete(system: RunningSystem) -> None:
    made = create(system, address(street_name="  Microsoft Way  ", country_code="us"))
    uuid.UUID(made.civic_address_id)
    assert (made.street_name, made.country_code, made.tenant_id) == ("Microsoft Way", "US", TENANT)
    assert made.created_by == pb.CIVIC_ADDRESS_AUTHOR_OPERATOR
    assert [x.description for x in made.locations] == ["Floor 1", "Floor 2"]
    assert all(uuid.UUID(x.location_id) for x in made.locations)
    assert made.create_time == made.update_time and made.HasField("geo_point")
    got = stub(system).GetCivicAddress(
        pb.GetCivicAddressRequest(civic_address_id=made.civic_address_id)
    )
    assert got.civic_address == made
    # The locations' replace rule: one kept (its description as sent), one new, one removed.
    first, _second = made.locations
    change = pb.CivicAddress(
        civic_address_id=made.civic_address_id,
        street_name="NE 36th St",
        city="ignored: not in the mask",
        locations=[
            pb.Location(location_id=first.location_id, description="Floor 1, east"),
            pb.Location(description="Roof"),
        ],
    )
    after = update(system, change, "street_name", "locations")
    assert (after.street_name, after.city) == ("NE 36th St", "Redmond")
    assert [(x.location_id == first.location_id, x.description) for x in after.locations] == [
        (True, "Floor 1, east"),
        (False, "Roof"),
    ]
    assert after.update_time.ToDatetime() > made.update_time.ToDatetime()
    # Unsetting the point (in the mask, not in the message) removes it.
    pointless = update(system, pb.CivicAddress(civic_address_id=made.civic_address_id), "geo_point")
    assert not pointless.HasField("geo_point")
    # The same values again: nothing changes, not even the time.
    same = update(
        system,
        pb.CivicAddress(civic_address_id=made.civic_address_id, street_name="NE 36th St"),
        "street_name",
    )
    assert same.update_time == pointless.update_time
    stub(system).DeleteCivicAddress(
        pb.DeleteCivicAddressRequest(civic_address_id=made.civic_address_id)
    )
    code, reason, _ = refused(
        lambda: stub(system).GetCivicAddress(
            pb.GetCivicAddressRequest(civic_address_id=made.civic_address_id)
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CIVIC_ADDRESS_NOT_FOUND")


def test_a_retry_with_the_same_request_id_creates_nothing_twice(system: RunningSystem) -> None:
    request_id = str(uuid.uuid4())
    first = create(system, address(), request_id)
    again = create(system, address(street_name="Anything else"), request_id.upper())
    assert again == first
    other = create(system, address(), str(uuid.uuid4()))
    assert other.civic_address_id != first.civic_address_id
    code, reason, fields = refused(lambda: create(system, address(), "not-a-uuid"))
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_INVALID",
        {"request_id": "REQUEST_ID_INVALID"},
    )


def test_the_customer_creates_addresses_the_operator_sees(system: RunningSystem) -> None:
    made = (
        admin(system)
        .CreateCustomerCivicAddress(
            pb.CreateCustomerCivicAddressRequest(operator_id=OPERATOR, civic_address=address())
        )
        .civic_address
    )
    assert made.created_by == pb.CIVIC_ADDRESS_AUTHOR_CUSTOMER
    got = stub(system).GetCivicAddress(
        pb.GetCivicAddressRequest(civic_address_id=made.civic_address_id)
    )
    assert got.civic_address == made
    code, reason, fields = refused(
        lambda: admin(system).CreateCustomerCivicAddress(
            pb.CreateCustomerCivicAddressRequest(operator_id="Not An Id", civic_address=address())
        )
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "OPERATOR_ID_INVALID",
        {"operator_id": "OPERATOR_ID_INVALID"},
    )


def test_a_tenant_without_an_active_consent_gets_no_address(system: RunningSystem) -> None:
    stranger = str(uuid.uuid4())
    code, reason, _ = refused(lambda: create(system, address(stranger)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CONSENT_NOT_ACTIVE")


def test_every_bad_field_is_named(system: RunningSystem) -> None:
    bad = address(
        "not-a-tenant",
        country_code="XX",
        street_name="",
        postal_code="1234",
        description="a\x00b",
        geo_point=pb.GeoPoint(latitude=95, longitude=0),
        locations=[pb.Location(description="ok"), pb.Location(description="", elin="!!")],
    )
    code, reason, fields = refused(lambda: create(system, bad))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CIVIC_ADDRESS_INVALID")
    assert set(fields) == {
        "civic_address.tenant_id",
        "civic_address.country_code",
        "civic_address.street_name",
        "civic_address.description",
        "civic_address.geo_point.latitude",
        "civic_address.locations[1].description",
        "civic_address.locations[1].elin",
    }
    many = address(locations=[pb.Location(description=f"Room {i}") for i in range(101)])
    _, _, fields = refused(lambda: create(system, many))
    assert set(fields) == {"civic_address.locations"}


def test_update_and_delete_refusals(system: RunningSystem) -> None:
    made = create(system)
    ident = made.civic_address_id
    calls = {
        "empty mask": lambda: update(system, pb.CivicAddress(civic_address_id=ident)),
        "immutable": lambda: update(system, pb.CivicAddress(civic_address_id=ident), "tenant_id"),
        "output only": lambda: update(
            system, pb.CivicAddress(civic_address_id=ident), "created_by"
        ),
        "bad id": lambda: update(system, pb.CivicAddress(civic_address_id="x"), "city"),
        "unknown": lambda: update(system, pb.CivicAddress(civic_address_id=MISSING), "city"),
        "result invalid": lambda: update(system, pb.CivicAddress(civic_address_id=ident), "city"),
        "unknown location": lambda: update(
            system,
            pb.CivicAddress(
                civic_address_id=ident,
                locations=[pb.Location(location_id=MISSING, description="x")],
            ),
            "locations",
        ),
        "get bad id": lambda: stub(system).GetCivicAddress(
            pb.GetCivicAddressRequest(civic_address_id="nope")
        ),
        "delete unknown": lambda: stub(system).DeleteCivicAddress(
            pb.DeleteCivicAddressRequest(civic_address_id=MISSING)
        ),
    }
    got = {name: refused(call)[:2] for name, call in calls.items()}
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    assert got == {
        "empty mask": (invalid, "UPDATE_MASK_INVALID"),
        "immutable": (invalid, "UPDATE_MASK_INVALID"),
        "output only": (invalid, "UPDATE_MASK_INVALID"),
        "bad id": (invalid, "CIVIC_ADDRESS_ID_INVALID"),
        "unknown": (missing, "CIVIC_ADDRESS_NOT_FOUND"),
        "result invalid": (invalid, "CIVIC_ADDRESS_INVALID"),
        "unknown location": (missing, "LOCATION_NOT_FOUND"),
        "get bad id": (invalid, "CIVIC_ADDRESS_ID_INVALID"),
        "delete unknown": (missing, "CIVIC_ADDRESS_NOT_FOUND"),
    }


def test_an_address_in_use_stays(system: RunningSystem) -> None:
    made = create(system)
    kept, dropped = made.locations
    upload = numbers_pb.NumberUpload(
        phone_number="+14255550150",
        usage=USER,
        capabilities=BOTH,
        civic_address_id=made.civic_address_id,
        location_id=dropped.location_id,
    )
    answer = system.numbers().UploadNumbers(
        numbers_pb.UploadNumbersRequest(tenant_id=TENANT, numbers=[upload])
    )
    assert answer.added_count == 1, answer
    code, reason, _ = refused(
        lambda: stub(system).DeleteCivicAddress(
            pb.DeleteCivicAddressRequest(civic_address_id=made.civic_address_id)
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CIVIC_ADDRESS_IN_USE")
    only_kept = pb.CivicAddress(
        civic_address_id=made.civic_address_id,
        locations=[pb.Location(location_id=kept.location_id, description=kept.description)],
    )
    code, reason, _ = refused(lambda: update(system, only_kept, "locations"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LOCATION_IN_USE")
    # Once the number has left it, the address goes.
    system.numbers().ReleaseNumbers(
        numbers_pb.ReleaseNumbersRequest(phone_numbers=["+14255550150"])
    )
    update(system, only_kept, "locations")
    stub(system).DeleteCivicAddress(
        pb.DeleteCivicAddressRequest(civic_address_id=made.civic_address_id)
    )


def test_list_in_pages_by_tenant_then_id(system: RunningSystem) -> None:
    made = [create(system) for _ in range(5)]
    ours = {m.civic_address_id for m in made}
    seen: list[pb.CivicAddress] = []
    token = ""
    while True:
        page = stub(system).ListCivicAddresses(
            pb.ListCivicAddressesRequest(page_size=2, tenant_id=TENANT, page_token=token)
        )
        seen.extend(page.civic_addresses)
        assert len(page.civic_addresses) <= 2
        token = page.next_page_token
        if not token:
            break
    keys = [(a.tenant_id, a.civic_address_id) for a in seen]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert ours <= {a.civic_address_id for a in seen}
    assert all(a.tenant_id == TENANT for a in seen)
    refusals = {
        "size": pb.ListCivicAddressesRequest(page_size=-1),
        "token": pb.ListCivicAddressesRequest(page_token="garbage"),
        "tenant": pb.ListCivicAddressesRequest(tenant_id="nope"),
    }
    got = {
        k: refused(lambda r=r: stub(system).ListCivicAddresses(r))[1] for k, r in refusals.items()
    }
    assert got == {
        "size": "PAGE_SIZE_INVALID",
        "token": "PAGE_TOKEN_INVALID",
        "tenant": "TENANT_ID_INVALID",
    }
    # A token is only good with the filter that made it.
    first = stub(system).ListCivicAddresses(pb.ListCivicAddressesRequest(page_size=1))
    code, reason, _ = refused(
        lambda: stub(system).ListCivicAddresses(
            pb.ListCivicAddressesRequest(
                page_size=1, tenant_id=TENANT, page_token=first.next_page_token
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID")


def test_another_operator_sees_nothing_of_the_first(system: RunningSystem) -> None:
    made = create(system)
    ident = made.civic_address_id
    other = stub(system, OTHER_OPERATOR)
    calls = [
        lambda: other.GetCivicAddress(pb.GetCivicAddressRequest(civic_address_id=ident)),
        lambda: update(
            system,
            pb.CivicAddress(civic_address_id=ident, city="X"),
            "city",
            operator=OTHER_OPERATOR,
        ),
        lambda: other.DeleteCivicAddress(pb.DeleteCivicAddressRequest(civic_address_id=ident)),
    ]
    for call in calls:
        assert refused(call)[:2] == (grpc.StatusCode.NOT_FOUND, "CIVIC_ADDRESS_NOT_FOUND")
    listed = other.ListCivicAddresses(pb.ListCivicAddressesRequest(page_size=1000))
    assert ident not in {a.civic_address_id for a in listed.civic_addresses}
    # Nor may it upload a number to it.
    upload = numbers_pb.NumberUpload(
        phone_number="+14255550160", usage=USER, capabilities=BOTH, civic_address_id=ident
    )
    answer = system.numbers(OTHER_OPERATOR).UploadNumbers(
        numbers_pb.UploadNumbersRequest(tenant_id=TENANT, numbers=[upload])
    )
    assert answer.results[0].reason == "CIVIC_ADDRESS_NOT_FOUND"
    # And the principals keep to their sides.
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.CivicAddressServiceStub(system.channel("platform", PLATFORM)).GetCivicAddress(
            pb.GetCivicAddressRequest(civic_address_id=ident)
        )
    assert rich_error(caught.value).reason == "OPERATOR_ONLY"
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.CivicAddressAdminServiceStub(
            system.channel("operator", OPERATOR)
        ).CreateCustomerCivicAddress(
            pb.CreateCustomerCivicAddressRequest(operator_id=OPERATOR, civic_address=address())
        )
    assert rich_error(caught.value).reason == "PLATFORM_ONLY"


def test_a_tenant_holds_at_most_its_limit(
    system: RunningSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(address_storage, "MAX_ADDRESSES_PER_TENANT", 2)
    other_tenant_address = address()
    create(system, other_tenant_address)  # the conftest's own address is the first
    code, reason, _ = refused(lambda: create(system))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CIVIC_ADDRESSES")
    with pytest.raises(grpc.RpcError) as caught:
        create(system)
    assert rich_error(caught.value).retry_delay_s is not None


def test_reads_are_audited_and_changes_counted(
    session_pki: Pki, migrated_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, session_pki.paths, migrated_url, metrics_listen="127.0.0.1:0")
    system = start_system(settings, session_pki)
    try:
        made = create(system)
        ident = made.civic_address_id
        stub(system).GetCivicAddress(pb.GetCivicAddressRequest(civic_address_id=ident))
        stub(system).ListCivicAddresses(pb.ListCivicAddressesRequest(tenant_id=TENANT))
        refused(
            lambda: stub(system).GetCivicAddress(
                pb.GetCivicAddressRequest(civic_address_id=MISSING)
            )
        )
        update(system, pb.CivicAddress(civic_address_id=ident, city="Bellevue"), "city")
        stub(system).DeleteCivicAddress(pb.DeleteCivicAddressRequest(civic_address_id=ident))
        service = system.runtime.service("numbers")
        assert isinstance(service, Numbers) and service.audit is not None
        system.call(service.audit.flush())
        events = system.call(system.runtime.db.run(audit.list_events, None, None, 100))
        seen = [(e.method, e.record_count, e.status) for e in reversed(events)]
        assert seen == [
            ("GetCivicAddress", 1, "OK"),
            ("ListCivicAddresses", 2, "OK"),  # the conftest's address and this one
            ("GetCivicAddress", 0, "NOT_FOUND"),
        ]
        samples = scrape(system)
        name = "opconnect_civic_address_changes_total"
        counted = {
            change: sample(samples, name, operator=OPERATOR, change=change)
            for change in ("created", "updated", "deleted")
        }
        assert counted == {"created": 1, "updated": 1, "deleted": 1}
    finally:
        system.stop()


# --- hypothesis on every field ----------------------------------------------------------------

fuzz = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(
    name=st.sampled_from(sorted(TEXT_FIELDS)),
    value=st.text(max_size=300),
    latitude=st.floats(),
    elin=st.text(max_size=30),
)
def test_any_field_answers_the_address_or_its_violations(
    fuzz_system: RunningSystem, name: str, value: str, latitude: float, elin: str
) -> None:
    message = address(**{name: value})
    message.geo_point.latitude = latitude
    message.locations[0].elin = elin
    try:
        made = create(fuzz_system, message)
    except grpc.RpcError as error:
        rich = rich_error(error)
        assert (rich.code, rich.reason, rich.domain) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "CIVIC_ADDRESS_INVALID",
            DOMAIN,
        ), rich
        assert rich.fields and all(f.startswith("civic_address.") for f in rich.fields)
        return
    assert getattr(made, name) == getattr(made, name).strip()
    got = stub(fuzz_system).GetCivicAddress(
        pb.GetCivicAddressRequest(civic_address_id=made.civic_address_id)
    )
    assert got.civic_address == made


@fuzz
@given(value=st.one_of(st.text(max_size=60), st.from_regex(r"[0-9a-fA-F-]{30,40}", fullmatch=True)))
def test_any_id_answers_invalid_or_not_found(fuzz_system: RunningSystem, value: str) -> None:
    client = stub(fuzz_system)
    for call in (
        lambda: client.GetCivicAddress(pb.GetCivicAddressRequest(civic_address_id=value)),
        lambda: client.DeleteCivicAddress(pb.DeleteCivicAddressRequest(civic_address_id=value)),
    ):
        code, reason, _ = refused(call)
        assert (code, reason) in {
            (grpc.StatusCode.INVALID_ARGUMENT, "CIVIC_ADDRESS_ID_INVALID"),
            (grpc.StatusCode.NOT_FOUND, "CIVIC_ADDRESS_NOT_FOUND"),
        }


def test_one_audit_backlog_family_whatever_the_services(session_pki: Pki, tmp_path: Path) -> None:
    """The numbers and records services each keep an audit log: one process exports their
    backlog as one family (Prometheus refuses a scrape that names a family twice)."""
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    settings = settings_for(tmp_path, session_pki.paths, url, metrics_listen="127.0.0.1:0")
    system = start_system(settings, session_pki)
    try:
        endpoint = system.runtime.metrics_endpoint
        assert endpoint is not None
        with urllib.request.urlopen(endpoint.url, timeout=10) as answer:
            text = answer.read().decode()
        assert text.count("# TYPE opconnect_audit_events_pending gauge") == 1
    finally:
        system.stop()
