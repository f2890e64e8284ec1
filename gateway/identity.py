"""Who is calling: the principal named by the client certificate, checked after the handshake.

The TLS handshake already proved the certificate chains to a trusted CA. Here: the certificate
carries exactly one SPIFFE identity; an operator's was signed by an operator CA and a platform's
by a platform CA; it is not revoked (CRL) nor denied (serial or fingerprint); and an operator is
in the registry and active. Any failure is UNAUTHENTICATED, with a reason but nothing a prober
could use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import grpc
from cryptography import x509

from gateway.pki import identity_from_cert, issued_by
from gateway.registry import OperatorStatus, Registry
from gateway.trust import Trust, TrustStore
from plumbing.errors import unauthenticated
from plumbing.rpc import PRINCIPAL_HEADER, Authenticate, Principal, PrincipalKind

CACHE_LIMIT = 10_000
GATEWAY_NAME = "gateway"  # the platform principal that may speak for the callers it forwards
GATEWAY = Principal("platform", GATEWAY_NAME)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


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
            await check_operator(self._registry, principal.name)
        return principal


async def check_operator(registry: Registry, operator_id: str) -> None:
    """The operator may call: registered and active."""
    operator = await registry.lookup(operator_id)
    if operator is None:
        raise unauthenticated("OPERATOR_UNKNOWN", "the operator is not registered")
    if operator.status is not OperatorStatus.ACTIVE:
        raise unauthenticated("OPERATOR_SUSPENDED", "the operator is suspended")


class ServiceAuthenticator:
    """Who is calling a service process (separate-processes mode): the caller's own
    certificate, checked as the gateway checks it; when that caller is the gateway (the
    platform principal `gateway`), the principal the gateway authenticated, from the
    `x-opconnect-principal` header (without one, the gateway's own calls: health). A header
    from anyone else is ignored; operators' own
    certificates are refused (they reach the services through the gateway, its limits
    included)."""

    def __init__(self, direct: Authenticate, registry: Registry) -> None:
        self._direct = direct
        self._registry = registry

    async def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        caller = await self._direct(context)
        if caller.kind == "operator":
            raise unauthenticated("GATEWAY_REQUIRED", "operators call through the gateway")
        if caller != GATEWAY:
            return caller
        claimed = [v for k, v in context.invocation_metadata() or () if k == PRINCIPAL_HEADER]
        if not claimed:
            return caller  # the gateway's own calls (health)
        kind, _, name = str(claimed[0]).partition("/") if len(claimed) == 1 else ("", "", "")
        if kind not in ("operator", "platform") or not _NAME.fullmatch(name):
            raise unauthenticated(
                "PRINCIPAL_INVALID",
                "the gateway named no caller (operator/<id> or platform/<name>)",
            )
        if kind == "operator":
            await check_operator(self._registry, name)
        return Principal(cast(PrincipalKind, kind), name)


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
