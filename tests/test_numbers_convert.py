"""Unit tier: the numbers service's conversion out (no sockets, no database): a number's and an
event's emergency location, read from its stored snapshot once per distinct snapshot."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

import pytest

from opconnect.numbers.v1 import numbers_pb2 as pb
from services.numbers import convert
from services.numbers.addresses import (
    Author,
    CivicAddress,
    EmergencyLocation,
    GeoPoint,
    Location,
    from_json,
    to_json,
)
from services.numbers.rules import Event, EventType, Number, State, Target, TargetKind, Usage

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 29, 13, 42, 7, 123456, tzinfo=dt.UTC)
ADDRESS = CivicAddress(
    tenant_id="6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c",
    country_code="US",
    street_name="Microsoft Way",
    city="Redmond",
    company_name="Contoso",
    house_number="1",
    state_or_province="WA",
    postal_code="98052",
    geo_point=GeoPoint(47.64, -122.13),
    id="0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
    created_by=Author.OPERATOR,
    created_at=NOW,
    updated_at=NOW,
)
SNAPSHOT = to_json(
    EmergencyLocation(ADDRESS, Location("1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e", "Floor 2", ""))
)


def number(snapshot: str = SNAPSHOT) -> Number:
    return Number(
        phone_number="+14255550100",
        operator_id="contoso",
        tenant_id=ADDRESS.tenant_id,
        usage=Usage.USER,
        inbound=True,
        outbound=True,
        state=State.ASSIGNED,
        sip_uri="sip:+14255550100@sbc1.contoso.example;user=phone",
        target=Target(TargetKind.USER, "11111111-2222-4333-8444-555555555555"),
        created_at=NOW,
        updated_at=NOW,
        civic_address_id=ADDRESS.id,
        location_id="1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
        snapshot=snapshot,
    )


def event(snapshot: str = SNAPSHOT) -> Event:
    found = number(snapshot)
    return Event(
        7,
        EventType.ASSIGNED,
        found.phone_number,
        found.tenant_id,
        found.sip_uri,
        found.target,
        NOW,
        snapshot,
    )


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    convert.snapshot_out.cache_clear()
    yield
    convert.snapshot_out.cache_clear()


def test_a_numbers_emergency_location_is_its_snapshot_as_read() -> None:
    found = number()
    answer = convert.number_out(found)
    assert answer.emergency_location == convert.emergency_location_out(found.emergency_location)
    assert answer.emergency_location.civic_address.street_name == "Microsoft Way"
    assert answer.emergency_location.location.description == "Floor 2"
    assert convert.number_out(found) == answer  # from the cache: the same message


def test_an_events_emergency_location_is_its_snapshot_as_read() -> None:
    happened = event()
    sent = convert.event_out(happened, "cursor")
    expected = convert.emergency_location_out(happened.emergency_location)
    assert sent.emergency_location == expected
    assert convert.event_out(happened, "cursor") == sent


def test_no_snapshot_no_emergency_location() -> None:
    assert not convert.number_out(number("")).HasField("emergency_location")
    assert not convert.event_out(event(""), "cursor").HasField("emergency_location")
    assert convert.snapshot_out.cache_info().currsize == 0


def test_a_snapshot_is_read_once_for_every_answer_and_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An assignment answers the number it has just changed and sends its event: the stored
    emergency location is read (its JSON, its message built) once, not on every one."""
    reads: list[str] = []
    real = from_json

    def counted(text: str) -> EmergencyLocation | None:
        reads.append(text)
        return real(text)

    monkeypatch.setattr(convert, "from_json", counted)
    for i in range(5):
        changed = dataclasses.replace(number(), updated_at=NOW + dt.timedelta(seconds=i))
        assert convert.number_out(changed).HasField("emergency_location")
        assert convert.event_out(event(), f"c{i}").HasField("emergency_location")
    assert reads == [SNAPSHOT]
    other = to_json(EmergencyLocation(dataclasses.replace(ADDRESS, city="Bellevue"), None))
    answer = convert.number_out(number(other))
    assert answer.emergency_location.civic_address.city == "Bellevue"
    assert not answer.emergency_location.HasField("location")
    assert reads == [SNAPSHOT, other]


def test_the_cache_is_bounded() -> None:
    assert convert.snapshot_out.cache_parameters()["maxsize"] == convert.SNAPSHOTS_CACHED
    assert isinstance(convert.number_out(number()), pb.PhoneNumber)
