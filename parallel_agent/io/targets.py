"""What an output path names, checked before any work: never the input, never another output of
the same command, never a folder, socket or block device; a FIFO or character device is written in
place, never replaced.

Paths are compared by what they resolve to (device and inode when the file exists, the resolved
path otherwise), so a symlink, a hard link, `./in` or `dir/../in` is the same file as `in`.
`/dev/stdout`, `/dev/stderr`, `/dev/fd/N` and `/proc/self/fd/N` name this process's own file
descriptors: they are written through a copy of that descriptor (a `>>` redirection keeps
appending), and `-` is the same as `/dev/stdout`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from parallel_agent.errors import UsageError

#: Our temp files: `.<name>.pagent-<random>.tmp`, so a leftover is recognisably ours.
TEMP_MARK = ".pagent-"
_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STD_PATHS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}

_REFUSED = {
    stat.S_IFDIR: "a folder",
    stat.S_IFSOCK: "a socket",
    stat.S_IFBLK: "a block device",
}


def descriptor_of(target: str) -> int | None:
    """The file descriptor a path such as `/dev/stdout` or `/dev/fd/3` names (`-`: stdout)."""
    if target == "-":
        return 1
    if target in _STD_PATHS:
        return _STD_PATHS[target]
    match = _FD_PATH.match(target)
    return int(match.group(1)) if match else None


def _stat(target: str) -> os.stat_result | None:
    """What `target` is, following links; None when nothing is there (yet)."""
    descriptor = descriptor_of(target)
    try:
        return os.fstat(descriptor) if descriptor is not None else os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return None


def writes_in_place(target: str) -> bool:
    """True when `target` is written directly (a descriptor of ours, a FIFO, a character device)
    rather than through a temp file renamed over it, which would replace the special file."""
    if descriptor_of(target) is not None:
        return True
    found = _stat(target)
    return found is not None and (stat.S_ISFIFO(found.st_mode) or stat.S_ISCHR(found.st_mode))


def check_kind(target: str, option: str) -> None:
    """Refuse (UsageError) an output that names a folder, a socket or a block device."""
    found = _stat(target)
    if found is None:
        return
    kind = _REFUSED.get(stat.S_IFMT(found.st_mode))
    if kind is not None:
        raise UsageError(f"{option} {target}: it is {kind}, not a file to write")


def _identity(path: str) -> tuple[object, ...]:
    """What a path resolves to: (device, inode) when it exists, the resolved path otherwise. A
    terminal reached through a descriptor is that descriptor (stdout and stderr may share one)."""
    found = _stat(path)
    if found is None:
        return (os.path.realpath(path),)
    descriptor = descriptor_of(path)
    if descriptor is not None and stat.S_ISCHR(found.st_mode):
        return ("descriptor", descriptor)
    return (found.st_dev, found.st_ino)


def _may_be_harmed(path: str) -> bool:
    """An input a write could destroy: a regular file, or nothing yet (a store file to be made)."""
    found = _stat(path)
    return found is None or stat.S_ISREG(found.st_mode)


def _named(option: str, path: str, stream: str = "stdout") -> str:
    return f"{option} {f'- ({stream})' if path == '-' else path}"


def check_targets(
    outputs: Iterable[tuple[str, str | None]], inputs: Iterable[tuple[str, str | None]] = ()
) -> None:
    """Refuse (UsageError, before any work) outputs that are not files to write, that resolve to an
    input file, or that resolve to each other. Each pair is (option name, path or None); an input
    `-` is stdin."""
    read: list[tuple[str, str, tuple[object, ...]]] = []
    for option, path in inputs:
        if path is None:
            continue
        real = "/dev/stdin" if path == "-" else path
        if _may_be_harmed(real):
            read.append((option, path, _identity(real)))
    seen: list[tuple[str, str, tuple[object, ...]]] = []
    for option, path in outputs:
        if path is None:
            continue
        check_kind(path, option)
        identity = _identity(path)
        for other_option, other, other_identity in read:
            if identity == other_identity:
                raise UsageError(
                    f"{_named(option, path)} is the same file as "
                    f"{_named(other_option, other, 'stdin')}: writing it would destroy what is read"
                )
        for other_option, other, other_identity in seen:
            if identity == other_identity:
                raise UsageError(
                    f"{_named(option, path)} is the same file as {_named(other_option, other)}: "
                    "give each output its own file"
                )
        seen.append((option, path, identity))


def temp_name(target: Path, token: str) -> Path:
    """The temp file for `target`: hidden, beside it, and recognisably pagent's."""
    return target.parent / f".{target.name}{TEMP_MARK}{token}.tmp"


def _lock(descriptor: int) -> bool | None:
    """Take an advisory lock on an open file without waiting: False if another process holds it,
    None where there are no such locks (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def hold(descriptor: int) -> bool:
    """Mark a new temp file as in use for as long as its writer lives (an advisory lock); False
    if a cleaner got to it first (the writer then makes another)."""
    return _lock(descriptor) is not False


def remove_leftovers(target: Path) -> list[Path]:
    """Delete temp files a killed writer of `target` left behind (no live writer holds their
    lock); files that are not pagent's, or that a running pagent is writing, are kept."""
    prefix = f".{target.name}{TEMP_MARK}"
    removed: list[Path] = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        path = target.parent / name
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                continue
            if not _lock(descriptor):
                continue  # a live writer holds it (or, without locks, it may)
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
        finally:
            os.close(descriptor)
    return removed
