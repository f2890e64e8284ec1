"""Batches on a bidirectional stream that never lose one: pipelined with a bounded number
unacknowledged, and after a broken stream exactly the unacknowledged ones sent again.

The contract's write streams (`SubmitCallDurations` for operators, `PublishCallRecords` for the
platform's call controller) answer each batch once, after it is committed, with its `batch_id`,
in order. A batch sent on a stream that broke may or may not be stored; sending it again is
safe (a record already stored answers DUPLICATE), so after any failure a new stream is opened
and every unacknowledged batch is sent again, in order, before any new one.

grpc/grpc#36066: when the server ends the stream while a write is pending, grpc.aio reports
`INTERNAL: Internal error from Core` instead of the server's status, which is lost. After such
a report the stream is opened again and one batch is sent alone, its acknowledgement awaited
before the next write: with no write pending when the server answers, its real status (an
UNAVAILABLE with RetryInfo during an outage, a PERMISSION_DENIED, ...) arrives intact, and is
waited out or raised as a `ServerError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from opconnect_client.backoff import Backoff
from opconnect_client.errors import ClientError, lost_status, server_error

log = logging.getLogger("opconnect_client")
Item = TypeVar("Item")


@dataclass(frozen=True)
class Batch(Generic[Item]):
    """A batch to send: its id, the request that carries it, and its items (to hand back with
    the acknowledgement)."""

    id: str
    request: Any
    items: list[Item]


class _Stream:
    """One call: it sends the unacknowledged batches again, then new ones from the source,
    never more than `limit` unacknowledged."""

    def __init__(self, call: Any, limit: int) -> None:
        self.call = call
        self.limit = limit
        self.sent = 0
        self.acknowledged = 0
        self.window = asyncio.Condition()

    def room(self) -> bool:
        return self.sent - self.acknowledged < self.limit

    async def send(self, batch: Batch[Any]) -> None:
        async with self.window:
            await self.window.wait_for(self.room)
        await self.call.write(batch.request)
        self.sent += 1

    async def write(self, state: _State[Any]) -> None:
        for batch in list(state.pending):
            await self.send(batch)
        while not state.exhausted:
            async with self.window:
                await self.window.wait_for(self.room)
            try:
                batch = await anext(state.source)
            except StopAsyncIteration:
                state.exhausted = True
                break
            state.pending.append(batch)
            await self.send(batch)
        await self.call.done_writing()

    async def acknowledge(self, limit: int) -> None:
        async with self.window:
            self.acknowledged += 1
            self.limit = limit
            self.window.notify_all()


@dataclass
class _State(Generic[Item]):
    source: AsyncIterator[Batch[Item]]
    pending: deque[Batch[Item]] = field(default_factory=deque)  # sent, not acknowledged
    exhausted: bool = False


async def pipelined(
    name: str,
    open_call: Callable[[], Any],
    source: AsyncIterator[Batch[Item]],
    max_unacknowledged: int = 4,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[tuple[Batch[Item], Any]]:
    """Send the batches of `source` on streams opened by `open_call` (a new one after each
    failure), at most `max_unacknowledged` sent and not yet acknowledged; yield each batch with
    its response as it is acknowledged, in order. Retryable failures (the server or the way to
    it unavailable, a limit with RetryInfo) are waited out and the unacknowledged batches sent
    again; any other failure is raised as a `ServerError`."""
    if max_unacknowledged < 1:
        raise ClientError("max_unacknowledged must be at least 1")
    state: _State[Item] = _State(source)
    alone = False  # after a lost status: the next stream sends one batch, then waits
    backoff = Backoff()
    failed_at: float | None = None
    while state.pending or not state.exhausted:
        stream = _Stream(open_call(), 1 if alone else max_unacknowledged)
        writer = asyncio.create_task(stream.write(state))
        try:
            while True:
                response = await stream.call.read()
                if response is grpc.aio.EOF:
                    break
                if not state.pending or response.batch_id != state.pending[0].id:
                    raise ClientError(f"acknowledgement of an unknown batch {response.batch_id!r}")
                batch = state.pending.popleft()
                if failed_at is not None:
                    log.info("%s resumed after %.1f s", name, time.monotonic() - failed_at)
                    failed_at = None
                alone = False  # the status comes through: pipeline again
                backoff.reset()
                await stream.acknowledge(max_unacknowledged)
                yield batch, response
            await writer  # raises what the writer met, if anything
            if state.pending:  # ended with OK before answering every batch: a server bug
                raise ClientError(f"{name} ended with batches unacknowledged")
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
                "%s interrupted (%s), %d batches unacknowledged; again in %.1f s",
                name,
                "status lost to grpc/grpc#36066" if alone else error,
                len(state.pending),
                delay,
            )
            await sleep(delay)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            stream.call.cancel()
