"""Each process's Prometheus endpoint: RPC metrics by method, type and code (go-grpc-prometheus
names), the gateway's forwarding hop as a client, refusals per operator, database units, trust
expiry; off unless `metrics_listen` is set, and never plain HTTP off the loopback."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from gateway import pki
from opconnect.numbers.v1 import numbers_pb2 as pb
from opconnect.records.v1 import records_pb2 as records_pb
from plumbing.metrics import Metrics, observe_many
from tests.conftest import (
    OPERATOR,
    PLATFORM,
    Pki,
    RunningSystem,
    settings_for,
    start_system,
)
from tests.helpers import eventually, sample, samples_of, scrape, start_split, upload
from tests.records_data import publish_records, record

NUMBERS = "opconnect.numbers.v1.NumberService"
RECORDS = "opconnect.records.v1.CallRecordService"
HEALTH = "grpc.health.v1.Health"
NUMBER = "+14255550100"


@pytest.fixture
def measured(session_pki: Pki, tmp_path: Path) -> Iterator[RunningSystem]:
    """The one-process system with metrics on, and a small rate limit to run into."""
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        metrics_listen="127.0.0.1:0",
        rate_per_operator=0.001,
        rate_burst=30,
    )
    running = start_system(settings, session_pki)
    yield running
    running.stop()


def test_rpcs_are_counted_by_method_type_and_code(measured: RunningSystem) -> None:
    upload(measured, NUMBER)
    numbers = measured.numbers()
    numbers.GetNumber(pb.GetNumberRequest(phone_number=NUMBER))
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as bad:
            numbers.GetNumber(pb.GetNumberRequest(phone_number="not a number"))
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    publish_records(measured.ingest(), [record(), record()])
    start = Timestamp(seconds=0)
    listed = list(
        measured.records().StreamCallRecords(
            records_pb.StreamCallRecordsRequest(start_time=start, follow=False)
        )
    )

    got = scrape(measured)
    unary = {"grpc_service": NUMBERS, "grpc_method": "GetNumber", "grpc_type": "unary"}
    assert sample(got, "grpc_server_started_total", **unary) == 3
    assert sample(got, "grpc_server_handled_total", **unary, grpc_code="OK") == 1
    assert sample(got, "grpc_server_handled_total", **unary, grpc_code="InvalidArgument") == 2
    assert sample(got, "grpc_server_handling_seconds_count", **unary) == 3
    assert sample(got, "grpc_server_msg_received_total", **unary) == 3
    assert sample(got, "grpc_server_msg_sent_total", **unary) == 1  # errors send no message
    follow = {"grpc_service": RECORDS, "grpc_method": "StreamCallRecords"}
    stream = {**follow, "grpc_type": "server_stream"}
    assert sample(got, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert sample(got, "grpc_server_msg_sent_total", **stream) == len(listed) >= 1
    # The stream is over: open streams back to zero for its operator.
    assert sample(got, "opconnect_streams_open", **follow, operator=OPERATOR) == 0
    # Units of database work, timed by kind.
    assert sample(got, "opconnect_db_unit_seconds_count", kind="write") >= 1
    assert sample(got, "opconnect_db_unit_seconds_count", kind="read") >= 3
    # The same work by unit: the publish's write under its storage function's name.
    assert (
        sample(got, "opconnect_db_unit_busy_seconds_total", kind="write", unit="publish_many") > 0
    )
    units = {
        dict(key[1])["unit"] for key in samples_of(got, "opconnect_db_unit_busy_seconds_total")
    }
    assert "<lambda>" not in units and "unit" not in units  # every unit is named
    publish = {"kind": "write", "unit": "publish_many"}
    assert sample(got, "opconnect_db_unit_cpu_seconds_total", **publish) > 0
    assert samples_of(got, "opconnect_db_pool_connections", state="idle")
    # The records log's head lock, held from allocation to commit: one publish.
    assert sample(got, "opconnect_changelog_lock_hold_seconds_count", log="records") == 1
    assert sample(got, "opconnect_changelog_lock_hold_seconds_sum", log="records") > 0
    # That publish's batch was committed as a group of one.
    assert sample(got, "opconnect_commit_group_batches_count", log="records") == 1
    assert sample(got, "opconnect_commit_group_batches_sum", log="records") == 1
    # No label carries a number, a tenant or a request id.
    values = {value for key in got for _, value in key[1]}
    assert NUMBER not in values and "not a number" not in values


def test_an_open_stream_is_counted_per_operator_until_it_ends(measured: RunningSystem) -> None:
    watch = {"grpc_service": NUMBERS, "grpc_method": "WatchAssignments", "operator": OPERATOR}
    call = measured.numbers().WatchAssignments(pb.WatchAssignmentsRequest())
    try:
        next(iter(call))  # the stream is open (its first answer came)
        assert sample(scrape(measured), "opconnect_streams_open", **watch) == 1
    finally:
        call.cancel()
    deadline = time.monotonic() + 10
    while sample(scrape(measured), "opconnect_streams_open", **watch) != 0:
        assert time.monotonic() < deadline, "the stream was never counted as closed"
        time.sleep(0.05)
    got = scrape(measured)
    assert samples_of(
        got,
        "grpc_server_handled_total",
        grpc_code="Canceled",
        **{"grpc_method": "WatchAssignments"},
    )


def test_refusals_at_the_gate_are_counted_per_operator(measured: RunningSystem) -> None:
    numbers = measured.numbers()
    codes = []
    for _ in range(60):  # the bucket holds 30 and refills at 0.001/s
        try:
            numbers.ListNumbers(pb.ListNumbersRequest())
        except grpc.RpcError as error:
            codes.append(error.code())
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    refused = len(codes)
    assert refused >= 29
    got = scrape(measured)
    assert (
        sample(got, "opconnect_calls_refused_total", operator=OPERATOR, reason="RATE_LIMITED")
        == refused
    )
    assert (
        sample(
            got,
            "grpc_server_handled_total",
            grpc_service=NUMBERS,
            grpc_method="ListNumbers",
            grpc_type="unary",
            grpc_code="ResourceExhausted",
        )
        == refused
    )


def test_certificate_expiry_and_registry_are_read_at_scrape(
    measured: RunningSystem, session_pki: Pki
) -> None:
    got = scrape(measured)
    server = x509.load_pem_x509_certificate(session_pki.paths.server_cert.read_bytes())
    (exported,) = samples_of(got, "opconnect_certificate_expiry_seconds", file="tls_cert").values()
    expected = server.not_valid_after_utc.timestamp() - time.time()
    assert abs(exported - expected) < 60
    for name, path in (
        ("operator_ca", session_pki.paths.operator_ca_cert),
        ("platform_ca", session_pki.paths.platform_ca_cert),
    ):
        ca = x509.load_pem_x509_certificate(path.read_bytes())
        subject = ca.subject.rfc4514_string()
        value = sample(got, "opconnect_certificate_expiry_seconds", file=name, subject=subject)
        assert abs(value - (ca.not_valid_after_utc.timestamp() - time.time())) < 60
    crl = samples_of(got, "opconnect_crl_next_update_seconds")
    assert crl and all(value > 0 for value in crl.values())
    assert sample(got, "opconnect_registry_operators", state="active") == 3
    assert sample(got, "opconnect_registry_operators", state="suspended") == 1
    assert sample(got, "opconnect_deny_list_entries") == 0


def test_a_changed_trust_file_counts_a_reload(session_pki: Pki, tmp_path: Path) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        metrics_listen="127.0.0.1:0",
        deny_list_file=str(deny),
    )
    running = start_system(settings, session_pki)
    try:
        (tmp_path / "deny.new").write_text("0x1234\n# a comment\n" + "ab" * 32 + "\n")
        (tmp_path / "deny.new").replace(deny)
        deadline = time.monotonic() + 10
        while sample(scrape(running), "opconnect_deny_list_entries") != 2:
            assert time.monotonic() < deadline, "the new deny list was never in force"
            time.sleep(0.05)
        got = scrape(running)
        assert sample(got, "opconnect_trust_reloads_total", file="deny_list", result="ok") == 1
        (tmp_path / "deny.new").write_text("not a serial\n")
        (tmp_path / "deny.new").replace(deny)
        deadline = time.monotonic() + 10
        while not sample(
            scrape(running), "opconnect_trust_reloads_total", file="deny_list", result="failed"
        ):
            assert time.monotonic() < deadline, "the bad deny list was never counted"
            time.sleep(0.05)
        assert sample(scrape(running), "opconnect_deny_list_entries") == 2  # the old one holds
    finally:
        running.stop()


def test_the_gateway_counts_its_forwarding_hop(session_pki: Pki, tmp_path: Path) -> None:
    split = start_split(
        session_pki,
        tmp_path,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        metrics_listen="127.0.0.1:0",
    )
    try:
        numbers = split.gateway.numbers()
        with pytest.raises(grpc.RpcError) as missing:
            numbers.GetNumber(pb.GetNumberRequest(phone_number=NUMBER))
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        unary = {"grpc_service": NUMBERS, "grpc_method": "GetNumber", "grpc_type": "unary"}

        def counted() -> bool:
            # Each process counts a call once it has ended there, which may be just after the
            # caller has its answer: wait for the three counts before reading the figures.
            hop, served = scrape(split.gateway), scrape(split.numbers)
            done = {**unary, "grpc_code": "NotFound"}
            return (
                sample(hop, "grpc_client_handled_total", **done) >= 1
                and sample(hop, "grpc_server_handled_total", **done) >= 1
                and sample(served, "grpc_server_handled_total", **done) >= 1
            )

        eventually(counted)
        hop = scrape(split.gateway)
        assert sample(hop, "grpc_client_started_total", **unary) == 1
        assert sample(hop, "grpc_client_handled_total", **unary, grpc_code="NotFound") == 1
        assert sample(hop, "grpc_client_handling_seconds_count", **unary) == 1
        # The gateway's own server side, and the numbers process's, each count the call once.
        assert sample(hop, "grpc_server_handled_total", **unary, grpc_code="NotFound") == 1
        served = scrape(split.numbers)
        assert sample(served, "grpc_server_handled_total", **unary, grpc_code="NotFound") == 1
        assert sample(served, "grpc_client_started_total", **unary) == 0
        # The client certificates each process presents are watched too.
        (internal,) = samples_of(
            hop, "opconnect_certificate_expiry_seconds", file="internal_cert"
        ).values()
        assert internal > 0
        (feed,) = samples_of(
            scrape(split.usage), "opconnect_certificate_expiry_seconds", file="feed_cert"
        ).values()
        assert feed > 0
    finally:
        split.stop()


def test_metrics_are_off_unless_configured(sqlite_system: RunningSystem) -> None:
    assert sqlite_system.runtime.metrics_endpoint is None
    assert not sqlite_system.runtime.metrics.enabled
    assert sqlite_system.runtime.metrics.text() == ""


def test_off_the_loopback_metrics_need_a_platform_client_certificate(
    session_pki: Pki, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        Metrics().serve("0.0.0.0:0")
    settings = settings_for(
        tmp_path,
        session_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        metrics_listen="0.0.0.0:0",
    )
    running = start_system(settings, session_pki)
    try:
        endpoint = running.runtime.metrics_endpoint
        assert endpoint is not None and endpoint.scheme == "https"
        url = f"https://localhost:{endpoint.port}/metrics"
        anonymous = ssl.create_default_context(cafile=str(session_pki.paths.ca_cert))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, context=anonymous, timeout=10).read()
        # An operator's certificate is refused: scrapers are platform systems.
        operator = client_context(session_pki, tmp_path, "operator", OPERATOR)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, context=operator, timeout=10).read()
        scraper = client_context(session_pki, tmp_path, "platform", PLATFORM)
        with urllib.request.urlopen(url, context=scraper, timeout=10) as answer:
            assert answer.status == 200
            assert b"opconnect_registry_operators" in answer.read()
    finally:
        running.stop()


def client_context(test_pki: Pki, directory: Path, kind: str, ident: str) -> ssl.SSLContext:
    """A TLS client trusting the test PKI's server CA, presenting the certificate of `ident`."""
    cert_pem, key_pem = test_pki.client(kind, ident)
    cert, key = directory / f"{kind}-{ident}.pem", directory / f"{kind}-{ident}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context = ssl.create_default_context(cafile=str(test_pki.paths.ca_cert))
    context.load_cert_chain(cert, key)
    return context


