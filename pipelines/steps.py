"""Python steps used by the example pipelines (`function: steps:<name>`)."""

import asyncio
from typing import Any

EXCHANGE_RATES = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "JPY": 0.0061}


async def convert_price(record: dict[str, Any]) -> dict[str, Any]:
    """Pretend to ask a slow exchange-rate service (10 ms a call) and convert the price to EUR."""
    await asyncio.sleep(0.01)
    rate = EXCHANGE_RATES[record["currency"]]
    return {**record, "price_eur": round(float(record["price"]) * rate, 2)}


def double(record: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's transform: {"id", "x"} -> {"id", "y": 2x}."""
    return {"id": record["id"], "y": 2 * record["x"]}
