"""StreamCallRecords under pressure: concurrent publishers and a reader cut again and again (no
gap, nothing twice), a stalled client (bounded read-ahead), clients hanging up (their streams
freed at once), shutdown, and a record published through one replica reaching another."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1.records_pb2_grpc import CallRecordServiceStub
from plumbing.changelog import decode_cursor
from plumbing.db import driver_fetch
from services.records import storage
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_OPERATOR,
    OTHER_TENANT,
    POSTGRES_URL,
    TENANT,
    Pki,
    RunningSystem,
    migrated_postgres,
    rich_error,
    settings_for,
    start_system,
)
from tests.records_data import (
    Follower,
    chunks,
    ids,
    publish,
    published,
    record,
    stamp,
    stream_all,
)

EPOCH_REQUEST: dict[str, Any] = {"start_time": stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))}


def _position(cursor: str) -> int:
    return decode_cursor(cursor, "records", "records.opconnect")


def _publisher(
    system: RunningSystem, batches: int, size: int, sent: list[str], errors: list[BaseException]
) -> None:
    try:
        stub = system.ingest()
        for _ in range(batches):
            batch = [record() for _ in range(size)]
            (response,) = publish(stub, [published(r) for r in batch])
            assert response.accepted_count == size
            sent += ids(batch)
    except BaseException as error:
        errors.append(error)


def _read_with_cuts(system: RunningSystem, want: int) -> Iterator[tuple[pb.CallRecord, str]]:
    """Follow from the start, hanging up after every second response and resuming from the
    last cursor received; yields each record with the cursor of its response."""
    cursor = ""
    got = 0
    deadline = time.monotonic() + 60
    while got < want:
        assert time.monotonic() < deadline, f"only {got} of {want} records arrived"
        request = (
            pb.StreamCallRecordsRequest(cursor=cursor, follow=True, max_batch_size=7)
            if cursor
            else pb.StreamCallRecordsRequest(**EPOCH_REQUEST, follow=True, max_batch_size=7)
        )
        follower = Follower(system.records(), request)
        for _ in range(2):
            response = follower.next(timeout=10)
            assert response is not None
            for item in response.records:
                yield item, response.cursor
                got += 1
            cursor = response.cursor
        follower.cancel()


def test_concurrent_publishers_a_resuming_reader_misses_nothing(system: RunningSystem) -> None:
    publishers, batches, size = 4, 6, 5
    sent: list[str] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_publisher, args=(system, batches, size, sent, errors))
        for _ in range(publishers)
    ]
    for thread in threads:
        thread.start()
    received = list(_read_with_cuts(system, publishers * batches * size))
    for thread in threads:
        thread.join()
    assert not errors
    got = ids(r for r, _ in received)
    assert sorted(got) == sorted(sent), "every published record, each once"
    positions = [_position(c) for _, c in received]
    assert positions == sorted(positions), "in log order"
    # The same order as the log itself.
    stored, _, _ = stream_all(system.records(), **EPOCH_REQUEST)
    assert ids(stored) == got


def _stored(system: RunningSystem, tenant: str | None = None) -> list[tuple[int, str, bytes]]:
    """(position, call id, stored body) of the operator's records (of `tenant`), in log order,
    read row by row."""
    sql = "SELECT position, call_id, body FROM call_records WHERE operator_id = ?"
    params: list[Any] = [OPERATOR]
    if tenant is not None:
        sql += " AND tenant_id = ?"
        params.append(tenant)
    rows = system.runtime.db.transaction(driver_fetch, sql + " ORDER BY position", params)
    return [(int(p), str(c), bytes(b)) for p, c, b in rows]


@pytest.mark.parametrize("tenant", [None, TENANT])
def test_a_stream_catching_up_sends_the_stored_records_in_order_in_batches_of_the_size_asked(
    system: RunningSystem, tenant: str | None
) -> None:
    """Read several batches at a time, each batch joined by the database: the same records as
    a row-by-row read, byte for byte, in log order, `max_batch_size` a response (the last may
    be short), each cursor at its last record, among other operators' and tenants' records."""
    batches = [
        [published(record()) for _ in range(20)]
        + [published(record(tenant=OTHER_TENANT)) for _ in range(5)]
        + [published(record(), OTHER_OPERATOR) for _ in range(5)]
        for _ in range(3)
    ]
    for batch in batches:  # interleaved in the log, batch by batch
        batch.sort(key=lambda p: p.record.call_id[-8:])
    assert sum(r.accepted_count for r in publish(system.ingest(), *batches)) == 90
    stored = _stored(system, tenant)
    assert len(stored) == (60 if tenant else 75)
    request = {**EPOCH_REQUEST, "max_batch_size": 7}
    if tenant:
        request["tenant_id"] = tenant
    _, _, responses = stream_all(system.records(), **request)
    if not responses[-1].records:  # the log's head is past them: the stream ends there
        assert _position(responses.pop().cursor) > stored[-1][0]
    assert [len(r.records) for r in responses] == [len(part) for part in chunks(stored, 7)], (
        "full responses of 7, the last short"
    )
    for response, part in zip(responses, chunks(stored, 7), strict=True):
        assert [r.call_id for r in response.records] == [c for _, c, _ in part]
        assert _position(response.cursor) == part[-1][0]
        response.ClearField("cursor")
        assert response.SerializeToString() == b"".join(b for _, _, b in part)


def _bulk(system: RunningSystem, count: int) -> None:
    """Publish `count` records fast (batches of 1,000 on one stream)."""
    batches = [[published(record()) for _ in range(1_000)] for _ in range(count // 1_000)]
    responses = publish(system.ingest(), *batches)
    assert sum(r.accepted_count for r in responses) == count


def test_a_stalled_client_costs_a_bounded_number_of_batches(
    sqlite_system: RunningSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bulk(sqlite_system, 5_000)
    reads: list[int] = []
    real = storage.read_records

    def counting(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        reads.append(len(found))
        return found

    monkeypatch.setattr(storage, "read_records", counting)
    # No BDP probing: the 64 KiB HTTP/2 window is all the transport may buffer.
    channel = sqlite_system.channel(options=[("grpc.http2.bdp_probe", 0)])
    call = CallRecordServiceStub(channel).StreamCallRecords(
        pb.StreamCallRecordsRequest(**EPOCH_REQUEST, max_batch_size=10)
    )
    stream = iter(call)
    first = next(stream)
    time.sleep(1.5)  # the client reads nothing: the server must stop reading ahead
    assert len(first.records) == 10
    assert len(reads) < 40, f"server read {len(reads)} of 500 batches ahead of a stalled client"
    total = len(first.records) + sum(len(r.records) for r in stream)
    assert total == 5_000


def test_clients_that_hang_up_free_their_streams_at_once(session_pki: Pki, tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, session_pki.paths, f"sqlite:///{tmp_path / 'db'}", max_streams_per_operator=2
    )
    running = start_system(settings, session_pki)
    try:
        followers = [
            Follower(running.records(), pb.StreamCallRecordsRequest(follow=True)) for _ in range(2)
        ]
        for follower in followers:
            follower.next()
        with pytest.raises(grpc.RpcError) as caught:
            Follower(running.records(), pb.StreamCallRecordsRequest(follow=True)).next()
        assert rich_error(caught.value).reason == "TOO_MANY_STREAMS"
        for follower in followers:
            follower.cancel()
        # Both slots come free as soon as the server sees the cancellations.
        deadline = time.monotonic() + 5
        while True:
            again = [Follower(running.records(), pb.StreamCallRecordsRequest(follow=True))]
            try:
                again.append(Follower(running.records(), pb.StreamCallRecordsRequest(follow=True)))
                for follower in again:
                    follower.next()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "hung-up streams were not freed"
                time.sleep(0.05)
            finally:
                for follower in again:
                    follower.cancel()
    finally:
        running.stop()


def test_shutdown_ends_record_streams_with_unavailable(session_pki: Pki, tmp_path: Path) -> None:
    running = start_system(
        settings_for(tmp_path, session_pki.paths, f"sqlite:///{tmp_path / 'db'}"), session_pki
    )
    follower = Follower(running.records(), pb.StreamCallRecordsRequest(follow=True))
    opening = follower.next()
    assert opening is not None
    running.stop()
    with pytest.raises(grpc.RpcError) as ended:
        while follower.next() is not None:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_record_published_through_one_replica_reaches_a_stream_on_another(
    session_pki: Pki, tmp_path: Path
) -> None:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url = migrated_postgres(POSTGRES_URL)
    # Heartbeats far apart: the stream on the second replica must be woken, not polled.
    first = start_system(
        settings_for(tmp_path / "a", session_pki.paths, url, heartbeat_interval_s=30), session_pki
    )
    second = start_system(
        settings_for(tmp_path / "b", session_pki.paths, url, heartbeat_interval_s=30), session_pki
    )
    try:
        for running in (first, second):
            listener = running.runtime.listener
            assert listener is not None
            running.call(listener.ready.wait(), timeout=10)
        follower = Follower(second.records(), pb.StreamCallRecordsRequest(follow=True))
        follower.next()  # open, from now
        sent = record()
        publish(first.ingest(), [published(sent)])
        got, _ = follower.records(1, timeout=5)
        follower.cancel()
        assert ids(got) == [sent.call_id]
    finally:
        first.stop()
        second.stop()