def test_failure_series_exist_at_zero_from_the_start(measured: RunningSystem) -> None:
    """Alerts use increase(): a failure series first seen at 1 would never count, so every
    failure a process can have is exported at 0 from its start."""
    got = scrape(measured)
    for kind in ("read", "write"):
        for reason in ("busy", "unavailable"):
            key = (
                "opconnect_db_unit_failures_total",
                frozenset({("kind", kind), ("reason", reason)}),
            )
            assert got[key] == 0
    for service in ("numbers", "records", "usage"):
        key = (
            "opconnect_purge_runs_total",
            frozenset({("service", service), ("result", "failed")}),
        )
        assert got[key] == 0
    failed = samples_of(got, "opconnect_trust_reloads_total", result="failed")
    files = {dict(key[1])["file"] for key in failed}
    assert {"tls_cert", "tls_key", "operator_ca", "platform_ca", "crl"} <= files
    assert set(failed.values()) == {0}


def served_serial(port: int, scraper: ssl.SSLContext) -> int:
    """The serial of the certificate the metrics endpoint on `port` presents now."""
    with (
        socket.create_connection(("localhost", port), timeout=10) as raw,
        scraper.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_metrics_endpoint_takes_a_rotated_certificate_without_restart(
    own_pki: Pki, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path,
        own_pki.paths,
        f"sqlite:///{tmp_path / 'opconnect.db'}",
        metrics_listen="0.0.0.0:0",
    )
    running = start_system(settings, own_pki)
    try:
        endpoint = running.runtime.metrics_endpoint
        assert endpoint is not None
        scraper = client_context(own_pki, tmp_path, "platform", PLATFORM)
        before = served_serial(endpoint.port, scraper)
        assert before == pki.serial_of(own_pki.paths.server_cert.read_bytes())
        pki.rotate_server_cert(own_pki.paths, ["localhost"], ["127.0.0.1"])
        after = pki.serial_of(own_pki.paths.server_cert.read_bytes())
        assert after != before
        assert served_serial(endpoint.port, scraper) == after  # the next connection: no restart
        url = f"https://localhost:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, context=scraper, timeout=10) as answer:
            assert answer.status == 200
    finally:
        running.stop()


@pytest.mark.unit
def test_a_batch_observed_at_once_counts_as_each_value_observed_alone() -> None:
    """`observe_many` writes a histogram child's buckets directly (prometheus-client's layout):
    the same text as observing one by one, bucket edges included, or an upgrade broke it."""
    values = [0.0, 0.005, 0.0051, 0.01, 0.3, 1.0, 299.0, 300.0, 301.0, 1e9]
    one, many = Metrics(), Metrics()
    for value in values:
        one.delivery_seconds.labels("records").observe(value)
    observe_many(many.delivery_seconds.labels("records"), values)
    assert many.text() == one.text()
    assert "opconnect_delivery_latency_seconds_count" in one.text()
