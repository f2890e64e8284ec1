"""The usage service's tables (declared on `plumbing.db.Base`, created by the migrations), and
what the units of work on them share: the size of an IN (...) list and the operator's lock.

`call_durations` holds each operator's records, keyed by (operator, record_id), at most one per
(operator, call_id); `usage_platform_calls` the platform's side of every call, from the records
feed, and `usage_feed_cursors` where that feed was left; `usage_daily` the usage by day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Index,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.db import Base

CHUNK = 400  # ids per IN (...) list: inside SQLite's variable limit


class DurationRow(Base):
    """An operator's record of one call's duration. Immutable."""

    __tablename__ = "call_durations"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    call_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(36))
    caller: Mapped[str] = mapped_column(String(16))
    callee: Mapped[str] = mapped_column(String(16))
    direction: Mapped[str] = mapped_column(String(8))
    # The partition key on PostgreSQL (plumbing/partitions.py), so part of the primary key.
    start_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    end_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_us: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the record as submitted: same record_id and digest is a duplicate.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # (operator_id, record_id) and (operator_id, call_id) are unique, though no
        # constraint says so (a partitioned table cannot without the partition key): the
        # operator's SUBMISSIONS lock (`operators_lock`) serializes the checks of ingest.submit.
        Index("ix_call_durations_operator_call", "operator_id", "call_id"),
        Index("ix_call_durations_operator_start", "operator_id", "start_time"),
        Index("ix_call_durations_tenant_start", "tenant_id", "start_time"),
        {"postgresql_partition_by": "RANGE (start_time)"},
    )


DURATIONS: Table = DurationRow.__table__  # type: ignore[assignment]


class DurationKeyRow(Base):
    """The keys of each stored duration record, on PostgreSQL: one narrow table, not
    partitioned, so that the database enforces (operator, record_id) and (operator, call_id)
    again and ingest's duplicate look-ups are one index probe per key instead of one per
    partition of `call_durations`. Written with each record (`ingest.submit`) and forgotten
    with it (`ingest.purge_durations`, and the drop of a `call_durations` partition by
    `plumbing.partitions`, in the same transaction, by `start_time`). Empty on SQLite, where
    `call_durations` is a plain table whose own keys do this."""

    __tablename__ = "call_duration_keys"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    call_id: Mapped[str] = mapped_column(String(64))
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    start_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("operator_id", "call_id", name="uq_call_duration_keys_operator_call"),
        Index("ix_call_duration_keys_start", "start_time"),
    )


DURATION_KEYS: Table = DurationKeyRow.__table__  # type: ignore[assignment]


class PlatformCallRow(Base):
    """The platform's side of a call, as the records feed told it: what usage and
    reconciliation compare operators' records with. Immutable, like the record it comes from."""

    __tablename__ = "usage_platform_calls"

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(36))
    direction: Mapped[str] = mapped_column(String(8))
    # The partition key on PostgreSQL, so part of the primary key: a call's invite time never
    # changes, so (call_id, invite_time) still keeps each call once.
    invite_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    answer_time: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_usage_platform_calls_operator_answer", "operator_id", "answer_time"),
        Index("ix_usage_platform_calls_tenant_answer", "tenant_id", "answer_time"),
        {"postgresql_partition_by": "RANGE (invite_time)"},
    )


class PlatformCallKeyRow(Base):
    """The key of each platform call kept, on PostgreSQL: one narrow table, not partitioned,
    so that the database keeps each call once by its id (`usage_platform_calls` cannot without
    its partition key) and a look-up by call id is one index probe giving the invite time, the
    partition key of the row itself. Written before the row (`platform_calls.
    store_platform_calls`: only calls new here are stored), forgotten with it
    (`platform_calls.purge_platform_calls`, and the drop of a `usage_platform_calls` partition
    by `plumbing.partitions`, in the same transaction, by `invite_time`). Empty on SQLite, where
    `usage_platform_calls` is a plain table, its key led by the call id (one writer)."""

    __tablename__ = "usage_platform_call_keys"

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(63))
    invite_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_usage_platform_call_keys_invite", "invite_time"),)


PLATFORM_CALL_KEYS: Table = PlatformCallKeyRow.__table__  # type: ignore[assignment]


class FeedCursorRow(Base):
    """Where a feed this service follows was left: saved with what it delivered."""

    __tablename__ = "usage_feed_cursors"

    feed: Mapped[str] = mapped_column(String(32), primary_key=True)
    cursor: Mapped[str] = mapped_column(String(256))


PLATFORM_CALLS: Table = PlatformCallRow.__table__  # type: ignore[assignment]
CURSORS: Table = FeedCursorRow.__table__  # type: ignore[assignment]


class UsageDayRow(Base):
    """Calls and billed seconds of one operator, tenant, UTC day, direction and source."""

    __tablename__ = "usage_daily"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), primary_key=True)
    source: Mapped[str] = mapped_column(String(8), primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger)
    billed_s: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_usage_daily_tenant_day", "tenant_id", "day"),)


USAGE_DAYS: Table = UsageDayRow.__table__  # type: ignore[assignment]


# PostgreSQL: each operator's lock of a kind, in the order given (one statement for them all).
# The key names the schema: advisory locks are the whole database's, and the same operator in
# another schema (another deployment on the server, a test's or a bench's schema) is another's.
_LOCK_OPERATORS = (
    "SELECT pg_advisory_xact_lock(hashtext(current_schema() || CAST(? AS text) || operator_id))"
    " FROM unnest(CAST(? AS text[])) AS operators (operator_id)"
)
# The two kinds of lock an operator has (the middle of each key).
SUBMISSIONS = ":usage_lock:"
PAIRING = ":usage_pairing:"


def operators_lock(
    session: Session, operators: Sequence[str], kind: str
) -> list[tuple[str, list[Any]]]:
    """The statement that takes each operator's lock of `kind`, to send in one pipeline with
    the statements that need it (`driver_fetch_all`); none on SQLite, which has one writer. On
    PostgreSQL a transaction-scoped advisory lock each (of this schema's operator), taken in
    one order, held to commit. Two kinds:

    - SUBMISSIONS: an operator's submissions one at a time (`ingest.submit`, first thing, for
      its whole unit): concurrent streams of one operator see each other's commits in their
      duplicate checks.
    - PAIRING: what pairs an operator's records with the platform's calls (`usage_days.
      count_reported` for ingest, `count_platform` for the records feed, with their first
      look-up): each writer takes it after writing its own side of the calls and before reading
      the other side's, so of two writers of one call's two sides the second to take it sees
      the first's committed rows, and the call is counted once. It is held only for that
      look-up, the usage by day and the commit: the feed's unit, which carries calls of every
      operator, takes them all, and waits for, and holds up, no more of a submission than that.

    A submission takes its SUBMISSIONS lock, then its PAIRING lock; the feed only PAIRING locks:
    no cycle."""
    if not operators or session.get_bind().dialect.name != "postgresql":
        return []
    return [(_LOCK_OPERATORS, [kind, sorted(set(operators))])]


SQL = {"postgresql": (_LOCK_OPERATORS,)}
