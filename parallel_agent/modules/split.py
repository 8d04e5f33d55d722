"""`split`: stream the input and queue it as chunks of `chunk_size` records for the nodes that consume it.

The input is read as a stream (a JSON array too), so memory does not grow with its size. Queuing is
idempotent per chunk index, so a resumed run may split again; a node whose queue is sealed is skipped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from parallel_agent.errors import UsageError
from parallel_agent.events import ChunksPlanned
from parallel_agent.io import read_chunks
from parallel_agent.modules.context import RunContext
from parallel_agent.store.base import ChunkSpec

#: Chunks sent to the store in one call.
QUEUE_BATCH = 32


async def split_input(ctx: RunContext, node: str, chunk_size: int) -> dict[str, Any]:
    """Queue the input as chunks for every consumer of `node`; return what was queued."""
    targets = ctx.consumers.get(node) or [node]
    sealed = [(await ctx.store.counts(ctx.task_id, target)).sealed for target in targets]
    if all(sealed):
        counts = await ctx.store.counts(ctx.task_id, targets[0])
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
    )
    chunks = items = 0
    batch: list[ChunkSpec] = []
    iterator = iter(reader)
    while True:
        # Parsing is CPU work: keep it off the event loop so leases elsewhere stay renewed.
        chunk = await asyncio.to_thread(next, iterator, None)
        if chunk is None:
            break
        batch.append(
            ChunkSpec(
                chunk.index, chunk.first_record, len(chunk.records), orjson.dumps(chunk.records)
            )
        )
        chunks += 1
        items += len(chunk.records)
        if len(batch) >= QUEUE_BATCH:
            await _queue(ctx, targets, batch)
            batch = []
    if batch:
        await _queue(ctx, targets, batch)
    for target in targets:
        await ctx.store.seal(ctx.task_id, target)
    for target in targets:
        ctx.emit(ChunksPlanned(at=ctx.now(), node=target, chunks=chunks, items=items))
    identity = {"input_size": reader.size, "input_hash": reader.sha256}
    return {"chunks": chunks, "items": items, "resumed": False, **identity}


async def _queue(ctx: RunContext, targets: list[str], batch: list[ChunkSpec]) -> None:
    for target in targets:
        await ctx.store.add_chunks(ctx.task_id, target, batch)
