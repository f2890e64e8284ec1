"""RPC handlers of `UsageService` (operators) and `UsageReportService` (the usage view).

Built so far: `SubmitCallDurations`. The summaries and reconciliation (issue 4) answer
UNIMPLEMENTED with an ErrorInfo until they are built.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.errors import ApiError
from plumbing.rpc import Access, access_rules, current_operator
from services.usage import convert, rules, storage
from services.usage.rules import DOMAIN, Outcome, Refusal, Result, Submitted

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _not_built(method: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.UNIMPLEMENTED,
        "NOT_IMPLEMENTED",
        f"{method} is not available yet",
        DOMAIN,
    )


class UsageService(pb_grpc.UsageServiceServicer):
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    async def SubmitCallDurations(
        self, requests: AsyncIterator[pb.SubmitCallDurationsRequest], context: Context
    ) -> AsyncIterator[pb.SubmitCallDurationsResponse]:
        operator = current_operator()
        loop = asyncio.get_running_loop()
        async for request in requests:
            rules.check_batch(request.batch_id, len(request.records))
            checked = await loop.run_in_executor(
                None, _check, list(request.records), self._settings
            )
            valid = [c for c in checked if isinstance(c, Submitted)]
            stored = iter(await self._db.run(storage.submit, operator, valid, write=True))
            results = [next(stored) if isinstance(c, Submitted) else c for c in checked]
            yield pb.SubmitCallDurationsResponse(
                batch_id=request.batch_id,
                results=[convert.result_out(r) for r in results],
                accepted_count=sum(r.outcome is Outcome.ACCEPTED for r in results),
                duplicate_count=sum(r.outcome is Outcome.DUPLICATE for r in results),
                rejected_count=sum(r.outcome is Outcome.REJECTED for r in results),
            )

    async def GetReconciliation(
        self, request: pb.GetReconciliationRequest, context: Context
    ) -> pb.GetReconciliationResponse:
        raise _not_built("GetReconciliation")

    async def StreamDiscrepancies(
        self, request: pb.StreamDiscrepanciesRequest, context: Context
    ) -> AsyncIterator[pb.StreamDiscrepanciesResponse]:
        raise _not_built("StreamDiscrepancies")
        yield  # an async generator, like every server-streaming handler

    async def GetUsageSummary(
        self, request: pb.GetUsageSummaryRequest, context: Context
    ) -> pb.GetUsageSummaryResponse:
        raise _not_built("GetUsageSummary")


class UsageReportService(pb_grpc.UsageReportServiceServicer):
    async def GetTenantUsage(
        self, request: pb.GetTenantUsageRequest, context: Context
    ) -> pb.GetTenantUsageResponse:
        raise _not_built("GetTenantUsage")


def _check(messages: list[pb.CallDurationRecord], settings: Settings) -> list[Submitted | Result]:
    """Each record read and checked: ready to store, or its rejection."""
    now = dt.datetime.now(dt.UTC)
    retention = dt.timedelta(seconds=settings.usage_retention_s)
    skew = dt.timedelta(seconds=settings.clock_skew_s)
    out: list[Submitted | Result] = []
    for message in messages:
        submitted = convert.submitted_in(message)
        if isinstance(submitted, Refusal):
            out.append(Result(message.record_id, Outcome.REJECTED, submitted))
            continue
        refusal = rules.check_record(submitted.record, now, retention, skew)
        if refusal is None:
            out.append(submitted)
        else:
            out.append(Result(message.record_id, Outcome.REJECTED, refusal))
    return out


def access() -> dict[str, Access]:
    """Who may call each method of this service."""
    return access_rules(
        {
            pb.DESCRIPTOR.services_by_name["UsageService"]: Access.OPERATOR,
            pb.DESCRIPTOR.services_by_name["UsageReportService"]: Access.PLATFORM,
        }
    )


def register(server: grpc.aio.Server, db: Database, settings: Settings) -> list[str]:
    """Add both services to `server`; returns their full names (for health and reflection)."""
    pb_grpc.add_UsageServiceServicer_to_server(UsageService(db, settings), server)
    pb_grpc.add_UsageReportServiceServicer_to_server(UsageReportService(), server)
    return [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]
