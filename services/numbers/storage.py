"""The numbers tables and the units of work on them.

Each public function takes a `Session` inside a transaction (run it with `Database.run`) and
speaks in domain types (rules.py). Assignment changes append to the `numbers` change log in the
same transaction; the caller wakes watchers after commit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CursorResult,
    DateTime,
    Index,
    String,
    Table,
    Text,
    delete,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.changelog import (
    ALLOCATE_ONE_CTE,
    NOTIFY_CHANNEL,
    allocate,
    locked,
    mark_purged,
    notify_commit,
    notify_parts,
    read_head,
)
from plumbing.db import Base, Unit, dialect_insert, driver_fetch, stored_time, unit_of, utc
from plumbing.errors import ApiError, failed_precondition, not_found
from services.numbers.rules import (
    DOMAIN,
    LOG,
    Assignment,
    Event,
    EventType,
    Number,
    Outcome,
    Result,
    State,
    Target,
    TargetKind,
    Upload,
    Usage,
    check_can_assign,
    refused,
)

CHUNK = 500  # numbers per IN (...) list: inside SQLite's variable limit


class NumberRow(Base):
    """An uploaded number; held by exactly one operator (the number is the key)."""

    __tablename__ = "numbers"

    phone_number: Mapped[str] = mapped_column(String(16), primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    usage: Mapped[str] = mapped_column(String(16))
    inbound: Mapped[bool] = mapped_column(Boolean)
    outbound: Mapped[bool] = mapped_column(Boolean)
    state: Mapped[str] = mapped_column(String(16))
    sip_uri: Mapped[str] = mapped_column(String(512), default="")
    target_kind: Mapped[str] = mapped_column(String(32), default="")
    target_id: Mapped[str] = mapped_column(String(36), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    calling_profile_id: Mapped[str] = mapped_column(String(36), default="")
    civic_address_id: Mapped[str] = mapped_column(String(36), default="")
    location_id: Mapped[str] = mapped_column(String(36), default="")
    allow_tenant_address_update: Mapped[bool] = mapped_column(Boolean, default=False)
    iso_country_code: Mapped[str] = mapped_column(String(2), default="")
    ticket_id: Mapped[str] = mapped_column(String(256), default="")
    # The emergency location as it is now (addresses.to_json), kept with the number so that an
    # assignment (the hot path) copies it into its event without reading the address; every
    # change of the number's address or of the address itself rewrites it.
    emergency_location: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        Index("ix_numbers_operator_number", "operator_id", "phone_number"),
        Index("ix_numbers_operator_tenant_number", "operator_id", "tenant_id", "phone_number"),
        Index("ix_numbers_operator_address", "operator_id", "civic_address_id"),
    )


class NumberEventRow(Base):
    """The `numbers` change log: one row per assignment change, keyed by its position."""

    __tablename__ = "number_events"

    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    phone_number: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(16))
    sip_uri: Mapped[str] = mapped_column(String(512), default="")
    target_kind: Mapped[str] = mapped_column(String(32), default="")
    target_id: Mapped[str] = mapped_column(String(36), default="")
    # The number's emergency location when the change was committed (addresses.to_json; "" for
    # none): a resumed watch shows what was true then.
    emergency_location: Mapped[str] = mapped_column(Text, default="")
    # The partition key on PostgreSQL (plumbing/partitions.py), so part of the primary key.
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)

    __table_args__ = (
        Index("ix_number_events_operator_position", "operator_id", "position"),
        Index("ix_number_events_occurred_at", "occurred_at"),
        {"postgresql_partition_by": "RANGE (occurred_at)"},
    )


EVENTS = cast(Table, NumberEventRow.__table__)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _target(kind: str, target_id: str) -> Target | None:
    return Target(TargetKind(kind), target_id) if kind else None


def to_number(row: NumberRow) -> Number:
    return Number(
        phone_number=row.phone_number,
        operator_id=row.operator_id,
        tenant_id=row.tenant_id,
        usage=Usage(row.usage),
        inbound=row.inbound,
        outbound=row.outbound,
        state=State(row.state),
        sip_uri=row.sip_uri,
        target=_target(row.target_kind, row.target_id),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        calling_profile_id=row.calling_profile_id,
        civic_address_id=row.civic_address_id,
        location_id=row.location_id,
        allow_tenant_address_update=row.allow_tenant_address_update,
        iso_country_code=row.iso_country_code,
        ticket_id=row.ticket_id,
        snapshot=row.emergency_location,
    )


def chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _rows_by_number(session: Session, numbers: Sequence[str]) -> dict[str, NumberRow]:
    found: dict[str, NumberRow] = {}
    for chunk in chunks(numbers):
        rows = session.scalars(select(NumberRow).where(NumberRow.phone_number.in_(chunk)))
        found.update((row.phone_number, row) for row in rows)
    return found


def _upload_fields(upload: Upload) -> tuple[object, ...]:
    return (
        (upload.usage or Usage.USER).value,
        upload.inbound,
        upload.outbound,
        upload.calling_profile_id,
        upload.civic_address_id,
        upload.location_id,
        upload.allow_tenant_address_update,
        upload.iso_country_code,
        upload.ticket_id,
    )


def upload_numbers(
    session: Session,
    operator_id: str,
    tenant_id: str,
    uploads: Sequence[Upload],
    snapshots: Mapping[str, str] | None = None,
) -> dict[str, Result]:
    """Store the numbers not held yet; classify the rest. Safe against concurrent uploads.
    `snapshots`: each number's emergency location (addresses.to_json), by number."""
    snapshots = snapshots or {}
    stamp = now()
    values = [
        {
            "phone_number": u.phone_number,
            "operator_id": operator_id,
            "tenant_id": tenant_id,
            "usage": (u.usage or Usage.USER).value,
            "inbound": u.inbound,
            "outbound": u.outbound,
            "state": State.UNASSIGNED.value,
            "sip_uri": "",
            "target_kind": "",
            "target_id": "",
            "created_at": stamp,
            "updated_at": stamp,
            "calling_profile_id": u.calling_profile_id,
            "civic_address_id": u.civic_address_id,
            "location_id": u.location_id,
            "allow_tenant_address_update": u.allow_tenant_address_update,
            "iso_country_code": u.iso_country_code,
            "ticket_id": u.ticket_id,
            "emergency_location": snapshots.get(u.phone_number, ""),
        }
        for u in uploads
    ]
    # One statement executed with many parameter sets (SQLAlchemy's "insertmanyvalues": compiled
    # once, then batched), not a statement built with .values(rows): compiling that cost 5 s for
    # 10,000 numbers, time a write holds SQLite's one writer while other operators wait.
    statement = (
        dialect_insert(session)(NumberRow)
        .on_conflict_do_nothing(index_elements=["phone_number"])
        .returning(NumberRow.phone_number)
    )
    connection = session.connection()
    added: set[str] = set()
    for start in range(0, len(values), CHUNK):
        added.update(connection.execute(statement, values[start : start + CHUNK]).scalars())
    results = {n: Result(n, Outcome.DONE) for n in added}
    held = _rows_by_number(
        session, [u.phone_number for u in uploads if u.phone_number not in added]
    )
    for upload in uploads:
        if upload.phone_number in added:
            continue
        row = held[upload.phone_number]
        if row.operator_id != operator_id:
            results[row.phone_number] = refused(
                row.phone_number,
                "HELD_BY_ANOTHER_OPERATOR",
                "the number is held by another operator",
            )
        elif (
            row.tenant_id,
            row.usage,
            row.inbound,
            row.outbound,
            row.calling_profile_id,
            row.civic_address_id,
            row.location_id,
            row.allow_tenant_address_update,
            row.iso_country_code,
            row.ticket_id,
        ) == (tenant_id, *_upload_fields(upload)):
            results[row.phone_number] = Result(row.phone_number, Outcome.ALREADY_PRESENT)
        else:
            results[row.phone_number] = refused(
                row.phone_number,
                "DATA_CONFLICT",
                "the number is already uploaded with other data; UpdateNumber changes its"
                " address, profile and ticket, release it and upload it again for the rest",
            )
    if added:  # the numbers changed: caches on every replica forget them
        notify_commit(session, LOG, 0, [operator_id])
    return results


