"""RPC handlers of `CallRecordService` (operators) and `CallRecordIngestService` (the call
controller).

Each handler validates its request (rules.py), runs units of work (storage.py) and converts at
the edge (convert.py). The operator comes from the caller's certificate (plumbing.rpc), never
from a request field; every operator read is audited (plumbing.audit).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from plumbing.audit import AuditLog
from plumbing.changelog import (
    ANY_KEY,
    PLATFORM,
    Follow,
    Notifier,
    Packs,
    Shared,
    Streams,
    decode_cursor,
    encode_cursor,
    follow_log,
    oldest_position,
    start_position,
)
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.errors import invalid_field, not_found
from plumbing.logs import mask_number
from plumbing.metrics import Metrics, count_labels
from plumbing.pipeline import CommitGroups, pipelined
from plumbing.rpc import current_operator
from plumbing.tokens import page_token, read_page_token
from plumbing.validation import (
    batch_size,
    check_period,
    optional_tenant,
    page_size,
)
from plumbing.wellknown import request_time
from services.records import convert, rules, storage
from services.records.quality import Thresholds
from services.records.rules import DOMAIN, LOG, MAX_BATCH

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
KnownOperator = Callable[[str], Awaitable[bool]]


def _batch_size(requested: int, settings: Settings) -> int:
    return batch_size(requested, settings.stream_batch_size, settings.max_stream_batch_size, DOMAIN)


class CallRecordService(pb_grpc.CallRecordServiceServicer):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        settings: Settings,
        audit: AuditLog,
        streams: Streams,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._settings = settings
        self._audit = audit
        self._streams = streams

    async def StreamCallRecords(  # type: ignore[override]  # yields encoded responses (bytes)
        self, request: pb.StreamCallRecordsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        operator = current_operator()
        selection = rules.StreamFilter(
            operator_id=operator,
            tenant_id=optional_tenant(request.tenant_id, DOMAIN),
            phone_number=rules.optional_number(request.phone_number),
            poor_only=request.poor_quality_only,
            end_time=request_time(request, "end_time", DOMAIN, "TIME_RANGE_INVALID"),
        )
        size = _batch_size(request.max_batch_size, self._settings)
        start = request.WhichOneof("start")
        start_time = request_time(request, "start_time", DOMAIN, "TIME_RANGE_INVALID")
        if start_time and selection.end_time and selection.end_time <= start_time:
            raise invalid_field(
                DOMAIN, "TIME_RANGE_INVALID", "end_time", "must be after start_time"
            )
        filters = _stream_filters(selection, start, start_time, request.follow)
        with self._audit.read("StreamCallRecords", filters, stream=True) as audit:
            if start == "cursor":
                after = decode_cursor(request.cursor, LOG, DOMAIN)
            elif start_time is not None:
                after = await self._db.run(storage.position_at, start_time)
            else:
                after = await start_position(self._db, LOG)
                # Starting from now: say where "now" is at once, so the client can resume there.
                yield convert.stream_response([], encode_cursor(LOG, after))
            until = None
            if selection.end_time is not None:
                until = selection.end_time.timestamp() + self._settings.stream_end_grace_s
            spec = Follow(
                LOG,
                operator,
                DOMAIN,
                size,
                self._settings.heartbeat_interval_s,
                follow=request.follow,
                until=until,
                kind="records",
                operator=operator,
                read_batches=self._settings.stream_read_batches,
            )
            # Catching up, each batch is one chunk read as one row (storage.read_records).
            read = functools.partial(storage.read_records, selection=selection, size=size)
            # Caught up, it is served from the shared tail (its operator's items), its filter
            # applied.
            shared = Shared(
                storage.read_tail_records,
                storage.chunk_operator,
                storage.tail_filter(selection),
                on_unit=True,
            )
            async for batch in follow_log(
                self._db,
                self._notifier,
                spec,
                read,
                _position_of,
                after=after,
                streams=self._streams,
                committed_at=storage.first_commit_time,
                shared=shared,
                packs=_CHUNKS,
            ):
                audit.records += sum(chunk.records for chunk in batch.items)
                yield convert.stream_response(
                    [chunk.body for chunk in batch.items], encode_cursor(LOG, batch.position)
                )

    async def GetCallRecord(
        self, request: pb.GetCallRecordRequest, context: Context
    ) -> pb.GetCallRecordResponse:
        operator = current_operator()
        call_id = rules.require_call_id(request.call_id)
        with self._audit.read("GetCallRecord", {}) as audit:
            body = await self._db.run(storage.find_record, operator, call_id)
            if body is None:
                raise not_found(DOMAIN, "CALL_RECORD_NOT_FOUND", "no such call record")
            audit.records = 1
            return pb.GetCallRecordResponse(record=convert.record_out(body))

    async def GetQualitySummary(
        self, request: pb.GetQualitySummaryRequest, context: Context
    ) -> pb.GetQualitySummaryResponse:
        operator = current_operator()
        start, end = check_period(
            DOMAIN,
            request_time(request, "start_time", DOMAIN, "PERIOD_INVALID"),
            request_time(request, "end_time", DOMAIN, "PERIOD_INVALID"),
            rules.MAX_SUMMARY_PERIOD,
        )
        group_by = convert.GROUP_BY_IN.get(request.group_by)
        if group_by is None:
            raise invalid_field(DOMAIN, "GROUP_BY_INVALID", "group_by", "not a known grouping")
        settings = self._settings
        size = page_size(
            request.page_size, settings.default_page_size, settings.max_page_size, DOMAIN
        )
        query = rules.SummaryQuery(
            operator_id=operator,
            start=start,
            end=end,
            group_by=group_by,
            tenant_id=optional_tenant(request.tenant_id, DOMAIN),
            trunk_fqdn=rules.optional_trunk(request.trunk_fqdn),
            direction=convert.direction_in(request.direction),
        )
        if request.direction and query.direction is None:
            raise invalid_field(DOMAIN, "DIRECTION_INVALID", "direction", "not a known direction")
        binding = _summary_binding(query)
        after = None
        if request.page_token:
            (after,) = read_page_token(request.page_token, "records.summary", binding, 1, DOMAIN)
        filters = {
            "start_time": start.isoformat(),
            "end_time": end.isoformat(),
            "group_by": group_by.value,
            "tenant_id": query.tenant_id or "",
            "trunk_fqdn": query.trunk_fqdn or "",
            "direction": query.direction.value if query.direction else "",
        }
        with self._audit.read("GetQualitySummary", filters) as audit:
            groups = await self._db.run(storage.quality_summary, query, after, size + 1)
            page, more = groups[:size], len(groups) > size
            audit.records = sum(g.call_count for g in page)
            return pb.GetQualitySummaryResponse(
                groups=[convert.group_out(g) for g in page],
                next_page_token=page_token("records.summary", binding, [page[-1].key])
                if more
                else "",
            )


def _position_of(chunk: storage.Chunk) -> int:
    return chunk.position


_CHUNKS = Packs(storage.chunk_records, storage.last_commit_time, storage.commit_times)


def _stream_filters(
    selection: rules.StreamFilter, start: str | None, start_time: dt.datetime | None, follow: bool
) -> dict[str, str]:
    """What the audit log keeps of a stream's request (a phone number masked, as in logs)."""
    filters = {"start": start or "now", "follow": str(follow).lower()}
    if start_time is not None:
        filters["start_time"] = start_time.isoformat()
    if selection.end_time is not None:
        filters["end_time"] = selection.end_time.isoformat()
    if selection.tenant_id:
        filters["tenant_id"] = selection.tenant_id
    if selection.phone_number:
        filters["phone_number"] = mask_number(selection.phone_number)
    if selection.poor_only:
        filters["poor_quality_only"] = "true"
    return filters


