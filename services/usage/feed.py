"""The usage service's copy of the platform's side of every call.

Usage shows a call's platform duration where the operator reported none, and reconciliation
compares the two; the usage service learns the platform's calls from the records service's own
API, never from its tables: it follows `CallFeedService.FollowCalls` over gRPC as a platform
principal, and keeps each call with the feed's cursor in one transaction, so that after any
restart or broken stream it resumes exactly after what it kept. A cursor past the records'
retention (CURSOR_EXPIRED), or one no longer readable (CURSOR_INVALID: sealed with a token key
since removed), starts it again from the oldest record kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry.trace import Tracer

from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.records.v1 import records_pb2_grpc as records_grpc
from plumbing.balancing import balanced
from plumbing.changelog import decode_cursor
from plumbing.db import Database
from plumbing.direction import DIRECTION_IN
from plumbing.errors import ApiError
from plumbing.logs import get_logger
from plumbing.metrics import Metrics
from plumbing.tracing import client_call
from plumbing.wellknown import time_in
from services.usage import platform_calls
from services.usage.rules import PlatformCall

FEED = "records"  # the name the cursor is saved under
FOLLOW_CALLS = "/opconnect.records.v1.CallFeedService/FollowCalls"
RECORDS_LOG = "records"  # the change log the feed's cursors name (the records service's)
log = get_logger("opconnect.usage.feed")


@dataclass(frozen=True)
class FeedClient:
    """Where the feed is served and how to authenticate as a platform principal there."""

    target: str  # one records process, or several (plumbing.balancing)
    credentials: grpc.ChannelCredentials
    server_name: str = ""  # the name checked in the records processes' certificates


_END = object()
AHEAD = 16  # responses the feed reads ahead of the unit storing (each up to batch_size calls)


async def grouped(
    responses: AsyncIterator[records_pb.FollowCallsResponse], most_calls: int
) -> AsyncGenerator[list[records_pb.FollowCallsResponse], None]:
    """The responses in groups, in order: each group is the responses that arrived while the
    group before was being handled (at least one), as long as their calls number `most_calls`
    at most. At most AHEAD responses wait (memory stays bounded: gRPC's flow control holds the
    sender back). A failure of the stream is raised after the groups read before it."""
    pending: collections.deque[records_pb.FollowCallsResponse | Exception | object] = (
        collections.deque()
    )
    arrived = asyncio.Event()
    room = asyncio.Semaphore(AHEAD)

    async def read() -> None:
        try:
            async for response in responses:
                pending.append(response)
                arrived.set()
                await room.acquire()
        except Exception as error:  # in its turn, after what was read before
            pending.append(error)
        else:
            pending.append(_END)
        arrived.set()

    reader = asyncio.create_task(read(), name="usage-call-feed-read")
    try:
        while True:
            while not pending:
                arrived.clear()
                await arrived.wait()
            group: list[records_pb.FollowCallsResponse] = []
            calls = 0
            while pending:
                item = pending[0]
                if item is _END or isinstance(item, Exception):
                    if group:
                        yield group
                    if isinstance(item, Exception):
                        raise item
                    return
                assert isinstance(item, records_pb.FollowCallsResponse)
                if group and calls + len(item.calls) > most_calls:
                    break
                pending.popleft()
                room.release()
                group.append(item)
                calls += len(item.calls)
            yield group
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def call_in(fact: records_pb.CallFact) -> PlatformCall:
    """A call of the feed (as `Timestamp.ToDatetime` and `Duration.ToMilliseconds` read it, at a
    third of their cost: one call per published record)."""
    direction = DIRECTION_IN.get(fact.direction)
    duration = fact.duration
    nanos = duration.nanos
    return PlatformCall(
        fact.call_id,
        fact.operator_id,
        fact.tenant_id,
        direction.value if direction else "",
        _time(fact.invite_time),
        _time(fact.answer_time) if fact.HasField("answer_time") else None,
        duration.seconds * 1000 + (nanos // 1_000_000 if nanos >= 0 else -(-nanos // 1_000_000)),
    )


def _time(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    value = time_in(stamp)
    if value is None:
        raise ValueError("call feed: not a valid timestamp")
    return value


class CallFeedFollower:
    """Follows the call feed until stopped, reconnecting with backoff.

    Its metrics: the records log position stored through (read from the cursor, which this
    process can open when it shares the records service's token keys), when it last stored a
    batch or heard a heartbeat, and its lag: now minus the time through which it is known to
    have stored every call, which is the receipt of its last empty response (a heartbeat, sent
    after `heartbeat_interval_s` with nothing new: it was caught up) or else the commit of the
    newest call it stored. Healthy, that stays below about the heartbeat interval; it grows
    while the feed is stalled, disconnected or reading a backlog.
    """

    def __init__(
        self,
        db: Database,
        client: FeedClient,
        batch_size: int = 1_000,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._tracer = tracer  # tracing on: each FollowCalls call is a span, its context sent
        self.client = client
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self.kept = 0  # calls kept since start (for logs and tests)
        metrics = metrics or Metrics(enabled=False)
        self._position = metrics.feed_position
        self._last_batch = metrics.feed_last_batch
        self._unit_calls = metrics.feed_unit_calls
        self._complete_through = time.time()  # nothing known yet: the lag grows from start
        self._interrupted_at: float | None = None  # since when the feed is down (monotonic)
        metrics.feed_lag_seconds.set_function(self.lag)

    def lag(self) -> float:
        """Seconds since the time through which every call is known stored (see the class)."""
        return max(0.0, time.time() - self._complete_through)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-call-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.5
        async with grpc.aio.secure_channel(
            self.client.target,
            self.client.credentials,
            options=balanced(self.client.target, self.client.server_name),
        ) as channel:
            stub = records_grpc.CallFeedServiceStub(channel)
            while True:
                try:
                    await self._follow(stub)
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as error:
                    self._interrupted_at = self._interrupted_at or time.monotonic()
                    if error.code() == grpc.StatusCode.FAILED_PRECONDITION:  # CURSOR_EXPIRED
                        log.warning("call feed cursor expired; following from the oldest kept")
                        await self._db.run(
                            platform_calls.store_platform_calls, FEED, [], "", write=True
                        )
                        continue
                    saved = await self._db.run(platform_calls.feed_cursor, FEED)
                    if error.code() == grpc.StatusCode.INVALID_ARGUMENT and saved:  # CURSOR_INVALID
                        # Sealed with a token key no longer listed, or in an older format.
                        log.warning("call feed cursor unreadable; following from the oldest kept")
                        await self._db.run(
                            platform_calls.store_platform_calls, FEED, [], "", write=True
                        )
                        continue
                    log.warning(
                        "call feed interrupted; reconnecting",
                        code=error.code().name,
                        delay_s=delay,
                    )
                except Exception:
                    self._interrupted_at = self._interrupted_at or time.monotonic()
                    log.exception("call feed failed; reconnecting", delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _follow(self, stub: records_grpc.CallFeedServiceStub) -> None:
        """Store what the feed sends: the responses that arrived while a unit was storing the
        ones before are stored together next, in one unit with the last one's cursor (up to
        `batch_size` calls), so a busy feed makes fewer, bigger write units."""
        cursor = await self._db.run(platform_calls.feed_cursor, FEED)
        request = records_pb.FollowCallsRequest(
            cursor=cursor, from_oldest=not cursor, max_batch_size=self._batch_size
        )
        with client_call(self._tracer, FOLLOW_CALLS) as metadata:
            responses = stub.FollowCalls(request, metadata=metadata)
            try:
                async with contextlib.aclosing(grouped(responses, self._batch_size)) as groups:
                    await self._store(groups, cursor)
            finally:
                responses.cancel()  # a unit failed: the stream is not read any more

    async def _store(
        self, groups: AsyncIterator[list[records_pb.FollowCallsResponse]], cursor: str
    ) -> None:
        async for group in groups:
            last = group[-1]
            if last.cursor != cursor or any(response.calls for response in group):
                calls = [call_in(c) for response in group for c in response.calls]
                self.kept += await self._db.run(
                    platform_calls.store_platform_calls, FEED, calls, last.cursor, write=True
                )
                self._unit_calls.observe(len(calls))
                cursor = last.cursor
            for response in group:
                self._stored(response)

    def _stored(self, response: records_pb.FollowCallsResponse) -> None:
        """A response is stored (or had nothing to store): the feed's metrics, and the
        recovery logged when it follows an interruption."""
        if self._interrupted_at is not None:  # at the loss's level: seen wherever it was
            log.warning(
                "call feed following again",
                after_s=round(time.monotonic() - self._interrupted_at, 1),
            )
            self._interrupted_at = None
        now = time.time()
        self._last_batch.set(now)
        if response.calls:
            self._complete_through = (
                response.calls[-1].publish_time.ToDatetime(tzinfo=dt.UTC).timestamp()
            )
        else:
            self._complete_through = now
        with contextlib.suppress(ApiError):  # readable where this process holds the token keys
            self._position.set(decode_cursor(response.cursor, RECORDS_LOG, "usage"))
