"""Opaque tokens (stream cursors, page tokens): authenticated, encrypted, URL-safe strings.

A token carries a purpose (what it is for, e.g. the change log it points into) and a body, sealed
with AES-GCM under a key of this deployment: a client can hand back what the server gave it, and
can neither read it (no log position, no platform-wide head) nor make or change one. Anything else
(another purpose or request, another deployment's key, a corrupted or made-up string) does not
unseal, and is answered exactly as a malformed token is.

    token = base64url(VERSION | key id (4) | nonce (12) | AES-GCM(body) with its tag (16))

The version, key id, purpose and (page tokens) the request are the associated data. Keys come
from the `token_keys` setting or the key file (`token_keys_file`, default <data_dir>/token-keys,
made on first run, mode 0600): one base64url key a line, '#' comments. The first key seals;
every listed key opens, so keys rotate by adding a new one first and keeping the old ones until
the tokens sealed with them have expired. A key's id is derived from the key.

A process's keys are installed once, by `install()` (the server's start-up does it); sealing or
opening before that is a programming error (RuntimeError).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import itertools
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plumbing.config import Settings
from plumbing.errors import invalid_field
from plumbing.files import create_file, write_file
from plumbing.logs import get_logger

log = get_logger("opconnect.tokens")

VERSION = 2  # 1: checksummed, not encrypted (no longer read)
# Longest token read: the longest real one is a quality summary's page token after a 253-character
# trunk FQDN (382 characters); a cursor is 55.
MAX_LENGTH = 512
KEY_BYTES = 32  # AES-256
_ID_BYTES = 4
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEAD = 1 + _ID_BYTES
KEY_FILE_HEADER = (
    "# opconnect token keys (cursors, page tokens): one base64url AES-256 key a line.\n"
    "# The first key seals; every key listed opens. Keep this file secret (mode 0600) and the\n"
    "# same for every replica of the deployment.\n"
)


class _Nonces:
    """AES-GCM nonces: random 12-byte strings as `secrets.token_bytes` gives them, drawn from
    the system 4,096 at a time (a cursor is sealed for every response of every stream, and each
    `os.urandom` call lets go of the GIL and waits to take it back on a busy server). Each
    draw's bytes are handed out once, whichever thread asks (the counter is atomic); a forked
    child draws afresh, never reusing its parent's (`os.register_at_fork`)."""

    COUNT = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._draw: tuple[bytes, Iterator[int]] = self._new()
        os.register_at_fork(after_in_child=self.reset)

    def _new(self) -> tuple[bytes, Iterator[int]]:
        return secrets.token_bytes(_NONCE_BYTES * self.COUNT), itertools.count(0, _NONCE_BYTES)

    def reset(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at the fork stays held
        self._draw = self._new()

    def __call__(self) -> bytes:
        while True:
            draw = self._draw
            pool, offsets = draw
            at = next(offsets)
            if at < len(pool):
                return pool[at : at + _NONCE_BYTES]
            with self._lock:
                if self._draw is draw:  # not drawn again meanwhile by another thread
                    self._draw = self._new()


_nonce = _Nonces()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes | None:
    """The bytes of an unpadded base64url string in its one canonical spelling, or None."""
    if not text.isascii():
        return None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw if _b64(raw) == text else None  # one token, one spelling


def key_id(key: bytes) -> bytes:
    """A key's short id, carried in its tokens (derived, so nothing else needs to be kept)."""
    return hashlib.sha256(b"opconnect token key id\0" + key).digest()[:_ID_BYTES]


def new_key() -> str:
    """A new random key, as the key file and the `token_keys` setting spell it."""
    return _b64(secrets.token_bytes(KEY_BYTES))


class Keyring:
    """A deployment's token keys: the first seals, every one opens."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("token keys: none given")
        self._ciphers: dict[bytes, AESGCM] = {}
        for key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"token keys: a key must be {KEY_BYTES} bytes")
            ident = key_id(key)
            if ident in self._ciphers:
                raise ValueError(f"token keys: key {ident.hex()} is listed twice")
            self._ciphers[ident] = AESGCM(key)
        self._sealing = key_id(keys[0])

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring of one new random key (tests, tools that need no shared key)."""
        return cls([secrets.token_bytes(KEY_BYTES)])

    @property
    def ids(self) -> list[str]:
        """The keys' ids (hex), the sealing key's first."""
        return [ident.hex() for ident in self._ciphers]

    def seal(self, purpose: str, body: bytes, request: str | None = None) -> str:
        head = bytes([VERSION]) + self._sealing
        nonce = _nonce()
        sealed = self._ciphers[self._sealing].encrypt(nonce, body, _context(head, purpose, request))
        return _b64(head + nonce + sealed)

    def unseal(self, token: str, purpose: str, request: str | None = None) -> bytes | None:
        if len(token) > MAX_LENGTH:
            return None
        raw = _unb64(token)
        if raw is None or len(raw) < _HEAD + _NONCE_BYTES + _TAG_BYTES or raw[0] != VERSION:
            return None
        cipher = self._ciphers.get(raw[1:_HEAD])
        if cipher is None:
            return None
        nonce, sealed = raw[_HEAD : _HEAD + _NONCE_BYTES], raw[_HEAD + _NONCE_BYTES :]
        try:
            return cipher.decrypt(nonce, sealed, _context(raw[:_HEAD], purpose, request))
        except InvalidTag:
            return None


def _context(head: bytes, purpose: str, request: str | None) -> bytes:
    """The associated data: version, key id, purpose and (page tokens) the request."""
    name = purpose.encode()
    bound = b"" if request is None else b"\1" + request.encode()
    return head + len(name).to_bytes(4, "big") + name + bound


# --- the process's keys ------------------------------------------------------------------------


class _Process:
    """The keys this process seals and opens tokens with (installed once, at start-up)."""

    keyring: Keyring | None = None


def install(keyring: Keyring | None) -> None:
    """Use `keyring` for every token this process seals or opens from now on."""
    _Process.keyring = keyring


def installed() -> Keyring | None:
    return _Process.keyring


def _keyring() -> Keyring:
    if _Process.keyring is None:
        raise RuntimeError("no token keys installed (plumbing.tokens.install)")
    return _Process.keyring


def seal(purpose: str, body: bytes) -> str:
    return _keyring().seal(purpose, body)


def unseal(token: str, purpose: str) -> bytes | None:
    """The body of a token sealed for `purpose` by this deployment, or None if `token` is not
    one."""
    return _keyring().unseal(token, purpose)


# --- keys from the settings or the key file ----------------------------------------------------


def parse_keys(text: str, source: str) -> list[bytes]:
    """The keys of a key file's text or of the `token_keys` setting (separated by line breaks,
    commas or spaces; '#' starts a comment to the end of the line)."""
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        for word in line.split("#", 1)[0].replace(",", " ").split():
            key = _unb64(word)
            if key is None or len(key) != KEY_BYTES:
                raise ValueError(
                    f"{source} line {number}: not a base64url key of {KEY_BYTES} bytes"
                )
            keys.append(key)
    if not keys:
        raise ValueError(f"{source}: no token keys")
    return keys


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def ensure_key_file(path: Path) -> bool:
    """Make the key file with one new key if it is missing (its directory 0700 if missing too);
    True if made. Safe when several processes start at once: one file wins, whole."""
    if path.exists():
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return create_file(path, f"{KEY_FILE_HEADER}# added {_stamp()}\n{new_key()}\n".encode())


def rotate_key_file(path: Path) -> str:
    """Put a new key first in the key file (made if missing), keeping the others; its id."""
    if ensure_key_file(path):
        return keys_of_file(path)[0]
    old = path.read_text()
    parse_keys(old, str(path))  # never rewrite a file that does not read
    header = set(KEY_FILE_HEADER.splitlines(True))
    body = "".join(line for line in old.splitlines(True) if line not in header)
    key = new_key()
    write_file(path, f"{KEY_FILE_HEADER}# added {_stamp()}\n{key}\n{body}".encode())
    return Keyring(parse_keys(key, "new key")).ids[0]


def keys_of_file(path: Path) -> list[str]:
    """The ids (hex) of the file's keys, the sealing key's first."""
    return Keyring(parse_keys(path.read_text(), str(path))).ids


def load_keyring(settings: Settings) -> Keyring:
    """The deployment's keys: the `token_keys` setting if set, else the key file (made on first
    run when it is the default one, <data_dir>/token-keys)."""
    if settings.token_keys:
        return Keyring(parse_keys(settings.token_keys, "setting token_keys"))
    path = settings.token_keys_path
    if not settings.token_keys_file and ensure_key_file(path):
        log.info("token key file made", path=str(path))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("token key file is readable by others", path=str(path), mode=oct(mode))
    return Keyring(parse_keys(path.read_text(), str(path)))


# --- page tokens: where the next page starts, bound to the request that made it ---------------

_SEPARATOR = "\x1f"  # ASCII unit separator: in no key a page starts after


def page_token(purpose: str, request: str, after: Sequence[str]) -> str:
    """A token for the page after the key `after` (a few strings), only valid with `request`
    (a text naming the request's period, filters and caller): AIP-158 page tokens."""
    return _keyring().seal(purpose, _SEPARATOR.join(after).encode(), request)


def bound_key(token: str, purpose: str, request: str, parts: int) -> list[str] | None:
    """The key of `page_token(purpose, request, key)` (`parts` strings), or None for anything
    else, a token of another request included (a stream's cursor bound to its request)."""
    body = _keyring().unseal(token, purpose, request)
    if body is None:
        return None
    try:
        key = body.decode().split(_SEPARATOR)
    except UnicodeDecodeError:
        return None
    return key if len(key) == parts else None


def read_page_token(token: str, purpose: str, request: str, parts: int, domain: str) -> list[str]:
    """The key of `page_token(purpose, request, key)` (`parts` strings); INVALID_ARGUMENT /
    PAGE_TOKEN_INVALID for anything else, a token of another request included."""
    key = bound_key(token, purpose, request, parts)
    if key is not None:
        return key
    raise invalid_field(
        domain,
        "PAGE_TOKEN_INVALID",
        "page_token",
        "not a page token of this request (the same period, filters and options)",
    )
