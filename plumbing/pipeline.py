"""Pipelined batches of one client stream (PublishCallRecords, SubmitCallDurations).

A batch goes through two stages: `prepare` (read, checked, rows built: CPU work, no writes) and
`commit` (its one write transaction, and its answer). `pipelined` prepares the batches that
follow while the one before commits, and still answers as if the stream were handled one batch
at a time:

- commits run one at a time, in the order the batches came, so a batch sees every earlier
  batch of its stream committed (its duplicates among them, say);
- answers come in that order, one per batch;
- at most `depth` batches are read ahead of the one committing (bounded memory: gRPC's flow
  control holds the client back beyond that);
- a batch that fails (in either stage: a bad batch, storage unavailable) is answered with its
  error in its turn: after the answers of every batch before it, and no batch after it is
  committed. The stream then ends with that error, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

R = TypeVar("R")  # a request
P = TypeVar("P")  # a prepared batch
A = TypeVar("A")  # an answer

_END = object()


async def pipelined(
    requests: AsyncIterator[R],
    prepare: Callable[[R], Awaitable[P]],
    commit: Callable[[P], Awaitable[A]],
    depth: int,
) -> AsyncIterator[A]:
    """Answers to `requests`, in order: `commit(await prepare(request))` for each, with at
    most `depth` (at least 1; 1 is one batch at a time) requests read and not yet answered,
    the one committing among them (see the module)."""
    room = asyncio.Semaphore(max(1, depth))
    ahead: asyncio.Queue[asyncio.Future[P] | object] = asyncio.Queue()
    preparing: set[asyncio.Future[P]] = set()

    async def read() -> None:
        try:
            while True:
                await room.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    break
                task = asyncio.ensure_future(prepare(request))
                preparing.add(task)
                ahead.put_nowait(task)
        except Exception as error:  # reading failed (the client's stream broke): in its turn
            failed: asyncio.Future[P] = asyncio.get_running_loop().create_future()
            failed.set_exception(error)
            ahead.put_nowait(failed)
        ahead.put_nowait(_END)

    reader = asyncio.create_task(read(), name="pipeline-read")
    try:
        while (item := await ahead.get()) is not _END:
            assert isinstance(item, asyncio.Future)
            preparing.discard(item)
            yield await commit(await item)
            room.release()
    finally:
        unfinished: list[asyncio.Future[Any]] = [reader, *preparing]
        for task in unfinished:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a batch never committed logs nothing
