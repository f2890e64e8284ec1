"""The civic address tables and the units of work on them, and the units that change a number's
emergency location (the rules are addresses.py's).

Each public function takes a `Session` inside a transaction (run it with `Database.run`). An
address belongs to one operator and one tenant: every read and write names the operator, and
another operator's address answers as one that does not exist.

A number keeps its emergency location as it is now (`numbers.emergency_location`, a snapshot):
an edit of an address rewrites the snapshot of every number that refers to it, and appends one
UPDATED event to the `numbers` change log for each of those that is assigned, in the same
transaction; so does a change of a number's address (UpdateNumber, the customer's
UpdateNumberEmergencyAddress). The caller wakes watchers after commit.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    Index,
    Integer,
    Select,
    String,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.changelog import allocate, notify_commit
from plumbing.db import Base, dialect_insert, unit_of, utc
from plumbing.errors import (
    ApiError,
    Violation,
    failed_precondition,
    invalid,
    not_found,
    resource_exhausted,
)
from services.numbers import consent_storage, storage
from services.numbers.addresses import (
    MAX_ADDRESSES_PER_TENANT,
    TEXT_FIELDS,
    Author,
    CivicAddress,
    GeoPoint,
    Location,
    check_address,
    emergency_location,
    merged,
    same_fields,
    to_json,
)
from services.numbers.rules import (
    DOMAIN,
    LOG,
    Event,
    EventType,
    Number,
    Result,
    State,
    Upload,
    check_number_fields,
    refused,
)


class CivicAddressRow(Base):
    """A civic address of one tenant, held for one operator."""

    __tablename__ = "civic_addresses"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    country_code: Mapped[str] = mapped_column(String(2))
    house_number: Mapped[str] = mapped_column(String(10), default="")
    house_number_suffix: Mapped[str] = mapped_column(String(10), default="")
    pre_directional: Mapped[str] = mapped_column(String(10), default="")
    street_name: Mapped[str] = mapped_column(String(64))
    street_suffix: Mapped[str] = mapped_column(String(10), default="")
    post_directional: Mapped[str] = mapped_column(String(10), default="")
    city: Mapped[str] = mapped_column(String(64))
    city_alias: Mapped[str] = mapped_column(String(64), default="")
    state_or_province: Mapped[str] = mapped_column(String(64), default="")
    postal_code: Mapped[str] = mapped_column(String(10), default="")
    company_name: Mapped[str] = mapped_column(String(64))
    company_tax_id: Mapped[str] = mapped_column(String(32), default="")
    description: Mapped[str] = mapped_column(String(256), default="")
    latitude: Mapped[float | None] = mapped_column(Float, nullable=True)
    longitude: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_by: Mapped[str] = mapped_column(String(16))
    # AIP-155: the client's id of the creation, unique per operator (NULL: none given).
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[Any] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[Any] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_civic_addresses_operator_tenant_id", "operator_id", "tenant_id", "id"),
        UniqueConstraint("operator_id", "request_id", name="uq_civic_addresses_request"),
    )


class CivicAddressLocationRow(Base):
    """A place inside a civic address, in the order the address lists them."""

    __tablename__ = "civic_address_locations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    civic_address_id: Mapped[str] = mapped_column(String(36))
    ordinal: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(64))
    elin: Mapped[str] = mapped_column(String(20), default="")

    __table_args__ = (Index("ix_civic_address_locations_address", "civic_address_id", "ordinal"),)


TEXT_COLUMNS = tuple(TEXT_FIELDS)  # the address's text fields, a column each


def _address(row: CivicAddressRow, locations: Sequence[CivicAddressLocationRow]) -> CivicAddress:
    point = (
        GeoPoint(row.latitude, row.longitude)
        if row.latitude is not None and row.longitude is not None
        else None
    )
    return CivicAddress(
        **{name: getattr(row, name) for name in TEXT_COLUMNS},
        tenant_id=row.tenant_id,
        geo_point=point,
        locations=tuple(Location(x.id, x.description, x.elin) for x in locations),
        id=row.id,
        operator_id=row.operator_id,
        created_by=Author(row.created_by),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


def _locations_of(session: Session, ids: Sequence[str]) -> dict[str, list[CivicAddressLocationRow]]:
    found: dict[str, list[CivicAddressLocationRow]] = {i: [] for i in ids}
    if ids:
        L = CivicAddressLocationRow
        rows = session.scalars(
            select(L).where(L.civic_address_id.in_(ids)).order_by(L.civic_address_id, L.ordinal)
        )
        for row in rows:
            found[row.civic_address_id].append(row)
    return found


def _row(
    session: Session, operator_id: str, address_id: str, *, lock: bool
) -> CivicAddressRow | None:
    query = select(CivicAddressRow).where(
        CivicAddressRow.id == address_id, CivicAddressRow.operator_id == operator_id
    )
    if lock:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def _shared(session: Session, query: Select[CivicAddressRow]) -> Select[CivicAddressRow]:
    """On PostgreSQL, the addresses read share-locked until commit: an edit (or a delete) of
    one waits for this transaction, or this one for it, so the numbers stored with them keep
    the address as it is."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(read=True)
    return query


