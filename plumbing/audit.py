"""The audit log: every operator read of records (who, what, when, how many), kept apart from the
debugging logs and for longer (DESIGN.md section 4, "Privacy").

A handler wraps its read in `audit.read(method, filters)`; when the read ends, however it ends,
one event is written: principal, method, filters, records returned, duration, status and the
request id (which joins it to the RPC's log line). A stream, which may stay open for days, is
also audited when it opens (status STARTED, as Kubernetes audits a watch at ResponseStarted).
Filters that are personal data (a phone number) are masked as in the logs; records themselves
never appear.

Events are logged at once on the `opconnect.audit` logger and written to the `audit_events`
table by a background task in batches (one transaction a second, not one per read), and on
shutdown. A crash loses at most the last second of the table's events, never of the log's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from prometheus_client.core import Metric
from sqlalchemy import (
    BigInteger,
    CursorResult,
    DateTime,
    Double,
    Index,
    Integer,
    String,
    delete,
    insert,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.db import Base, Database
from plumbing.errors import ApiError
from plumbing.logs import get_logger
from plumbing.metrics import Metrics, gauge
from plumbing.rpc import current_principal, current_request_id, ending_status
from plumbing.status import code_of

log = get_logger("opconnect.audit")


class AuditEventRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    # The partition key on PostgreSQL (plumbing/partitions.py), so part of the primary key
    # there (the id comes from the sequence audit_events_id_seq); SQLite keeps `id` alone.
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    principal: Mapped[str] = mapped_column(String(80))
    method: Mapped[str] = mapped_column(String(120))
    filters: Mapped[str] = mapped_column(String(2000))
    record_count: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[float] = mapped_column(Double)
    status: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_events_principal_at", "principal", "at"),
        Index("ix_audit_events_at", "at"),
        {"postgresql_partition_by": "RANGE (at)"},
    )


@dataclass(frozen=True)
class AuditEvent:
    at: dt.datetime
    principal: str
    method: str
    filters: Mapping[str, str]
    record_count: int
    duration_ms: float
    status: str
    request_id: str


def _status_of(error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, ApiError):
        return str(code_of(error).name)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return ending_status()  # revoked, suspended, past its deadline, or cancelled
    return "INTERNAL"


class AuditRead:
    """One read being audited; add to `records` as records are returned."""

    def __init__(
        self, audit: AuditLog, method: str, filters: Mapping[str, str], stream: bool
    ) -> None:
        self._audit = audit
        self._method = method
        self._filters = dict(filters)
        self._stream = stream
        self._started = time.perf_counter()
        # Taken now, in the call's context: the end may be recorded from anywhere.
        self._principal = str(current_principal())
        self._request_id = current_request_id()
        self.records = 0

    def __enter__(self) -> AuditRead:
        if self._stream:
            self._record("STARTED")
        return self

    def _record(self, status: str) -> None:
        self._audit.record(
            AuditEvent(
                at=dt.datetime.now(dt.UTC),
                principal=self._principal,
                method=self._method,
                filters=self._filters,
                record_count=self.records,
                duration_ms=round((time.perf_counter() - self._started) * 1000, 3),
                status=status,
                request_id=self._request_id,
            )
        )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._record(_status_of(error))


class _Backlog:
    """The audit logs of one process (each service that audits keeps one): their events
    buffered, exported as one family."""

    def __init__(self) -> None:
        self.logs: weakref.WeakSet[AuditLog] = weakref.WeakSet()

    def figures(self) -> Iterator[Metric]:
        """Scrape time (the HTTP server's thread): the events buffered, every log's."""
        family = gauge(
            "opconnect_audit_events_pending",
            "Audit events logged and not yet written to the database (written every second;"
            " a backlog means the table's writes are failing or slow).",
        )
        family.add_metric([], sum(each.pending for each in list(self.logs)))
        yield family


_BACKLOGS: weakref.WeakKeyDictionary[Metrics, _Backlog] = weakref.WeakKeyDictionary()


class AuditLog:
    """Collects audit events and writes them to the table in batches."""

    def __init__(
        self,
        db: Database,
        flush_interval_s: float = 1.0,
        max_pending: int = 100_000,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._interval = flush_interval_s
        self._max_pending = max_pending
        self._pending: list[AuditEvent] = []
        self._task: asyncio.Task[None] | None = None
        metrics = metrics or Metrics(enabled=False)
        self._written = metrics.audit_written
        backlog = _BACKLOGS.get(metrics)
        if backlog is None:  # the process's first audit log: the family is exported once
            backlog = _BACKLOGS[metrics] = _Backlog()
            metrics.on_scrape("audit", backlog.figures)
        backlog.logs.add(self)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def read(self, method: str, filters: Mapping[str, str], *, stream: bool = False) -> AuditRead:
        """Audit one read; `stream`: also when it opens."""
        return AuditRead(self, method, filters, stream)

    def record(self, event: AuditEvent) -> None:
        log.info(
            "audit",
            principal=event.principal,
            method=event.method,
            filters=dict(event.filters),
            records=event.record_count,
            duration_ms=event.duration_ms,
            status=event.status,
            request_id=event.request_id,
        )
        if len(self._pending) >= self._max_pending:
            log.error("audit table backlog full; event kept in the log only")
            return
        self._pending.append(event)

    async def flush(self) -> int:
        events, self._pending = self._pending, []
        if not events:
            return 0
        try:
            await self._db.run(insert_events, events, write=True)
        except Exception:
            self._pending[:0] = events  # keep them for the next try
            raise
        self._written.inc(len(events))
        return len(events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception as error:
                log.error("audit flush failed; retrying", error=str(error)[:200])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()


def insert_events(session: Session, events: list[AuditEvent]) -> None:
    session.execute(
        insert(AuditEventRow),
        [
            {
                "at": e.at,
                "principal": e.principal,
                "method": e.method,
                "filters": json.dumps(dict(e.filters), sort_keys=True)[:2000],
                "record_count": e.record_count,
                "duration_ms": e.duration_ms,
                "status": e.status,
                "request_id": e.request_id,
            }
            for e in events
        ],
    )


def list_events(
    session: Session, principal: str | None, since: dt.datetime | None, limit: int
) -> list[AuditEvent]:
    """The newest events first."""
    query = select(AuditEventRow)
    if principal is not None:
        query = query.where(AuditEventRow.principal == principal)
    if since is not None:
        query = query.where(AuditEventRow.at >= since)
    rows = session.scalars(query.order_by(AuditEventRow.id.desc()).limit(limit))
    return [
        AuditEvent(
            at=r.at if r.at.tzinfo else r.at.replace(tzinfo=dt.UTC),
            principal=r.principal,
            method=r.method,
            filters=cast(dict[str, str], json.loads(r.filters)),
            record_count=r.record_count,
            duration_ms=r.duration_ms,
            status=r.status,
            request_id=r.request_id,
        )
        for r in rows
    ]


def purge_events(session: Session, older_than: dt.datetime) -> int:
    result = cast(
        CursorResult[Any],
        session.execute(delete(AuditEventRow).where(AuditEventRow.at < older_than)),
    )
    return result.rowcount
