"""Protobuf wire format, for building large stream responses from stored bytes.

A stream that sends records already serialized once (at publish) joins their bytes into a
response instead of parsing and re-serializing each one. The protobuf encoding makes this exact:
a message is the concatenation of its fields, each a tag and, for length-delimited fields, a
varint length and the bytes; a repeated field is the field repeated, so concatenated messages
parse as one whose repeated fields are appended. Handlers yield such bytes and the per-RPC
wrapper (plumbing.rpc) sends them as they are.
"""

from __future__ import annotations

_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """The base-128 varint encoding of a non-negative integer."""
    if value < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The encodings of the small numbers every field has (tags, lengths of records): made once,
# looked up for each record published or streamed.
_SMALL = [varint(n) for n in range(1 << 14)]


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (a message, bytes or a string) with its tag."""
    tag, size = number << 3 | _LENGTH_DELIMITED, len(payload)
    head = _SMALL[tag] if tag < 16384 else varint(tag)
    return head + (_SMALL[size] if size < 16384 else varint(size)) + payload
