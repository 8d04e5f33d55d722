"""Running a pipeline: take the task's lock, create or reuse the run, execute the graph, finish.

`run_pipeline` and `resume_run` are the library calls behind `pagent run` and `pagent resume`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from parallel_agent import __version__
from parallel_agent.app.common import (
    FINISHED,
    check_input_unchanged,
    check_task_id,
    new_task_id,
    require_run,
    resolve_store_url,
    store_file,
    watch_interval,
    watch_run,
    with_store,
)
from parallel_agent.app.lock_wait import (
    COORDINATOR_TTL_S,
    holder_is_dead,
    holder_is_here,
    take_stale_lock,
)
from parallel_agent.app.outputs import failed_output_format, write_failed_records, write_results
from parallel_agent.app.states import NodeStates
from parallel_agent.app.stored import code_manifest
from parallel_agent.app.summary import RunSummary, node_durations, summarize
from parallel_agent.digest import file_sha256
from parallel_agent.errors import (
    CoordinatorLockLostError,
    InterruptedRunError,
    PagentError,
    PipelineError,
    StateLostError,
    TaskBusyError,
    UsageError,
)
from parallel_agent.events import (
    EventSink,
    MultiSink,
    NodeFinished,
    NodeProgress,
    Notice,
    RunFinished,
    RunStarted,
)
from parallel_agent.graph import TaskStatus
from parallel_agent.io import check_targets, check_writable, detect_format, detect_output_format
from parallel_agent.modules.aggregate import all_stored
from parallel_agent.modules.chunks import FAILED_ITEMS_KEY
from parallel_agent.modules.context import (
    RUN_STOP_KEY,
    FailureBudget,
    InputSource,
    RunContext,
    stop_loop,
    wait_or_timeout,
)
from parallel_agent.pipeline import Pipeline, load_pipeline, pipeline_hash
from parallel_agent.pipeline.build import BuiltPipeline, build_pipeline
from parallel_agent.report import build_report
from parallel_agent.store import open_store
from parallel_agent.store.base import RunInfo, RunStore

#: How often a coordinator on a shared store sends the displays the store's counts.
PROGRESS_S = 1.0


@dataclass
class RunOptions:
    """Everything `pagent run` takes, as a library call."""

    pipeline: str
    data: str | None = None
    data_format: str | None = None
    data_key: str = "data"
    output: str | None = None
    output_format: str | None = None
    task_id: str | None = None
    store: str | None = None
    overrides: Sequence[str] = ()
    max_failures: int | None = None
    #: write the failed input records here, in the input's format, when the run ends
    failed_output: str | None = None
    #: process only the first N input records (a sample); part of the run's identity
    head: int | None = None
    #: `--output-node NODE=PATH`: write other nodes' results too (several sinks)
    output_nodes: Sequence[str] = ()
    stdin: BinaryIO | None = None
    stdout: BinaryIO | None = None
    #: split and aggregate, but leave every chunk to `pagent worker` processes (Redis only)
    workers_only: bool = False


def check_run_paths(
    options: RunOptions, more_outputs: Sequence[tuple[str, str | None]] = ()
) -> None:
    """Refuse (UsageError) before any work an output of the run that is a folder, socket or block
    device, or that resolves to what the run reads (the input, the pipeline, the store file) or to
    another of its outputs (`more_outputs`: what the caller writes, such as `--events`)."""
    check_targets(
        [("--output", options.output), ("--failed-output", options.failed_output), *more_outputs],
        [
            ("--data", options.data),
            ("the pipeline", options.pipeline),
            ("--store", store_file(resolve_store_url(options.store))),
        ],
    )


class _NodeTimes(EventSink):
    """Adds up how long each node ran, for the summary, and keeps each node's last outcome."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}
        self.outcomes: dict[str, tuple[str, str | None]] = {}

    def on_node_finished(self, event: NodeFinished) -> None:
        self.durations[event.node] = self.durations.get(event.node, 0.0) + event.duration_s
        self.outcomes[event.node] = (event.outcome, event.error)


