"""`pagent worker`: a process that helps the runs of a Redis store by working their chunks.

A worker joins the runs whose stored pipeline is one of its own pipeline files (same hash) or that
it was named, once its own code is proved identical to the coordinator's (`app.stored`). It claims
chunks of the map and filter nodes with the node's lease and commits with the lease's fencing
token, exactly like the coordinator's own chunk workers; it never splits, aggregates, writes
output or takes the coordinator lock. It leaves a run when the run ends, and drains on SIGTERM.

Security: without `any_pipeline` it runs only code it holds: a run whose pipeline names a
function, class or command that none of its pipeline files names is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallel_agent.app.common import WORKING_STATES, watch_interval, watch_run
from parallel_agent.app.stored import (
    build_stored_nodes,
    code_mismatch,
    code_references,
    stored_pipeline,
)
from parallel_agent.errors import PagentError, StateLostError, StoreError, UsageError
from parallel_agent.modules.chunks import ChunkWorkers
from parallel_agent.modules.context import (
    HANDBACK_GRACE_S,
    STOP_GRACE_S,
    FailureBudget,
    RunContext,
    stop_loop,
    wait_for_any,
    wait_or_timeout,
)
from parallel_agent.modules.items import ChunkOutcome
from parallel_agent.modules.pool import PooledProcessor
from parallel_agent.modules.processors import ChunkProcessor
from parallel_agent.pipeline import Pipeline, load_pipeline, pipeline_hash
from parallel_agent.pipeline.build import ChunkNode
from parallel_agent.store import open_store
from parallel_agent.store.base import RunInfo, RunStore

#: How long a drained worker waits for its runs to stop: in-flight chunks get HANDBACK_GRACE_S
#: (as in a run), then the chunk workers hand them back; past this, their tasks are cancelled
#: (which hands the chunks back too).
DRAIN_GRACE_S = HANDBACK_GRACE_S + STOP_GRACE_S

#: How often a worker writes its heartbeat, and how long one lives without the next.
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10.0

#: Pause between two looks for runs to join, by task id and by a scan of the store's runs.
NAMED_POLL_S = 0.2
#: How long a worker named a run (`--task-id`) that does not exist waits before saying so.
NO_RUN_GRACE_S = 5.0
SCAN_POLL_S = 1.0

EXIT_OK, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class WorkerOptions:
    """Everything `pagent worker` takes, as a library call."""

    store: str
    pipelines: Sequence[str] = ()
    task_ids: Sequence[str] = ()
    concurrency: int | None = None
    processes: int | None = None
    idle_exit: float | None = None
    any_pipeline: bool = False
    #: seconds between two looks for runs to join: the named runs (one read each) are looked
    #: for often, a scan of every run of the store less so
    poll_s: float | None = None


@dataclass
class WorkerStats:
    """What this worker did, for its heartbeat and its last line."""

    chunks: int = 0
    items: int = 0
    in_flight: int = 0
    last_busy: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)


class _Counted:
    """A processor that counts the chunks it works, for the worker and for the run (a chunk in
    flight is never idle time)."""

    def __init__(self, inner: ChunkProcessor, *stats: WorkerStats) -> None:
        self.inner = inner
        self.stats = stats

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        return await self._counted(self.inner.process_chunk(records, numbers, params), numbers)

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        return await self._counted(self.inner.process_payload(payload, numbers, params), numbers)

    async def _counted(self, work: Any, numbers: Sequence[int]) -> ChunkOutcome:
        for stats in self.stats:
            stats.in_flight += 1
        try:
            outcome: ChunkOutcome = await work
        finally:
            for stats in self.stats:
                stats.in_flight -= 1
                stats.last_busy = time.monotonic()
        for stats in self.stats:
            stats.chunks += 1
            stats.items += len(numbers)
        return outcome

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class _LocalPipeline:
    path: Path
    pipeline: Pipeline
    references: set[tuple[str, ...]]


@dataclass
class _JoinedRun:
    info: RunInfo
    ctx: RunContext
    nodes: list[ChunkNode]
    stats: WorkerStats = field(default_factory=WorkerStats)
    task: asyncio.Task[None] | None = None


class PipelineWorker:
    """One `pagent worker` process: finds runs to join, works them, leaves them."""

    def __init__(self, options: WorkerOptions, say: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.say = say or _say
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.stats = WorkerStats()
        self.started_at = time.time()
        self.joined: dict[str, _JoinedRun] = {}
        self.beat_now = asyncio.Event()
        """Set when the heartbeat should not wait for its interval (a run was joined)."""
        self.refused: set[str] = set()
        self.ended: set[str] = set()
        self.finished_work: dict[str, float | None] = {}
        """Runs left with every chunk done while the run goes on (aggregating): not joined again
        until the run changes (`updated_at`, e.g. a resume with --retry-failed)."""
        self.seen: set[str] = set()
        """Named runs this worker has found in the store: one gone later is store loss."""
        self.waiting_said = False
        self.draining = False
        self.wake = asyncio.Event()
        self.local = [self._load_local(path) for path in options.pipelines]
        self.by_hash = {pipeline_hash(local.pipeline): local for local in self.local}

    @staticmethod
    def _load_local(path: str) -> _LocalPipeline:
        pipeline = load_pipeline(path)
        return _LocalPipeline(Path(path), pipeline, code_references(pipeline))

    def drain(self) -> None:
        """Stop claiming; in-flight chunks get DRAIN_GRACE_S, then are handed back (exit 130)."""
        self.draining = True
        for joined in self.joined.values():
            joined.ctx.request_stop("worker stopping")
        self.wake.set()

    async def serve(self) -> int:
        """Work until the named runs ended, `idle_exit` passed or a drain; the exit code."""
        store = open_store(self.options.store)
        await store.open()
        stopped = asyncio.Event()
        beating = asyncio.ensure_future(self._beat(store, stopped))
        try:
            return await self._serve(store)
        finally:
            await self._leave_all()
            with contextlib.suppress(PagentError):
                await stop_loop(beating, stopped)
            with contextlib.suppress(StoreError):  # gone from `pagent workers` at once
                await store.beat_worker(self.owner, self.heartbeat(), ttl_s=0.001)
            await store.close()

    def heartbeat(self) -> dict[str, Any]:
        """What `pagent workers` and `pagent status` show of this worker."""
        stats = self.stats
        elapsed = max(1e-9, time.monotonic() - stats.started)
        return {
            "worker": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "runs": {
                task_id: {"chunks": joined.stats.chunks, "items": joined.stats.items}
                for task_id, joined in self.joined.items()
            },
            "chunks": stats.chunks,
            "items": stats.items,
            "in_flight": stats.in_flight,
            "items_per_s": round(stats.items / elapsed, 1),
            "draining": self.draining,
        }

    async def _beat(self, store: RunStore, stopped: asyncio.Event) -> None:
        """Beat every HEARTBEAT_S; a missed beat is not fatal (a lost store is seen elsewhere)."""
        while True:
            self.beat_now.clear()
            with contextlib.suppress(StoreError):
                await store.beat_worker(self.owner, self.heartbeat(), ttl_s=HEARTBEAT_TTL_S)
            await wait_for_any([stopped, self.beat_now], HEARTBEAT_S)
            if stopped.is_set():
                return

    async def _serve(self, store: RunStore) -> int:
        options = self.options
        while not self.draining:
            await self._reap()
            await self._discover(store)
            if options.task_ids and not self.joined and self._named_runs_over():
                break
            if options.idle_exit is not None and self._idle_for() >= options.idle_exit:
                self.say(f"idle for {options.idle_exit:g} s: exiting")
                break
            self.wake.clear()
            await wait_or_timeout(self.wake, self._poll_s())
        if self.draining:
            return EXIT_INTERRUPTED
        return EXIT_REFUSED if self.refused else EXIT_OK

    def _poll_s(self) -> float:
        if self.options.poll_s is not None:
            return self.options.poll_s
        return NAMED_POLL_S if self.options.task_ids else SCAN_POLL_S

    def _named_runs_over(self) -> bool:
        over = self.ended | self.refused
        return all(task_id in over for task_id in self.options.task_ids)

    def _idle_for(self) -> float:
        if self.stats.in_flight:
            return 0.0
        return time.monotonic() - self.stats.last_busy

    async def _reap(self) -> None:
        """Forget the runs whose work ended; a run that lost the store ends the worker."""
        for task_id, joined in list(self.joined.items()):
            if joined.task is None or not joined.task.done():
                continue
            del self.joined[task_id]
            self.ended.add(task_id)
            error = joined.task.exception()
            if error is not None:
                raise error
            if joined.ctx.fatal is not None:
                raise joined.ctx.fatal
            if joined.ctx.stop_reason is None:
                self.finished_work[task_id] = None
            self.say(f"left run {task_id} ({joined.ctx.stop_reason or 'its chunks are done'})")

    async def _discover(self, store: RunStore) -> None:
        if self.options.task_ids:
            infos = await self._named_runs(store)
        else:
            infos = await store.list_runs()
        for info in infos:
            task_id = info.task_id
            if task_id in self.joined or task_id in self.refused:
                continue
            if info.status not in WORKING_STATES:
                self.ended.add(task_id)
                self.finished_work.pop(task_id, None)
                continue
            if task_id in self.finished_work:
                seen = self.finished_work[task_id]
                self.finished_work[task_id] = info.updated_at
                if seen is None or seen == info.updated_at:
                    continue
                del self.finished_work[task_id]
            self.ended.discard(task_id)
            await self._consider(store, info)

    async def _named_runs(self, store: RunStore) -> list[RunInfo]:
        """The runs named with `--task-id` that exist. One that existed and is gone is store
        loss (exit 4: a Redis restarted without persistence, a flush, a deleted run). One never
        seen may not have started yet: after NO_RUN_GRACE_S the worker says it waits for it
        (a mistyped task id or store shows up instead of a silent wait)."""
        infos = []
        for task_id in self.options.task_ids:
            info = await store.get_run(task_id)
            if info is not None:
                self.seen.add(task_id)
                infos.append(info)
            elif task_id in self.seen and task_id not in self.ended:
                raise StateLostError(f"the state of task '{task_id}' is gone from {store.url}")
        missing = [t for t in self.options.task_ids if t not in self.seen]
        waited = time.time() - self.started_at
        if missing and not self.waiting_said and waited >= NO_RUN_GRACE_S:
            self.waiting_said = True
            self.say(
                f"no run {', '.join(missing)} in {store.url} yet: waiting for it to start "
                "(check --task-id and --store if it should be running)"
            )
        return infos

    async def _consider(self, store: RunStore, info: RunInfo) -> None:
        """Join `info` if it is ours and our code is its code; refuse it once otherwise."""
        local = self.by_hash.get(info.pipeline_hash)
        named = info.task_id in self.options.task_ids
        if local is None and not named and not self.options.any_pipeline:
            return  # another pipeline's run: not ours
        try:
            pipeline = stored_pipeline(info)
        except UsageError as exc:
            self._refuse(info, str(exc))
            return
        folder = self._pipeline_dir(info, pipeline, local)
        if folder is None:
            missing = sorted(code_references(pipeline) - self._local_references())
            self._refuse(
                info,
                "its pipeline names code none of this worker's --pipeline files names ("
                + ", ".join(" ".join(ref[:2]) for ref in missing)
                + "); give the pipeline file, or --any-pipeline in a trusted setup",
            )
            return
        mismatch = code_mismatch(info.extra.get("code"), pipeline, folder)
        if mismatch is not None:
            self._refuse(info, f"not the coordinator's code: {mismatch}")
            return
        ctx = RunContext(
            task_id=info.task_id,
            store=store,
            owner=self.owner,
            params=info.params,
            failures=FailureBudget(info.extra.get("max_failures")),
        )
        try:
            nodes = build_stored_nodes(
                pipeline,
                folder,
                ctx,
                max_concurrency=self.options.concurrency,
                max_processes=self.options.processes,
            )
        except PagentError as exc:
            self._refuse(info, str(exc))
            return
        self._join(ctx, info, nodes)

    def _local_references(self) -> set[tuple[str, ...]]:
        return set().union(*(local.references for local in self.local))

    def _pipeline_dir(
        self, info: RunInfo, pipeline: Pipeline, local: _LocalPipeline | None
    ) -> Path | None:
        """The folder the run's code is imported from and its commands run in, or None when
        this worker does not hold the code the run names."""
        if local is not None:
            return local.path.parent
        needed = code_references(pipeline)
        for candidate in self.local:
            if needed <= candidate.references:
                return candidate.path.parent
        if self.options.any_pipeline:
            stored_file = Path(str(info.extra.get("pipeline_file") or ""))
            return stored_file.parent if stored_file.is_file() else Path.cwd()
        return None

    def _refuse(self, info: RunInfo, why: str) -> None:
        self.refused.add(info.task_id)
        self.say(f"refusing run {info.task_id}: {why}")

    def _join(self, ctx: RunContext, info: RunInfo, nodes: list[ChunkNode]) -> None:
        for node in nodes:
            if isinstance(node.processor, PooledProcessor):
                node.processor.warm_up(ctx.params)
        joined = _JoinedRun(info, ctx, nodes)
        for node in nodes:
            node.processor = _Counted(node.processor, self.stats, joined.stats)
        joined.task = asyncio.ensure_future(self._work(joined))
        self.joined[info.task_id] = joined
        self.beat_now.set()  # `pagent status` lists it with the run at once
        self.say(f"joined run {info.task_id} ({info.pipeline_name})")

    async def _work(self, joined: _JoinedRun) -> None:
        ctx = joined.ctx
        done = asyncio.Event()
        interval = watch_interval([node.settings.lease_s for node in joined.nodes])
        watcher = asyncio.ensure_future(watch_run(ctx, joined.info.generation, interval, done))
        try:
            async with asyncio.TaskGroup() as group:
                for node in joined.nodes:
                    group.create_task(
                        ChunkWorkers(ctx, node.settings, node.processor, node.aggregates).run()
                    )
        except* StoreError as errors:
            ctx.fail_run(_first_store_error(errors))
        finally:
            with contextlib.suppress(PagentError):
                await stop_loop(watcher, done)
            for node in joined.nodes:
                await node.processor.close()
            self.wake.set()

    async def _leave_all(self) -> None:
        """Stop every joined run; chunks still in flight after the grace are handed back."""
        for joined in self.joined.values():
            joined.ctx.request_stop(joined.ctx.stop_reason or "worker stopping")
        tasks = [j.task for j in self.joined.values() if j.task is not None]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=DRAIN_GRACE_S)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=DRAIN_GRACE_S)


def _first_store_error(group: BaseExceptionGroup[StoreError]) -> StoreError:
    """The first StoreError of a (nested) exception group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, StoreError)
    return first


