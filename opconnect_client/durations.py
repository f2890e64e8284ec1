"""`SubmitCallDurations` that never loses a record: batches pipelined with a bounded number
unacknowledged, and after a broken stream exactly the unacknowledged ones sent again.

The records of a batch are committed when the server acknowledges it, not before: a batch sent
on a stream that broke may or may not be stored. Sending it again is safe (a record already
stored answers DUPLICATE, never counted twice), so after any failure the library opens a new
stream and sends every unacknowledged batch again, in order, before any new one.

grpc/grpc#36066: when the server ends the stream while a write is pending, grpc.aio reports
`INTERNAL: Internal error from Core` instead of the server's status, which is lost. After such
a report the library opens the stream again and sends one batch alone, waiting for its
acknowledgement before the next write: with no write pending when the server answers, its real
status (an UNAVAILABLE with RetryInfo during an outage, an INVALID_ARGUMENT for a bad batch)
arrives intact, and is acted on or raised as a `ServerError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from dataclasses import dataclass, field

import grpc

from opconnect.usage.v1 import usage_pb2 as pb
from opconnect.usage.v1 import usage_pb2_grpc as pb_grpc
from opconnect_client.backoff import Backoff
from opconnect_client.errors import ClientError, lost_status, server_error

MAX_BATCH = 1_000  # the server's limit of records per batch
log = logging.getLogger("opconnect_client")


@dataclass(frozen=True)
class Acknowledged:
    """A batch the server committed: its records in the order sent, and one result each."""

    batch_id: str
    records: list[pb.CallDurationRecord]
    results: list[pb.CallDurationResult]
    accepted: int
    duplicate: int
    refused: int


@dataclass
class _Batch:
    id: str
    records: list[pb.CallDurationRecord]


async def _batches(
    records: Iterable[pb.CallDurationRecord] | AsyncIterable[pb.CallDurationRecord],
    size: int,
) -> AsyncIterator[_Batch]:
    prefix = uuid.uuid4().hex[:12]  # batch ids unique to this submission
    numbers = itertools.count(1)
    current: list[pb.CallDurationRecord] = []
    if isinstance(records, AsyncIterable):
        async for record in records:
            current.append(record)
            if len(current) == size:
                yield _Batch(f"{prefix}-{next(numbers)}", current)
                current = []
    else:
        for record in records:
            current.append(record)
            if len(current) == size:
                yield _Batch(f"{prefix}-{next(numbers)}", current)
                current = []
    if current:
        yield _Batch(f"{prefix}-{next(numbers)}", current)


class _Stream:
    """One SubmitCallDurations call: it sends the unacknowledged batches again, then new ones
    from the source, never more than `limit` unacknowledged."""

    def __init__(self, stub: pb_grpc.UsageServiceStub, limit: int) -> None:
        self.call = stub.SubmitCallDurations()
        self.limit = limit
        self.sent = 0
        self.acknowledged = 0
        self.window = asyncio.Condition()

    def room(self) -> bool:
        return self.sent - self.acknowledged < self.limit

    async def send(self, batch: _Batch) -> None:
        async with self.window:
            await self.window.wait_for(self.room)
        request = pb.SubmitCallDurationsRequest(batch_id=batch.id, records=batch.records)
        await self.call.write(request)
        self.sent += 1

    async def write(self, submission: _Submission) -> None:
        for batch in list(submission.pending):
            await self.send(batch)
        while not submission.exhausted:
            async with self.window:
                await self.window.wait_for(self.room)
            try:
                batch = await anext(submission.source)
            except StopAsyncIteration:
                submission.exhausted = True
                break
            submission.pending.append(batch)
            await self.send(batch)
        await self.call.done_writing()

    async def acknowledge(self) -> None:
        async with self.window:
            self.acknowledged += 1
            self.window.notify_all()


@dataclass
class _Submission:
    source: AsyncIterator[_Batch]
    pending: deque[_Batch] = field(default_factory=deque)  # sent, not acknowledged, in order
    exhausted: bool = False


async def submit(
    stub: pb_grpc.UsageServiceStub,
    records: Iterable[pb.CallDurationRecord] | AsyncIterable[pb.CallDurationRecord],
    batch_size: int = MAX_BATCH,
    max_unacknowledged: int = 4,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[Acknowledged]:
    """Send `records` in batches of `batch_size`, at most `max_unacknowledged` batches sent and
    not yet acknowledged; yield each batch as it is acknowledged, in order. Retryable failures
    (the server or the way to it unavailable, a limit with RetryInfo) are waited out and the
    unacknowledged batches sent again; any other failure is raised as a `ServerError`."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise ClientError(f"batch_size must be 1 to {MAX_BATCH}")
    if max_unacknowledged < 1:
        raise ClientError("max_unacknowledged must be at least 1")
    submission = _Submission(_batches(records, batch_size).__aiter__())
    alone = False  # after a lost status: the next stream sends one batch, then waits
    backoff = Backoff()
    failed_at: float | None = None
    while submission.pending or not submission.exhausted:
        stream = _Stream(stub, 1 if alone else max_unacknowledged)
        writer = asyncio.create_task(stream.write(submission))
        try:
            while True:
                response = await stream.call.read()
                if response is grpc.aio.EOF:
                    break
                pending = submission.pending
                if not pending or response.batch_id != pending[0].id:
                    raise ClientError(f"acknowledgement of an unknown batch {response.batch_id!r}")
                batch = pending.popleft()
                if failed_at is not None:
                    log.info("call durations resumed after %.1f s", time.monotonic() - failed_at)
                    failed_at = None
                alone = False
                stream.limit = max_unacknowledged  # the status came through: pipeline again
                backoff.reset()
                await stream.acknowledge()
                yield Acknowledged(
                    batch.id,
                    batch.records,
                    list(response.results),
                    response.accepted_count,
                    response.duplicate_count,
                    response.refused_count,
                )
            await writer  # raises what the writer met, if anything
            if submission.pending:  # ended with OK before answering every batch: a bug
                raise ClientError("the stream ended with batches unacknowledged")
            return
        except grpc.aio.AioRpcError as raised:
            error = server_error(raised)
            if lost_status(raised):
                alone = True  # grpc/grpc#36066: learn the real status with nothing pending
            elif not error.retryable:
                raise error from None
            delay = backoff.delay(None if alone else error)
            failed_at = failed_at if failed_at is not None else time.monotonic()
            log.warning(
                "call durations interrupted (%s), %d batches unacknowledged; again in %.1f s",
                "status lost to grpc/grpc#36066" if alone else error,
                len(submission.pending),
                delay,
            )
            await sleep(delay)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            stream.call.cancel()
