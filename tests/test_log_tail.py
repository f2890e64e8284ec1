"""One shared tail per kind and log (plumbing.changelog.Tail): one read of the whole log per
wake-up serves the followers of every key (operator), so a group commit carrying several
operators' changes costs one read; a key that joins while a read is in flight misses nothing; a
busy key never evicts a quiet one's items; and with concurrent writers of several keys, every
follower still gets each of its key's changes once, in log order. On each backend, through the
numbers log (its events are small and written one transaction per call)."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, cast

import pytest
from sqlalchemy.orm import Session

from plumbing.changelog import (
    ANY_KEY,
    Follow,
    Notifier,
    Shared,
    Streams,
    Tail,
    follow_log,
    read_head,
)
from plumbing.db import Database, unit_of
from plumbing.metrics import Metrics
from services.numbers import rules as numbers_rules
from services.numbers import storage as numbers_storage
from tests.conftest import OPERATOR, OTHER_OPERATOR, TENANT, USER_ID

LOG = numbers_rules.LOG
THIRD_OPERATOR = "northwind-tel"
OPERATORS = (OPERATOR, OTHER_OPERATOR, THIRD_OPERATOR)
Event = numbers_rules.Event


def _number(operator: str, index: int) -> str:
    return f"+1425555{OPERATORS.index(operator)}{index:03d}"


def _upload(session: Session, count: int) -> None:
    for operator in OPERATORS:
        uploads = [
            numbers_rules.Upload(
                _number(operator, i), numbers_rules.Usage.USER, inbound=True, outbound=True
            )
            for i in range(count)
        ]
        numbers_storage.upload_numbers(session, operator, TENANT, uploads)


def _assign(session: Session, changes: Sequence[tuple[str, int]]) -> int:
    """Assign each (number, version) in one transaction (one commit of several operators'
    events, as a group commit is); returns the last event's position."""
    position = 0
    for number, _ in sorted(changes):  # every row lock first, in one order, then the log's
        numbers_storage.locked_number(unit_of(session), number)
    for number, version in changes:
        change = numbers_storage.assign_number(
            session,
            numbers_rules.Assignment(
                number,
                TENANT,
                f"sip:{number}@sbc{version}.contoso.example",
                numbers_rules.Target(numbers_rules.TargetKind.USER, USER_ID),
            ),
        )
        assert change.event is not None
        position = change.event.position
    return position


def _spec(key: str) -> Follow:
    # No heartbeat in a test's time: a follower gets a change by its wake-up or not at all.
    return Follow(LOG, key, numbers_rules.DOMAIN, 10, 3600.0, kind="assignments", operator=key)


def _operator(event: Event) -> str:
    return event.operator_id


SHARED: Shared[Event] = Shared(numbers_storage.read_log_events, _operator)


def _position(event: Event) -> int:
    return event.position


def _time(event: Event) -> float:
    return event.occurred_at.timestamp()


def _tail(db: Database | Any, notifier: Notifier, capacity: int = 100) -> Tail[Event]:
    return Tail(
        cast(Database, db),
        notifier,
        _spec(OPERATOR),
        SHARED,
        _position,
        capacity=capacity,
        metrics=Metrics(enabled=False),
    )


async def _notifier() -> Notifier:
    notifier = Notifier()
    notifier.bind(asyncio.get_running_loop())
    return notifier


async def test_one_group_commit_of_two_operators_costs_one_fill(db: Database) -> None:
    await db.run(_upload, 1, write=True)
    notifier = await _notifier()
    tail = _tail(db, notifier)
    for key in (OPERATOR, OTHER_OPERATOR):
        tail.join(key)
    head = (await db.run(read_head, LOG)).position
    tail.seed(head)
    changes = [(_number(OPERATOR, 0), 1), (_number(OTHER_OPERATOR, 0), 1)]
    await db.run(_assign, changes, write=True)
    notifier.wake(LOG, (OPERATOR, OTHER_OPERATOR))  # what the writer does after its commit
    generation = notifier.generation(LOG, ANY_KEY)  # each follower's, once woken
    await asyncio.wait_for(asyncio.gather(tail.refresh(generation), tail.refresh(generation)), 10)
    assert tail.fills == 1, "both operators' followers were served by one read"
    for key in (OPERATOR, OTHER_OPERATOR):
        assert tail.covers(key, head)
        (event,), _ = tail.serve(key, head, 10, None)
        assert event.phone_number == _number(key, 0)


