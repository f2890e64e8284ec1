"""RPC handlers of `NumberService` (operators) and `NumberAdminService` (the admin center).

Each handler validates its request (rules.py), runs one unit of work (storage.py) and converts
the result (convert.py). The caller's identity comes from the gateway (plumbing.rpc), never from a
request field.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1 import numbers_pb2_grpc as pb_grpc
from plumbing.cache import MISSING, ReadCache
from plumbing.changelog import (
    Follow,
    Notifier,
    Shared,
    Streams,
    decode_cursor,
    encode_cursor,
    follow_log,
    start_position,
)
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.errors import invalid_field, not_found
from plumbing.metrics import Metrics
from plumbing.rpc import current_operator
from plumbing.tokens import page_token, read_page_token
from plumbing.validation import E164, batch_size, optional_tenant, page_size
from services.numbers import address_storage, addresses, convert, rules, storage
from services.numbers.rules import DOMAIN, LOG, Number, Outcome

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class NumberService(pb_grpc.NumberServiceServicer):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        settings: Settings,
        cache: ReadCache[Number | None],
        *,
        streams: Streams,
        metrics: Metrics,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._settings = settings
        self._cache = cache
        self._streams = streams
        self._changes = metrics.numbers_changed
        self._updates = metrics.emergency_location_updates

    def _changed(self, operator_id: str) -> None:
        """After a commit that changed the operator's numbers: caches forget, watchers wake."""
        self._cache.invalidate([operator_id])
        self._notifier.publish(LOG, [operator_id])

    async def UploadNumbers(
        self, request: pb.UploadNumbersRequest, context: Context
    ) -> pb.UploadNumbersResponse:
        operator = current_operator()
        tenant = rules.normalize_tenant(request.tenant_id)
        rules.check_batch(len(request.numbers), self._settings.max_upload_numbers, "numbers")
        uploads = [convert.upload_in(m) for m in request.numbers]
        seen: set[str] = set()
        checks = [rules.check_upload(u, seen) for u in uploads]
        valid = [u for u, refusal in zip(uploads, checks, strict=True) if refusal is None]
        stored = await self._db.run(
            address_storage.upload_numbers, operator, tenant, valid, write=True
        )
        self._changed(operator)
        results = [r or stored[u.phone_number] for u, r in zip(uploads, checks, strict=True)]
        self._changes.labels(operator, "uploaded").inc(_done(results))
        return pb.UploadNumbersResponse(
            results=[convert.result_out(r) for r in results],
            added_count=sum(r.outcome is Outcome.DONE for r in results),
            already_present_count=sum(r.outcome is Outcome.ALREADY_PRESENT for r in results),
            refused_count=sum(r.outcome is Outcome.REFUSED for r in results),
        )

    async def UpdateNumber(
        self, request: pb.UpdateNumberRequest, context: Context
    ) -> pb.UpdateNumberResponse:
        operator = current_operator()
        number = rules.require_number(request.number.phone_number, "number.phone_number")
        mask = rules.check_number_mask(list(request.update_mask.paths))
        values = address_storage.NumberFields(
            calling_profile_id=request.number.calling_profile_id.lower(),
            civic_address_id=request.number.civic_address_id.lower(),
            location_id=request.number.location_id.lower(),
            allow_tenant_address_update=request.number.allow_tenant_address_update,
            ticket_id=request.number.ticket_id,
        )
        change = await self._db.run(
            address_storage.update_number, operator, number, values, mask, write=True
        )
        self._changed(operator)
        if change.event is not None:
            self._changes.labels(operator, "updated").inc()
            self._updates.labels(operator, "number").inc()
        return pb.UpdateNumberResponse(number=convert.number_out(change.number))

    async def ReleaseNumbers(
        self, request: pb.ReleaseNumbersRequest, context: Context
    ) -> pb.ReleaseNumbersResponse:
        operator = current_operator()
        numbers = list(request.phone_numbers)
        rules.check_batch(len(numbers), self._settings.max_upload_numbers, "phone_numbers")
        seen: set[str] = set()
        checks = [rules.check_release(n, seen) for n in numbers]
        valid = [n for n, refusal in zip(numbers, checks, strict=True) if refusal is None]
        stored = await self._db.run(storage.release_numbers, operator, valid, write=True)
        self._changed(operator)
        results = [r or stored[n] for n, r in zip(numbers, checks, strict=True)]
        self._changes.labels(operator, "released").inc(_done(results))
        return pb.ReleaseNumbersResponse(
            results=[convert.result_out(r) for r in results],
            released_count=sum(r.outcome is Outcome.DONE for r in results),
            refused_count=sum(r.outcome is Outcome.REFUSED for r in results),
        )

    async def ListNumbers(
        self, request: pb.ListNumbersRequest, context: Context
    ) -> pb.ListNumbersResponse:
        operator = current_operator()
        settings = self._settings
        size = page_size(
            request.page_size, settings.default_page_size, settings.max_page_size, DOMAIN
        )
        tenant = optional_tenant(request.tenant_id, DOMAIN)
        state = convert.state_in(request.state)
        filters = f"{operator}|{tenant or ''}|{state or ''}"
        after, watch = "", None
        if request.page_token:
            after, watch = _read_page_token(request.page_token, filters)
        page = await self._db.run(
            functools.partial(
                storage.list_numbers,
                operator_id=operator,
                tenant_id=tenant,
                state=state,
                after=after,
                limit=size,
                watch_position=watch,
            )
        )
        return pb.ListNumbersResponse(
            numbers=[convert.number_out(n) for n in page.numbers],
            next_page_token=page_token(
                "numbers.list", filters, [str(page.watch_position), page.last]
            )
            if page.last
            else "",
            watch_cursor=encode_cursor(LOG, page.watch_position),
        )

    async def GetNumber(
        self, request: pb.GetNumberRequest, context: Context
    ) -> pb.GetNumberResponse:
        operator = current_operator()
        number = rules.require_number(request.phone_number)
        found = self._cache.get(operator, number)
        if found is MISSING:
            generation = self._cache.generation(operator)
            fresh = await self._db.run(storage.find_number, operator, number)
            self._cache.fill(operator, number, fresh, generation)
            found = fresh
        if not isinstance(found, Number):
            raise not_found(DOMAIN, "NUMBER_NOT_FOUND", "no such number")
        return pb.GetNumberResponse(number=convert.number_out(found))

    async def WatchAssignments(
        self, request: pb.WatchAssignmentsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAssignmentsResponse]:
        operator = current_operator()
        tenant = optional_tenant(request.tenant_id, DOMAIN)
        # Watch batches are at most `stream_batch_size` (events are small; no larger ask).
        batch = batch_size(
            request.max_batch_size,
            self._settings.stream_batch_size,
            self._settings.stream_batch_size,
            DOMAIN,
        )
        if request.cursor:
            after = decode_cursor(request.cursor, LOG, DOMAIN)
        else:
            after = await start_position(self._db, LOG)
            # Starting from now: say where "now" is at once, so the client can resume from it.
            yield pb.WatchAssignmentsResponse(cursor=encode_cursor(LOG, after))
        spec = Follow(
            LOG,
            operator,
            DOMAIN,
            batch,
            self._settings.heartbeat_interval_s,
            kind="assignments",
            operator=operator,
        )
        read = functools.partial(storage.read_events, operator_id=operator, tenant_id=tenant)
        # Caught up, it is served from the shared tail (its operator's events), its tenant kept.
        shared = Shared(
            storage.read_log_events,
            _event_operator,
            None if tenant is None else functools.partial(_of_tenant, tenant),
        )
        async for found in follow_log(
            self._db,
            self._notifier,
            spec,
            read,
            _event_position,
            after=after,
            streams=self._streams,
            committed_at=_event_time,
            shared=shared,
        ):
            yield pb.WatchAssignmentsResponse(
                events=[convert.event_out(e, encode_cursor(LOG, e.position)) for e in found.items],
                cursor=encode_cursor(LOG, found.position),
            )


