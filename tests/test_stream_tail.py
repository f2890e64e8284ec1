"""The shared tail of live followers (plumbing.changelog.Tail): caught-up streams of one operator
are served from one in-memory tail filled by one database read per wake-up; every record still
reaches every follower once and in log order, a follower's filter still holds, the tail stays
within `stream_tail_items`, a follower left behind it reads the database and joins it again
with no gap, and a change committed through another replica reaches it too."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy.orm import Session

from opconnect.numbers.v1 import numbers_pb2 as numbers_pb
from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1.records_pb2_grpc import CallRecordServiceStub
from plumbing.changelog import ANY_KEY, Follow, Notifier, Shared, Tail, decode_cursor
from plumbing.db import Database
from plumbing.metrics import Metrics
from services.numbers import rules as numbers_rules
from services.numbers import storage as numbers_storage
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_TENANT,
    POSTGRES_URL,
    TENANT,
    USER_ID,
    Pki,
    RunningSystem,
    Watcher,
    migrated_postgres,
    settings_for,
    start_system,
)
from tests.helpers import Sample, assign, sample, scrape, upload
from tests.records_data import Follower, audio, ids, publish, published, record, stream_all

LIVE = pb.StreamCallRecordsRequest(follow=True)


def _position(cursor: str) -> int:
    return decode_cursor(cursor, "records", "records.opconnect")


def _system(pki: Pki, directory: Path, url: str, **changes: object) -> RunningSystem:
    return start_system(
        settings_for(directory, pki.paths, url, metrics_listen="127.0.0.1:0", **changes), pki
    )


@pytest.fixture
def measured(session_pki: Pki, migrated_url: str, tmp_path: Path) -> Iterator[RunningSystem]:
    running = _system(session_pki, tmp_path, migrated_url)
    yield running
    running.stop()


def _reads(got: dict[Sample, float], kind: str) -> tuple[float, float, float]:
    """(tail hits, the streams' own database reads, tail fills) of a stream kind."""
    return (
        sample(got, "opconnect_stream_reads_total", kind=kind, source="tail"),
        sample(got, "opconnect_stream_reads_total", kind=kind, source="database"),
        sample(got, "opconnect_stream_tail_fills_total", kind=kind),
    )


def _open(system: RunningSystem, request: pb.StreamCallRecordsRequest = LIVE) -> Follower:
    follower = Follower(system.records(), request)
    assert follower.next() is not None  # the opening response ("from now")
    return follower


def _live(system: RunningSystem, count: int, batches: int) -> tuple[list[str], list[Follower]]:
    """`count` live followers, then `batches` batches of 3 published one by one, each read by
    every follower before the next is published (so every follower is woken by every one)."""
    followers = [_open(system) for _ in range(count)]
    stub = system.ingest()
    sent: list[str] = []
    for _ in range(batches):
        batch = [record() for _ in range(3)]
        publish(stub, [published(r) for r in batch])
        sent += ids(batch)
        for follower in followers:
            got, _ = follower.records(3)
            assert ids(got) == ids(batch)
    return sent, followers


def test_live_followers_share_one_read_per_commit(measured: RunningSystem) -> None:
    count, batches = 4, 10
    before = _reads(scrape(measured), "records")
    _, followers = _live(measured, count, batches)
    after = _reads(scrape(measured), "records")
    hits, database, fills = (a - b for a, b in zip(after, before, strict=True))
    for follower in followers:
        follower.cancel()
    # Each follower was woken by each batch: reading the database itself, that is at least
    # count * batches reads; sharing the tail, about one read per batch for all of them.
    assert database + fills < count * batches, (database, fills)
    assert database <= count, "each stream read the database once at most, to start"
    assert hits >= batches, hits


def test_without_tails_every_follower_reads_the_database(session_pki: Pki, tmp_path: Path) -> None:
    running = _system(session_pki, tmp_path, f"sqlite:///{tmp_path / 'db'}", stream_tail_items=0)
    try:
        count, batches = 3, 4
        _, followers = _live(running, count, batches)
        hits, database, fills = _reads(scrape(running), "records")
        for follower in followers:
            follower.cancel()
        assert (hits, fills) == (0, 0)
        assert database >= count * batches
    finally:
        running.stop()


def test_concurrent_publishers_reach_every_live_follower_once_in_order(
    measured: RunningSystem,
) -> None:
    followers = [_open(measured) for _ in range(3)]
    sent: list[str] = []
    errors: list[BaseException] = []

    def publisher() -> None:
        try:
            stub = measured.ingest()
            for _ in range(8):
                batch = [record() for _ in range(4)]
                (response,) = publish(stub, [published(r) for r in batch])
                assert response.accepted_count == 4
                sent.extend(ids(batch))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=publisher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stored, _, _ = stream_all(measured.records(), start_time={"seconds": 0})
    for follower in followers:
        got: list[str] = []
        positions: list[int] = []
        while len(got) < len(sent):
            response = follower.next()
            assert response is not None
            got += ids(response.records)
            if response.records:
                positions.append(_position(response.cursor))
        follower.cancel()
        assert got == ids(stored), "every record once, in log order"
        assert positions == sorted(set(positions))


def test_a_filtered_follower_gets_only_its_records(measured: RunningSystem) -> None:
    requests = {
        "all": LIVE,
        "tenant": pb.StreamCallRecordsRequest(follow=True, tenant_id=OTHER_TENANT),
        "number": pb.StreamCallRecordsRequest(follow=True, phone_number="+14255550199"),
        "poor": pb.StreamCallRecordsRequest(follow=True, poor_quality_only=True),
    }
    followers = {name: _open(measured, request) for name, request in requests.items()}
    mixed = [
        record(),
        record(tenant=OTHER_TENANT),
        record(callee="+14255550199"),
        record(answered=False),  # no audio: unclassified, never poor
        record(streams=[audio(jitter_ms=90.0)]),  # poor
        record(tenant=OTHER_TENANT, caller="+14255550199"),
    ]
    stub = measured.ingest()
    for one in mixed:  # one commit each: each follower is served from the tail between them
        publish(stub, [published(one)])
    for name, request in requests.items():
        query = {
            "tenant_id": request.tenant_id,
            "phone_number": request.phone_number,
            "poor_quality_only": request.poor_quality_only,
        }
        want, _, _ = stream_all(measured.records(), start_time={"seconds": 0}, **query)
        follower = followers[name]
        got, _ = follower.records(len(want)) if want else ([], "")
        follower.cancel()
        assert ids(got) == ids(want), name


def test_a_follower_left_behind_the_tail_catches_up_from_the_database_with_no_gap(
    session_pki: Pki, tmp_path: Path
) -> None:
    capacity = 20
    running = _system(
        session_pki, tmp_path, f"sqlite:///{tmp_path / 'db'}", stream_tail_items=capacity
    )
    try:
        live = _open(running)
        # No BDP probing: the 64 KiB HTTP/2 window is all the transport may buffer, so a
        # client that stops reading stops its stream.
        channel = running.channel(options=[("grpc.http2.bdp_probe", 0)])
        call = CallRecordServiceStub(channel).StreamCallRecords(
            pb.StreamCallRecordsRequest(follow=True, max_batch_size=5)
        )
        stalled = iter(call)
        next(stalled)  # open, from now; then it reads nothing for a while
        stub = running.ingest()
        sent: list[str] = []
        for _ in range(6):
            batch = [record() for _ in range(1_000)]
            publish(stub, [published(r) for r in batch])
            sent += ids(batch)
            got, _ = live.records(1_000)
            assert ids(got) == ids(batch)
        held = sample(scrape(running), "opconnect_stream_tail_items", kind="records")
        assert 0 < held <= capacity
        database_before = _reads(scrape(running), "records")[1]
        received: list[str] = []
        positions: list[int] = []
        while len(received) < len(sent):
            response = next(stalled)
            received += ids(response.records)
            if response.records:  # (a heartbeat may repeat the position before it)
                positions.append(_position(response.cursor))
        call.cancel()
        live.cancel()
        assert received == sent, "every record once, in log order, across the switch"
        assert positions == sorted(set(positions))
        assert _reads(scrape(running), "records")[1] > database_before, "it read the database"
    finally:
        running.stop()


def test_watchers_served_from_the_tail_keep_their_tenant(measured: RunningSystem) -> None:
    upload(measured, "+14255550100")
    upload(measured, "+14255550101", tenant=OTHER_TENANT)
    request = numbers_pb.WatchAssignmentsRequest
    every = Watcher(measured.numbers(), request())
    mine = Watcher(measured.numbers(), request(tenant_id=OTHER_TENANT))
    for watcher in (every, mine):
        assert not watcher.next().events  # the opening heartbeat
    assign(measured, "+14255550100")
    assign(measured, "+14255550101", tenant=OTHER_TENANT)
    assign(measured, "+14255550100", sip="sip:+14255550100@sbc2.contoso.example")
    numbers = ["+14255550100", "+14255550101", "+14255550100"]
    assert [e.phone_number for e in every.events(3)] == numbers
    assert [(e.phone_number, e.tenant_id) for e in mine.events(1)] == [
        ("+14255550101", OTHER_TENANT)
    ]
    assign(
        measured, "+14255550101", sip="sip:+14255550101@sbc2.contoso.example", tenant=OTHER_TENANT
    )
    assert [e.phone_number for e in mine.events(1)] == ["+14255550101"]
    for watcher in (every, mine):
        watcher.cancel()
    got = scrape(measured)
    assert sample(got, "opconnect_stream_reads_total", kind="assignments", source="tail") > 0


def test_changes_through_another_replica_reach_its_tail(session_pki: Pki, tmp_path: Path) -> None:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url = migrated_postgres(POSTGRES_URL)
    # Heartbeats far apart: the streams on the second replica must be woken, not polled.
    first = _system(session_pki, tmp_path / "a", url, heartbeat_interval_s=30)
    second = _system(session_pki, tmp_path / "b", url, heartbeat_interval_s=30)
    try:
        for running in (first, second):
            listener = running.runtime.listener
            assert listener is not None
            running.call(listener.ready.wait(), timeout=10)
        followers = [_open(second) for _ in range(3)]
        sent: list[str] = []
        for _ in range(4):
            batch = [record() for _ in range(2)]
            publish(first.ingest(), [published(r) for r in batch])
            sent += ids(batch)
            for follower in followers:
                got, _ = follower.records(2, timeout=5)
                assert ids(got) == ids(batch)
        for follower in followers:
            follower.cancel()
        hits, _, fills = _reads(scrape(second), "records")
        assert hits > 0 and fills > 0
    finally:
        first.stop()
        second.stop()


def test_a_stream_that_ends_leaves_no_tail(measured: RunningSystem) -> None:
    follower = _open(measured)
    for _ in range(2):  # the first may be read by the stream itself, the second is the tail's
        publish(measured.ingest(), [published(record())])
        assert len(follower.records(1)[0]) == 1
    assert sample(scrape(measured), "opconnect_stream_tail_items", kind="records") >= 1
    follower.cancel()
    deadline = time.monotonic() + 5
    while "records" in _tail_kinds(scrape(measured)):
        assert time.monotonic() < deadline, "the tail outlived its last follower"
        time.sleep(0.05)


def _tail_kinds(got: dict[Sample, float]) -> set[str]:
    """The kinds of stream with a tail in the scrape."""
    return {dict(labels)["kind"] for name, labels in got if name == "opconnect_stream_tail_items"}


# --- the tail's reads, in one process ----------------------------------------------------------


class _HeldDatabase:
    """A database whose units return only once `release` is set (each has done its work by
    then): a read the tail began before a commit answers after it, as on a busy machine."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.release = asyncio.Event()

    async def run(self, fn: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        done = await self.db.run(fn, *args, write=write)
        await self.release.wait()
        return done


def _assign(session: Session, number: str) -> int:
    change = numbers_storage.assign_number(
        session,
        numbers_rules.Assignment(
            number,
            TENANT,
            f"sip:{number}@sbc1.contoso.example",
            numbers_rules.Target(numbers_rules.TargetKind.USER, USER_ID),
        ),
    )
    assert change.event is not None
    return change.event.position


async def test_a_wake_up_during_a_read_starts_another_read(db: Database) -> None:
    """A follower woken by a commit that a read in flight began too early to see is not served
    by that read: the tail reads again, so the change reaches it (never skipped)."""
    number = "+14255550100"
    upload = numbers_rules.Upload(number, numbers_rules.Usage.USER, inbound=True, outbound=True)
    await db.run(numbers_storage.upload_numbers, OPERATOR, TENANT, [upload], write=True)
    notifier = Notifier()
    notifier.bind(asyncio.get_running_loop())
    held = _HeldDatabase(db)
    spec = Follow(
        numbers_rules.LOG,
        OPERATOR,
        numbers_rules.DOMAIN,
        10,
        30.0,
        kind="assignments",
        operator=OPERATOR,
    )
    tail: Tail[numbers_rules.Event] = Tail(
        cast(Database, held),
        notifier,
        spec,
        Shared(numbers_storage.read_log_events, lambda event: event.operator_id),
        lambda event: event.position,
        capacity=100,
        metrics=Metrics(enabled=False),
    )
    tail.join(OPERATOR)
    tail.seed(0)
    first = asyncio.create_task(tail.refresh(notifier.generation(numbers_rules.LOG, ANY_KEY)))
    await asyncio.sleep(0.3)  # its read is done (it saw nothing), its answer held
    position = await db.run(_assign, number, write=True)
    notifier.wake(numbers_rules.LOG, (OPERATOR,))  # what the writer does after its commit
    second = asyncio.create_task(tail.refresh(notifier.generation(numbers_rules.LOG, ANY_KEY)))
    held.release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert [e.position for e in tail.items_of(OPERATOR)] == [position], "the read saw it"
    assert tail.serve(OPERATOR, 0, 10, None)[0][0].phone_number == number
