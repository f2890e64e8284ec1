"""Field rules shared by more than one service: E.164 numbers, Entra GUIDs, SIP URIs, FQDNs.

Each check returns a description of what is wrong, or None when the value is fine, so callers
can collect every violation of a request before answering.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

from plumbing.errors import invalid_field


class Outcome(StrEnum):
    """What became of one record of a batch, in every service that takes records in batches
    (call records, call durations): one vocabulary, as the contract's `*_OUTCOME_*` says."""

    ACCEPTED = "accepted"  # stored
    DUPLICATE = "duplicate"  # the same record was already stored: nothing changed
    REFUSED = "refused"  # not stored; a `Refusal` says why


@dataclass(frozen=True)
class Refusal:
    """Why one record of a batch was refused: a reason (UPPER_SNAKE), the field path, a
    message. Its neighbours in the batch go on."""

    reason: str
    field: str
    message: str


E164 = re.compile(r"\+[1-9][0-9]{1,14}")
# Operator ids and platform names, as a certificate's SPIFFE URI carries them (always applied
# with fullmatch).
IDENTITY_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
IDENTITY = re.compile(IDENTITY_PATTERN)
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SIP = re.compile(
    r"(?P<scheme>[sS][iI][pP][sS]?):"
    r"(?:(?P<user>(?:[A-Za-z0-9\-_.!~*'()&=+$,?/]|%[0-9A-Fa-f]{2})+)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<params>(?:;[A-Za-z0-9\-_.!~*'%+]+(?:=[A-Za-z0-9\-_.!~*'%+\[\]:]*)?)*)"
)
SIP_URI_MAX = 512


def check_e164(value: str) -> str | None:
    if not value:
        return "required: an E.164 number such as +14255550100"
    if E164.fullmatch(value) is None:
        return "not E.164: '+', then 2 to 15 digits, the first not 0"
    return None


def check_guid(value: str) -> str | None:
    if not value:
        return "required: a GUID such as 6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"
    if GUID.fullmatch(value) is None:
        return "not a GUID (8-4-4-4-12 hexadecimal digits)"
    return None


def check_fqdn(value: str) -> str | None:
    if not value:
        return "required: a host name such as sbc1.operator.example"
    if len(value) > 253:
        return "longer than 253 characters"
    labels = value.removesuffix(".").split(".")
    if len(labels) < 2 or not _labels_ok(labels):
        return "not a fully qualified domain name"
    return None


def _labels_ok(labels: list[str]) -> bool:
    """RFC 1034 labels, the last (top) one starting with a letter (RFC 3261 toplabel)."""
    return all(_LABEL.fullmatch(label) for label in labels) and labels[-1][:1].isalpha()


def _check_host(host: str) -> str | None:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "host is not a valid IPv6 address"
        return None
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "host is not a valid IPv4 address"
        return None
    if len(host) > 253 or not _labels_ok(host.removesuffix(".").split(".")):
        return "host is not a valid domain name"
    return None


def check_sip_uri(value: str) -> str | None:
    """A `sip:` or `sips:` URI with a host (RFC 3261 section 19.1), no password, no headers."""
    if not value:
        return "required: a SIP URI such as sip:+14255550100@sbc1.operator.example;user=phone"
    if len(value) > SIP_URI_MAX:
        return f"longer than {SIP_URI_MAX} characters"
    match = _SIP.fullmatch(value)
    if match is None:
        return "not a SIP URI: sip: or sips:, an optional user@, a host, optional ;parameters"
    problem = _check_host(match["host"])
    if problem:
        return problem
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        return "port out of range 1-65535"
    return None


def check_sip_or_e164(value: str) -> str | None:
    """A call party: E.164 on the PSTN side, or a SIP URI on the Teams side."""
    if value.startswith("+"):
        return check_e164(value)
    if value[:4].lower() in ("sip:", "sips"):
        return check_sip_uri(value)
    return "neither an E.164 number nor a SIP URI"


def check_period(
    domain: str, start: dt.datetime | None, end: dt.datetime | None, longest: dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    """A request's [start_time, end_time): both set, in order, at most `longest` apart; else
    INVALID_ARGUMENT with PERIOD_INVALID or PERIOD_TOO_LONG naming the field."""
    if start is None:
        raise invalid_field(domain, "PERIOD_INVALID", "start_time", "required")
    if end is None:
        raise invalid_field(domain, "PERIOD_INVALID", "end_time", "required")
    if end <= start:
        raise invalid_field(domain, "PERIOD_INVALID", "end_time", "must be after start_time")
    if end - start > longest:
        raise invalid_field(
            domain, "PERIOD_TOO_LONG", "end_time", f"at most {longest.days} days after start_time"
        )
    return start, end


# --- the checks every read request shares ------------------------------------------------------


def optional_tenant(value: str, domain: str, field: str = "tenant_id") -> str | None:
    """A tenant filter: empty for none, else a GUID (lower-cased); INVALID_ARGUMENT /
    TENANT_ID_INVALID naming `field` otherwise."""
    if not value:
        return None
    if problem := check_guid(value):
        raise invalid_field(domain, "TENANT_ID_INVALID", field, problem)
    return value.lower()


def page_size(requested: int, default: int, maximum: int, domain: str) -> int:
    """A request's `page_size`: 0 for `default`, at most `maximum`; INVALID_ARGUMENT /
    PAGE_SIZE_INVALID when negative."""
    if requested < 0:
        raise invalid_field(domain, "PAGE_SIZE_INVALID", "page_size", "must not be negative")
    return min(requested or default, maximum)


def batch_size(requested: int, default: int, maximum: int, domain: str) -> int:
    """A stream request's `max_batch_size`: 0 for `default`, at most `maximum`;
    INVALID_ARGUMENT / MAX_BATCH_SIZE_INVALID when negative."""
    if requested < 0:
        raise invalid_field(
            domain, "MAX_BATCH_SIZE_INVALID", "max_batch_size", "must not be negative"
        )
    return min(requested or default, maximum)
