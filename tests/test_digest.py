"""The input's SHA-256, started early in the background: never a stale digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from parallel_agent.digest import HASH_BLOCK, _started, file_sha256, start_sha256


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_started_hash_is_the_file_hash(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    data = os.urandom(2 * HASH_BLOCK + 12_345)  # two whole blocks and part of a third
    path.write_bytes(data)
    start_sha256(str(path))
    assert str(path.resolve()) in _started
    assert file_sha256(str(path)) == sha(data)
    assert str(path.resolve()) not in _started  # taken once
    assert file_sha256(str(path)) == sha(data)  # and read again after that


@pytest.mark.parametrize("size", [0, 1, HASH_BLOCK - 1, HASH_BLOCK, HASH_BLOCK + 1])
def test_a_hash_read_in_blocks_is_the_hash_of_the_whole_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "in.jsonl"
    data = os.urandom(size)
    path.write_bytes(data)
    assert file_sha256(str(path)) == sha(data)


def test_a_file_changed_after_the_hash_started_is_hashed_again(tmp_path: Path) -> None:
    """Same size, new content: the new modification time (or inode) tells, and the digest is
    of the file as it is when asked for."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"1\n2\n")
    start_sha256(str(path))
    changed = tmp_path / "new.jsonl"
    changed.write_bytes(b"3\n4\n")
    os.replace(changed, path)  # another inode, as an editor's save makes
    assert file_sha256(str(path)) == sha(b"3\n4\n")
    start_sha256(str(path))
    with path.open("r+b") as handle:  # in place: the modification time moves
        handle.write(b"5")
    os.utime(path, ns=(1, 1))
    assert file_sha256(str(path)) == sha(b"5\n4\n")


def test_a_rewrite_that_keeps_size_and_modification_time_is_seen(tmp_path: Path) -> None:
    """`cp -p` or tar rewrite a file in place and set its modification time back: the change
    time, which cannot be set back, still moves."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"1\n2\n")
    before = path.stat()
    start_sha256(str(path))
    assert _started[str(path.resolve())][1].result() == sha(b"1\n2\n")  # hashed before the write
    with path.open("r+b") as handle:
        handle.write(b"3")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_sha256(str(path)) == sha(b"3\n2\n")


def test_only_regular_files_are_hashed_ahead(tmp_path: Path) -> None:
    """A FIFO would block the thread, a folder or a missing path cannot be read: none is
    started, and asking for the digest reports the problem as before."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, tmp_path / "missing"):
        start_sha256(str(path))
        assert str(path.resolve()) not in _started
    with pytest.raises(FileNotFoundError):
        file_sha256(str(tmp_path / "missing"))


def test_a_started_hash_that_failed_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"1\n")
    start_sha256(str(path))
    signature, future = _started[str(path.resolve())]
    future.result()
    _started[str(path.resolve())] = (signature, type(future)())
    _started[str(path.resolve())][1].set_exception(PermissionError("gone for a moment"))
    assert file_sha256(str(path)) == sha(b"1\n")
