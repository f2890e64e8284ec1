"""The numbers service's public face: what a process needs to run it (plumbing.service)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from opconnect.numbers.v1 import (
    civic_addresses_pb2,
    civic_addresses_pb2_grpc,
    consents_pb2,
    consents_pb2_grpc,
)
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc
from plumbing import partitions
from plumbing.audit import AuditLog
from plumbing.cache import ReadCache
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.logs import get_logger
from plumbing.metrics import Metrics
from plumbing.rpc import Access
from plumbing.service import Host, Service
from services.numbers import consent_storage, storage
from services.numbers.address_servicer import CivicAddressAdminService, CivicAddressService
from services.numbers.consent_servicer import ConsentAdminService, ConsentService
from services.numbers.rules import LOG, Event, Number
from services.numbers.servicer import NumberAdminService, NumberService

log = get_logger("opconnect.numbers")


class Numbers(Service):
    name = "numbers"
    protos = pb.DESCRIPTOR
    more_protos = (consents_pb2.DESCRIPTOR, civic_addresses_pb2.DESCRIPTOR)
    rules: ClassVar[dict[str, Access]] = {
        "NumberService": Access.OPERATOR,
        "NumberAdminService": Access.PLATFORM,
        "ConsentService": Access.OPERATOR,
        "ConsentAdminService": Access.PLATFORM,
        "CivicAddressService": Access.OPERATOR,
        "CivicAddressAdminService": Access.PLATFORM,
    }

    def __init__(self) -> None:
        self.metrics = Metrics(enabled=False)
        self.audit: AuditLog | None = None  # operators' reads of civic addresses

    def register(self, host: Host) -> None:
        """`GetNumber` reads through a cache only while this replica hears every other
        replica's changes (always with SQLite; with PostgreSQL while its LISTEN link is up)."""
        self.metrics = host.metrics
        cache: ReadCache[Number | None] = ReadCache(
            host.settings.number_cache_entries, host.cache_usable
        )
        host.notifier.subscribe(LOG, cache.invalidate)
        pb_grpc.add_NumberServiceServicer_to_server(
            NumberService(
                host.db,
                host.notifier,
                host.settings,
                cache,
                streams=host.streams,
                metrics=host.metrics,
            ),
            host.server,
        )
        pb_grpc.add_NumberAdminServiceServicer_to_server(
            NumberAdminService(host.db, host.notifier, cache, host.metrics), host.server
        )
        consents_pb2_grpc.add_ConsentServiceServicer_to_server(
            ConsentService(
                host.db,
                host.notifier,
                host.settings,
                streams=host.streams,
                metrics=host.metrics,
            ),
            host.server,
        )
        consents_pb2_grpc.add_ConsentAdminServiceServicer_to_server(
            ConsentAdminService(host.db, host.notifier, host.metrics), host.server
        )
        self.audit = AuditLog(host.db, metrics=host.metrics)

        def numbers_changed(operator: str, events: list[Event]) -> None:
            """After an address edit's commit: caches forget, watchers wake."""
            cache.invalidate([operator])
            host.notifier.publish(LOG, [operator], events[-1].position if events else 0)

        civic_addresses_pb2_grpc.add_CivicAddressServiceServicer_to_server(
            CivicAddressService(
                host.db,
                host.notifier,
                host.settings,
                self.audit,
                metrics=host.metrics,
                on_numbers_changed=numbers_changed,
            ),
            host.server,
        )
        civic_addresses_pb2_grpc.add_CivicAddressAdminServiceServicer_to_server(
            CivicAddressAdminService(host.db, host.metrics), host.server
        )

    async def start(self, host: Host) -> None:
        if self.audit is not None:
            self.audit.start()
        partitioned = [(partitions.NUMBER_EVENTS, host.settings.change_log_retention_s)]
        await partitions.maintain(host.db, partitioned, self.metrics, drop=False)

    async def stop(self) -> None:
        if self.audit is not None:
            await self.audit.close()

    async def purge(self, db: Database, settings: Settings) -> None:
        """Assignment changes past `change_log_retention_s`: on PostgreSQL whole partitions
        first (plumbing.partitions), then the rows left past the cutoff."""
        partitioned = [(partitions.NUMBER_EVENTS, settings.change_log_retention_s)]
        failure = await partitions.maintain(db, partitioned, self.metrics)
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.change_log_retention_s)
        purged = await db.run(storage.purge_events, cutoff, write=True)
        self.metrics.purge_removed.labels("number_events").inc(purged)
        if purged:
            log.info("purged change log", log="numbers", events=purged)
        purged = await db.run(consent_storage.purge_events, cutoff, write=True)
        self.metrics.purge_removed.labels("consent_events").inc(purged)
        if purged:
            log.info("purged change log", log="consents", events=purged)
        if failure is not None:
            raise failure
