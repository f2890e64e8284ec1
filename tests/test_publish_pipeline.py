"""Publishing under load: the batches of one stream pipelined (plumbing.pipeline: prepared
ahead, committed and answered in order, a failing batch answered in its turn), the batches of
several streams committed together (group commit), and call_id unique with concurrent
publishers on several replicas of one database."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import sqlalchemy as sa

from opconnect.records.v1 import records_pb2 as pb
from opconnect.usage.v1 import usage_pb2
from plumbing.changelog import read_head
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.errors import invalid_field
from plumbing.pipeline import CommitGroups, pipelined
from services.records import convert, rules, storage
from tests.conftest import OPERATOR, RunningSystem, rich_error
from tests.helpers import stored, usage_stub
from tests.records_data import duration_record, ids, published, record, stamp, stream_all

EPOCH = stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
GUARD_S = 10  # a pipeline that never overlaps would wait for ever: fail instead


async def _requests(count: int, pulled: list[int] | None = None) -> AsyncIterator[int]:
    for number in range(count):
        if pulled is not None:
            pulled.append(number)
        yield number


async def _collect(answers: AsyncIterator[str]) -> tuple[list[str], BaseException | None]:
    got: list[str] = []
    try:
        async for answer in answers:
            got.append(answer)
    except Exception as error:
        return got, error
    return got, None


async def test_batches_are_prepared_ahead_but_committed_and_answered_in_order() -> None:
    started = {n: asyncio.Event() for n in range(6)}
    committing = 0
    most_committing = 0
    committed: list[int] = []

    async def prepare(number: int) -> int:
        started[number].set()
        # Later batches finish preparing first: answers must still come in order.
        for _ in range(6 - number):
            await asyncio.sleep(0)
        return number

    async def commit(number: int) -> str:
        nonlocal committing, most_committing
        committing += 1
        most_committing = max(most_committing, committing)
        if number + 1 in started:  # the next batch is prepared while this one commits
            await asyncio.wait_for(started[number + 1].wait(), GUARD_S)
        await asyncio.sleep(0)
        committed.append(number)
        committing -= 1
        return f"answer {number}"

    got, error = await _collect(pipelined(_requests(6), prepare, commit, depth=3))
    assert error is None
    assert got == [f"answer {n}" for n in range(6)]
    assert committed == list(range(6))
    assert most_committing == 1


async def test_at_most_depth_batches_are_read_and_not_yet_answered() -> None:
    pulled: list[int] = []
    release = asyncio.Event()

    async def prepare(number: int) -> int:
        return number

    async def commit(number: int) -> str:
        if number == 0:
            await release.wait()
        return str(number)

    answers = pipelined(_requests(10, pulled), prepare, commit, depth=3)
    first = asyncio.ensure_future(anext(answers))
    for _ in range(50):  # let the reader run as far as it may
        await asyncio.sleep(0)
    assert pulled == [0, 1, 2]
    release.set()
    assert await first == "0"
    rest, error = await _collect(answers)
    assert error is None
    assert rest == [str(n) for n in range(1, 10)]


@pytest.mark.parametrize("stage", ["prepare", "commit"])
async def test_a_failing_batch_is_answered_in_its_turn_and_nothing_after_it_commits(
    stage: str,
) -> None:
    committed: list[int] = []

    async def prepare(number: int) -> int:
        if stage == "prepare" and number == 2:
            raise invalid_field("test", "BATCH_EMPTY", "records", "1 to 1,000 records")
        return number

    async def commit(number: int) -> str:
        if stage == "commit" and number == 2:
            raise RuntimeError("storage went away")
        committed.append(number)
        return str(number)

    got, error = await _collect(pipelined(_requests(5), prepare, commit, depth=4))
    assert got == ["0", "1"]
    assert error is not None
    assert committed == [0, 1]


async def test_a_broken_request_stream_ends_after_the_batches_read_before_it() -> None:
    async def requests() -> AsyncIterator[int]:
        yield 0
        yield 1
        raise ConnectionError("the client went away")

    async def same(number: int) -> int:
        return number

    async def answer(number: int) -> str:
        return str(number)

    got, error = await _collect(pipelined(requests(), same, answer, depth=4))
    assert got == ["0", "1"]
    assert isinstance(error, ConnectionError)


# --- through the service ---------------------------------------------------------------------


def _until_error(responses: Iterator[object]) -> tuple[list[object], grpc.RpcError | None]:
    got: list[object] = []
    try:
        for response in responses:
            got.append(response)
    except grpc.RpcError as error:
        return got, error
    return got, None


def test_a_publish_stream_answers_batches_in_order_and_ends_at_a_bad_one(
    system: RunningSystem,
) -> None:
    a, b, c, d = record(), record(), record(), record()
    batches = [[a, b], [a, c], [], [d]]  # the second repeats a; the third is empty
    requests = (
        pb.PublishCallRecordsRequest(batch_id=f"batch-{i}", records=[published(r) for r in batch])
        for i, batch in enumerate(batches)
    )
    got, error = _until_error(system.ingest().PublishCallRecords(requests, timeout=30))
    assert [r.batch_id for r in got] == ["batch-0", "batch-1"]  # type: ignore[attr-defined]
    assert [r.outcome for r in got[1].results] == [  # type: ignore[attr-defined]
        pb.CALL_RECORD_OUTCOME_DUPLICATE,  # the batch before it was committed first
        pb.CALL_RECORD_OUTCOME_ACCEPTED,
    ]
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(error).reason == "BATCH_EMPTY"
    stored_records, _, _ = stream_all(system.records(), start_time=EPOCH)
    assert ids(stored_records) == ids([a, b, c])  # the batch after the bad one: never stored


def test_a_submit_stream_answers_batches_in_order_and_ends_at_a_bad_one(
    system: RunningSystem,
) -> None:
    a, b, c = duration_record(), duration_record(), duration_record()
    batches = [[a], [a, b], [], [c]]
    requests = (
        usage_pb2.SubmitCallDurationsRequest(batch_id=f"b{i}", records=batch)
        for i, batch in enumerate(batches)
    )
    got, error = _until_error(usage_stub(system).SubmitCallDurations(requests, timeout=30))
    assert [r.batch_id for r in got] == ["b0", "b1"]  # type: ignore[attr-defined]
    assert [r.outcome for r in got[1].results] == [  # type: ignore[attr-defined]
        usage_pb2.CALL_DURATION_OUTCOME_DUPLICATE,
        usage_pb2.CALL_DURATION_OUTCOME_ACCEPTED,
    ]
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(error).reason == "BATCH_EMPTY"
    assert stored(system) == sorted([a.record_id, b.record_id])


# --- group commit ------------------------------------------------------------------------------


class _Groups:
    """A CommitGroups over a fake `commit_many` that records each group and can be held."""

    def __init__(self, max_size: int = 5) -> None:
        self.groups: list[list[int]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.failing: set[int] = set()  # a group holding one of these fails
        self.sizes: list[int] = []
        self.commits = CommitGroups(self.commit_many, lambda n: n, max_size, self.sizes.append)

    async def commit_many(self, items: list[int]) -> list[str]:
        self.groups.append(items)
        await asyncio.wait_for(self.hold.wait(), GUARD_S)
        if self.failing.intersection(items):
            raise RuntimeError("storage gone")
        return [f"done {n}" for n in items]


async def _settle() -> None:
    """Let the tasks started run as far as they can."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_batches_ready_while_a_group_commits_commit_together_in_order() -> None:
    groups = _Groups(max_size=5)
    groups.hold.clear()
    first = asyncio.ensure_future(groups.commits.commit(1))
    await _settle()
    assert groups.groups == [[1]]  # alone: nothing else was ready
    # Ready while it commits: the next group, in the order they came, up to 5 (by size).
    rest = [asyncio.ensure_future(groups.commits.commit(n)) for n in (2, 3, 4)]
    await _settle()
    groups.hold.set()
    answers = await asyncio.gather(first, *rest)
    assert answers == ["done 1", "done 2", "done 3", "done 4"]  # each its own answer
    assert groups.groups == [[1], [2, 3], [4]]  # 2 + 3 fit in 5; 4 did not
    assert groups.sizes == [1, 2, 1]