def release_numbers(
    session: Session, operator_id: str, numbers: Sequence[str]
) -> dict[str, Result]:
    """Delete the operator's unassigned numbers among `numbers`; classify the rest."""
    released: set[str] = set()
    for chunk in chunks(numbers):
        statement = (
            delete(NumberRow)
            .where(
                NumberRow.phone_number.in_(chunk),
                NumberRow.operator_id == operator_id,
                NumberRow.state == State.UNASSIGNED.value,
            )
            .returning(NumberRow.phone_number)
        )
        released.update(session.scalars(statement))
    results = {n: Result(n, Outcome.DONE) for n in released}
    left = _rows_by_number(session, [n for n in numbers if n not in released])
    for number in numbers:
        if number in released:
            continue
        row = left.get(number)
        if row is None or row.operator_id != operator_id:
            results[number] = refused(
                number, "NUMBER_NOT_FOUND", "the operator holds no such number"
            )
        else:
            results[number] = refused(
                number, "NUMBER_ASSIGNED", "the number is assigned; it must be unassigned first"
            )
    if released:  # the numbers changed: caches on every replica forget them
        notify_commit(session, LOG, 0, [operator_id])
    return results


def find_number(session: Session, operator_id: str, phone_number: str) -> Number | None:
    """The operator's number, or None (also when another operator holds it)."""
    row = session.get(NumberRow, phone_number)
    return to_number(row) if row is not None and row.operator_id == operator_id else None


