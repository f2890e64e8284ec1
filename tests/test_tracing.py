"""Tracing: a real OTLP exporter in each process sending to an OTLP receiver this module starts
(gRPC, on port 0). In the separate-processes mode one trace holds the caller's context, the
gateway's span, its forwarding hop, the service process's span and its database units; the
usage service's call feed carries its context to the records process; log lines of a traced
call carry its ids; and with tracing off nothing is made or sent."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider

from opconnect.numbers.v1 import numbers_pb2, numbers_pb2_grpc
from plumbing import tracing
from tests.conftest import (
    NO_POSTGRES,
    PLATFORM,
    POSTGRES_URL,
    TENANT,
    Pki,
    migrated_postgres,
    settings_for,
    start_system,
)
from tests.helpers import Split, eventually, poll, start_split
from tests.records_data import publish_records, record

NUMBER = "+14255550142"
UPLOAD = "opconnect.numbers.v1.NumberService/UploadNumbers"
FOLLOW_CALLS = "opconnect.records.v1.CallFeedService/FollowCalls"
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class Seen:
    """A span as the receiver got it, with the `service.name` of the process that sent it."""

    service: str
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: _value(a.value) for a in self.span.attributes}


def _value(value: common_pb2.AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span exported to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Seen] = []
        self.endpoint = ""

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            names = [
                _value(a.value) for a in resource.resource.attributes if a.key == "service.name"
            ]
            with self._lock:
                self._spans += [
                    Seen(names[0] if names else "", span)
                    for scope in resource.scope_spans
                    for span in scope.spans
                ]
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.span.trace_id.hex() == trace_id]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A running OTLP receiver (plain gRPC on the loopback: tests only); the exporters send
    their batches at once rather than every 5 s."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    got = Receiver()
    server = grpc.server(ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(got, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    got.endpoint = f"http://127.0.0.1:{port}"
    yield got
    server.stop(None)


def traced_split(
    test_pki: Pki, directory: Path, receiver: Receiver, url: str | None = None
) -> Split:
    """The four processes of the separate-processes mode, each tracing to `receiver` (on
    SQLite unless `url` is given)."""
    url = url or f"sqlite:///{directory / 'opconnect.db'}"
    return start_split(test_pki, directory, url, otlp_endpoint=receiver.endpoint)


def caller_context() -> tuple[str, str, tuple[tuple[str, str]]]:
    """A caller's own trace: its trace id, its span id, and the metadata that sends them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def upload_request() -> numbers_pb2.UploadNumbersRequest:
    return numbers_pb2.UploadNumbersRequest(
        tenant_id=TENANT,
        numbers=[
            numbers_pb2.NumberUpload(
                phone_number=NUMBER,
                usage=numbers_pb2.NUMBER_USAGE_USER,
                capabilities=numbers_pb2.Capabilities(inbound=True, outbound=True),
                allow_tenant_address_update=True,
            )
        ],
    )


def one(spans: list[Seen], service: str, kind: int, name: str, parent: bytes) -> Seen:
    """The one span sent by `service` of this kind and name, child of `parent`."""
    found = [
        s
        for s in spans
        if (s.service, s.span.kind, s.span.name, s.span.parent_span_id)
        == (service, kind, name, parent)
    ]
    assert len(found) == 1, [(s.service, s.span.name, s.span.kind) for s in spans]
    return found[0]