async def test_a_failing_group_fails_each_of_its_batches_and_the_next_group_commits() -> None:
    groups = _Groups()
    groups.failing = {2}
    groups.hold.clear()
    first = asyncio.ensure_future(groups.commits.commit(1))
    await _settle()
    second = [asyncio.ensure_future(groups.commits.commit(n)) for n in (2, 3)]
    await _settle()
    groups.hold.set()
    results = await asyncio.gather(first, *second, return_exceptions=True)
    assert [str(r) for r in results] == ["done 1", "storage gone", "storage gone"]
    assert groups.groups == [[1], [2, 3]]
    assert await groups.commits.commit(4) == "done 4"  # the next group goes on


async def test_a_batch_given_up_while_it_waits_is_left_out_of_its_group() -> None:
    groups = _Groups()
    groups.hold.clear()
    first = asyncio.ensure_future(groups.commits.commit(1))
    await _settle()
    gone = asyncio.ensure_future(groups.commits.commit(2))
    kept = asyncio.ensure_future(groups.commits.commit(3))
    await _settle()
    gone.cancel()
    groups.hold.set()
    assert list(await asyncio.gather(first, kept)) == ["done 1", "done 3"]
    assert groups.groups == [[1], [3]]


def test_a_group_of_batches_is_stored_as_if_published_one_after_another(
    database_url: str,
) -> None:
    db = Database(database_url, threads=2)
    try:
        db.migrate()
        a, b, c = record(), record(), record()
        other_b = pb.CallRecord()
        other_b.CopyFrom(b)
        other_b.final_sip_phrase = "Other content"
        batches = [
            storage.stage(_candidates([a, b]), db.is_sqlite),
            storage.stage(_candidates([a, c, other_b]), db.is_sqlite),  # another stream's
        ]
        head = db.transaction(read_head, rules.LOG).position
        stored_batches = db.transaction(
            storage.publish_many,
            batches,
            convert.publish_time_field,
            convert.stored,
            write=True,
        )
        assert [[(r.call_id, r.outcome.value) for r in s.results] for s in stored_batches] == [
            [(a.call_id, "accepted"), (b.call_id, "accepted")],
            [(a.call_id, "duplicate"), (c.call_id, "accepted"), (b.call_id, "refused")],
        ]
        assert stored_batches[1].results[2].refusal is not None
        assert stored_batches[1].results[2].refusal.reason == "CALL_ID_CONFLICT"
        # One allocation for the group: the log moved by every candidate, in batch order.
        assert db.transaction(read_head, rules.LOG).position == head + 5
        selection = rules.StreamFilter(OPERATOR, None, None, False, None)
        read = db.transaction(
            functools.partial(storage.read_records, selection=selection), head, head + 5, 100
        )
        assert [row[0] for row in read] == [head + 1, head + 2, head + 4]
        assert [convert.record_out(row[1]).call_id for row in read] == [
            a.call_id,
            b.call_id,
            c.call_id,
        ]
    finally:
        db.close()


