"""plumbing.logs (redaction, JSON output), plumbing.config (defaults, file, environment) and
plumbing.errors (rich statuses)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import io
import json
import logging
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar, cast

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import example, given
from hypothesis import strategies as st

from plumbing import audit
from plumbing.config import Settings, load_settings
from plumbing.db import Database
from plumbing.errors import (
    ApiError,
    Kind,
    Violation,
    internal,
    invalid,
    invalid_field,
    resource_exhausted,
    unavailable,
)
from plumbing.logs import (
    GRPC_CORE_LOGGER,
    configure_logging,
    get_logger,
    mask_number,
    redact,
    redact_processor,
)
from plumbing.status import to_status
from plumbing.validation import _SIP, E164, check_e164, check_sip_or_e164, check_sip_uri

# --- redact ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+14255550100", "+1425555****"),
        ("call from +14255550100 to +442071234567", "call from +1425555**** to +44207123****"),
        ("+123456789012345", "+12345678901****"),  # 15 digits
        ("+123456", "+12****"),
        ("+12", "****"),
        ("14255550100", "1425555****"),  # without '+' too
        ("numbers=['+14255550100', '+14255550101']", "numbers=['+1425555****', '+1425555****']"),
        ("status=200 took 15 ms", "status=200 took 15 ms"),  # short figures are not numbers
        # Request ids and GUIDs keep their digit runs: support greps logs for them.
        ("request_id=08a911e00000000c", "request_id=08a911e00000000c"),
        (
            "call_id=6f1a4b2c-8d3e-4f5a-9b6c-123456789012",
            "call_id=6f1a4b2c-8d3e-4f5a-9b6c-123456789012",
        ),
        ("id=c14255550100 from +14255550100", "id=c14255550100 from +1425555****"),
    ],
)
def test_redact_masks_phone_numbers(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "sip:+14255550100@sbc1.contoso.example;user=phone",
            "sip:****@sbc1.contoso.example;user=phone",
        ),
        ("to <sips:alice@contoso.example:5061>", "to <sips:****@contoso.example:5061>"),
        ("SIP:bob@[2001:db8::1]", "SIP:****@[2001:db8::1]"),
        ("host only sip:sbc1.contoso.example", "host only sip:sbc1.contoso.example"),
    ],
)
def test_redact_drops_the_user_part_of_sip_uris(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Numbers as people write them: masked, written without their separators.
        ("+1 425 555 0100", "+1425555****"),
        ("+1-425-555-0100", "+1425555****"),
        ("+1.425.555.0100", "+1425555****"),
        ("+1 (425) 555-0100", "+1425555****"),
        ("+44 (0)20 7123 4567", "+440207123****"),
        ("call (425) 555-0100 now", "call 425555**** now"),
        ("425-555-0100", "425555****"),
        ("425.555.0100", "425555****"),
        ("1-425-555-0100", "1425555****"),
        ("020 7123 4567", "0207123****"),
        ("06 12 34 56 78", "061234****"),
        # A second number right after the 15 digits of a first is a number of its own.
        ("+14255550100 5551234567", "+1425555**** 555123****"),
        # SIP URIs whose user part holds any character the validator accepts.
        ("sip:o'brien,jr@contoso.example", "sip:****@contoso.example"),
        (
            "sips:a-b_c.d!e~f*g'h(i)j&k=l+m$n,o?p/q%2F@[2001:db8::1]:5061",
            "sips:****@[2001:db8::1]:5061",
        ),
        ("to='sip:+1 425 555 0100@sbc1.example'", "to='sip:****@sbc1.example'"),
        ("x=gossip:alice@host", "x=gossip:****@host"),  # no word boundary needed
        ("sip:alice:secret@host", "sip:****@host"),  # a password too
        ('repr: "sip:o\\\'b@h"', 'repr: "sip:****@h"'),
    ],
)
def test_redact_masks_written_numbers_and_any_sip_user_part(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-28T10:00:00+00:00",
        "at 2026-11-28T10:00:00.123456+00:00 and 2026-11-28 10:00:00Z",
        "since=2026-11-28T10:00:00+14:00",
        "10:00:00-05:00",
        "tz=+00:00 or -05:30 or +10:00 or +0100",
        "Sat, 28 Nov 2026 10:00:00 +1000",
        "2026-11-28",
        "28.11.2026",
        "took 15 ms, 1234.5 ms, 0.123456789 s",
        "peer 192.168.100.200:50051 and ipv4:10.0.0.1:443 and [2001:db8::1]:443",
        "request_id=08a911e00000000c",
        "call_id=12345678-1234-1234-1234-123456789012",
        "oid 1.2.840.10045.4.3.2 and version 1.68.1",
        "1 000 000 rows",
        "+1 more",
        "+1425555****",
        "1425555****",
        "sip:****@sbc1.example",
        "sip:sbc1.example;transport=tls",
    ],
)
def test_redact_keeps_timestamps_addresses_figures_and_masked_values(text: str) -> None:
    assert redact(text) == text


number_like = st.text(alphabet="0123456789+-.:() TZ*sip@'\\,xX\n")


@given(text=st.one_of(st.text(), number_like))
@example(text="+1425555****")
@example(text="sip:x+1 425 555 0100@host")
@example(text="2026-11-28T10:00:00+00:00 +14255550100")
def test_redact_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


def pem_keys() -> list[str]:
    key = ec.generate_private_key(ec.SECP256R1())
    return [
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        )
    ]


def test_redact_removes_private_keys() -> None:
    for pem in pem_keys():
        body = pem.splitlines()[1]
        assert redact(f"loaded key\n{pem}done") == "loaded key\n[private key redacted]\ndone"
        assert body not in redact(f"k={pem!r}")


def test_mask_number() -> None:
    assert mask_number("+14255550100") == "+1425555****"
    assert mask_number("+1234") == "****"


# Text around a number: no digits and no '+', so that the number in it is the only one.
around = st.text(st.characters(exclude_categories=["Nd", "Cs"], exclude_characters="+"))
non_word = st.characters(exclude_categories=["Nd", "Cs"], exclude_characters="+").filter(
    lambda c: re.match(r"\w", c) is None
)
e164_numbers = st.from_regex(r"\+[1-9][0-9]{1,14}", fullmatch=True)


@given(
    number=e164_numbers,
    before=around,
    after=st.one_of(st.just(""), st.builds(str.__add__, non_word, around)),
)
def test_redact_never_keeps_a_number_whole_when_it_ends_a_word(
    number: str, before: str, after: str
) -> None:
    assert number not in redact(before + number + after)


@given(number=e164_numbers, before=around, after=around)
@example(number="+14255550100", before="id=", after="_old")
def test_redact_never_keeps_a_number_whole(number: str, before: str, after: str) -> None:
    assert number not in redact(before + number + after)


def test_redact_processor_leaves_numbers_alone_and_redacts_nested_values() -> None:
    event = {
        "event": "assigned +14255550100",
        "count": 12345678901,  # an int is never a phone number
        "ratio": 0.25,
        "ok": True,
        "nothing": None,
        "numbers": ["+14255550100", ("+14255550101",)],
        "nested": {"sip": "sip:alice@sbc1.example", "deeper": [{"n": "+14255550102"}]},
        "raw": b"+14255550103",
    }
    assert redact_processor(None, "info", event) == {
        "event": "assigned +1425555****",
        "count": 12345678901,
        "ratio": 0.25,
        "ok": True,
        "nothing": None,
        "numbers": ["+1425555****", ["+1425555****"]],
        "nested": {"sip": "sip:****@sbc1.example", "deeper": [{"n": "+1425555****"}]},
        "raw": "+1425555****",
    }


def test_redact_processor_redacts_dict_keys() -> None:
    event = redact_processor(None, "info", {"results": {"+14255550100": "done"}})
    assert "+14255550100" not in json.dumps(event)


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Puts structlog and the root logger back as they were after a test that configures them.

    The test itself calls configure_logging: capsys's stderr of the setup phase is closed before
    the test runs."""
    root = logging.getLogger()
    level = root.level
    yield capsys
    structlog.reset_defaults()
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler:  # the one basicConfig added
            root.removeHandler(handler)
    root.setLevel(level)


