"""Development and test PKI for opconnect (ECDSA P-256, SHA-256).

Identities are SPIFFE URI SANs (DESIGN.md section 2):

* operators: ``spiffe://opconnect/operator/<id>``
* platform systems: ``spiffe://opconnect/platform/<name>``

The gateway server certificate carries DNS and IP SANs instead.

Each kind of certificate has a CA of its own, so that no CA can sign an identity of another
kind: the server CA (``ca.pem``: what clients verify the server with; it signs no client), the
operator CA, the platform CA, and the gateway CA (``gateway-ca.pem``: the gateway's own
certificate to the service processes, and nothing else).

Everything here is a plain function over PEM bytes or paths; nothing caches state. Private keys
are never put into a repr, a log line or an exception message.

This is not a production CA: the revocation list and the files are updated without locking, so
two processes must not issue or revoke in the same directory at the same time.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plumbing.config import DEV_OPERATOR, DEV_PLATFORM
from plumbing.files import private_directory, write_file
from plumbing.validation import IDENTITY, IDENTITY_PATTERN

__all__ = [
    "DEV_OPERATOR",
    "DEV_PLATFORM",
    "IDENT_PATTERN",
    "OPERATOR_URI_PREFIX",
    "PLATFORM_URI_PREFIX",
    "SPIFFE_TRUST_DOMAIN",
    "CaRole",
    "Issued",
    "PeerIdentity",
    "PkiPaths",
    "create_ca",
    "ensure_dev_pki",
    "fingerprint_sha256",
    "identity_from_cert",
    "issue_client",
    "issue_client_cert",
    "issue_server_cert",
    "issued_by",
    "issuer_role",
    "load_ca",
    "load_crl_serials",
    "make_crl",
    "operator_uri",
    "platform_uri",
    "revoke",
    "rotate_server_cert",
    "serial_of",
    "spki_sha256",
    "write_private",
    "write_public",
]

PeerKind = Literal["operator", "platform"]
# The CAs of the development PKI; "server" signs the server certificate only.
CaRole = Literal["server", "operator", "platform", "gateway"]
CA_ROLES: tuple[CaRole, ...] = ("server", "operator", "platform", "gateway")
CLIENT_CA_ROLES: tuple[CaRole, ...] = ("operator", "platform")  # those with a CRL
GATEWAY_NAME = "gateway"  # the platform name of the gateway's certificate to the services
_CA_FILES: dict[CaRole, str] = {
    "server": "ca",
    "operator": "operator-ca",
    "platform": "platform-ca",
    "gateway": "gateway-ca",
}


SPIFFE_TRUST_DOMAIN = "opconnect"
OPERATOR_URI_PREFIX = f"spiffe://{SPIFFE_TRUST_DOMAIN}/operator/"
PLATFORM_URI_PREFIX = f"spiffe://{SPIFFE_TRUST_DOMAIN}/platform/"

# Operator ids and platform names. Always applied with re.fullmatch, so the "$" cannot
# accept a trailing newline.
IDENT_PATTERN = IDENTITY_PATTERN
_IDENT_RE = IDENTITY
# Client file names are "<kind>-<ident>"; this also keeps them inside clients/.
_CLIENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\s*", re.S)

_CLOCK_SKEW = datetime.timedelta(minutes=5)
_CN_MAX = 64  # ub-common-name, RFC 5280


# --------------------------------------------------------------------------- identities


def _check_ident(value: str, what: str) -> str:
    if not isinstance(value, str) or _IDENT_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {what}: must match {IDENT_PATTERN}")
    return value


def operator_uri(operator_id: str) -> str:
    """``spiffe://opconnect/operator/<operator_id>``; ValueError if the id is malformed."""
    return OPERATOR_URI_PREFIX + _check_ident(operator_id, "operator id")


def platform_uri(name: str) -> str:
    """``spiffe://opconnect/platform/<name>``; ValueError if the name is malformed."""
    return PLATFORM_URI_PREFIX + _check_ident(name, "platform name")


def _uri_for(kind: PeerKind, ident: str) -> str:
    if kind == "operator":
        return operator_uri(ident)
    if kind == "platform":
        return platform_uri(ident)
    raise ValueError("kind must be 'operator' or 'platform'")


