"""The SHA-256 of an input file, which a run records to know its input again on resume.

Hashing reads the whole file (about 0.7 s per GB), so the command line starts it in a background
thread as soon as it has the path, while the rest of pagent loads on the other core;
`file_sha256` then takes that result if the file still has the size, modification and change
times, inode and device it had when hashing started (a write moves the change time, which no
user can set back), and hashes it again otherwise. A digest is kept on the same terms, so the
checks of one command (a resume, then writing failed records) read the file once.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from concurrent.futures import Future

_Signature = tuple[int, int, int, int, int]
_started: dict[str, tuple[_Signature, Future[str]]] = {}
_known: dict[str, tuple[_Signature, str]] = {}
_lock = threading.Lock()


def _signature(path: str) -> _Signature:
    info = os.stat(path)
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


#: Bytes read and hashed at a time. Reading and hashing a block each release the GIL, and each
#: take it back: while pagent loads its modules on the main thread, taking it back waits, so
#: few big blocks finish sooner and disturb the loading less (measured on 42 MiB of input: the
#: run starts its split 10 ms sooner than with 1 MiB blocks; 16 MiB gains nothing more).
HASH_BLOCK = 4 << 20


def _sha256(path: str) -> str:
    """Read into one reused buffer (no new block each time); hashlib hashes it without the GIL."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(min(HASH_BLOCK, max(os.fstat(handle.fileno()).st_size, 1 << 16)))
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def start_sha256(path: str) -> None:
    """Start hashing the regular file `path` in a background thread (anything else, or a path
    that cannot be read, is left to `file_sha256`, which reports it in its place)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return
        signature = _signature(path)
    except OSError:
        return
    future: Future[str] = Future()

    def work() -> None:
        try:
            future.set_result(_sha256(path))
        except BaseException as exc:  # handed to whoever asks for the result
            future.set_exception(exc)

    with _lock:
        _started[os.path.realpath(path)] = (signature, future)
    threading.Thread(target=work, name="pagent-input-sha256", daemon=True).start()


def file_sha256(path: str) -> str:
    """The SHA-256 of the file `path`: known already, or from `start_sha256`, when the file has
    not changed since; else read now."""
    key = os.path.realpath(path)
    with _lock:
        started = _started.pop(key, None)
    if started is not None:
        signature, future = started
        try:
            digest = future.result()
        except OSError:
            pass
        else:
            with _lock:
                _known[key] = (signature, digest)
    with _lock:
        known = _known.get(key)
    signature = _signature(path)
    if known is not None and known[0] == signature:
        return known[1]
    digest = _sha256(path)
    with _lock:
        _known[key] = (signature, digest)
    return digest