def _not_found() -> ApiError:
    return not_found(DOMAIN, "CIVIC_ADDRESS_NOT_FOUND", "no such civic address")


def get_address(
    session: Session, operator_id: str, address_id: str, *, lock: bool = False
) -> CivicAddress:
    """The operator's address, or NOT_FOUND; `lock`: its row locked until commit (an update
    reads what it merges its change into, and stores it, with no other change between)."""
    row = _row(session, operator_id, address_id, lock=lock)
    if row is None:
        raise _not_found()
    return _address(row, _locations_of(session, [row.id])[row.id])


def _by_request(session: Session, operator_id: str, request_id: str) -> CivicAddress | None:
    row = session.scalars(
        select(CivicAddressRow).where(
            CivicAddressRow.operator_id == operator_id, CivicAddressRow.request_id == request_id
        )
    ).one_or_none()
    return None if row is None else _address(row, _locations_of(session, [row.id])[row.id])


def _insert_locations(session: Session, address_id: str, locations: Sequence[Location]) -> None:
    if locations:
        session.execute(
            insert(CivicAddressLocationRow),
            [
                {
                    "id": x.id,
                    "civic_address_id": address_id,
                    "ordinal": i,
                    "description": x.description,
                    "elin": x.elin,
                }
                for i, x in enumerate(locations)
            ],
        )


def create_address(
    session: Session, operator_id: str, draft: CivicAddress, author: Author, request_id: str
) -> tuple[CivicAddress, bool]:
    """Store a checked address (addresses.check_address) under an ACTIVE consent; (the
    address, whether it was created now). A `request_id` seen before answers the address it
    created, whatever `draft` holds."""
    if request_id and (earlier := _by_request(session, operator_id, request_id)) is not None:
        return earlier, False
    if not consent_storage.consent_active(session, operator_id, draft.tenant_id):
        raise failed_precondition(
            DOMAIN, "CONSENT_NOT_ACTIVE", "the operator has no active consent with this tenant"
        )
    count = session.scalar(
        select(func.count())
        .select_from(CivicAddressRow)
        .where(
            CivicAddressRow.operator_id == operator_id,
            CivicAddressRow.tenant_id == draft.tenant_id,
        )
    )
    if (count or 0) >= MAX_ADDRESSES_PER_TENANT:
        raise resource_exhausted(
            DOMAIN,
            "TOO_MANY_CIVIC_ADDRESSES",
            f"the tenant has {MAX_ADDRESSES_PER_TENANT} civic addresses; delete one first",
            60.0,
        )
    stamp = storage.now()
    address_id = str(uuid.uuid4())
    point = draft.geo_point
    statement = (
        dialect_insert(session)(CivicAddressRow)
        .values(
            id=address_id,
            operator_id=operator_id,
            tenant_id=draft.tenant_id,
            **{name: getattr(draft, name) for name in TEXT_COLUMNS},
            latitude=point.latitude if point else None,
            longitude=point.longitude if point else None,
            created_by=author.value,
            request_id=request_id or None,
            created_at=stamp,
            updated_at=stamp,
        )
        .on_conflict_do_nothing(index_elements=["operator_id", "request_id"])
        .returning(CivicAddressRow.id)
    )
    if session.execute(statement).first() is None:  # the same request, committed meanwhile
        earlier = _by_request(session, operator_id, request_id)
        assert earlier is not None
        return earlier, False
    locations = tuple(dataclasses.replace(x, id=str(uuid.uuid4())) for x in draft.locations)
    _insert_locations(session, address_id, locations)
    made = dataclasses.replace(
        draft,
        id=address_id,
        operator_id=operator_id,
        locations=locations,
        created_by=author,
        created_at=stamp,
        updated_at=stamp,
    )
    return made, True


@dataclass(frozen=True)
class Page:
    addresses: list[CivicAddress]
    last: tuple[str, str] | None  # (tenant, id) of this page's last address; None: the end