def _done(results: list[rules.Result]) -> int:
    """How many numbers an upload or release changed (not those already present or refused)."""
    return sum(r.outcome is Outcome.DONE for r in results)


def _of_tenant(tenant: str, event: rules.Event) -> bool:
    return event.tenant_id == tenant


def _event_operator(event: rules.Event) -> str:
    return event.operator_id


def _event_position(event: rules.Event) -> int:
    return event.position


def _event_time(event: rules.Event) -> float:
    """When the change was committed: its event time, taken in the committing transaction."""
    return event.occurred_at.timestamp()


class NumberAdminService(pb_grpc.NumberAdminServiceServicer):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        cache: ReadCache[Number | None],
        metrics: Metrics,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._cache = cache
        self._changes = metrics.numbers_changed
        self._updates = metrics.emergency_location_updates

    def _changed(self, change: storage.Change) -> None:
        """After an assignment's commit: counted, caches forget, watchers wake (no-op: none)."""
        if change.event is not None:
            operator = change.number.operator_id
            self._changes.labels(operator, change.event.type.value).inc()
            self._cache.invalidate([operator])
            self._notifier.publish(LOG, [operator], change.event.position)

    async def AssignNumber(
        self, request: pb.AssignNumberRequest, context: Context
    ) -> pb.AssignNumberResponse:
        assignment = rules.check_assignment(
            request.phone_number, request.tenant_id, request.sip_uri, convert.target_in(request)
        )
        change = await self._db.run_unit(storage.assign_number, assignment, write=True)
        self._changed(change)
        return pb.AssignNumberResponse(number=convert.number_out(change.number))

    async def UnassignNumber(
        self, request: pb.UnassignNumberRequest, context: Context
    ) -> pb.UnassignNumberResponse:
        number = rules.require_number(request.phone_number)
        tenant = rules.normalize_tenant(request.tenant_id)
        change = await self._db.run_unit(storage.unassign_number, number, tenant, write=True)
        self._changed(change)
        return pb.UnassignNumberResponse(number=convert.number_out(change.number))

    async def UpdateNumberEmergencyAddress(
        self, request: pb.UpdateNumberEmergencyAddressRequest, context: Context
    ) -> pb.UpdateNumberEmergencyAddressResponse:
        number = rules.require_number(request.phone_number)
        tenant = rules.normalize_tenant(request.tenant_id)
        address_id = location_id = ""
        if request.civic_address_id:
            address_id = addresses.require_id(request.civic_address_id, "civic_address_id")
        if request.location_id:
            location_id = addresses.require_id(
                request.location_id, "location_id", "LOCATION_ID_INVALID"
            )
            if not address_id:
                raise invalid_field(
                    DOMAIN, "LOCATION_ID_INVALID", "location_id", "a location needs an address"
                )
        change = await self._db.run(
            address_storage.set_emergency_address,
            number,
            tenant,
            address_id,
            location_id,
            write=True,
        )
        operator = change.number.operator_id
        self._cache.invalidate([operator])
        self._changed(change)
        if change.event is not None:
            self._updates.labels(operator, "customer").inc()
        return pb.UpdateNumberEmergencyAddressResponse(number=convert.number_out(change.number))


def _read_page_token(token: str, filters: str) -> tuple[str, int]:
    """(last number of the previous page, the listing's watch position)."""
    watch, last = read_page_token(token, "numbers.list", filters, 2, DOMAIN)
    if not (watch.isdigit() and E164.fullmatch(last)):
        raise invalid_field(DOMAIN, "PAGE_TOKEN_INVALID", "page_token", "not a page token")
    return last, int(watch)