def parse_output_nodes(values: Sequence[str]) -> list[tuple[str, str]]:
    """`--output-node NODE=PATH` values as (node, path); a malformed one is a UsageError."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        node, sep, path = value.partition("=")
        if not sep or not node or not path:
            raise UsageError(f"--output-node {value!r}: expected NODE=PATH")
        if path == "-":
            raise UsageError(f"--output-node {value!r}: give a file (stdout is for --output -)")
        if any(node == seen for seen, _ in pairs):
            raise UsageError(f"--output-node {value!r}: node '{node}' is given twice")
        pairs.append((node, path))
    return pairs


class PipelineRun:
    """One run of a pipeline: prepare (validate everything before any side effect), execute, report."""

    def __init__(self, options: RunOptions, events: EventSink | None = None) -> None:
        self.options = options
        self.timer = _NodeTimes()
        self.engine_stopped: str | None = None
        """Why the engine stopped before the end of the graph (Agent.stopped)."""
        # The displays get the states NodeStates makes true; the timer keeps the engine's own
        # outcomes (whether a node's modules returned), which decide about the outputs.
        self.states = NodeStates(
            events or EventSink(), lambda: self.ctx.stop_kind if self.ctx is not None else None
        )
        self.events: EventSink = MultiSink(self.states, self.timer)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.ctx: RunContext | None = None
        self.interrupted = False
        self.generation: str | None = None
        """The run's generation marker, once the coordinator checked it under its lock."""
        self.store_lost: PagentError | None = None
        """What the lock renewal found before the run context existed (the run then stops)."""

    def interrupt(self) -> None:
        """Stop claiming chunks; in-flight chunks get a short grace (HANDBACK_GRACE_S), then are
        handed back, and the run ends resumable (exit 130)."""
        self.interrupted = True
        if self.ctx is not None:
            self.ctx.request_stop("interrupted", kind="interrupt")

    async def execute(self) -> RunSummary:
        options = self.options
        started = time.monotonic()
        if options.task_id is not None:
            check_task_id(options.task_id)
        pipeline = load_pipeline(options.pipeline, options.overrides)
        source = self._input_source(pipeline)
        output_format = None
        if options.output is not None:
            output_format = detect_output_format(options.output, options.output_format)
        output_nodes = parse_output_nodes(options.output_nodes)
        for _node, path in output_nodes:
            detect_output_format(path)
        if options.failed_output is not None:
            if source is None or source.path == "-":
                raise UsageError(
                    "--failed-output needs --data PATH: failed records are read back from the "
                    "input file"
                )
            if options.failed_output == "-":
                raise UsageError("--failed-output needs a file (stdout carries the results)")
            failed_output_format(options.failed_output, source.fmt)
        check_run_paths(options, [(f"--output-node {node}", path) for node, path in output_nodes])
        if options.output is not None:
            check_writable(options.output)
        if options.failed_output is not None:
            check_writable(options.failed_output, "--failed-output")
        for node, path in output_nodes:
            check_writable(path, f"--output-node {node}")
        store_url = resolve_store_url(options.store)
        if options.workers_only and not store_url.lower().startswith(("redis", "unix")):
            raise UsageError(
                "--workers-only needs a Redis store (--store redis://...) that `pagent worker` "
                "processes share; with this store nobody would process the chunks"
            )
        store = open_store(store_url)
        await store.open()
        try:
            return await self._run_with_store(store, pipeline, source, output_format, started)
        finally:
            await store.close()

    def _input_source(self, pipeline: Pipeline) -> InputSource | None:
        options = self.options
        if options.data is None:
            if any(module.use == "split" for node in pipeline.nodes for module in node.modules):
                raise UsageError(
                    "this pipeline splits input data: pass --data PATH (or - for stdin)"
                )
            return None
        fmt = detect_format(options.data, options.data_format)
        if options.head is not None and options.head < 1:
            raise UsageError(f"--head must be 1 or more, not {options.head}")
        if options.data == "-":
            return InputSource("-", fmt, options.data_key, stream=options.stdin, head=options.head)
        if not Path(options.data).exists():
            raise UsageError(f"--data: no such file: {options.data}")
        if not Path(options.data).is_file():
            raise UsageError(
                f"--data: not a regular file: {options.data} (a run reads a file it can read "
                "again to resume; for a pipe or a device, use --data - and redirect it)"
            )
        return InputSource(options.data, fmt, options.data_key, head=options.head)

    async def _run_with_store(
        self,
        store: RunStore,
        pipeline: Pipeline,
        source: InputSource | None,
        output_format: str | None,
        started: float,
    ) -> RunSummary:
        options = self.options
        task_id = options.task_id or new_task_id()
        digest = pipeline_hash(pipeline)
        existing = await store.get_run(task_id)
        if existing is not None:
            self._check_same_run(existing, digest, source)
            if existing.input_path is not None:
                # Its finished chunks and results came from the input as it was then.
                await asyncio.to_thread(check_input_unchanged, existing)
            if existing.status == "complete":
                summary = await summarize(store, existing)
                summary.reused = True
                if options.output is not None and output_format is not None:
                    summary.items_output = await write_results(
                        store, existing, options.output, output_format, options.stdout
                    )
                    summary.output = options.output
                await self._write_failed(store, existing, summary)
                self.events.emit(
                    RunFinished(
                        at=time.time(),
                        task_id=task_id,
                        status=summary.status,
                        summary=summary.to_dict(),
                    )
                )
                return summary
        if not await self._take_lock(store, task_id):
            holder = await store.lock_holder(task_id)
            raise TaskBusyError(
                f"task '{task_id}' is being run by another coordinator ({holder or 'unknown'})"
            )
        if existing is not None:
            existing = await store.get_run(task_id)  # as it is now that the lock is ours
        done = asyncio.Event()
        keep_lock = asyncio.ensure_future(self._renew_lock(store, task_id, done))
        try:
            if existing is not None:
                # A resume runs today's code: workers compare theirs with this.
                await store.update_run(task_id, extra=self._shared_extra(pipeline))
            info = existing or await self._create_run(store, pipeline, digest, task_id, source)
            return await self._run_graph(
                store, pipeline, info, source, output_format, started, resumed=existing is not None
            )
        finally:
            with contextlib.suppress(PagentError):
                await stop_loop(keep_lock, done)
            with contextlib.suppress(PagentError):
                await store.release_lock(task_id, self.owner)

    async def _take_lock(self, store: RunStore, task_id: str) -> bool:
        """Take the coordinator lock; a lock left by a dead process on this machine is taken over
        at once, one of another host is waited out while it is not renewed (lock_wait.py)."""
        if await store.acquire_lock(task_id, self.owner, COORDINATOR_TTL_S):
            return True
        holder = await store.lock_holder(task_id)
        if holder is None:
            return await store.acquire_lock(task_id, self.owner, COORDINATOR_TTL_S)
        if holder_is_here(holder):
            if not holder_is_dead(holder):
                return False
            await store.release_lock(task_id, holder)
            return await store.acquire_lock(task_id, self.owner, COORDINATOR_TTL_S)

        def say(message: str) -> None:
            self.events.emit(Notice(at=time.time(), task_id=task_id, message=message))

        return await take_stale_lock(store, task_id, self.owner, COORDINATOR_TTL_S, say) == "taken"

    def _check_same_run(self, existing: RunInfo, digest: str, source: InputSource | None) -> None:
        if existing.pipeline_hash != digest:
            raise _different_pipeline(existing.task_id)
        if existing.extra.get("head") != self.options.head:
            before = existing.extra.get("head")
            raise UsageError(
                f"task '{existing.task_id}' was started with "
                + (f"--head {before}" if before else "every record")
                + ", not "
                + (f"--head {self.options.head}" if self.options.head else "every record")
                + "; use a new --task-id"
            )
        path = source.path if source is not None else None
        read_stdin = existing.input_path is None and existing.input_format is not None
        if path == "-" or (path is not None and read_stdin):
            raise UsageError(
                f"task '{existing.task_id}' exists, and standard input cannot be compared with "
                "the input it read (only a file can): use a new --task-id"
            )
        if path is not None and existing.input_path not in (None, str(Path(path).resolve())):
            raise UsageError(
                f"task '{existing.task_id}' was started on {existing.input_path}, not {path}; "
                "use a new --task-id"
            )

    async def _progress(self, store: RunStore, built: BuiltPipeline, done: asyncio.Event) -> None:
        """On a shared store (Redis), send the displays the store's counts every
        PROGRESS_S, so they count the chunks `pagent worker`s commit too."""
        if not store.url.lower().startswith(("redis", "unix")):
            return  # nobody else works on a run in a one-machine store
        while not await wait_or_timeout(done, PROGRESS_S):
            await self._emit_progress(store, built)
        await self._emit_progress(store, built)  # the final counts

    async def _emit_progress(self, store: RunStore, built: BuiltPipeline) -> None:
        for node in built.processing_nodes:
            counts = await store.counts(built.ctx.task_id, node)
            self.events.emit(
                NodeProgress(
                    at=time.time(),
                    node=node,
                    chunks_done=counts.done,
                    items_done=counts.items_done,
                    items_failed=counts.items_failed,
                    in_flight=counts.leased,
                )
            )

    def _shared_extra(self, pipeline: Pipeline) -> dict[str, object]:
        """What every process of the run reads from the store: the code to run, the failure
        budget (counted from zero again by a resume) and no stop yet."""
        return {
            "code": self._code_manifest(pipeline),
            "max_failures": self.options.max_failures,
            FAILED_ITEMS_KEY: 0,
            RUN_STOP_KEY: None,
        }

    def _code_manifest(self, pipeline: Pipeline) -> dict[str, object]:
        """pagent's version and the digests of the code the pipeline runs, for `pagent worker`;
        a module that cannot be found is left to the build to report, with its own message."""
        try:
            return code_manifest(pipeline, Path(self.options.pipeline).parent)
        except PipelineError as exc:
            return {"version": __version__, "digests": None, "error": str(exc)}

    async def _renew_lock(self, store: RunStore, task_id: str, done: asyncio.Event) -> None:
        """Keep the coordinator lock until `done`; stop the run if someone cancelled it, and end
        it (exit 4) if the lock or the run's state is lost or the store stays unreachable."""
        while not await wait_or_timeout(done, COORDINATOR_TTL_S / 3):
            try:
                info = await self._check_still_ours(store, task_id)
            except PagentError as error:
                if self.ctx is None:
                    self.store_lost = error
                else:
                    self.ctx.fail_run(error)
                return
            if info is not None and info.status == TaskStatus.CANCELLED.value and self.ctx:
                self.ctx.request_stop("cancelled", kind="cancel")

    async def _check_still_ours(self, store: RunStore, task_id: str) -> RunInfo | None:
        """Check the run's generation marker and renew the lock: StateLostError when the run is
        gone or recreated (a flush, a restart without persistence, eviction),
        CoordinatorLockLostError when the lock expired, was evicted or was taken over (another
        coordinator may run the task: this one must not go on beside it)."""
        if self.generation is None:
            info = await store.get_run(task_id)
        else:
            info = await store.check_generation(task_id, self.generation)
        if not await store.renew_lock(task_id, self.owner, COORDINATOR_TTL_S):
            holder = await store.lock_holder(task_id)
            raise CoordinatorLockLostError(
                f"the coordinator lock of task '{task_id}' in {store.url} was lost ("
                + (f"now held by {holder}" if holder else "expired or evicted")
                + "): this coordinator stopped without recording a status"
            )
        return info

    async def _create_run(
        self,
        store: RunStore,
        pipeline: Pipeline,
        digest: str,
        task_id: str,
        source: InputSource | None,
    ) -> RunInfo:
        now = time.time()
        path = None if source is None or source.path == "-" else str(Path(source.path).resolve())
        info = RunInfo(
            task_id=task_id,
            pipeline_name=pipeline.name,
            pipeline_hash=digest,
            pipeline_text=pipeline.model_dump_json(by_alias=True),
            input_path=path,
            input_size=Path(path).stat().st_size if path else None,
            input_hash=await asyncio.to_thread(file_sha256, path) if path else None,
            input_format=source.fmt if source else None,
            params=dict(pipeline.task.params),
            status=TaskStatus.WAITING.value,
            created_at=now,
            updated_at=now,
            finished_at=None,
            generation=secrets.token_hex(8),
            output_path=self.options.output,
            extra={
                "pipeline_file": str(Path(self.options.pipeline).resolve()),
                "data_key": self.options.data_key,
                "head": self.options.head,
                "overrides": list(self.options.overrides),
                **self._shared_extra(pipeline),
            },
        )
        if not await store.create_run(info):
            raise TaskBusyError(f"task '{task_id}' was created by another coordinator just now")
        return info

    async def _run_graph(
        self,
        store: RunStore,
        pipeline: Pipeline,
        info: RunInfo,
        source: InputSource | None,
        output_format: str | None,
        started: float,
        *,
        resumed: bool = False,
    ) -> RunSummary:
        options = self.options
        ctx = RunContext(
            task_id=info.task_id,
            store=store,
            owner=self.owner,
            source=source,
            params=dict(pipeline.task.params),
            events=self.events,
            failures=FailureBudget(options.max_failures),
            claims_chunks=not options.workers_only,
        )
        self.ctx = ctx
        await store.check_generation(info.task_id, info.generation)
        self.generation = info.generation
        if self.store_lost is not None:
            ctx.fail_run(self.store_lost)
        if self.interrupted:
            ctx.request_stop("interrupted", kind="interrupt")
        built = build_pipeline(pipeline, ctx, pipeline_dir=Path(options.pipeline).parent)
        self.states.chunked = frozenset(built.processing_nodes)
        for node, _ in parse_output_nodes(options.output_nodes):
            await built.output_plan(node)  # an unknown or non-data node: exit 2 before any work
        self.events.emit(
            RunStarted(
                at=time.time(),
                task_id=info.task_id,
                pipeline=pipeline.name,
                nodes=tuple(node.name for node in pipeline.nodes),
                resumed=resumed,
            )
        )
        await store.update_run(info.task_id, status=TaskStatus.EXECUTING.value)
        leases = [n.node_config.lease for n in pipeline.nodes if n.name in built.processing_nodes]
        watched = asyncio.Event()
        watcher = asyncio.ensure_future(
            watch_run(ctx, info.generation, watch_interval(leases), watched)
        )
        progress = asyncio.ensure_future(self._progress(store, built, watched))
        try:
            async with built.workers():
                task = await built.agent.run_task(built.make_task(info.task_id))
        finally:
            with contextlib.suppress(PagentError):
                await stop_loop(watcher, watched)
            with contextlib.suppress(PagentError):
                await stop_loop(progress, watched)
        if ctx.fatal is not None:
            await self._record_fatal(store, info.task_id, ctx.fatal)
            raise ctx.fatal
        # the lock may have been lost since its last renewal: never write beside another coordinator
        await self._check_still_ours(store, info.task_id)
        if ctx.stop_kind is not None or task.status != TaskStatus.COMPLETE:
            self.states.not_reached(node.name for node in pipeline.nodes)
        else:
            self.states.not_chosen(node.name for node in pipeline.nodes)
        self.engine_stopped = built.agent.stopped
        summary = await self._finish(store, built, info, task.status, task.error, output_format)
        for node, state in self.states.states.items():
            summary.nodes.setdefault(node, {})["state"] = state
        summary.duration_s = time.monotonic() - started
        durations = node_durations(info, self.timer.durations)
        for node, seconds in durations.items():
            summary.nodes.setdefault(node, {})["duration_s"] = round(seconds, 4)
        summary.report = await build_report(
            store,
            info.task_id,
            nodes=[node.name for node in pipeline.nodes],
            durations=durations,
        )
        recorded = await store.update_run(
            info.task_id,
            status=summary.status,
            finished_at=time.time() if summary.status in FINISHED else None,
            extra={"summary": summary.to_dict()},
            unless_cancelled=True,
        )
        if recorded == TaskStatus.CANCELLED.value != summary.status:
            # `pagent cancel` came after the last claim: the run ends cancelled all the same.
            _mark_cancelled(summary)
            await store.update_run(info.task_id, extra={"summary": summary.to_dict()})
        if summary.status in FINISHED:
            # After the run is recorded: a failed write (exit 5) leaves a finished run whose
            # failed records `pagent failures ID --output PATH` can still write.
            await self._write_failed(store, info, summary)
        self.events.emit(
            RunFinished(
                at=time.time(),
                task_id=info.task_id,
                status=summary.status,
                summary=summary.to_dict(),
            )
        )
        if summary.status == TaskStatus.INTERRUPTED.value:
            how = (
                "its in-process store (memory://) is gone with it, so it cannot be resumed"
                if store.url.startswith("memory:")
                else f"resume it with: pagent resume {info.task_id}"
            )
            interrupted = InterruptedRunError(f"run interrupted; {how}")
            interrupted.summary = summary.to_dict()
            raise interrupted
        return summary

    async def _record_fatal(self, store: RunStore, task_id: str, fatal: PagentError) -> None:
        """Record `failed` with the error, unless the task is no longer this coordinator's (its
        lock is lost) or its state is gone (then the error that says so is raised, not this)."""
        if isinstance(fatal, CoordinatorLockLostError):
            return
        try:
            await store.update_run(
                task_id,
                status=TaskStatus.FAILED.value,
                finished_at=time.time(),
                extra={"error": str(fatal)},
                unless_cancelled=True,
            )
        except StateLostError:
            if not isinstance(fatal, StateLostError):
                raise

    async def _write_failed(self, store: RunStore, info: RunInfo, summary: RunSummary) -> None:
        """`--failed-output`: the failed input records, in the input's format."""
        target = self.options.failed_output
        if target is None:
            return
        summary.failed_output_records = await write_failed_records(store, info, target)
        summary.failed_output = target

    async def _finish(
        self,
        store: RunStore,
        built: BuiltPipeline,
        info: RunInfo,
        engine_status: TaskStatus,
        engine_error: str | None,
        output_format: str | None,
    ) -> RunSummary:
        ctx = built.ctx
        ran = [
            n for n in built.main_candidates if self.timer.outcomes.get(n, ("",))[0] == "succeeded"
        ]
        if ran and built.main_node not in ran:  # a branch did not choose it
            built.main_node = ran[0]
        summary = await summarize(store, info, built=built)
        summary.store = store.url
        if await self._ended_early(store, info, ctx, summary, engine_status, engine_error):
            return summary
        try:  # before anything is written: every queue is still all there (lost writes?)
            for node in ctx.sealed:
                ctx.check_sealed(node, await store.counts(info.task_id, node))
        except StateLostError as exc:
            await self._record_fatal(store, info.task_id, exc)
            raise
        stored = await store.get_run(info.task_id)
        for notices in all_stored(stored.extra if stored else {}, "aggregate_notices"):
            summary.notices.extend(notices)
        unfinished = summary.items_total - summary.items_done - summary.items_failed
        if every_item_failed(summary):
            summary.status = TaskStatus.FAILED.value
            summary.error = (
                f"every item failed ({summary.items_failed:,} of {summary.items_total:,})"
            )
            return summary
        if summary.items_failed or summary.chunks_failed or unfinished > 0:
            summary.status = TaskStatus.PARTIAL.value
        else:
            summary.status = TaskStatus.COMPLETE.value
        extra = parse_output_nodes(self.options.output_nodes)
        not_run = self._not_run([built.result_node, *(node for node, _ in extra)])
        if not_run:
            summary.status = TaskStatus.NO_OUTPUT.value
            summary.error = "; ".join(not_run) + "; no output was written"
            return summary
        if self.options.output is not None and output_format is not None:
            summary.items_output = await write_results(
                store, info, self.options.output, output_format, self.options.stdout, built=built
            )
            summary.output = self.options.output
        for node, path in extra:
            rows = await write_results(
                store, info, path, detect_output_format(path), built=built, node=node
            )
            summary.outputs[node] = {"path": path, "rows": rows}
        return summary

    async def _ended_early(
        self,
        store: RunStore,
        info: RunInfo,
        ctx: RunContext,
        summary: RunSummary,
        engine_status: TaskStatus,
        engine_error: str | None,
    ) -> bool:
        """Set the state of a run that stopped before its end (a signal, a cancel, a stop, the
        engine's limits or a failed node); False when it ran to its end."""
        summary.stop_reason = ctx.stop_kind
        if ctx.stop_kind == "interrupt":
            summary.status = TaskStatus.INTERRUPTED.value
            return True
        current = await store.get_run(info.task_id)
        if ctx.stop_kind == "cancel" or (
            current is not None and current.status == TaskStatus.CANCELLED.value
        ):
            _mark_cancelled(summary)
            return True
        if ctx.stop_reason is not None:
            summary.status = TaskStatus.FAILED.value
            summary.error = ctx.stop_reason
            return True
        if engine_status != TaskStatus.COMPLETE:
            summary.status = engine_status.value
            summary.error = engine_error
            if _limit_reached(engine_error):
                summary.stop_reason = "iteration_limit"
            elif self.engine_stopped is not None:  # a condition raised: the graph stopped there
                summary.stop_reason = "error"
            else:  # nodes failed as a whole, but the run went to its end
                summary.stop_reason = None
            if summary.status == TaskStatus.COMPLETE.value:
                summary.status = TaskStatus.FAILED.value
            return True
        return False

    def _not_run(self, nodes: Sequence[str | None]) -> list[str]:
        """Why each output node did not run in this run (a guard, a branch not chosen, an
        upstream failure); empty when they all did."""
        reasons = []
        for node in dict.fromkeys(n for n in nodes if n is not None):
            outcome, error = self.timer.outcomes.get(node, ("not reached", None))
            if outcome == "succeeded":
                continue
            if outcome == "not reached":
                why = "no flow decision chose it"
            elif error:
                why = error
            else:
                why = "its condition was false"
            reasons.append(f"output node '{node}' did not run: {why}")
        return reasons


