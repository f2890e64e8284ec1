"""Unit tier: civic addresses and the number's new fields (services/numbers/addresses.py,
rules.py) on domain objects alone: every field's rule, every violation named by its path, the
emergency location's snapshot, and hypothesis on every free-form field. Run the fast tier alone
with `pytest -m unit`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plumbing.errors import ApiError, Kind
from services.numbers import addresses
from services.numbers.addresses import (
    MAX_LOCATIONS,
    TEXT_FIELDS,
    Author,
    CivicAddress,
    EmergencyLocation,
    GeoPoint,
    Location,
    check_address,
    check_mask,
    emergency_location,
    from_json,
    merged,
    to_json,
)
from services.numbers.rules import (
    Upload,
    Usage,
    check_iso_country,
    check_number_mask,
    check_upload,
)
from tests.conftest import sample_address

pytestmark = pytest.mark.unit

TENANT = "6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"
ADDRESS_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
LOCATION_ID = "1b2c3d4e-5f6a-4b7c-9d8e-0f1a2b3c4d5e"


def good(**changes: object) -> CivicAddress:
    base = dataclasses.replace(
        sample_address(TENANT), locations=(Location("", "Building 92, floor 1", "elin-1"),)
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def violations(draft: CivicAddress, *, keep_location_ids: bool = False) -> dict[str, str]:
    with pytest.raises(ApiError) as caught:
        check_address(draft, keep_location_ids=keep_location_ids)
    error = caught.value
    assert (error.kind, error.reason) == (Kind.INVALID, "CIVIC_ADDRESS_INVALID")
    return {v.field: v.description for v in error.violations}


def test_a_good_address_is_kept_trimmed_and_normalised() -> None:
    checked = check_address(
        good(
            street_name="  Microsoft Way ",
            country_code="us",
            tenant_id=TENANT.upper(),
            locations=(Location("ignored", " Floor 3 ", "e-1"),),
        )
    )
    assert (checked.street_name, checked.country_code, checked.tenant_id) == (
        "Microsoft Way",
        "US",
        TENANT,
    )
    assert checked.locations == (Location("", "Floor 3", "E-1"),)  # ids ignored on create


def test_required_fields_are_named_each() -> None:
    found = violations(good(street_name=" ", city="", company_name="", country_code=""))
    assert set(found) == {
        "civic_address.street_name",
        "civic_address.city",
        "civic_address.company_name",
        "civic_address.country_code",
    }


@pytest.mark.parametrize(("name", "limit"), [(n, m) for n, (m, _) in TEXT_FIELDS.items()])
def test_every_text_field_has_its_length(name: str, limit: int) -> None:
    if name in ("country_code", "postal_code"):
        return  # their forms say more than their lengths (below)
    check_address(good(**{name: "x" * limit}))
    assert f"civic_address.{name}" in violations(good(**{name: "x" * (limit + 1)}))


@pytest.mark.parametrize("char", ["\x00", "\n", "\t", "\x7f", "\x85", "\u2028"])
def test_no_control_characters(char: str) -> None:
    found = violations(good(street_name=f"Main{char}St", description=f"a{char}b"))
    assert set(found) == {"civic_address.street_name", "civic_address.description"}


@pytest.mark.parametrize("code", ["XX", "U", "USA", "1A", "ZZ"])
def test_a_country_is_iso_3166_alpha_2(code: str) -> None:
    assert "civic_address.country_code" in violations(good(country_code=code))


def test_us_ca_and_au_need_a_state() -> None:
    for country in ("US", "AU"):
        found = violations(good(country_code=country, state_or_province=""))
        assert "civic_address.state_or_province" in found
    check_address(good(country_code="GB", state_or_province="", postal_code="SW1A 1AA"))


@pytest.mark.parametrize(
    ("country", "code", "ok"),
    [
        ("US", "98052", True),
        ("US", "98052-6399", True),
        ("US", "9805", False),
        ("US", "98052-63", False),
        ("US", "", False),
        ("CA", "K1A 0B1", True),
        ("CA", "k1a0b1", True),
        ("CA", "K1A-0B1", False),
        ("CA", "123 456", False),
        ("DE", "", True),
    ],
)
def test_postal_codes_of_the_us_and_canada(country: str, code: str, ok: bool) -> None:
    draft = good(country_code=country, postal_code=code, state_or_province="ON")
    if ok:
        checked = check_address(draft)
        if country == "CA":
            assert checked.postal_code == "K1A 0B1"
    else:
        assert "civic_address.postal_code" in violations(draft)


@pytest.mark.parametrize(
    "point",
    [
        GeoPoint(91, 0),
        GeoPoint(-90.5, 0),
        GeoPoint(0, 180.1),
        GeoPoint(math.nan, 0),
        GeoPoint(0, math.inf),
    ],
)
def test_a_geo_point_is_finite_and_in_range(point: GeoPoint) -> None:
    found = violations(good(geo_point=point))
    assert any(f.startswith("civic_address.geo_point.") for f in found)


def test_locations_are_checked_each_by_path() -> None:
    locations = (
        Location("", "Floor 1"),
        Location("", ""),
        Location("", "Floor 3", "not an elin!"),
    )
    assert set(violations(good(locations=locations))) == {
        "civic_address.locations[1].description",
        "civic_address.locations[2].elin",
    }
    many = tuple(Location("", f"Room {i}") for i in range(MAX_LOCATIONS + 1))
    assert "civic_address.locations" in violations(good(locations=many))
    check_address(good(locations=many[:MAX_LOCATIONS]))


def test_an_update_names_locations_by_id_once() -> None:
    twice = (Location(LOCATION_ID, "A"), Location(LOCATION_ID.upper(), "B"))
    found = violations(good(locations=twice), keep_location_ids=True)
    assert "civic_address.locations[1].location_id" in found
    bad = (Location("not-a-guid", "A"),)
    assert "civic_address.locations[0].location_id" in violations(
        good(locations=bad), keep_location_ids=True
    )


def test_the_update_mask() -> None:
    assert check_mask(["street_name", "locations"]) == {"street_name", "locations"}
    for paths in ([], ["tenant_id"], ["civic_address_id"], ["created_by"], ["nope"]):
        with pytest.raises(ApiError) as caught:
            check_mask(paths)
        assert caught.value.reason == "UPDATE_MASK_INVALID"
    current = check_address(good())
    change = good(street_name="Other", city="Elsewhere")
    assert merged(current, change, frozenset({"street_name"})).city == current.city


def test_the_snapshot_round_trips() -> None:
    stamp = dt.datetime(2026, 11, 29, 10, 0, tzinfo=dt.UTC)
    address = dataclasses.replace(
        check_address(good()),
        id=ADDRESS_ID,
        created_by=Author.CUSTOMER,
        created_at=stamp,
        updated_at=stamp,
        locations=(Location(LOCATION_ID, "Floor 1", "E1"),),
    )
    where = emergency_location(address, LOCATION_ID)
    assert where == EmergencyLocation(
        dataclasses.replace(address, locations=()), Location(LOCATION_ID, "Floor 1", "E1")
    )
    assert from_json(to_json(where)) == where
    alone = emergency_location(address, "")
    assert alone is not None and alone.location is None
    assert from_json(to_json(alone)) == alone
    assert (to_json(None), from_json("")) == ("", None)


def checked_or_error(draft: CivicAddress) -> CivicAddress | ApiError:
    try:
        return check_address(draft)
    except ApiError as error:
        return error


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=80)


@given(
    name=st.sampled_from(sorted(TEXT_FIELDS)),
    value=st.one_of(st.text(max_size=300), printable),
)
def test_any_value_of_any_field_is_kept_or_named(name: str, value: str) -> None:
    """Whatever a field holds, the address is stored as checked, or refused with a violation of
    that field (and no other field is blamed)."""
    checked = checked_or_error(good(**{name: value}))
    if isinstance(checked, ApiError):
        assert checked.reason == "CIVIC_ADDRESS_INVALID"
        fields = {v.field for v in checked.violations}
        # A country decides the state's and postal code's rules: those may be named with it.
        assert f"civic_address.{name}" in fields or name == "country_code"
        return
    kept = getattr(checked, name)
    assert kept == kept.strip()
    assert addresses.control_problem(kept) is None
    assert len(kept) <= TEXT_FIELDS[name][0]


@given(
    latitude=st.floats(allow_nan=True, allow_infinity=True),
    longitude=st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_geo_point(latitude: float, longitude: float) -> None:
    draft = good(geo_point=GeoPoint(latitude, longitude))
    ok = (
        math.isfinite(latitude)
        and math.isfinite(longitude)
        and abs(latitude) <= 90
        and abs(longitude) <= 180
    )
    if ok:
        check_address(draft)
    else:
        assert any(f.startswith("civic_address.geo_point.") for f in violations(draft))


# --- the number's fields ----------------------------------------------------------------------


def upload(**changes: object) -> Upload:
    base = Upload("+14255550100", Usage.USER, True, True, civic_address_id=ADDRESS_ID)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def reason(item: Upload) -> str:
    result = check_upload(item, set())
    return result.reason if result is not None else ""


def test_a_user_number_needs_an_address_unless_the_customer_may_set_it() -> None:
    assert reason(upload()) == ""
    assert reason(upload(civic_address_id="")) == "CIVIC_ADDRESS_REQUIRED"
    assert reason(upload(civic_address_id="", allow_tenant_address_update=True)) == ""
    assert reason(upload(civic_address_id="", usage=Usage.VOICE_APP)) == ""


def test_the_numbers_other_fields() -> None:
    assert reason(upload(calling_profile_id="profile")) == "CALLING_PROFILE_ID_INVALID"
    assert reason(upload(calling_profile_id=LOCATION_ID)) == ""
    assert reason(upload(civic_address_id="nope")) == "CIVIC_ADDRESS_NOT_FOUND"
    assert reason(upload(location_id="nope")) == "LOCATION_NOT_FOUND"
    assert reason(upload(civic_address_id="", location_id=LOCATION_ID, usage=Usage.CONFERENCE)) == (
        "LOCATION_NOT_FOUND"
    )
    assert reason(upload(ticket_id="T" * 64)) == ""
    assert reason(upload(ticket_id="T" * 65)) == "TICKET_ID_INVALID"
    assert reason(upload(ticket_id="a\tb")) == "TICKET_ID_INVALID"


@pytest.mark.parametrize("code", ["800", "833", "844", "855", "866", "877", "888"])
def test_north_american_toll_free_numbers_need_a_country(code: str) -> None:
    number = f"+1{code}5550100"
    assert reason(upload(phone_number=number)) == "ISO_COUNTRY_CODE_REQUIRED"
    assert reason(upload(phone_number=number, iso_country_code="CA")) == ""


def test_a_country_must_be_one_the_calling_code_serves() -> None:
    assert check_iso_country("+14255550100", "") is None
    assert check_iso_country("+14255550100", "US") is None
    assert check_iso_country("+12045550100", "CA") is None
    assert check_iso_country("+442071234567", "GB") is None
    problem = check_iso_country("+442071234567", "US")
    assert problem is not None and problem[0] == "ISO_COUNTRY_CODE_INVALID"
    problem = check_iso_country("+14255550100", "QQ")
    assert problem is not None and problem[0] == "ISO_COUNTRY_CODE_INVALID"


@given(ticket=st.text(max_size=100), profile=st.text(max_size=40))
def test_any_ticket_and_profile(ticket: str, profile: str) -> None:
    got = reason(upload(ticket_id=ticket, calling_profile_id=profile))
    assert got in {"", "TICKET_ID_INVALID", "CALLING_PROFILE_ID_INVALID"}
    if got == "":
        assert len(ticket) <= 64 and ticket.isprintable()


def test_the_number_update_mask() -> None:
    assert check_number_mask(["ticket_id", "civic_address_id"]) == {"ticket_id", "civic_address_id"}
    for paths in ([], ["usage"], ["tenant_id"], ["emergency_location"], ["iso_country_code"]):
        with pytest.raises(ApiError) as caught:
            check_number_mask(paths)
        assert caught.value.reason == "UPDATE_MASK_INVALID"
