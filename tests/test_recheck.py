"""A caller is checked again while its call is open: a revoked or suspended caller commits
nothing more (each request message is checked before its handler sees it), every stream ends
within the reload interval whatever its shape (Health.Watch included), and the end of every
audited stream is written whatever ended it. Health and reflection answer any caller whose
certificate chained to a trusted CA, and every refused call's log line names the certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway import pki
from gateway.registry import OperatorStatus
from opconnect.records.v1 import records_pb2 as records_pb
from opconnect.records.v1 import records_pb2_grpc as records_grpc
from opconnect.usage.v1 import usage_pb2 as usage_pb
from plumbing import audit
from plumbing.logs import configure_logging
from tests.conftest import (
    OTHER_OPERATOR,
    PLATFORM,
    REVOKED_OPERATOR,
    Pki,
    RunningSystem,
    StreamReader,
    rich_error,
    settings_for,
    start_system,
)
from tests.helpers import Feed, eventually, stored, usage_stub
from tests.records_data import duration_record, publish_records, published, record, stamp


@pytest.fixture
def start(session_pki: Pki, tmp_path: Path) -> Iterator[Callable[..., RunningSystem]]:
    """The system on SQLite, with the test's PKI and settings; its loop's unhandled errors
    (an exception in a task nobody awaited) are collected in `loop_errors`."""
    started: list[RunningSystem] = []

    def run(the_pki: Pki = session_pki, **changes: Any) -> RunningSystem:
        url = f"sqlite:///{tmp_path / 'opconnect.db'}"
        running = start_system(settings_for(tmp_path, the_pki.paths, url, **changes), the_pki)
        errors: list[dict[str, Any]] = []
        running.loop.call_soon_threadsafe(
            running.loop.set_exception_handler, lambda _loop, context: errors.append(context)
        )
        running.loop_errors = errors  # type: ignore[attr-defined]
        started.append(running)
        return running

    yield run
    for running in started:
        running.stop()


def suspend(system: RunningSystem, operator: str) -> None:
    system.call(system.runtime.registry.set_status(operator, OperatorStatus.SUSPENDED))


def stored_calls(system: RunningSystem) -> list[str]:
    def read(session: sa.orm.Session) -> list[str]:
        rows = session.execute(sa.text("SELECT call_id FROM call_records"))
        return sorted(r[0] for r in rows)

    return system.call(system.runtime.db.run(read))


# --- a refused caller commits nothing more ----------------------------------------------------


def test_a_suspended_operator_commits_no_batch_on_its_open_stream(
    start: Callable[..., RunningSystem],
) -> None:
    system = start()
    feed: Feed[usage_pb.SubmitCallDurationsRequest] = Feed()
    answers = usage_stub(system, OTHER_OPERATOR).SubmitCallDurations(iter(feed), timeout=30)
    first = [duration_record() for _ in range(3)]
    feed.send(usage_pb.SubmitCallDurationsRequest(batch_id="1", records=first))
    assert next(answers).accepted_count == 3
    suspend(system, OTHER_OPERATOR)
    late = [duration_record() for _ in range(3)]
    feed.send(usage_pb.SubmitCallDurationsRequest(batch_id="2", records=late))
    with pytest.raises(grpc.RpcError) as refused:
        next(answers)
    feed.close()
    found = rich_error(refused.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "OPERATOR_SUSPENDED")
    assert stored(system, OTHER_OPERATOR) == sorted(r.record_id for r in first)


def test_a_revoked_platform_caller_publishes_no_batch_on_its_open_stream(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    system = start(own_pki)
    pki.issue_client(own_pki.paths, "platform", "controller")
    controller = system.channel("platform", "controller")
    feed: Feed[records_pb.PublishCallRecordsRequest] = Feed()
    ingest = records_grpc.CallRecordIngestServiceStub(controller)
    answers = ingest.PublishCallRecords(iter(feed), timeout=30)
    first = [record() for _ in range(2)]
    feed.send(records_pb.PublishCallRecordsRequest(batch_id="1", records=map(published, first)))
    assert len(next(answers).results) == 2
    pki.revoke(own_pki.paths, own_pki.paths.client("platform-controller")[0].read_bytes())

    def refused_now() -> bool:  # the server has read the new CRL
        try:
            ingest.PublishCallRecords(iter([]), timeout=10).__next__()
        except StopIteration:
            return False
        except grpc.RpcError as error:
            return rich_error(error).reason == "CERTIFICATE_REVOKED"
        return False

    eventually(refused_now)
    late = [record() for _ in range(2)]
    feed.send(records_pb.PublishCallRecordsRequest(batch_id="2", records=map(published, late)))
    with pytest.raises(grpc.RpcError) as refused:
        next(answers)
    feed.close()
    found = rich_error(refused.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CERTIFICATE_REVOKED")
    assert stored_calls(system) == sorted(r.call_id for r in first)


# --- every stream ends, whatever its shape -------------------------------------------------------


def test_health_watch_ends_when_its_caller_is_suspended_and_frees_its_slot(
    start: Callable[..., RunningSystem],
) -> None:
    system = start(heartbeat_interval_s=3600.0)  # no heartbeat could end it
    health = health_pb2_grpc.HealthStub(system.channel("operator", OTHER_OPERATOR))
    watch: StreamReader[health_pb2.HealthCheckResponse] = StreamReader(
        health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
    )
    first = watch.next()
    assert first is not None and first.status == health_pb2.HealthCheckResponse.SERVING
    streams = system.runtime.streams
    assert streams is not None and streams.open.get(OTHER_OPERATOR) == 1
    suspend(system, OTHER_OPERATOR)
    with pytest.raises(grpc.RpcError) as ended:
        watch.next(timeout=10)
    found = rich_error(ended.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "OPERATOR_SUSPENDED")
    eventually(lambda: OTHER_OPERATOR not in streams.open)


def test_an_idle_record_stream_ends_within_the_reload_interval_of_a_revocation(
    start: Callable[..., RunningSystem], own_pki: Pki
) -> None:
    system = start(own_pki, heartbeat_interval_s=3600.0)  # no heartbeat could end it
    follower: StreamReader[records_pb.StreamCallRecordsResponse] = StreamReader(
        system.records(OTHER_OPERATOR).StreamCallRecords(
            records_pb.StreamCallRecordsRequest(follow=True), timeout=60
        )
    )
    assert follower.next() is not None  # the stream is open: its first heartbeat
    pki.revoke(own_pki.paths, own_pki.paths.client(f"operator-{OTHER_OPERATOR}")[0].read_bytes())
    with pytest.raises(grpc.RpcError) as ended:
        follower.next(timeout=10)
    assert rich_error(ended.value).reason == "CERTIFICATE_REVOKED"


# --- the end of every audited stream is written ------------------------------------------------


def audit_events(system: RunningSystem) -> list[tuple[str, str]]:
    """(principal, status) of every StreamCallRecords audit event, oldest first."""
    system.call(system.audit.flush())
    events = system.call(system.runtime.db.run(audit.list_events, None, None, 100))
    return [(e.principal, e.status) for e in reversed(events) if e.method == "StreamCallRecords"]


def open_follower(system: RunningSystem, **request: Any) -> StreamReader[Any]:
    timeout = request.pop("timeout", 60)
    follower: StreamReader[records_pb.StreamCallRecordsResponse] = StreamReader(
        system.records(OTHER_OPERATOR).StreamCallRecords(
            records_pb.StreamCallRecordsRequest(follow=True, **request), timeout=timeout
        )
    )
    assert follower.next() is not None
    return follower


def ends(follower: StreamReader[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ended:
        while follower.next(timeout=10) is not None:
            pass
    return ended.value.code()


def test_a_stream_ended_by_suspension_is_audited_without_a_stray_task_error(
    start: Callable[..., RunningSystem],
) -> None:
    system = start()
    follower = open_follower(system)
    suspend(system, OTHER_OPERATOR)
    assert ends(follower) == grpc.StatusCode.UNAUTHENTICATED
    principal = f"operator/{OTHER_OPERATOR}"
    eventually(lambda: len(audit_events(system)) == 2)
    assert audit_events(system) == [(principal, "STARTED"), (principal, "UNAUTHENTICATED")]
    system.call(_collect_garbage())
    assert system.loop_errors == []  # type: ignore[attr-defined]


async def _collect_garbage() -> None:
    gc.collect()
    for _ in range(3):
        await asyncio.sleep(0.01)  # let any finalizer task run


@pytest.mark.parametrize("ending", ["cancel", "deadline", "shutdown"])
def test_every_way_a_stream_ends_is_audited(
    start: Callable[..., RunningSystem], ending: str
) -> None:
    system = start()
    follower = open_follower(system, timeout=1.0 if ending == "deadline" else 60)
    principal = f"operator/{OTHER_OPERATOR}"
    if ending == "cancel":
        follower.cancel()
        expected = "CANCELLED"
    elif ending == "deadline":
        assert ends(follower) == grpc.StatusCode.DEADLINE_EXCEEDED
        expected = "DEADLINE_EXCEEDED"
    else:
        log = system.audit
        flushed: list[Any] = []
        original = log.close

        async def close_after_reading() -> None:  # read the table as the server closes it
            await original()
            flushed.extend(await system.runtime.db.run(audit.list_events, None, None, 100))

        log.close = close_after_reading  # type: ignore[method-assign]
        system.call(system.runtime.stop(grace_s=1.0))
        assert ends(follower) == grpc.StatusCode.UNAVAILABLE
        seen = [(e.principal, e.status) for e in reversed(flushed)]
        assert seen == [(principal, "STARTED"), (principal, "UNAVAILABLE")]
        system.runtime.stop = _stopped  # type: ignore[method-assign]
        return
    eventually(lambda: len(audit_events(system)) == 2)
    assert audit_events(system) == [(principal, "STARTED"), (principal, expected)]


async def _stopped(grace_s: float | None = None) -> None:
    """Stands in for a runtime already stopped by the test."""


# --- health and reflection for any caller that chained to a trusted CA ----------------------


def test_health_and_reflection_answer_a_refused_caller_and_the_rpc_says_why(
    start: Callable[..., RunningSystem],
) -> None:
    system = start()
    channel = system.channel("operator", REVOKED_OPERATOR)
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listing,) = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in listing.list_services_response.service}
    assert "opconnect.records.v1.CallRecordService" in names
    with pytest.raises(grpc.RpcError) as refused:
        next(
            system.records(REVOKED_OPERATOR).StreamCallRecords(
                records_pb.StreamCallRecordsRequest(), timeout=10
            )
        )
    found = rich_error(refused.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CERTIFICATE_REVOKED")


def test_a_refused_calls_log_line_names_the_certificate_and_the_reason(
    start: Callable[..., RunningSystem], session_pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    system = start()
    configure_logging("json", "info")
    capsys.readouterr()
    with pytest.raises(grpc.RpcError):
        next(
            system.records(REVOKED_OPERATOR).StreamCallRecords(
                records_pb.StreamCallRecordsRequest(), timeout=10
            )
        )
    platform = records_grpc.CallRecordServiceStub(system.channel("platform", PLATFORM))
    with pytest.raises(grpc.RpcError):  # a platform principal calling an operator RPC
        platform.GetCallRecord(records_pb.GetCallRecordRequest(call_id="x"), timeout=10)
    refused: list[dict[str, Any]] = []

    def both_logged() -> bool:  # the server writes its line after the caller has its answer
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
        refused.extend(line for line in lines if line.get("event") == "rpc")
        return len(refused) >= 2

    eventually(both_logged)
    revoked_pem = session_pki.paths.client(f"operator-{REVOKED_OPERATOR}")[0].read_bytes()
    platform_pem = session_pki.paths.client(f"platform-{PLATFORM}")[0].read_bytes()
    assert {
        (line["status"], line["reason"], line["certificate"], line["serial"]) for line in refused
    } == {
        (
            "UNAUTHENTICATED",
            "CERTIFICATE_REVOKED",
            f"operator/{REVOKED_OPERATOR}",
            f"{pki.serial_of(revoked_pem):x}",
        ),
        (
            "PERMISSION_DENIED",
            "OPERATOR_ONLY",
            f"platform/{PLATFORM}",
            f"{pki.serial_of(platform_pem):x}",
        ),
    }
    assert all(line["level"] == "warning" for line in refused)


EPOCH = stamp(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))


def watchdogs(system: RunningSystem) -> int:
    """The callers' watchdogs still running on the server's loop."""

    async def count() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if not task.done() and "_StreamGuard._watch" in repr(task.get_coro())
        )

    return system.call(count())


def test_a_stream_left_by_its_client_mid_write_stops_being_watched(
    start: Callable[..., RunningSystem],
) -> None:
    """A client that goes while the server writes leaves the handler to gRPC's collector; the
    watchdog must stop with the call, never read its gone context (that crashed the process)."""
    system = start()
    ingest = system.ingest()
    for _ in range(4):
        publish_records(ingest, [record() for _ in range(500)])
    for _ in range(5):
        stream = system.records(OTHER_OPERATOR).StreamCallRecords(
            records_pb.StreamCallRecordsRequest(start_time=EPOCH, follow=True, max_batch_size=1),
            timeout=60,
        )
        next(stream)
        # Read no more: the server, one record a response far ahead, fills the flow-control
        # window and waits inside gRPC's write (the point of the test, not a wait for an event).
        time.sleep(0.5)
        stream.cancel()
    eventually(lambda: watchdogs(system) == 0)
    system.call(_collect_garbage())
    assert system.loop_errors == []  # type: ignore[attr-defined]