def _limit_reached(engine_error: str | None) -> bool:
    """True when the engine stopped on `max_total_iterations` or a node's `max_visits`."""
    return bool(engine_error) and any(
        limit in str(engine_error) for limit in ("max_total_iterations", "max_visits")
    )


def _different_pipeline(task_id: str) -> UsageError:
    return UsageError(
        f"task '{task_id}' was started with a different pipeline; use a new --task-id"
    )


def every_item_failed(summary: RunSummary) -> bool:
    """True when items failed and no data node processed a single item successfully."""
    if not summary.items_failed:
        return False
    return all(not counts.get("items_done") for counts in summary.nodes.values())


def _mark_cancelled(summary: RunSummary) -> None:
    summary.status = TaskStatus.CANCELLED.value
    summary.stop_reason = "cancel"
    summary.error = "cancelled by pagent cancel"


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def run_pipeline(options: RunOptions, events: EventSink | None = None) -> RunSummary:
    """Run a pipeline to the end (blocking); SIGINT, SIGTERM and SIGHUP (the terminal closed) stop
    it resumably (InterruptedRunError), unless they were ignored when it started (`nohup`).

    Under the task id of an earlier run, the input must be the one that run read (else
    InputDataError)."""
    run = PipelineRun(options, events)

    async def main() -> RunSummary:
        loop = asyncio.get_running_loop()
        installed = []
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # `nohup`, a background job: whoever started us chose to ignore it
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, run.interrupt)
                installed.append(signum)
        try:
            return await run.execute()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    return asyncio.run(main())


