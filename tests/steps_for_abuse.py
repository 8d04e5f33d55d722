"""Functions the abuse tests (tests/test_abuse_store.py) name in their pipelines.

Files named by environment variables steer them from the test: `PAGENT_SLOW` (while it exists, a
call sleeps 60 s, a thread nobody can stop), `PAGENT_STARTED` (touched when a call begins) and
`PAGENT_GO` (a gate: calls wait until it exists).
"""

from __future__ import annotations

import mmap
import os
import resource
import time
from pathlib import Path


def _started() -> None:
    Path(os.environ["PAGENT_STARTED"]).touch()


def slow_double(item: int) -> int:
    """item * 2; while PAGENT_SLOW exists, only after sleeping 60 s (uninterruptible)."""
    if Path(os.environ["PAGENT_SLOW"]).exists():
        _started()
        time.sleep(60)
    return item * 2


def fails_zero_else_slow(item: int) -> int:
    """Record 0 fails at once; the others are `slow_double`."""
    if item == 0:
        raise ValueError("zero is not allowed")
    return slow_double(item)


def gated_double(item: int) -> int:
    """item * 2, once PAGENT_GO exists (at most 60 s)."""
    _started()
    deadline = time.monotonic() + 60
    while not Path(os.environ["PAGENT_GO"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return item * 2


def address_space_limit(item: int) -> int:
    """The RLIMIT_AS this process runs under (-1: none)."""
    return resource.getrlimit(resource.RLIMIT_AS)[0]


def maps_five_gib(item: int) -> int:
    """Map 5 GiB of address space without touching it: no memory used, but refused under a
    smaller RLIMIT_AS."""
    with mmap.mmap(-1, 5 << 30):
        return item