def _say(line: str) -> None:
    sys.stderr.write(f"pagent worker: {line}\n")
    sys.stderr.flush()


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def check_worker_store(url: str) -> None:
    """A worker meets its coordinator in Redis: other stores are one machine's (exit 2)."""
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise UsageError(
            f"pagent worker needs a Redis store (--store redis://host:6379/0), not {scheme}://: "
            "SQLite and memory stores live in one process or machine, where workers cannot meet"
        )


def run_worker(options: WorkerOptions, say: Callable[[str], None] | None = None) -> int:
    """Run a worker until its runs end (blocking); returns the exit code. SIGINT, SIGTERM and
    SIGHUP drain it (exit 130); a lost store raises StoreError (exit 4)."""
    check_worker_store(options.store)
    if not options.pipelines and not options.any_pipeline:
        raise UsageError("pagent worker needs --pipeline PATH (or --any-pipeline)")

    async def main() -> int:
        worker = PipelineWorker(options, say)
        loop = asyncio.get_running_loop()
        installed = []
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, worker.drain)
                installed.append(signum)
        try:
            return await worker.serve()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    return asyncio.run(main())


def list_workers(store: str) -> list[dict[str, Any]]:
    """The live `pagent worker` processes of a Redis store (from their heartbeats)."""
    from parallel_agent.app.common import with_store

    check_worker_store(store)

    async def action(s: RunStore) -> list[dict[str, Any]]:
        workers = await s.live_workers()
        return sorted(workers, key=lambda w: (str(w.get("host")), int(w.get("pid") or 0)))

    return asyncio.run(with_store(store, action))