# --------------------------------------------------------------------------- issuing


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM (key: unencrypted PKCS#8)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_pem)


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Parse a CA pair; the key must be EC and belong to the certificate."""
    cert = _load_cert(ca.cert_pem)
    try:
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError):
        # The parser's message is generic, but do not chain anything derived from key bytes.
        raise ValueError("CA private key could not be loaded") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA private key is not an EC key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ValueError("CA private key does not match the CA certificate")
    return cert, key


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(_issuer_public_key(cert))


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca_cert))


def _issuer_public_key(cert: x509.Certificate) -> CertificateIssuerPublicKeyTypes:
    key = cert.public_key()
    if not isinstance(
        key,
        ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | dsa.DSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ValueError("CA certificate key type cannot sign")
    return key


def _cn_name(common_name: str | None) -> x509.Name:
    if not common_name:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(common_name: str, valid_days: int = 3650) -> Issued:
    """A self-signed root CA (basicConstraints CA, keyCertSign + cRLSign, SKI/AKI)."""
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SPIFFE_TRUST_DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _issue_leaf(
    ca: Issued,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    valid_days: int,
) -> Issued:
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    if not sans:
        raise ValueError("a certificate needs at least one subjectAltName")
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    now = _now()
    # Never outlive the issuer.
    not_after = min(now + datetime.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        # RFC 5280: with an empty subject the SAN extension must be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def _reject_bare_str(value: Sequence[str], what: str) -> None:
    if isinstance(value, str):
        raise TypeError(f"{what} must be a sequence of strings, not a string")


def issue_server_cert(
    ca: Issued,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    valid_days: int = 825,
) -> Issued:
    """A gateway server certificate (serverAuth) with DNS and IP SANs."""
    _reject_bare_str(dns_names, "dns_names")
    _reject_bare_str(ip_addresses, "ip_addresses")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    common_name = next((n for n in dns_names if 0 < len(n) <= _CN_MAX), "opconnect-gateway")
    return _issue_leaf(ca, _cn_name(common_name), sans, ExtendedKeyUsageOID.SERVER_AUTH, valid_days)


def issue_client_cert(
    ca: Issued,
    uri: str,
    valid_days: int = 825,
    common_name: str | None = None,
) -> Issued:
    """A client certificate (clientAuth) whose only SAN is ``uri``.

    ``uri`` is not checked against the identity scheme, so tests can mint malformed
    identities; use :func:`issue_client` for the checked path. Without ``common_name`` the
    subject CN is the last path segment of the URI (or the subject is empty if that does not
    fit in a CN).
    """
    if not uri:
        raise ValueError("uri must not be empty")
    if common_name is None:
        last = uri.rsplit("/", 1)[-1]
        common_name = last if 0 < len(last) <= _CN_MAX else None
    return _issue_leaf(
        ca,
        _cn_name(common_name),
        [x509.UniformResourceIdentifier(uri)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_days,
    )


# --------------------------------------------------------------------------- CRLs


def make_crl(ca: Issued, revoked_serials: Sequence[int], next_update_days: int = 7) -> bytes:
    """A PEM CRL signed by ``ca`` listing ``revoked_serials`` (reason: unspecified).

    Every entry gets the generation time as its revocation date, since only serials are kept.
    """
    if next_update_days <= 0:
        raise ValueError("next_update_days must be positive")
    ca_cert, ca_key = _load_ca(ca)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + datetime.timedelta(days=next_update_days))
        .add_extension(_aki(ca_cert), critical=False)
        # Monotonic enough for a dev PKI: regenerated CRLs get increasing numbers.
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1_000_000)), critical=False)
    )
    for serial in sorted(set(revoked_serials)):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - _CLOCK_SKEW)
            .add_extension(x509.CRLReason(x509.ReasonFlags.unspecified), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crl_serials(crl_pem: bytes, ca_cert_pem: bytes) -> frozenset[int]:
    """Revoked serials of a PEM CRL, after checking that ``ca_cert_pem`` issued and signed it.

    Does not look at nextUpdate; callers decide what a stale CRL means.
    """
    crl = x509.load_pem_x509_crl(crl_pem)
    ca_cert = _load_cert(ca_cert_pem)
    if crl.issuer != ca_cert.subject:
        raise ValueError("CRL was not issued by this CA")
    if not crl.is_signature_valid(_issuer_public_key(ca_cert)):
        raise ValueError("CRL signature is not valid for this CA")
    return frozenset(entry.serial_number for entry in crl)


# --------------------------------------------------------------------------- inspection


def serial_of(cert_pem: bytes) -> int:
    return _load_cert(cert_pem).serial_number


def fingerprint_sha256(cert_pem: bytes) -> str:
    """SHA-256 over the DER certificate, lowercase hex without separators."""
    return _load_cert(cert_pem).fingerprint(hashes.SHA256()).hex()


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 over the certificate's DER SubjectPublicKeyInfo (its key, whatever the
    certificate around it), lowercase hex."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return digest.finalize().hex()


@dataclass(frozen=True)
class PeerIdentity:
    kind: PeerKind
    name: str
    serial: int
    fingerprint: str


def identity_from_cert(cert_pem: bytes) -> PeerIdentity:
    """The operator or platform identity of a client certificate.

    The certificate must carry exactly one URI SAN (as SPIFFE requires), and it must be a
    well-formed operator or platform URI. Only the structure is checked here: chain, validity
    and revocation belong to the TLS layer and the caller. Error messages never echo the
    peer-supplied URI.
    """
    cert = _load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise ValueError("certificate has no URI subjectAltName")
    if len(uris) > 1:
        raise ValueError("certificate has several URI subjectAltNames")
    uri = uris[0]
    kind: PeerKind
    if uri.startswith(OPERATOR_URI_PREFIX):
        kind, name = "operator", uri[len(OPERATOR_URI_PREFIX) :]
    elif uri.startswith(PLATFORM_URI_PREFIX):
        kind, name = "platform", uri[len(PLATFORM_URI_PREFIX) :]
    else:
        raise ValueError("URI subjectAltName is not an opconnect identity")
    if _IDENT_RE.fullmatch(name) is None:
        raise ValueError(f"malformed {kind} identity in URI subjectAltName")
    return PeerIdentity(
        kind=kind,
        name=name,
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def issued_by(cert_pem: bytes, ca_pems: Sequence[bytes]) -> bool:
    """True if one of ``ca_pems`` directly issued ``cert_pem`` (issuer name and signature).

    This is not path validation: validity dates, key usage and revocation are not checked.
    Unparsable PEM raises ValueError.
    """
    cert = _load_cert(cert_pem)
    for ca_pem in ca_pems:
        ca_cert = _load_cert(ca_pem)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


# --------------------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600 from the moment of creation."""
    write_file(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0644."""
    write_file(path, data, 0o644)


@dataclass(frozen=True)
class PkiPaths:
    """File layout of a PKI directory. Build with :meth:`PkiPaths.at`."""

    directory: Path
    ca_cert: Path  # the server CA: what clients verify the server with
    ca_key: Path
    crl: Path  # the CRLs of the operator and platform CAs, one PEM file
    revoked: Path
    server_cert: Path
    server_key: Path
    clients_dir: Path
    operator_ca_cert: Path
    operator_ca_key: Path
    platform_ca_cert: Path
    platform_ca_key: Path
    gateway_ca_cert: Path
    gateway_ca_key: Path

    @classmethod
    def at(cls, directory: Path) -> PkiPaths:
        directory = Path(directory)
        return cls(
            directory=directory,
            ca_cert=directory / "ca.pem",
            ca_key=directory / "ca.key",
            crl=directory / "crl.pem",
            revoked=directory / "revoked.json",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            clients_dir=directory / "clients",
            operator_ca_cert=directory / "operator-ca.pem",
            operator_ca_key=directory / "operator-ca.key",
            platform_ca_cert=directory / "platform-ca.pem",
            platform_ca_key=directory / "platform-ca.key",
            gateway_ca_cert=directory / "gateway-ca.pem",
            gateway_ca_key=directory / "gateway-ca.key",
        )

    def ca(self, role: CaRole) -> tuple[Path, Path]:
        """``(<role CA>.pem, <role CA>.key)``: ``ca`` (server), ``operator-ca``, ..."""
        name = _CA_FILES[role]
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"

    def client(self, name: str) -> tuple[Path, Path]:
        """``(clients/<name>.pem, clients/<name>.key)``; ``name`` is e.g. ``operator-acme``."""
        if _CLIENT_NAME_RE.fullmatch(name) is None:
            raise ValueError("invalid client name")
        return self.clients_dir / f"{name}.pem", self.clients_dir / f"{name}.key"


def load_ca(paths: PkiPaths, role: CaRole) -> Issued:
    """Read one CA's certificate and key; ValueError if they do not belong together."""
    cert_path, key_path = paths.ca(role)
    ca = Issued(cert_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes())
    _load_ca(ca)
    return ca


def issuer_role(kind: PeerKind, ident: str) -> CaRole:
    """Which CA of the development PKI signs a client identity."""
    if kind == "operator":
        return "operator"
    return "gateway" if ident == GATEWAY_NAME else "platform"


Revoked = dict[str, list[int]]  # per client CA role (and "retired")


def _load_revoked(paths: PkiPaths) -> Revoked:
    """Revoked serials per client CA. The list of the one-CA layout (before the operator and
    platform CAs) reads as nothing revoked: that CA is now the server CA, which no client
    certificate chains to any more."""
    revoked: Revoked = {role: [] for role in CLIENT_CA_ROLES}
    if not paths.revoked.exists():
        return revoked
    data = json.loads(paths.revoked.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return revoked
    if not isinstance(data, dict) or set(data) - {*CLIENT_CA_ROLES, _RETIRED}:
        raise ValueError(f"{paths.revoked} must map operator and platform to serials")
    for role in (*CLIENT_CA_ROLES, _RETIRED):
        serials = data.get(role, [])
        if not isinstance(serials, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in serials
        ):
            raise ValueError(f"{paths.revoked} must hold lists of positive integers")
        revoked[role] = serials
    return revoked


_RETIRED = "retired"  # revoked.json: what the one-CA layout's CA had revoked (never re-issued)


def _revoked_layout(paths: PkiPaths) -> tuple[bool, set[int]]:
    """Whether revoked.json is of the current layout, and the serials the one-CA layout's CA
    had revoked (its list, kept as "retired" once upgraded)."""
    if not paths.revoked.exists():
        return False, set()
    data = json.loads(paths.revoked.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return False, {s for s in data if isinstance(s, int)}
    retired = data.get(_RETIRED, []) if isinstance(data, dict) else []
    return True, {s for s in retired if isinstance(s, int)}


def _write_crl(paths: PkiPaths, cas: Mapping[CaRole, Issued], revoked: Revoked) -> None:
    text: dict[str, list[int]] = {role: sorted(set(revoked[role])) for role in CLIENT_CA_ROLES}
    if revoked.get(_RETIRED):
        text[_RETIRED] = sorted(set(revoked[_RETIRED]))
    write_public(paths.revoked, json.dumps(text).encode() + b"\n")
    write_public(paths.crl, b"".join(make_crl(cas[role], text[role]) for role in CLIENT_CA_ROLES))


def _crl_serials(crl_bundle: bytes, ca: Issued) -> frozenset[int] | None:
    """The serials of the CRL of ``ca`` in a PEM bundle of CRLs; None if it holds none."""
    for block in _PEM_CRL.findall(crl_bundle):
        try:
            return load_crl_serials(block, ca.cert_pem)
        except ValueError:
            continue
    return None


def _write_pair(cert_path: Path, key_path: Path, issued: Issued) -> None:
    # Key first: a reloader that watches the certificate sees a matching key once it changes.
    write_private(key_path, issued.key_pem)
    write_public(cert_path, issued.cert_pem)


def _pair_is_current(cert_path: Path, key_path: Path, ca: Issued) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        return issued_by(cert_path.read_bytes(), [ca.cert_pem])
    except ValueError:
        return False


def issue_client(paths: PkiPaths, kind: PeerKind, ident: str) -> tuple[Path, Path]:
    """Issue a client certificate for an operator or platform identity into clients/, by the
    CA of its kind (the platform name ``gateway``: the gateway CA).

    Writes ``clients/<kind>-<ident>.pem`` and ``.key`` (replacing any previous pair) and
    returns their paths.
    """
    uri = _uri_for(kind, ident)
    cert_path, key_path = paths.client(f"{kind}-{ident}")
    ca = load_ca(paths, issuer_role(kind, ident))
    private_directory(paths.clients_dir)
    _write_pair(cert_path, key_path, issue_client_cert(ca, uri))
    return cert_path, key_path


def revoke(paths: PkiPaths, cert_pem: bytes) -> None:
    """Add the certificate's serial to revoked.json and regenerate crl.pem.

    ValueError if the certificate was not issued by this PKI's operator or platform CA.
    """
    cas = {role: load_ca(paths, role) for role in CLIENT_CA_ROLES}
    role = next((r for r in CLIENT_CA_ROLES if issued_by(cert_pem, [cas[r].cert_pem])), None)
    if role is None:
        raise ValueError("certificate was not issued by this PKI's operator or platform CA")
    revoked = _load_revoked(paths)
    serial = serial_of(cert_pem)
    if serial not in revoked[role]:
        revoked[role].append(serial)
    _write_crl(paths, cas, revoked)


def rotate_server_cert(
    paths: PkiPaths, dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> None:
    """Re-issue the server certificate and key (each file replaced atomically, key first)."""
    ca = load_ca(paths, "server")
    _write_pair(paths.server_cert, paths.server_key, issue_server_cert(ca, dns_names, ip_addresses))


def _ensure_ca(paths: PkiPaths, role: CaRole) -> tuple[Issued, bool]:
    """The CA of ``role``, made if missing; and whether it was made now."""
    cert_path, key_path = paths.ca(role)
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert != have_key:
        raise ValueError(
            f"incomplete CA in {paths.directory}: need both {cert_path.name} and {key_path.name}"
        )
    if have_cert:
        return load_ca(paths, role), False
    ca = create_ca(f"opconnect dev {role} CA")
    _write_pair(cert_path, key_path, ca)
    return ca, True


def _client_names(paths: PkiPaths) -> list[tuple[PeerKind, str]]:
    """The identities of the client pairs in clients/ (by their file names)."""
    found: list[tuple[PeerKind, str]] = []
    for cert_path in sorted(paths.clients_dir.glob("*.pem")):
        kind, _, ident = cert_path.stem.partition("-")
        if kind in ("operator", "platform") and _IDENT_RE.fullmatch(ident):
            found.append(("operator" if kind == "operator" else "platform", ident))
    return found


def ensure_dev_pki(
    directory: Path,
    operator_id: str = DEV_OPERATOR,
    platform_name: str = DEV_PLATFORM,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> PkiPaths:
    """Create whatever is missing of a development PKI in ``directory`` (mode 0700).

    The four CAs (server, operator, platform, gateway), the CRLs of the operator and platform
    CAs, the server pair and the client pairs ``operator-<operator_id>`` and
    ``platform-<platform_name>``. Existing files are left alone, so a second call changes
    nothing; a pair that is incomplete or not issued by the CA of its kind is re-issued (so a
    directory of the one-CA layout is upgraded: its CA becomes the server CA, and every client
    pair it signed that it had not revoked is re-issued by the CA of its kind). A CA with only
    one of its two files present is an error rather than being silently replaced.
    """
    op_uri = operator_uri(operator_id)
    pf_uri = platform_uri(platform_name)
    _reject_bare_str(dns_names, "dns_names")
    _reject_bare_str(ip_addresses, "ip_addresses")
    paths = PkiPaths.at(directory)
    private_directory(paths.directory)
    private_directory(paths.clients_dir)

    made = {role: _ensure_ca(paths, role) for role in CA_ROLES}
    cas = {role: ca for role, (ca, _) in made.items()}
    layout_current, legacy = _revoked_layout(paths)  # legacy: never re-issued below
    crl_bundle = paths.crl.read_bytes() if paths.crl.exists() else b""
    crls = {role: _crl_serials(crl_bundle, cas[role]) for role in CLIENT_CA_ROLES}
    if not layout_current:
        # Recover the lists from the CRLs of these CAs rather than forgetting revocations.
        recovered: Revoked = {role: sorted(crls[role] or ()) for role in CLIENT_CA_ROLES}
        recovered[_RETIRED] = sorted(legacy)
        _write_crl(paths, cas, recovered)
    elif any(crls[role] is None or made[role][1] for role in CLIENT_CA_ROLES):
        revoked = _load_revoked(paths)
        for role in CLIENT_CA_ROLES:
            if made[role][1]:
                revoked[role] = []  # the serials of a CA that no longer exists
        _write_crl(paths, cas, revoked)

    if not _pair_is_current(paths.server_cert, paths.server_key, cas["server"]):
        _write_pair(
            paths.server_cert,
            paths.server_key,
            issue_server_cert(cas["server"], list(dns_names), list(ip_addresses)),
        )
    wanted: dict[tuple[PeerKind, str], str] = {
        ("operator", operator_id): op_uri,
        ("platform", platform_name): pf_uri,
    }
    for kind, ident in _client_names(paths):
        wanted.setdefault((kind, ident), _uri_for(kind, ident))
    for (kind, ident), uri in wanted.items():
        cert_path, key_path = paths.client(f"{kind}-{ident}")
        if _pair_is_current(cert_path, key_path, cas[issuer_role(kind, ident)]):
            continue
        try:
            if cert_path.exists() and serial_of(cert_path.read_bytes()) in legacy:
                continue  # revoked: not brought back to life
        except ValueError:
            pass
        _write_pair(cert_path, key_path, issue_client_cert(cas[issuer_role(kind, ident)], uri))
    return paths
