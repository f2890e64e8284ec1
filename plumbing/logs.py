"""structlog set-up: JSON in production, readable on a terminal, and redaction of personal data.

Every string in every log event passes through `redact`: phone numbers keep all but their last
four digits (`+1425555****`), SIP URIs lose their user part (`sip:****@sbc1.example`), and PEM
private-key blocks are dropped whole. Code may log freely; the processor is the one safeguard.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S
)
_SIP_URI = re.compile(r"\b(sips?):(?:[^@\s;>\"',]+@)?([^\s;>\"',]*)", re.I)
# A number with its '+' wherever it is; a bare run of 7+ digits unless it is part of a token
# of letters, digits and hyphens (a hex request id, a GUID): those are not phone numbers.
_NUMBER = re.compile(r"\+\d{2,}(?!\d)|(?<![A-Za-z0-9-])\d{7,}(?![A-Za-z0-9-])")


def mask_number(number: str) -> str:
    """`+14255550100` -> `+1425555****`: enough to tell numbers apart in support, no more."""
    return number[:-4] + "****" if len(number) > 5 else "****"


def _mask_sip(match: re.Match[str]) -> str:
    return f"{match.group(1)}:****@{match.group(2)}" if "@" in match.group(0) else match.group(0)


def redact(text: str) -> str:
    """Remove personal data and key material from one string."""
    if "PRIVATE KEY" in text:
        text = _PEM_KEY.sub("[private key redacted]", text)
    if ":" in text:
        text = _SIP_URI.sub(_mask_sip, text)
    return _NUMBER.sub(lambda m: mask_number(m.group(0)), text)


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {_redact_value(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))  # anything else is rendered as text: redact that text


def redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        # Durations, counts, codes and the like are never personal data.
        if not isinstance(value, int | float | bool) and value is not None:
            event[key] = _redact_value(value)
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


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Set up structlog (and route the standard library's logging through the same output)."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
    core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, _CancelledWriteFilter) for f in core.filters):
        core.addFilter(_CancelledWriteFilter())


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
