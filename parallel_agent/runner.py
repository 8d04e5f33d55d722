"""The library API behind the command line: run a pipeline, and later ask about its runs.

This module is the composition root: it picks the store backend from a URL, builds the agent graph
from the pipeline, runs it, writes the output atomically and returns a summary. The CLI is a thin
shell over these functions; scripts and tests call them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from parallel_agent.errors import (
    InputDataError,
    InterruptedRunError,
    PagentError,
    PipelineError,
    TaskBusyError,
    UsageError,
)
from parallel_agent.events import EventSink, MultiSink, NodeFinished, RunFinished, RunStarted
from parallel_agent.graph import TaskStatus
from parallel_agent.io import (
    check_writable,
    detect_format,
    detect_output_format,
    open_writer,
    read_chunks,
    write_records_like_input,
)
from parallel_agent.jsonl import decode_lines
from parallel_agent.modules.context import (
    FailureBudget,
    InputSource,
    RunContext,
    stop_loop,
    wait_or_timeout,
)
from parallel_agent.pipeline import Pipeline, load_pipeline, pipeline_hash
from parallel_agent.pipeline.build import BuiltPipeline, build_pipeline
from parallel_agent.report import (
    RunReport,
    build_report,
    pipeline_node_names,
    read_failures,
)
from parallel_agent.store import default_store_url, open_store
from parallel_agent.store.base import RunInfo, RunStore

T = TypeVar("T")

#: How long a coordinator's claim on a task id lives without renewal (a dead holder's expires).
COORDINATOR_TTL_S = 30.0
FINISHED = {"complete", "partial_failure", "failed", "cancelled"}


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
    stdin: BinaryIO | None = None
    stdout: BinaryIO | None = None


@dataclass
class RunSummary:
    """What a finished run reports (`--json` prints `to_dict()`)."""

    task_id: str
    status: str
    items_total: int = 0
    items_done: int = 0
    items_failed: int = 0
    items_output: int | None = None
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    duration_s: float = 0.0
    output: str | None = None
    store: str = ""
    error: str | None = None
    reused: bool = False
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: RunReport | None = None
    failed_output: str | None = None
    failed_output_records: int | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.status == TaskStatus.COMPLETE.value else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "status": self.status,
            "items": {
                "total": self.items_total,
                "done": self.items_done,
                "failed": self.items_failed,
                "output": self.items_output,
            },
            "chunks": {
                "total": self.chunks_total,
                "done": self.chunks_done,
                "failed": self.chunks_failed,
            },
            "duration_s": round(self.duration_s, 3),
            "output": self.output,
            "store": self.store,
            "error": self.error,
            "reused": self.reused,
            "nodes": self.nodes,
            "report": self.report.to_dict() if self.report is not None else None,
            "failed_output": (
                {"path": self.failed_output, "records": self.failed_output_records}
                if self.failed_output is not None
                else None
            ),
        }


def holder_is_dead(owner: str) -> bool:
    """True when `owner` ("host:pid:nonce") names a process of this machine that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def new_task_id() -> str:
    """A task id that sorts by start time and is unique enough to share a Redis."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def resolve_store_url(url: str | None) -> str:
    """`--store`, else `PAGENT_STORE`, else the embedded SQLite file under the user's state folder."""
    return url or os.environ.get("PAGENT_STORE") or default_store_url()


