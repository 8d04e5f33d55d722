"""Functions the benchmark pipelines call."""

import asyncio
from typing import Any


def double(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "y": 2 * record["x"]}


async def slow_double(item: int) -> int:
    await asyncio.sleep(0.01)
    return item * 2


async def wait_50ms(item: int) -> int:
    """An API call: 50 ms of waiting, no CPU."""
    await asyncio.sleep(0.05)
    return item * 2


def burn_20ms(item: int) -> int:
    """20 ms of CPU (this process's CPU time, so a busy machine does not shorten it)."""
    import time

    end = time.thread_time() + 0.02
    total = item
    while time.thread_time() < end:
        total = (total * 31 + 7) % 1_000_003
    return item * 2
