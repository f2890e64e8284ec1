"""Several replicas of every role on one PostgreSQL database: the separate-processes mode with
two gateways, two numbers, two records and two usage processes (each on its own event loop
thread, over mutual TLS on port 0). Each gateway reaches every replica of a service through one
target naming them all (round_robin); records published on both records processes reach their
operator's followers on both gateways once each; a follower cut from one gateway resumes on the
other from its last cursor without a gap; durations submitted through both usage processes are
stored once; an assignment through one gateway wakes a watcher on the other; a client naming
both gateways spreads its calls; and a replica that is down is skipped.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from opconnect.numbers.v1 import numbers_pb2, numbers_pb2_grpc
from opconnect.records.v1 import records_pb2 as pb
from opconnect.records.v1 import records_pb2_grpc as pb_grpc
from plumbing.balancing import balanced, one_address
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_OPERATOR,
    POSTGRES_URL,
    Pki,
    RunningSystem,
    Watcher,
    reset_postgres,
)
from tests.helpers import (
    Replicas,
    assign,
    eventually,
    kept,
    samples_of,
    scrape,
    several,
    start_replicas,
    stored,
    submit,
    upload,
    usage_stub,
)
from tests.records_data import (
    Follower,
    chunks,
    duration_record,
    ids,
    publish,
    publish_records,
    published,
    record,
)

OPERATORS = (OPERATOR, OTHER_OPERATOR)


@pytest.fixture(scope="module")
def replicas(session_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url = reset_postgres(POSTGRES_URL)
    running = start_replicas(session_pki, tmp_path_factory.mktemp("replicas"), url)
    for system in running.processes():
        if system.runtime.listener is not None:
            system.call(system.runtime.listener.ready.wait(), timeout=10)
    yield running
    running.stop()


def test_a_channel_to_several_replicas_spreads_calls_and_checks_one_name() -> None:
    listed = dict(balanced("ipv4:10.0.0.5:5001,10.0.0.6:5001"))
    assert json.loads(listed["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    assert listed["grpc.default_authority"] == "10.0.0.5:5001"  # not the whole list
    named = dict(balanced("ipv4:10.0.0.5:5001,10.0.0.6:5001", "records.internal"))
    assert named["grpc.default_authority"] == "records.internal"
    for one in ("localhost:5001", "dns:///records.internal:5001", "ipv4:10.0.0.5:5001"):
        assert "grpc.default_authority" not in dict(balanced(one))  # gRPC's own: the host
    # One address of each, for a tool that talks to one (buf curl).
    assert one_address("ipv4:10.0.0.5:5001,10.0.0.6:5001") == "10.0.0.5:5001"
    assert one_address("dns:///records.internal:5001") == "records.internal:5001"
    assert one_address("localhost:5001") == "localhost:5001"


def started(system: RunningSystem, method: str) -> float:
    """RPCs of `method` this process has started as a server (its metrics)."""
    found = samples_of(scrape(system), "grpc_server_started_total", grpc_method=method)
    return sum(found.values())


def recent() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)


def test_records_published_on_both_records_processes_reach_each_follower_once(
    replicas: Replicas,
) -> None:
    followers = {
        (index, operator): Follower(
            gateway.records(operator), pb.StreamCallRecordsRequest(follow=True)
        )
        for index, gateway in enumerate(replicas.gateways)
        for operator in OPERATORS
    }
    for follower in followers.values():
        assert follower.next() is not None  # open: it says where "now" is
    expected: dict[str, list[str]] = {operator: [] for operator in OPERATORS}
    streams = []  # 3 publishers through each gateway, 2 batches each, both operators' records
    for gateway in replicas.gateways:
        for _ in range(3):
            batches = []
            for _ in range(2):
                batch = [published(record(end=recent()), operator) for operator in OPERATORS * 5]
                for item in batch:
                    expected[item.operator_id].append(item.record.call_id)
                batches.append(batch)
            streams.append((gateway.ingest(), batches))
    with ThreadPoolExecutor(len(streams)) as pool:
        answers = list(pool.map(lambda stream: publish(stream[0], *stream[1]), streams))
    assert [a.accepted_count for batch in answers for a in batch] == [10] * 12
    again = [publish(gateway.ingest(), streams[0][1][0])[0] for gateway in replicas.gateways]
    assert [(a.accepted_count, a.duplicate_count) for a in again] == [(0, 10), (0, 10)]
    for (_, operator), follower in followers.items():
        got, _ = follower.records(len(expected[operator]))
        assert Counter(ids(got)) == Counter(expected[operator]), operator
        tail = follower.next()  # the next heartbeat: nothing more, nothing twice
        assert tail is not None and not tail.records
        follower.cancel()
    for records in replicas.records:  # calls spread over both records processes
        assert started(records, "PublishCallRecords") > 0
        assert started(records, "StreamCallRecords") > 0


def _drain(follower: Follower) -> tuple[list[str], str, grpc.StatusCode]:
    """Read a stream to its end: the call ids it delivered, its last cursor, how it ended."""
    seen: list[str] = []
    cursor = ""
    while True:
        try:
            response = follower.next()
        except grpc.RpcError as error:
            return seen, cursor, error.code()
        if response is None:
            return seen, cursor, grpc.StatusCode.OK
        seen += ids(response.records)
        cursor = response.cursor


def test_a_follower_cut_from_one_gateway_resumes_on_the_other_without_a_gap(
    replicas: Replicas, session_pki: Pki
) -> None:
    """A gateway taken down while it forwards a follower: the follower resumes from its last
    cursor on a channel naming both gateways, which skips the one that is down."""
    doomed = RunningSystem(replicas.gateway_settings, session_pki, "gateway")
    first, second = replicas.gateways
    follower = Follower(doomed.records(), pb.StreamCallRecordsRequest(follow=True))
    opened = follower.next()
    assert opened is not None
    calls = [record(end=recent()) for _ in range(40)]
    publish_records(first.ingest(), calls[:20])
    got, cursor = follower.records(20)
    publish_records(second.ingest(), calls[20:30])
    doomed.stop()  # mid-stream: what it had not forwarded is read again after the cursor
    rest, last, ended = _drain(follower)
    assert ended is grpc.StatusCode.UNAVAILABLE
    seen = ids(got) + rest
    cursor = last or cursor
    publish_records(first.ingest(), calls[30:])
    channel = gateway_channel(replicas, [doomed, second])
    resumed = Follower(
        pb_grpc.CallRecordServiceStub(channel),
        pb.StreamCallRecordsRequest(follow=True, cursor=cursor),
    )
    more, _ = resumed.records(40 - len(seen))
    resumed.cancel()
    channel.close()
    assert Counter(seen + ids(more)) == Counter(ids(calls))


def gateway_channel(replicas: Replicas, gateways: list[RunningSystem]) -> grpc.Channel:
    """An operator's channel to every one of `gateways`, calls spread (round_robin)."""
    cert, key = replicas.gateways[0].pki.client("operator", OPERATOR)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=replicas.gateways[0].pki.paths.ca_cert.read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )
    target = several(gateways)
    return grpc.secure_channel(target, credentials, options=balanced(target))


