"""What the gateway trusts, read from files and reloaded while running, no restart:

- the server certificate and key, and the CA bundles that may sign client certificates, handed
  to gRPC through `grpc.dynamic_ssl_server_credentials` (new handshakes use new files);
- the CRL and the deny list, checked after the handshake (grpcio has no CRL support).

Files are expected to be replaced atomically (write, then rename). A file that does not parse,
or a key that does not match its certificate, is ignored with an error in the log: the previous
trust stays in force, so revocations are never dropped by a bad write.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.core import Metric

from gateway.pki import load_crl_serials
from plumbing.logs import get_logger
from plumbing.metrics import Metrics, gauge

log = get_logger("opconnect.trust")

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\s*", re.S)
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TrustFiles:
    server_cert: Path
    server_key: Path
    operator_ca: Path
    platform_ca: Path
    crl: Path | None
    deny_list: Path | None
    # A service process: the CA bundle of the gateway's own certificate (trusted for it alone).
    gateway_ca: Path | None = None


@dataclass(frozen=True)
class Trust:
    """One consistent view of what is trusted; `version` changes whenever any of it does."""

    version: int
    operator_cas: tuple[bytes, ...]
    platform_cas: tuple[bytes, ...]
    revoked: frozenset[tuple[str, int]]  # (issuer RFC 4514 name, serial)
    denied_serials: frozenset[int]
    denied_fingerprints: frozenset[str]
    gateway_cas: tuple[bytes, ...] = ()
    # When each CRL of the CRL file says the next one is due (issuer RFC 4514 name, Unix time).
    crl_next_updates: tuple[tuple[str, float], ...] = ()


def split_certs(bundle: bytes) -> tuple[bytes, ...]:
    return tuple(m.group(0).strip() + b"\n" for m in _PEM_CERT.finditer(bundle))


def parse_deny_list(text: str) -> tuple[frozenset[int], frozenset[str]]:
    """Serials (decimal or 0x-hex) and SHA-256 fingerprints (64 hex digits, ':' allowed)."""
    serials: set[int] = set()
    prints: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        entry = raw.split("#", 1)[0].strip().lower().replace(":", "")
        if not entry:
            continue
        if _FINGERPRINT.fullmatch(entry):
            prints.add(entry)
        elif entry.startswith("0x"):
            serials.add(int(entry, 16))
        elif entry.isdigit():
            serials.add(int(entry))
        else:
            raise ValueError(f"deny list line {number}: not a serial or a SHA-256 fingerprint")
    return frozenset(serials), frozenset(prints)


def crl_next_updates(crl_bundle: bytes) -> tuple[tuple[str, float], ...]:
    """(issuer, next update as Unix time) of each CRL of a PEM bundle that says when."""
    out: list[tuple[str, float]] = []
    for match in _PEM_CRL.finditer(crl_bundle):
        crl = x509.load_pem_x509_crl(match.group(0))
        if crl.next_update_utc is not None:
            out.append((crl.issuer.rfc4514_string(), crl.next_update_utc.timestamp()))
    return tuple(out)


def _load_revoked(crl_bundle: bytes, cas: tuple[bytes, ...]) -> frozenset[tuple[str, int]]:
    """Revoked (issuer, serial) pairs of a PEM bundle of CRLs, each verified against its CA.

    A file with no CRL in it, or anything but CRLs, is an error: an empty, truncated or
    overwritten CRL file must never read as "nothing is revoked".
    """
    blocks = [m.group(0) for m in _PEM_CRL.finditer(crl_bundle)]
    if not blocks or _PEM_CRL.sub(b"", crl_bundle).strip():
        raise ValueError("the CRL file does not hold PEM CRLs only")
    revoked: set[tuple[str, int]] = set()
    for block in blocks:
        issuer = x509.load_pem_x509_crl(block).issuer
        for ca in cas:
            if x509.load_pem_x509_certificate(ca).subject != issuer:
                continue
            serials = load_crl_serials(block, ca)  # raises ValueError on a bad signature
            revoked.update((issuer.rfc4514_string(), s) for s in serials)
            break
        else:
            raise ValueError("a CRL was issued by no trusted CA")
    return frozenset(revoked)


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError("the server key does not match the server certificate")


class TrustStore:
    """Loads the trust files, and reloads them when they change (checked at most every
    `interval_s`). Thread-safe: gRPC calls the credentials fetcher from its own threads."""

    def __init__(
        self, files: TrustFiles, interval_s: float, metrics: Metrics | None = None
    ) -> None:
        self.files = files
        self.metrics = metrics or Metrics(enabled=False)
        self._server_cert = b""
        self._presented: dict[str, Path] = {}  # client certificates this process presents
        self._interval = interval_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamps: dict[Path, tuple[int, ...]] = {}
        self._tls_stamps: tuple[tuple[int, ...], ...] = ()
        self._trust = self._load(version=1)  # raises at start-up if the files are unusable
        self._tls_config = self._load_tls()
        self.metrics.on_scrape("trust", self._figures)
        # Every failure series exists from the start at 0, so the first failure is an increase
        # (alerts use increase(); a series first seen at 1 would not count).
        for path in (*self._watched(), *self._tls_files()):
            if path is not None:
                self.metrics.trust_reloads.labels(self._file_name(path), "failed")

    # -- post-handshake trust --------------------------------------------------------------------

    def current(self) -> Trust:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._refresh(now)
        return self._trust

    def _stamp(self, path: Path | None) -> tuple[int, ...]:
        """What identifies a version of a file: an atomic replace always changes the inode."""
        if path is None:
            return (0,)
        try:
            info = path.stat()
        except FileNotFoundError:
            return (-1,)
        return (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)

    def _watched(self) -> list[Path | None]:
        f = self.files
        return [f.operator_ca, f.platform_ca, f.crl, f.deny_list, f.gateway_ca]

    def _refresh(self, now: float) -> None:
        with self._lock:
            if now - self._checked < self._interval:
                return
            self._checked = now
            stamps = {p: self._stamp(p) for p in self._watched() if p is not None}
            if stamps == self._stamps:
                return
            changed = [p for p in stamps if stamps[p] != self._stamps.get(p)]
            try:
                self._trust = self._load(self._trust.version + 1)
                log.info("trust reloaded", version=self._trust.version)
                self._count_reload(changed, "ok")
            except (OSError, ValueError) as error:
                self._stamps = stamps  # don't retry a bad file until it changes again
                log.error("trust files not reloaded; keeping the previous ones", error=str(error))
                self._count_reload(changed, "failed")

    def _file_name(self, path: Path) -> str:
        """A trust file as a metric label: the setting it comes from, without `_file`."""
        f = self.files
        names = {
            f.server_cert: "tls_cert",
            f.server_key: "tls_key",
            f.operator_ca: "operator_ca",
            f.platform_ca: "platform_ca",
            f.crl: "crl",
            f.deny_list: "deny_list",
            f.gateway_ca: "gateway_ca",
        }
        return names.get(path, "other")

    def _count_reload(self, paths: list[Path], result: str) -> None:
        for path in paths:
            self.metrics.trust_reloads.labels(self._file_name(path), result).inc()

    def _load(self, version: int) -> Trust:
        f = self.files
        self._stamps = {p: self._stamp(p) for p in self._watched() if p is not None}
        operator_cas = split_certs(f.operator_ca.read_bytes())
        platform_cas = split_certs(f.platform_ca.read_bytes())
        if not operator_cas or not platform_cas:
            raise ValueError("a CA bundle holds no certificate")
        revoked: frozenset[tuple[str, int]] = frozenset()
        updates: tuple[tuple[str, float], ...] = ()
        if f.crl is not None:  # configured: a missing file is an error, never "none revoked"
            crls = f.crl.read_bytes()
            revoked = _load_revoked(crls, operator_cas + platform_cas)
            updates = crl_next_updates(crls)
        serials: frozenset[int] = frozenset()
        prints: frozenset[str] = frozenset()
        if f.deny_list is not None:  # configured: a missing file is an error, never "none denied"
            serials, prints = parse_deny_list(f.deny_list.read_text())
        gateway_cas = split_certs(f.gateway_ca.read_bytes()) if f.gateway_ca else ()
        if f.gateway_ca and not gateway_cas:
            raise ValueError("the gateway CA bundle holds no certificate")
        return Trust(
            version, operator_cas, platform_cas, revoked, serials, prints, gateway_cas, updates
        )

    # -- TLS credentials -------------------------------------------------------------------------

    def _tls_files(self) -> tuple[Path, ...]:
        f = self.files
        cas = (f.operator_ca, f.platform_ca) + ((f.gateway_ca,) if f.gateway_ca else ())
        return (f.server_cert, f.server_key, *cas)

    def _load_tls(self) -> grpc.ServerCertificateConfiguration:
        f = self.files
        stamps = tuple(self._stamp(p) for p in self._tls_files())
        cert, key = f.server_cert.read_bytes(), f.server_key.read_bytes()
        _check_pair(cert, key)
        self._server_cert = cert
        roots = b"".join(
            dict.fromkeys(c for p in self._tls_files()[2:] for c in split_certs(p.read_bytes()))
        )
        self._tls_stamps = stamps
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def _fetch_tls(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before handshakes: a new configuration when the files changed."""
        stamps = tuple(self._stamp(p) for p in self._tls_files())
        if stamps == self._tls_stamps:
            return None
        old = self._tls_stamps or tuple(() for _ in stamps)
        changed = [p for p, a, b in zip(self._tls_files(), stamps, old, strict=True) if a != b]
        with self._lock:
            try:
                config = self._load_tls()
            except (OSError, ValueError) as error:
                self._tls_stamps = stamps
                log.error("TLS files not reloaded; keeping the previous ones", error=str(error))
                self._count_reload(changed, "failed")
                return None
        log.info("TLS certificate or CA bundle reloaded")
        self._count_reload(changed, "ok")
        return config

    def present(self, name: str, cert_file: Path) -> None:
        """A client certificate this process presents to others (`internal_cert`: the
        gateway's to the services; `feed_cert`: the usage feed's to records): its expiry is
        exported beside the trust files', read from the file at each scrape (it may be
        replaced)."""
        with self._lock:
            self._presented[name] = cert_file

    def _figures(self) -> Iterator[Metric]:
        """Scrape time: how long until each certificate in force and each CRL expire, and the
        deny list's size."""
        trust = self.current()
        now = time.time()
        expiry = gauge(
            "opconnect_certificate_expiry_seconds",
            "Seconds until a certificate in force expires (negative: expired), by file and"
            " subject: the server's own (tls_cert), each CA of each bundle, and the client"
            " certificates this process presents (internal_cert, feed_cert).",
            ("file", "subject"),
        )
        bundles = {
            "tls_cert": (self._server_cert,),
            "operator_ca": trust.operator_cas,
            "platform_ca": trust.platform_cas,
            "gateway_ca": trust.gateway_cas,
        }
        with self._lock:
            presented = dict(self._presented)
        for name, path in presented.items():
            try:
                bundles[name] = split_certs(path.read_bytes())[:1]
            except OSError:
                log.warning("presented certificate unreadable", file=name)
        for name, pems in bundles.items():
            for pem in pems:
                cert = x509.load_pem_x509_certificate(pem)
                seconds = cert.not_valid_after_utc.timestamp() - now
                expiry.add_metric([name, cert.subject.rfc4514_string()], seconds)
        yield expiry
        crl = gauge(
            "opconnect_crl_next_update_seconds",
            "Seconds until each CRL's next update is due (negative: overdue), by issuer.",
            ("issuer",),
        )
        for issuer, due in trust.crl_next_updates:
            crl.add_metric([issuer], due - now)
        yield crl
        denied = gauge(
            "opconnect_deny_list_entries",
            "Serials and fingerprints in the deny list in force.",
        )
        denied.add_metric([], len(trust.denied_serials) + len(trust.denied_fingerprints))
        yield denied

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._tls_config, self._fetch_tls, require_client_authentication=True
        )
