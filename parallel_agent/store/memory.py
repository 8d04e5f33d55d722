"""In-process run store (`memory://`): for tests and throw-away runs; gone when the process ends.

One asyncio lock makes every method atomic, which is the whole concurrency story here. Claims scan
the node's pending chunks, so this store suits thousands of chunks, not millions.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from parallel_agent.store.base import (
    CANCELLED,
    ChunkResult,
    ChunkSpec,
    ChunkState,
    FailedChunk,
    Lease,
    NodeCounts,
    RunInfo,
    RunStore,
    lease_expired_error,
    run_cancelled,
    run_missing,
)

RESULTS_BATCH = 256


@dataclass
class _Chunk:
    index: int
    first_record: int
    count: int
    payload: bytes
    records: bytes = b""
    state: ChunkState = ChunkState.PENDING
    token: int = 0
    attempt: int = 0
    not_before: float = 0.0
    owner: str | None = None
    expires_at: float = 0.0
    error: str = ""
    result: bytes = b""
    errors: bytes = b""
    result_records: bytes = b""
    partial: bytes = b""
    outputs: int = 0
    items_ok: int = 0
    items_failed: int = 0
    duration_s: float = 0.0


@dataclass
class _Node:
    chunks: dict[int, _Chunk]
    sealed: bool = False
    retries: int = 0


@dataclass
class _Task:
    info: RunInfo
    nodes: dict[str, _Node]


class MemoryStore(RunStore):
    """Dicts behind one asyncio lock; same observable behaviour as the SQLite and Redis stores."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._tasks: dict[str, _Task] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._mutex = asyncio.Lock()

    async def open(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release; the data lives as long as this object."""

    # -- runs ------------------------------------------------------------------------------------

    async def create_run(self, info: RunInfo) -> bool:
        async with self._mutex:
            existing = self._tasks.get(info.task_id)
            if existing is not None:
                return existing.info.generation == info.generation
            self._tasks[info.task_id] = _Task(copy.deepcopy(info), {})
            return True

    async def get_run(self, task_id: str) -> RunInfo | None:
        async with self._mutex:
            task = self._tasks.get(task_id)
            return None if task is None else copy.deepcopy(task.info)

    async def update_run(
        self,
        task_id: str,
        *,
        status: str | None = None,
        finished_at: float | None = None,
        output_path: str | None = None,
        extra: dict[str, Any] | None = None,
        unless_cancelled: bool = False,
    ) -> str:
        async with self._mutex:
            task = self._task(task_id)
            changes: dict[str, Any] = {"updated_at": self._now()}
            if status is not None and not (unless_cancelled and task.info.status == CANCELLED):
                changes["status"] = status
            if finished_at is not None:
                changes["finished_at"] = finished_at
            if output_path is not None:
                changes["output_path"] = output_path
            if extra:
                changes["extra"] = {**task.info.extra, **copy.deepcopy(extra)}
            task.info = replace(task.info, **changes)
            return task.info.status

    async def add_to_count(self, task_id: str, key: str, amount: int) -> int:
        async with self._mutex:
            task = self._task(task_id)
            value = int(task.info.extra.get(key) or 0) + amount
            task.info = replace(task.info, extra={**task.info.extra, key: value})
            return value

    async def list_runs(self) -> list[RunInfo]:
        async with self._mutex:
            infos = [copy.deepcopy(task.info) for task in self._tasks.values()]
        return sorted(infos, key=lambda info: info.created_at)

    async def delete_run(self, task_id: str) -> None:
        async with self._mutex:
            self._tasks.pop(task_id, None)
            self._locks.pop(task_id, None)

    # -- lock ------------------------------------------------------------------------------------

    async def acquire_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        async with self._mutex:
            now = self._now()
            holder = self._locks.get(task_id)
            if holder is not None and holder[0] != owner and holder[1] > now:
                return False
            self._locks[task_id] = (owner, now + ttl_s)
            return True

    async def renew_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        async with self._mutex:
            now = self._now()
            holder = self._locks.get(task_id)
            if holder is None or holder[0] != owner or holder[1] <= now:
                return False
            self._locks[task_id] = (owner, now + ttl_s)
            return True

    async def lock_holder(self, task_id: str) -> str | None:
        async with self._mutex:
            holder = self._locks.get(task_id)
            return holder[0] if holder is not None and holder[1] > self._now() else None

    async def lock_state(self, task_id: str) -> tuple[str, float] | None:
        async with self._mutex:
            holder = self._locks.get(task_id)
            now = self._now()
            return (holder[0], holder[1] - now) if holder is not None and holder[1] > now else None

    async def release_lock(self, task_id: str, owner: str) -> None:
        async with self._mutex:
            holder = self._locks.get(task_id)
            if holder is not None and holder[0] == owner:
                del self._locks[task_id]

    # -- chunks ----------------------------------------------------------------------------------

    async def add_chunks(self, task_id: str, node: str, chunks: Sequence[ChunkSpec]) -> None:
        if not chunks:
            return
        async with self._mutex:
            state = self._node(task_id, node, create=True)
            cancelled = self._task(task_id).info.status == CANCELLED
            for spec in chunks:
                if spec.index in state.chunks:
                    continue
                if not spec.partial or cancelled:
                    state.chunks[spec.index] = _Chunk(
                        spec.index, spec.first_record, spec.count, spec.payload, spec.records
                    )
                    continue
                state.chunks[spec.index] = _Chunk(
                    spec.index,
                    spec.first_record,
                    spec.count,
                    b"",
                    state=ChunkState.DONE,
                    errors=b"[]",
                    result_records=spec.records,
                    partial=spec.partial,
                    outputs=spec.count,
                    items_ok=spec.count,
                )

    async def seal(self, task_id: str, node: str) -> None:
        async with self._mutex:
            self._node(task_id, node, create=True).sealed = True

    async def claim(
        self,
        task_id: str,
        node: str,
        owner: str,
        *,
        lease_s: float,
        limit: int = 1,
        max_attempts: int = 3,
        now: float | None = None,
    ) -> list[Lease]:
        async with self._mutex:
            state = self._node(task_id, node)
            if self._task(task_id).info.status == CANCELLED:
                raise run_cancelled(task_id)
            at = self._now() if now is None else now
            candidates: list[_Chunk] = []
            for chunk in state.chunks.values():
                if chunk.state is ChunkState.LEASED and chunk.expires_at <= at:
                    if chunk.attempt >= max_attempts:
                        chunk.state = ChunkState.FAILED
                        chunk.error = lease_expired_error(chunk.attempt)
                        chunk.owner = None
                    else:
                        candidates.append(chunk)
                elif chunk.state is ChunkState.PENDING and chunk.not_before <= at:
                    candidates.append(chunk)
            leases: list[Lease] = []
            for chunk in heapq.nsmallest(limit, candidates, key=lambda c: c.index):
                chunk.state = ChunkState.LEASED
                chunk.token += 1
                chunk.attempt += 1
                chunk.owner = owner
                chunk.expires_at = at + lease_s
                if chunk.attempt > 1:
                    state.retries += 1
                leases.append(_lease(task_id, node, chunk, owner))
            return leases

    async def renew(self, lease: Lease, lease_s: float, *, now: float | None = None) -> bool:
        async with self._mutex:
            chunk = self._current(lease)
            if chunk is None:
                return False
            chunk.expires_at = (self._now() if now is None else now) + lease_s
            return True

    async def commit(
        self,
        lease: Lease,
        *,
        result: bytes,
        errors: bytes,
        items_ok: int,
        items_failed: int,
        duration_s: float,
        records: bytes = b"",
        partial: bytes = b"",
        outputs: int | None = None,
    ) -> bool:
        async with self._mutex:
            chunk = self._node(lease.task_id, lease.node).chunks.get(lease.index)
            if chunk is None or chunk.token != lease.token:
                return False
            if chunk.state is ChunkState.DONE:
                return True
            if chunk.state is not ChunkState.LEASED:
                return False
            chunk.state = ChunkState.DONE
            chunk.owner = None
            chunk.result, chunk.errors, chunk.result_records = result, errors, records
            chunk.partial = partial
            chunk.outputs = items_ok if outputs is None else outputs
            chunk.items_ok, chunk.items_failed = items_ok, items_failed
            chunk.duration_s = duration_s
            chunk.payload = b""
            return True

    async def fail(
        self, lease: Lease, error: str, *, retry_in_s: float | None, now: float | None = None
    ) -> ChunkState:
        async with self._mutex:
            chunk = self._node(lease.task_id, lease.node).chunks.get(lease.index)
            if chunk is None:
                return ChunkState.FAILED
            if chunk.state is not ChunkState.LEASED or chunk.token != lease.token:
                return chunk.state
            chunk.error = error
            chunk.owner = None
            if retry_in_s is None:
                chunk.state = ChunkState.FAILED
            else:
                chunk.state = ChunkState.PENDING
                chunk.not_before = (self._now() if now is None else now) + retry_in_s
            return chunk.state

    async def release(self, lease: Lease) -> None:
        async with self._mutex:
            chunk = self._current(lease)
            if chunk is None:
                return
            if chunk.attempt > 1:
                self._node(lease.task_id, lease.node).retries -= 1
            chunk.state = ChunkState.PENDING
            chunk.attempt -= 1
            chunk.owner = None
            chunk.not_before = 0.0

    async def counts(self, task_id: str, node: str) -> NodeCounts:
        async with self._mutex:
            state = self._node(task_id, node)
            by_state = dict.fromkeys(ChunkState, 0)
            items_done = items_failed = items_out = 0
            for chunk in state.chunks.values():
                by_state[chunk.state] += 1
                items_done += chunk.items_ok
                items_failed += chunk.items_failed
                items_out += chunk.outputs
            return NodeCounts(
                chunks_total=len(state.chunks),
                pending=by_state[ChunkState.PENDING],
                leased=by_state[ChunkState.LEASED],
                done=by_state[ChunkState.DONE],
                failed=by_state[ChunkState.FAILED],
                items_total=sum(chunk.count for chunk in state.chunks.values()),
                items_done=items_done,
                items_failed=items_failed,
                retries=state.retries,
                sealed=state.sealed,
                items_out=items_out,
            )

    async def nodes(self, task_id: str) -> list[str]:
        async with self._mutex:
            task = self._tasks.get(task_id)
            return [] if task is None else list(task.nodes)

    async def results(self, task_id: str, node: str) -> AsyncIterator[ChunkResult]:
        after = -1
        while True:
            async with self._mutex:
                task = self._tasks.get(task_id)
                state = task.nodes.get(node) if task is not None else None
                chunks = [] if state is None else list(state.chunks.values())
                batch = heapq.nsmallest(
                    RESULTS_BATCH,
                    (c for c in chunks if c.state is ChunkState.DONE and c.index > after),
                    key=lambda c: c.index,
                )
                results = [_result(chunk) for chunk in batch]
            for result in results:
                yield result
            if len(results) < RESULTS_BATCH:
                return
            after = results[-1].index

    async def failed_chunks(self, task_id: str, node: str) -> list[FailedChunk]:
        async with self._mutex:
            chunks = self._node_or_empty(task_id, node).chunks.values()
            return [
                FailedChunk(
                    c.index, c.first_record, c.count, c.payload, c.error, c.attempt, c.records
                )
                for c in sorted(chunks, key=lambda c: c.index)
                if c.state is ChunkState.FAILED
            ]

    async def retry_failed(self, task_id: str, node: str) -> int:
        async with self._mutex:
            moved = 0
            for chunk in self._node(task_id, node).chunks.values():
                if chunk.state is ChunkState.FAILED:
                    chunk.state = ChunkState.PENDING
                    chunk.attempt = 0
                    chunk.not_before = 0.0
                    moved += 1
            return moved

    async def chunk_durations(self, task_id: str, node: str) -> list[float]:
        async with self._mutex:
            chunks = self._node_or_empty(task_id, node).chunks.values()
            return [
                c.duration_s
                for c in sorted(chunks, key=lambda c: c.index)
                if c.state is ChunkState.DONE
            ]

    # -- internals -------------------------------------------------------------------------------

    def _task(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise run_missing(self.url, task_id)
        return task

    def _node(self, task_id: str, node: str, *, create: bool = False) -> _Node:
        """The node's state; a node only comes into being through add_chunks or seal."""
        task = self._task(task_id)
        if create:
            return task.nodes.setdefault(node, _Node({}))
        return task.nodes.get(node) or _Node({})

    def _node_or_empty(self, task_id: str, node: str) -> _Node:
        task = self._tasks.get(task_id)
        return (task.nodes.get(node) if task is not None else None) or _Node({})

    def _current(self, lease: Lease) -> _Chunk | None:
        """The chunk if it is still LEASED under this lease's token."""
        chunk = self._node(lease.task_id, lease.node).chunks.get(lease.index)
        if chunk is None or chunk.state is not ChunkState.LEASED or chunk.token != lease.token:
            return None
        return chunk


def _lease(task_id: str, node: str, chunk: _Chunk, owner: str) -> Lease:
    return Lease(
        task_id=task_id,
        node=node,
        index=chunk.index,
        token=chunk.token,
        owner=owner,
        first_record=chunk.first_record,
        count=chunk.count,
        payload=chunk.payload,
        attempt=chunk.attempt,
        expires_at=chunk.expires_at,
        records=chunk.records,
    )


def _result(chunk: _Chunk) -> ChunkResult:
    return ChunkResult(
        index=chunk.index,
        first_record=chunk.first_record,
        count=chunk.count,
        result=chunk.result,
        errors=chunk.errors,
        items_ok=chunk.items_ok,
        items_failed=chunk.items_failed,
        duration_s=chunk.duration_s,
        attempt=chunk.attempt,
        records=chunk.result_records,
        partial=chunk.partial,
    )
