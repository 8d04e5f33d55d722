"""`aggregate`: combine a node's per-chunk outputs, each chunk counted exactly once, in input order.

By default the results are the concatenation of every item's output in input order (the walkthrough's
`final_results`); that form is streamed straight to the output file and never held in memory. `reduce`,
`group_by` and `expr` compute one value instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parallel_agent.conditions import AGGREGATE_NAMES, compile_expression
from parallel_agent.errors import PipelineError
from parallel_agent.jsonl import decode_lines, not_finite
from parallel_agent.modules.context import RunContext

REDUCERS = ("sum", "count", "min", "max")


async def iter_outputs(ctx: RunContext, node: str) -> AsyncIterator[Any]:
    """Every output item of `node`, in input order."""
    async for result in ctx.store.results(ctx.task_id, node):
        for value in decode_lines(result.result):
            yield value


def _pick(value: Any, field: str | None, what: str) -> Any:
    if field is None:
        return value
    if not isinstance(value, dict):
        raise PipelineError(
            f"{what}: field '{field}' needs object results, got {type(value).__name__}"
        )
    return value.get(field)


async def aggregate_value(
    ctx: RunContext,
    producer: str,
    *,
    reduce: str | None = None,
    group_by: str | None = None,
    expr: str | None = None,
    field: str | None = None,
    what: str = "aggregate",
) -> Any:
    """Compute the aggregate of `producer`'s outputs for the non-default forms; a NaN or infinity
    in it is an error (JSON has neither: it would be written as null)."""
    value = await _aggregate(ctx, producer, reduce, group_by, expr, field, what)
    if not_finite(value):
        raise PipelineError(f"{what}: the result holds a NaN or infinity, which JSON cannot hold")
    return value


async def _aggregate(
    ctx: RunContext,
    producer: str,
    reduce: str | None,
    group_by: str | None,
    expr: str | None,
    field: str | None,
    what: str,
) -> Any:
    if reduce is not None:
        return await _reduce(ctx, producer, reduce, field, what)
    if group_by is not None:
        groups: dict[str, list[Any]] = {}
        async for value in iter_outputs(ctx, producer):
            key = _pick(value, group_by, what)
            groups.setdefault(str(key), []).append(value)
        return groups
    if expr is not None:
        compiled = compile_expression(expr, what=what, names=AGGREGATE_NAMES)
        results = [value async for value in iter_outputs(ctx, producer)]
        return compiled.evaluate({"results": results, "params": ctx.params})
    raise PipelineError(f"{what}: nothing to compute")


async def _reduce(ctx: RunContext, producer: str, reduce: str, field: str | None, what: str) -> Any:
    if reduce not in REDUCERS:
        raise PipelineError(f"{what}: unknown reduce '{reduce}'; known: {', '.join(REDUCERS)}")
    count = 0
    total: Any = 0
    best: Any = None
    async for value in iter_outputs(ctx, producer):
        picked = _pick(value, field, what)
        count += 1
        if reduce == "sum":
            total += picked
        elif (
            reduce == "min"
            and (best is None or picked < best)
            or reduce == "max"
            and (best is None or picked > best)
        ):
            best = picked
    if reduce == "count":
        return count
    if reduce == "sum":
        return total
    return best
