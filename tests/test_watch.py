"""WatchAssignments: live follow, heartbeats, resume with no gap, list-then-watch, expiry,
bounded memory for a slow client, clean shutdown, and concurrent writers."""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from sqlalchemy import Table
from sqlalchemy.orm import Session

from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.numbers.v1.numbers_pb2_grpc import NumberServiceStub
from plumbing.changelog import allocate, decode_cursor
from services.numbers import storage
from services.numbers.rules import DOMAIN, LOG
from tests.conftest import (
    OTHER_OPERATOR,
    TENANT,
    USER_ID,
    Pki,
    RunningSystem,
    Watcher,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import assign, upload

ASSIGNED, UNASSIGNED, UPDATED = (
    pb.ASSIGNMENT_EVENT_TYPE_ASSIGNED,
    pb.ASSIGNMENT_EVENT_TYPE_UNASSIGNED,
    pb.ASSIGNMENT_EVENT_TYPE_UPDATED,
)


def watch(
    system: RunningSystem, cursor: str = "", operator: str = "contoso-telecom", batch: int = 0
) -> Watcher:
    request = pb.WatchAssignmentsRequest(cursor=cursor, max_batch_size=batch)
    return Watcher(system.numbers(operator), request)


def position(cursor: str) -> int:
    return decode_cursor(cursor, LOG, DOMAIN)


def test_watch_from_now_follows_live(system: RunningSystem) -> None:
    upload(system, "+14255550100")
    watcher = watch(system)
    started = watcher.next()
    assert not started.events, "a watch from now opens with a heartbeat carrying its cursor"
    assign(system, "+14255550100")
    assign(system, "+14255550100", sip="sip:+14255550100@sbc2.contoso.example")
    system.admin().UnassignNumber(
        pb.UnassignNumberRequest(phone_number="+14255550100", tenant_id=TENANT)
    )
    events = watcher.events(3)
    watcher.cancel()
    assert [e.type for e in events] == [ASSIGNED, UPDATED, UNASSIGNED]
    assert [e.sip_uri for e in events] == [
        "sip:+14255550100@sbc1.contoso.example;user=phone",
        "sip:+14255550100@sbc2.contoso.example",
        "",
    ]
    assert events[0].target == pb.AssignmentTarget(kind=pb.AssignmentTarget.KIND_USER, id=USER_ID)
    assert all(e.tenant_id == TENANT and e.phone_number == "+14255550100" for e in events)
    positions = [position(e.cursor) for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 3


def test_heartbeat_carries_a_newer_cursor_past_other_operators_changes(
    system: RunningSystem,
) -> None:
    listing = system.numbers().ListNumbers(pb.ListNumbersRequest())
    watcher = watch(system, cursor=listing.watch_cursor)
    # Another operator's change moves the log on; this watcher must not see it, but its heartbeat
    # cursor moves past it.
    system.numbers(OTHER_OPERATOR).UploadNumbers(
        pb.UploadNumbersRequest(
            tenant_id=TENANT,
            numbers=[
                pb.NumberUpload(
                    phone_number="+12065550100",
                    usage=pb.NUMBER_USAGE_USER,
                    capabilities=pb.Capabilities(inbound=True, outbound=True),
                    allow_tenant_address_update=True,
                )
            ],
        )
    )
    assign(system, "+12065550100")
    deadline = time.monotonic() + 10
    while True:
        beat = watcher.next()
        assert not beat.events
        if position(beat.cursor) > position(listing.watch_cursor) or time.monotonic() > deadline:
            break
    watcher.cancel()
    assert position(beat.cursor) == position(listing.watch_cursor) + 1


def test_resume_after_a_cut_misses_nothing_and_repeats_nothing(system: RunningSystem) -> None:
    numbers = [f"+1425555{i:04d}" for i in range(10)]
    upload(system, *numbers)
    start = system.numbers().ListNumbers(pb.ListNumbersRequest()).watch_cursor
    expected: list[tuple[str, int]] = []
    for n in numbers:
        assign(system, n)
        expected.append((n, ASSIGNED))
    for n in numbers[:5]:
        system.admin().UnassignNumber(pb.UnassignNumberRequest(phone_number=n, tenant_id=TENANT))
        expected.append((n, UNASSIGNED))

    seen: list[tuple[str, int]] = []
    cursor = start
    for _ in range(20):  # cut the stream after every second batch of 3
        watcher = watch(system, cursor=cursor, batch=3)
        for _ in range(2):
            response = watcher.next()
            seen += [(e.phone_number, e.type) for e in response.events]
            cursor = response.cursor
        watcher.cancel()
        if len(seen) >= len(expected):
            break
    assert seen == expected


def test_list_then_watch_sees_exactly_the_later_changes(system: RunningSystem) -> None:
    upload(system, "+14255550100", "+14255550101")
    assign(system, "+14255550100")
    listing = system.numbers().ListNumbers(pb.ListNumbersRequest(page_size=1))
    assign(system, "+14255550101")  # after the listing
    watcher = watch(system, cursor=listing.watch_cursor)
    events = watcher.events(1)
    watcher.cancel()
    assert [(e.phone_number, e.type) for e in events] == [("+14255550101", ASSIGNED)]


def test_a_cursor_older_than_retention_expires(system: RunningSystem) -> None:
    upload(system, "+14255550100")
    old = system.numbers().ListNumbers(pb.ListNumbersRequest()).watch_cursor
    assign(system, "+14255550100")
    future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    purged = system.call(system.runtime.db.run(storage.purge_events, future, write=True))
    assert purged == 1
    watcher = watch(system, cursor=old)
    with pytest.raises(grpc.RpcError) as expired:
        watcher.next()
    error = rich_error(expired.value)
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CURSOR_EXPIRED",
        DOMAIN,
    )
    # Relist: the new cursor works.
    fresh = system.numbers().ListNumbers(pb.ListNumbersRequest()).watch_cursor
    watcher = watch(system, cursor=fresh)
    system.admin().UnassignNumber(
        pb.UnassignNumberRequest(phone_number="+14255550100", tenant_id=TENANT)
    )
    assert [e.type for e in watcher.events(1)] == [UNASSIGNED]
    watcher.cancel()


def _bulk_events(session: Session, operator: str, count: int) -> None:
    first = allocate(session, LOG, count)
    stamp = dt.datetime.now(dt.UTC)
    session.execute(
        cast(Table, storage.NumberEventRow.__table__).insert(),
        [
            {
                "position": first + i,
                "operator_id": operator,
                "tenant_id": TENANT,
                "phone_number": f"+1425{i:07d}",
                "type": "assigned",
                "sip_uri": f"sip:+1425{i:07d}@sbc1.contoso.example",
                "target_kind": "user",
                "target_id": USER_ID,
                "occurred_at": stamp,
            }
            for i in range(count)
        ],
    )


def test_a_slow_client_costs_a_bounded_number_of_batches(
    system: RunningSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = storage.read_events

    def counting(*args: object, **kwargs: object) -> list[object]:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        reads.append(len(found))
        return found  # type: ignore[return-value]

    monkeypatch.setattr(storage, "read_events", counting)
    start = system.numbers().ListNumbers(pb.ListNumbersRequest()).watch_cursor
    system.call(system.runtime.db.run(_bulk_events, "contoso-telecom", 20_000, write=True))
    # A client that does not let its receive window grow (no BDP probing): the 64 KiB HTTP/2
    # window is all the transport may buffer, so what the server reads ahead shows directly.
    channel = system.channel(options=[("grpc.http2.bdp_probe", 0)])
    call = NumberServiceStub(channel).WatchAssignments(
        pb.WatchAssignmentsRequest(cursor=start, max_batch_size=100)
    )
    stream = iter(call)
    first = next(stream)
    time.sleep(1.5)  # the client reads nothing: the server must stop reading ahead
    read_ahead = len(reads)
    assert len(first.events) == 100
    assert read_ahead < 20, f"server read {read_ahead} of 200 batches ahead of a stalled client"
    total = len(first.events)
    for response in stream:
        total += len(response.events)
        if total >= 20_000:
            break
    call.cancel()
    assert total == 20_000


def test_shutdown_ends_streams_with_unavailable(session_pki: Pki, tmp_path: Path) -> None:
    running = start_system(
        settings_for(tmp_path, session_pki.paths, f"sqlite:///{tmp_path / 'db'}"), session_pki
    )
    watcher = watch(running)
    assert not watcher.next().events  # open: a watch from now starts with a heartbeat
    running.stop()
    deadline = time.monotonic() + 10
    with pytest.raises(grpc.RpcError) as ended:
        while time.monotonic() < deadline:
            watcher.next()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


def _changes(
    system: RunningSystem, numbers: list[str], rounds: int, errors: list[BaseException]
) -> None:
    admin = system.admin()
    try:
        for _ in range(rounds):
            for n in numbers:
                assign(system, n)
                admin.UnassignNumber(pb.UnassignNumberRequest(phone_number=n, tenant_id=TENANT))
    except BaseException as error:
        errors.append(error)


def _read_with_cuts(system: RunningSystem, cursor: str, want: int) -> Iterator[pb.AssignmentEvent]:
    got = 0
    while got < want:
        watcher = watch(system, cursor=cursor, batch=7)
        for _ in range(3):
            response = watcher.next(timeout=30)
            cursor = response.cursor
            got += len(response.events)
            yield from response.events
            if got >= want:
                break
        watcher.cancel()


def test_concurrent_writers_a_resuming_watcher_misses_no_committed_change(
    system: RunningSystem,
) -> None:
    writers, numbers_each, rounds = 4, 5, 4
    numbers = [[f"+1425{w:03d}{i:04d}" for i in range(numbers_each)] for w in range(writers)]
    upload(system, *(n for group in numbers for n in group))
    start = system.numbers().ListNumbers(pb.ListNumbersRequest()).watch_cursor
    total = writers * numbers_each * rounds * 2
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_changes, args=(system, group, rounds, errors)) for group in numbers
    ]
    for thread in threads:
        thread.start()
    events = list(_read_with_cuts(system, start, total))
    for thread in threads:
        thread.join()
    assert not errors
    positions = [position(e.cursor) for e in events]
    assert positions == sorted(set(positions)), "delivered in order, each once"
    read = functools.partial(storage.read_events, operator_id="contoso-telecom", tenant_id=None)
    stored = system.call(system.runtime.db.run(read, position(start), 10**12, 10**6))
    assert positions == [e.position for e in stored], "every committed change was delivered"
    per_number: dict[str, list[int]] = {}
    for e in events:
        per_number.setdefault(e.phone_number, []).append(e.type)
    assert len(per_number) == writers * numbers_each
    assert all(types == [ASSIGNED, UNASSIGNED] * rounds for types in per_number.values())
