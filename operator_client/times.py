"""The times the operator's commands accept (`--start`, `--end`): ISO 8601, a few words and
relative offsets, read by argparse so that a bad value names its option.

    2026-11-23                   midnight UTC that day
    2026-11-23T10:00             UTC unless a zone is given (`Z`, `+01:00`)
    now, today, yesterday        now; midnight UTC today; midnight UTC yesterday
    -30m, -2h, -7d, -90s         that long before now (s, m, h, d, w)
"""

from __future__ import annotations

import argparse
import datetime as dt
import re

FORMS = (
    "ISO 8601 (2026-11-23, 2026-11-23T10:00, 2026-11-23T10:00:00+01:00; UTC if no zone),"
    " now, today, yesterday, or before now: -90s, -30m, -2h, -7d, -2w"
)
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
RELATIVE = re.compile(r"-(\d+)([smhdw])")


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An aware UTC datetime from any accepted form; ValueError naming the forms."""
    now = now or dt.datetime.now(dt.UTC)
    word = text.strip().lower()
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "now":
        return now
    if word == "today":
        return midnight
    if word == "yesterday":
        return midnight - dt.timedelta(days=1)
    relative = RELATIVE.fullmatch(word)
    if relative:
        return now - dt.timedelta(**{UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use {FORMS}") from None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def time_argument(text: str) -> dt.datetime:
    """argparse's `type=` for a time option: its error names the option and the forms."""
    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
