"""A lock file held for as long as a command works on a file, so that two runs of the same
command on the same file refuse to run at once instead of overwriting each other's journal."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opconnect_client import ClientError


@contextmanager
def held(lock: Path, what: str) -> Iterator[None]:
    """Hold `lock` (an exclusive flock, released by the kernel when the process ends however
    it ends); ClientError naming `what` when another process holds it. The file is left in
    place: removing it would let a third process lock a file no longer there."""
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise ClientError(f"cannot create the lock file {lock}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClientError(f"{what} is already running (it holds {lock})") from None
        yield
    finally:
        os.close(descriptor)
