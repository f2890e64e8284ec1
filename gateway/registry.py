"""The operator registry: which operators exist and whether they are active.

A certificate proves who an operator is; the registry says whether it may call now. Suspending
an operator refuses its next call (UNAUTHENTICATED) without touching its certificates or data.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import DateTime, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.pki import operator_uri
from plumbing.db import Base, Database


class OperatorStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class OperatorRow(Base):
    __tablename__ = "operators"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Operator:
    operator_id: str
    display_name: str
    status: OperatorStatus


def _operator(row: OperatorRow) -> Operator:
    return Operator(row.operator_id, row.display_name, OperatorStatus(row.status))


def add_operator(session: Session, operator_id: str, display_name: str = "") -> Operator:
    """Add an active operator; an existing one is returned unchanged."""
    operator_uri(operator_id)  # raises ValueError for an id a certificate could not carry
    row = session.get(OperatorRow, operator_id)
    if row is None:
        stamp = dt.datetime.now(dt.UTC)
        row = OperatorRow(
            operator_id=operator_id,
            display_name=display_name,
            status=OperatorStatus.ACTIVE.value,
            created_at=stamp,
            updated_at=stamp,
        )
        session.add(row)
        session.flush()
    return _operator(row)


def set_status(session: Session, operator_id: str, status: OperatorStatus) -> Operator:
    row = session.get(OperatorRow, operator_id)
    if row is None:
        raise LookupError(f"no operator {operator_id}")
    row.status = status.value
    row.updated_at = dt.datetime.now(dt.UTC)
    return _operator(row)


def get_operator(session: Session, operator_id: str) -> Operator | None:
    row = session.get(OperatorRow, operator_id)
    return _operator(row) if row else None


def list_operators(session: Session) -> list[Operator]:
    return [
        _operator(r) for r in session.scalars(select(OperatorRow).order_by(OperatorRow.operator_id))
    ]


class Registry:
    """Registry reads for the hot path: each operator's status cached for `ttl_s` seconds, so a
    suspension made by another process takes effect within that time (at once in this one)."""

    def __init__(self, db: Database, ttl_s: float) -> None:
        self._db = db
        self._ttl = ttl_s
        self._cache: dict[str, tuple[Operator | None, float]] = {}

    async def lookup(self, operator_id: str) -> Operator | None:
        hit = self._cache.get(operator_id)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self._ttl:
            return hit[0]
        found = await self._db.run(get_operator, operator_id)
        self._cache[operator_id] = (found, now)
        return found

    async def add(self, operator_id: str, display_name: str = "") -> Operator:
        found = await self._db.run(add_operator, operator_id, display_name, write=True)
        self._cache.pop(operator_id, None)
        return found

    async def set_status(self, operator_id: str, status: OperatorStatus) -> Operator:
        found = await self._db.run(set_status, operator_id, status, write=True)
        self._cache.pop(operator_id, None)
        return found
