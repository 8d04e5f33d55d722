"""What the one-shot `pagent` process does for itself: start its worker processes early, keep the
garbage collector off the objects of start-up during a run, and exit without tearing the
interpreter down.

Only the command line calls these; a program that runs pipelines through the library API keeps
Python's usual behaviour.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from parallel_agent.modules.spares import close_spares, start_spares


def freeze_startup_objects() -> None:
    """Move everything alive now (modules, classes, the pipeline) out of the cyclic GC's reach.

    A run allocates many short-lived tasks and records; each full collection would otherwise
    rescan the ~40,000 objects of start-up too (measured: 10% of a 0.25 s fan-out run).
    """
    gc.freeze()


@contextlib.contextmanager
def spare_workers(
    pipeline: str, overrides: Sequence[str], input_format: str | None, *, start: bool = True
) -> Iterator[None]:
    """Start the worker processes the pipeline will run (`processes`, at most one per core)
    before the run needs them, so that their start-up overlaps the rest of pagent's loading
    (modules/spares.py); close the ones the run did not take when the block ends. A pipeline
    that does not load starts none: the run then says why. Only a regular file is read ahead
    of the run: a pipe (`<(...)`) can be read once."""
    if start and os.path.isfile(pipeline):
        from parallel_agent.pipeline import load_pipeline

        try:
            wanted = load_pipeline(pipeline, overrides).worker_processes(input_format)
        except Exception:  # reported by the run itself, with its exit code
            wanted = 0
        start_spares(min(wanted, os.cpu_count() or 1))
    try:
        yield
    finally:
        close_spares()


def exit_now(code: object) -> NoReturn:
    """Flush stdout and stderr, then end the process with `code` as `sys.exit` would."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away (`pagent results ID | head`), or a stream already closed.
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(status)
