"""RPC handlers of `CivicAddressService` (operators) and `CivicAddressAdminService` (the admin
center).

Each handler validates its request (addresses.py), runs one unit of work (address_storage.py)
and converts the result (convert.py). A change is counted
(`opconnect_civic_address_changes_total`); an edit that changes assigned numbers' emergency
locations wakes their watchers after commit (`opconnect_emergency_location_updates_total`,
cause `address`). Every operator read of addresses is audited (plumbing.audit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

from opconnect.numbers.v1 import civic_addresses_pb2 as pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc as pb_grpc
from plumbing.audit import AuditLog
from plumbing.changelog import Notifier
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.errors import invalid_field
from plumbing.metrics import Metrics
from plumbing.rpc import current_operator
from plumbing.tokens import page_token, read_page_token
from plumbing.validation import GUID, optional_tenant, page_size
from services.numbers import address_storage, addresses, convert
from services.numbers.addresses import Author, CivicAddress
from services.numbers.consents import check_operator_id
from services.numbers.rules import DOMAIN, Event

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def require_request_id(value: str) -> str:
    """An AIP-155 request id: empty, or a UUID."""
    if value and GUID.fullmatch(value) is None:
        raise invalid_field(DOMAIN, "REQUEST_ID_INVALID", "request_id", "not a UUID")
    return value.lower()


class _Creates:
    """Creating an address, for either side: checked, stored, counted."""

    def __init__(self, db: Database, metrics: Metrics) -> None:
        self.db = db
        self.changes = metrics.civic_address_changes

    async def create(
        self, operator: str, message: pb.CivicAddress, author: Author, request_id: str
    ) -> CivicAddress:
        draft = addresses.check_address(convert.address_in(message))
        address, created = await self.db.run(
            address_storage.create_address,
            operator,
            draft,
            author,
            require_request_id(request_id),
            write=True,
        )
        if created:
            self.changes.labels(operator, "created").inc()
        return address


class CivicAddressService(pb_grpc.CivicAddressServiceServicer):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        settings: Settings,
        audit: AuditLog,
        *,
        metrics: Metrics,
        on_numbers_changed: Callable[[str, list[Event]], None],
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._settings = settings
        self._audit = audit
        self._creates = _Creates(db, metrics)
        self._changes = metrics.civic_address_changes
        self._updates = metrics.emergency_location_updates
        self._numbers_changed = on_numbers_changed

    async def CreateCivicAddress(
        self, request: pb.CreateCivicAddressRequest, context: Context
    ) -> pb.CreateCivicAddressResponse:
        address = await self._creates.create(
            current_operator(), request.civic_address, Author.OPERATOR, request.request_id
        )
        return pb.CreateCivicAddressResponse(civic_address=convert.address_out(address))

    async def GetCivicAddress(
        self, request: pb.GetCivicAddressRequest, context: Context
    ) -> pb.GetCivicAddressResponse:
        operator = current_operator()
        address_id = addresses.require_id(request.civic_address_id, "civic_address_id")
        with self._audit.read("GetCivicAddress", {}) as audit:
            found = await self._db.run(address_storage.get_address, operator, address_id)
            audit.records = 1
        return pb.GetCivicAddressResponse(civic_address=convert.address_out(found))

    async def ListCivicAddresses(
        self, request: pb.ListCivicAddressesRequest, context: Context
    ) -> pb.ListCivicAddressesResponse:
        operator = current_operator()
        settings = self._settings
        size = page_size(
            request.page_size, settings.default_page_size, settings.max_page_size, DOMAIN
        )
        tenant = optional_tenant(request.tenant_id, DOMAIN)
        filters = f"{operator}|{tenant or ''}"
        after = _read_page_token(request.page_token, filters) if request.page_token else None
        with self._audit.read("ListCivicAddresses", {"tenant_id": tenant or ""}) as audit:
            page = await self._db.run(
                functools.partial(
                    address_storage.list_addresses, tenant_id=tenant, after=after, limit=size
                ),
                operator,
            )
            audit.records = len(page.addresses)
        return pb.ListCivicAddressesResponse(
            civic_addresses=[convert.address_out(a) for a in page.addresses],
            next_page_token=page_token("addresses.list", filters, list(page.last))
            if page.last
            else "",
        )

    async def UpdateCivicAddress(
        self, request: pb.UpdateCivicAddressRequest, context: Context
    ) -> pb.UpdateCivicAddressResponse:
        operator = current_operator()
        change = convert.address_in(request.civic_address)
        address_id = addresses.require_id(change.id, "civic_address.civic_address_id")
        mask = addresses.check_mask(list(request.update_mask.paths))
        result = await self._db.run(
            address_storage.update_address, operator, address_id, change, mask, write=True
        )
        if result.changed:
            self._changes.labels(operator, "updated").inc()
            self._numbers_changed(operator, result.events)
            if result.events:
                self._updates.labels(operator, "address").inc(len(result.events))
        return pb.UpdateCivicAddressResponse(civic_address=convert.address_out(result.address))

    async def DeleteCivicAddress(
        self, request: pb.DeleteCivicAddressRequest, context: Context
    ) -> pb.DeleteCivicAddressResponse:
        operator = current_operator()
        address_id = addresses.require_id(request.civic_address_id, "civic_address_id")
        await self._db.run(address_storage.delete_address, operator, address_id, write=True)
        self._changes.labels(operator, "deleted").inc()
        return pb.DeleteCivicAddressResponse()


class CivicAddressAdminService(pb_grpc.CivicAddressAdminServiceServicer):
    def __init__(self, db: Database, metrics: Metrics) -> None:
        self._creates = _Creates(db, metrics)

    async def CreateCustomerCivicAddress(
        self, request: pb.CreateCustomerCivicAddressRequest, context: Context
    ) -> pb.CreateCustomerCivicAddressResponse:
        operator = check_operator_id(request.operator_id)
        address = await self._creates.create(
            operator, request.civic_address, Author.CUSTOMER, request.request_id
        )
        return pb.CreateCustomerCivicAddressResponse(civic_address=convert.address_out(address))


def _read_page_token(token: str, filters: str) -> tuple[str, str]:
    """(tenant, id) of the previous page's last address."""
    tenant, last = read_page_token(token, "addresses.list", filters, 2, DOMAIN)
    if not (GUID.fullmatch(tenant) and GUID.fullmatch(last)):
        raise invalid_field(DOMAIN, "PAGE_TOKEN_INVALID", "page_token", "not a page token")
    return tenant, last
