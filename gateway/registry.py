"""The operator registry: which operators exist, whether they are active, and which trust
anchors may speak for each.

A certificate proves who an operator is only when an anchor registered for that operator vouches
for it: a CA on the certificate's verified chain (matched by its public key, so a CA re-issued
with the same key stays bound) or the certificate itself, pinned by its SHA-256 fingerprint. An
operator with no anchor is refused (fail closed). The registry also says whether it may call
now: suspending an operator refuses its next call (UNAUTHENTICATED) without touching its
certificates or data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client.core import Metric
from sqlalchemy import DateTime, ForeignKey, String, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.pki import operator_uri, spki_sha256
from plumbing.db import Base, Database
from plumbing.metrics import Metrics, gauge


class OperatorStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class OperatorRow(Base):
    __tablename__ = "operators"

    operator_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


AnchorKind = Literal["ca", "pin"]


class OperatorAnchorRow(Base):
    """A trust anchor that may speak for an operator: a CA (its key) or a pinned certificate."""

    __tablename__ = "operator_anchors"

    operator_id: Mapped[str] = mapped_column(
        String(63), ForeignKey("operators.operator_id"), primary_key=True
    )
    # SHA-256 of the DER certificate (the CA's or the pinned one), lowercase hex.
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    # A CA: SHA-256 of its SubjectPublicKeyInfo, what is matched; a pin: empty.
    key_sha256: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(1024))  # RFC 4514, for people; empty for a bare pin
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Anchor:
    kind: AnchorKind
    fingerprint: str
    key_sha256: str = ""
    subject: str = ""

    def __str__(self) -> str:
        if self.kind == "ca":
            return f"ca  sha256={self.fingerprint} key-sha256={self.key_sha256} {self.subject}"
        return f"pin sha256={self.fingerprint}{' ' + self.subject if self.subject else ''}"


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits (':' separators and case as openssl
    prints them accepted); ValueError otherwise."""
    value = text.strip().lower().replace(":", "")
    if not _FINGERPRINT.fullmatch(value):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits")
    return value


def ca_anchors(bundle: bytes) -> list[Anchor]:
    """The CA certificates of a PEM bundle as anchors; ValueError if it holds none, or a
    certificate that is not a CA (pin a leaf with its fingerprint instead)."""
    certs = x509.load_pem_x509_certificates(bundle) if b"-----BEGIN" in bundle else []
    if not certs:
        raise ValueError("no PEM certificate found")
    anchors = []
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError(
                f"{cert.subject.rfc4514_string()} is not a CA certificate (pin a client"
                " certificate by its fingerprint instead)"
            )
        anchors.append(
            Anchor(
                "ca",
                cert.fingerprint(hashes.SHA256()).hex(),
                spki_sha256(cert),
                cert.subject.rfc4514_string(),
            )
        )
    return anchors


def pinned_anchor(fingerprint: str = "", cert_pem: bytes = b"") -> Anchor:
    """A pinned client certificate, by its fingerprint or the certificate itself."""
    if cert_pem:
        cert = x509.load_pem_x509_certificate(cert_pem)
        return Anchor(
            "pin", cert.fingerprint(hashes.SHA256()).hex(), "", cert.subject.rfc4514_string()
        )
    return Anchor("pin", normalize_fingerprint(fingerprint))


@dataclass(frozen=True)
class Operator:
    operator_id: str
    display_name: str
    status: OperatorStatus
    anchors: tuple[Anchor, ...] = ()

    @property
    def ca_keys(self) -> frozenset[str]:
        """SHA-256 of the public keys of the CAs that may speak for the operator."""
        return frozenset(a.key_sha256 for a in self.anchors if a.kind == "ca")

    @property
    def pins(self) -> frozenset[str]:
        """Fingerprints of the certificates pinned for the operator."""
        return frozenset(a.fingerprint for a in self.anchors if a.kind == "pin")


def _anchors(session: Session, operator_id: str) -> tuple[Anchor, ...]:
    rows = session.scalars(
        select(OperatorAnchorRow)
        .where(OperatorAnchorRow.operator_id == operator_id)
        .order_by(OperatorAnchorRow.kind, OperatorAnchorRow.fingerprint)
    )
    return tuple(
        Anchor("ca" if r.kind == "ca" else "pin", r.fingerprint, r.key_sha256, r.subject)
        for r in rows
    )


def _operator(row: OperatorRow, session: Session) -> Operator:
    return Operator(
        row.operator_id,
        row.display_name,
        OperatorStatus(row.status),
        _anchors(session, row.operator_id),
    )


def _add_anchors(session: Session, operator_id: str, anchors: Sequence[Anchor]) -> None:
    stamp = dt.datetime.now(dt.UTC)
    for anchor in anchors:
        if session.get(OperatorAnchorRow, (operator_id, anchor.fingerprint)) is None:
            session.add(
                OperatorAnchorRow(
                    operator_id=operator_id,
                    fingerprint=anchor.fingerprint,
                    kind=anchor.kind,
                    key_sha256=anchor.key_sha256,
                    subject=anchor.subject[:1024],
                    created_at=stamp,
                )
            )
    session.flush()


