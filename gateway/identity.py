"""Who is calling: the principal named by the client certificate, checked after the handshake.

The TLS handshake already proved the certificate chains to a trusted CA. Here: the certificate
carries exactly one SPIFFE identity; an operator's was signed by an operator CA and a platform's
by a platform CA; it is not revoked (CRL) nor denied (serial or fingerprint); and an operator is
in the registry and active. Any failure is UNAUTHENTICATED, with a reason but nothing a prober
could use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509

from gateway.pki import identity_from_cert, issued_by
from gateway.registry import OperatorStatus, Registry
from gateway.trust import Trust, TrustStore
from plumbing.errors import unauthenticated
from plumbing.rpc import Principal

CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class _Checked:
    """What a certificate says, once verified against one version of the trust."""

    principal: Principal | None
    problem: tuple[str, str] = ("", "")


class Authenticator:
    def __init__(self, trust: TrustStore, registry: Registry) -> None:
        self._trust = trust
        self._registry = registry
        self._cache: dict[tuple[int, bytes], _Checked] = {}

    async def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise unauthenticated("CLIENT_CERTIFICATE_REQUIRED", "a client certificate is required")
        trust = self._trust.current()
        key = (trust.version, pems[0])
        checked = self._cache.get(key)
        if checked is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            checked = self._cache[key] = check_certificate(pems[0], trust)
        if checked.principal is None:
            raise unauthenticated(*checked.problem)
        principal = checked.principal
        if principal.kind == "operator":
            operator = await self._registry.lookup(principal.name)
            if operator is None:
                raise unauthenticated("OPERATOR_UNKNOWN", "the operator is not registered")
            if operator.status is not OperatorStatus.ACTIVE:
                raise unauthenticated("OPERATOR_SUSPENDED", "the operator is suspended")
        return principal


def check_certificate(pem: bytes, trust: Trust) -> _Checked:
    try:
        identity = identity_from_cert(pem)
    except ValueError:
        return _Checked(None, ("IDENTITY_INVALID", "the certificate names no opconnect identity"))
    cas = trust.operator_cas if identity.kind == "operator" else trust.platform_cas
    if not issued_by(pem, cas):
        return _Checked(
            None,
            (
                "ISSUER_NOT_TRUSTED",
                f"the certificate's CA may not sign {identity.kind} certificates",
            ),
        )
    issuer = x509.load_pem_x509_certificate(pem).issuer.rfc4514_string()
    if (
        (issuer, identity.serial) in trust.revoked
        or identity.serial in trust.denied_serials
        or identity.fingerprint in trust.denied_fingerprints
    ):
        return _Checked(None, ("CERTIFICATE_REVOKED", "the certificate is revoked"))
    return _Checked(Principal(identity.kind, identity.name))
