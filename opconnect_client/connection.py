"""The channel to the platform: mutual TLS from a CA, a certificate and its key, one gateway or
several, and a gRPC service config that does what gRPC can do by itself.

The files are checked before any call, so that a wrong one is named in one line (a key that
does not belong to the certificate, a file that is not PEM) instead of surfacing as a failed
TLS handshake deep inside gRPC.

The service config:
- `round_robin` across every address of the target (`ipv4:10.0.0.5:50051,10.0.0.6:50051` or a
  `dns:///` name with several addresses): calls spread, a gateway that is down is skipped;
- a retry policy for the calls that only read (`GetNumber`, `ListNumbers`, `GetConsent`,
  `ListConsents`, `GetCallRecord`, `GetQualitySummary`, `GetUsageSummary`,
  `GetReconciliation`): retried by gRPC itself on UNAVAILABLE, up to 5 attempts with backoff.
  Writes and streams are resumed by the library, which knows what was acknowledged;
- keepalive pings every 30 s on an open call, so that a connection that died silently (a NAT
  or load balancer dropping it) is noticed within a minute instead of never.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from opconnect_client.errors import ClientError

READS = {
    "opconnect.numbers.v1.NumberService": ["GetNumber", "ListNumbers"],
    "opconnect.numbers.v1.ConsentService": ["GetConsent", "ListConsents"],
    "opconnect.records.v1.CallRecordService": ["GetCallRecord", "GetQualitySummary"],
    "opconnect.usage.v1.UsageService": ["GetUsageSummary", "GetReconciliation"],
}

SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in READS.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a full batch of records, with room


@dataclass(frozen=True)
class Connection:
    """Where the platform is and this operator's mutual-TLS files.

    `target`: `host:port`, a list of gateways (`ipv4:10.0.0.5:50051,10.0.0.6:50051`) or a DNS
    name (`dns:///opconnect.example:50051`). `server_name`: the name to check in the gateways'
    certificate when it is not the target's host (for a list, the first address's host is
    checked unless this is set)."""

    target: str
    ca: str | os.PathLike[str]
    cert: str | os.PathLike[str]
    key: str | os.PathLike[str]
    server_name: str = ""
    options: list[tuple[str, Any]] = field(default_factory=list)  # extra channel options

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials from the three files, after checking that they make sense."""
        ca = _read(self.ca, "CA certificate")
        cert = _read(self.cert, "certificate")
        key = _read(self.key, "private key")
        _check_pair(self.cert, cert, self.key, key)
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise ClientError(f"{self.ca}: not a PEM CA certificate") from None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        authority = self.server_name or first_host(self.target)
        if authority:
            options.append(("grpc.default_authority", authority))
        return options + self.options

    def channel(self) -> grpc.aio.Channel:
        """A new channel (connects lazily, on the first call)."""
        return grpc.aio.secure_channel(self.target, self.credentials(), self.channel_options())


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ClientError(f"cannot read the {what} {path}: {error.strerror}") from None


def _check_pair(
    cert_path: str | os.PathLike[str],
    cert_pem: bytes,
    key_path: str | os.PathLike[str],
    key_pem: bytes,
) -> None:
    """The certificate is PEM, the key is a PEM private key, and the key is the certificate's."""
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ClientError(f"{cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ClientError(f"{key_path}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        raise ClientError(f"the key {key_path} does not belong to the certificate {cert_path}")


def first_host(target: str) -> str:
    """For a list of addresses (`ipv4:a:p,b:p`), the first one, whose name the gateways'
    certificate must carry (gRPC would check the whole list, which no certificate names)."""
    scheme, _, addresses = target.partition(":")
    if scheme not in ("ipv4", "ipv6") or "," not in addresses:
        return ""
    return addresses.split(",", 1)[0].removeprefix("//")
