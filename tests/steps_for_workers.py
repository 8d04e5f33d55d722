"""Functions the `pagent worker` test pipelines call: each call is written to a ledger (host, pid,
record, time) so a test knows which process did what. Workers import this module from their own
path (`PYTHONPATH`), like any user module."""

from __future__ import annotations

import os
import socket
import time


def _ledger(item: int) -> None:
    line = f"{socket.gethostname()} {os.getpid()} {item} {time.time():.6f}\n"
    descriptor = os.open(os.environ["PAGENT_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def ledger_triple(item: int) -> int:
    """Sleeps PAGENT_LEDGER_SLEEP seconds (a slow API), then triples."""
    _ledger(item)
    time.sleep(float(os.environ.get("PAGENT_LEDGER_SLEEP", "0.01")))
    return item * 3


def ledger_slow_start(item: int) -> int:
    """Records below PAGENT_SLOW_BELOW take PAGENT_SLOW_SLEEP seconds each (a chunk outlives a
    worker's drain grace); the others are quick."""
    _ledger(item)
    slow = item < int(os.environ.get("PAGENT_SLOW_BELOW", "0"))
    time.sleep(float(os.environ.get("PAGENT_SLOW_SLEEP", "0.4")) if slow else 0.001)
    return item * 3


def ledger_fail_multiples(item: int) -> int:
    """Fails every record divisible by PAGENT_FAIL_EVERY."""
    _ledger(item)
    time.sleep(float(os.environ.get("PAGENT_LEDGER_SLEEP", "0.01")))
    if item % int(os.environ.get("PAGENT_FAIL_EVERY", "7")) == 0:
        raise ValueError(f"{item} is refused")
    return item * 3