class _NodeTimes(EventSink):
    """Adds up how long each node ran, for the summary."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    def on_node_finished(self, event: NodeFinished) -> None:
        self.durations[event.node] = self.durations.get(event.node, 0.0) + event.duration_s


class PipelineRun:
    """One run of a pipeline: prepare (validate everything before any side effect), execute, report."""

    def __init__(self, options: RunOptions, events: EventSink | None = None) -> None:
        self.options = options
        self.timer = _NodeTimes()
        self.events: EventSink = MultiSink(events or EventSink(), self.timer)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.ctx: RunContext | None = None
        self.interrupted = False

    def interrupt(self) -> None:
        """Stop claiming chunks; in-flight chunks finish, and the run ends resumable (exit 130)."""
        self.interrupted = True
        if self.ctx is not None:
            self.ctx.request_stop("interrupted")

    async def execute(self) -> RunSummary:
        options = self.options
        started = time.monotonic()
        pipeline = load_pipeline(options.pipeline, options.overrides)
        source = self._input_source(pipeline)
        output_format = None
        if options.output is not None:
            output_format = detect_output_format(options.output, options.output_format)
            if options.output != "-":
                check_writable(options.output)
        if options.failed_output is not None:
            if source is None or source.path == "-":
                raise UsageError(
                    "--failed-output needs --data PATH: failed records are read back from the "
                    "input file"
                )
            if options.failed_output == "-":
                raise UsageError("--failed-output needs a file (stdout carries the results)")
            taken = {Path(source.path).resolve()}
            if options.output is not None and options.output != "-":
                taken.add(Path(options.output).resolve())
            if Path(options.failed_output).resolve() in taken:
                raise UsageError("--failed-output must differ from --data and --output")
            failed_output_format(options.failed_output, source.fmt)
            check_writable(options.failed_output)
        store = open_store(resolve_store_url(options.store))
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
        if options.data == "-":
            return InputSource("-", fmt, options.data_key, stream=options.stdin)
        if not Path(options.data).is_file():
            raise UsageError(f"--data: no such file: {options.data}")
        return InputSource(options.data, fmt, options.data_key)

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
        done = asyncio.Event()
        keep_lock = asyncio.ensure_future(self._renew_lock(store, task_id, done))
        try:
            info = existing or await self._create_run(store, pipeline, digest, task_id, source)
            return await self._run_graph(store, pipeline, info, source, output_format, started)
        finally:
            with contextlib.suppress(PagentError):
                await stop_loop(keep_lock, done)
            with contextlib.suppress(PagentError):
                await store.release_lock(task_id, self.owner)

    async def _take_lock(self, store: RunStore, task_id: str) -> bool:
        """Take the coordinator lock; a lock left by a dead process on this machine is taken over
        at once instead of waiting for it to expire."""
        if await store.acquire_lock(task_id, self.owner, COORDINATOR_TTL_S):
            return True
        holder = await store.lock_holder(task_id)
        if holder is None or not holder_is_dead(holder):
            return False
        await store.release_lock(task_id, holder)
        return await store.acquire_lock(task_id, self.owner, COORDINATOR_TTL_S)

    def _check_same_run(self, existing: RunInfo, digest: str, source: InputSource | None) -> None:
        if existing.pipeline_hash != digest:
            raise UsageError(
                f"task '{existing.task_id}' was started with a different pipeline; "
                "use a new --task-id"
            )
        path = source.path if source is not None else None
        if path not in (None, "-") and existing.input_path not in (None, str(Path(path).resolve())):
            raise UsageError(
                f"task '{existing.task_id}' was started on {existing.input_path}, not {path}; "
                "use a new --task-id"
            )

    async def _renew_lock(self, store: RunStore, task_id: str, done: asyncio.Event) -> None:
        """Keep the coordinator lock until `done`, and stop the run if someone cancelled it."""
        while not await wait_or_timeout(done, COORDINATOR_TTL_S / 3):
            await store.renew_lock(task_id, self.owner, COORDINATOR_TTL_S)
            info = await store.get_run(task_id)
            if info is not None and info.status == TaskStatus.CANCELLED.value and self.ctx:
                self.ctx.request_stop("cancelled")

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
            input_hash=await asyncio.to_thread(hash_file, path) if path else None,
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
        )
        self.ctx = ctx
        if self.interrupted:
            ctx.request_stop("interrupted")
        built = build_pipeline(pipeline, ctx, pipeline_dir=Path(options.pipeline).parent)
        self.events.emit(
            RunStarted(
                at=time.time(),
                task_id=info.task_id,
                pipeline=pipeline.name,
                nodes=tuple(node.name for node in pipeline.nodes),
            )
        )
        await store.update_run(info.task_id, status=TaskStatus.EXECUTING.value)
        async with built.workers():
            task = await built.agent.run_task(built.make_task(info.task_id))
        if ctx.fatal is not None:
            await store.update_run(
                info.task_id,
                status=TaskStatus.FAILED.value,
                finished_at=time.time(),
                extra={"error": str(ctx.fatal)},
            )
            raise ctx.fatal
        summary = await self._finish(store, built, info, task.status, task.error, output_format)
        summary.duration_s = time.monotonic() - started
        durations = _node_durations(info, self.timer.durations)
        for node, seconds in durations.items():
            summary.nodes.setdefault(node, {})["duration_s"] = round(seconds, 4)
        summary.report = await build_report(
            store,
            info.task_id,
            nodes=[node.name for node in pipeline.nodes],
            durations=durations,
        )
        await store.update_run(
            info.task_id,
            status=summary.status,
            finished_at=time.time() if summary.status in FINISHED else None,
            extra={"summary": summary.to_dict()},
        )
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
            raise InterruptedRunError(
                f"run interrupted; resume it with: pagent resume {info.task_id}"
            )
        return summary

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
        summary = await summarize(store, info, built=built)
        summary.store = store.url
        if ctx.stop_reason == "interrupted":
            summary.status = TaskStatus.INTERRUPTED.value
            return summary
        if ctx.stop_reason == "cancelled":
            summary.status = TaskStatus.CANCELLED.value
            summary.error = "cancelled by pagent cancel"
            return summary
        if ctx.stop_reason is not None:
            summary.status = TaskStatus.FAILED.value
            summary.error = ctx.stop_reason
            return summary
        if engine_status != TaskStatus.COMPLETE:
            summary.status = engine_status.value
            summary.error = engine_error
            if summary.status == TaskStatus.COMPLETE.value:
                summary.status = TaskStatus.FAILED.value
            return summary
        unfinished = summary.items_total - summary.items_done - summary.items_failed
        if summary.items_failed or summary.chunks_failed or unfinished > 0:
            summary.status = TaskStatus.PARTIAL.value
        else:
            summary.status = TaskStatus.COMPLETE.value
        if self.options.output is not None and output_format is not None:
            summary.items_output = await write_results(
                store, info, self.options.output, output_format, self.options.stdout, built=built
            )
            summary.output = self.options.output
        return summary


def _stored_durations(info: RunInfo) -> dict[str, float]:
    """Node run times recorded in the run's last summary (none before its first run ended)."""
    summary = info.extra.get("summary")
    durations: dict[str, float] = {}
    if isinstance(summary, dict):
        for node, values in (summary.get("nodes") or {}).items():
            if isinstance(values, dict) and isinstance(values.get("duration_s"), int | float):
                durations[node] = float(values["duration_s"])
    return durations


