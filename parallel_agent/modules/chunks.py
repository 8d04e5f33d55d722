"""The chunk worker loop shared by `map` and `filter`: claim a chunk with a lease, keep the lease alive
while the processor works, commit the outputs under the lease's fencing token, back off and retry on
failure, and hand the chunk back when the run stops."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any

from parallel_agent.errors import RunCancelledError, StoreError, UsageError
from parallel_agent.events import (
    ChunkDone,
    ChunkFailed,
    ChunksPlanned,
    ChunkStarted,
    ItemFailed,
    Notice,
)
from parallel_agent.jsonl import decode_lines, dumps, encode_lines
from parallel_agent.modules.context import (
    STOP_GRACE_S,
    RunContext,
    stop_loop,
    wait_for_any,
    wait_or_timeout,
)
from parallel_agent.modules.grouping import Grouper, build_groupers, chunk_partials
from parallel_agent.modules.items import ChunkFailure, ChunkOutcome, ItemError, describe
from parallel_agent.modules.processors import ChunkProcessor
from parallel_agent.modules.threads import run_in_thread
from parallel_agent.store.base import ChunkSpec, Lease, NodeCounts, encode_record_numbers

#: How many item errors of one chunk are also sent as events (all are stored).
ITEM_EVENTS_PER_CHUNK = 20
#: Longest pause between two claim attempts while other workers hold the remaining chunks.
MAX_IDLE_POLL_S = 0.5
END_POLL_S = 0.05
"""How often one waiter polls once every chunk of a sealed queue is claimed: the node ends as soon
as the last chunk elsewhere is committed (a 0.5 s poll cost a short run up to 10%)."""
#: Longest backoff between two attempts of one chunk.
MAX_RETRY_DELAY_S = 30.0
#: The run's shared count of failed items (run extra), against `--max-failures`.
FAILED_ITEMS_KEY = "failed_items"


@dataclass(frozen=True)
class NodeSettings:
    """How one data node works its chunks (from the node's `node_config`)."""

    node: str
    concurrency: int = 4
    max_attempts: int = 3
    retry_delay: float = 0.5
    timeout: float | None = None
    on_error: str = "skip"
    lease_s: float = 30.0


def retry_delay(settings: NodeSettings, attempt: int) -> float:
    """Exponential backoff with full jitter between attempts of a chunk."""
    ceiling = min(MAX_RETRY_DELAY_S, settings.retry_delay * (2 ** max(0, attempt - 1)))
    return random.uniform(ceiling / 2, ceiling) if ceiling > 0 else 0.0


async def feed_from_producer(ctx: RunContext, node: str) -> None:
    """Queue the producer's committed outputs as this node's chunks (idempotent, so a resume may
    call it again), then seal the queue and tell the displays how much it holds."""
    store = ctx.store
    counts = await store.counts(ctx.task_id, node)
    if not counts.sealed:
        await _queue_producer_results(ctx, node)
        counts = await store.counts(ctx.task_id, node)
    ctx.sealed[node] = (counts.chunks_total, counts.items_total)
    ctx.check_sealed(node, counts)
    ctx.emit(planned_event(ctx, node, counts))


def planned_event(ctx: RunContext, node: str, counts: NodeCounts) -> ChunksPlanned:
    """A node's queue as the store holds it when this coordinator starts on it: on a resume,
    the chunks and items finished before count as done, so displays show the run's totals."""
    return ChunksPlanned(
        at=ctx.now(),
        node=node,
        chunks=counts.chunks_total,
        items=counts.items_total,
        chunks_done=counts.done,
        chunks_failed=counts.failed,
        items_done=counts.items_done,
        items_failed=counts.items_failed,
    )


async def _queue_producer_results(ctx: RunContext, node: str) -> None:
    store = ctx.store
    producer = ctx.producers[node]
    batch: list[ChunkSpec] = []
    async for result in store.results(ctx.task_id, producer):
        # A chunk's results are JSON Lines, the form its consumer's payload takes, and keep the
        # input record numbers of their items.
        if not result.records and result.result.count(b"\n") != result.count:
            raise UsageError(
                f"task '{ctx.task_id}' was started by an older pagent that did not keep the "
                f"record numbers of node '{producer}''s outputs; run it again with a new --task-id"
            )
        numbers = result.numbers
        records = encode_record_numbers(result.first_record, numbers)
        batch.append(
            ChunkSpec(result.index, result.first_record, len(numbers), result.result, records)
        )
        if len(batch) >= 64:
            await store.add_chunks(ctx.task_id, node, batch)
            batch = []
    if batch:
        await store.add_chunks(ctx.task_id, node, batch)
    await store.seal(ctx.task_id, node)


NO_WORKER_GRACE_S = 5.0
"""How long a `--workers-only` node waits for a `pagent worker` to join before saying none has."""
FLEET_CHECK_S = 2.0
"""How often it looks at the workers' heartbeats (they beat every 2 s)."""


class _FleetWatch:
    """Says when no `pagent worker` works on a `--workers-only` run, and when work goes on again
    (a worker beats with the run, or chunks get committed). The run keeps waiting either way: a
    fleet may start later (a queued batch job, a scale-up)."""

    def __init__(self, ctx: RunContext, node: str) -> None:
        self.ctx = ctx
        self.node = node
        self.next_check = time.monotonic() + NO_WORKER_GRACE_S
        self.done_when_alone: int | None = None
        """The node's chunks done when it said no worker works on it; None while some do."""
        self.done_at_check = 0

    async def check(self, done: int) -> None:
        ctx = self.ctx
        if self.done_when_alone is not None and done > self.done_when_alone:
            self._working_again()
            return
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + FLEET_CHECK_S
        live = await ctx.store.live_workers()
        working = [w for w in live if ctx.task_id in (w.get("runs") or {})]
        progressed, self.done_at_check = done > self.done_at_check, done
        if (working or progressed) and self.done_when_alone is not None:
            self._working_again(sorted({str(w.get("host")) for w in working}))
        elif not (working or progressed) and self.done_when_alone is None:
            self.done_when_alone = done
            others = f" ({len(live)} live workers serve other runs or refused it)" if live else ""
            self._say(
                f"no `pagent worker` is working on run {ctx.task_id}{others}: node {self.node} "
                "waits for one (start `pagent worker --store ... --pipeline ...` on a host that "
                "reaches this store)"
            )

    def _working_again(self, hosts: list[str] | None = None) -> None:
        self.done_when_alone = None
        where = f" (on {', '.join(hosts)})" if hosts else ""
        self._say(f"`pagent worker`s are working on run {self.ctx.task_id} again{where}")

    def _say(self, message: str) -> None:
        self.ctx.emit(Notice(at=time.time(), task_id=self.ctx.task_id, message=message))


class ChunkWorkers:
    """Runs `settings.concurrency` workers over one node's chunk queue until it is drained."""

    def __init__(
        self,
        ctx: RunContext,
        settings: NodeSettings,
        processor: ChunkProcessor,
        aggregates: dict[str, dict[str, Any]] | None = None,
        coordinator_only: bool = False,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.processor = processor
        self.coordinator_only = coordinator_only
        """Chunks `pagent worker`s never take (a split-fed aggregate's): worked here even on a
        `--workers-only` coordinator."""
        self.groupers: dict[str, Grouper] = build_groupers(aggregates or {}, ctx.params)
        """The consuming aggregates whose partials are computed with each chunk (a pooled
        processor's workers compute them themselves)."""
        self.progress = asyncio.Event()
        """Set (and replaced) each time a worker of this node here is done with a chunk."""

    async def run(self) -> None:
        if not self.ctx.claims_chunks and not self.coordinator_only:
            await self._wait_for_others()
        else:
            counts = await self.ctx.store.counts(self.ctx.task_id, self.settings.node)
            self.ctx.check_sealed(self.settings.node, counts)
            # More workers than open chunks would only poll the store; a sealed queue cannot grow.
            open_chunks = counts.pending + counts.leased
            workers = min(self.settings.concurrency, open_chunks) if counts.sealed else None
            async with asyncio.TaskGroup() as group:
                for number in range(workers if workers is not None else self.settings.concurrency):
                    group.create_task(self._worker(number))
        if not self.ctx.stop.is_set():  # every chunk done or failed: none may open again
            self.ctx.drained.add(self.settings.node)

    async def _worker(self, number: int) -> None:
        """Work chunks until the queue is drained or the run stops; a store failure or a cancel
        stops the whole run (never an ExceptionGroup out of the task group)."""
        try:
            await self._work_queue(number)
        except RunCancelledError:
            self.ctx.request_stop("cancelled", kind="cancel")
        except StoreError as exc:
            self.ctx.fail_run(exc)

    async def _work_queue(self, number: int) -> None:
        ctx, settings = self.ctx, self.settings
        owner = f"{ctx.owner}/{settings.node}/{number}"
        idle = 0.01
        while not ctx.stop.is_set():
            leases = await ctx.store.claim(
                ctx.task_id,
                settings.node,
                owner,
                lease_s=settings.lease_s,
                limit=1,
                max_attempts=settings.max_attempts,
            )
            if not leases:
                counts = await ctx.store.counts(ctx.task_id, settings.node)
                ctx.check_sealed(settings.node, counts)
                if counts.sealed and counts.pending == 0 and counts.leased == 0:
                    return
                await self._idle(idle)
                near_end = counts.sealed and counts.pending == 0 and number == 0
                idle = min(END_POLL_S if near_end else MAX_IDLE_POLL_S, idle * 2)
                continue
            idle = 0.01
            for lease in leases:
                await self._handle(lease)

    async def _wait_for_others(self) -> None:
        """Wait until workers elsewhere have drained the node's queue, or the run stops."""
        ctx = self.ctx
        fleet = _FleetWatch(ctx, self.settings.node)
        while not ctx.stop.is_set():
            counts = await ctx.store.counts(ctx.task_id, self.settings.node)
            ctx.check_sealed(self.settings.node, counts)
            if counts.sealed and counts.pending == 0 and counts.leased == 0:
                return
            await fleet.check(counts.done)
            near_end = counts.sealed and counts.pending == 0
            await self._idle(END_POLL_S if near_end else MAX_IDLE_POLL_S)

    async def _idle(self, seconds: float) -> None:
        """Wait before claiming again: until the run stops, one of this node's workers here
        finishes a chunk (the queue may have drained), or `seconds` pass (workers elsewhere)."""
        await wait_for_any([self.ctx.stop, self.progress], seconds)

    async def _handle(self, lease: Lease) -> None:
        try:
            await self._work(lease)
        finally:
            self.progress.set()
            self.progress = asyncio.Event()

    async def _work(self, lease: Lease) -> None:
        started = time.monotonic()
        self.ctx.emit(
            ChunkStarted(
                at=time.time(),
                node=self.settings.node,
                chunk=lease.index,
                items=lease.count,
                attempt=lease.attempt,
            )
        )
        try:
            # A chunk whose every item was dropped upstream has nothing to process.
            outcome = await self._process_with_lease(lease) if lease.count else ChunkOutcome()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.ctx.store.release(lease))
            raise
        except Exception as exc:  # every chunk error is retried
            await self._fail(lease, self._describe(exc), time.monotonic() - started)
            return
        if outcome is None:
            return
        await self._commit(lease, outcome, time.monotonic() - started)

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError):
            return f"timed out after {self.settings.timeout:g} s"
        return str(exc) if isinstance(exc, ChunkFailure) else describe(exc)

    async def _process_with_lease(self, lease: Lease) -> ChunkOutcome | None:
        """Run the processor while a heartbeat renews the lease; None if the lease was lost, or
        if the run stopped and the chunk was handed back after the grace."""
        lost, finished = asyncio.Event(), asyncio.Event()
        work = asyncio.ensure_future(self._timed(lease))
        heartbeat = asyncio.ensure_future(self._heartbeat(lease, lost, finished, work))
        handback = asyncio.ensure_future(self.ctx.handback.wait())
        try:
            await asyncio.wait({work, handback}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            await _abandon(work)
            await self.ctx.store.release(lease)
            return None
        except asyncio.CancelledError:
            if lost.is_set():  # the heartbeat lost the lease and cancelled the work
                return None
            await _abandon(work)
            raise
        finally:
            handback.cancel()
            await stop_loop(heartbeat, finished)

    async def _process(self, lease: Lease) -> ChunkOutcome:
        """The processor's outcome, with the consuming aggregates' partials of its outputs."""
        outcome = await self.processor.process_payload(
            lease.payload, lease.numbers, self.ctx.params
        )
        if self.groupers and outcome.partials is None:
            outcome.partials = await run_in_thread(
                chunk_partials, self.groupers, outcome.outputs, lease.numbers, outcome.origins
            )
        return outcome

    async def _timed(self, lease: Lease) -> ChunkOutcome:
        # The processor's coroutine is made here, inside the task: a task cancelled before it
        # starts then leaves no coroutine that was never awaited.
        work = self._process(lease)
        if self.settings.timeout is None:
            return await work
        async with asyncio.timeout(self.settings.timeout):
            return await work

    async def _heartbeat(
        self, lease: Lease, lost: asyncio.Event, finished: asyncio.Event, work: asyncio.Future[Any]
    ) -> None:
        """Renew the lease every third of its length until `finished` is set."""
        interval = max(0.05, self.settings.lease_s / 3)
        while not await wait_or_timeout(finished, interval):
            try:
                renewed = await self.ctx.store.renew(lease, self.settings.lease_s)
            except StoreError as exc:  # past the store's retry budget: the run cannot go on
                self.ctx.fail_run(exc)
                renewed = False
            if not renewed:
                lost.set()
                work.cancel()
                return

    async def _commit(self, lease: Lease, outcome: ChunkOutcome, duration: float) -> None:
        ctx, settings = self.ctx, self.settings
        if outcome.encoded is not None:
            data, unencodable = outcome.encoded, outcome.unencodable
        else:
            data, unencodable = encode_lines(outcome.outputs)
        numbers = lease.numbers
        origins = outcome.origins
        errors = list(outcome.errors)
        if unencodable:
            origins = origins if origins is not None else list(range(lease.count))
            dropped = {position for position, _ in unencodable}
            items = decode_lines(lease.payload)  # rare: name the input of each item it failed
            errors += [
                ItemError(numbers[origins[position]], reason, items[origins[position]])
                for position, reason in unencodable
            ]
            errors.sort(key=_record)
            origins = [o for position, o in enumerate(origins) if position not in dropped]
        # The outputs' input record numbers, for the nodes downstream (and their failures).
        records = lease.records
        if origins is not None:
            records = dumps([numbers[origin] for origin in origins])
        if errors and settings.on_error == "fail_chunk":
            first = errors[0]
            await self._fail(lease, f"record {first.record}: {first.error}", duration)
            return
        committed = await ctx.store.commit(
            lease,
            result=data,
            errors=dumps([error.to_dict() for error in errors]),
            items_ok=lease.count - len(errors),
            items_failed=len(errors),
            duration_s=duration,
            records=records,
            partial=(outcome.partials or "").encode(),
            outputs=len(origins) if origins is not None else lease.count,
        )
        if not committed:
            return
        for error in errors[:ITEM_EVENTS_PER_CHUNK]:
            ctx.emit(
                ItemFailed(
                    at=time.time(), node=settings.node, record=error.record, error=error.error
                )
            )
        ctx.emit(
            ChunkDone(
                at=time.time(),
                node=settings.node,
                chunk=lease.index,
                items=lease.count,
                failed_items=len(errors),
                attempt=lease.attempt,
                duration_s=duration,
            )
        )
        if errors:
            if settings.on_error == "stop":
                await ctx.stop_run(
                    f"record {errors[0].record} failed in node '{settings.node}' "
                    f"(on_error: stop): {errors[0].error}",
                    kind="on_error_stop",
                )
            else:
                await self._count_failures(len(errors))

    async def _fail(self, lease: Lease, error: str, duration: float) -> None:
        ctx, settings = self.ctx, self.settings
        will_retry = lease.attempt < settings.max_attempts
        await ctx.store.fail(
            lease, error, retry_in_s=retry_delay(settings, lease.attempt) if will_retry else None
        )
        ctx.emit(
            ChunkFailed(
                at=time.time(),
                node=settings.node,
                chunk=lease.index,
                attempt=lease.attempt,
                error=error,
                will_retry=will_retry,
                duration_s=duration,
            )
        )
        if not will_retry:
            await self._count_failures(lease.count)

    async def _count_failures(self, count: int) -> None:
        """Add failed items to the run's budget; stop the run once `--max-failures` is passed.
        With a limit the count is kept in the store, so every process of the run shares it."""
        failures = self.ctx.failures
        if failures.limit is None:
            failures.add(count)
            return
        failures.failed = await self.ctx.store.add_to_count(
            self.ctx.task_id, FAILED_ITEMS_KEY, count
        )
        if failures.exceeded:
            await self.ctx.stop_run(
                f"more than {failures.limit} items failed (--max-failures)", kind="max_failures"
            )


def _record(error: ItemError) -> int:
    return error.record


async def _abandon(work: asyncio.Future[Any]) -> None:
    """Cancel a chunk's processing: a thread is told to stop and left behind, a worker process
    or a command is killed. Waits a little for that, never for ever."""
    work.cancel()
    await asyncio.wait({work}, timeout=STOP_GRACE_S)