def test_concurrent_publish_streams_store_every_record_once(system: RunningSystem) -> None:
    streams, batches, size = 6, 5, 20
    messages = [[[record() for _ in range(size)] for _ in range(batches)] for _ in range(streams)]

    def publish_stream(number: int) -> list[pb.PublishCallRecordsResponse]:
        requests = (
            pb.PublishCallRecordsRequest(
                batch_id=f"s{number}-{i}", records=[published(r) for r in batch]
            )
            for i, batch in enumerate(messages[number])
        )
        return list(system.ingest().PublishCallRecords(requests, timeout=60))

    with ThreadPoolExecutor(streams) as pool:
        answers = list(pool.map(publish_stream, range(streams)))
    for number, responses in enumerate(answers):
        assert [r.batch_id for r in responses] == [f"s{number}-{i}" for i in range(batches)]
        assert all(r.accepted_count == size for r in responses)
    every = [r for stream in messages for batch in stream for r in batch]
    stored_records, _, _ = stream_all(system.records(), start_time=EPOCH)
    assert sorted(ids(stored_records)) == sorted(ids(every))  # each once, none missing


# --- concurrent publishers ---------------------------------------------------------------------


def _drop_call_id_uniqueness(db: Database) -> None:
    """Leave call_id unique by publish's own check alone (as on a partitioned table, which
    has no global unique index): PostgreSQL only (SQLite cannot drop a column's UNIQUE)."""
    with db.engine.begin() as connection:
        names = connection.execute(
            sa.text(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'call_records'::regclass"
                " AND contype = 'u'"
            )
        ).scalars()
        for name in list(names):
            connection.execute(sa.text(f'ALTER TABLE call_records DROP CONSTRAINT "{name}"'))


def _candidates(messages: list[pb.CallRecord]) -> list[rules.Candidate]:
    settings = Settings()
    prepared = convert.prepare(
        [published(m) for m in messages], {OPERATOR}, settings, rules.thresholds(settings)
    )
    assert all(isinstance(p, rules.Candidate) for p in prepared)
    return [p for p in prepared if isinstance(p, rules.Candidate)]


def test_concurrent_publishers_on_two_replicas_store_each_call_id_once(
    database_url: str,
) -> None:
    replicas = [Database(database_url, threads=4) for _ in range(2)]
    first = replicas[0]
    first.migrate()
    if first.is_postgres:
        _drop_call_id_uniqueness(first)
    messages = [record() for _ in range(120)]
    # Eight publishers, four on each replica, each publishing overlapping slices of the same
    # records in batches of 10, in its own order: every call_id is raced for.
    slices = [messages[(i * 15) % 120 :] + messages[: (i * 15) % 120] for i in range(8)]
    start = threading.Barrier(8)
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def publisher(number: int) -> None:
        db = replicas[number % 2]
        candidates = _candidates(slices[number])
        start.wait()
        for offset in range(0, len(candidates), 10):
            chunk = candidates[offset : offset + 10]
            staged = storage.stage(chunk, db.is_sqlite)
            done = db.transaction(
                storage.publish, staged, convert.publish_time_field, convert.stored, write=True
            )
            with lock:
                outcomes.extend((r.call_id, r.outcome.value) for r in done.results)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(publisher, range(8)))
        accepted = sorted(call_id for call_id, outcome in outcomes if outcome == "accepted")
        assert accepted == sorted(m.call_id for m in messages)  # each exactly once
        assert {o for _, o in outcomes} == {"accepted", "duplicate"}  # same content: no conflict
        with first.engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT call_id FROM call_records ORDER BY position")
            ).scalars()
            in_log = list(rows)
        assert sorted(in_log) == accepted
        # Resuming from the start reads every record once, all at or below the head.
        head = first.transaction(read_head, rules.LOG)
        selection = rules.StreamFilter(OPERATOR, None, None, False, None)
        read = first.transaction(
            functools.partial(storage.read_records, selection=selection), 0, head.position, 1_000
        )
        assert [row[0] for row in read] == sorted(row[0] for row in read)
        assert len(read) == len(messages)
    finally:
        for db in replicas:
            db.close()
