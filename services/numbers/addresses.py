"""Civic addresses and emergency locations: the domain types and the rules a request must meet
before storage sees it (storage in address_storage.py, the protobuf edge in convert.py).

A civic address is a street address of one customer tenant, held for one operator, with the
places inside it (locations). Every text field is trimmed of surrounding spaces and may hold no
control character; each has a length limit, some are required (the contract,
`civic_addresses.proto`, says which). Countries are ISO 3166-1 alpha-2 (the `iso3166` package's
list); the United States' and Canada's postal codes have their own forms. Every bad field is
reported at once, each named by its path in the request (`civic_address.locations[2].elin`).

A number's emergency location is its address (without the address's other locations) and,
optionally, one location of it: what an assignment event carries, as it was when the event was
logged (a snapshot, `to_json`/`from_json`, stored with the event).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import iso3166

from plumbing.errors import Violation, invalid, invalid_field
from plumbing.validation import check_guid
from services.numbers.rules import DOMAIN

MAX_LOCATIONS = 100
MAX_ADDRESSES_PER_TENANT = 10_000  # per operator and tenant

INVALID = "CIVIC_ADDRESS_INVALID"


class Author(StrEnum):
    """Who created an address: the operator (CivicAddressService) or the customer (the admin
    center, CivicAddressAdminService)."""

    OPERATOR = "operator"
    CUSTOMER = "customer"


@dataclass(frozen=True)
class GeoPoint:
    latitude: float
    longitude: float


@dataclass(frozen=True)
class Location:
    id: str  # "" for a location not stored yet
    description: str
    elin: str = ""


@dataclass(frozen=True)
class CivicAddress:
    """An address; `id`, `operator_id`, `created_by` and the times are empty or None for one
    not stored yet (a request's draft)."""

    tenant_id: str
    country_code: str
    street_name: str
    city: str
    company_name: str
    house_number: str = ""
    house_number_suffix: str = ""
    pre_directional: str = ""
    street_suffix: str = ""
    post_directional: str = ""
    city_alias: str = ""
    state_or_province: str = ""
    postal_code: str = ""
    company_tax_id: str = ""
    description: str = ""
    geo_point: GeoPoint | None = None
    locations: tuple[Location, ...] = ()
    id: str = ""
    operator_id: str = ""
    created_by: Author | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    def location(self, location_id: str) -> Location | None:
        return next((x for x in self.locations if x.id == location_id), None)


@dataclass(frozen=True)
class EmergencyLocation:
    """Where an emergency call from a number is located: its address (its `locations` empty)
    and the location inside it, if the number has one."""

    address: CivicAddress
    location: Location | None = None


# The text fields of an address: (maximum length, required). Lengths count characters, after
# trimming.
TEXT_FIELDS: Mapping[str, tuple[int, bool]] = {
    "country_code": (2, True),
    "house_number": (10, False),
    "house_number_suffix": (10, False),
    "pre_directional": (10, False),
    "street_name": (64, True),
    "street_suffix": (10, False),
    "post_directional": (10, False),
    "city": (64, True),
    "city_alias": (64, False),
    "state_or_province": (64, False),
    "postal_code": (10, False),
    "company_name": (64, True),
    "company_tax_id": (32, False),
    "description": (256, False),
}
# What UpdateCivicAddress may change (AIP-134 paths): every text field, the point, the locations.
WRITABLE = frozenset({*TEXT_FIELDS, "geo_point", "locations"})
STATE_REQUIRED = frozenset({"US", "CA", "AU"})
POSTAL_FORMS = {
    "US": (re.compile(r"[0-9]{5}(?:-[0-9]{4})?"), "5 digits, or 5-4 (e.g. 98052 or 98052-6399)"),
    "CA": (re.compile(r"[A-Z][0-9][A-Z] ?[0-9][A-Z][0-9]"), "the form A1A 1A1"),
}
LOCATION_DESCRIPTION_MAX = 64
ELIN = re.compile(r"[A-Za-z0-9-]{1,20}")


def control_problem(value: str) -> str | None:
    """Why `value` may not be stored as text: a control character (C0, C1, DEL), a line or
    paragraph separator, or a lone surrogate."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            return "holds a control character"
    return None


def check_text(value: str, maximum: int, *, required: bool) -> tuple[str, str | None]:
    """(the value trimmed, what is wrong with it or None)."""
    value = value.strip()
    if not value:
        return value, "required" if required else None
    if problem := control_problem(value):
        return value, problem
    if len(value) > maximum:
        return value, f"longer than {maximum} characters"
    return value, None


def check_country(value: str) -> str | None:
    """What is wrong with an ISO 3166-1 alpha-2 code (upper case), or None."""
    if not value:
        return "required: ISO 3166-1 alpha-2, such as US, GB or DE"
    if value not in iso3166.countries_by_alpha2:
        return "not an ISO 3166-1 alpha-2 country code (e.g. US, GB, DE)"
    return None


def _check_geo(point: GeoPoint | None, path: str) -> list[Violation]:
    if point is None:
        return []
    found: list[Violation] = []
    for name, value, limit in (
        ("latitude", point.latitude, 90),
        ("longitude", point.longitude, 180),
    ):
        if not math.isfinite(value) or not -limit <= value <= limit:
            found.append(
                Violation(f"{path}.{name}", f"not in -{limit} to {limit} degrees", INVALID)
            )
    return found


def _check_locations(
    locations: Sequence[Location], path: str, *, keep_ids: bool
) -> tuple[tuple[Location, ...], list[Violation]]:
    """The locations trimmed, and their violations. `keep_ids`: an update, whose entries may
    name stored locations (a GUID each, not twice); otherwise ids are ignored."""
    found: list[Violation] = []
    if len(locations) > MAX_LOCATIONS:
        found.append(Violation(path, f"at most {MAX_LOCATIONS} locations", INVALID))
        return tuple(locations), found
    seen: set[str] = set()
    kept: list[Location] = []
    for i, location in enumerate(locations):
        at = f"{path}[{i}]"
        description, problem = check_text(
            location.description, LOCATION_DESCRIPTION_MAX, required=True
        )
        if problem:
            found.append(Violation(f"{at}.description", problem, INVALID))
        elin = location.elin.strip()
        if elin and ELIN.fullmatch(elin) is None:
            found.append(Violation(f"{at}.elin", "up to 20 letters, digits and '-'", INVALID))
        location_id = ""
        if keep_ids and location.id:
            location_id = location.id.lower()
            if problem := check_guid(location.id):
                found.append(Violation(f"{at}.location_id", problem, INVALID))
            elif location_id in seen:
                found.append(Violation(f"{at}.location_id", "named twice", INVALID))
            seen.add(location_id)
        kept.append(Location(location_id, description, elin.upper()))
    return tuple(kept), found


def check_address(
    draft: CivicAddress, path: str = "civic_address", *, keep_location_ids: bool = False
) -> CivicAddress:
    """The address as it may be stored (trimmed, country and postal code in upper case), or
    INVALID_ARGUMENT (CIVIC_ADDRESS_INVALID) with a violation for every bad field."""
    found: list[Violation] = []
    if problem := check_guid(draft.tenant_id):
        found.append(Violation(f"{path}.tenant_id", problem, INVALID))
    texts: dict[str, str] = {}
    for name, (maximum, required) in TEXT_FIELDS.items():
        value, problem = check_text(getattr(draft, name), maximum, required=required)
        texts[name] = value
        if problem:
            found.append(Violation(f"{path}.{name}", problem, INVALID))
    country = texts["country_code"] = texts["country_code"].upper()
    if not any(v.field == f"{path}.country_code" for v in found) and (
        problem := check_country(country)
    ):
        found.append(Violation(f"{path}.country_code", problem, INVALID))
    if country in STATE_REQUIRED and not texts["state_or_province"]:
        found.append(
            Violation(f"{path}.state_or_province", f"required for {country} addresses", INVALID)
        )
    postal = texts["postal_code"] = texts["postal_code"].upper()
    if country in POSTAL_FORMS:
        form, says = POSTAL_FORMS[country]
        if not postal:
            found.append(Violation(f"{path}.postal_code", f"required for {country}", INVALID))
        elif form.fullmatch(postal) is None:
            found.append(Violation(f"{path}.postal_code", f"{country}: {says}", INVALID))
        elif country == "CA" and " " not in postal:
            texts["postal_code"] = f"{postal[:3]} {postal[3:]}"
    found += _check_geo(draft.geo_point, f"{path}.geo_point")
    locations, problems = _check_locations(
        draft.locations, f"{path}.locations", keep_ids=keep_location_ids
    )
    found += problems
    if found:
        first = found[0]
        raise invalid(DOMAIN, INVALID, f"{first.field}: {first.description}", *found)
    checked: dict[str, Any] = {**texts, "tenant_id": draft.tenant_id.lower()}
    return replace(draft, locations=locations, **checked)


def check_mask(paths: Sequence[str]) -> frozenset[str]:
    """An UpdateCivicAddress mask: at least one path, each a writable field."""
    if not paths:
        raise invalid_field(
            DOMAIN, "UPDATE_MASK_INVALID", "update_mask", "name at least one field to change"
        )
    for path in paths:
        if path not in WRITABLE:
            raise invalid_field(
                DOMAIN, "UPDATE_MASK_INVALID", "update_mask", f"not a writable field: {path!r}"
            )
    return frozenset(paths)


def merged(current: CivicAddress, change: CivicAddress, mask: frozenset[str]) -> CivicAddress:
    """`current` with the fields `mask` names taken from `change` (not yet checked)."""
    return replace(current, **{name: getattr(change, name) for name in mask})


def require_id(value: str, field_path: str, reason: str = "CIVIC_ADDRESS_ID_INVALID") -> str:
    if problem := check_guid(value):
        raise invalid_field(DOMAIN, reason, field_path, problem)
    return value.lower()


def same_fields(a: CivicAddress, b: CivicAddress) -> bool:
    """Whether two addresses hold the same data (ids of their locations included)."""
    names = [*TEXT_FIELDS, "geo_point", "locations"]
    return all(getattr(a, n) == getattr(b, n) for n in names)


# --- the snapshot an assignment event keeps --------------------------------------------------

_SNAPSHOT_FIELDS = [f.name for f in fields(CivicAddress) if f.name in TEXT_FIELDS]


def to_json(location: EmergencyLocation | None) -> str:
    """The emergency location as stored with a number and its events; "" for none."""
    if location is None:
        return ""
    address = location.address
    data: dict[str, Any] = {name: getattr(address, name) for name in _SNAPSHOT_FIELDS}
    data["id"] = address.id
    data["tenant_id"] = address.tenant_id
    data["created_by"] = address.created_by.value if address.created_by else ""
    data["created_at"] = address.created_at.isoformat() if address.created_at else ""
    data["updated_at"] = address.updated_at.isoformat() if address.updated_at else ""
    if address.geo_point is not None:
        data["geo_point"] = [address.geo_point.latitude, address.geo_point.longitude]
    if location.location is not None:
        data["location"] = [
            location.location.id,
            location.location.description,
            location.location.elin,
        ]
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def from_json(text: str) -> EmergencyLocation | None:
    if not text:
        return None
    data = json.loads(text)
    point = data.get("geo_point")
    where = data.get("location")
    address = CivicAddress(
        **{name: data.get(name, "") for name in _SNAPSHOT_FIELDS},
        tenant_id=data["tenant_id"],
        id=data["id"],
        geo_point=GeoPoint(point[0], point[1]) if point else None,
        created_by=Author(data["created_by"]) if data.get("created_by") else None,
        created_at=dt.datetime.fromisoformat(data["created_at"]) if data["created_at"] else None,
        updated_at=dt.datetime.fromisoformat(data["updated_at"]) if data["updated_at"] else None,
    )
    return EmergencyLocation(address, Location(*where) if where else None)


def emergency_location(address: CivicAddress | None, location_id: str) -> EmergencyLocation | None:
    """A number's emergency location, from its address (None: it has none)."""
    if address is None:
        return None
    location = address.location(location_id) if location_id else None
    return EmergencyLocation(replace(address, locations=()), location)


@dataclass(frozen=True)
class AddressChange:
    """What an address's change did: the address after it, and the numbers whose emergency
    location it changed while they were assigned (one UPDATED event each)."""

    address: CivicAddress
    changed: bool
    events: list[Any] = field(default_factory=list)
