"""Spare worker processes: started by the `pagent run` command as soon as it has read the pipeline,
before the run knows what they will do, so that each one's interpreter start-up (about 45 ms) runs
on an idle core while pagent loads, instead of delaying the first chunk.

A spare is a `python -m parallel_agent.modules.worker` waiting for its job description, the first
thing a pool sends any worker; `PooledProcessor` takes a spare before it starts a process. Spares
nobody took are closed at the end of the command. Only the command line starts spares; a program
that runs pipelines through the library API starts each worker when its pool needs it.

This module imports only the standard library: it is loaded before the rest of pagent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

#: Bytes a worker's pipes hold (Linux lets any process ask for up to 1 MiB), as for any worker.
PIPE_SIZE = 1 << 20
#: Seconds a spare gets to exit once its input is closed, before it is killed.
EXIT_GRACE_S = 5.0

_spares: list[subprocess.Popen[bytes]] = []


def worker_command() -> list[str]:
    return [sys.executable, "-m", "parallel_agent.modules.worker"]


def worker_environment() -> dict[str, str]:
    """The coordinator's import path, so a worker imports what the pipeline imported."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def start_spares(count: int) -> None:
    """Start `count` spare workers (fewer if the system refuses more processes)."""
    for _ in range(count):
        try:
            process = subprocess.Popen(
                worker_command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                start_new_session=True,  # its own process group, as every worker
                env=worker_environment(),
            )
        except OSError:  # out of processes or memory: the pools start their own, and say so
            return
        widen_pipes(process.stdin, process.stdout)
        _spares.append(process)


def take_spare() -> subprocess.Popen[bytes] | None:
    """A spare that is still running, or None."""
    while _spares:
        process = _spares.pop(0)
        if process.poll() is None:
            return process
        _close(process)
    return None


def close_spares() -> None:
    """Let every spare nobody took exit (end of input), killing any that does not in time."""
    taken, _spares[:] = list(_spares), []
    for process in taken:
        _close(process)


def _close(process: subprocess.Popen[bytes]) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        process.wait(EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def widen_pipes(*pipes: object) -> None:
    """Let a whole chunk fit in a worker's pipes (Linux: 64 KiB by default, 1 MiB allowed), so a
    chunk moves in a few system calls instead of dozens of wake-ups on both sides."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: pipes keep their size
        return
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setsize is None:
        return
    for pipe in pipes:
        fileno = getattr(pipe, "fileno", None)
        if fileno is not None:
            with contextlib.suppress(OSError, ValueError):
                fcntl.fcntl(fileno(), setsize, PIPE_SIZE)
