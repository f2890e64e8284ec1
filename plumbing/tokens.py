"""Opaque tokens (stream cursors, page tokens): versioned, checksummed, URL-safe strings.

A token carries a purpose (what it is for, e.g. the change log it points into) and a body. It is
not secret and not signed: it only lets a client hand back what the server gave it. Anything
else (another purpose, a corrupted or made-up string) does not unseal.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Sequence

from plumbing.errors import invalid_field

VERSION = 1
MAX_LENGTH = 256


def seal(purpose: str, body: bytes) -> str:
    raw = bytes([VERSION]) + purpose.encode() + b"\0" + body
    raw += zlib.crc32(raw).to_bytes(4, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unseal(token: str, purpose: str) -> bytes | None:
    """The body of a token sealed for `purpose`, or None if `token` is not one."""
    if len(token) > MAX_LENGTH or not token.isascii():
        return None
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token:
        return None  # one token, one spelling
    head = bytes([VERSION]) + purpose.encode() + b"\0"
    if len(raw) < len(head) + 4 or not raw.startswith(head):
        return None
    if zlib.crc32(raw[:-4]).to_bytes(4, "big") != raw[-4:]:
        return None
    return raw[len(head) : -4]


# --- page tokens: where the next page starts, bound to the request that made it ---------------

_SEPARATOR = "\x1f"  # ASCII unit separator: in no key a page starts after


def page_token(purpose: str, request: str, after: Sequence[str]) -> str:
    """A token for the page after the key `after` (a few strings), only valid with `request`
    (a text naming the request's period, filters and caller): AIP-158 page tokens."""
    binding = zlib.crc32(request.encode()).to_bytes(4, "big")
    return seal(purpose, binding + _SEPARATOR.join(after).encode())


def read_page_token(token: str, purpose: str, request: str, parts: int, domain: str) -> list[str]:
    """The key of `page_token(purpose, request, key)` (`parts` strings); INVALID_ARGUMENT /
    PAGE_TOKEN_INVALID for anything else, a token of another request included."""
    body = unseal(token, purpose)
    if body is not None and body[:4] == zlib.crc32(request.encode()).to_bytes(4, "big"):
        try:
            key = body[4:].decode().split(_SEPARATOR)
        except UnicodeDecodeError:
            key = []
        if len(key) == parts:
            return key
    raise invalid_field(
        domain,
        "PAGE_TOKEN_INVALID",
        "page_token",
        "not a page token of this request (the same period, filters and options)",
    )
