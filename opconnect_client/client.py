"""`Client`: every operator RPC of the platform, async and typed, on one channel.

Unary calls take and return the contract's messages (typed by their .pyi stubs) and raise a
`ServerError` with the server's status and details when they fail; the reads among them are
retried by gRPC itself on UNAVAILABLE (the channel's service config). Updates take the fields
to change as a list of paths (AIP-134's update mask). The streams that matter
for not losing data are resumable: `watch_assignments`, `watch_consents`, `follow_records` and
`stream_discrepancies` (checkpointed cursors, `streams`), and `submit_durations` (pipelined,
resent after a break, `durations`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from opconnect.numbers.v1 import civic_addresses_pb2 as addresses_pb
from opconnect.numbers.v1 import civic_addresses_pb2_grpc as addresses_grpc
from opconnect.numbers.v1 import consents_pb2 as consents_pb
from opconnect.numbers.v1 import consents_pb2_grpc as consents_grpc
from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.numbers.v1 import numbers_pb2_grpc as numbers_grpc
from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.records.v1 import records_pb2_grpc as records_grpc
from opconnect.type.v1 import assignment_state_pb2 as state_pb
from opconnect.usage.v1 import usage_pb2 as usage_pb
from opconnect.usage.v1 import usage_pb2_grpc as usage_grpc
from opconnect_client import durations, streams
from opconnect_client.checkpoints import Checkpoint, MemoryCheckpoint
from opconnect_client.connection import Connection
from opconnect_client.errors import server_error

R = TypeVar("R")


class _Page(Protocol):
    """A List RPC's response: its page, and the token of the next one ("" on the last)."""

    next_page_token: str


