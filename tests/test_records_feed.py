"""CallFeedService.FollowCalls: every operator's calls for the platform's own systems, in log
order, resumable, live, and closed to operators."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    PLATFORM,
    RunningSystem,
    StreamReader,
    rich_error,
)
from tests.records_data import INBOUND, OUTBOUND, publish_records, record


def feed(system: RunningSystem, ident: str = PLATFORM) -> pb_grpc.CallFeedServiceStub:
    return pb_grpc.CallFeedServiceStub(system.channel("platform", ident))


def follow(system: RunningSystem, **request: object) -> StreamReader[pb.FollowCallsResponse]:
    return StreamReader(feed(system).FollowCalls(pb.FollowCallsRequest(**request)))  # type: ignore[arg-type]


def calls(
    reader: StreamReader[pb.FollowCallsResponse], count: int
) -> tuple[list[pb.CallFact], str]:
    found: list[pb.CallFact] = []
    cursor = ""
    while len(found) < count:
        response = reader.next()
        assert response is not None
        found += response.calls
        cursor = response.cursor
    return found, cursor


def test_every_operators_calls_in_log_order_with_their_facts(system: RunningSystem) -> None:
    answered = record(direction=OUTBOUND, caller="+14255550100", callee="+33142685300")
    unanswered = record(answered=False)
    theirs = record(direction=INBOUND)
    publish_records(system.ingest(), [answered, unanswered])
    publish_records(system.ingest(), [theirs], operator=OTHER_OPERATOR)
    reader = follow(system, from_oldest=True, max_batch_size=2)
    try:
        got, cursor = calls(reader, 3)
    finally:
        reader.cancel()
    assert [(f.operator_id, f.call_id) for f in got] == [
        (OPERATOR, answered.call_id),
        (OPERATOR, unanswered.call_id),
        (OTHER_OPERATOR, theirs.call_id),
    ]
    first, second, _ = got
    assert first.direction == OUTBOUND and first.tenant_id == answered.tenant_id
    assert first.answer_time == answered.answer_time
    assert first.invite_time == answered.invite_time
    assert first.duration.ToMilliseconds() == answered.duration.ToMilliseconds()
    assert first.publish_time.ToDatetime(dt.UTC) <= dt.datetime.now(dt.UTC)
    assert not second.HasField("answer_time") and second.duration.ToMilliseconds() == 0
    # Resuming from the last cursor: only what came after.
    later = record()
    publish_records(system.ingest(), [later])
    reader = follow(system, cursor=cursor)
    try:
        got, _ = calls(reader, 1)
    finally:
        reader.cancel()
    assert [f.call_id for f in got] == [later.call_id]


def test_from_now_live_with_heartbeats(sqlite_system: RunningSystem) -> None:
    publish_records(sqlite_system.ingest(), [record()])  # before: not sent
    reader = follow(sqlite_system)
    try:
        opening = reader.next()
        assert opening is not None and not opening.calls and opening.cursor
        live = record()
        publish_records(sqlite_system.ingest(), [live], operator=OTHER_OPERATOR)
        got, _ = calls(reader, 1)
        assert [f.call_id for f in got] == [live.call_id]
        heartbeat = reader.next(timeout=5)
        assert heartbeat is not None and not heartbeat.calls and heartbeat.cursor
    finally:
        reader.cancel()


def test_the_feed_is_for_the_platform_only_and_checks_its_requests(
    sqlite_system: RunningSystem,
) -> None:
    as_operator = pb_grpc.CallFeedServiceStub(sqlite_system.channel("operator", OPERATOR))
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(as_operator.FollowCalls(pb.FollowCallsRequest(from_oldest=True))))
    assert rich_error(caught.value).reason == "PLATFORM_ONLY"
    for request, reason in (
        (pb.FollowCallsRequest(cursor="nope"), "CURSOR_INVALID"),
        (pb.FollowCallsRequest(max_batch_size=-1), "MAX_BATCH_SIZE_INVALID"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(feed(sqlite_system).FollowCalls(request, timeout=5)))
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
