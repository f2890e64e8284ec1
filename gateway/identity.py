"""Who is calling: the principal named by the client certificate, checked after the handshake.

The TLS handshake already proved the certificate chains to some trusted CA. Here, by our own
check: the certificate carries exactly one SPIFFE identity; it is a client certificate (not a
CA, extended key usage clientAuth, within its validity) whose chain verifies (X.509 path
validation, path length constraints included: the TLS layer does not apply a trust anchor's)
to a CA of its own kind only: an operator's to the operator bundle, a platform's to the platform
bundle, and in a service process the gateway's to the gateway CA (or its pinned fingerprint);
it is not revoked (CRL) nor denied (serial or fingerprint); and an operator is in the registry,
bound to a trust anchor on that chain (a CA registered for that very operator, or the
certificate pinned for it), and active. Any failure is UNAUTHENTICATED, with a reason but
nothing a prober could use.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import pki
from gateway.pki import PeerIdentity, identity_from_cert, spki_sha256
from gateway.registry import Operator, OperatorStatus, Registry, normalize_fingerprint
from gateway.trust import Trust, TrustStore
from plumbing.errors import unauthenticated
from plumbing.logs import get_logger
from plumbing.rpc import PRINCIPAL_HEADER, Principal, PrincipalKind
from plumbing.validation import IDENTITY

log = get_logger("opconnect.identity")

CACHE_LIMIT = 10_000
GATEWAY_NAME = pki.GATEWAY_NAME  # the platform name of the gateway's own certificate
GATEWAY = Principal("platform", GATEWAY_NAME)  # the gateway, as a service process knows it
_MAX_CHAIN = 8


@dataclass(frozen=True)
class _Checked:
    """What a certificate says, once verified against one version of the trust."""

    principal: Principal | None
    problem: tuple[str, str] = ("", "")
    fingerprint: str = ""  # the leaf's SHA-256
    ca_keys: frozenset[str] = frozenset()  # SHA-256 of the key of each CA on its verified chain
    not_after: dt.datetime | None = None  # the earliest expiry on the chain
    gateway: bool = False  # the pinned gateway (service processes)


@dataclass(frozen=True)
class Peer:
    """The caller of a connection: its principal, and whether it is the pinned gateway."""

    principal: Principal
    gateway: bool


def check_bundles_apart(first: bytes, second: bytes, first_name: str, second_name: str) -> None:
    """ValueError when two CA bundles share a CA (the same key) or one holds a CA the other's
    signed: either could then sign identities of the other's kind."""
    a = x509.load_pem_x509_certificates(first) if b"-----BEGIN" in first else []
    b = x509.load_pem_x509_certificates(second) if b"-----BEGIN" in second else []
    shared = {spki_sha256(c) for c in a} & {spki_sha256(c) for c in b}
    signed = [
        (child, parent)
        for child, parent in [(x, y) for x in a for y in b] + [(y, x) for x in a for y in b]
        if child.issuer == parent.subject and _signed_by(child, parent)
    ]
    if shared or signed:
        raise ValueError(
            f"{first_name} and {second_name} share a CA: each kind of certificate needs CAs of"
            " its own, or one kind's CA could sign the other's identities"
        )


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def parse_fingerprints(text: str) -> frozenset[str]:
    """SHA-256 fingerprints separated by commas or spaces (the `gateway_fingerprints`
    setting); ValueError for anything else."""
    return frozenset(normalize_fingerprint(t) for t in re.split(r"[,\s]+", text) if t)


