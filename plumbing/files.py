"""Files that hold secrets or personal data: written whole or not at all, private from the moment
they exist, and directories only the server's user may enter.

Used by the development PKI (keys 0600, certificates 0644), the token key file and the SQLite
database and data directory. One mechanism for all of them: a new file is made beside its final
path with its final mode (umask ignored), written, flushed to disk, then moved or linked into
place, and the directory is flushed so the move survives a crash.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from plumbing.logs import get_logger

log = get_logger("opconnect.files")


def staged_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """`data` in a new file beside `path`, mode `mode` from its creation, on disk, not yet in
    place: the caller moves it (`os.replace`) or links it (`os.link`, to keep an existing file)
    and removes the staged name."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    handle = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(handle, mode)  # exactly `mode`, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(handle, view) :]
        os.fsync(handle)
    except BaseException:
        os.close(handle)
        staged.unlink(missing_ok=True)
        raise
    os.close(handle)
    return staged


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries, so a file moved or linked into it survives a crash."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically: a reader sees the old file or the new one, never
    a part; the new one has mode `mode` (0600 by default: private) from its creation."""
    staged = staged_file(path, data, mode)
    try:
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def create_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Make `path` with `data` if it does not exist; True if this call made it. Safe when
    several processes race: one file wins, whole, and the others leave it as it is."""
    staged = staged_file(path, data, mode)
    try:
        os.link(staged, path)
    except FileExistsError:
        return False
    finally:
        staged.unlink()
    sync_directory(path.parent)
    return True


def private_directory(path: Path, *, create: bool = True, tighten: bool = True) -> None:
    """Make `path` a directory only the server's user may enter (0700): it holds whole phone
    numbers and keys. One that exists and is open to others is tightened (with `tighten`), and
    that is logged; a shared one (sticky, like /tmp) or another user's is left as it is, with a
    warning."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if not create:
            return
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.stat().st_mode
    if not mode & 0o077:
        return
    if not tighten or mode & stat.S_ISVTX or path.stat().st_uid != os.geteuid():
        log.warning("directory open to others", path=str(path), mode=oct(stat.S_IMODE(mode)))
        return
    path.chmod(0o700)
    log.warning(
        "directory was open to others: made 0700", path=str(path), was=oct(stat.S_IMODE(mode))
    )


def private_files(*paths: Path) -> None:
    """Existing files among `paths` that are open to others made 0600 (or less), and logged."""
    for file in paths:
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            file.chmod(mode & 0o600)
            log.warning("file was open to others: made 0600", path=str(file), was=oct(mode))
