"""`split`: stream the input and queue it as chunks of `chunk_size` records for the nodes that consume it.

The input is read as a stream (a JSON array too), so memory does not grow with its size. Queuing is
idempotent per chunk index, so a resumed run may split again; a node whose queue is sealed is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Iterator
from typing import Any

from parallel_agent.errors import UsageError
from parallel_agent.events import ChunkDone
from parallel_agent.io import MAX_RECORD_SIZE, ChunkReader, read_chunks
from parallel_agent.io.records import PayloadChunk
from parallel_agent.jsonl import loads
from parallel_agent.modules.chunks import planned_event
from parallel_agent.modules.context import RunContext
from parallel_agent.modules.grouping import (
    PARTIAL_PAYLOAD,
    Grouper,
    GroupingError,
    MergedPartials,
    build_groupers,
    load_partials,
    merge_totals,
)
from parallel_agent.modules.pool import PooledProcessor
from parallel_agent.store.base import ChunkSpec, NodeCounts

#: Chunks sent to the store in one call (while the next ones are read and checked).
QUEUE_BATCH = 8


async def split_input(
    ctx: RunContext,
    node: str,
    chunk_size: int,
    checker: PooledProcessor | None = None,
    max_record_size: int = MAX_RECORD_SIZE,
) -> dict[str, Any]:
    """Queue the input as chunks for every consumer of `node`; return what was queued.

    JSON Lines input is stored as read; `checker` (worker processes) parses it on every core,
    otherwise it is parsed here. Nothing is queued past a malformed record's chunk."""
    targets = ctx.consumers.get(node) or [node]
    before = {target: await ctx.store.counts(ctx.task_id, target) for target in targets}
    if all(counts.sealed for counts in before.values()):
        for target, counts in before.items():
            ctx.sealed[target] = (counts.chunks_total, counts.items_total)
            ctx.emit(planned_event(ctx, target, counts))
        return {"chunks": counts.chunks_total, "items": counts.items_total, "resumed": True}
    if ctx.source is None:
        raise UsageError(f"node '{node}' splits the input, but the run has no input data (--data)")
    source = ctx.source
    reader = read_chunks(
        source.stream if source.stream is not None else source.path,
        source.fmt,
        chunk_size,
        data_key=source.data_key,
        display_name=source.path,
        max_record_size=max_record_size,
        hashing=False,  # the run recorded the input's digest when it started
    )
    if source.fmt != "jsonl":
        checker = None  # JSON and CSV are parsed as they are read
    if checker is not None:
        checker.warm_up(ctx.params)  # while the first chunk is read
    splitter = _Splitter(ctx, targets, reader, checker, limit=source.head)
    for target, grouper in _merged_groupers(ctx, targets, before, checker).items():
        if grouper.in_any_order:
            splitter.totalling[target] = (grouper, [])
        else:
            splitter.merging[target] = MergedPartials(grouper.merger())
    await splitter.run()
    for target in targets:
        await ctx.store.seal(ctx.task_id, target)
    for target in targets:
        ctx.sealed[target] = (splitter.chunks, splitter.items)
        ctx.check_sealed(target, await ctx.store.counts(ctx.task_id, target))
    for target in targets:
        await _announce(ctx, target, before[target], splitter)
    ctx.merged.update(splitter.merging)
    return {
        "chunks": splitter.chunks,
        "items": splitter.items,
        "resumed": False,
        "input_size": reader.size,
    }


def _merged_groupers(
    ctx: RunContext,
    targets: list[str],
    before: dict[str, NodeCounts],
    checker: PooledProcessor | None,
) -> dict[str, Grouper]:
    """The grouper of each aggregate whose chunks the workers reduce and this split commits as
    it queues them (not a branch target), in a fresh run (nothing queued for it before): the
    split merges their partials for it (`ctx.merged`)."""
    if checker is None or not checker.job.aggregates:
        return {}
    groupers = build_groupers(loads(checker.job.aggregates), ctx.params)
    return {
        target: grouper
        for target, grouper in groupers.items()
        if target in targets and target not in ctx.gated and before[target].chunks_total == 0
    }


async def _announce(ctx: RunContext, target: str, before: NodeCounts, splitter: _Splitter) -> None:
    """Tell the displays what was queued for `target`: its chunks (done before this coordinator:
    `before`), then each chunk queued done with its partial (the last ones, if a resumed split
    found earlier ones there), as a claim and commit would have."""
    queued = dataclasses.replace(before, chunks_total=splitter.chunks, items_total=splitter.items)
    ctx.emit(planned_event(ctx, target, queued))
    reduced = splitter.reduced.get(target, [])
    added = (await ctx.store.counts(ctx.task_id, target)).done - before.done
    for index, count in reduced[len(reduced) - added :] if added > 0 else []:
        ctx.emit(ChunkDone(at=ctx.now(), node=target, chunk=index, items=count))


