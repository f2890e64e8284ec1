"""Publishing under load: the batches of one stream pipelined (plumbing.pipeline: prepared
ahead, committed and answered in order, a failing batch answered in its turn), and call_id
unique with concurrent publishers on several replicas of one database."""

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
from plumbing.pipeline import pipelined
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
            functools.partial(storage.read_records, selection=selection, size=1),
            0,
            head.position,
            1_000,
        )
        assert [chunk.position for chunk in read] == sorted(chunk.position for chunk in read)
        assert len(read) == len(messages)
    finally:
        for db in replicas:
            db.close()