@dataclass(frozen=True)
class Page:
    numbers: list[Number]
    last: str  # the last number of this page, "" if the listing is done
    watch_position: int


def list_numbers(
    session: Session,
    operator_id: str,
    *,
    tenant_id: str | None,
    state: State | None,
    after: str,
    limit: int,
    watch_position: int | None,
) -> Page:
    """One page in number order after `after`; on the first page, the log head (read in the same
    snapshot) is where a watcher resumes to miss nothing."""
    if watch_position is None:
        watch_position = read_head(session, LOG).position
    query = select(NumberRow).where(NumberRow.operator_id == operator_id)
    if tenant_id is not None:
        query = query.where(NumberRow.tenant_id == tenant_id)
    if state is not None:
        query = query.where(NumberRow.state == state.value)
    if after:
        query = query.where(NumberRow.phone_number > after)
    rows = list(session.scalars(query.order_by(NumberRow.phone_number).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([to_number(r) for r in rows], rows[-1].phone_number if more else "", watch_position)


@dataclass(frozen=True)
class Change:
    """What an assignment did: the number after it, and the event it logged (None: no change)."""

    number: Number
    event: Event | None


# An assignment change is every AssignNumber's and UnassignNumber's whole unit of work: plain
# SQL on the driver, where SQLAlchemy's ORM (identity map, flush, statement handling) cost twice
# the statements themselves, in a `Unit` without a Session (`Database.run_unit`: the Session's
# set-up and commit cost as much again); a Session's transaction may run them too.
_NUMBER = (
    "SELECT operator_id, tenant_id, usage, inbound, outbound, state, sip_uri, target_kind,"
    " target_id, created_at, updated_at, calling_profile_id, civic_address_id, location_id,"
    " allow_tenant_address_update, iso_country_code, ticket_id, emergency_location"
    " FROM numbers WHERE phone_number = ?"
)
_SET_ASSIGNMENT = (
    "UPDATE numbers SET state = ?, sip_uri = ?, target_kind = ?, target_id = ?, updated_at = ?"
    " WHERE phone_number = ?"
)
_INSERT_EVENT = (
    "INSERT INTO number_events (position, operator_id, tenant_id, phone_number, type, sip_uri,"
    " target_kind, target_id, emergency_location, occurred_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# PostgreSQL: the whole change in one statement, one round trip instead of four: the number's
# row, a position in the log (plumbing.changelog.ALLOCATE_ONE_CTE), the event at it, and the
# notify to every replica (its payload around the position: plumbing.changelog.notify_parts).
_CHANGE_POSTGRES = (
    f"WITH number AS ({_SET_ASSIGNMENT}), {ALLOCATE_ONE_CTE},"  # noqa: S608 (constants)
    " event AS (INSERT INTO number_events (position, operator_id, tenant_id, phone_number, type,"
    " sip_uri, target_kind, target_id, emergency_location, occurred_at)"
    " SELECT position, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM head RETURNING position)"
    " SELECT position, pg_notify(?, CAST(? AS text) || position || CAST(? AS text)) FROM event"
)
_EVENTS = (
    "SELECT position, type, phone_number, tenant_id, sip_uri, target_kind, target_id,"
    " occurred_at, emergency_location FROM number_events"
    " WHERE operator_id = ? AND position > ? AND position <= ?"
)
_ORDERED = " ORDER BY position LIMIT ?"
_OF_TENANT = " AND tenant_id = ?"
_LOG_EVENTS = (
    "SELECT position, type, phone_number, tenant_id, sip_uri, target_kind, target_id,"
    " occurred_at, emergency_location, operator_id FROM number_events"
    " WHERE position > ? AND position <= ? ORDER BY position LIMIT ?"
)
# The statements written by hand (tests/test_sql.py checks them; POSTGRES_SQL on PostgreSQL only).
SQL = (
    _NUMBER,
    _SET_ASSIGNMENT,
    _INSERT_EVENT,
    _EVENTS + _ORDERED,
    _EVENTS + _OF_TENANT + _ORDERED,
    _LOG_EVENTS,
)
POSTGRES_SQL = (_CHANGE_POSTGRES,)


def locked_number(unit: Unit, phone_number: str) -> Number:
    """The number, its row locked until commit (PostgreSQL: FOR UPDATE; SQLite: the write
    transaction holds the database's one write lock from its start)."""
    rows = unit.fetch(_NUMBER + (" FOR UPDATE" if unit.postgres else ""), (phone_number,))
    if not rows:
        raise not_found(DOMAIN, "NUMBER_NOT_FOUND", "no such number has been uploaded")
    (operator, tenant, usage, inbound, outbound, state, sip, kind, target, created, updated) = rows[
        0
    ][:11]
    (profile, address, location, allow, country, ticket, snapshot) = rows[0][11:]
    return Number(
        phone_number=phone_number,
        operator_id=operator,
        tenant_id=tenant,
        usage=Usage(usage),
        inbound=bool(inbound),
        outbound=bool(outbound),
        state=State(state),
        sip_uri=sip,
        target=_target(kind, target),
        created_at=stored_time(created),
        updated_at=stored_time(updated),
        calling_profile_id=profile,
        civic_address_id=address,
        location_id=location,
        allow_tenant_address_update=bool(allow),
        iso_country_code=country,
        ticket_id=ticket,
        snapshot=snapshot,
    )


def _change(unit: Unit, number: Number, kind: EventType, stamp: dt.datetime) -> Change:
    """Store the number as `number` says and log the change at the next position of the log."""
    target = number.target
    target_kind, target_id = (target.kind.value, target.id) if target is not None else ("", "")
    fields = (number.state.value, number.sip_uri, target_kind, target_id)
    when = unit.time(stamp)
    event_row = (number.operator_id, number.tenant_id, number.phone_number, kind.value)
    # ASSIGNED and UPDATED carry the emergency location; UNASSIGNED does not.
    snapshot = number.snapshot if kind is not EventType.UNASSIGNED else ""
    event_values = (
        *event_row,
        number.sip_uri,
        target_kind,
        target_id,
        snapshot,
        when,
    )
    if unit.postgres:
        before, after = notify_parts(LOG, [number.operator_id])
        ((position, _),) = unit.fetch(
            _CHANGE_POSTGRES,
            (*fields, when, number.phone_number, LOG, *event_values, NOTIFY_CHANNEL, before, after),
        )
        locked(unit, LOG)
    else:
        unit.fetch(_SET_ASSIGNMENT, (*fields, when, number.phone_number))
        position = allocate(unit, LOG)
        unit.fetch(_INSERT_EVENT, (position, *event_values))
    event = Event(
        int(position),
        kind,
        number.phone_number,
        number.tenant_id,
        number.sip_uri,
        target,
        stamp,
        snapshot,
    )
    return Change(number, event)


def assign_number(session: Session | Unit, assignment: Assignment) -> Change:
    unit = unit_of(session)
    number = locked_number(unit, assignment.phone_number)
    problem: ApiError | None = check_can_assign(number, assignment)
    if problem is not None:
        raise problem
    if number.state is State.ASSIGNED and (number.sip_uri, number.target) == (
        assignment.sip_uri,
        assignment.target,
    ):
        return Change(number, None)
    kind = EventType.UPDATED if number.state is State.ASSIGNED else EventType.ASSIGNED
    stamp = now()
    changed = dataclasses.replace(
        number,
        state=State.ASSIGNED,
        sip_uri=assignment.sip_uri,
        target=assignment.target,
        updated_at=stamp,
    )
    return _change(unit, changed, kind, stamp)


def unassign_number(session: Session | Unit, phone_number: str, tenant_id: str) -> Change:
    unit = unit_of(session)
    number = locked_number(unit, phone_number)
    if number.tenant_id != tenant_id:
        raise failed_precondition(
            DOMAIN, "TENANT_MISMATCH", "the number was uploaded for another tenant"
        )
    if number.state is State.UNASSIGNED:
        return Change(number, None)
    stamp = now()
    changed = dataclasses.replace(
        number, state=State.UNASSIGNED, sip_uri="", target=None, updated_at=stamp
    )
    return _change(unit, changed, EventType.UNASSIGNED, stamp)


def read_events(
    session: Session,
    after: int,
    upto: int,
    limit: int,
    *,
    operator_id: str,
    tenant_id: str | None,
) -> list[Event]:
    """The operator's events with after < position <= upto, in position order (on the driver:
    every watcher's read)."""
    if tenant_id is None:
        rows = driver_fetch(session, _EVENTS + _ORDERED, (operator_id, after, upto, limit))
    else:
        sql = _EVENTS + _OF_TENANT + _ORDERED
        rows = driver_fetch(session, sql, (operator_id, after, upto, tenant_id, limit))
    return [
        Event(
            int(position),
            EventType(kind),
            number,
            tenant,
            sip,
            _target(target_kind, target_id),
            stored_time(occurred),
            snapshot,
        )
        for position, kind, number, tenant, sip, target_kind, target_id, occurred, snapshot in rows
    ]


def read_log_events(session: Session, after: int, upto: int, limit: int) -> list[Event]:
    """Every operator's events with after < position <= upto, in position order, each with its
    operator: the read of the shared tail of live watchers (plumbing.changelog.Tail)."""
    return [
        Event(
            int(row[0]),
            EventType(row[1]),
            row[2],
            row[3],
            row[4],
            _target(row[5], row[6]),
            stored_time(row[7]),
            row[8],
            row[9],
        )
        for row in driver_fetch(session, _LOG_EVENTS, (after, upto, limit))
    ]


def purge_events(session: Session, older_than: dt.datetime) -> int:
    """Delete events older than the retention; cursors before them then expire."""
    through = session.scalar(
        select(NumberEventRow.position)
        .where(NumberEventRow.occurred_at < older_than)
        .order_by(NumberEventRow.position.desc())
        .limit(1)
    )
    if through is None:
        return 0
    deleted = cast(
        CursorResult[Any],
        session.execute(delete(NumberEventRow).where(NumberEventRow.position <= through)),
    )
    mark_purged(session, LOG, int(through))
    return deleted.rowcount
