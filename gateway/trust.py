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
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.pki import load_crl_serials
from plumbing.logs import get_logger

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

    def __init__(self, files: TrustFiles, interval_s: float) -> None:
        self.files = files
        self._interval = interval_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamps: dict[Path, tuple[int, ...]] = {}
        self._tls_stamps: tuple[tuple[int, ...], ...] = ()
        self._trust = self._load(version=1)  # raises at start-up if the files are unusable
        self._tls_config = self._load_tls()

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
            try:
                self._trust = self._load(self._trust.version + 1)
                log.info("trust reloaded", version=self._trust.version)
            except (OSError, ValueError) as error:
                self._stamps = stamps  # don't retry a bad file until it changes again
                log.error("trust files not reloaded; keeping the previous ones", error=str(error))

    def _load(self, version: int) -> Trust:
        f = self.files
        self._stamps = {p: self._stamp(p) for p in self._watched() if p is not None}
        operator_cas = split_certs(f.operator_ca.read_bytes())
        platform_cas = split_certs(f.platform_ca.read_bytes())
        if not operator_cas or not platform_cas:
            raise ValueError("a CA bundle holds no certificate")
        revoked: frozenset[tuple[str, int]] = frozenset()
        if f.crl is not None:  # configured: a missing file is an error, never "none revoked"
            revoked = _load_revoked(f.crl.read_bytes(), operator_cas + platform_cas)
        serials: frozenset[int] = frozenset()
        prints: frozenset[str] = frozenset()
        if f.deny_list is not None:  # configured: a missing file is an error, never "none denied"
            serials, prints = parse_deny_list(f.deny_list.read_text())
        gateway_cas = split_certs(f.gateway_ca.read_bytes()) if f.gateway_ca else ()
        if f.gateway_ca and not gateway_cas:
            raise ValueError("the gateway CA bundle holds no certificate")
        return Trust(version, operator_cas, platform_cas, revoked, serials, prints, gateway_cas)

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
        with self._lock:
            try:
                config = self._load_tls()
            except (OSError, ValueError) as error:
                self._tls_stamps = stamps
                log.error("TLS files not reloaded; keeping the previous ones", error=str(error))
                return None
        log.info("TLS certificate or CA bundle reloaded")
        return config

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._tls_config, self._fetch_tls, require_client_authentication=True
        )