def list_addresses(
    session: Session,
    operator_id: str,
    *,
    tenant_id: str | None,
    after: tuple[str, str] | None,
    limit: int,
) -> Page:
    """One page in (tenant, id) order after `after`."""
    A = CivicAddressRow
    query = select(A).where(A.operator_id == operator_id)
    if tenant_id is not None:
        query = query.where(A.tenant_id == tenant_id)
    if after is not None:
        tenant, last = after
        query = query.where((A.tenant_id > tenant) | ((A.tenant_id == tenant) & (A.id > last)))
    rows = list(session.scalars(query.order_by(A.tenant_id, A.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    locations = _locations_of(session, [r.id for r in rows])
    return Page(
        [_address(r, locations[r.id]) for r in rows],
        (rows[-1].tenant_id, rows[-1].id) if more else None,
    )


def _referring(session: Session, operator_id: str, address_id: str) -> list[tuple[str, str, str]]:
    """(number, location id, state) of every number that refers to the address."""
    N = storage.NumberRow
    rows = session.execute(
        select(N.phone_number, N.location_id, N.state)
        .where(N.operator_id == operator_id, N.civic_address_id == address_id)
        .order_by(N.phone_number)
    )
    return [(a, b, c) for a, b, c in rows]


def _log_updates(
    session: Session,
    operator_id: str,
    numbers: Sequence[Number],
    stamp: Any,
) -> list[Event]:
    """One UPDATED event for each of `numbers` (assigned, as they are now), in order."""
    if not numbers:
        return []
    first = allocate(session, LOG, len(numbers))
    events = [
        Event(
            first + i,
            EventType.UPDATED,
            n.phone_number,
            n.tenant_id,
            n.sip_uri,
            n.target,
            stamp,
            n.snapshot,
        )
        for i, n in enumerate(numbers)
    ]
    session.execute(
        insert(storage.NumberEventRow),
        [
            {
                "position": e.position,
                "operator_id": operator_id,
                "tenant_id": e.tenant_id,
                "phone_number": e.phone_number,
                "type": e.type.value,
                "sip_uri": e.sip_uri,
                "target_kind": e.target.kind.value if e.target else "",
                "target_id": e.target.id if e.target else "",
                "emergency_location": e.snapshot,
                "occurred_at": stamp,
            }
            for e in events
        ],
    )
    notify_commit(session, LOG, events[-1].position, [operator_id])
    return events


@dataclass(frozen=True)
class AddressChange:
    """What an address's update did: the address after it, whether it changed, and the UPDATED
    events of the assigned numbers whose emergency location it changed."""

    address: CivicAddress
    changed: bool
    events: list[Event]


def update_address(
    session: Session,
    operator_id: str,
    address_id: str,
    change: CivicAddress,
    mask: frozenset[str],
) -> AddressChange:
    """UpdateCivicAddress: the fields `mask` names taken from `change` into the stored address
    (its row locked), the result checked (addresses.check_address) and stored. `locations`
    replace the stored ones: an id keeps one, none is new, one left out is removed (refused
    while a number refers to it)."""
    row = _row(session, operator_id, address_id, lock=True)
    if row is None:
        raise _not_found()
    current = _address(row, _locations_of(session, [row.id])[row.id])
    new = check_address(merged(current, change, mask), keep_location_ids=True)
    stored_ids = {x.id for x in current.locations}
    violations = [
        Violation(f"civic_address.locations[{i}].location_id", "not a location of the address")
        for i, x in enumerate(new.locations)
        if x.id and x.id not in stored_ids
    ]
    if violations:
        raise not_found(
            DOMAIN, "LOCATION_NOT_FOUND", violations[0].field + ": " + violations[0].description
        )
    locations = tuple(
        x if x.id else dataclasses.replace(x, id=str(uuid.uuid4())) for x in new.locations
    )
    new = dataclasses.replace(new, locations=locations)
    if same_fields(current, new):
        return AddressChange(current, False, [])
    referring = _referring(session, operator_id, address_id)
    kept = {x.id for x in locations}
    if any(location and location not in kept for _, location, _ in referring):
        raise failed_precondition(
            DOMAIN,
            "LOCATION_IN_USE",
            "a number refers to a location the change removes; give it another location first",
        )
    stamp = storage.now()
    point = new.geo_point
    for name in TEXT_COLUMNS:
        setattr(row, name, getattr(new, name))
    row.latitude = point.latitude if point else None
    row.longitude = point.longitude if point else None
    row.updated_at = stamp
    if new.locations != current.locations:
        session.execute(
            delete(CivicAddressLocationRow).where(
                CivicAddressLocationRow.civic_address_id == address_id
            )
        )
        session.flush()
        _insert_locations(session, address_id, locations)
    session.flush()
    after = dataclasses.replace(new, updated_at=stamp, created_at=current.created_at)
    events = _refresh_numbers(
        session, operator_id, before=current, after=after, referring=referring, stamp=stamp
    )
    return AddressChange(after, True, events)


def _refresh_numbers(
    session: Session,
    operator_id: str,
    *,
    before: CivicAddress,
    after: CivicAddress,
    referring: Sequence[tuple[str, str, str]],
    stamp: Any,
) -> list[Event]:
    """Rewrite the emergency location of the numbers that refer to the address, where the
    edit changed it; log an UPDATED event for each such assigned number."""
    moved_fields = not same_fields(
        dataclasses.replace(before, locations=()), dataclasses.replace(after, locations=())
    )
    N = storage.NumberRow
    groups = sorted({location for _, location, _ in referring})
    changed_groups = [g for g in groups if moved_fields or before.location(g) != after.location(g)]
    for group in changed_groups:
        session.execute(
            update(N)
            .where(
                N.operator_id == operator_id,
                N.civic_address_id == after.id,
                N.location_id == group,
            )
            .values(emergency_location=to_json(emergency_location(after, group)), updated_at=stamp)
        )
    chosen = set(changed_groups)
    assigned = [
        number
        for number, location, state in referring
        if location in chosen and state == State.ASSIGNED.value
    ]
    if changed_groups and not assigned:
        notify_commit(session, LOG, 0, [operator_id])  # caches on every replica forget
    numbers: list[Number] = []
    for chunk in storage.chunks(assigned):
        rows = session.scalars(select(N).where(N.phone_number.in_(chunk)).order_by(N.phone_number))
        numbers.extend(storage.to_number(r) for r in rows)
    return _log_updates(session, operator_id, numbers, stamp)


def delete_address(session: Session, operator_id: str, address_id: str) -> None:
    row = _row(session, operator_id, address_id, lock=True)
    if row is None:
        raise _not_found()
    if _referring(session, operator_id, address_id):
        raise failed_precondition(
            DOMAIN,
            "CIVIC_ADDRESS_IN_USE",
            "numbers refer to the civic address; give them another address first",
        )
    session.execute(
        delete(CivicAddressLocationRow).where(
            CivicAddressLocationRow.civic_address_id == address_id
        )
    )
    session.execute(delete(CivicAddressRow).where(CivicAddressRow.id == address_id))


# --- numbers and their addresses --------------------------------------------------------------


def upload_numbers(
    session: Session, operator_id: str, tenant_id: str, uploads: Sequence[Upload]
) -> dict[str, Result]:
    """consent_storage.upload_numbers, with each number's address and location checked (one of
    the operator's addresses of the tenant; CIVIC_ADDRESS_NOT_FOUND, LOCATION_NOT_FOUND) and its
    emergency location kept with it."""
    if not uploads:
        return {}
    ids = sorted({u.civic_address_id for u in uploads if u.civic_address_id})
    found: dict[str, CivicAddress] = {}
    for chunk in storage.chunks(ids):
        query = select(CivicAddressRow).where(
            CivicAddressRow.id.in_(chunk),
            CivicAddressRow.operator_id == operator_id,
            CivicAddressRow.tenant_id == tenant_id,
        )
        rows = list(session.scalars(_shared(session, query)))
        locations = _locations_of(session, [r.id for r in rows])
        found.update((r.id, _address(r, locations[r.id])) for r in rows)
    results: dict[str, Result] = {}
    valid: list[Upload] = []
    snapshots: dict[str, str] = {}
    for upload in uploads:
        number = upload.phone_number
        if not upload.civic_address_id:
            valid.append(upload)
            continue
        address = found.get(upload.civic_address_id)
        if address is None:
            results[number] = refused(
                number,
                "CIVIC_ADDRESS_NOT_FOUND",
                "no such civic address of the operator for this tenant",
            )
        elif upload.location_id and address.location(upload.location_id) is None:
            results[number] = refused(
                number, "LOCATION_NOT_FOUND", "no such location in the civic address"
            )
        else:
            valid.append(upload)
            snapshots[number] = to_json(emergency_location(address, upload.location_id))
    stored = consent_storage.upload_numbers(session, operator_id, tenant_id, valid, snapshots)
    return {**results, **stored}


@dataclass(frozen=True)
class NumberFields:
    """The fields of a number UpdateNumber may change."""

    calling_profile_id: str
    civic_address_id: str
    location_id: str
    allow_tenant_address_update: bool
    ticket_id: str


def _fields_of(number: Number) -> NumberFields:
    return NumberFields(
        number.calling_profile_id,
        number.civic_address_id,
        number.location_id,
        number.allow_tenant_address_update,
        number.ticket_id,
    )


_FIELD_ERRORS = {
    "CALLING_PROFILE_ID_INVALID": "calling_profile_id",
    "TICKET_ID_INVALID": "ticket_id",
}


def _check_fields(number: Number, fields: NumberFields) -> None:
    problem = check_number_fields(number.phone_number, number.usage, **dataclasses.asdict(fields))
    if problem is None:
        return
    reason, description = problem
    if reason in _FIELD_ERRORS:
        path = f"number.{_FIELD_ERRORS[reason]}"
        raise invalid(DOMAIN, "NUMBER_INVALID", description, Violation(path, description, reason))
    if reason == "CIVIC_ADDRESS_REQUIRED":
        raise failed_precondition(DOMAIN, reason, description)
    raise not_found(DOMAIN, reason, description)


def _set_fields(session: Session, number: Number, fields: NumberFields) -> storage.Change:
    """Store the number with `fields`, its emergency location as its address is now; an
    assigned number whose emergency location changed gets an UPDATED event."""
    if _fields_of(number) == fields:
        return storage.Change(number, None)
    address = None
    if fields.civic_address_id:
        # Locked: an edit of the address commits before or after, never beside, this change
        # (else the number could keep the address as it was before the edit).
        row = _row(session, number.operator_id, fields.civic_address_id, lock=True)
        if row is None:
            raise _not_found()
        address = _address(row, _locations_of(session, [row.id])[row.id])
        if address.tenant_id != number.tenant_id:
            raise failed_precondition(
                DOMAIN, "TENANT_MISMATCH", "the civic address is of another tenant"
            )
        if fields.location_id and address.location(fields.location_id) is None:
            raise not_found(DOMAIN, "LOCATION_NOT_FOUND", "no such location in the civic address")
    snapshot = to_json(emergency_location(address, fields.location_id))
    stamp = storage.now()
    N = storage.NumberRow
    session.execute(
        update(N)
        .where(N.phone_number == number.phone_number)
        .values(**dataclasses.asdict(fields), emergency_location=snapshot, updated_at=stamp)
    )
    changed = dataclasses.replace(
        number, **dataclasses.asdict(fields), snapshot=snapshot, updated_at=stamp
    )
    if number.state is State.ASSIGNED and snapshot != number.snapshot:
        (event,) = _log_updates(session, number.operator_id, [changed], stamp)
        return storage.Change(changed, event)
    notify_commit(session, LOG, 0, [number.operator_id])  # caches on every replica forget
    return storage.Change(changed, None)


def update_number(
    session: Session,
    operator_id: str,
    phone_number: str,
    values: NumberFields,
    mask: frozenset[str],
) -> storage.Change:
    """UpdateNumber: the fields `mask` names from `values`. A new address without a location in
    the mask drops the number's location (it was one of the old address's)."""
    number = storage.locked_number(unit_of(session), phone_number)
    if number.operator_id != operator_id:
        raise not_found(DOMAIN, "NUMBER_NOT_FOUND", "the operator holds no such number")
    current = _fields_of(number)
    fields = dataclasses.replace(current, **{name: getattr(values, name) for name in mask})
    if "location_id" not in mask and fields.civic_address_id != current.civic_address_id:
        fields = dataclasses.replace(fields, location_id="")
    _check_fields(number, fields)
    return _set_fields(session, number, fields)


def set_emergency_address(
    session: Session, phone_number: str, tenant_id: str, address_id: str, location_id: str
) -> storage.Change:
    """UpdateNumberEmergencyAddress: the customer's choice, where the operator allowed it."""
    number = storage.locked_number(unit_of(session), phone_number)
    if number.tenant_id != tenant_id:
        raise failed_precondition(
            DOMAIN, "TENANT_MISMATCH", "the number was uploaded for another tenant"
        )
    if not number.allow_tenant_address_update:
        raise failed_precondition(
            DOMAIN,
            "ADDRESS_UPDATE_NOT_ALLOWED",
            "the operator does not let the customer set this number's emergency address",
        )
    fields = dataclasses.replace(
        _fields_of(number), civic_address_id=address_id, location_id=location_id
    )
    return _set_fields(session, number, fields)