class _HeldDatabase:
    """A database whose units return only once `release` is set (each has done its work by
    then): a read the tail began answers later, as on a busy machine."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self, fn: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        done = await self.db.run(fn, *args, write=write)
        self.started.set()
        await self.release.wait()
        return done


async def test_a_key_joining_while_a_fill_is_in_flight_misses_nothing(db: Database) -> None:
    await db.run(_upload, 1, write=True)
    notifier = await _notifier()
    held = _HeldDatabase(db)
    tail = _tail(held, notifier)
    tail.join(OPERATOR)
    head = (await db.run(read_head, LOG)).position
    tail.seed(head)
    await db.run(_assign, [(_number(OTHER_OPERATOR, 0), 1)], write=True)
    notifier.wake(LOG, (OTHER_OPERATOR,))
    # A follower of the first operator refreshes (woken by the log): the read reads every key.
    reading = asyncio.create_task(tail.refresh(notifier.generation(LOG, ANY_KEY)))
    await asyncio.wait_for(held.started.wait(), 10)  # it has read, its answer is held
    tail.join(OTHER_OPERATOR)  # joins at the tail's through, below what the read saw
    assert tail.covers(OTHER_OPERATOR, head)
    held.release.set()
    await asyncio.wait_for(reading, 10)
    found, answered = tail.serve(OTHER_OPERATOR, head, 10, None)
    assert [e.phone_number for e in found] == [_number(OTHER_OPERATOR, 0)], "nothing missed"
    assert answered.position > head
    assert tail.serve(OPERATOR, head, 10, None)[0] == []


async def test_a_busy_key_does_not_evict_a_quiet_ones_items(db: Database) -> None:
    await db.run(_upload, 6, write=True)
    notifier = await _notifier()
    capacity = 3
    tail = _tail(db, notifier, capacity)
    for key in (OPERATOR, OTHER_OPERATOR):
        tail.join(key)
    head = (await db.run(read_head, LOG)).position
    tail.seed(head)
    await db.run(_assign, [(_number(OPERATOR, 0), 1)], write=True)
    for i in range(6):  # the other operator is busy: twice the capacity
        await db.run(_assign, [(_number(OTHER_OPERATOR, i), 1)], write=True)
        notifier.wake(LOG, (OTHER_OPERATOR,))
        await tail.refresh(notifier.generation(LOG, ANY_KEY))
    assert tail.covers(OPERATOR, head), "the quiet operator's item is kept"
    assert [e.phone_number for e in tail.serve(OPERATOR, head, 10, None)[0]] == [
        _number(OPERATOR, 0)
    ]
    busy = tail.items_of(OTHER_OPERATOR)
    assert [e.phone_number for e in busy] == [_number(OTHER_OPERATOR, i) for i in (3, 4, 5)]
    assert not tail.covers(OTHER_OPERATOR, head), "its follower left below reads the database"
    assert tail.held() == 1 + capacity


async def test_items_of_keys_nobody_follows_are_not_kept(db: Database) -> None:
    await db.run(_upload, 1, write=True)
    notifier = await _notifier()
    tail = _tail(db, notifier)
    tail.join(OPERATOR)
    tail.seed((await db.run(read_head, LOG)).position)
    changes = [(_number(o, 0), 1) for o in OPERATORS]
    await db.run(_assign, changes, write=True)
    notifier.wake(LOG, OPERATORS)
    await tail.refresh(notifier.generation(LOG, ANY_KEY))
    assert tail.keys() == [OPERATOR]
    assert [e.phone_number for e in tail.items_of(OPERATOR)] == [_number(OPERATOR, 0)]
    tail.leave(OPERATOR)
    assert tail.keys() == [] and tail.held() == 0


@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_writers_of_several_keys_reach_each_follower_once_in_order(
    db: Database, seed: int
) -> None:
    """Randomized: writers commit one to three operators' changes a transaction, waking the
    log after each; two followers per operator and one of every key read through one small
    tail (below its capacity they fall back on the database and join it again)."""
    numbers = 8
    await db.run(_upload, numbers, write=True)
    notifier = await _notifier()
    streams = Streams(db, Metrics(enabled=False), tail_items=4)
    start = (await db.run(read_head, LOG)).position
    got: dict[int, list[int]] = {}
    versions: dict[str, int] = {}

    async def follower(index: int, key: str) -> None:
        if key == ANY_KEY:
            read: Callable[..., Sequence[Event]] = numbers_storage.read_log_events
        else:
            read = functools.partial(numbers_storage.read_events, operator_id=key, tenant_id=None)
        seen = got.setdefault(index, [])
        async for batch in follow_log(
            db,
            notifier,
            _spec(key),
            read,
            _position,
            after=start,
            streams=streams,
            committed_at=_time,
            shared=SHARED,
        ):
            seen.extend(e.position for e in batch.items)

    async def writer(rng: random.Random) -> None:
        for _ in range(12):
            chosen = rng.sample(OPERATORS, rng.randint(1, 3))
            changes = []
            for number in (_number(o, rng.randrange(numbers)) for o in chosen):
                versions[number] = versions.get(number, 0) + 1  # a change each time
                changes.append((number, versions[number]))
            position = await db.run(_assign, changes, write=True)
            notifier.publish(LOG, chosen, position)
            await asyncio.sleep(rng.random() * 0.01)

    keys = [*(o for o in OPERATORS for _ in range(2)), ANY_KEY]
    followers = [asyncio.create_task(follower(i, k)) for i, k in enumerate(keys)]
    await asyncio.sleep(0.2)  # every follower has read its start
    rng = random.Random(seed)
    await asyncio.gather(*(writer(random.Random(rng.random())) for _ in range(3)))
    head = (await db.run(read_head, LOG)).position
    every = await db.run(numbers_storage.read_log_events, start, head, 10_000)
    expected = {
        i: [e.position for e in every if k in (ANY_KEY, e.operator_id)] for i, k in enumerate(keys)
    }
    try:
        for _ in range(300):  # until each has had as many as it should (30 s at most)
            if all(len(got.get(i, [])) >= len(expected[i]) for i in expected):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)  # and anything more it would get (a repeat) has come
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    for i, key in enumerate(keys):
        assert got[i] == expected[i], (key, "each change of its key once, in log order")
    assert not streams.tails(), "the tail went with its last follower"


async def test_a_read_cut_by_other_keys_items_does_not_leave_a_follower_waiting(
    db: Database,
) -> None:
    """A log-wide read cut at the fill limit may hold none of a follower's key: the follower
    reads on instead of waiting for a wake-up that was already spent."""
    await db.run(_upload, 3, write=True)
    notifier = await _notifier()
    streams = Streams(db, Metrics(enabled=False), tail_items=2)  # reads of 2 items at most
    start = (await db.run(read_head, LOG)).position
    read = functools.partial(
        numbers_storage.read_events, operator_id=OTHER_OPERATOR, tenant_id=None
    )
    batches = follow_log(
        db,
        notifier,
        _spec(OTHER_OPERATOR),
        read,
        _position,
        after=start,
        streams=streams,
        committed_at=_time,
        shared=SHARED,
    )
    first = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)  # its own read found nothing: it waits, the tail seeded
    changes = [(_number(OPERATOR, i), 1) for i in range(3)] + [(_number(OTHER_OPERATOR, 0), 1)]
    position = await db.run(_assign, changes, write=True)
    notifier.publish(LOG, (OPERATOR, OTHER_OPERATOR), position)
    try:
        batch = await asyncio.wait_for(first, 30)
        assert [e.phone_number for e in batch.items] == [_number(OTHER_OPERATOR, 0)]
    finally:
        first.cancel()
        await cast(AsyncGenerator[Any, None], batches).aclose()