def _node_durations(info: RunInfo, measured: dict[str, float]) -> dict[str, float]:
    """Each node's run time over every coordinator of the run: a resume adds its own time to
    what earlier runs recorded, so items/s stays items over the time spent on them."""
    durations = _stored_durations(info)
    for node, seconds in measured.items():
        durations[node] = durations.get(node, 0.0) + seconds
    return durations


async def summarize(
    store: RunStore, info: RunInfo, built: BuiltPipeline | None = None
) -> RunSummary:
    """Counts of a run from the store's counters (never a scan of every chunk)."""
    stored = info.extra.get("summary")
    if built is None and isinstance(stored, dict):
        return summary_from_dict(stored)
    summary = RunSummary(task_id=info.task_id, status=info.status, store=store.url)
    if built is None:
        return summary
    counts = {node: await store.counts(info.task_id, node) for node in built.processing_nodes}
    failed = 0
    for node, node_counts in counts.items():
        summary.nodes[node] = {
            "chunks": node_counts.chunks_total,
            "done": node_counts.done,
            "failed": node_counts.failed,
            "items": node_counts.items_total,
            "items_failed": node_counts.items_failed,
            "retries": node_counts.retries,
        }
        failed += node_counts.items_failed
        if node_counts.failed:
            failed += sum(chunk.count for chunk in await store.failed_chunks(info.task_id, node))
    summary.items_failed = failed
    main = built.main_node
    if main is None:
        return summary
    main_counts = counts.get(main) or await store.counts(info.task_id, main)
    summary.items_total = main_counts.items_total
    summary.chunks_total = main_counts.chunks_total
    summary.chunks_done = main_counts.done
    summary.chunks_failed = main_counts.failed
    unfinished = main_counts.pending or main_counts.leased
    summary.items_done = (
        main_counts.items_done if unfinished else max(0, summary.items_total - failed)
    )
    return summary


