"""RPC handlers of `UsageService` (operators) and `UsageReportService` (the usage view).

Every handler validates its request (rules.py), runs one unit of work (ingest.py,
usage_query.py, reconciliation.py) and converts at the edge (convert.py); the operator comes
from the caller's certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.errors import invalid_field
from plumbing.metrics import Metrics
from plumbing.pipeline import pipelined
from plumbing.rpc import current_operator
from plumbing.tokens import bound_key, page_token, read_page_token
from plumbing.validation import (
    Outcome,
    batch_size,
    check_period,
    optional_tenant,
    page_size,
)
from plumbing.wellknown import duration_in, request_time
from services.usage import convert, ingest, reconciliation, rules, usage_query
from services.usage.rules import DOMAIN, OPERATOR_ID, Submitted

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class UsageService(pb_grpc.UsageServiceServicer):
    def __init__(self, db: Database, settings: Settings, metrics: Metrics) -> None:
        self._db = db
        self._settings = settings
        self._submitted = metrics.durations_submitted

    async def SubmitCallDurations(
        self, requests: AsyncIterator[pb.SubmitCallDurationsRequest], context: Context
    ) -> AsyncIterator[pb.SubmitCallDurationsResponse]:
        operator = current_operator()
        loop = asyncio.get_running_loop()

        async def prepare(request: pb.SubmitCallDurationsRequest) -> _Batch:
            """A batch read and checked: no writes."""
            rules.check_batch(request.batch_id, len(request.records))
            request.DiscardUnknownFields()  # unknown fields never change a record's digest
            checked = await loop.run_in_executor(
                None, convert.check, list(request.records), self._settings
            )
            return _Batch(request.batch_id, checked)

        async def commit(batch: _Batch) -> pb.SubmitCallDurationsResponse:
            """The batch stored in one transaction, and its answer."""
            valid = [c for c in batch.checked if isinstance(c, Submitted)]
            stored = iter(await self._db.run(ingest.submit, operator, valid, write=True))
            results = [next(stored) if isinstance(c, Submitted) else c for c in batch.checked]
            # One pass for the metrics and the counts (a batch is up to 1,000 records).
            kinds = Counter((r.outcome, r.refusal.reason if r.refusal else "") for r in results)
            by_outcome = Counter[Outcome]()
            for (outcome, reason), n in kinds.items():
                self._submitted.labels(operator, outcome.value, reason).inc(n)
                by_outcome[outcome] += n
            response = pb.SubmitCallDurationsResponse(
                batch_id=batch.batch_id,
                accepted_count=by_outcome[Outcome.ACCEPTED],
                duplicate_count=by_outcome[Outcome.DUPLICATE],
                refused_count=by_outcome[Outcome.REFUSED],
            )
            convert.add_results(response, results)
            return response

        # The next batches are read and checked while the one before commits; commits and
        # answers keep the batches' order (plumbing.pipeline).
        depth = self._settings.publish_pipeline_depth
        async for response in pipelined(requests, prepare, commit, depth):
            yield response

    async def GetReconciliation(
        self, request: pb.GetReconciliationRequest, context: Context
    ) -> pb.GetReconciliationResponse:
        query = _reconcile_query(request, current_operator(), self._settings)
        computed = dt.datetime.now(dt.UTC)
        found = await self._db.run(reconciliation.reconcile, query)
        return convert.reconciliation_out(found, query.tolerance, computed)

    async def StreamDiscrepancies(
        self, request: pb.StreamDiscrepanciesRequest, context: Context
    ) -> AsyncIterator[pb.StreamDiscrepanciesResponse]:
        query = _reconcile_query(request, current_operator(), self._settings)
        kind = None
        if request.kind:
            kind = convert.KIND_IN.get(request.kind)
            if kind is None:
                raise invalid_field(DOMAIN, "KIND_INVALID", "kind", "not a discrepancy kind")
        size = batch_size(
            request.max_batch_size,
            self._settings.stream_batch_size,
            self._settings.max_stream_batch_size,
            DOMAIN,
        )
        binding = _discrepancy_binding(query, kind)
        after = _read_cursor(request.cursor, binding) if request.cursor else None
        while True:
            found = await self._db.run(reconciliation.discrepancies, query, kind, after, size + 1)
            batch, more = found[:size], len(found) > size
            if batch:
                after = (batch[-1].start, batch[-1].call_id)
            yield pb.StreamDiscrepanciesResponse(
                discrepancies=[convert.discrepancy_out(x) for x in batch],
                cursor=_discrepancy_cursor(binding, after),
            )
            if not more:
                return

    async def GetUsageSummary(
        self, request: pb.GetUsageSummaryRequest, context: Context
    ) -> pb.GetUsageSummaryResponse:
        operator = current_operator()
        query = _usage_query(request, operator, optional_tenant(request.tenant_id, DOMAIN))
        rows, token = await _usage_page(self._db, self._settings, query, request)
        return pb.GetUsageSummaryResponse(rows=rows, next_page_token=token)


@dataclass(frozen=True)
class _Batch:
    """A submitted batch, checked: each record's checked form or its refusal."""

    batch_id: str
    checked: list[Submitted | rules.Result]


