"""structlog set-up: JSON in production, readable on a terminal, and redaction of personal data.

Every string in every log event passes through `redact`, our own lines and the standard library's
(asyncio, grpc, alembic: rendered by the same renderer, exceptions included). Code may log freely;
the processor is the one safeguard. What it removes:

- PEM private-key blocks, dropped whole.
- Phone numbers keep all but their last four digits, written without separators:
  `+1 (425) 555-0100` -> `+1425555****`. A phone number is
  - a `+`, a digit 1-9 and one or more further digits, which may be grouped by one space, `-`
    or `.`, or a bracketed group (`+1 425 555 0100`, `+1-425-555-0100`, `+44 (0)20 7123 4567`);
    at most 15 digits are read as one number, the groups after that are looked at anew;
  - without a `+`: three or more groups of digits so separated, or a bracketed area code and
    groups, 9 digits or more (`425-555-0100`, `(425) 555-0100`, `020 7123 4567`);
  - a bare run of 7 or more digits;
  but never digits within a word of letters, digits and hyphens (a hex request id, a GUID) or
  of a decimal fraction (`0.12345678`).
- SIP URIs lose their user part, whatever characters it holds: `sip:****@sbc1.example`.
- Civic addresses (personal data: where a customer's people are): the value of any key that
  names an address field (`street_name`, `house_number`, `city`, `postal_code`, `description`,
  `latitude`, ..., `civic_address`, `emergency_location`, `geo_point`: `ADDRESS_KEYS`), at any
  depth of a logged mapping, keeps at most its first two characters: `Microsoft Way` ->
  `Mi****`; coordinates and whole addresses become `****`. A street line is never logged whole.

Kept whole: ISO 8601 dates, times and date-times with their UTC offsets (`2026-11-28T10:00:00
+00:00`, `10:00Z`), a UTC offset alone (`+00:00`, `-05:00`, `+14:00`; `+0100` too, as no E.164
number starts with 0), IPv4 addresses and ports, durations and other short figures, request ids,
GUIDs, and values already masked: digits followed by four stars (`+1425555****`), so that
`redact(redact(text)) == redact(text)`. Ints and floats are never personal data and are not
looked at.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog
from opentelemetry import trace

_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S
)
# The user part: every character an RFC 3261 user part or password may hold (more than
# plumbing.validation accepts), and a backslash, as a repr() escapes a quote with one.
_SIP_USER = re.compile(r"([sS][iI][pP][sS]?):[A-Za-z0-9\-_.!~*'()&=+$,;?/%:\\]+@")
_DIGIT = re.compile(r"\d")
_TWO_DIGITS = re.compile(r"\d\D{0,2}\d")  # what every number that is masked holds
_SEP = r"[ .\-]"
# Digits followed by four stars: a number already masked, kept as it is.
_MASKED = r"\*{4}"
# Numbers to mask and what to keep whole, one token a match. The first character is matched
# first (so that the search finds candidates quickly); each alternative then checks, looking
# back, what that character was. A token starts after a letter or a digit only with a '+': the
# digits of a word (a hex request id) or the middle of a run of digits are passed over. The empty
# group that ends an alternative names what it found (Match.lastgroup).
_TOKEN = re.compile(
    rf"""
    [\d+(\-]
    (?:
        (?<=\+)(?:
            (?:0\d|1[0-4]):[0-5]\d(?!\d)(?P<offset>)  # a UTC offset alone: +00:00, +14:00
          | [1-9]\d*(?:(?:{_SEP}?\(\d{{1,5}}\){_SEP}?|{_SEP})\d+)*(?!\d|{_MASKED})(?P<plus>)
        )
      | (?<=-)(?<![A-Za-z0-9]-)(?:0\d|1[0-4]):[0-5]\d(?!\d)(?P<negative_offset>)  # -05:00
      | (?<![A-Za-z0-9].)(?:
            # An ISO 8601 date, date-time or time of day, and its UTC offset.
            (?<=\d)(?:\d{{3}}-\d{{2}}-\d{{2}}(?:[T ]\d{{1,2}}:\d{{2}}(?::\d{{2}}(?:[.,]\d+)?)?)?
                     |\d?:\d{{2}}(?::\d{{2}}(?:[.,]\d+)?)?)
            (?!\d)(?:\ ?(?:Z|[+-]\d{{2}}(?::?\d{{2}})?)(?!\d|{_MASKED}))?(?P<time>)
            # An IPv4 address.
          | (?<=\d)(?<!\..)\d{{0,2}}(?:\.\d{{1,3}}){{3}}(?!\d|\.\d|{_MASKED})(?P<ipv4>)
            # Groups of digits: (425) 555-0100, 425-555-0100, 020 7123 4567.
          | (?<![.+\-].)(?:(?<=\()\d{{1,5}}\){_SEP}?|(?<=\d)\d{{0,4}}{_SEP})
            \d{{2,}}(?:{_SEP}\d{{2,}})+(?!\d|{_MASKED})(?P<grouped>)
            # A run of 7 digits or more, not in a word or GUID (-), nor a fraction (0.1234567).
          | (?<=\d)(?<!-.)(?<!\d\.\d)\d{{6,}}(?![A-Za-z0-9\-]|\.\d|{_MASKED})(?P<run>)
        )
    )
    """,
    re.X,
)
_DIGIT_RUN = re.compile(r"\d+")
E164_MAX_DIGITS = 15
GROUPED_MIN_DIGITS = 9


def mask_number(number: str) -> str:
    """`+14255550100` -> `+1425555****`: enough to tell numbers apart in support, no more."""
    return number[:-4] + "****" if len(number) > 5 else "****"


def _mask_groups(text: str, plus: bool) -> str:
    """A number written in groups: its digits, masked (when it has enough of them). Groups
    beyond 15 digits are another number (or none), redacted on their own."""
    digits, rest = "", ""
    for run in _DIGIT_RUN.finditer(text):
        if digits and len(digits) + len(run.group(0)) > E164_MAX_DIGITS:
            rest = text[len(text[: run.start()].rstrip(" .-(")) :]
            text = text[: len(text) - len(rest)]
            break
        digits += run.group(0)
    if rest:
        cut = len(rest) - len(rest.lstrip(" .-"))
        rest = rest[:cut] + _redact_tokens(rest[cut:])
    if len(digits) < (2 if plus else GROUPED_MIN_DIGITS):
        return text + rest
    return mask_number("+" + digits if plus else digits) + rest


def _mask_token(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind in ("plus", "grouped"):
        return _mask_groups(match.group(0), kind == "plus")
    if kind == "run":
        return mask_number(match.group(0))
    return match.group(0)  # a timestamp, an offset, an address: kept


def _redact_tokens(text: str) -> str:
    return _TOKEN.sub(_mask_token, text)


def redact(text: str) -> str:
    """Remove personal data and key material from one string."""
    if "PRIVATE KEY" in text:
        text = _PEM_KEY.sub("[private key redacted]", text)
    if _TWO_DIGITS.search(text):
        text = _TOKEN.sub(_mask_token, text)
    if ":" in text and "@" in text:  # after the numbers: a masked number is still a user part
        text = _SIP_USER.sub(r"\1:****@", text)
    return text


# The keys whose values are (parts of) a civic address: masked whatever they hold.
ADDRESS_KEYS = frozenset(
    {
        "house_number",
        "house_number_suffix",
        "pre_directional",
        "street_name",
        "street_suffix",
        "post_directional",
        "city",
        "city_alias",
        "state_or_province",
        "postal_code",
        "company_name",
        "company_tax_id",
        "description",
        "elin",
        "latitude",
        "longitude",
        "geo_point",
        "civic_address",
        "emergency_location",
        "location",
        "locations",
    }
)


def mask_address(value: Any) -> str:
    """An address field's value, as a log may show it: its first two characters of text."""
    if isinstance(value, str) and len(value) > 2:
        return value[:2] + "****"
    return "****"


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {
            _redact_value(k): mask_address(v) if k in ADDRESS_KEYS else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))  # anything else is rendered as text: redact that text