def summary_from_dict(data: dict[str, Any]) -> RunSummary:
    items = data.get("items", {})
    chunks = data.get("chunks", {})
    return RunSummary(
        task_id=data["task_id"],
        status=data["status"],
        items_total=items.get("total", 0),
        items_done=items.get("done", 0),
        items_failed=items.get("failed", 0),
        items_output=items.get("output"),
        chunks_total=chunks.get("total", 0),
        chunks_done=chunks.get("done", 0),
        chunks_failed=chunks.get("failed", 0),
        duration_s=data.get("duration_s", 0.0),
        output=data.get("output"),
        store=data.get("store", ""),
        error=data.get("error"),
        nodes=data.get("nodes", {}),
        report=RunReport.from_dict(data["report"]) if data.get("report") else None,
    )


async def write_results(
    store: RunStore,
    info: RunInfo,
    target: str,
    fmt: str,
    stdout: BinaryIO | None = None,
    built: BuiltPipeline | None = None,
) -> int:
    """Write a run's output atomically from what the store holds; return the number of items."""
    output = await built.output_plan() if built is not None else info.extra.get("output_plan")
    if output is None:
        raise PipelineError("this pipeline produces no output (no aggregate or data node)")
    if built is not None:
        await store.update_run(info.task_id, extra={"output_plan": output})
    if "value" in output:
        return _write_value(output["value"], target, fmt, stdout)
    written = 0
    with open_writer(target, fmt, stdout=stdout) as writer:
        async for result in store.results(info.task_id, output["node"]):
            if fmt == "jsonl":
                writer.write_encoded_jsonl(result.result)
                written += result.result.count(b"\n")
            else:
                values = decode_lines(result.result)
                writer.write(values)
                written += len(values)
    return written


def _write_value(value: Any, target: str, fmt: str, stdout: BinaryIO | None) -> int:
    """An aggregate's value: the whole document in JSON; rows in JSON Lines and CSV (a list's
    items, a group_by's groups as {key, items}, or the value itself as one row)."""
    if fmt == "json":
        with open_writer(target, fmt, stdout=stdout, document=True) as writer:
            writer.write_document(value)
        return 1
    if isinstance(value, list):
        rows = value
    elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        rows = [{"key": key, "items": items} for key, items in value.items()]
    else:
        rows = [value]
    with open_writer(target, fmt, stdout=stdout) as writer:
        writer.write(rows)
    return len(rows)


#: Signals that interrupt a run resumably (SIGHUP: the terminal went away; not on Windows).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def run_pipeline(options: RunOptions, events: EventSink | None = None) -> RunSummary:
    """Run a pipeline to the end (blocking); SIGINT, SIGTERM and SIGHUP (the terminal closed) stop
    it resumably (InterruptedRunError), unless they were ignored when it started (`nohup`)."""
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


# ---- asking about runs ---------------------------------------------------------------------------


async def _with_store(url: str | None, action: Callable[[RunStore], Awaitable[T]]) -> T:
    store = open_store(resolve_store_url(url))
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


async def _require_run(store: RunStore, task_id: str) -> RunInfo:
    info = await store.get_run(task_id)
    if info is None:
        raise UsageError(f"unknown task id '{task_id}' in {store.url}")
    return info


async def _status(store: RunStore, task_id: str, with_report: bool = True) -> dict[str, Any]:
    info = await _require_run(store, task_id)
    holder = await store.lock_holder(task_id)
    nodes: dict[str, dict[str, Any]] = {}
    for node in await store.nodes(task_id):
        counts = await store.counts(task_id, node)
        nodes[node] = {
            "chunks": counts.chunks_total,
            "pending": counts.pending,
            "leased": counts.leased,
            "done": counts.done,
            "failed": counts.failed,
            "items": counts.items_total,
            "items_done": counts.items_done,
            "items_failed": counts.items_failed,
            "retries": counts.retries,
            "sealed": counts.sealed,
        }
    state = info.status
    if state in ("waiting", "executing") and holder is None:
        state = TaskStatus.STALLED.value
    main = next(iter(nodes.values()), None)
    now = time.time()
    elapsed = (info.finished_at or now) - info.created_at
    done = main["items_done"] if main else 0
    total = main["items"] if main else 0
    return {
        "task_id": task_id,
        "state": state,
        "recorded_status": info.status,
        "pipeline": info.pipeline_name,
        "input": info.input_path,
        "output": info.output_path,
        "coordinator": holder,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "finished_at": info.finished_at,
        "elapsed_s": round(elapsed, 3),
        "items": {
            "total": total,
            "done": done,
            "failed": sum(n["items_failed"] for n in nodes.values()),
        },
        "progress": round(done / total, 4) if total else None,
        "throughput_items_s": round(done / elapsed, 1) if elapsed > 0 else None,
        "nodes": nodes,
        "summary": info.extra.get("summary"),
        "report": (await _report(store, info)).to_dict() if with_report else None,
        "store": store.url,
    }


