"""The call-duration tables and the units of work on them.

`call_durations` holds each operator's records, keyed by (operator, record_id), at most one per
(operator, call_id). Each function takes a `Session` inside a transaction (run it with
`Database.run`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    CursorResult,
    DateTime,
    Index,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    delete,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.db import Base
from services.usage.rules import Outcome, Refusal, Result, Submitted

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
    start_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_us: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the record as submitted: same record_id and digest is a duplicate.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("operator_id", "call_id", name="uq_call_durations_operator_call"),
        Index("ix_call_durations_operator_start", "operator_id", "start_time"),
        Index("ix_call_durations_tenant_start", "tenant_id", "start_time"),
    )


DURATIONS: Table = DurationRow.__table__  # type: ignore[assignment]


def _rejected(record_id: str, reason: str, field: str, message: str) -> Result:
    return Result(record_id, Outcome.REJECTED, Refusal(reason, field, message))


def submit(session: Session, operator_id: str, submitted: Sequence[Submitted]) -> list[Result]:
    """Store checked records in order, as if submitted one by one: a record_id already stored
    (or earlier in the batch) is a duplicate with the same digest and a conflict with another;
    a call_id another record of the operator reports is CALL_ALREADY_REPORTED.

    On PostgreSQL the operator's submissions are serialized by a transaction-scoped advisory
    lock, so concurrent streams of one operator see each other's commits (SQLite has one writer).
    """
    if not submitted:
        return []
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"usage:{operator_id}"}
        )
    c = DURATIONS.c
    by_record: dict[str, tuple[bytes, str]] = {}
    by_call: dict[str, str] = {}
    record_ids = [s.record.record_id for s in submitted]
    call_ids = [s.record.call_id for s in submitted]
    for first in range(0, len(submitted), CHUNK):
        found = session.execute(
            select(c.record_id, c.call_id, c.digest).where(
                c.operator_id == operator_id,
                c.record_id.in_(record_ids[first : first + CHUNK])
                | c.call_id.in_(call_ids[first : first + CHUNK]),
            )
        )
        for record_id, call_id, digest in found:
            by_record[record_id] = (bytes(digest), call_id)
            by_call[call_id] = record_id
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    results: list[Result] = []
    for item in submitted:
        record = item.record
        seen = by_record.get(record.record_id)
        if seen is not None:
            if seen[0] == item.digest:
                results.append(Result(record.record_id, Outcome.DUPLICATE))
            else:
                results.append(
                    _rejected(
                        record.record_id,
                        "RECORD_ID_CONFLICT",
                        "record_id",
                        "a record with this record_id and other content is stored; records are"
                        " immutable",
                    )
                )
            continue
        if record.call_id in by_call:
            results.append(
                _rejected(
                    record.record_id,
                    "CALL_ALREADY_REPORTED",
                    "call_id",
                    "another of your records reports this call",
                )
            )
            continue
        start, end, duration, direction = (
            record.start_time,
            record.end_time,
            record.duration,
            record.direction,
        )
        if start is None or end is None or duration is None or direction is None:
            raise ValueError("submit() stores checked records only")
        by_record[record.record_id] = (item.digest, record.call_id)
        by_call[record.call_id] = record.record_id
        rows.append(
            {
                "operator_id": operator_id,
                "record_id": record.record_id,
                "call_id": record.call_id,
                "tenant_id": record.tenant_id.lower(),
                "caller": record.caller,
                "callee": record.callee,
                "direction": direction.value,
                "start_time": start,
                "end_time": end,
                "duration_us": duration // dt.timedelta(microseconds=1),
                "digest": item.digest,
                "submitted_at": now,
            }
        )
        results.append(Result(record.record_id, Outcome.ACCEPTED))
    if rows:
        session.execute(insert(DURATIONS), rows)
    return results


def purge_durations(session: Session, older_than: dt.datetime) -> int:
    """Delete records of calls that started before the retention."""
    result = cast(
        CursorResult[Any],
        session.execute(delete(DURATIONS).where(DURATIONS.c.start_time < older_than)),
    )
    return result.rowcount