class CallFeedService(pb_grpc.CallFeedServiceServicer):
    """Every operator's calls, for the platform's own systems (the usage service)."""

    def __init__(
        self, db: Database, notifier: Notifier, settings: Settings, streams: Streams
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._settings = settings
        self._streams = streams

    async def FollowCalls(
        self, request: pb.FollowCallsRequest, context: Context
    ) -> AsyncIterator[pb.FollowCallsResponse]:
        size = _batch_size(request.max_batch_size, self._settings)
        if request.cursor:
            after = decode_cursor(request.cursor, LOG, DOMAIN)
        elif request.from_oldest:
            after = await self._db.run(oldest_position, LOG)
        else:
            after = await start_position(self._db, LOG)
            yield pb.FollowCallsResponse(cursor=encode_cursor(LOG, after))
        spec = Follow(
            LOG,
            ANY_KEY,
            DOMAIN,
            size,
            self._settings.heartbeat_interval_s,
            kind="calls",
            operator=PLATFORM,
        )
        async for batch in follow_log(
            self._db,
            self._notifier,
            spec,
            storage.read_facts,
            _fact_position,
            after=after,
            streams=self._streams,
            committed_at=_fact_time,
            shared=Shared(storage.read_facts, _fact_operator, on_unit=True),
        ):
            yield pb.FollowCallsResponse(
                calls=[convert.fact_out(f) for f in batch.items],
                cursor=encode_cursor(LOG, batch.position),
            )


def _fact_operator(fact: rules.CallFact) -> str:
    return fact.operator_id


def _fact_position(fact: rules.CallFact) -> int:
    return fact.position


def _fact_time(fact: rules.CallFact) -> float:
    return fact.publish_time.timestamp()


class CallRecordIngestService(pb_grpc.CallRecordIngestServiceServicer):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        settings: Settings,
        known_operator: KnownOperator,
        metrics: Metrics,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._settings = settings
        self._known_operator = known_operator
        self._thresholds = rules.thresholds(settings)
        self._published = metrics.records_published
        # Batches of every stream ready at once commit together (plumbing.pipeline).
        self._groups = CommitGroups(
            self._store,
            _batch_records,
            settings.publish_group_max_records,
            metrics.commit_group_batches.labels(LOG).observe,
        )

    async def PublishCallRecords(
        self, requests: AsyncIterator[pb.PublishCallRecordsRequest], context: Context
    ) -> AsyncIterator[pb.PublishCallRecordsResponse]:
        # The next batches are read, checked and built while the one before commits; commits
        # and answers keep the batches' order (plumbing.pipeline).
        depth = self._settings.publish_pipeline_depth
        async for response in pipelined(requests, self._prepare, self._commit, depth):
            yield response

    async def _prepare(self, request: pb.PublishCallRecordsRequest) -> _Batch:
        """A batch read and checked, each record's rows built (or its refusal): no writes."""
        rules.check_batch_id(request.batch_id)
        if not request.records:
            raise invalid_field(DOMAIN, "BATCH_EMPTY", "records", "1 to 1,000 records")
        if len(request.records) > MAX_BATCH:
            raise invalid_field(
                DOMAIN, "BATCH_TOO_LARGE", "records", f"at most {MAX_BATCH:,} records"
            )
        # The request is ours: its records are cleaned in place and become the stored bodies,
        # their unknown fields dropped here at once (convert.published_in, owned).
        request.DiscardUnknownFields()
        operators = {r.operator_id for r in request.records}
        known = {o for o in operators if rules.OPERATOR_ID.fullmatch(o)}
        known = {o for o in known if await self._known_operator(o)}
        # Validation, classification and the rows are CPU work: off the event loop, so that
        # streams keep flowing while a large batch is checked.
        loop = asyncio.get_running_loop()
        prepared, staged = await loop.run_in_executor(
            None,
            _prepare_batch,
            list(request.records),
            known,
            self._settings,
            self._thresholds,
            self._db.is_sqlite,
        )
        return _Batch(request.batch_id, prepared, staged)

    async def _store(self, batches: list[storage.Staged]) -> list[storage.Stored]:
        """A group of batches stored in one transaction; live streams woken."""
        stored = await self._db.run(
            storage.publish_many,
            batches,
            convert.publish_time_field,
            convert.stored,
            write=True,
        )
        operators = set().union(*(s.operators for s in stored))
        if operators:
            self._notifier.publish(LOG, operators)
        return stored

    async def _commit(self, batch: _Batch) -> pb.PublishCallRecordsResponse:
        """The batch stored (with the other streams' batches ready then), and its answer."""
        stored = await self._groups.commit(batch.staged)
        accepted = iter(stored.results)
        results = [next(accepted) if isinstance(p, rules.Candidate) else p for p in batch.prepared]
        count_labels(
            self._published,
            ((r.outcome.value, r.refusal.reason if r.refusal else "") for r in results),
        )
        response = pb.PublishCallRecordsResponse(batch_id=batch.batch_id)
        convert.add_results(response, results)
        return response


@dataclass(frozen=True)
class _Batch:
    """A published batch, prepared: each record's candidate or refusal, the candidates' rows."""

    batch_id: str
    prepared: list[rules.Candidate | rules.Result]
    staged: storage.Staged


def _batch_records(staged: storage.Staged) -> int:
    return len(staged.candidates)


def _prepare_batch(
    messages: list[pb.PublishedCallRecord],
    known: set[str],
    settings: Settings,
    thresholds: Thresholds,
    sqlite: bool,
) -> tuple[list[rules.Candidate | rules.Result], storage.Staged]:
    prepared = convert.prepare(messages, known, settings, thresholds, owned=True)
    candidates = [c for c in prepared if isinstance(c, rules.Candidate)]
    return prepared, storage.stage(candidates, sqlite)


def _summary_binding(query: rules.SummaryQuery) -> str:
    """What a GetQualitySummary page token is bound to: the caller, period, grouping, filters."""
    return "|".join(
        (
            query.operator_id,
            query.start.isoformat(),
            query.end.isoformat(),
            query.group_by.value,
            query.tenant_id or "",
            query.trunk_fqdn or "",
            query.direction.value if query.direction else "",
        )
    )