async def _report(store: RunStore, info: RunInfo) -> RunReport:
    """The run's report from the store; node durations come from the coordinator's summary
    (known once it finished)."""
    return await build_report(
        store,
        info.task_id,
        nodes=pipeline_node_names(info.pipeline_text),
        durations=_stored_durations(info),
    )


def get_status(task_id: str, store: str | None = None, *, report: bool = True) -> dict[str, Any]:
    """Where a run stands, read from the store alone (works from another shell or machine).

    `report=False` leaves out the end-of-run report (`status --watch` polls without it).
    """
    return asyncio.run(_with_store(store, lambda s: _status(s, task_id, report)))


def list_runs(store: str | None = None) -> list[dict[str, Any]]:
    """Every run the store remembers, newest first."""

    async def action(s: RunStore) -> list[dict[str, Any]]:
        runs = sorted(await s.list_runs(), key=lambda info: info.created_at, reverse=True)
        return [
            {
                "task_id": info.task_id,
                "status": info.status,
                "pipeline": info.pipeline_name,
                "input": info.input_path,
                "created_at": info.created_at,
                "finished_at": info.finished_at,
            }
            for info in runs
        ]

    return asyncio.run(_with_store(store, action))


def cancel_run(task_id: str, store: str | None = None) -> str:
    """Mark a run cancelled; its coordinator notices within a lock renewal and stops claiming."""

    async def action(s: RunStore) -> str:
        info = await _require_run(s, task_id)
        if info.status in FINISHED:
            return info.status
        await s.update_run(task_id, status=TaskStatus.CANCELLED.value, finished_at=time.time())
        return str(TaskStatus.CANCELLED.value)

    return asyncio.run(_with_store(store, action))


def gc_runs(older_than_s: float, store: str | None = None) -> list[str]:
    """Drop finished runs older than `older_than_s`; return their task ids."""
    return asyncio.run(_with_store(store, lambda s: s.gc(older_than_s)))


def export_results(
    task_id: str,
    output: str,
    output_format: str | None = None,
    store: str | None = None,
    stdout: BinaryIO | None = None,
) -> int:
    """Write a finished run's output again from the store, without reprocessing anything."""
    fmt = detect_output_format(output, output_format)
    if output != "-":
        check_writable(output)

    async def action(s: RunStore) -> int:
        info = await _require_run(s, task_id)
        if "output_plan" not in info.extra:
            raise UsageError(f"task '{task_id}' has no results yet (status {info.status})")
        return await write_results(s, info, output, fmt, stdout)

    return asyncio.run(_with_store(store, action))


def iter_failures(task_id: str, store: str | None = None) -> list[dict[str, Any]]:
    """Every failed record of a run: node, record number, input record and error."""

    async def action(s: RunStore) -> list[dict[str, Any]]:
        await _require_run(s, task_id)
        failures = [failure async for failure in read_failures(s, task_id)]
        return sorted(failures, key=lambda failure: (failure["record"], failure["node"]))

    return asyncio.run(_with_store(store, action))


def failed_output_format(target: str, input_format: str) -> str:
    """Failed records are written in the input's format; a target named for another is refused."""
    if target != "-":
        try:
            named = detect_output_format(target)
        except UsageError:
            named = None  # no telling extension: the input's format it is
        if named is not None and named != input_format:
            raise UsageError(
                f"failed records are written in the input's format ({input_format}); "
                f"{target} names {named}: give it a .{input_format} name"
            )
    return input_format