def test_a_client_naming_both_gateways_spreads_its_calls(replicas: Replicas) -> None:
    """Over both gateways, and from each over both numbers processes."""
    processes = [*replicas.gateways, *replicas.numbers]
    before = [started(process, "ListNumbers") for process in processes]
    with gateway_channel(replicas, replicas.gateways) as channel:
        stub = numbers_pb2_grpc.NumberServiceStub(channel)

        def all_reached() -> bool:  # once the connections are up, calls alternate
            stub.ListNumbers(numbers_pb2.ListNumbersRequest(), timeout=10)
            counts = [started(process, "ListNumbers") for process in processes]
            return all(a > b for a, b in zip(counts, before, strict=True))

        eventually(all_reached)


def test_durations_through_both_usage_processes_are_stored_once(replicas: Replicas) -> None:
    durations = [duration_record() for _ in range(30)]
    answers = [
        answer
        for gateway in replicas.gateways
        for batch in chunks(durations, 5)
        for answer in submit(usage_stub(gateway), batch)
    ]
    first, again = answers[:6], answers[6:]  # through the other gateway: each a duplicate
    assert [(a.accepted_count, a.duplicate_count) for a in first] == [(5, 0)] * 6
    assert [(a.accepted_count, a.duplicate_count) for a in again] == [(0, 5)] * 6
    assert stored(replicas.usage[0]) == sorted(d.record_id for d in durations)
    for usage in replicas.usage:
        assert started(usage, "SubmitCallDurations") > 0


def test_an_assignment_through_one_gateway_wakes_a_watcher_on_the_other(
    replicas: Replicas,
) -> None:
    first, second = replicas.gateways
    numbers = [f"+1425555{i:04d}" for i in range(200, 206)]
    upload(first, *numbers)
    watcher = Watcher(second.numbers())
    watcher.next()  # open, from now
    for number in numbers:  # spread over both numbers processes: half of them cross replicas
        assign(first, number)
    events = watcher.events(len(numbers))
    watcher.cancel()
    assert sorted(e.phone_number for e in events) == numbers
    assert {e.type for e in events} == {numbers_pb2.ASSIGNMENT_EVENT_TYPE_ASSIGNED}
    for process in replicas.numbers:
        assert started(process, "AssignNumber") > 0


def test_a_records_replica_that_is_down_is_skipped(replicas: Replicas) -> None:
    """Last: it takes a records process down. The gateways' calls go to the other, and the
    usage processes follow its call feed instead."""
    replicas.records[0].stop()
    call = record(end=recent())
    for gateway in replicas.gateways:
        for _ in range(3):
            assert publish_records(gateway.ingest(), [record(end=recent())]).accepted_count == 1
    assert publish_records(replicas.gateways[0].ingest(), [call]).accepted_count == 1
    for gateway in replicas.gateways:
        for _ in range(4):
            found = gateway.records().GetCallRecord(
                pb.GetCallRecordRequest(call_id=call.call_id), timeout=10
            )
            assert found.record.call_id == call.call_id
    eventually(lambda: call.call_id in kept(replicas.usage[0]), timeout=30)
