"""`aggregate`: combine a node's per-chunk outputs, each chunk counted exactly once, in input order.

By default the results are the concatenation of every item's output in input order (the walkthrough's
`final_results`); that form is streamed straight to the output file and never held in memory. `reduce`,
`group_by` and `expr` compute one value instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from parallel_agent.conditions import AGGREGATE_NAMES, compile_expression
from parallel_agent.errors import PipelineError
from parallel_agent.jsonl import decode_lines, not_finite
from parallel_agent.modules.context import RunContext
from parallel_agent.modules.grouping import PARTIAL_PAYLOAD, Grouper, chunk_partials
from parallel_agent.modules.items import ChunkOutcome
from parallel_agent.modules.threads import run_in_thread

REDUCERS = ("sum", "count", "min", "max")
_MISSING = object()


def stored_key(kind: str, node: str) -> str:
    """The run's `extra` key under which aggregate `node` keeps its `kind` of result
    ("aggregate": a value, "aggregate_json": group-by rows as JSON text, "aggregate_notices",
    "aggregate_rows": how many rows it emitted).
    One top-level key per node: `extra` merges top-level keys only, so aggregates of one run
    finishing together never overwrite each other's."""
    return f"{kind}:{node}"


def stored(extra: dict[str, Any], kind: str, node: str, default: Any = None) -> Any:
    """What `stored_key` keeps, or (a run stored by an older pagent) `extra[kind][node]`."""
    found = extra.get(stored_key(kind, node), _MISSING)
    if found is not _MISSING:
        return found
    return (extra.get(kind) or {}).get(node, default)


def value_rows(value: Any) -> list[Any]:
    """The rows an aggregate's value makes in JSON Lines and CSV, and the rows it emitted: a
    list's items, a group_by's groups as {key, items}, or the value itself as one row."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        return [{"key": key, "items": items} for key, items in value.items()]
    return [value]


def all_stored(extra: dict[str, Any], kind: str) -> list[Any]:
    """Every aggregate's `kind` of result in a run's `extra`."""
    prefix = f"{kind}:"
    older = list((extra.get(kind) or {}).values())
    return older + [value for key, value in extra.items() if key.startswith(prefix)]


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


class SplitPartials:
    """The chunk processor of a `compute:` aggregate fed by a split: each chunk becomes this
    node's partial, committed with the chunk (no results are stored: nothing reads them). The
    split's worker processes usually computed it already, and the split queued the chunk
    committed with it (`ChunkSpec.partial`); a chunk that waits instead (a branch target's, a
    cancelled run's) has the partial as its payload. Otherwise the chunk's lines are reduced
    here, on a thread."""

    def __init__(self, node: str, grouper: Grouper) -> None:
        self.node = node
        self.groupers = {node: grouper}

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        partials = await run_in_thread(chunk_partials, self.groupers, records, numbers, None)
        return ChunkOutcome(encoded=b"", partials=partials)

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        if payload.startswith(PARTIAL_PAYLOAD):
            return ChunkOutcome(encoded=b"", partials=payload[len(PARTIAL_PAYLOAD) :].decode())
        return await self.process_chunk(await run_in_thread(decode_lines, payload), numbers, params)

    async def close(self) -> None:
        """Nothing to release: no worker processes of its own."""
