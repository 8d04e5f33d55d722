"""Functions the benchmark pipelines call."""

import asyncio
from typing import Any


def double(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "y": 2 * record["x"]}


async def slow_double(item: int) -> int:
    await asyncio.sleep(0.01)
    return item * 2
