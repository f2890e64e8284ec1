"""plumbing.validation (E.164, SIP URIs, GUIDs, FQDNs) and the change-log cursors, by example and
by property."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plumbing.changelog import decode_cursor, encode_cursor
from plumbing.errors import ApiError, Kind
from plumbing.tokens import seal
from plumbing.validation import (
    SIP_URI_MAX,
    check_e164,
    check_fqdn,
    check_guid,
    check_sip_or_e164,
    check_sip_uri,
)

DIGITS = "0123456789"
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + DIGITS

# --- E.164 -------------------------------------------------------------------------------------

e164_numbers = st.builds(
    lambda first, rest: f"+{first}{rest}",
    st.sampled_from("123456789"),
    st.text(DIGITS, min_size=1, max_size=14),
)
non_ascii_digits = st.characters(categories=["Nd"]).filter(lambda c: c not in DIGITS)
whitespace = st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000"])


@st.composite
def inserted(draw: st.DrawFn, base: st.SearchStrategy[str], extra: st.SearchStrategy[str]) -> str:
    """`base` with one character of `extra` inserted anywhere (start and end included)."""
    value = draw(base)
    at = draw(st.integers(0, len(value)))
    return value[:at] + draw(extra) + value[at:]


@st.composite
def replaced_digit(
    draw: st.DrawFn, base: st.SearchStrategy[str], by: st.SearchStrategy[str]
) -> str:
    value = draw(base)
    at = draw(st.integers(1, len(value) - 1))  # a digit, never the '+'
    return value[:at] + draw(by) + value[at + 1 :]


@given(e164_numbers)
def test_valid_e164_numbers_pass(number: str) -> None:
    assert check_e164(number) is None
    assert check_sip_or_e164(number) is None


@given(
    st.one_of(
        st.builds(lambda rest: f"+0{rest}", st.text(DIGITS, min_size=1, max_size=14)),  # leading 0
        st.builds(
            lambda first, rest: f"+{first}{rest}",
            st.sampled_from("123456789"),
            st.text(DIGITS, min_size=15, max_size=40),
        ),  # too long
        st.sampled_from(["+", "+1", "+9", "+0"]),  # too short
        replaced_digit(e164_numbers, non_ascii_digits),  # e.g. '٣'
        inserted(e164_numbers, whitespace),
        e164_numbers.map(lambda n: n[1:]),  # no '+'
        e164_numbers.map(lambda n: "++" + n[1:]),
    )
)
def test_strings_that_are_not_e164_fail(value: str) -> None:
    assert check_e164(value) is not None


def test_e164_boundaries() -> None:
    assert check_e164("+12") is None
    assert check_e164("+123456789012345") is None  # 15 digits
    assert check_e164("+1234567890123456") == (
        "not E.164: '+', then 2 to 15 digits, the first not 0"
    )
    assert check_e164("+1") is not None
    assert check_e164("+1425555010٣") is not None
    assert check_e164("") == "required: an E.164 number such as +14255550100"


# --- SIP URIs ----------------------------------------------------------------------------------

USER_CHARS = ALNUM + "-_.!~*'()&=+$,?/"
PARAM_CHARS = ALNUM + "-_.!~*'+"

sip_users = st.one_of(
    e164_numbers,
    st.lists(
        st.one_of(
            st.sampled_from(USER_CHARS),
            st.builds(lambda h: f"%{h}", st.text("0123456789abcdefABCDEF", min_size=2, max_size=2)),
        ),
        min_size=1,
        max_size=20,
    ).map("".join),
)
labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,18}[A-Za-z0-9])?", fullmatch=True)
top_labels = st.from_regex(r"[A-Za-z]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
fqdns = st.builds(
    lambda inner, top, dot: ".".join([*inner, top]) + dot,
    st.lists(labels, max_size=3),
    top_labels,
    st.sampled_from(["", "."]),
)
hosts = st.one_of(
    fqdns,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
params = st.lists(
    st.builds(
        lambda name, value: f";{name}" if value is None else f";{name}={value}",
        st.text(PARAM_CHARS, min_size=1, max_size=10),
        st.none() | st.text(PARAM_CHARS, max_size=10),
    ),
    max_size=3,
).map("".join)


def sip(scheme: str, user: str | None, host: str, port: int | None, tail: str) -> str:
    user_part = "" if user is None else f"{user}@"
    port_part = "" if port is None else f":{port}"
    return f"{scheme}:{user_part}{host}{port_part}{tail}"


sip_uris = st.builds(
    sip,
    st.sampled_from(["sip", "sips"]),
    st.none() | sip_users,
    hosts,
    st.none() | st.integers(1, 65535),
    params,
)


@given(sip_uris)
def test_valid_sip_uris_pass(uri: str) -> None:
    assert check_sip_uri(uri) is None
    assert check_sip_or_e164(uri) is None


@pytest.mark.parametrize(
    "uri",
    [
        "sip:+14255550100@sbc1.contoso.example;user=phone",
        "sips:+14255550100@sbc2.contoso.example:5061",
        "sip:alice@10.0.0.1",
        "sip:[2001:db8::1]:5060;transport=tls",
        "sip:sbc1.contoso.example",
        "sip:%61lice@sbc1.contoso.example;maddr=[2001:db8::1]",
    ],
)
def test_sip_uri_examples_pass(uri: str) -> None:
    assert check_sip_uri(uri) is None


@given(
    st.builds(
        sip,
        st.sampled_from(["http", "tel", "sipx", "sip2", "si", "s1p", "im", "pres"]),
        st.none() | sip_users,
        hosts,
        st.none() | st.integers(1, 65535),
        params,
    )
)
def test_sip_uris_with_another_scheme_fail(uri: str) -> None:
    assert check_sip_uri(uri) is not None


@given(
    st.builds(
        sip,
        st.sampled_from(["sip", "sips"]),
        st.none() | sip_users,
        hosts,
        st.sampled_from([0, 65536, 99999]),
        params,
    )
)
def test_sip_uris_with_a_port_out_of_range_fail(uri: str) -> None:
    assert check_sip_uri(uri) == "port out of range 1-65535"


@given(
    inserted(
        sip_uris,
        st.one_of(
            st.just(" "),
            whitespace,
            st.characters(max_codepoint=31),
            st.just("\x7f"),
        ),
    )
)
def test_sip_uris_with_spaces_or_control_characters_fail(uri: str) -> None:
    assert check_sip_uri(uri) is not None


@given(
    st.builds(
        lambda scheme, a, b, host: f"{scheme}:{a}@{b}@{host}",
        st.sampled_from(["sip", "sips"]),
        sip_users,
        sip_users,
        hosts,
    )
)
def test_sip_uris_with_two_at_signs_fail(uri: str) -> None:
    assert check_sip_uri(uri) is not None


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "sip:",
        "sips:",
        "sip:alice@",
        "sip:alice@:5060",
        "sip:;transport=udp",
        "sip:alice@;user=phone",
        "sip:alice:secret@sbc1.example",  # no passwords
        "sip:alice@sbc1.example?subject=x",  # no headers
        "sip:alice@[2001:db8::zz]",
        "sip:alice@[2001:db8::1",
        "sip:alice@256.1.1.1",
        "sip:alice@1.2.3",
        "sip:alice@-sbc.example",
        "sip:alice@sbc_1.example",
        "sip:alice@sbc1..example",
        "sip:alice@bücher.example",
        "sip:alice@sbc1.example:",
        "sip:alice@sbc1.example:123456",
    ],
)
def test_sip_uri_mutations_fail(uri: str) -> None:
    assert check_sip_uri(uri) is not None


def test_sip_uri_length_limit() -> None:
    base = "sip:+14255550100@sbc1.contoso.example;x="
    at_limit = base + "a" * (SIP_URI_MAX - len(base))
    assert len(at_limit) == 512
    assert check_sip_uri(at_limit) is None
    assert check_sip_uri(at_limit + "a") == "longer than 512 characters"


@pytest.mark.parametrize(
    "uri", ["sip:alice@999.1.1.1.", "sip:alice@sbc1.example.123", "sip:alice@sbc1.example.."]
)
def test_sip_host_must_be_a_hostname(uri: str) -> None:
    assert check_sip_uri(uri) is not None


# --- GUIDs, FQDNs, call parties ----------------------------------------------------------------


@given(st.uuids())
def test_guids_pass_in_either_case(value: object) -> None:
    assert check_guid(str(value)) is None
    assert check_guid(str(value).upper()) is None


@given(
    st.uuids().flatmap(
        lambda u: st.one_of(
            st.just(str(u).replace("-", "", 1)),
            st.just(str(u).replace("-", "")),
            st.just("{" + str(u) + "}"),
            st.just(str(u) + "\n"),
            st.just(str(u)[:-1]),
            st.just(str(u) + "0"),
            replaced_digit(st.just(str(u)), st.sampled_from("gGz٣ ")),
        )
    )
)
def test_guid_mutations_fail(value: str) -> None:
    assert check_guid(value) is not None


def test_guid_required() -> None:
    assert check_guid("") == "required: a GUID such as 6f1a4b2c-8d3e-4f5a-9b6c-7d8e9f0a1b2c"


@pytest.mark.parametrize(
    "value", ["sbc1.operator.example", "sbc1.operator.example.", "a.b", "x-1.y2.example"]
)
def test_fqdn_examples_pass(value: str) -> None:
    assert check_fqdn(value) is None


@given(fqdns.filter(lambda v: "." in v.rstrip(".")))
def test_generated_fqdns_pass(value: str) -> None:
    assert check_fqdn(value) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "required: a host name such as sbc1.operator.example"),
        ("localhost", "not a fully qualified domain name"),
        ("10.0.0.1", "not a fully qualified domain name"),
        ("sbc1..example", "not a fully qualified domain name"),
        ("-sbc.example", "not a fully qualified domain name"),
        ("sbc-.example", "not a fully qualified domain name"),
        ("sbc_1.example", "not a fully qualified domain name"),
        ("bücher.example", "not a fully qualified domain name"),
        ("sbc 1.example", "not a fully qualified domain name"),
        ("a" * 64 + ".example", "not a fully qualified domain name"),
        (".".join(["a" * 63] * 4), "longer than 253 characters"),
    ],
)
def test_fqdn_mutations_fail(value: str, problem: str) -> None:
    assert check_fqdn(value) == problem


def test_fqdn_with_two_trailing_dots_fails() -> None:
    assert check_fqdn("sbc1.operator.example..") is not None


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("+14255550100", True),
        ("sip:alice@sbc1.example", True),
        ("sips:+14255550100@sbc1.example:5061", True),
        ("+0425", False),
        ("sip:", False),
        ("sips", False),
        ("14255550100", False),
        ("tel:+14255550100", False),
        ("", False),
    ],
)
def test_sip_or_e164(value: str, ok: bool) -> None:
    assert (check_sip_or_e164(value) is None) is ok


def test_sip_or_e164_names_what_it_wanted() -> None:
    assert check_sip_or_e164("alice") == "neither an E.164 number nor a SIP URI"


# --- cursors -----------------------------------------------------------------------------------

LOG = "numbers"


def assert_cursor_invalid(value: str, log_name: str = LOG) -> None:
    with pytest.raises(ApiError) as caught:
        decode_cursor(value, log_name, "numbers.opconnect")
    error = caught.value
    assert (error.kind, error.reason, error.domain) == (
        Kind.INVALID,
        "CURSOR_INVALID",
        "numbers.opconnect",
    )
    assert [(v.field, v.reason) for v in error.violations] == [("cursor", "CURSOR_INVALID")]


def decoded(value: str) -> int | ApiError:
    """The position a cursor names, or the error that refused it (no other exception)."""
    try:
        return decode_cursor(value, LOG, "numbers.opconnect")
    except ApiError as error:
        return error


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@given(st.integers(0, 2**63 - 1), st.sampled_from(["numbers", "records", "usage", "x"]))
def test_cursor_round_trip(position: int, log_name: str) -> None:
    cursor = encode_cursor(log_name, position)
    assert decode_cursor(cursor, log_name, "d") == position
    assert len(cursor) <= 128


@given(st.text(max_size=200))
def test_random_text_is_never_a_cursor_unless_it_is_one(value: str) -> None:
    result = decoded(value)
    if isinstance(result, ApiError):
        assert (result.kind, result.reason) == (Kind.INVALID, "CURSOR_INVALID")
    else:
        assert value == encode_cursor(LOG, result)


@given(st.binary(max_size=96))
def test_random_base64_is_never_a_cursor_unless_it_is_one(raw: bytes) -> None:
    result = decoded(b64(raw))
    if isinstance(result, ApiError):
        assert (result.kind, result.reason) == (Kind.INVALID, "CURSOR_INVALID")
    else:
        assert b64(raw) == encode_cursor(LOG, result)


@given(
    purpose=st.one_of(
        st.sampled_from(["cursor:numbers", "cursor:records", "page:numbers", "numbers", ""]),
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=20),
    ),
    body=st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=16)),
)
def test_a_well_sealed_token_is_a_cursor_only_for_this_log_with_a_position(
    purpose: str, body: bytes
) -> None:
    """A correct checksum is not enough: the purpose, the body's size and the position's range
    (0 to 2**63-1) must match too."""
    value = seal(purpose, body)
    if purpose == f"cursor:{LOG}" and len(body) == 8 and body[0] < 0x80:
        assert decode_cursor(value, LOG, "d") == struct.unpack(">Q", body)[0]
    else:
        assert_cursor_invalid(value)


@given(st.integers(0, 2**63 - 1))
def test_a_cursor_of_one_log_is_refused_by_another(position: int) -> None:
    cursor = encode_cursor(LOG, position)
    for other in ("records", "number", "numbers2", "NUMBERS", ""):
        assert_cursor_invalid(cursor, other)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "=",
        "a",
        "!!!!",
        "٣٣٣٣",
        encode_cursor(LOG, 7) + "A" * 600,  # longer than any token
        encode_cursor(LOG, 7) + "AAAA",  # trailing bytes
        encode_cursor(LOG, 7)[:-2],  # truncated
        encode_cursor(LOG, 7)[:12] + "_" + encode_cursor(LOG, 7)[13:],  # a changed character
        encode_cursor(LOG, 7) + "\n",
        " " + encode_cursor(LOG, 7),
    ],
    # Named, not by value: a cursor is sealed with the process's own key, and the test ids of
    # every pytest-xdist worker must be the same.
    ids=[
        "empty",
        "padding",
        "one-char",
        "outside-alphabet",
        "arabic-digits",
        "too-long",
        "trailing-bytes",
        "truncated",
        "changed-char",
        "newline",
        "leading-space",
    ],
)
def test_cursor_examples_refused(value: str) -> None:
    assert_cursor_invalid(value)


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c[:5] + "!!!!" + c[5:],  # characters outside the alphabet
        lambda c: c + "==",  # padding the server never sends
        lambda c: c[:-1] + chr(ord(c[-1]) + 1),  # the last character's unused bits
    ],
    ids=["outside-alphabet", "padding", "unused-bits"],
)
def test_only_the_cursor_as_issued_is_accepted(change: Callable[[str], str]) -> None:
    cursor = encode_cursor(LOG, 7)
    assert change(cursor) != cursor
    assert_cursor_invalid(change(cursor))


def test_cursor_field_path_is_named() -> None:
    with pytest.raises(ApiError) as caught:
        decode_cursor("nope", LOG, "records.opconnect", "resume.cursor")
    assert caught.value.violations[0].field == "resume.cursor"
    assert caught.value.domain == "records.opconnect"