async def write_failed_records(store: RunStore, info: RunInfo, target: str) -> int:
    """Write the input records that failed (in any node) to `target` atomically, in the input's
    own format and order (a CSV keeps its header), so the file can be fed back to `pagent run`.

    The records are read back from the input file by record number (every node numbers its
    failures by input record); a file that changed since the run started is refused
    (InputDataError). Returns how many records were written.
    """
    if info.input_path is None or info.input_format is None:
        raise UsageError(
            f"task '{info.task_id}' read stdin (or no input); its failed records cannot be read back"
        )
    fmt = failed_output_format(target, info.input_format)
    wanted: set[int] = set()
    async for failure in read_failures(store, info.task_id, with_input=False):
        wanted.add(int(failure["record"]))
    data_key = str(info.extra.get("data_key", "data"))
    return await asyncio.to_thread(
        _write_input_records, info, fmt, data_key, sorted(wanted), target
    )


def _write_input_records(
    info: RunInfo, fmt: str, data_key: str, numbers: list[int], target: str
) -> int:
    """Copy the records numbered `numbers` (1-based, ascending) from the input to `target`."""
    assert info.input_path is not None
    _check_input_unchanged(info)
    reader = read_chunks(info.input_path, fmt, 4096, data_key=data_key)
    chunks = iter(reader)
    first = next(chunks, None)
    fields = None
    if fmt == "csv":
        if first is not None and first.records and isinstance(first.records[0], dict):
            fields = [str(key) for key in first.records[0]]
        else:
            fields = _csv_header(info.input_path)

    def selected() -> Iterator[Any]:
        wanted = iter(numbers)
        number = next(wanted, None)
        for chunk in itertools.chain([first] if first is not None else [], chunks):
            end = chunk.first_record + len(chunk.records)
            while number is not None and number <= end:
                if number > chunk.first_record:
                    yield chunk.records[number - chunk.first_record - 1]
                number = next(wanted, None)
            if number is None:
                return

    return write_records_like_input(target, fmt, selected(), fields=fields)


def _csv_header(path: str) -> list[str] | None:
    """The header row of a CSV file with no records (None if the file is empty)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row in csv.reader(handle):
            if row and any(cell.strip() for cell in row):
                return row
    return None


def export_failed(task_id: str, output: str, store: str | None = None) -> int:
    """`pagent failures ID --output PATH`: write a run's failed input records again."""
    if output != "-":
        check_writable(output)

    async def action(s: RunStore) -> int:
        info = await _require_run(s, task_id)
        return await write_failed_records(s, info, output)

    return asyncio.run(_with_store(store, action))


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
        info = await _require_run(s, task_id)
        pipeline_file = info.extra.get("pipeline_file")
        if not pipeline_file or not Path(pipeline_file).is_file():
            raise UsageError(f"task '{task_id}': its pipeline file {pipeline_file} is gone")
        if info.input_path is None:
            raise UsageError(f"task '{task_id}' read stdin; it cannot be resumed, run it again")
        _check_input_unchanged(info)
        if retry_failed:
            for node in await s.nodes(task_id):
                await s.retry_failed(task_id, node)
        ended_short = info.status in FINISHED and info.status != TaskStatus.COMPLETE.value
        if retry_failed or ended_short:
            await s.update_run(task_id, status=TaskStatus.INTERRUPTED.value)
        return RunOptions(
            pipeline=pipeline_file,
            data=info.input_path,
            data_format=info.input_format,
            data_key=info.extra.get("data_key", "data"),
            output=output or info.output_path,
            task_id=task_id,
            store=store,
            stdout=stdout,
            failed_output=failed_output,
        )

    options = asyncio.run(_with_store(store, prepare))
    return run_pipeline(options, events)


def _check_input_unchanged(info: RunInfo) -> None:
    path = info.input_path
    assert path is not None
    if not Path(path).is_file():
        raise InputDataError(f"the input of task '{info.task_id}' is gone: {path}")
    if info.input_size is not None and Path(path).stat().st_size != info.input_size:
        raise InputDataError(f"the input of task '{info.task_id}' changed since it started: {path}")
    if info.input_hash is not None and hash_file(path) != info.input_hash:
        raise InputDataError(f"the input of task '{info.task_id}' changed since it started: {path}")


def hash_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
