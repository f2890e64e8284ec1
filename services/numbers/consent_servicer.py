"""RPC handlers of `ConsentService` (operators) and `ConsentAdminService` (the admin center).

Each handler validates its request (consents.py, rules.py), runs one unit of work
(consent_storage.py) and converts the result (convert.py). A consent change is counted
(`opconnect_consent_transitions_total`) and wakes the operator's consent watchers after commit.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from opconnect.numbers.v1 import consents_pb2 as pb
from opconnect.numbers.v1 import consents_pb2_grpc as pb_grpc
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
from plumbing.validation import GUID, batch_size, page_size
from services.numbers import consent_storage, convert, rules
from services.numbers.consents import (
    LOG,
    Actor,
    ConsentEvent,
    ConsentState,
    Move,
    Reason,
    check_operator_id,
    check_operator_move,
)
from services.numbers.rules import DOMAIN

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class _Moves:
    """What every consent change does after its commit: counted, watchers woken."""

    def __init__(self, db: Database, notifier: Notifier, metrics: Metrics) -> None:
        self.db = db
        self._notifier = notifier
        self._transitions = metrics.consent_transitions

    async def move(
        self, operator: str, tenant: str, move: Move, *, create: bool = False
    ) -> consent_storage.Change:
        change = await self.db.run(
            functools.partial(consent_storage.move_consent, create=create),
            operator,
            tenant,
            move,
            write=True,
        )
        if change.event is not None:
            previous = change.event.previous
            self._transitions.labels(
                operator, previous.value if previous is not None else "none", move.state.value
            ).inc()
            self._notifier.publish(LOG, [operator])
        return change


class ConsentService(pb_grpc.ConsentServiceServicer):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        settings: Settings,
        *,
        streams: Streams,
        metrics: Metrics,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._settings = settings
        self._streams = streams
        self._moves = _Moves(db, notifier, metrics)

    async def ListConsents(
        self, request: pb.ListConsentsRequest, context: Context
    ) -> pb.ListConsentsResponse:
        operator = current_operator()
        settings = self._settings
        size = page_size(
            request.page_size, settings.default_page_size, settings.max_page_size, DOMAIN
        )
        state = convert.consent_state_in(request.state)
        filters = f"{operator}|{state or ''}"
        after, watch = "", None
        if request.page_token:
            after, watch = _read_page_token(request.page_token, filters)
        page = await self._db.run(
            functools.partial(
                consent_storage.list_consents,
                state=state,
                after=after,
                limit=size,
                watch_position=watch,
            ),
            operator,
        )
        return pb.ListConsentsResponse(
            consents=[convert.consent_out(c) for c in page.consents],
            next_page_token=page_token(
                "consents.list", filters, [str(page.watch_position), page.last]
            )
            if page.last
            else "",
            watch_cursor=encode_cursor(LOG, page.watch_position),
        )

    async def GetConsent(
        self, request: pb.GetConsentRequest, context: Context
    ) -> pb.GetConsentResponse:
        operator = current_operator()
        tenant = rules.normalize_tenant(request.tenant_id)
        found = await self._db.run(consent_storage.find_consent, operator, tenant)
        if found is None:
            raise not_found(DOMAIN, "CONSENT_NOT_FOUND", "no consent with this tenant")
        return pb.GetConsentResponse(consent=convert.consent_out(found))

    async def UpdateConsentStatus(
        self, request: pb.UpdateConsentStatusRequest, context: Context
    ) -> pb.UpdateConsentStatusResponse:
        operator = current_operator()
        tenant = rules.normalize_tenant(request.tenant_id)
        reason = convert.reason_in(request.reason)
        if reason is None:
            raise invalid_field(DOMAIN, "REASON_INVALID", "reason", "not a known reason")
        move = check_operator_move(convert.consent_state_in(request.state), reason)
        change = await self._moves.move(operator, tenant, move)
        return pb.UpdateConsentStatusResponse(consent=convert.consent_out(change.consent))

    async def WatchConsents(
        self, request: pb.WatchConsentsRequest, context: Context
    ) -> AsyncIterator[pb.WatchConsentsResponse]:
        operator = current_operator()
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
            yield pb.WatchConsentsResponse(cursor=encode_cursor(LOG, after))
        spec = Follow(
            LOG,
            operator,
            DOMAIN,
            batch,
            self._settings.heartbeat_interval_s,
            kind="consents",
            operator=operator,
        )
        read = functools.partial(consent_storage.read_events, operator_id=operator)
        async for found in follow_log(
            self._db,
            self._notifier,
            spec,
            read,
            _position,
            after=after,
            streams=self._streams,
            committed_at=_time,
            shared=Shared(consent_storage.read_log_events, _operator),
        ):
            yield pb.WatchConsentsResponse(
                events=[
                    convert.consent_event_out(e, encode_cursor(LOG, e.position))
                    for e in found.items
                ],
                cursor=encode_cursor(LOG, found.position),
            )


def _operator(event: ConsentEvent) -> str:
    return event.consent.operator_id


def _position(event: ConsentEvent) -> int:
    return event.position


def _time(event: ConsentEvent) -> float:
    """When the change was committed: its event time, taken in the committing transaction."""
    return event.occurred_at.timestamp()


class ConsentAdminService(pb_grpc.ConsentAdminServiceServicer):
    def __init__(self, db: Database, notifier: Notifier, metrics: Metrics) -> None:
        self._moves = _Moves(db, notifier, metrics)

    async def CreateConsent(
        self, request: pb.CreateConsentRequest, context: Context
    ) -> pb.CreateConsentResponse:
        tenant = rules.normalize_tenant(request.tenant_id)
        operator = check_operator_id(request.operator_id)
        move = Move(ConsentState.REQUESTED, Reason.NONE, Actor.CUSTOMER)
        change = await self._moves.move(operator, tenant, move, create=True)
        return pb.CreateConsentResponse(consent=convert.consent_out(change.consent))

    async def WithdrawConsent(
        self, request: pb.WithdrawConsentRequest, context: Context
    ) -> pb.WithdrawConsentResponse:
        tenant = rules.normalize_tenant(request.tenant_id)
        operator = check_operator_id(request.operator_id)
        move = Move(ConsentState.WITHDRAWN, Reason.NONE, Actor.CUSTOMER)
        change = await self._moves.move(operator, tenant, move)
        return pb.WithdrawConsentResponse(consent=convert.consent_out(change.consent))


def _read_page_token(token: str, filters: str) -> tuple[str, int]:
    """(last tenant of the previous page, the listing's watch position)."""
    watch, last = read_page_token(token, "consents.list", filters, 2, DOMAIN)
    if not (watch.isdigit() and GUID.fullmatch(last)):
        raise invalid_field(DOMAIN, "PAGE_TOKEN_INVALID", "page_token", "not a page token")
    return last, int(watch)