def rpc_line(capsys: pytest.CaptureFixture[str], status: str) -> dict[str, Any]:
    """The log line of the call answered `status` (written once the answer has gone: waited
    for)."""
    lines: list[dict[str, Any]] = []

    def read() -> list[dict[str, Any]]:
        err = capsys.readouterr().err
        lines.extend(json.loads(line) for line in err.splitlines() if line.startswith("{"))
        return [e for e in lines if e.get("event") == "rpc" and e.get("status") == status]

    (line,) = poll(read, bool)
    return line


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_call_through_the_gateway_is_one_trace(
    session_pki: Pki,
    tmp_path: Path,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    url = None
    if backend == "postgresql":
        if not POSTGRES_URL:
            pytest.skip(NO_POSTGRES)
        url = migrated_postgres(POSTGRES_URL)
    split = traced_split(session_pki, tmp_path, receiver, url)
    try:
        trace_id, caller_span, metadata = caller_context()
        answer = split.gateway.numbers().UploadNumbers(
            upload_request(), metadata=metadata, timeout=10
        )
        assert [r.outcome for r in answer.results] == [numbers_pb2.NUMBER_OUTCOME_DONE]

        def whole(spans: list[Seen]) -> bool:  # each process exports when its spans end
            kinds = {(s.service, s.span.kind, s.span.name) for s in spans}
            return {
                ("opconnect-gateway", SERVER, UPLOAD),
                ("opconnect-gateway", CLIENT, UPLOAD),
                ("opconnect-numbers", SERVER, UPLOAD),
            } <= kinds

        spans = poll(lambda: receiver.spans(trace_id), whole)
        gateway = one(spans, "opconnect-gateway", SERVER, UPLOAD, bytes.fromhex(caller_span))
        hop = one(spans, "opconnect-gateway", CLIENT, UPLOAD, gateway.span.span_id)
        served = one(spans, "opconnect-numbers", SERVER, UPLOAD, hop.span.span_id)
        rpc = {
            "rpc.system": "grpc",
            "rpc.service": "opconnect.numbers.v1.NumberService",
            "rpc.method": "UploadNumbers",
            "rpc.grpc.status_code": 0,
        }
        for span in (gateway, hop, served):
            assert span.attributes == rpc
        # The numbers process's units of work, children of its span; the upload wrote.
        units = [s for s in spans if s.span.parent_span_id == served.span.span_id]
        assert units
        assert {(s.service, s.span.kind) for s in units} == {("opconnect-numbers", CLIENT)}
        assert all(s.span.name.startswith("db ") for s in units)
        assert {s.attributes["db.system"] for s in units} == {backend}
        assert any(s.attributes["opconnect.db.write"] for s in units)
        # Never a number or a tenant in what is exported.
        text = str([s.span for s in spans])
        assert NUMBER not in text
        assert TENANT not in text

        # A refused call's log line carries its trace and the gateway's span of it.
        trace_id, _, metadata = caller_context()
        capsys.readouterr()
        platform = numbers_pb2_grpc.NumberServiceStub(split.gateway.channel("platform", PLATFORM))
        with pytest.raises(grpc.RpcError) as refused:
            platform.UploadNumbers(upload_request(), metadata=metadata, timeout=10)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        line = rpc_line(capsys, "PERMISSION_DENIED")
        assert line["trace_id"] == trace_id
        spans = poll(lambda: receiver.spans(trace_id), lambda spans: len(spans) > 0)
        (span,) = [s for s in spans if s.span.kind == SERVER]
        assert line["span_id"] == span.span.span_id.hex()
        assert span.attributes["opconnect.error.reason"] == "OPERATOR_ONLY"
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    finally:
        split.stop()


def test_the_usage_feed_carries_its_trace_to_the_records_process(
    session_pki: Pki, tmp_path: Path, receiver: Receiver
) -> None:
    split = traced_split(session_pki, tmp_path, receiver)
    try:
        published = publish_records(split.gateway.ingest(), [record()])
        assert published.accepted_count == 1
        follower = split.usage.usage_service.feed
        assert follower is not None
        eventually(lambda: follower.kept >= 1)
    finally:
        split.stop()  # the feed's stream ends: its spans are exported as each process stops

    def both_sides(spans: list[Seen]) -> bool:
        return {s.service for s in spans if s.span.name == FOLLOW_CALLS} >= {
            "opconnect-usage",
            "opconnect-records",
        }

    spans = poll(receiver.spans, both_sides)
    calls = {s.span.span_id: s for s in spans if s.service == "opconnect-usage"}
    served = [s for s in spans if s.service == "opconnect-records" and s.span.name == FOLLOW_CALLS]
    assert served
    for span in served:  # each FollowCalls the records process served: a usage call its parent
        caller = calls[span.span.parent_span_id]
        assert (caller.span.name, caller.span.kind) == (FOLLOW_CALLS, CLIENT)
        assert caller.span.trace_id == span.span.trace_id
        assert span.span.kind == SERVER
    # What the feed kept was stored under its call's span.
    stored = [s for s in spans if s.span.name == "db store_platform_calls"]
    assert any(s.span.parent_span_id in calls for s in stored)


def test_tracing_is_off_unless_configured(
    session_pki: Pki,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # OpenTelemetry's own variables do not turn it on.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    made: list[TracerProvider] = []

    def provider(**options: Any) -> TracerProvider:
        made.append(TracerProvider(**options))
        return made[-1]

    monkeypatch.setattr("plumbing.tracing.TracerProvider", provider)
    url = f"sqlite:///{tmp_path / 'opconnect.db'}"
    system = start_system(settings_for(tmp_path, session_pki.paths, url), session_pki)
    try:
        assert system.runtime.tracing.provider is None
        assert system.runtime.tracing.tracer is None
        assert system.runtime.db.tracer is None
        _, _, metadata = caller_context()
        system.numbers().UploadNumbers(upload_request(), metadata=metadata, timeout=10)
        platform = numbers_pb2_grpc.NumberServiceStub(system.channel("platform", PLATFORM))
        capsys.readouterr()
        with pytest.raises(grpc.RpcError):
            platform.UploadNumbers(upload_request(), metadata=metadata, timeout=10)
        line = rpc_line(capsys, "PERMISSION_DENIED")
        assert "trace_id" not in line
        assert "span_id" not in line
    finally:
        system.stop()
    assert made == []
    assert receiver.spans() == []


@pytest.mark.parametrize(
    ("endpoint", "target", "insecure"),
    [
        ("https://collector.example:4317", "https://collector.example:4317", False),
        ("collector.example:4318", "https://collector.example:4318", False),
        ("https://collector.example", "https://collector.example:4317", False),
        ("http://127.0.0.1:4317", "http://127.0.0.1:4317", True),
        ("http://localhost:4317/", "http://localhost:4317", True),
        ("http://[::1]:4317", "http://[::1]:4317", True),
    ],
)
def test_otlp_endpoints(endpoint: str, target: str, insecure: bool) -> None:
    assert tracing.otlp_target(endpoint) == (target, insecure)


@pytest.mark.parametrize(
    ("endpoint", "refusal"),
    [
        ("http://collector.example:4317", "TLS only"),
        ("http://10.0.0.5:4317", "TLS only"),
        ("ftp://collector.example:4317", "give https"),
        ("https://collector.example:99999", "give https"),
        ("https://collector.example:4317/v1/traces", "no path"),
    ],
)
def test_otlp_endpoints_refused(endpoint: str, refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        tracing.otlp_target(endpoint)