class Authenticator:
    """The caller's certificate, checked (results cached per version of the trust), then the
    registry (cached for `registry_cache_s`). `gateway_pins`: in a service process, the
    fingerprints of the gateway's certificate."""

    def __init__(
        self, trust: TrustStore, registry: Registry, gateway_pins: frozenset[str] = frozenset()
    ) -> None:
        self._trust = trust
        self._registry = registry
        self._pins = gateway_pins
        self._cache: dict[tuple[int, bytes, bytes], _Checked] = {}

    async def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        return (await self.peer(context)).principal

    async def peer(self, context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise unauthenticated("CLIENT_CERTIFICATE_REQUIRED", "a client certificate is required")
        chain = b"".join(auth.get("x509_pem_cert_chain") or ())  # as sent, without the leaf
        trust = self._trust.current()
        key = (trust.version, pems[0], chain)
        checked = self._cache.get(key)
        if checked is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            checked = check_certificate(pems[0], trust, chain, self._pins)
            if checked.problem != _EXPIRED:  # one not yet valid may become so
                self._cache[key] = checked
            if checked.principal is None:
                log.info("client certificate refused", reason=checked.problem[0])
        if checked.principal is None:
            raise unauthenticated(*checked.problem)
        if checked.not_after is not None and dt.datetime.now(dt.UTC) > checked.not_after:
            raise unauthenticated(*_EXPIRED)  # a cached verification never outlives the chain
        principal = checked.principal
        if principal.kind == "operator":
            operator = await self._registry.lookup(principal.name)
            if operator is None:
                raise unauthenticated("OPERATOR_UNKNOWN", "the operator is not registered")
            check_binding(operator, checked)
            check_status(operator)
        return Peer(principal, checked.gateway)


async def check_operator(registry: Registry, operator_id: str) -> Operator:
    """The operator may call: registered and active."""
    operator = await registry.lookup(operator_id)
    if operator is None:
        raise unauthenticated("OPERATOR_UNKNOWN", "the operator is not registered")
    check_status(operator)
    return operator


def check_status(operator: Operator) -> None:
    if operator.status is not OperatorStatus.ACTIVE:
        raise unauthenticated("OPERATOR_SUSPENDED", "the operator is suspended")


def check_binding(operator: Operator, checked: _Checked) -> None:
    """The certificate was issued by a trust anchor registered for this operator: a CA on its
    verified chain, or the certificate itself pinned."""
    if not operator.anchors:
        raise unauthenticated(
            "NO_TRUST_ANCHOR", "no trust anchor is registered for the operator (fail closed)"
        )
    if checked.fingerprint in operator.pins or checked.ca_keys & operator.ca_keys:
        return
    raise unauthenticated(
        "ISSUER_NOT_BOUND", "the certificate's issuer is not registered for the operator"
    )


class ServiceAuthenticator:
    """Who is calling a service process (separate-processes mode): the caller's own
    certificate, checked as the gateway checks it. The pinned gateway (a certificate named
    `platform/gateway` from the gateway CA, or whose fingerprint is pinned) names the caller it
    authenticated in the `x-opconnect-principal` header (without one, the gateway's own calls:
    health). Nobody else may send that header (PRINCIPAL_HEADER_REFUSED), a certificate named
    `gateway` that is not the pinned one is refused (GATEWAY_NOT_PINNED), and operators' own
    certificates are refused (they reach the services through the gateway, its limits
    included); other platform callers are served as themselves."""

    def __init__(self, direct: Authenticator, registry: Registry) -> None:
        self._direct = direct
        self._registry = registry

    async def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        peer = await self._direct.peer(context)
        caller = peer.principal
        if caller.kind == "operator":
            raise unauthenticated("GATEWAY_REQUIRED", "operators call through the gateway")
        claimed = [v for k, v in context.invocation_metadata() or () if k == PRINCIPAL_HEADER]
        if not peer.gateway:
            if caller == GATEWAY:
                raise unauthenticated(
                    "GATEWAY_NOT_PINNED", "the certificate is not the gateway's pinned identity"
                )
            if claimed:
                raise unauthenticated(
                    "PRINCIPAL_HEADER_REFUSED", "only the gateway may name a caller"
                )
            return caller
        if not claimed:
            return caller  # the gateway's own calls (health)
        kind, _, name = str(claimed[0]).partition("/") if len(claimed) == 1 else ("", "", "")
        if kind not in ("operator", "platform") or not IDENTITY.fullmatch(name):
            raise unauthenticated(
                "PRINCIPAL_INVALID",
                "the gateway named no caller (operator/<id> or platform/<name>)",
            )
        if kind == "operator":
            await check_operator(self._registry, name)
        return Principal(cast(PrincipalKind, kind), name)


# --- the certificate check -----------------------------------------------------------------------

_INVALID = "CERTIFICATE_INVALID"
_EXPIRED = (_INVALID, "the certificate (or a CA of its chain) is expired or not yet valid")


def _refuse(reason: str, message: str) -> _Checked:
    return _Checked(None, (reason, message))


def _leaf_problem(cert: x509.Certificate, now: dt.datetime) -> str:
    """What makes `cert` no client certificate, checked by us whatever TLS accepted."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "a CA certificate cannot be a client certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "the certificate is not for client authentication (extended key usage clientAuth)"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return _EXPIRED[1]
    return ""


def _verify(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: tuple[bytes, ...],
    now: dt.datetime,
) -> list[x509.Certificate] | str:
    """The verified chain, leaf first, to one of `anchors`; or why there is none: "" when no
    path reaches them, else the check that failed."""
    if not anchors:
        return ""
    store = verification.Store([x509.load_pem_x509_certificate(a) for a in anchors])
    verifier = (
        verification.PolicyBuilder()
        .store(store)
        .time(now)
        .max_chain_depth(_MAX_CHAIN)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(leaf, intermediates).chain)
    except verification.VerificationError as error:
        text = str(error)
        if "path length" in text:
            return "the certificate's chain breaks a path length constraint"
        if "no interior errors" in text:
            return ""
        if "expired" in text or "not yet valid" in text or "validity" in text:
            return _EXPIRED[1]
        return "the certificate's chain does not meet the X.509 profile"


def check_certificate(
    pem: bytes, trust: Trust, chain: bytes = b"", gateway_pins: frozenset[str] = frozenset()
) -> _Checked:
    """The principal a client certificate (and the chain its peer sent) proves, against one
    version of the trust; or why it proves none."""
    now = dt.datetime.now(dt.UTC)
    try:
        leaf = x509.load_pem_x509_certificate(pem)
        intermediates = x509.load_pem_x509_certificates(chain)[:_MAX_CHAIN] if chain else []
    except ValueError:
        return _refuse(_INVALID, "the certificate does not parse")
    try:
        identity = identity_from_cert(pem)
    except ValueError:
        return _refuse("IDENTITY_INVALID", "the certificate names no opconnect identity")
    problem = _leaf_problem(leaf, now)
    if problem:
        return _refuse(_INVALID, problem)
    gateway = False
    path: list[x509.Certificate] | str = ""
    if identity.kind == "platform" and identity.name == GATEWAY_NAME and trust.gateway_cas:
        path = _verify(leaf, intermediates, trust.gateway_cas, now)
        gateway = not isinstance(path, str)
    if isinstance(path, str) and not path:
        anchors = trust.operator_cas if identity.kind == "operator" else trust.platform_cas
        path = _verify(leaf, intermediates, anchors, now)
        gateway = _is_gateway(identity, gateway_pins) and not isinstance(path, str)
    if isinstance(path, str):
        if path:
            return _refuse(_INVALID, path)
        return _refuse(
            "ISSUER_NOT_TRUSTED", f"the certificate's CA may not sign {identity.kind} certificates"
        )
    issuer = leaf.issuer.rfc4514_string()
    if (
        (issuer, identity.serial) in trust.revoked
        or identity.serial in trust.denied_serials
        or identity.fingerprint in trust.denied_fingerprints
        or any(_revoked(cert, trust) for cert in path[1:])
    ):
        return _refuse("CERTIFICATE_REVOKED", "the certificate is revoked")
    return _Checked(
        Principal(identity.kind, identity.name),
        fingerprint=identity.fingerprint,
        ca_keys=frozenset(spki_sha256(cert) for cert in path[1:]),
        not_after=min(cert.not_valid_after_utc for cert in path),
        gateway=gateway,
    )


def _is_gateway(identity: PeerIdentity, pins: frozenset[str]) -> bool:
    return (
        identity.kind == "platform"
        and identity.name == GATEWAY_NAME
        and (identity.fingerprint in pins)
    )


def _revoked(cert: x509.Certificate, trust: Trust) -> bool:
    """A CA of the chain is revoked (on its issuer's CRL) or denied."""
    return (
        (cert.issuer.rfc4514_string(), cert.serial_number) in trust.revoked
        or cert.serial_number in trust.denied_serials
        or cert.fingerprint(hashes.SHA256()).hex() in trust.denied_fingerprints
    )
