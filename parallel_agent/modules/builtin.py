"""The built-in data modules behind `use:` in a pipeline, as engine `AgentModule`s.

They are not run as optimistic transactions (`transactional = False`): each does its own atomicity
through the run store (atomic chunk claims, fenced commits), so a long map is never re-run because a
cache key changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from parallel_agent.caches.cache import Cache
from parallel_agent.errors import (
    InputDataError,
    OutputError,
    PipelineError,
    StoreError,
    UsageError,
)
from parallel_agent.graph import AgentModule, ModuleType
from parallel_agent.io import MAX_RECORD_SIZE
from parallel_agent.jsonl import decode_lines, dumps, not_finite
from parallel_agent.modules.aggregate import SplitPartials, aggregate_value, stored_key, value_rows
from parallel_agent.modules.chunks import ChunkWorkers, NodeSettings, feed_from_producer
from parallel_agent.modules.context import RunContext
from parallel_agent.modules.grouping import Grouper, GroupingError, Merger
from parallel_agent.modules.pool import PooledProcessor
from parallel_agent.modules.processors import ChunkProcessor
from parallel_agent.modules.split import split_input
from parallel_agent.store.base import NodeCounts


class BuiltinModule(AgentModule):
    """A data module bound to one node of one run."""

    transactional = False

    def __init__(self, ctx: RunContext, node: str) -> None:
        self.ctx = ctx
        self.node = node

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        """Run the module; an error of the whole run (bad input, lost store) stops every node."""
        if self.ctx.stop.is_set():
            return {"status": "success", "result": {"stopped": self.ctx.stop_reason}}
        try:
            return await self.work(cache)
        except (InputDataError, StoreError, OutputError, UsageError, PipelineError) as exc:
            self.ctx.fail_run(exc)
            return {"status": "error", "result": str(exc)}

    async def work(self, cache: Cache) -> dict[str, Any]:
        raise NotImplementedError


class SplitModule(BuiltinModule):
    """`use: split` — queue the input as chunks for the consuming nodes."""

    name = "split"
    type = ModuleType.PLANNER

    def __init__(
        self,
        ctx: RunContext,
        node: str,
        chunk_size: int,
        checker: PooledProcessor | None = None,
        max_record_size: int = MAX_RECORD_SIZE,
    ) -> None:
        super().__init__(ctx, node)
        self.chunk_size = chunk_size
        self.checker = checker
        self.max_record_size = max_record_size

    async def work(self, cache: Cache) -> dict[str, Any]:
        result = await split_input(
            self.ctx, self.node, self.chunk_size, self.checker, self.max_record_size
        )
        return {"status": "success", "result": result}


class ChunkModule(BuiltinModule):
    """`use: map` / `use: filter` — work the node's chunk queue with `concurrency` workers."""

    type = ModuleType.EXECUTOR

    def __init__(
        self,
        ctx: RunContext,
        node: str,
        settings: NodeSettings,
        processor: ChunkProcessor,
        name: str,
        aggregates: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(ctx, node)
        self.settings = settings
        self.processor = processor
        self.name = name
        self.aggregates = aggregates or {}
        """{aggregate node: grouping options}: their partials are computed with each chunk."""

    async def work(self, cache: Cache) -> dict[str, Any]:
        ctx = self.ctx
        if self.node in ctx.producers:
            await feed_from_producer(ctx, self.node)
        workers = ChunkWorkers(ctx, self.settings, self.processor, self.aggregates)
        await workers.run()
        counts = await ctx.store.counts(ctx.task_id, self.node)
        return {
            "status": "success",
            "result": {
                "chunks": counts.chunks_total,
                "done": counts.done,
                "failed": counts.failed,
                "items_failed": counts.items_failed,
            },
        }


def _refuse_not_finite(rows: list[dict[str, Any]], what: str) -> None:
    """A NaN or an infinity in a row (an expression's, through `sum`, `max`, `first`,
    `collect`...) fails the run, as in any other aggregate's value: JSON has neither, and it
    would be written as null."""
    for row in rows:
        for name, value in row.items():
            if not_finite(value):
                shown = repr(row)
                shown = shown if len(shown) <= 120 else shown[:117] + "..."
                raise PipelineError(
                    f"{what}: '{name}' holds a NaN or infinity, which JSON cannot hold, in the "
                    f"row {shown}"
                )


class AggregateModule(BuiltinModule):
    """`use: aggregate` — every chunk of the producer counted once, in input order."""

    name = "aggregate"
    type = ModuleType.EXECUTOR

    def __init__(
        self,
        ctx: RunContext,
        node: str,
        options: dict[str, Any],
        settings: NodeSettings | None = None,
    ) -> None:
        super().__init__(ctx, node)
        self.options = options
        self.settings = settings
        """Set for a `compute:` aggregate fed by a split: it works its own chunk queue, each
        chunk committing only its partial."""

    async def _merge_stored(self, producer: str) -> Merger:
        ctx = self.ctx
        grouper = Grouper.from_options(self.options, f"node '{self.node}', aggregate", ctx.params)
        merger = grouper.merger()
        async for chunk in ctx.store.results(ctx.task_id, producer):
            if chunk.partial and merger.add_stored(chunk.partial, self.node):
                continue
            if chunk.partial and not chunk.result and chunk.count:
                # Committed as partials alone (a split's chunk): no lines to reduce here instead.
                raise GroupingError(
                    f"node '{self.node}', aggregate: chunk {chunk.index} of '{producer}' was "
                    "stored without this node's partial"
                )
            merger.add(grouper.partial(decode_lines(chunk.result), chunk.numbers))
        return merger

    @property
    def computes_value(self) -> bool:
        keys = ("reduce", "group_by", "expr", "compute")
        return any(self.options.get(key) is not None for key in keys)

    async def work(self, cache: Cache) -> dict[str, Any]:
        ctx = self.ctx
        producer = ctx.producers[self.node]
        if self.settings is not None:
            grouper = Grouper.from_options(
                self.options, f"node '{self.node}', aggregate", ctx.params
            )
            partials = SplitPartials(self.node, grouper)
            await ChunkWorkers(ctx, self.settings, partials, coordinator_only=True).run()
            producer = self.node  # its own chunks hold the partials
        counts = await ctx.store.counts(ctx.task_id, producer)
        # A producer that drained (not one a guard skipped) must still have no chunk open.
        ctx.check_sealed(producer, counts, finished=producer in ctx.drained)
        summary = {"chunks": counts.done, "items": counts.items_done}
        if not self.computes_value:
            return {"status": "success", "result": summary}
        if self.options.get("compute") is not None:
            return await self._grouped(cache, producer, summary, counts)
        value = await aggregate_value(
            ctx,
            producer,
            reduce=self.options.get("reduce"),
            group_by=self.options.get("group_by"),
            expr=self.options.get("expr"),
            field=self.options.get("field"),
            what=f"node '{self.node}', aggregate",
        )
        await ctx.store.update_run(
            ctx.task_id,
            extra={
                stored_key("aggregate", self.node): value,
                stored_key("aggregate_rows", self.node): len(value_rows(value)),
            },
        )
        await cache.set("final_results", value)
        return {"status": "success", "result": {**summary, "value": value}}

    async def _grouped(
        self, cache: Cache, producer: str, summary: dict[str, Any], counts: NodeCounts
    ) -> dict[str, Any]:
        """Merge the partials committed with the producer's chunks (one pass, memory in the
        number of groups); a chunk committed without this node's partial is reduced here.
        When the split committed every chunk with its partial, it merged them already."""
        ctx = self.ctx
        merged = ctx.merged.pop(self.node, None)  # once: a retried attempt reads the store
        try:
            if merged is not None and merged.chunks == counts.done == counts.chunks_total:
                merger = merged.merger
            else:
                merger = await self._merge_stored(producer)
            rows = merger.rows()
        except GroupingError as exc:  # values the reducers cannot combine: this node fails
            return {"status": "error", "result": str(exc)}
        _refuse_not_finite(rows, f"node '{self.node}', aggregate")
        try:
            text = dumps(rows).decode()
        except TypeError as exc:  # a key nested as deep as JSON goes, one level more in a row
            return {
                "status": "error",
                "result": f"node '{self.node}', aggregate: its rows cannot be written as JSON: {exc}"
                + (
                    " (a key or value nested deeper than 253 levels)"
                    if "Recursion" in str(exc)
                    else ""
                ),
            }
        notices = merger.notices()
        await ctx.store.update_run(
            ctx.task_id,
            extra={
                stored_key("aggregate_json", self.node): text,
                stored_key("aggregate_notices", self.node): notices,
                stored_key("aggregate_rows", self.node): len(rows),
            },
        )
        with contextlib.suppress(TypeError):  # a sum past 64 bits: the store and files have it
            await cache.set("final_results", rows)
        result = {**summary, "groups": len(merger.groups), "skipped": merger.skipped_counts()}
        return {"status": "success", "result": result}
