"""Functions the test pipelines call by import path (`function: steps_for_tests:<name>`)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any


def double(item: Any) -> Any:
    return item * 2


def fail_on_seven(item: int) -> int:
    if item == 7:
        raise ValueError("seven is not allowed")
    return item * 10


def is_even(item: int) -> bool:
    return item % 2 == 0


def batch_square(items: list[int]) -> list[int]:
    return [item * item for item in items]


def batch_short(items: list[int]) -> list[int]:
    return items[:-1]


async def async_increment(item: int) -> int:
    await asyncio.sleep(0.001)
    return item + 1


def returns_set(item: int) -> Any:
    return {item} if item == 3 else item


def fails_once(item: int) -> int:
    """Fails the first time it sees record 5 in this test's marker folder, then succeeds."""
    marker = Path(os.environ["PAGENT_TEST_MARKERS"]) / f"seen-{item}"
    if item == 5 and not marker.exists():
        marker.write_text("x")
        raise RuntimeError("transient failure")
    return item


async def hangs_on_three(item: int) -> int:
    if item == 3:
        await asyncio.sleep(3600)
    return item


def ledger_double(item: int) -> int:
    """Records every execution (one line per call, O_APPEND) so tests can count re-executions.

    With PAGENT_LEDGER_GATE set, each call waits until that file exists: a test holds the run at
    an exact point instead of racing it with sleeps."""
    import time

    descriptor = os.open(os.environ["PAGENT_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, f"{item}\n".encode())
    finally:
        os.close(descriptor)
    gate = os.environ.get("PAGENT_LEDGER_GATE")
    while gate and not os.path.exists(gate):
        time.sleep(0.01)
    time.sleep(float(os.environ.get("PAGENT_LEDGER_SLEEP", "0.002")))
    return item * 2


def fails_once_divided(item: int) -> int:
    """Input is already x10: fails the first time it sees 50, then passes it through."""
    marker = Path(os.environ["PAGENT_TEST_MARKERS"]) / f"once-{item}"
    if item == 50 and not marker.exists():
        marker.write_text("x")
        raise RuntimeError("transient failure")
    return item


async def hangs_on_thirty(item: int) -> int:
    if item == 30:
        await asyncio.sleep(3600)
    return item


def blocks_on_thirty(item: int) -> int:
    """A sync function that never returns on 30: its thread cannot be stopped, only abandoned."""
    import time

    if item == 30:
        time.sleep(3600)
    return item


def chatty_double(item: int) -> int:
    """Prints while it works: output must still be exactly the results."""
    print(f"working on {item}")
    return item * 2


def dies_on_three(item: int) -> int:
    """Ends its whole process (like a crash in a C extension) when it meets record value 3."""
    if item == 3:
        os._exit(3)
    return item


def exits_on_three(item: int) -> int:
    """Ends its process the Python way (`sys.exit`, as a library calling it would) at 3: the
    interpreter then closes its files, the worker's pipe among them, before the process ends."""
    if item == 3:
        import atexit
        import sys
        import time

        atexit.register(time.sleep, 0.3)  # a slow teardown: the pipe closes well before the end
        sys.exit(3)
    return item


def sleeps_on_three(item: int) -> int:
    """A sync function that never returns for 3: only killing its process stops it."""
    import time

    if item == 3:
        time.sleep(3600)
    return item


class _Undecidable:
    def __bool__(self) -> bool:
        raise ValueError("cannot decide")


def undecidable_on_three(item: int) -> Any:
    """A filter whose answer for 3 cannot be tested for truth: only that item fails."""
    return _Undecidable() if item == 3 else item % 2 == 0


def reads_stdin(item: int) -> int:
    """Starts a child that reads stdin: it must see end of input, never the worker's protocol."""
    import subprocess

    return item + len(subprocess.run(["cat"], capture_output=True, check=True).stdout)


def gate_on_eleven(item: int) -> int:
    """Record 11 (item 10) waits at a gate: it says it arrived (`at-gate` in
    PAGENT_TEST_MARKERS) and returns once the test created `open-gate` (at most a minute)."""
    import time

    if item == 10:
        markers = Path(os.environ["PAGENT_TEST_MARKERS"])
        (markers / "at-gate").touch()
        for _ in range(6000):
            if (markers / "open-gate").exists():
                break
            time.sleep(0.01)
    return item


def ledger_identity(item: Any) -> Any:
    """`item` unchanged, recorded in the ledger by its `id` (as `ledger_double` does)."""
    import time

    descriptor = os.open(os.environ["PAGENT_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, f"{item['id']}\n".encode())
    finally:
        os.close(descriptor)
    time.sleep(float(os.environ.get("PAGENT_LEDGER_SLEEP", "0.002")))
    return item


def collector_on(item: Any) -> bool:
    """Whether the cyclic GC is on in the process running the item (`pagent` pauses it while
    it starts, and must turn it on again before any work)."""
    import gc

    return gc.isenabled()
