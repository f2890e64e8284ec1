"""The consent tables and the units of work on them (the state machine is consents.py's).

Each public function takes a `Session` inside a transaction (run it with `Database.run`). A
consent's change appends to the `consents` change log in the same transaction, as an assignment
appends to `numbers`, so WatchConsents resumes with no gap (plumbing/changelog.py); the caller
wakes watchers after commit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, CursorResult, DateTime, Index, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.changelog import allocate, mark_purged, notify_commit, read_head
from plumbing.db import Base, dialect_insert, utc
from plumbing.errors import not_found
from services.numbers import storage
from services.numbers.consents import (
    LOG,
    Consent,
    ConsentEvent,
    ConsentState,
    Move,
    Reason,
    check_move,
    ends_numbers,
    numbers_assigned,
)
from services.numbers.rules import DOMAIN, Result, State, Upload, refused


class ConsentRow(Base):
    """One consent per operator and tenant, in its current state."""

    __tablename__ = "consents"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class ConsentEventRow(Base):
    """The `consents` change log: one row per consent change, keyed by its position. Few rows
    (a change per customer decision): not partitioned, purged by rows past retention."""

    __tablename__ = "consent_events"

    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    state: Mapped[str] = mapped_column(String(16))
    previous_state: Mapped[str] = mapped_column(String(16), default="")
    reason: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_consent_events_operator_position", "operator_id", "position"),
        Index("ix_consent_events_occurred_at", "occurred_at"),
    )


def to_consent(row: ConsentRow) -> Consent:
    return Consent(
        operator_id=row.operator_id,
        tenant_id=row.tenant_id,
        state=ConsentState(row.state),
        reason=Reason(row.reason),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


def find_consent(session: Session, operator_id: str, tenant_id: str) -> Consent | None:
    row = session.get(ConsentRow, (operator_id, tenant_id))
    return to_consent(row) if row is not None else None


@dataclass(frozen=True)
class Page:
    consents: list[Consent]
    last: str  # the last tenant of this page, "" if the listing is done
    watch_position: int


def list_consents(
    session: Session,
    operator_id: str,
    *,
    state: ConsentState | None,
    after: str,
    limit: int,
    watch_position: int | None,
) -> Page:
    """One page in tenant order after `after`; on the first page, the log head (read in the same
    snapshot) is where a watcher resumes to miss nothing."""
    if watch_position is None:
        watch_position = read_head(session, LOG).position
    query = select(ConsentRow).where(ConsentRow.operator_id == operator_id)
    if state is not None:
        query = query.where(ConsentRow.state == state.value)
    if after:
        query = query.where(ConsentRow.tenant_id > after)
    rows = list(session.scalars(query.order_by(ConsentRow.tenant_id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([to_consent(r) for r in rows], rows[-1].tenant_id if more else "", watch_position)


@dataclass(frozen=True)
class Change:
    """What a move did: the consent after it, and the event it logged (None: no change)."""

    consent: Consent
    event: ConsentEvent | None


def _locked(session: Session, operator_id: str, tenant_id: str) -> ConsentRow | None:
    """The consent's row, locked until commit (PostgreSQL: FOR UPDATE; SQLite: the write
    transaction holds the database's one write lock from its start)."""
    query = select(ConsentRow).where(
        ConsentRow.operator_id == operator_id, ConsentRow.tenant_id == tenant_id
    )
    return session.scalars(query.with_for_update()).one_or_none()


def _any_assigned(session: Session, operator_id: str, tenant_id: str) -> bool:
    NumberRow = storage.NumberRow
    query = (
        select(NumberRow.phone_number)
        .where(
            NumberRow.operator_id == operator_id,
            NumberRow.tenant_id == tenant_id,
            NumberRow.state == State.ASSIGNED.value,
        )
        .limit(1)
    )
    return session.scalar(query) is not None


def _insert_requested(session: Session, consent: Consent) -> bool:
    """Insert a new consent; False if another transaction inserted it first (on PostgreSQL
    the insert waits for that one to commit, then does nothing)."""
    statement = (
        dialect_insert(session)(ConsentRow)
        .values(
            operator_id=consent.operator_id,
            tenant_id=consent.tenant_id,
            state=consent.state.value,
            reason=consent.reason.value,
            created_at=consent.created_at,
            updated_at=consent.updated_at,
        )
        .on_conflict_do_nothing(index_elements=["operator_id", "tenant_id"])
        .returning(ConsentRow.operator_id)
    )
    return session.execute(statement).first() is not None