def logged(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_json_logs_are_redacted(json_logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    log = get_logger("opconnect.test")
    log.warning(
        "assigned +14255550100",
        sip_uri="sip:+14255550100@sbc1.contoso.example;user=phone",
        count=3,
    )
    log.debug("not shown at info")
    [line] = logged(json_logs)
    assert isinstance(line.pop("timestamp"), str)
    assert line == {
        "event": "assigned +1425555****",
        "sip_uri": "sip:****@sbc1.contoso.example;user=phone",
        "count": 3,
        "level": "warning",
    }


def test_json_logs_redact_objects(json_logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    get_logger("opconnect.test").info("failed", error=ValueError("bad number +14255550100"))
    assert "+14255550100" not in json_logs.readouterr().err


# Every number and SIP URI the validators accept (SIP URIs with a user part: without one, a URI
# names a host only and is kept), built from the validator's own grammar.
accepted_numbers = st.from_regex(E164, fullmatch=True).filter(lambda n: check_e164(n) is None)
_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
_top_label = st.from_regex(r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.builds(
        lambda labels, top, dot: ".".join([*labels, top]) + dot,
        st.lists(_label, max_size=3),
        _top_label,
        st.sampled_from(["", "."]),
    ),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
_composed_sip_uris = st.builds(
    lambda scheme, user, host, port, params: f"{scheme}:{user}@{host}{port}{params}",
    st.from_regex(r"[sS][iI][pP][sS]?", fullmatch=True),
    st.one_of(
        st.from_regex(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,?/]|%[0-9A-Fa-f]{2})+", fullmatch=True),
        accepted_numbers,
    ),
    _hosts,
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    st.from_regex(r"(?:;[A-Za-z0-9\-_.!~*'%+]+(?:=[A-Za-z0-9\-_.!~*'%+\[\]:]*)?)*", fullmatch=True),
)


def _accepted_with_user(uri: str) -> bool:
    match = _SIP.fullmatch(uri)
    return check_sip_uri(uri) is None and match is not None and bool(match["user"])


accepted_sip_uris = st.one_of(_composed_sip_uris, st.from_regex(_SIP, fullmatch=True)).filter(
    _accepted_with_user
)


def _emit_structlog(text: str, where: str) -> None:
    log = get_logger("opconnect.test")
    if where == "event":
        log.warning(text)
    elif where == "field":
        log.warning("event", field=text)
    elif where == "nested":
        log.warning("event", nested={"a": [text, {"b": (text,)}], text: "as a key"})
    elif where == "key":
        log.warning("event", **{text: 1})
    elif where == "bytes":
        log.warning("event", raw=text.encode())
    elif where == "error object":
        log.warning("event", error=ValueError(text))
    else:
        try:
            raise ValueError(text)
        except ValueError:
            log.exception("failed")


def _emit_stdlib(text: str, where: str) -> None:
    log = logging.getLogger("asyncio" if where.endswith("asyncio") else "grpc._server")
    if where.startswith("%s"):
        log.error("task failed for %s (%d%%)", text, 50)
    elif where.startswith("%r"):
        log.error("task failed for %r", text)
    elif where.startswith("message"):
        log.error(text)
    else:
        try:
            raise ValueError(text)
        except ValueError:
            log.exception("failed: %s", text)


PLACES = [
    *(("structlog", w) for w in ("event", "field", "nested", "key", "bytes", "error object")),
    ("structlog", "exception"),
    *(("stdlib", w) for w in ("%s asyncio", "%r grpc", "message asyncio", "exception grpc")),
]


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@contextlib.contextmanager
def rendered(log_format: str) -> Iterator[io.StringIO]:
    """What configure_logging's output writes to stderr, for a test that logs in between."""
    with contextlib.redirect_stderr(io.StringIO()) as out:
        configure_logging(log_format, "info")
        yield out


@given(
    value=st.one_of(accepted_numbers, accepted_sip_uris),
    # Text around it holds no digit, which would make another number of it, nor do four stars
    # follow it, which would make it a number already masked.
    before=around,
    after=around.filter(lambda text: not text.startswith("****")),
    place=st.sampled_from(PLACES),
    log_format=st.sampled_from(["json", "console"]),
)
@example(
    value="sip:o'brien,jr@contoso.example", before="", after="", place=PLACES[0], log_format="json"
)
def test_no_accepted_number_or_sip_uri_is_ever_logged_whole(
    value: str, before: str, after: str, place: tuple[str, str], log_format: str
) -> None:
    assert check_sip_or_e164(value) is None
    text = before + value + after
    kind, where = place
    with rendered(log_format) as out:
        (_emit_structlog if kind == "structlog" else _emit_stdlib)(text, where)
    output = out.getvalue()
    assert output.strip()
    assert value not in output
    if log_format == "json":
        for line in output.splitlines():
            assert not any(value in s for s in _strings(json.loads(line)))
    else:  # as a repr() may have escaped it
        assert value not in output.replace("\\'", "'").replace("\\\\", "\\")


def test_the_audit_line_keeps_timestamps_and_masks_once(
    json_logs: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging("json", "info")
    # A logger used before caches the level of its first use: a fresh one for this level.
    monkeypatch.setattr(audit, "log", get_logger("opconnect.audit"))
    filters = {
        "start_time": "2026-11-28T10:00:00+00:00",
        "end_time": "2026-11-29T10:00:00.250000+00:00",
        "tenant_id": "6f1a4b2c-8d3e-4f5a-9b6c-123456789012",
        "phone_number": mask_number("+14255550100"),  # as the records service masks it
    }
    audit.AuditLog(cast(Database, None)).record(
        audit.AuditEvent(
            at=dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC),
            principal="operator/acme-telecom",
            method="/opconnect.records.v1.RecordService/StreamCalls",
            filters=filters,
            record_count=3,
            duration_ms=1.25,
            status="OK",
            request_id="08a911e00000000c",
        )
    )
    [line] = logged(json_logs)
    assert line["filters"] == filters
    assert line["request_id"] == "08a911e00000000c"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(line["timestamp"]))


def test_the_standard_librarys_logging_is_json_and_redacted(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    logging.getLogger("asyncio").error(
        "call from %s to %r", "+1 425 555 0100", "sip:o'brien@contoso.example"
    )
    try:
        raise ValueError("no route to +14255550100")
    except ValueError:
        logging.getLogger("grpc._server").exception("Exception calling application: %s", "x")
    logging.getLogger("alembic").info("the standard library's info lines are not shown")
    first, second = logged(json_logs)
    assert isinstance(first.pop("timestamp"), str)
    assert first == {
        "event": 'call from +1425555**** to "sip:****@contoso.example"',
        "level": "error",
        "logger": "asyncio",
    }
    assert (second["logger"], second["level"]) == ("grpc._server", "error")
    assert second["event"] == "Exception calling application: x"
    assert str(second["exception"]).startswith("Traceback (most recent call last):")
    assert str(second["exception"]).endswith("ValueError: no route to +1425555****")


def test_a_task_exception_never_retrieved_is_logged_as_json_and_redacted(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")

    async def fail() -> None:
        raise ValueError("no route to +14255550100 (sip:alice@contoso.example)")

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.wait([task]))  # done; its exception never retrieved
        del task
        gc.collect()
    finally:
        loop.close()
    [line] = logged(json_logs)
    assert (line["logger"], line["level"]) == ("asyncio", "error")
    assert str(line["event"]).startswith("Task exception was never retrieved\n")
    assert str(line["exception"]).endswith(
        "ValueError: no route to +1425555**** (sip:****@contoso.example)"
    )
    assert "alice" not in json.dumps(line)


def test_a_standard_library_record_that_does_not_format_is_still_redacted(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    logging.getLogger("opconnect.test").error("number %d", "+14255550100")
    [line] = logged(json_logs)
    assert "+1425555****" in str(line["event"])
    assert "+14255550100" not in json.dumps(line)


def test_the_standard_librarys_logging_on_a_console_is_redacted(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure_logging("console", "info")
    logging.getLogger("asyncio").error("call from %s", "+14255550100")
    [line] = json_logs.readouterr().err.splitlines()
    assert re.fullmatch(r"\d{4}-\S+Z \[error\s*\] call from \+1425555\*{4}\s+\[asyncio\]", line), (
        line
    )


# --- config ------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.max_message_bytes == 16 * 1024 * 1024
    assert settings.max_upload_numbers == 10_000
    assert (settings.default_page_size, settings.max_page_size) == (100, 1000)
    assert settings.sqlalchemy_url == "sqlite:///var/opconnect.db"
    assert settings.pki_dir == Path("var/pki")


def test_file_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "opconnect.toml",
        'data_dir = "/srv/opconnect"\n'
        'listen = "0.0.0.0:443"\n'
        "max_page_size = 50\n"
        "rate_per_operator = 10\n"
        "heartbeat_interval_s = 2.5\n",
    )
    settings = load_settings(path, env={})
    assert settings == Settings().replace(
        data_dir=Path("/srv/opconnect"),
        listen="0.0.0.0:443",
        max_page_size=50,
        rate_per_operator=10.0,
        heartbeat_interval_s=2.5,
    )
    assert isinstance(settings.rate_per_operator, float)
    assert settings.sqlalchemy_url == "sqlite:////srv/opconnect/opconnect.db"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "opconnect.toml", 'max_page_size = 50\nlog_level = "debug"\n')
    env = {
        "OPCONNECT_CONFIG": str(path),
        "OPCONNECT_MAX_PAGE_SIZE": "70",
        "OPCONNECT_RATE_PER_OPERATOR": "12.5",
        "OPCONNECT_DATABASE_URL": "postgresql+psycopg://u@db:5432/opconnect",
    }
    settings = load_settings(env=env)  # the file named by OPCONNECT_CONFIG
    assert (settings.max_page_size, settings.log_level) == (70, "debug")
    assert settings.rate_per_operator == 12.5
    assert settings.sqlalchemy_url == "postgresql+psycopg://u@db:5432/opconnect"


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "opconnect.toml", "max_page_size = 5\nmax_pages = 5\nlisten_on = 1\n")
    with pytest.raises(ValueError, match=r"unknown settings in .*: listen_on, max_pages$"):
        load_settings(path, env={})


def test_a_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    assert issubclass(tomllib.TOMLDecodeError, ValueError)
    with pytest.raises(tomllib.TOMLDecodeError):
        load_settings(write(tmp_path / "opconnect.toml", "max_page_size = = 5\n"), env={})


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ('max_page_size = "many"', "max_page_size"),
        ("rate_per_operator = [1]", "rate_per_operator"),
        ("data_dir = 5", "data_dir"),
        ('heartbeat_interval_s = "soon"', "heartbeat_interval_s"),
    ],
)
def test_bad_types_in_the_file_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ValueError, match=f"^setting {setting}: "):
        load_settings(write(tmp_path / "opconnect.toml", text + "\n"), env={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPCONNECT_MAX_MESSAGE_BYTES", "16MB"),
        ("OPCONNECT_RATE_BURST", ""),
        ("OPCONNECT_DB_THREADS", "1.5"),
    ],
)
def test_bad_environment_values_name_the_setting(name: str, value: str) -> None:
    setting = name.removeprefix("OPCONNECT_").lower()
    with pytest.raises(ValueError, match=f"^setting {setting}: {value!r} is not a valid int$"):
        load_settings(env={name: value})


