"""Clients of several replicas: a gRPC target naming several addresses, with calls spread.

A target may be one address (`host:port`), a list of addresses
(`ipv4:10.0.0.5:50051,10.0.0.6:50051`, or `ipv6:[::1]:5001,[::1]:5002`) or a DNS name whose
every address is a replica (`dns:///opconnect-records.internal:50051`). Every channel the
system opens to its own processes, and its clients' channels, use gRPC's `round_robin` policy
(a service config given as a channel option): each call goes to the next replica that is
connected, so calls spread, and a replica that is down (its connection refused or lost) is
skipped until it is back. A stream stays on the replica it started on; when that replica goes
away the stream ends (UNAVAILABLE) and the client resumes it, from its last cursor, on another.
"""

from __future__ import annotations

import json
from typing import Any

from opconnect_client.connection import first_host

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def balanced(target: str, server_name: str = "") -> list[tuple[str, Any]]:
    """Channel options that spread calls across every address of `target` (round_robin).

    The name checked in each replica's TLS certificate is `server_name` when given; otherwise,
    for a list of addresses, the first address's host (gRPC would check the whole list, which
    no certificate names), and for any other target the host it names."""
    options: list[tuple[str, Any]] = [("grpc.service_config", SERVICE_CONFIG)]
    authority = server_name or first_host(target)
    if authority:
        options.append(("grpc.default_authority", authority))
    return options


def one_address(target: str) -> str:
    """One `host:port` of `target`, for a tool that talks to one address at a time (`buf
    curl`): the first of a list, the name of a DNS target, a plain address as it is."""
    first = first_host(target)
    if first:
        return first
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return target.removeprefix(scheme)
    return target
