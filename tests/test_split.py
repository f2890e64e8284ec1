"""The separate-processes mode: each service in a server of its own and the gateway forwarding
to them (here each on its own event loop thread, over mutual TLS on port 0, sharing one
database). Every kind of RPC through the gateway (unary, server stream, bidirectional), errors
with their details, the caller's deadline and cancellation reaching the service, who a service
process believes, the usage service following the records process, and a service that is down.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway import pki
from gateway.forward import mirror_health
from gateway.registry import OperatorStatus
from opconnect.numbers.v1 import numbers_pb2, numbers_pb2_grpc
from opconnect.records.v1 import records_pb2, records_pb2_grpc
from opconnect.usage.v1 import usage_pb2
from plumbing.rpc import PRINCIPAL_HEADER
from tests.conftest import (
    NO_POSTGRES,
    OPERATOR,
    OTHER_OPERATOR,
    PLATFORM,
    POSTGRES_URL,
    SUSPENDED_OPERATOR,
    UNKNOWN_OPERATOR,
    Pki,
    RunningSystem,
    StreamReader,
    Watcher,
    reset_postgres,
    rich_error,
    settings_for,
)
from tests.helpers import (
    Feed,
    Split,
    assign,
    eventually,
    free_port,
    start_split,
    stored,
    submit,
    upload,
    usage_stub,
)
from tests.records_data import duration_record, publish_records, record, stamp

NUMBER = "+14255550123"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def split(
    request: pytest.FixtureRequest, session_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Split]:
    """The four processes on one database of each backend."""
    directory = tmp_path_factory.mktemp("split")
    url = f"sqlite:///{directory / 'opconnect.db'}"
    if request.param == "postgres":
        if not POSTGRES_URL:
            pytest.skip(NO_POSTGRES)
        url = reset_postgres(POSTGRES_URL)
    running = start_split(session_pki, directory, url)
    yield running
    running.stop()


def test_numbers_through_the_gateway(split: Split) -> None:
    gateway = split.gateway
    uploaded = upload(gateway, NUMBER)  # unary
    assert [r.outcome for r in uploaded.results] == [numbers_pb2.NUMBER_OUTCOME_DONE]
    listing = gateway.numbers().ListNumbers(numbers_pb2.ListNumbersRequest(), timeout=10)
    watcher = Watcher(  # server stream
        gateway.numbers(), numbers_pb2.WatchAssignmentsRequest(cursor=listing.watch_cursor)
    )
    assign(gateway, NUMBER, sip="sip:alice@contoso.example")
    (event,) = watcher.events(1)
    assert event.phone_number == NUMBER
    watcher.cancel()
    got, call = gateway.numbers().GetNumber.with_call(
        numbers_pb2.GetNumberRequest(phone_number=NUMBER),
        timeout=10,
        metadata=[("x-request-id", "split-test-1")],
    )
    assert got.number.sip_uri == "sip:alice@contoso.example"
    assert ("x-request-id", "split-test-1") in call.trailing_metadata()


def test_errors_come_back_with_their_details(split: Split) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        split.gateway.numbers().GetNumber(
            numbers_pb2.GetNumberRequest(phone_number="0425"), timeout=10
        )
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.domain, error.reason) == ("numbers.opconnect", "PHONE_NUMBER_INVALID")
    assert "phone_number" in error.fields
    # The gateway's own checks answer before any forwarding.
    with pytest.raises(grpc.RpcError) as caught:
        split.gateway.numbers(SUSPENDED_OPERATOR).ListNumbers(
            numbers_pb2.ListNumbersRequest(), timeout=10
        )
    assert rich_error(caught.value).reason == "OPERATOR_SUSPENDED"
    with pytest.raises(grpc.RpcError) as caught:
        records_pb2_grpc.CallRecordServiceStub(
            split.gateway.channel("platform", PLATFORM)
        ).GetCallRecord(records_pb2.GetCallRecordRequest(call_id="x"), timeout=10)
    assert rich_error(caught.value).reason == "OPERATOR_ONLY"


def test_records_and_usage_through_the_gateway(split: Split) -> None:
    gateway = split.gateway
    calls = [record(end=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)) for _ in range(3)]
    published = publish_records(gateway.ingest(), calls)  # bidirectional, as the platform
    assert published.accepted_count == 3
    stream = gateway.records().StreamCallRecords(
        records_pb2.StreamCallRecordsRequest(
            start_time=stamp(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        ),
        timeout=10,
    )
    seen = [r.call_id for response in stream for r in response.records]
    assert seen == [c.call_id for c in calls]

    # The usage process follows the records process for the platform's side.
    stub = usage_stub(gateway)
    (answer,) = submit(stub, [duration_record(call_id="unknown-to-platform-1")])
    assert answer.accepted_count == 1
    start = stamp(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    end = stamp(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))

    def reconciled() -> bool:
        found = stub.GetReconciliation(
            usage_pb2.GetReconciliationRequest(start_time=start, end_time=end), timeout=10
        )
        return (found.platform_only_count, found.operator_only_count) == (3, 1)

    eventually(reconciled)


def test_the_callers_deadline_and_hang_up_reach_the_service(split: Split) -> None:
    records = split.gateway.records()
    follow = records_pb2.StreamCallRecordsRequest(follow=True)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in records.StreamCallRecords(follow, timeout=1.0):
            pass
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    streams = split.records.runtime.streams
    assert streams is not None
    eventually(lambda: not streams.open)
    reader: StreamReader[records_pb2.StreamCallRecordsResponse] = StreamReader(
        records.StreamCallRecords(follow, timeout=60)
    )
    assert reader.next() is not None  # opened: it says where "now" is
    assert streams.open == {OPERATOR: 1}
    reader.cancel()
    eventually(lambda: not streams.open)


def test_a_service_process_believes_only_the_gateway(split: Split) -> None:
    # Through the gateway, a caller's own principal header is dropped: its own data only.
    mine = split.gateway.numbers(OTHER_OPERATOR).ListNumbers(
        numbers_pb2.ListNumbersRequest(),
        timeout=10,
        metadata=[(PRINCIPAL_HEADER, f"operator/{OPERATOR}")],
    )
    assert list(mine.numbers) == []
    # Straight to the service process: operators are refused, a platform caller is itself,
    # and may not name another caller.
    direct = split.numbers
    with pytest.raises(grpc.RpcError) as caught:
        direct.numbers().ListNumbers(numbers_pb2.ListNumbersRequest(), timeout=10)
    assert rich_error(caught.value).reason == "GATEWAY_REQUIRED"
    admin = numbers_pb2_grpc.NumberServiceStub(direct.channel("platform", PLATFORM))
    with pytest.raises(grpc.RpcError) as caught:
        admin.ListNumbers(
            numbers_pb2.ListNumbersRequest(),
            timeout=10,
            metadata=[(PRINCIPAL_HEADER, f"operator/{OPERATOR}")],
        )
    assert rich_error(caught.value).reason == "PRINCIPAL_HEADER_REFUSED"
    with pytest.raises(grpc.RpcError) as caught:
        admin.ListNumbers(numbers_pb2.ListNumbersRequest(), timeout=10)
    assert rich_error(caught.value).reason == "OPERATOR_ONLY"


def own_connection(system: RunningSystem, issued: pki.Issued) -> grpc.Channel:
    """A channel presenting `issued` on a connection no other channel shares."""
    return system.channel(
        cert=(issued.cert_pem, issued.key_pem), options=[("grpc.use_local_subchannel_pool", 1)]
    )


def list_as(channel: grpc.Channel, principal: str | None) -> tuple[grpc.StatusCode, str]:
    """(code, reason) of ListNumbers on `channel`, naming `principal` in the header."""
    metadata = [(PRINCIPAL_HEADER, principal)] if principal else []
    try:
        numbers_pb2_grpc.NumberServiceStub(channel).ListNumbers(
            numbers_pb2.ListNumbersRequest(), timeout=10, metadata=metadata
        )
    except grpc.RpcError as error:
        found = rich_error(error)
        return found.code, found.reason
    return grpc.StatusCode.OK, ""


def test_only_the_pinned_gateway_speaks_for_operators(split: Split, session_pki: Pki) -> None:
    """A certificate named `platform/gateway` from the platform CA is not the gateway: a
    service process pins the gateway's own CA (or certificate), and refuses that one whatever
    it says; the gateway CA, in turn, vouches for the gateway alone."""
    paths = session_pki.paths
    refused = grpc.StatusCode.UNAUTHENTICATED
    impostor = pki.issue_client_cert(pki.load_ca(paths, "platform"), pki.platform_uri("gateway"))
    channel = own_connection(split.numbers, impostor)
    assert list_as(channel, f"operator/{OPERATOR}") == (refused, "GATEWAY_NOT_PINNED")
    assert list_as(channel, None) == (refused, "GATEWAY_NOT_PINNED")
    other = pki.issue_client_cert(pki.load_ca(paths, "gateway"), pki.platform_uri(PLATFORM))
    assert list_as(own_connection(split.numbers, other), f"operator/{OPERATOR}") == (
        refused,
        "ISSUER_NOT_TRUSTED",
    )
    pinned = own_connection(split.numbers, pki.Issued(*session_pki.client("platform", "gateway")))
    assert list_as(pinned, f"operator/{OPERATOR}") == (grpc.StatusCode.OK, "")


def test_a_gateway_pinned_by_its_fingerprint(session_pki: Pki, tmp_path: Path) -> None:
    """Without a gateway CA, a service process believes the certificate whose fingerprint it
    pins, and no other certificate named `gateway`."""
    platform_ca = pki.load_ca(session_pki.paths, "platform")
    gateway = pki.issue_client_cert(platform_ca, pki.platform_uri("gateway"))
    impostor = pki.issue_client_cert(platform_ca, pki.platform_uri("gateway"))
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        gateway_ca_file="",
        gateway_fingerprints=f"{pki.fingerprint_sha256(gateway.cert_pem)}",
    )
    numbers = RunningSystem(settings, session_pki, "numbers")
    try:
        numbers.call(numbers.runtime.registry.add(OTHER_OPERATOR))
        assert list_as(own_connection(numbers, gateway), f"operator/{OTHER_OPERATOR}") == (
            grpc.StatusCode.OK,
            "",
        )
        assert list_as(own_connection(numbers, impostor), f"operator/{OTHER_OPERATOR}") == (
            grpc.StatusCode.UNAUTHENTICATED,
            "GATEWAY_NOT_PINNED",
        )
    finally:
        numbers.stop()


def test_what_a_service_process_makes_of_the_gateways_word(split: Split) -> None:
    """Straight to the numbers process with the gateway's own certificate: the principal
    header names the caller, checked like a certificate (registered, active, well formed)."""
    numbers = numbers_pb2_grpc.NumberServiceStub(split.numbers.channel("platform", "gateway"))

    def list_as(principal: str) -> numbers_pb2.ListNumbersResponse:
        response = numbers.ListNumbers(
            numbers_pb2.ListNumbersRequest(), timeout=10, metadata=[(PRINCIPAL_HEADER, principal)]
        )
        return cast(numbers_pb2.ListNumbersResponse, response)

    assert list_as(f"operator/{OTHER_OPERATOR}").numbers is not None
    for principal, reason in (
        (f"operator/{SUSPENDED_OPERATOR}", "OPERATOR_SUSPENDED"),
        ("operator/never-registered", "OPERATOR_UNKNOWN"),
        (f"customer/{OPERATOR}", "PRINCIPAL_INVALID"),
        ("operator/", "PRINCIPAL_INVALID"),
        ("operator/Not_A_Name", "PRINCIPAL_INVALID"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            list_as(principal)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), principal
    with pytest.raises(grpc.RpcError) as caught:  # the gateway as itself: a platform caller
        numbers.ListNumbers(numbers_pb2.ListNumbersRequest(), timeout=10)
    assert rich_error(caught.value).reason == "OPERATOR_ONLY"


def test_the_callers_deadline_and_metadata_reach_the_service(
    session_pki: Pki, tmp_path: Path
) -> None:
    """A stand-in numbers process records what the gateway sends it."""
    seen: dict[str, Any] = {}

    def get_number(
        request: numbers_pb2.GetNumberRequest, context: grpc.ServicerContext
    ) -> numbers_pb2.GetNumberResponse:
        seen["time_remaining"] = context.time_remaining()
        seen["metadata"] = dict(context.invocation_metadata())
        return numbers_pb2.GetNumberResponse()

    paths = session_pki.paths
    stand_in = grpc.server(ThreadPoolExecutor(2))
    stand_in.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opconnect.numbers.v1.NumberService",
                {
                    "GetNumber": grpc.unary_unary_rpc_method_handler(
                        get_number,
                        request_deserializer=numbers_pb2.GetNumberRequest.FromString,
                        response_serializer=numbers_pb2.GetNumberResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    port = stand_in.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
            root_certificates=paths.gateway_ca_cert.read_bytes(),
            require_client_auth=True,
        ),
    )
    stand_in.start()
    gateway_cert, gateway_key = pki.issue_client(paths, "platform", "gateway")
    settings = settings_for(
        tmp_path,
        paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        numbers_target=f"localhost:{port}",
        internal_ca_file=str(paths.ca_cert),
        internal_cert_file=str(gateway_cert),
        internal_key_file=str(gateway_key),
    )
    gateway = RunningSystem(settings, session_pki, "gateway")
    try:
        gateway.call(gateway.runtime.registry.add(OPERATOR, "", session_pki.anchors()))
        gateway.numbers().GetNumber(
            numbers_pb2.GetNumberRequest(phone_number=NUMBER),
            timeout=5,
            metadata=[
                ("x-client-tag", "abc"),
                ("x-request-id", "deadline-1"),
                (PRINCIPAL_HEADER, f"operator/{OTHER_OPERATOR}"),  # not the gateway's to pass
            ],
        )
    finally:
        gateway.stop()
        stand_in.stop(None)
    assert 0 < seen["time_remaining"] <= 5
    metadata = seen["metadata"]
    assert metadata[PRINCIPAL_HEADER] == f"operator/{OPERATOR}"
    assert (metadata["x-client-tag"], metadata["x-request-id"]) == ("abc", "deadline-1")


def test_health_on_the_gateway_and_each_service(split: Split) -> None:
    for system in (split.gateway, *split.services()):
        health = health_pb2_grpc.HealthStub(system.channel("platform", PLATFORM))
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # The gateway's health of each service is that service process's own.
    health = health_pb2_grpc.HealthStub(split.gateway.channel("platform", PLATFORM))
    for name in ("opconnect.numbers.v1.NumberService", "opconnect.usage.v1.UsageReportService"):
        eventually(functools.partial(serving, health, name))


def serving(health: health_pb2_grpc.HealthStub, service: str) -> bool:
    answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_service_that_is_down_answers_unavailable(session_pki: Pki, tmp_path: Path) -> None:
    paths = session_pki.paths
    gateway_cert, gateway_key = pki.issue_client(paths, "platform", "gateway")
    settings = settings_for(
        tmp_path,
        paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        usage_target="localhost:1",  # nothing listens there
        internal_ca_file=str(paths.ca_cert),
        internal_cert_file=str(gateway_cert),
        internal_key_file=str(gateway_key),
    )
    gateway = RunningSystem(settings, session_pki, "gateway")
    try:
        gateway.call(gateway.runtime.registry.add(OPERATOR, "", session_pki.anchors()))
        with pytest.raises(grpc.RpcError) as caught:
            usage_stub(gateway).GetUsageSummary(usage_pb2.GetUsageSummaryRequest(), timeout=10)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
        assert error.retry_delay_s is not None
        health = health_pb2_grpc.HealthStub(gateway.channel("platform", PLATFORM))
        assert not serving(health, "opconnect.usage.v1.UsageService")
        # A service with no target is not served at all.
        with pytest.raises(grpc.RpcError) as caught:
            gateway.numbers().ListNumbers(numbers_pb2.ListNumbersRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        gateway.stop()


def test_a_suspension_ends_a_forwarded_stream(split: Split) -> None:
    """The gateway checks the caller again at each message it forwards (heartbeats too)."""
    registry = split.gateway.runtime.registry
    split.gateway.call(registry.add(UNKNOWN_OPERATOR, "", split.gateway.pki.anchors()))
    stream = split.gateway.records(UNKNOWN_OPERATOR).StreamCallRecords(
        records_pb2.StreamCallRecordsRequest(follow=True), timeout=30
    )
    reader: StreamReader[records_pb2.StreamCallRecordsResponse] = StreamReader(stream)
    assert reader.next() is not None
    split.gateway.call(registry.set_status(UNKNOWN_OPERATOR, OperatorStatus.SUSPENDED))
    with pytest.raises(grpc.RpcError) as caught:
        while reader.next() is not None:
            pass
    assert rich_error(caught.value).reason == "OPERATOR_SUSPENDED"
    streams = split.records.runtime.streams
    assert streams is not None
    eventually(lambda: UNKNOWN_OPERATOR not in streams.open)


def test_a_gateway_shutting_down_ends_its_streams_with_unavailable(
    split: Split, session_pki: Pki
) -> None:
    """A gateway stopping (a deploy) ends the streams it forwards with UNAVAILABLE /
    SHUTTING_DOWN, the status clients resume on, not CANCELLED; the service frees them."""
    other = RunningSystem(split.gateway_settings, session_pki, "gateway")
    stream = other.records().StreamCallRecords(
        records_pb2.StreamCallRecordsRequest(follow=True), timeout=30
    )
    reader: StreamReader[records_pb2.StreamCallRecordsResponse] = StreamReader(stream)
    assert reader.next() is not None
    other.stop()
    with pytest.raises(grpc.RpcError) as caught:
        while reader.next() is not None:
            pass
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    streams = split.records.runtime.streams
    assert streams is not None
    eventually(lambda: not streams.open)


def test_a_suspension_refuses_the_next_batch_through_the_gateway(split: Split) -> None:
    """A batch sent after the caller's suspension never reaches the service: nothing of it is
    committed, and the caller is told why."""
    operator = "late-operator"
    pki.issue_client(split.gateway.pki.paths, "operator", operator)
    registry = split.gateway.runtime.registry
    split.gateway.call(registry.add(operator, "", split.gateway.pki.anchors()))
    feed: Feed[usage_pb2.SubmitCallDurationsRequest] = Feed()
    answers = usage_stub(split.gateway, operator).SubmitCallDurations(iter(feed), timeout=30)
    first = [duration_record() for _ in range(2)]
    feed.send(usage_pb2.SubmitCallDurationsRequest(batch_id="1", records=first))
    assert next(answers).accepted_count == 2
    split.gateway.call(registry.set_status(operator, OperatorStatus.SUSPENDED))
    feed.send(usage_pb2.SubmitCallDurationsRequest(batch_id="2", records=[duration_record()]))
    with pytest.raises(grpc.RpcError) as refused:
        next(answers)
    feed.close()
    found = rich_error(refused.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "OPERATOR_SUSPENDED")
    assert stored(split.usage, operator) == sorted(r.record_id for r in first)


async def test_the_gateway_logs_a_service_lost_once_and_its_recovery(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Separate processes start in any order: until a service answers, the gateway says so once
    (not once a second), and says when it answers."""
    port = free_port()
    gateway_side = HealthServicer()
    name = "opconnect.usage.v1.UsageService"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")  # tests only: a bare health server
    mirror = asyncio.create_task(mirror_health(channel, [name], gateway_side, retry_s=0.05))
    service = grpc.aio.server()
    try:
        await asyncio.sleep(0.5)  # several retries while nothing listens
        own = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(own, service)
        service.add_insecure_port(f"127.0.0.1:{port}")
        await service.start()
        await own.set("", health_pb2.HealthCheckResponse.SERVING)
        request = health_pb2.HealthCheckRequest(service=name)
        for _ in range(200):
            answer = await gateway_side.Check(request, None)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        mirror.cancel()
        await asyncio.gather(mirror, return_exceptions=True)
        await service.stop(None)
        await channel.close()
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines() if line]
    assert events.count("service health unknown; retrying until it answers") == 1
    assert events.count("service health known again") == 1
