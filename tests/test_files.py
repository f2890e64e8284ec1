"""Private files: written whole with their mode from creation, whatever the umask; made once
when several writers race; files and directories open to others tightened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from plumbing.files import create_file, private_directory, private_files, write_file

pytestmark = pytest.mark.unit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_written_file_has_its_mode_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    write_file(tmp_path / "key", b"secret")
    write_file(tmp_path / "cert", b"public", 0o644)
    assert (mode(tmp_path / "key"), mode(tmp_path / "cert")) == (0o600, 0o644)
    write_file(tmp_path / "key", b"new")  # replaced whole
    assert (tmp_path / "key").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert", "key"]  # nothing staged left


def test_racing_writers_make_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "token-keys"
    with ThreadPoolExecutor(8) as pool:
        made = list(
            pool.map(lambda i: create_file(target, f"writer {i}\n".encode() * 1000), range(32))
        )
    assert made.count(True) == 1
    (winner,) = set(target.read_text().splitlines())
    assert target.read_text() == f"{winner}\n" * 1000
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token-keys"]


def test_files_and_directories_open_to_others_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "opconnect.db").write_bytes(b"")
    (data / "opconnect.db").chmod(0o644)
    private_directory(data)
    private_files(data / "opconnect.db", data / "opconnect.db-wal")  # a missing one is fine
    assert (mode(data), mode(data / "opconnect.db")) == (0o700, 0o600)
    private_directory(tmp_path / "new" / "dir")
    assert mode(tmp_path / "new" / "dir") == 0o700