class UsageReportService(pb_grpc.UsageReportServiceServicer):
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    async def GetTenantUsage(
        self, request: pb.GetTenantUsageRequest, context: Context
    ) -> pb.GetTenantUsageResponse:
        tenant = optional_tenant(request.tenant_id, DOMAIN)
        if tenant is None:
            raise invalid_field(DOMAIN, "TENANT_ID_INVALID", "tenant_id", "required")
        operator = request.operator_id or None
        if operator is not None and OPERATOR_ID.fullmatch(operator) is None:
            raise invalid_field(DOMAIN, "OPERATOR_ID_INVALID", "operator_id", "not an operator id")
        query = _usage_query(request, operator, tenant)
        rows, token = await _usage_page(self._db, self._settings, query, request)
        return pb.GetTenantUsageResponse(rows=rows, next_page_token=token)


def _reconcile_query(
    request: pb.GetReconciliationRequest | pb.StreamDiscrepanciesRequest,
    operator: str,
    settings: Settings,
) -> rules.ReconcileQuery:
    start, end = check_period(
        DOMAIN,
        request_time(request, "start_time", DOMAIN, "PERIOD_INVALID"),
        request_time(request, "end_time", DOMAIN, "PERIOD_INVALID"),
        rules.MAX_RECONCILE_PERIOD,
    )
    if request.HasField("tolerance"):
        tolerance = rules.check_tolerance(
            duration_in(request.tolerance.absolute), request.tolerance.relative
        )
    else:
        tolerance = rules.Tolerance(
            dt.timedelta(seconds=settings.reconcile_tolerance_s), settings.reconcile_tolerance_ratio
        )
    tenant = optional_tenant(request.tenant_id, DOMAIN)
    return rules.ReconcileQuery(operator, start, end, tenant, tolerance)


def _usage_query(
    request: pb.GetUsageSummaryRequest | pb.GetTenantUsageRequest,
    operator: str | None,
    tenant: str | None,
) -> rules.UsageQuery:
    start, end = check_period(
        DOMAIN,
        request_time(request, "start_time", DOMAIN, "PERIOD_INVALID"),
        request_time(request, "end_time", DOMAIN, "PERIOD_INVALID"),
        rules.MAX_USAGE_PERIOD,
    )
    granularity = convert.GRANULARITY_IN.get(request.granularity)
    if granularity is None:
        raise invalid_field(DOMAIN, "GRANULARITY_INVALID", "granularity", "required: DAY or MONTH")
    return rules.UsageQuery(start, end, granularity, operator, tenant)


async def _usage_page(
    db: Database,
    settings: Settings,
    query: rules.UsageQuery,
    request: pb.GetUsageSummaryRequest | pb.GetTenantUsageRequest,
) -> tuple[list[pb.UsageRow], str]:
    size = page_size(request.page_size, settings.default_page_size, settings.max_page_size, DOMAIN)
    binding = _usage_binding(query)
    after = None
    if request.page_token:
        tenant, bucket, direction = read_page_token(
            request.page_token, "usage.rows", binding, 3, DOMAIN
        )
        after = (tenant, bucket, direction)
    rows = await db.run(usage_query.usage_rows, query, after, size + 1)
    page = rows[:size]
    token = ""
    if len(rows) > size:
        last = page[-1]
        key = [last.tenant_id, _bucket(last, query), last.direction.value]
        token = page_token("usage.rows", binding, key)
    return [convert.row_out(r) for r in page], token


def _bucket(row: rules.UsageRow, query: rules.UsageQuery) -> str:
    """The row's period as the storage keys it (YYYY-MM-DD or YYYY-MM)."""
    text = row.period_start.strftime("%Y-%m-%d")
    return text if query.granularity is rules.Granularity.DAY else text[:7]


def _usage_binding(query: rules.UsageQuery) -> str:
    """What a usage page token is bound to: the period, granularity, operator and tenant."""
    return "|".join(
        (
            query.start.isoformat(),
            query.end.isoformat(),
            query.granularity.value,
            query.operator_id or "",
            query.tenant_id or "",
        )
    )


def _discrepancy_binding(query: rules.ReconcileQuery, kind: rules.DiscrepancyKind | None) -> str:
    """What a discrepancy page token is bound to: caller, period, tenant, tolerance and kind."""
    return "|".join(
        (
            query.operator_id,
            query.start.isoformat(),
            query.end.isoformat(),
            query.tenant_id or "",
            str(query.tolerance.absolute.total_seconds()),
            repr(query.tolerance.relative),
            kind.value if kind else "",
        )
    )


_DISCREPANCIES = "usage.discrepancies"


def _discrepancy_cursor(binding: str, after: tuple[dt.datetime, str] | None) -> str:
    """A cursor resuming strictly after (start, call id), or at the first discrepancy for None;
    bound to the request's caller, period, filters and tolerance."""
    key = ["", ""] if after is None else [after[0].isoformat(), after[1]]
    return page_token(_DISCREPANCIES, binding, key)


def _read_cursor(cursor: str, binding: str) -> tuple[dt.datetime, str] | None:
    """(start, call id) of the last discrepancy before `cursor`, or None for the first;
    INVALID_ARGUMENT / CURSOR_INVALID for anything but a cursor of this very request."""
    key = bound_key(cursor, _DISCREPANCIES, binding, 2)
    if key == ["", ""]:
        return None
    if key is not None and key[1]:
        try:
            when = dt.datetime.fromisoformat(key[0])
        except ValueError:
            pass
        else:
            if when.tzinfo is not None:
                return when, key[1]
    raise invalid_field(
        DOMAIN,
        "CURSOR_INVALID",
        "cursor",
        "not a cursor of this stream (the same period, filters and tolerance)",
    )
