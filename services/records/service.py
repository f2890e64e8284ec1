"""The records service's public face: what a process needs to run it (plumbing.service)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from plumbing import audit as audit_log
from plumbing import partitions
from plumbing.audit import AuditLog
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.logs import get_logger
from plumbing.metrics import Metrics
from plumbing.rpc import Access
from plumbing.service import Host, Service
from services.records import storage
from services.records.servicer import CallFeedService, CallRecordIngestService, CallRecordService

log = get_logger("opconnect.records")


class Records(Service):
    name = "records"
    protos = pb.DESCRIPTOR
    rules: ClassVar[dict[str, Access]] = {
        "CallRecordService": Access.OPERATOR,
        "CallRecordIngestService": Access.PLATFORM,
        "CallFeedService": Access.PLATFORM,
    }

    def __init__(self) -> None:
        self.audit: AuditLog | None = None  # every operator read, written in batches
        self.metrics = Metrics(enabled=False)

    def register(self, host: Host) -> None:
        self.metrics = host.metrics
        self.audit = AuditLog(host.db, metrics=host.metrics)
        db, notifier, settings, server = host.db, host.notifier, host.settings, host.server
        pb_grpc.add_CallRecordServiceServicer_to_server(
            CallRecordService(db, notifier, settings, self.audit, host.streams), server
        )
        pb_grpc.add_CallRecordIngestServiceServicer_to_server(
            CallRecordIngestService(db, notifier, settings, host.known_operator, host.metrics),
            server,
        )
        pb_grpc.add_CallFeedServiceServicer_to_server(
            CallFeedService(db, notifier, settings, host.streams), server
        )

    async def start(self, host: Host) -> None:
        partitioned = self._partitioned(host.settings)
        await partitions.maintain(host.db, partitioned, self.metrics, drop=False)
        if self.audit is not None:
            self.audit.start()

    @staticmethod
    def _partitioned(settings: Settings) -> list[tuple[partitions.Partitioned, float]]:
        return [
            (partitions.RECORDS, settings.record_retention_s),
            (partitions.AUDIT_EVENTS, settings.audit_retention_s),
        ]

    async def stop(self) -> None:
        if self.audit is not None:
            await self.audit.close()

    async def purge(self, db: Database, settings: Settings) -> None:
        """Call records past `record_retention_s` and audit events past `audit_retention_s`:
        on PostgreSQL whole partitions first (plumbing.partitions), then the rows left past the
        cutoff (all of them on SQLite), in chunks, one short transaction each."""
        failure = await partitions.maintain(db, self._partitioned(settings), self.metrics)
        now = dt.datetime.now(dt.UTC)
        cutoff = now - dt.timedelta(seconds=settings.record_retention_s)
        purged = 0
        removed = self.metrics.purge_removed
        while True:
            chunk = await db.run(storage.purge_records, cutoff, write=True)
            purged += chunk.records
            removed.labels("call_records").inc(chunk.records)
            removed.labels("call_media_streams").inc(chunk.media_streams)
            if chunk.records < storage.PURGE_CHUNK:
                break
        if purged:
            log.info("purged call records", records=purged)
        cutoff = now - dt.timedelta(seconds=settings.audit_retention_s)
        audited = await db.run(audit_log.purge_events, cutoff, write=True)
        removed.labels("audit_events").inc(audited)
        if audited:
            log.info("purged audit events", events=audited)
        if failure is not None:
            raise failure