def _logged(
    session: Session, consent: Consent, previous: ConsentState | None, stamp: dt.datetime
) -> Change:
    """Log the consent's change at the next position of the `consents` log."""
    position = allocate(session, LOG)
    session.add(
        ConsentEventRow(
            position=position,
            operator_id=consent.operator_id,
            tenant_id=consent.tenant_id,
            state=consent.state.value,
            previous_state=previous.value if previous is not None else "",
            reason=consent.reason.value,
            created_at=consent.created_at,
            occurred_at=stamp,
        )
    )
    session.flush()
    notify_commit(session, LOG, position, [consent.operator_id])
    return Change(consent, ConsentEvent(position, consent, previous, stamp))


def move_consent(
    session: Session, operator_id: str, tenant_id: str, move: Move, *, create: bool = False
) -> Change:
    """Move the consent as `move` asks (consents.check_move says whether it may), logging the
    change; `create`: a consent that does not exist is created (the customer's request),
    otherwise it answers NOT_FOUND."""
    stamp = storage.now()
    row = _locked(session, operator_id, tenant_id)
    if row is None:
        if not create:
            raise not_found(DOMAIN, "CONSENT_NOT_FOUND", "no consent with this tenant")
        check_move(None, move)  # raises unless the move creates it
        made = Consent(operator_id, tenant_id, move.state, move.reason, stamp, stamp)
        if _insert_requested(session, made):
            return _logged(session, made, None, stamp)
        row = _locked(session, operator_id, tenant_id)  # created meanwhile: move it as it is
        assert row is not None
    current = to_consent(row)
    if not check_move(current, move):
        return Change(current, None)
    ending = ends_numbers(current, move)
    if ending and _any_assigned(session, operator_id, tenant_id):
        raise numbers_assigned()
    row.state, row.reason, row.updated_at = move.state.value, move.reason.value, stamp
    moved = dataclasses.replace(current, state=move.state, reason=move.reason, updated_at=stamp)
    return _logged(session, moved, current.state, stamp)


def consent_active(session: Session, operator_id: str, tenant_id: str) -> bool:
    """Whether the consent is ACTIVE; on PostgreSQL its row is then share-locked until commit, so
    a consent cannot end while an upload under it commits."""
    query = select(ConsentRow.state).where(
        ConsentRow.operator_id == operator_id, ConsentRow.tenant_id == tenant_id
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    return session.scalar(query) == ConsentState.ACTIVE.value


def upload_numbers(
    session: Session,
    operator_id: str,
    tenant_id: str,
    uploads: Sequence[Upload],
    snapshots: Mapping[str, str] | None = None,
) -> dict[str, Result]:
    """storage.upload_numbers under an ACTIVE consent; without one, every number is refused
    (CONSENT_NOT_ACTIVE) and nothing is stored."""
    if not uploads:
        return {}
    if not consent_active(session, operator_id, tenant_id):
        return {
            u.phone_number: refused(
                u.phone_number,
                "CONSENT_NOT_ACTIVE",
                "the operator has no active consent with this tenant",
            )
            for u in uploads
        }
    return storage.upload_numbers(session, operator_id, tenant_id, uploads, snapshots)


def read_events(
    session: Session, after: int, upto: int, limit: int, *, operator_id: str
) -> list[ConsentEvent]:
    """The operator's consent events with after < position <= upto, in position order."""
    E = ConsentEventRow
    return _events(
        session.scalars(
            select(E)
            .where(E.operator_id == operator_id, E.position > after, E.position <= upto)
            .order_by(E.position)
            .limit(limit)
        )
    )


def read_log_events(session: Session, after: int, upto: int, limit: int) -> list[ConsentEvent]:
    """Every operator's consent events with after < position <= upto, in position order: the
    read of the shared tail of live watchers (plumbing.changelog.Tail)."""
    E = ConsentEventRow
    return _events(
        session.scalars(
            select(E)
            .where(E.position > after, E.position <= upto)
            .order_by(E.position)
            .limit(limit)
        )
    )


def _events(rows: Iterable[ConsentEventRow]) -> list[ConsentEvent]:
    return [
        ConsentEvent(
            int(row.position),
            Consent(
                operator_id=row.operator_id,
                tenant_id=row.tenant_id,
                state=ConsentState(row.state),
                reason=Reason(row.reason),
                created_at=utc(row.created_at),
                updated_at=utc(row.occurred_at),
            ),
            ConsentState(row.previous_state) if row.previous_state else None,
            utc(row.occurred_at),
        )
        for row in rows
    ]


def purge_events(session: Session, older_than: dt.datetime) -> int:
    """Delete consent events older than the retention; cursors before them then expire."""
    through = session.scalar(
        select(ConsentEventRow.position)
        .where(ConsentEventRow.occurred_at < older_than)
        .order_by(ConsentEventRow.position.desc())
        .limit(1)
    )
    if through is None:
        return 0
    deleted = cast(
        CursorResult[Any],
        session.execute(delete(ConsentEventRow).where(ConsentEventRow.position <= through)),
    )
    mark_purged(session, LOG, int(through))
    return deleted.rowcount
