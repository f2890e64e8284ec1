"""What the operator's commands print: tables for people (rich) or JSON for machines
(`--output json`), results on stdout, messages on stderr.

When a stream is not a terminal nothing is wrapped: a message is one line however long, and a
table is as wide as its content (rich would otherwise wrap at 80 columns, or `COLUMNS`, and cut
words in the middle of a message a script is reading). Text is printed as is, never read as
rich markup (a reason such as `[x]` stays `[x]`).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opconnect_client import ClientError

UNWRAPPED = 1_000_000  # columns of a console that is not a terminal: never wrap


def console_for(stream: TextIO) -> Console:
    """A console on `stream`: rich's own behaviour on a terminal, no wrapping otherwise."""
    console = Console(file=stream, highlight=False)
    if console.is_terminal:
        return console
    return Console(file=stream, highlight=False, soft_wrap=True, width=UNWRAPPED)


def as_dict(message: Message) -> dict[str, Any]:
    """A message as the proto3 JSON mapping names it (field names as in the .proto, enums by
    name, times in RFC 3339, durations as "1.5s", 64-bit integers as strings)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def read_text(path: Path) -> str:
    """A text file a command reads (UTF-8), or a one-line ClientError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ClientError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror}") from None


def when(stamp: Any) -> str:
    """A Timestamp as `2026-11-23 10:00:00` (UTC), or "" when unset."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    value: dt.datetime = stamp.ToDatetime(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def seconds(duration: Any) -> str:
    """A Duration as seconds, `%g`."""
    return f"{duration.ToNanoseconds() / 1e9:g}"


class Output:
    """Where a command prints: `json` (machine-readable, on stdout) or `table` (for people)."""

    def __init__(
        self, mode: str = "table", out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.json = mode == "json"
        self.out_stream = out or sys.stdout
        self.err_stream = err or sys.stderr
        self.out = console_for(self.out_stream)
        self.err = console_for(self.err_stream)

    def data(self, value: Any) -> None:
        """One JSON document (a line) on stdout."""
        self.out_stream.write(json.dumps(value, separators=(",", ":")) + "\n")
        self.out_stream.flush()

    def line(self, text: str) -> None:
        """A line for people on stdout (in JSON mode, on stderr: stdout holds JSON only)."""
        (self.err if self.json else self.out).print(text, markup=False)

    def note(self, text: str) -> None:
        """A message on stderr (progress, warnings, what was done)."""
        self.err.print(text, markup=False)

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[str]],
        right: Iterable[str] = (),
    ) -> None:
        aligned = set(right)
        table = Table(title=Text(title) if title else None)
        for name in columns:
            table.add_column(name, justify="right" if name in aligned else "left")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        self.out.print(table)

    async def listing(
        self,
        what: str,
        columns: Sequence[str],
        items: AsyncIterable[Message],
        row: Callable[[Any], Sequence[str]],
    ) -> None:
        """Each item as a JSON line as it comes, or a table of their `row`s titled with their
        count (`12 numbers`)."""
        rows: list[Sequence[str]] = []
        async for item in items:
            if self.json:
                self.data(as_dict(item))
            else:
                rows.append(row(item))
        if not self.json:
            self.table(f"{len(rows):,} {what}", columns, rows)