class _Splitter:
    """Reads chunks, has them checked (in worker processes, a few at a time, results in input
    order) and queues them in batches."""

    def __init__(
        self,
        ctx: RunContext,
        targets: list[str],
        reader: ChunkReader,
        checker: PooledProcessor | None,
        limit: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.limit = limit
        self.targets = targets
        self.reader = reader
        self.checker = checker
        self.batch: list[tuple[PayloadChunk, dict[str, str]]] = []
        self.queueing: asyncio.Future[None] | None = None
        self.checks: collections.deque[
            tuple[PayloadChunk, asyncio.Future[tuple[int | None, dict[str, str]]]]
        ] = collections.deque()
        self.chunks = self.items = 0
        self.reduced: dict[str, list[tuple[int, int]]] = {}
        """{target: (index, records) of each chunk queued done with its partial}"""
        self.merging: dict[str, MergedPartials] = {}
        """{target: the partials queued for it so far, merged}; a target leaves it when one
        of its chunks comes without a partial, or the partials do not merge (the aggregate
        then merges the stored ones itself, and reports what is wrong)."""
        self.totalling: dict[str, tuple[Grouper, list[int]]] = {}
        """{target whose reducers merge in any order: (its grouper, the first record of each
        chunk queued with its partial)}: each worker merges the partials of the chunks it
        checked, and the totals become the target's merged partials once they account for
        exactly those chunks (`_collect_totals`). Merging every partial here took as much of
        this process's time as reading the input (measured: 76 ms and 72 ms over 1,000,000
        records in 50 chunks of 1,000 groups), on the cores the workers need."""

    async def run(self) -> None:
        try:
            await self._read_all()
            await self._flush()
            if self.queueing is not None:
                await self.queueing
            await self._collect_totals()
        finally:
            for _, unsettled in self.checks:
                unsettled.cancel()
            if self.queueing is not None and not self.queueing.done():
                self.queueing.cancel()

    async def _read_all(self) -> None:
        chunks = self.reader.payload_chunks(check=self.checker is None)
        try:
            await self._read_chunks(chunks)
        finally:
            close = getattr(chunks, "close", None)  # with --head the rest is never read
            if close is not None:
                close()

    async def _read_chunks(self, chunks: Iterator[PayloadChunk]) -> None:
        window = 2 * self.checker.size if self.checker is not None else 0
        read = 0
        while self.limit is None or read < self.limit:
            # Reading (and, without a checker, parsing) is CPU work: keep it off the event loop
            # so that leases elsewhere stay renewed.
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                break
            if self.limit is not None and read + chunk.count > self.limit:
                chunk = _first_records(chunk, self.limit - read)
            read += chunk.count
            if self.checker is None:
                await self._queue(chunk, {})
                continue
            check = asyncio.ensure_future(
                self.checker.check_jsonl(chunk.payload, chunk.first_record, list(self.totalling))
            )
            self.checks.append((chunk, check))
            while self.checks and (len(self.checks) > window or self.checks[0][1].done()):
                await self._settle()
        while self.checks:
            await self._settle()

    async def _settle(self) -> None:
        chunk, check = self.checks.popleft()
        bad, partials = await check
        if bad is not None:
            raise self.reader.jsonl_error(chunk, bad)
        await self._queue(chunk, partials)

    async def _queue(self, chunk: PayloadChunk, partials: dict[str, str]) -> None:
        """`partials`: {aggregate: its partial of the chunk}, queued for it instead of the lines."""
        self.batch.append((chunk, partials))
        for target in partials:
            self.reduced.setdefault(target, []).append((chunk.index, chunk.count))
        for target, merged in list(self.merging.items()):
            text = partials.get(target)
            try:
                if text is None or not merged.merger.add_stored(text, target):
                    raise GroupingError("a chunk queued without its partial")
            except GroupingError:
                del self.merging[target]
            else:
                merged.chunks += 1
        for target, (_, firsts) in list(self.totalling.items()):
            if target in partials:
                firsts.append(chunk.first_record)
            else:
                del self.totalling[target]
        self.chunks += 1
        self.items += chunk.count
        if len(self.batch) >= QUEUE_BATCH:
            await self._flush()

    async def _collect_totals(self) -> None:
        """Take the workers' running totals as the merged partials of each target they account
        for exactly: every chunk queued with its partial, once (a worker that died, or failed a
        merge, leaves chunks out, and the aggregate merges the stored partials instead)."""
        if not self.totalling or self.checker is None:
            return
        totals = await self.checker.collect_totals()
        for target, (grouper, firsts) in self.totalling.items():
            dumps = []
            try:
                for found in totals:
                    if target in found:
                        dumps.append(load_partials(found[target]))
                merged = [first for total in dumps for first in total["chunks"]]
                if sorted(merged) != sorted(firsts):
                    continue
                merger = merge_totals(grouper, dumps)
            except (GroupingError, KeyError, TypeError, ValueError):
                continue
            self.merging[target] = MergedPartials(merger, chunks=len(firsts))

    async def _flush(self) -> None:
        """Hand the batch to the store in the background, one batch at a time, in order."""
        if self.queueing is not None:
            await self.queueing
            self.queueing = None
        if self.batch:
            self.queueing = asyncio.ensure_future(_queue(self.ctx, self.targets, self.batch))
            self.batch = []


def _first_records(chunk: PayloadChunk, count: int) -> PayloadChunk:
    """The chunk cut after its first `count` records (one JSON line each in its payload)."""
    lines = chunk.payload.split(b"\n")[:count]
    return dataclasses.replace(chunk, count=count, payload=b"\n".join(lines) + b"\n")


async def _queue(
    ctx: RunContext, targets: list[str], batch: list[tuple[PayloadChunk, dict[str, str]]]
) -> None:
    """Queue a batch of chunks for each target; a chunk whose partial the target has is added
    committed with it (nothing left to claim), the others as their lines."""
    for target in targets:
        gated = target in ctx.gated
        specs = [_spec(chunk, partials.get(target), gated) for chunk, partials in batch]
        await ctx.store.add_chunks(ctx.task_id, target, specs)


def _spec(chunk: PayloadChunk, partial: str | None, gated: bool) -> ChunkSpec:
    """The chunk as its lines; or, with the target's partial, waiting as that partial (a branch
    target, which may never run, commits nothing before it is chosen) or added committed."""
    if partial is None:
        return ChunkSpec(chunk.index, chunk.first_record, chunk.count, chunk.payload)
    text = partial.encode()
    return ChunkSpec(
        chunk.index,
        chunk.first_record,
        chunk.count,
        PARTIAL_PAYLOAD + text,
        partial=b"" if gated else text,
    )