P = TypeVar("P", bound=_Page)
MAX_UPLOAD = 10_000  # numbers per UploadNumbers call
MAX_RELEASE = 10_000  # numbers per ReleaseNumbers call
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # "from the oldest record kept"


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp from an aware datetime (a naive one is refused: which zone would it be?)."""
    if value.tzinfo is None:
        raise ValueError("times must carry a time zone (datetime.UTC)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(dt.UTC))
    return stamp


async def _unary(call: Awaitable[R]) -> R:
    try:
        return await call
    except grpc.aio.AioRpcError as raised:
        raise server_error(raised) from None


class Client:
    """An operator's client of the platform. Use it as `async with Client(connection) as c:`
    (or call `close()`); one client holds one channel, shared by every call."""

    def __init__(self, connection: Connection, timeout_s: float = 30.0) -> None:
        self.connection = connection
        self.timeout_s = timeout_s  # of each unary call (streams have none)
        self.channel = connection.channel()
        self.numbers = numbers_grpc.NumberServiceStub(self.channel)
        self.consents = consents_grpc.ConsentServiceStub(self.channel)
        self.addresses = addresses_grpc.CivicAddressServiceStub(self.channel)
        self.records = records_grpc.CallRecordServiceStub(self.channel)
        self.usage = usage_grpc.UsageServiceStub(self.channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _pages(self, method: Callable[..., Awaitable[P]], request: Any) -> AsyncIterator[P]:
        """Every page a List RPC answers, from `request` (its first page) on, following
        `next_page_token` to the last page."""
        while True:
            page = await _unary(method(request, timeout=self.timeout_s))
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    # --- numbers ----------------------------------------------------------------------------

    async def upload_numbers(
        self, tenant_id: str, numbers: Sequence[numbers_pb.NumberUpload]
    ) -> numbers_pb.UploadNumbersResponse:
        """Upload numbers for a customer tenant, 10,000 a call; one result per number (in the
        order given) and the counts, summed over the calls."""
        total = numbers_pb.UploadNumbersResponse()
        for first in range(0, len(numbers), MAX_UPLOAD):
            request = numbers_pb.UploadNumbersRequest(
                tenant_id=tenant_id, numbers=numbers[first : first + MAX_UPLOAD]
            )
            answer = await _unary(self.numbers.UploadNumbers(request, timeout=self.timeout_s))
            total.results.extend(answer.results)
            total.added_count += answer.added_count
            total.already_present_count += answer.already_present_count
            total.refused_count += answer.refused_count
        return total

    async def release_numbers(
        self, phone_numbers: Sequence[str]
    ) -> numbers_pb.ReleaseNumbersResponse:
        """Release unassigned numbers, 10,000 a call; one result per number."""
        total = numbers_pb.ReleaseNumbersResponse()
        for first in range(0, len(phone_numbers), MAX_RELEASE):
            request = numbers_pb.ReleaseNumbersRequest(
                phone_numbers=phone_numbers[first : first + MAX_RELEASE]
            )
            answer = await _unary(self.numbers.ReleaseNumbers(request, timeout=self.timeout_s))
            total.results.extend(answer.results)
            total.released_count += answer.released_count
            total.refused_count += answer.refused_count
        return total

    async def get_number(self, phone_number: str) -> numbers_pb.PhoneNumber:
        request = numbers_pb.GetNumberRequest(phone_number=phone_number)
        answer: numbers_pb.GetNumberResponse = await _unary(
            self.numbers.GetNumber(request, timeout=self.timeout_s)
        )
        return answer.number

    def list_numbers(
        self,
        tenant_id: str = "",
        state: state_pb.AssignmentState.ValueType = state_pb.ASSIGNMENT_STATE_UNSPECIFIED,
        page_size: int = 1_000,
    ) -> AsyncIterator[numbers_pb.ListNumbersResponse]:
        """Every page of the operator's numbers (of a tenant, in a state); each page carries the
        `watch_cursor` of the listing (see `watch_assignments`, which does this for you)."""
        request = numbers_pb.ListNumbersRequest(
            page_size=page_size, tenant_id=tenant_id, state=state
        )
        return self._pages(self.numbers.ListNumbers, request)

    def watch_assignments(
        self,
        *,
        checkpoint: Checkpoint | None = None,
        tenant_id: str = "",
        list_first: bool = True,
        max_batch_size: int = 0,
    ) -> AsyncGenerator[streams.Batch[Any]]:
        """List-then-watch, resumable: batches of `AssignmentEvent`s in commit order, each
        batch's cursor saved in `checkpoint` once you ask for the next batch.

        With no cursor saved (a first run) and after CURSOR_EXPIRED, the numbers are listed
        first: batches with `listing=True` hold `PhoneNumber`s, the current state (their last
        page carries the cursor to watch from). `list_first=False` skips the first listing and
        watches from now. Runs until you stop iterating."""
        checkpoint = checkpoint if checkpoint is not None else MemoryCheckpoint()

        async def restart(expired: bool) -> AsyncGenerator[streams.Batch[Any]]:
            if not list_first and not expired:
                return
            pages = self.list_numbers(tenant_id)
            page = await anext(pages)
            while True:
                after = await anext(pages, None)
                cursor = page.watch_cursor if after is None else ""
                yield streams.Batch(list(page.numbers), cursor, listing=True)
                if after is None:
                    return
                page = after

        def open_call(cursor: str) -> Any:
            request = numbers_pb.WatchAssignmentsRequest(
                cursor=cursor, tenant_id=tenant_id, max_batch_size=max_batch_size
            )
            return self.numbers.WatchAssignments(request)

        return streams.follow(
            "WatchAssignments",
            open_call,
            lambda response: response.events,
            checkpoint,
            restart=restart,
        )

    async def update_number(
        self, number: numbers_pb.PhoneNumber, paths: Sequence[str]
    ) -> numbers_pb.PhoneNumber:
        """Change the fields of one of your numbers that `paths` names (any of
        `civic_address_id`, `location_id`, `allow_tenant_address_update`, `calling_profile_id`,
        `ticket_id`), to their values in `number` (its `phone_number` says which); the number
        after the change. An assigned number whose emergency location changes gets an UPDATED
        assignment event."""
        request = numbers_pb.UpdateNumberRequest(
            number=number, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        )
        answer: numbers_pb.UpdateNumberResponse = await _unary(
            self.numbers.UpdateNumber(request, timeout=self.timeout_s)
        )
        return answer.number

    # --- civic addresses --------------------------------------------------------------------

    async def create_civic_address(
        self, address: addresses_pb.CivicAddress, request_id: str = ""
    ) -> addresses_pb.CivicAddress:
        """Create a civic address for one of your customer tenants (under an ACTIVE consent),
        with its locations; the address with the ids the server gave. With a `request_id` (a
        UUID you chose), a retry answers the address the first call created."""
        request = addresses_pb.CreateCivicAddressRequest(
            civic_address=address, request_id=request_id
        )
        answer: addresses_pb.CreateCivicAddressResponse = await _unary(
            self.addresses.CreateCivicAddress(request, timeout=self.timeout_s)
        )
        return answer.civic_address

    async def get_civic_address(self, civic_address_id: str) -> addresses_pb.CivicAddress:
        request = addresses_pb.GetCivicAddressRequest(civic_address_id=civic_address_id)
        answer: addresses_pb.GetCivicAddressResponse = await _unary(
            self.addresses.GetCivicAddress(request, timeout=self.timeout_s)
        )
        return answer.civic_address

    def list_civic_addresses(
        self, tenant_id: str = "", page_size: int = 1_000
    ) -> AsyncIterator[addresses_pb.ListCivicAddressesResponse]:
        """Every page of your civic addresses (of a tenant), by tenant, then id."""
        request = addresses_pb.ListCivicAddressesRequest(page_size=page_size, tenant_id=tenant_id)
        return self._pages(self.addresses.ListCivicAddresses, request)

    async def update_civic_address(
        self, address: addresses_pb.CivicAddress, paths: Sequence[str]
    ) -> addresses_pb.CivicAddress:
        """Change the fields of an address (`address.civic_address_id`) that `paths` names to
        their values in `address` (`locations` replaces the list: keep a location by sending
        its `location_id`); the address after the change. Each assigned number that refers to
        it gets an UPDATED assignment event with its new emergency location."""
        request = addresses_pb.UpdateCivicAddressRequest(
            civic_address=address, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        )
        answer: addresses_pb.UpdateCivicAddressResponse = await _unary(
            self.addresses.UpdateCivicAddress(request, timeout=self.timeout_s)
        )
        return answer.civic_address

    async def delete_civic_address(self, civic_address_id: str) -> None:
        """Delete an address no number refers to (CIVIC_ADDRESS_IN_USE otherwise)."""
        request = addresses_pb.DeleteCivicAddressRequest(civic_address_id=civic_address_id)
        await _unary(self.addresses.DeleteCivicAddress(request, timeout=self.timeout_s))

    # --- consents ---------------------------------------------------------------------------

    def list_consents(
        self,
        state: consents_pb.ConsentState.ValueType = consents_pb.CONSENT_STATE_UNSPECIFIED,
        page_size: int = 1_000,
    ) -> AsyncIterator[consents_pb.ListConsentsResponse]:
        """Every page of the operator's consents (in a state), by tenant; each page carries the
        `watch_cursor` of the listing (see `watch_consents`, which does this for you)."""
        request = consents_pb.ListConsentsRequest(page_size=page_size, state=state)
        return self._pages(self.consents.ListConsents, request)

    async def get_consent(self, tenant_id: str) -> consents_pb.Consent:
        request = consents_pb.GetConsentRequest(tenant_id=tenant_id)
        answer: consents_pb.GetConsentResponse = await _unary(
            self.consents.GetConsent(request, timeout=self.timeout_s)
        )
        return answer.consent

    async def update_consent_status(
        self,
        tenant_id: str,
        state: consents_pb.ConsentState.ValueType,
        reason: consents_pb.ConsentReason.ValueType = consents_pb.CONSENT_REASON_UNSPECIFIED,
    ) -> consents_pb.Consent:
        """Move the consent with a tenant: ACTIVE (accept), DECLINED or TERMINATED (with a
        reason). Moving it to the state it is in changes nothing, so a retry is safe."""
        request = consents_pb.UpdateConsentStatusRequest(
            tenant_id=tenant_id, state=state, reason=reason
        )
        answer: consents_pb.UpdateConsentStatusResponse = await _unary(
            self.consents.UpdateConsentStatus(request, timeout=self.timeout_s)
        )
        return answer.consent

    def watch_consents(
        self,
        *,
        checkpoint: Checkpoint | None = None,
        list_first: bool = True,
        max_batch_size: int = 0,
    ) -> AsyncGenerator[streams.Batch[Any]]:
        """List-then-watch the operator's consents, resumable, as `watch_assignments` does:
        batches of `ConsentEvent`s in commit order, each batch's cursor saved in `checkpoint`
        once you ask for the next; with no cursor saved and after CURSOR_EXPIRED, batches with
        `listing=True` hold the `Consent`s as they are first."""
        checkpoint = checkpoint if checkpoint is not None else MemoryCheckpoint()

        async def restart(expired: bool) -> AsyncGenerator[streams.Batch[Any]]:
            if not list_first and not expired:
                return
            pages = self.list_consents()
            page = await anext(pages)
            while True:
                after = await anext(pages, None)
                cursor = page.watch_cursor if after is None else ""
                yield streams.Batch(list(page.consents), cursor, listing=True)
                if after is None:
                    return
                page = after

        def open_call(cursor: str) -> Any:
            request = consents_pb.WatchConsentsRequest(cursor=cursor, max_batch_size=max_batch_size)
            return self.consents.WatchConsents(request)

        return streams.follow(
            "WatchConsents",
            open_call,
            lambda response: response.events,
            checkpoint,
            restart=restart,
        )

    # --- call records -------------------------------------------------------------------------

    def follow_records(
        self,
        *,
        checkpoint: Checkpoint | None = None,
        start_time: dt.datetime | None = None,
        end_time: dt.datetime | None = None,
        follow: bool = True,
        tenant_id: str = "",
        phone_number: str = "",
        poor_quality_only: bool = False,
        max_batch_size: int = 0,
    ) -> AsyncGenerator[streams.Batch[records_pb.CallRecord]]:
        """The operator's call records in publish order, resumable: each batch's cursor saved in
        `checkpoint` once you ask for the next batch. With no cursor saved, from `start_time`
        (None: from now; `EPOCH`: from the oldest kept). After CURSOR_EXPIRED (the saved cursor
        is past the retention) it starts again from the oldest record kept, and that batch says
        `gap=True`. With `follow` it runs until you stop iterating (or past `end_time`);
        without, it ends once the records published so far (or before `end_time`) are sent."""
        checkpoint = checkpoint if checkpoint is not None else MemoryCheckpoint()
        state = {"expired": False}

        async def restart(expired: bool) -> AsyncGenerator[streams.Batch[records_pb.CallRecord]]:
            state["expired"] = expired
            return
            yield  # an async generator that yields nothing: the stream's request starts it

        def open_call(cursor: str) -> Any:
            request = records_pb.StreamCallRecordsRequest(
                follow=follow,
                tenant_id=tenant_id,
                phone_number=phone_number,
                poor_quality_only=poor_quality_only,
                max_batch_size=max_batch_size,
            )
            if cursor:
                request.cursor = cursor
            elif state["expired"]:
                request.start_time.CopyFrom(timestamp(EPOCH))
            elif start_time is not None:
                request.start_time.CopyFrom(timestamp(start_time))
            if end_time is not None:
                request.end_time.CopyFrom(timestamp(end_time))
            return self.records.StreamCallRecords(request)

        async def batches() -> AsyncGenerator[streams.Batch[records_pb.CallRecord]]:
            async for batch in streams.follow(
                "StreamCallRecords", open_call, lambda r: r.records, checkpoint, restart=restart
            ):
                gap, state["expired"] = state["expired"], False
                yield streams.Batch(batch.items, batch.cursor, gap=True) if gap else batch

        return batches()

    async def get_call_record(self, call_id: str) -> records_pb.CallRecord:
        request = records_pb.GetCallRecordRequest(call_id=call_id)
        answer: records_pb.GetCallRecordResponse = await _unary(
            self.records.GetCallRecord(request, timeout=self.timeout_s)
        )
        return answer.record

    async def get_quality_summary(
        self, request: records_pb.GetQualitySummaryRequest
    ) -> records_pb.GetQualitySummaryResponse:
        return await _unary(self.records.GetQualitySummary(request, timeout=self.timeout_s))

    # --- call durations, usage, reconciliation -------------------------------------------------

    def submit_durations(
        self,
        records: Iterable[usage_pb.CallDurationRecord] | AsyncIterable[usage_pb.CallDurationRecord],
        batch_size: int = durations.MAX_BATCH,
        max_unacknowledged: int = 4,
    ) -> AsyncGenerator[durations.Acknowledged]:
        """Submit call durations (see `durations.submit`): each batch yielded once committed,
        with one result per record; nothing lost or counted twice across broken streams."""
        return durations.submit(self.usage, records, batch_size, max_unacknowledged)

    async def get_usage_summary(
        self, request: usage_pb.GetUsageSummaryRequest
    ) -> usage_pb.GetUsageSummaryResponse:
        return await _unary(self.usage.GetUsageSummary(request, timeout=self.timeout_s))

    async def get_reconciliation(
        self, request: usage_pb.GetReconciliationRequest
    ) -> usage_pb.GetReconciliationResponse:
        return await _unary(self.usage.GetReconciliation(request, timeout=self.timeout_s))

    def stream_discrepancies(
        self, request: usage_pb.StreamDiscrepanciesRequest, checkpoint: Checkpoint | None = None
    ) -> AsyncGenerator[streams.Batch[usage_pb.Discrepancy]]:
        """The discrepancies of a period, resumable from `checkpoint` (the request's own cursor
        when the checkpoint holds none); ends when all are sent."""
        checkpoint = checkpoint if checkpoint is not None else MemoryCheckpoint(request.cursor)

        def open_call(cursor: str) -> Any:
            again = usage_pb.StreamDiscrepanciesRequest()
            again.CopyFrom(request)
            again.cursor = cursor
            return self.usage.StreamDiscrepancies(again)

        return streams.follow(
            "StreamDiscrepancies", open_call, lambda r: r.discrepancies, checkpoint
        )