def add_operator(
    session: Session, operator_id: str, display_name: str = "", anchors: Sequence[Anchor] = ()
) -> Operator:
    """Add an active operator, with the trust anchors that may speak for it; an existing one is
    returned unchanged but for the anchors, which are added to its own."""
    operator_uri(operator_id)  # raises ValueError for an id a certificate could not carry
    row = session.get(OperatorRow, operator_id)
    if row is None:
        stamp = dt.datetime.now(dt.UTC)
        row = OperatorRow(
            operator_id=operator_id,
            display_name=display_name,
            status=OperatorStatus.ACTIVE.value,
            created_at=stamp,
            updated_at=stamp,
        )
        session.add(row)
        session.flush()
    _add_anchors(session, operator_id, anchors)
    return _operator(row, session)


def trust_operator(
    session: Session,
    operator_id: str,
    add: Sequence[Anchor] = (),
    remove: Sequence[str] = (),
    replace: bool = False,
) -> Operator:
    """Change the anchors that may speak for an operator: drop all of them (`replace`) or those
    named in `remove` (a fingerprint, or a CA's key-sha256), then add `add`. LookupError for an
    unknown operator or an anchor it does not have."""
    row = session.get(OperatorRow, operator_id)
    if row is None:
        raise LookupError(f"no operator {operator_id}")
    table = OperatorAnchorRow
    if replace:
        session.execute(delete(table).where(table.operator_id == operator_id))
    for text in remove:
        value = normalize_fingerprint(text)
        gone = session.execute(
            delete(table).where(
                table.operator_id == operator_id,
                (table.fingerprint == value) | ((table.key_sha256 == value) & (table.kind == "ca")),
            )
        )
        if not getattr(gone, "rowcount", 0):
            raise LookupError(f"operator {operator_id} has no anchor {value}")
    _add_anchors(session, operator_id, add)
    row.updated_at = dt.datetime.now(dt.UTC)
    return _operator(row, session)


def set_status(session: Session, operator_id: str, status: OperatorStatus) -> Operator:
    row = session.get(OperatorRow, operator_id)
    if row is None:
        raise LookupError(f"no operator {operator_id}")
    row.status = status.value
    row.updated_at = dt.datetime.now(dt.UTC)
    return _operator(row, session)


def get_operator(session: Session, operator_id: str) -> Operator | None:
    row = session.get(OperatorRow, operator_id)
    return _operator(row, session) if row else None


def list_operators(session: Session) -> list[Operator]:
    rows = session.scalars(select(OperatorRow).order_by(OperatorRow.operator_id)).all()
    return [_operator(r, session) for r in rows]


def count_by_status(session: Session) -> dict[OperatorStatus, int]:
    rows = session.execute(select(OperatorRow.status, func.count()).group_by(OperatorRow.status))
    return {OperatorStatus(status): int(count) for status, count in rows}


class Registry:
    """Registry reads for the hot path: each operator's status and anchors cached for `ttl_s`
    seconds, so a suspension or an anchor change made by another process (`opconnect
    operators`) takes effect within that time (at once in this one)."""

    def __init__(self, db: Database, ttl_s: float, metrics: Metrics | None = None) -> None:
        self._db = db
        self._ttl = ttl_s
        self._cache: dict[str, tuple[Operator | None, float]] = {}
        # One read per operator at a time: the callers that find its entry expired while a read
        # of it is under way wait for that read (every open stream of the operator is checked
        # again around the same moment, so without this they would all read).
        self._reading: dict[str, asyncio.Future[Operator | None]] = {}
        if metrics is not None:
            metrics.on_scrape("registry", self._figures)

    def _figures(self) -> Iterator[Metric]:
        """Scrape time (the HTTP server's thread): operators by state, one small query."""
        counts = dict.fromkeys(OperatorStatus, 0)
        counts.update(self._db.transaction(count_by_status))
        family = gauge(
            "opconnect_registry_operators", "Operators in the registry, by state.", ("state",)
        )
        for status, count in counts.items():
            family.add_metric([status.value], count)
        yield family

    async def lookup(self, operator_id: str) -> Operator | None:
        hit = self._cache.get(operator_id)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self._ttl:
            return hit[0]
        reading = self._reading.get(operator_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(operator_id, now))
            self._reading[operator_id] = reading
            reading.add_done_callback(functools.partial(self._read_done, operator_id))
        return await asyncio.shield(reading)  # a caller that goes away leaves it to the others

    async def _read(self, operator_id: str, now: float) -> Operator | None:
        found = await self._db.run(get_operator, operator_id)
        if self._reading.get(operator_id) is asyncio.current_task():  # no change since it began
            self._cache[operator_id] = (found, now)
        return found

    def _read_done(self, operator_id: str, reading: asyncio.Future[Operator | None]) -> None:
        if self._reading.get(operator_id) is reading:
            del self._reading[operator_id]

    def _changed(self, operator_id: str) -> None:
        """After this process changed the operator: the next lookup reads it again, and a read
        begun before the change neither answers later callers nor fills the cache."""
        self._cache.pop(operator_id, None)
        self._reading.pop(operator_id, None)

    async def add(
        self, operator_id: str, display_name: str = "", anchors: Sequence[Anchor] = ()
    ) -> Operator:
        found = await self._db.run(add_operator, operator_id, display_name, anchors, write=True)
        self._changed(operator_id)
        return found

    async def trust(
        self,
        operator_id: str,
        add: Sequence[Anchor] = (),
        remove: Sequence[str] = (),
        replace: bool = False,
    ) -> Operator:
        found = await self._db.run(trust_operator, operator_id, add, remove, replace, write=True)
        self._changed(operator_id)
        return found

    async def set_status(self, operator_id: str, status: OperatorStatus) -> Operator:
        found = await self._db.run(set_status, operator_id, status, write=True)
        self._changed(operator_id)
        return found
