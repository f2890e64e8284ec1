"""Helpers shared by the test modules (which never import one another): waiting for an event,
feeding a client stream, the clients' common calls per service, and systems started in shapes of
their own (a usage service following the call feed, the separate-processes mode). Fixtures live
in conftest.py; call records and duration records to send in records_data.py."""

from __future__ import annotations

import datetime as dt
import queue
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from gateway import pki
from gateway.registry import OperatorStatus
from opconnect.numbers.v1 import numbers_pb2
from opconnect.usage.v1 import usage_pb2, usage_pb2_grpc
from plumbing.config import Settings
from services.usage import feed
from services.usage import tables as usage_tables
from tests.conftest import (
    OPERATOR,
    OTHER_OPERATOR,
    SUSPENDED_OPERATOR,
    TENANT,
    USER_ID,
    Pki,
    RunningSystem,
    settings_for,
    start_system,
)

T = TypeVar("T")
M = TypeVar("M")

# --- waiting for an event --------------------------------------------------------------------


def poll(read: Callable[[], T], until: Callable[[T], bool], timeout: float = 10) -> T:
    """Call `read` until `until` holds for what it returns or `timeout` seconds pass; the last
    value read (so that an assertion on it shows what was seen)."""
    deadline = time.monotonic() + timeout
    while not until(value := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until `check()` is true; fail when `timeout` seconds pass first."""
    name = getattr(check, "__qualname__", repr(check))
    assert poll(check, bool, timeout), f"{name} was still false after {timeout} s"


def moment() -> dt.datetime:
    """A moment strictly after every reading of the clock before the call and strictly before
    every reading after it (it waits the microsecond or two the clock takes to move on)."""
    before = dt.datetime.now(dt.UTC)
    while (now := dt.datetime.now(dt.UTC)) <= before:
        pass
    while dt.datetime.now(dt.UTC) <= now:
        pass
    return now


# --- client streams ----------------------------------------------------------------------------


class Feed(Generic[M]):
    """Request messages handed to a client stream one at a time, by the test."""

    def __init__(self) -> None:
        self._queue: queue.Queue[M | None] = queue.Queue()

    def send(self, message: M) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[M]:
        while (message := self._queue.get()) is not None:
            yield message


# --- numbers -----------------------------------------------------------------------------------

USER = numbers_pb2.NUMBER_USAGE_USER
BOTH = numbers_pb2.Capabilities(inbound=True, outbound=True)


def upload(
    system: RunningSystem,
    *numbers: str,
    tenant: str = TENANT,
    usage: numbers_pb2.NumberUsage.ValueType = USER,
) -> numbers_pb2.UploadNumbersResponse:
    request = numbers_pb2.UploadNumbersRequest(
        tenant_id=tenant,
        numbers=[
            numbers_pb2.NumberUpload(phone_number=n, usage=usage, capabilities=BOTH)
            for n in numbers
        ],
    )
    return cast(numbers_pb2.UploadNumbersResponse, system.numbers().UploadNumbers(request))


def assign(
    system: RunningSystem,
    number: str,
    sip: str = "sip:+14255550100@sbc1.contoso.example;user=phone",
    tenant: str = TENANT,
) -> numbers_pb2.AssignNumberResponse:
    response = system.admin().AssignNumber(
        numbers_pb2.AssignNumberRequest(
            phone_number=number,
            tenant_id=tenant,
            sip_uri=sip,
            target=numbers_pb2.AssignmentTarget(
                kind=numbers_pb2.AssignmentTarget.KIND_USER, id=USER_ID
            ),
        )
    )
    return cast(numbers_pb2.AssignNumberResponse, response)


# --- usage -------------------------------------------------------------------------------------


def usage_stub(system: RunningSystem, operator: str = OPERATOR) -> usage_pb2_grpc.UsageServiceStub:
    return usage_pb2_grpc.UsageServiceStub(system.channel("operator", operator))


def submit(
    stub: usage_pb2_grpc.UsageServiceStub, *batches: list[usage_pb2.CallDurationRecord]
) -> list[usage_pb2.SubmitCallDurationsResponse]:
    """Submit batches on one stream; the responses, one per batch."""
    requests = (
        usage_pb2.SubmitCallDurationsRequest(batch_id=f"b{i}", records=batch)
        for i, batch in enumerate(batches)
    )
    return list(stub.SubmitCallDurations(requests, timeout=30))


def stored(system: RunningSystem, operator: str = OPERATOR) -> list[str]:
    """The record ids the operator has stored."""

    def read(session: sa.orm.Session) -> list[str]:
        c = usage_tables.DURATIONS.c
        query = sa.select(c.record_id).where(c.operator_id == operator).order_by(c.record_id)
        return list(session.scalars(query))

    return system.call(system.runtime.db.run(read))


def feed_system(test_pki: Pki, directory: Path, url: str | None = None) -> RunningSystem:
    """A system whose usage service follows the call feed as the test PKI's platform client."""
    cert, key = test_pki.paths.client("platform-admin-center")
    settings = settings_for(
        directory,
        test_pki.paths,
        url or f"sqlite:///{directory / 'opconnect.db'}",
        feed_ca_file=str(test_pki.paths.ca_cert),
        feed_cert_file=str(cert),
        feed_key_file=str(key),
    )
    return start_system(settings, test_pki)


def kept(system: RunningSystem) -> dict[str, dict[str, Any]]:
    """The platform's calls the usage service has learnt from the feed, by call id."""

    def read(session: sa.orm.Session) -> dict[str, dict[str, Any]]:
        rows = session.execute(sa.select(usage_tables.PLATFORM_CALLS)).mappings()
        return {row["call_id"]: dict(row) for row in rows}

    return system.call(system.runtime.db.run(read))


async def start_follower(follower: feed.CallFeedFollower) -> None:
    """Start a call feed follower (on the system's loop: `system.call(start_follower(...))`)."""
    follower.start()


# --- the separate-processes mode ---------------------------------------------------------------


@dataclass
class Split:
    gateway: RunningSystem
    numbers: RunningSystem
    records: RunningSystem
    usage: RunningSystem
    gateway_settings: Settings

    def services(self) -> list[RunningSystem]:
        return [self.numbers, self.records, self.usage]

    def stop(self) -> None:
        for system in (self.gateway, *self.services()):
            system.stop()


def start_split(test_pki: Pki, directory: Path, url: str, **changes: Any) -> Split:
    """The three service processes and a gateway in front of them, on one database (every
    process with the settings `changes`)."""
    paths = test_pki.paths
    gateway_cert, gateway_key = pki.issue_client(paths, "platform", "gateway")
    usage_cert, usage_key = pki.issue_client(paths, "platform", "usage")
    base = settings_for(directory, paths, url, **changes)
    numbers = RunningSystem(base, test_pki, "numbers")
    records = RunningSystem(base, test_pki, "records")
    usage = RunningSystem(
        base.replace(
            records_target=records.address,
            feed_ca_file=str(paths.ca_cert),
            feed_cert_file=str(usage_cert),
            feed_key_file=str(usage_key),
        ),
        test_pki,
        "usage",
    )
    gateway_settings = base.replace(
        numbers_target=numbers.address,
        records_target=records.address,
        usage_target=usage.address,
        internal_ca_file=str(paths.ca_cert),
        internal_cert_file=str(gateway_cert),
        internal_key_file=str(gateway_key),
    )
    gateway = RunningSystem(gateway_settings, test_pki, "gateway")
    registry = gateway.runtime.registry
    for ident in (OPERATOR, OTHER_OPERATOR, SUSPENDED_OPERATOR):
        gateway.call(registry.add(ident, "", test_pki.anchors()))
    gateway.call(registry.set_status(SUSPENDED_OPERATOR, OperatorStatus.SUSPENDED))
    return Split(gateway, numbers, records, usage, gateway_settings)


# --- PKI layouts -------------------------------------------------------------------------------


def make_one_ca_pki(directory: Path) -> pki.Issued:
    """A development PKI as it was before the operator, platform and gateway CAs: one CA
    (returned) signing the server certificate and the development client pairs."""
    clients = directory / "clients"
    clients.mkdir(parents=True)
    old = pki.create_ca("opconnect dev CA")
    pki.write_public(directory / "ca.pem", old.cert_pem)
    pki.write_private(directory / "ca.key", old.key_pem)
    server = pki.issue_server_cert(old, ["localhost"], ["127.0.0.1", "::1"])
    pki.write_public(directory / "server.pem", server.cert_pem)
    pki.write_private(directory / "server.key", server.key_pem)
    for name, uri in [
        ("operator-contoso-telecom", pki.operator_uri("contoso-telecom")),
        ("platform-admin-center", pki.platform_uri("admin-center")),
    ]:
        pair = pki.issue_client_cert(old, uri)
        pki.write_public(clients / f"{name}.pem", pair.cert_pem)
        pki.write_private(clients / f"{name}.key", pair.key_pem)
    pki.write_public(directory / "revoked.json", b"[]\n")
    pki.write_public(directory / "crl.pem", pki.make_crl(old, []))
    return old


# --- metrics -----------------------------------------------------------------------------------

Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(system: RunningSystem) -> dict[Sample, float]:
    """One scrape of a running process's metrics endpoint: every sample by name and labels."""
    endpoint = system.runtime.metrics_endpoint
    assert endpoint is not None, "metrics_listen is not set"
    with urllib.request.urlopen(endpoint.url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """The value of the one sample `name` with exactly `labels` (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def samples_of(samples: dict[Sample, float], name: str, **labels: str) -> dict[Sample, float]:
    """Every sample `name` whose labels include `labels`."""
    want = set(labels.items())
    return {key: value for key, value in samples.items() if key[0] == name and want <= key[1]}
