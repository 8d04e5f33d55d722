"""Baseline: a bare asyncio script that awaits a 10 ms call for 2,000 items, 100 at a time."""

import asyncio
import sys
import time


async def call(item: int, gate: asyncio.Semaphore) -> int:
    async with gate:
        await asyncio.sleep(0.01)
        return item * 2


async def main(count: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    results = await asyncio.gather(*(call(i, gate) for i in range(count)))
    elapsed = time.perf_counter() - started
    assert len(results) == count
    sys.stderr.write(f"gather_s={elapsed:.4f}\n")


asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