def trace_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The trace and span of the work being logged (hex, as trace tools show them), when it
    is done for a traced call (plumbing.tracing). Added after redaction: ids are never personal
    data, and a span id may be all digits."""
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = format(span.trace_id, "032x")
        event["span_id"] = format(span.span_id, "016x")
    return event


def redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if key in ADDRESS_KEYS and value is not None:
            event[key] = mask_address(value)
            continue
        # Durations, counts, codes and the like are never personal data.
        if not isinstance(value, int | float | bool) and value is not None:
            event[key] = _redact_value(value)
        if isinstance(key, str) and _DIGIT.search(key) and redact(key) != key:
            event[redact(key)] = event.pop(key)  # log.info("x", **{"+14255550100": ...})
    return event


class _Stderr:
    """Whatever sys.stderr is at the time of writing (it may be replaced after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _CancelledWriteFilter(logging.Filter):
    """Drops grpc.aio's traceback for a response written to a stream its client has already
    left (grpc/grpc#32551 logs it at ERROR): an ordinary disconnect, which the RPC's own log
    line already records as CANCELLED."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ExecuteBatchError raised in core")


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


class _Formatter(structlog.stdlib.ProcessorFormatter):
    """Renders a standard library record as structlog renders its own lines; a record whose
    message does not format (`log.error("%d", "text")`) is rendered as its parts, redacted,
    instead of being printed unredacted by logging's handleError."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception as error:  # any failure to format the message
            fallback = logging.makeLogRecord(record.__dict__)
            fallback.msg = f"unformattable log record ({error}): {record.msg!s} {record.args!r}"
            fallback.args = ()
            return super().format(fallback)


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Set up structlog, and route the standard library's logging (asyncio, grpc, alembic)
    through the same redaction and renderer."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    # Redact, then add the trace and stamp the time: neither is ever personal data.
    last: list[Any] = [
        structlog.processors.format_exc_info,
        redact_processor,
        trace_processor,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        renderer,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *last,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(cast(TextIO, _Stderr()))
    handler.setFormatter(
        _Formatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
        )
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)
    core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, _CancelledWriteFilter) for f in core.filters):
        core.addFilter(_CancelledWriteFilter())


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
