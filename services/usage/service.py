"""The usage service's public face: what a process needs to run it (plumbing.service)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import ClassVar

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.logs import get_logger
from plumbing.metrics import Metrics
from plumbing.rpc import Access
from plumbing.service import ClientCertificate, Host, Service, client_certificate
from services.usage import ingest, platform_calls, usage_days
from services.usage.feed import CallFeedFollower, FeedClient
from services.usage.servicer import UsageReportService, UsageService

log = get_logger("opconnect.usage")

FEED_CLIENT = "usage"  # the platform principal the usage service follows the call feed as


class Usage(Service):
    name = "usage"
    protos = pb.DESCRIPTOR
    rules: ClassVar[dict[str, Access]] = {
        "UsageService": Access.OPERATOR,
        "UsageReportService": Access.PLATFORM,
    }

    def __init__(self) -> None:
        self.feed: CallFeedFollower | None = None  # the platform's side of every call
        self.metrics = Metrics(enabled=False)

    def register(self, host: Host) -> None:
        self.metrics = host.metrics
        pb_grpc.add_UsageServiceServicer_to_server(
            UsageService(host.db, host.settings, host.metrics), host.server
        )
        pb_grpc.add_UsageReportServiceServicer_to_server(
            UsageReportService(host.db, host.settings), host.server
        )

    async def start(self, host: Host) -> None:
        client = feed_client(host)
        if client is None:
            log.info("usage call feed off: no feed_* certificate or target configured")
            return
        self.feed = CallFeedFollower(host.db, client, tracer=host.tracer, metrics=host.metrics)
        self.feed.start()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()

    async def purge(self, db: Database, settings: Settings) -> None:
        """Call durations, the platform's calls kept, and the usage of their days, past
        `usage_retention_s` (from the call's start)."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.usage_retention_s)
        removed = self.metrics.purge_removed
        purged = await db.run(ingest.purge_durations, cutoff, write=True)
        removed.labels("call_durations").inc(purged)
        calls = await db.run(platform_calls.purge_platform_calls, cutoff, write=True)
        removed.labels("usage_platform_calls").inc(calls)
        days = await db.run(usage_days.purge_usage_days, cutoff, write=True)
        removed.labels("usage_daily").inc(days)
        purged += calls
        if purged:
            log.info("purged call durations", records=purged)


def feed_client(host: Host) -> FeedClient | None:
    """Where and as whom the usage service follows the call feed: `feed_target`, or the
    records service (this process's own address when it serves records, `records_target`
    otherwise); as the `feed_*` certificate, or the development PKI's `platform/usage`. None
    when there is no target or no certificate."""
    settings = host.settings
    own = host.address() if "records" in host.serves else settings.records_target
    target = settings.feed_target or own
    if not target:
        return None
    found: ClientCertificate | None
    if settings.feed_ca_file and settings.feed_cert_file and settings.feed_key_file:
        found = client_certificate(
            Path(settings.feed_ca_file), Path(settings.feed_cert_file), Path(settings.feed_key_file)
        )
    else:
        found = host.platform_credentials(FEED_CLIENT)
    if found is None:
        return None
    host.present_certificate("feed_cert", found.cert_file)
    return FeedClient(target, found.credentials, settings.internal_server_name)
