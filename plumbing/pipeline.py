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
from typing import Any, Generic, TypeVar

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


class CommitGroups(Generic[P, A]):
    """Batches of many streams committed together (group commit).

    Each stream's batches commit one at a time (`pipelined`); with many streams publishing at
    once, each batch was its own transaction, and every transaction of a log takes the log
    head's lock and (SQLite) the one writer's turn and a sync to disk: the writer, not the CPU,
    set the pace. Here a batch ready to commit waits while a group commits, and then commits
    with every batch that came meanwhile, in one call of `commit_many` (one transaction, one
    lock hold), in the order they came (up to `max_size`, by `size`; the rest in the next
    group). A batch is answered only once its group has committed. A group that fails fails
    every batch in it with the same error (the causes are the database's: unavailable, busy;
    each stream then ends with it, as it would have alone).

    A batch given up while it waits (its stream gone) is left out; one given up while its group
    commits is committed with it, as a lone batch's transaction would have been. Used from one
    event loop; the group runs in the context (trace, gate lane) of the call that started it.
    """

    def __init__(
        self,
        commit_many: Callable[[list[P]], Awaitable[list[A]]],
        size: Callable[[P], int],
        max_size: int,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._commit_many = commit_many
        self._size = size
        self._max_size = max(1, max_size)
        self._observe = observe
        self._waiting: list[tuple[P, asyncio.Future[A]]] = []
        self._running: asyncio.Task[None] | None = None

    async def commit(self, item: P) -> A:
        """`item` committed in the next group; its own answer from `commit_many`."""
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name="commit-groups")
        return await future

    def _next_group(self) -> list[tuple[P, asyncio.Future[A]]]:
        group: list[tuple[P, asyncio.Future[A]]] = []
        total = 0
        while self._waiting:
            item, future = self._waiting[0]
            if future.done():  # given up while waiting
                self._waiting.pop(0)
                continue
            size = self._size(item)
            if group and total + size > self._max_size:
                break
            group.append(self._waiting.pop(0))
            total += size
        return group

    async def _run(self) -> None:
        group: list[tuple[P, asyncio.Future[A]]] = []
        try:
            while group := self._next_group():
                if self._observe is not None:
                    self._observe(len(group))
                try:
                    answers = await self._commit_many([item for item, _ in group])
                except Exception as error:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), answer in zip(group, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            # Cancelled (the server stops): no batch is left waiting for an answer.
            self._running = None
            for _, future in group + self._waiting:
                if not future.done():
                    future.cancel()
            self._waiting.clear()