@pytest.mark.parametrize(
    "text",
    [
        'listen = ["127.0.0.1:1", "127.0.0.1:2"]',
        "log_format = 5",
        "max_page_size = 2.5",
        "rate_burst = true",
    ],
)
def test_wrong_toml_types_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match=r"^setting "):
        load_settings(write(tmp_path / "opconnect.toml", text + "\n"), env={})


# --- errors ------------------------------------------------------------------------------------


class Call:
    """What grpc_status.rpc_status.from_call reads from a finished call."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return cast(str, self._status.details)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return cast(tuple[tuple[str, bytes], ...], self._status.trailing_metadata)


M = TypeVar("M", bound=Message)


def decode(error: ApiError) -> tuple[grpc.Status, status_pb2.Status, dict[str, Message]]:
    status = to_status(error)
    rich = rpc_status.from_call(Call(status))
    assert rich is not None
    details: dict[str, Message] = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
    ):
        for packed in rich.details:
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                details[kind.__name__] = message
    return status, rich, details


def detail(details: dict[str, Message], kind: type[M]) -> M:
    """The detail of type `kind` that `decode` unpacked (KeyError when there is none)."""
    message = details[kind.__name__]
    assert isinstance(message, kind)
    return message


def test_invalid_argument_carries_error_info_and_field_violations() -> None:
    error = invalid(
        "numbers.opconnect",
        "PHONE_NUMBER_INVALID",
        "phone_number: not E.164",
        Violation("phone_number", "not E.164", "PHONE_NUMBER_INVALID"),
        Violation("target.id", "not a GUID", "TARGET_INVALID"),
    )
    status, rich, details = decode(error)
    assert (status.code, status.details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "phone_number: not E.164",
    )
    assert (rich.code, rich.message) == (3, "phone_number: not E.164")
    assert set(details) == {"ErrorInfo", "BadRequest"}
    info = detail(details, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("PHONE_NUMBER_INVALID", "numbers.opconnect")
    bad = detail(details, error_details_pb2.BadRequest)
    assert [(v.field, v.description, v.reason) for v in bad.field_violations] == [
        ("phone_number", "not E.164", "PHONE_NUMBER_INVALID"),
        ("target.id", "not a GUID", "TARGET_INVALID"),
    ]


def test_invalid_field_is_one_violation() -> None:
    error = invalid_field("numbers.opconnect", "CURSOR_INVALID", "cursor", "not a cursor")
    assert str(error) == "INVALID CURSOR_INVALID: cursor: not a cursor"
    _, _, details = decode(error)
    [violation] = detail(details, error_details_pb2.BadRequest).field_violations
    assert (violation.field, violation.description, violation.reason) == (
        "cursor",
        "not a cursor",
        "CURSOR_INVALID",
    )


def test_resource_exhausted_carries_retry_info() -> None:
    status, _, details = decode(
        resource_exhausted("gateway.opconnect", "RATE_LIMITED", "slow down", 1.25)
    )
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert set(details) == {"ErrorInfo", "RetryInfo"}
    retry = detail(details, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 1_250_000_000
    info = detail(details, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (
        "RATE_LIMITED",
        "gateway.opconnect",
    )


def test_unavailable_and_internal() -> None:
    status, _, details = decode(unavailable("DATABASE_UNAVAILABLE", "try again"))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert detail(details, error_details_pb2.RetryInfo).retry_delay.ToNanoseconds() == 1_000_000_000
    status, _, details = decode(internal())
    assert (status.code, status.details) == (grpc.StatusCode.INTERNAL, "internal error")
    assert set(details) == {"ErrorInfo"}
    info = detail(details, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INTERNAL", "opconnect")


def test_error_info_metadata_travels() -> None:
    error = ApiError(
        Kind.WRONG_STATE,
        "CURSOR_EXPIRED",
        "list again",
        "numbers.opconnect",
        metadata={"oldest_cursor": "AQ"},
    )
    _, _, details = decode(error)
    assert dict(detail(details, error_details_pb2.ErrorInfo).metadata) == {"oldest_cursor": "AQ"}


def test_grpc_core_noise_of_a_client_that_left_is_dropped() -> None:
    configure_logging("json", "info")
    core = logging.getLogger(GRPC_CORE_LOGGER)
    left = core.makeRecord(
        core.name,
        logging.ERROR,
        __file__,
        1,
        "ExecuteBatchError raised in core by servicer method [/x]",
        (),
        None,
    )
    other = core.makeRecord(
        core.name, logging.ERROR, __file__, 1, "Unexpected [Exception] raised", (), None
    )
    assert not core.filter(left)
    assert core.filter(other)


def test_redact_processor_never_keeps_an_address_whole() -> None:
    event = {
        "event": "address changed",
        "street_name": "Microsoft Way",
        "latitude": 47.6395,
        "civic_address": {"city": "Redmond", "country_code": "US"},
        "nested": {"emergency_location": {"street_name": "NE 36th St"}, "postal_code": "98052"},
        "count": 3,
    }
    assert redact_processor(None, "info", event) == {
        "event": "address changed",
        "street_name": "Mi****",
        "latitude": "****",
        "civic_address": "****",
        "nested": {"emergency_location": "****", "postal_code": "98****"},
        "count": 3,
    }