def resume_run(
    task_id: str,
    *,
    output: str | None = None,
    retry_failed: bool = False,
    store: str | None = None,
    events: EventSink | None = None,
    stdout: BinaryIO | None = None,
    failed_output: str | None = None,
) -> RunSummary:
    """Continue an interrupted or failed run, reusing every finished chunk."""

    async def prepare(s: RunStore) -> RunOptions:
        info = await require_run(s, task_id)
        pipeline_file = info.extra.get("pipeline_file")
        if not pipeline_file or not Path(pipeline_file).is_file():
            raise UsageError(f"task '{task_id}': its pipeline file {pipeline_file} is gone")
        if info.input_path is None:
            raise UsageError(f"task '{task_id}' read stdin; it cannot be resumed, run it again")
        check_input_unchanged(info)
        options = RunOptions(
            pipeline=pipeline_file,
            data=info.input_path,
            data_format=info.input_format,
            data_key=info.extra.get("data_key", "data"),
            output=output or info.output_path,
            task_id=task_id,
            store=store,
            stdout=stdout,
            failed_output=failed_output,
            head=info.extra.get("head"),
            overrides=list(info.extra.get("overrides") or []),
        )
        # Everything that can refuse the resume (exit 2) comes before the store changes.
        check_run_paths(options)
        if pipeline_hash(load_pipeline(pipeline_file, options.overrides)) != info.pipeline_hash:
            raise _different_pipeline(task_id)
        if retry_failed:
            for node in await s.nodes(task_id):
                await s.retry_failed(task_id, node)
        ended_short = info.status in FINISHED and info.status != TaskStatus.COMPLETE.value
        if retry_failed or ended_short:
            await s.update_run(task_id, status=TaskStatus.INTERRUPTED.value)
        return options

    options = asyncio.run(with_store(store, prepare))
    return run_pipeline(options, events)
