"""What a service is to the process that runs it: one small public face per service.

Each service folder has a `service.py` with one class derived from `Service`: which protobuf
file it serves and who may call each of its RPCs (`access`), how it adds its handlers to a
server (`register`), the background work it runs while serving (`start`, `stop`) and how it
deletes what is past its retention (`purge`). The composition root (`app/`) builds processes
from a list of these and knows nothing else of a service; a service never imports another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from opentelemetry.trace import Tracer

from plumbing.changelog import Notifier, Streams
from plumbing.config import Settings
from plumbing.db import Database
from plumbing.metrics import Metrics
from plumbing.rpc import Access, access_rules


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate a process presents: the channel credentials and the file of the
    certificate (whose expiry is watched)."""

    credentials: grpc.ChannelCredentials
    cert_file: Path


def client_certificate(ca: Path, cert: Path, key: Path) -> ClientCertificate:
    """Channel credentials from PEM files: the server's CA, a client certificate and its key."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return ClientCertificate(credentials, cert)


@dataclass(frozen=True)
class Host:
    """What a process gives the services it runs."""

    server: grpc.aio.Server
    db: Database
    notifier: Notifier
    settings: Settings
    # The registry's word on an operator id (records: a record for an unknown one is refused).
    known_operator: Callable[[str], Awaitable[bool]]
    # False while cross-replica change notifications may be missed (read caches stand aside).
    cache_usable: Callable[[], bool]
    # A platform client certificate `name` and its credentials (the development PKI makes one
    # on demand); None where there is no development PKI.
    platform_credentials: Callable[[str], ClientCertificate | None]
    # Tell the process of a client certificate a service presents to others (by the setting it
    # comes from, e.g. `feed_cert`): its expiry is exported with the trust files'.
    present_certificate: Callable[[str, Path], None]
    # The services this process serves itself (by `Service.name`).
    serves: frozenset[str]
    # This process's own address, once it listens ("" before).
    address: Callable[[], str]
    # Where the service counts what it does (plumbing.metrics; no-ops when metrics are off).
    metrics: Metrics
    # The open streams on change logs, for their metrics: every `follow_log` is given it.
    streams: Streams
    # Where its gRPC clients make spans (plumbing.tracing); None: tracing is off.
    tracer: Tracer | None = None


class Service:
    """One service's public face (see the module docstring). A subclass sets `name` and
    `protos` and overrides what it needs; one instance is made per process."""

    name: ClassVar[str]
    protos: ClassVar[FileDescriptor]
    # Further protobuf files of the same service (one package, more than one file).
    more_protos: ClassVar[tuple[FileDescriptor, ...]] = ()
    # Who may call each protobuf service of `protos` (by its short name).
    rules: ClassVar[dict[str, Access]]

    @classmethod
    def descriptors(cls) -> list[ServiceDescriptor]:
        """The protobuf services it serves."""
        return [d for f in cls.files() for d in f.services_by_name.values()]

    @classmethod
    def access(cls) -> dict[str, Access]:
        """The access rule of every method, keyed by full method name."""
        found = {d.name: d for d in cls.descriptors()}
        return access_rules({found[s]: a for s, a in cls.rules.items()})

    @classmethod
    def files(cls) -> tuple[FileDescriptor, ...]:
        """Every protobuf file it serves."""
        return (cls.protos, *cls.more_protos)

    def register(self, host: Host) -> None:
        """Add the handlers to `host.server` (before it starts)."""
        raise NotImplementedError

    async def start(self, host: Host) -> None:
        """Start background work, once the server listens."""

    async def stop(self) -> None:
        """Stop background work (the server has stopped; the database is still open)."""

    async def purge(self, db: Database, settings: Settings) -> None:
        """Delete what is past its retention."""
