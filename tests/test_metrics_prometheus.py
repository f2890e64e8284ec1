"""A real Prometheus (Debian's `prometheus`) scrapes a running system, in one process and in
separate processes, with deploy/prometheus/alerts.yml loaded; a known workload's figures are
then asked of Prometheus's HTTP API: calls by method and code (on the gateway, its hop and the
service process), records published by outcome and delivered, the stream lag of a stalled
follower back to zero once it catches up, certificate expiry and CRL next updates matching the
PKI's files, every scrape-time family present, the alert rules evaluating cleanly with none
firing. Skipped, saying why, where Prometheus is not installed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from opconnect.numbers.v1 import numbers_pb2
from opconnect.records.v1 import records_pb2
from opconnect.records.v1.records_pb2_grpc import CallRecordServiceStub
from plumbing.metrics import SCRAPE_FAMILIES
from tests.conftest import OPERATOR, Pki, RunningSystem, settings_for, start_system
from tests.helpers import (
    Prometheus,
    metrics_target,
    poll,
    prometheus_tool,
    start_split,
    upload,
)
from tests.records_data import publish, published, record

ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
NUMBERS = "opconnect.numbers.v1.NumberService"
NUMBER = "+14255550177"
BEHIND_GATEWAY = {"numbers", "records", "usage"}
PUBLISHED = 2_000  # far more than a stalled stream's transport can hold
PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


@dataclass
class Watched:
    """A running system (its processes by role) and the Prometheus scraping it."""

    edge: RunningSystem  # where clients call: the one process, or the gateway
    processes: dict[str, RunningSystem]
    prometheus: Prometheus

    def serving(self, service: str) -> str:
        """The role of the process that serves `service` itself."""
        return service if service in self.processes else "all"


@pytest.fixture(scope="module", params=["all", "split"])
def watched(
    request: pytest.FixtureRequest, session_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Watched]:
    prometheus_tool("prometheus")  # skip before starting anything
    directory = tmp_path_factory.mktemp(f"watched-{request.param}")
    url = f"sqlite:///{directory / 'opconnect.db'}"
    if request.param == "all":
        settings = settings_for(directory, session_pki.paths, url, metrics_listen="127.0.0.1:0")
        system = start_system(settings, session_pki)
        processes = {"all": system}
    else:
        split = start_split(session_pki, directory, url, metrics_listen="127.0.0.1:0")
        processes = {
            "gateway": split.gateway,
            "numbers": split.numbers,
            "records": split.records,
            "usage": split.usage,
        }
    targets = {role: [metrics_target(system)] for role, system in processes.items()}
    prometheus = Prometheus(directory / "prometheus", targets, [ALERTS])
    edge = processes["gateway"] if "gateway" in processes else processes["all"]
    yield Watched(edge, processes, prometheus)
    prometheus.stop()
    for system in processes.values():
        system.stop()


def test_calls_are_counted_by_method_and_code(watched: Watched) -> None:
    upload(watched.edge, NUMBER)
    numbers = watched.edge.numbers()
    numbers.GetNumber(numbers_pb2.GetNumberRequest(phone_number=NUMBER), timeout=10)
    for phone_number, code in [
        ("0425", grpc.StatusCode.INVALID_ARGUMENT),
        ("not a number", grpc.StatusCode.INVALID_ARGUMENT),
        ("+14255550000", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            numbers.GetNumber(numbers_pb2.GetNumberRequest(phone_number=phone_number), timeout=10)
        assert caught.value.code() is code

    expected = {"OK": 1.0, "InvalidArgument": 2.0, "NotFound": 1.0}
    roles = [watched.serving("numbers")] + (["gateway"] if "gateway" in watched.processes else [])
    prometheus = watched.prometheus
    for role in roles:
        for code, count in expected.items():
            selector = (
                f'grpc_server_handled_total{{role="{role}",grpc_service="{NUMBERS}",'
                f'grpc_method="GetNumber",grpc_type="unary",grpc_code="{code}"}}'
            )
            assert prometheus.value_when(selector, count) == count, selector
        latency = f'grpc_server_handling_seconds_count{{role="{role}",grpc_method="GetNumber"}}'
        assert prometheus.value_when(latency, 4) == 4, latency
    if "gateway" in watched.processes:  # the gateway's hop, as a client of the numbers process
        for code, count in expected.items():
            selector = (
                f'grpc_client_handled_total{{role="gateway",grpc_service="{NUMBERS}",'
                f'grpc_method="GetNumber",grpc_code="{code}"}}'
            )
            assert prometheus.value_when(selector, count) == count, selector


def test_records_published_delivered_and_a_lagging_stream_catching_up(watched: Watched) -> None:
    prometheus = watched.prometheus
    # A follower that reads nothing yet (an iterator read here, no reader thread): no BDP
    # probing, so the transport holds 64 KiB at most and the stream falls behind the log while
    # records are published.
    channel = watched.edge.channel(options=[("grpc.http2.bdp_probe", 0)])
    call = CallRecordServiceStub(channel).StreamCallRecords(
        records_pb2.StreamCallRecordsRequest(follow=True, max_batch_size=10), timeout=300
    )
    stream = iter(call)
    first = next(stream)  # its "from now" cursor: the stream is open before anything is published
    assert not first.records
    batches = [[published(record()) for _ in range(500)] for _ in range(PUBLISHED // 500)]
    duplicate = batches[0][0]
    refused = published(record(), operator="nobody-registered")
    responses = publish(watched.edge.ingest(), *batches, [duplicate, refused])
    assert sum(r.accepted_count for r in responses) == PUBLISHED

    lag = f'max(opconnect_stream_lag_positions{{operator="{OPERATOR}",kind="records"}})'
    behind = prometheus.wait_for(lag, lambda v: v is not None and v > 0)
    assert behind is not None and behind > 0, "the stalled stream was never seen behind"
    seconds = f'max(opconnect_stream_lag_seconds{{operator="{OPERATOR}",kind="records"}})'
    late = prometheus.wait_for(seconds, lambda v: v is not None and v > 0)
    assert late is not None and late > 0, "the stalled stream's oldest change never aged"
    received = 0
    while received < PUBLISHED:
        received += len(next(stream).records)
    assert received == PUBLISHED
    assert prometheus.value_when(lag, 0) == 0, "caught up, its lag is zero"
    assert prometheus.value_when(seconds, 0) == 0
    call.cancel()

    outcomes = {
        'outcome="accepted"': PUBLISHED,
        'outcome="duplicate"': 1,
        'outcome="refused",reason="OPERATOR_NOT_FOUND"': 1,
    }
    for labels, count in outcomes.items():
        selector = f"sum(opconnect_records_published_total{{{labels}}})"
        assert prometheus.value_when(selector, count) == count, selector
    delivered = f'sum(opconnect_stream_delivered_total{{operator="{OPERATOR}",kind="records"}})'
    assert prometheus.value_when(delivered, PUBLISHED) == PUBLISHED
    # Every record was committed while the stream was open: each one's delivery is timed.
    timed = 'sum(opconnect_delivery_latency_seconds_count{kind="records"})'
    assert prometheus.value_when(timed, PUBLISHED) == PUBLISHED
    head = 'max(opconnect_changelog_head_position{log="records"})'
    assert prometheus.wait_for(head, lambda v: v is not None and v >= PUBLISHED)


def _certificates(path: Path) -> dict[str, float]:
    """notAfter (Unix time) of each certificate of a PEM bundle, by subject (RFC 4514)."""
    return {
        cert.subject.rfc4514_string(): cert.not_valid_after_utc.timestamp()
        for cert in x509.load_pem_x509_certificates(path.read_bytes())
    }


def _crls(path: Path) -> dict[str, float]:
    """nextUpdate (Unix time) of each CRL of a PEM bundle, by issuer (RFC 4514)."""
    crls = [x509.load_pem_x509_crl(pem) for pem in PEM_CRL.findall(path.read_bytes())]
    return {
        crl.issuer.rfc4514_string(): crl.next_update_utc.timestamp()
        for crl in crls
        if crl.next_update_utc is not None
    }


def _due(prometheus: Prometheus, series: str, label: str, want: set[str]) -> dict[str, float]:
    """A seconds-until gauge as the moment it names (its value plus the time of its scrape), by
    `label`, once there is a series for each of `want` (or the last seen)."""

    def read() -> dict[str, float]:
        found = prometheus.query(f"{series} + timestamp({series})")
        return {labels[label]: value for labels, value in found}

    return poll(read, lambda got: got.keys() == want, timeout=60, interval=0.25)


def test_certificate_expiry_and_crl_next_update_match_the_pki(
    watched: Watched, session_pki: Pki
) -> None:
    paths = session_pki.paths
    files = {
        "tls_cert": paths.server_cert,
        "operator_ca": paths.operator_ca_cert,
        "platform_ca": paths.platform_ca_cert,
    }
    crls = _crls(paths.crl)
    assert crls
    for role in watched.processes:
        # A service process behind the gateway also has the gateway's CA in force.
        behind = {"gateway_ca": paths.gateway_ca_cert} if role in BEHIND_GATEWAY else {}
        for name, path in (files | behind).items():
            expected = _certificates(path)
            series = f'opconnect_certificate_expiry_seconds{{role="{role}",file="{name}"}}'
            got = _due(watched.prometheus, series, "subject", set(expected))
            assert got.keys() == expected.keys(), series
            for subject, not_after in expected.items():
                assert got[subject] == pytest.approx(not_after, abs=60), f"{series} {subject}"
        series = f'opconnect_crl_next_update_seconds{{role="{role}"}}'
        got = _due(watched.prometheus, series, "issuer", set(crls))
        assert got.keys() == crls.keys(), series
        for issuer, next_update in crls.items():
            assert got[issuer] == pytest.approx(next_update, abs=60), f"{series} {issuer}"


def test_every_scrape_time_family_reaches_prometheus(watched: Watched) -> None:
    pattern = "|".join(SCRAPE_FAMILIES)

    def scraped() -> set[str]:
        found = watched.prometheus.query(f'count by (__name__) ({{__name__=~"{pattern}"}})')
        return {labels["__name__"] for labels, _ in found}

    missing = set(SCRAPE_FAMILIES) - poll(
        scraped, lambda names: names == set(SCRAPE_FAMILIES), timeout=60, interval=0.25
    )
    assert not missing, f"never scraped: {sorted(missing)}"


def test_the_alert_rules_evaluate_cleanly_and_none_fires(watched: Watched) -> None:
    """Last in the module: the workload's series are all there."""
    prometheus = watched.prometheus

    def rules() -> list[dict[str, object]]:
        groups = prometheus.api("rules", type="alert")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def evaluated(found: list[dict[str, object]]) -> bool:
        return bool(found) and all(rule["health"] != "unknown" for rule in found)

    found = poll(rules, evaluated, timeout=60, interval=0.25)
    assert evaluated(found)
    broken = {str(rule["name"]): rule.get("lastError") for rule in found if rule["health"] != "ok"}
    assert not broken, broken
    firing = prometheus.query('ALERTS{alertstate="firing"}')
    assert not firing, [labels for labels, _ in firing]
