"""The chunk worker loop on its own: a lease heartbeat that cannot be stopped by cancel() (Python
3.11's `asyncio.wait_for`, which redis-py uses for every socket write, can swallow a cancel that
arrives as the write completes) must still stop when its chunk is done."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from helpers.runs import make_info

from parallel_agent.errors import UsageError
from parallel_agent.modules.chunks import ChunkWorkers, NodeSettings, feed_from_producer
from parallel_agent.modules.context import RunContext
from parallel_agent.modules.items import ChunkOutcome
from parallel_agent.store.base import ChunkSpec, Lease
from parallel_agent.store.memory import MemoryStore

NODE = "map"
#: Outer bound of the whole run: a liveness bound, never a speed one.
DEADLINE_S = 20.0


class CancelSwallowingStore(MemoryStore):
    """Each renewal takes a while, and the first cancel that reaches one is ignored, like a
    redis-py call whose wait_for swallowed it; `renewing` is set while one is in flight."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.renewing = asyncio.Event()
        self.swallowed = 0

    async def renew(self, lease: Lease, lease_s: float, *, now: float | None = None) -> bool:
        self.renewing.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
        self.renewing.clear()
        return await super().renew(lease, lease_s, now=now)


class FinishesDuringARenewal:
    """A processor whose chunk is done exactly while a renewal is in flight."""

    def __init__(self, store: CancelSwallowingStore) -> None:
        self.store = store

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        await self.store.renewing.wait()
        return ChunkOutcome(outputs=[1] * len(numbers))

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to release."""


def test_heartbeat_stops_when_its_chunk_is_done_even_if_a_cancel_is_swallowed() -> None:
    async def main() -> CancelSwallowingStore:
        store = CancelSwallowingStore()
        await store.open()
        await store.create_run(make_info("t"))
        await store.add_chunks("t", NODE, [ChunkSpec(0, 0, 2, b"1\n2\n")])
        await store.seal("t", NODE)
        ctx = RunContext(task_id="t", store=store, owner="me")
        settings = NodeSettings(node=NODE, concurrency=1, lease_s=0.15)
        async with asyncio.timeout(DEADLINE_S):  # the old heartbeat never ended: this fired
            await ChunkWorkers(ctx, settings, FinishesDuringARenewal(store)).run()
        counts = await store.counts("t", NODE)
        assert (counts.done, counts.leased, counts.items_done) == (1, 0, 2)
        return store

    store = asyncio.run(main())
    assert store.swallowed == 0, "the heartbeat is told to stop, never cut off mid-renewal"


class MustNotRun:
    """A processor for chunks that need no processing."""

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        raise AssertionError("an empty chunk was sent to the processor")

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        raise AssertionError("an empty chunk was sent to the processor")

    async def close(self) -> None:
        """Nothing to release."""


def test_a_chunk_emptied_upstream_is_done_without_processing() -> None:
    """A filter upstream dropped every item of chunk 1: it is committed empty at once (a command
    or a batch function never sees an empty chunk, and cannot fail on one)."""

    async def main() -> None:
        store = MemoryStore("memory://")
        await store.open()
        await store.create_run(make_info("t"))
        await store.add_chunks("t", NODE, [ChunkSpec(1, 3, 0, b"", b"[]")])
        await store.seal("t", NODE)
        ctx = RunContext(task_id="t", store=store, owner="me")
        await ChunkWorkers(ctx, NodeSettings(node=NODE), MustNotRun()).run()
        counts = await store.counts("t", NODE)
        assert (counts.done, counts.items_done, counts.items_failed) == (1, 0, 0)

    asyncio.run(main())


def test_results_without_record_numbers_of_an_older_pagent_are_refused() -> None:
    """An older pagent committed a filter's kept items without their record numbers: a resume
    cannot number what follows, so it says so instead of numbering it wrong."""

    async def main() -> None:
        store = MemoryStore("memory://")
        await store.open()
        await store.create_run(make_info("t"))
        await store.add_chunks("t", "keep", [ChunkSpec(0, 0, 3, b"1\n2\n3\n")])
        (lease,) = await store.claim("t", "keep", "old", lease_s=30)
        await store.commit(
            lease, result=b"2\n", errors=b"[]", items_ok=3, items_failed=0, duration_s=0
        )
        ctx = RunContext(task_id="t", store=store, owner="me", producers={NODE: "keep"})
        with pytest.raises(UsageError, match="older pagent.*new --task-id"):
            await feed_from_producer(ctx, NODE)

    asyncio.run(main())
