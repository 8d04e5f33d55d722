"""Map functions of the lease tests (`function: steps_for_leases:<name>`), steered by environment
variables so a test can stop a real `pagent` at an exact point instead of sleeping:

* `PAGENT_LEDGER`: one line per execution is appended to this file (O_APPEND), so a test can count
  executions per record (the output counts occurrences).
* `PAGENT_GATE_DIR` and `PAGENT_GATE_RECORDS` (comma-separated record values): on a gated value the
  function creates `at-<value>` in the folder, blocks until `open-<value>` appears, then creates
  `passed-<value>` before it returns.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def ledger(item: int) -> None:
    """Record one execution of `item`."""
    descriptor = os.open(os.environ["PAGENT_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, f"{item}\n".encode())
    finally:
        os.close(descriptor)


def gated_double(item: int) -> int:
    """`item * 2`, recorded in the ledger; blocks on a gated value until the test opens its gate."""
    ledger(item)
    gated = os.environ.get("PAGENT_GATE_RECORDS", "")
    if str(item) in gated.split(","):
        folder = Path(os.environ["PAGENT_GATE_DIR"])
        (folder / f"at-{item}").touch()
        while not (folder / f"open-{item}").exists():
            time.sleep(0.01)
        (folder / f"passed-{item}").touch()
    return item * 2
