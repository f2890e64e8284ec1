"""Resumable server streams: list-then-watch done once, for every stream that has cursors
(`WatchAssignments`, `StreamCallRecords`, `StreamDiscrepancies`).

The application iterates batches. A batch counts as processed when the application asks for
the next one: only then is its cursor saved in the checkpoint, so a crash while processing a
batch delivers that batch again on the next run (at least once), and a disconnect never
delivers anything twice (the stream resumes strictly after the last processed batch). Heartbeats
(responses with no items) carry a newer cursor; it is saved at once, which keeps a quiet
stream's checkpoint from ageing past the server's retention.

After a failure the stream is opened again from the last saved cursor, after a wait: the
server's RetryInfo when it sent one, otherwise exponential backoff with jitter. A failure that
says something about the request itself (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is raised as
a `ServerError` with the server's status. A cursor past the server's retention
(`CURSOR_EXPIRED`) is handled by the stream's own `restart`: watching assignments lists the
numbers again; following records starts again from the oldest record kept, and says that
records were missed (`Batch.gap`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from opconnect_client.backoff import Backoff
from opconnect_client.checkpoints import Checkpoint
from opconnect_client.errors import lost_status, server_error

T = TypeVar("T")
log = logging.getLogger("opconnect_client")


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items to process, in order. `cursor`: where the stream stands after them ("" for a page
    of a listing that is not its last: the listing's cursor is saved after its last page).
    `listing`: the items are the current state as listed (a first start, or a list again after
    CURSOR_EXPIRED), not changes. `gap`: items were missed before these (purged past the
    server's retention before they could be read)."""

    items: Sequence[T]
    cursor: str
    listing: bool = False
    gap: bool = False


Opener = Callable[[str], "grpc.aio.UnaryStreamCall[Any, Any]"]  # cursor -> an open call


async def follow(
    name: str,
    open_call: Opener,
    items_of: Callable[[Any], Sequence[T]],
    checkpoint: Checkpoint,
    *,
    restart: Callable[[bool], AsyncIterator[Batch[T]]] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[Batch[T]]:
    """Batches of the stream `name` from the checkpoint's cursor, for ever (or until the server
    ends the stream with OK: a stream with an end). With no cursor saved, `restart(False)` (when
    given) yields the batches that lead to a first cursor; after CURSOR_EXPIRED,
    `restart(True)`."""
    backoff = Backoff()
    cursor = checkpoint.load()
    failed_at: float | None = None
    expired = False
    while True:
        call: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        try:
            if not cursor and restart is not None:
                async for batch in restart(expired):
                    yield batch
                    if batch.cursor:
                        checkpoint.save(batch.cursor)
                        cursor = batch.cursor
                expired = False
            call = open_call(cursor)
            async for response in call:
                if failed_at is not None:
                    log.info("%s resumed after %.1f s", name, time.monotonic() - failed_at)
                    failed_at = None
                backoff.reset()
                items = items_of(response)
                if items:
                    yield Batch(items, response.cursor)
                if response.cursor and response.cursor != cursor:
                    checkpoint.save(response.cursor)
                    cursor = response.cursor
            return
        except grpc.aio.AioRpcError as raised:
            error = server_error(raised)
            if error.reason == "CURSOR_EXPIRED" and restart is not None:
                log.warning("%s: the saved cursor is past the server's retention", name)
                cursor, expired = "", True
                continue
            if not (error.retryable or lost_status(raised)):
                raise error from None
            delay = backoff.delay(error)
            failed_at = failed_at if failed_at is not None else time.monotonic()
            log.warning("%s interrupted (%s); again in %.1f s", name, error, delay)
            await sleep(delay)
        finally:
            if call is not None:
                call.cancel()
