"""Where a stream's cursor is kept between runs, so that a follower resumes exactly after the
last batch the application processed.

A checkpoint store has two methods: `load()` (the saved cursor, or "" for none) and
`save(cursor)`, which must be durable when it returns. Two are provided: a file written
atomically, and a row in a SQLite database (which may be the application's own, so that it can
save the cursor in the same transaction as what it did with the batch: `SqliteCheckpoint.save`
takes an open connection for that). Any object with those two methods will do.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Protocol


class Checkpoint(Protocol):
    def load(self) -> str: ...

    def save(self, cursor: str) -> None: ...


class MemoryCheckpoint:
    """A cursor kept in memory only: resumes across disconnects, not across restarts."""

    def __init__(self, cursor: str = "") -> None:
        self.cursor = cursor

    def load(self) -> str:
        return self.cursor

    def save(self, cursor: str) -> None:
        self.cursor = cursor


class FileCheckpoint:
    """The cursor in a file of its own, replaced atomically (written to a temporary file beside
    it, flushed to disk, renamed over it, the directory flushed): after any crash the file holds
    the old cursor or the new one, never a mix. Cursors are opaque tokens, not secrets, but the
    file is made readable by its owner only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> str:
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            return ""

    def save(self, cursor: str) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, f"{cursor}\n".encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class SqliteCheckpoint:
    """The cursor in a row of `opconnect_checkpoints` (name, cursor) of a SQLite database, one
    row per `name` (a stream and its filters). `save(cursor, connection)` writes through the
    application's own open connection without committing, so that the cursor commits with the
    application's work on the batch; without a connection it commits on its own."""

    def __init__(self, path: str | os.PathLike[str], name: str) -> None:
        self.path = Path(path)
        self.name = name
        connection = self._connect()
        try:
            with connection:
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS opconnect_checkpoints"
                    " (name TEXT PRIMARY KEY, cursor TEXT NOT NULL)"
                )
        finally:
            connection.close()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30)
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def load(self) -> str:
        connection = self._connect()
        try:
            row = connection.execute(
                "SELECT cursor FROM opconnect_checkpoints WHERE name = ?", (self.name,)
            ).fetchone()
        finally:
            connection.close()
        return str(row[0]) if row else ""

    def save(self, cursor: str, connection: sqlite3.Connection | None = None) -> None:
        statement = (
            "INSERT INTO opconnect_checkpoints (name, cursor) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor"
        )
        if connection is not None:
            connection.execute(statement, (self.name, cursor))
            return
        own = self._connect()
        try:
            with own:
                own.execute(statement, (self.name, cursor))
        finally:
            own.close()
