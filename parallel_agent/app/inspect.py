"""Read-only questions about runs: status, list, results, failures (from the store alone)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, BinaryIO

from parallel_agent.app.common import require_run, resolve_store_url, store_file, with_store
from parallel_agent.app.outputs import write_failed_records, write_results
from parallel_agent.app.summary import SCHEMA_VERSION, stored_durations
from parallel_agent.errors import UsageError
from parallel_agent.graph import TaskStatus
from parallel_agent.io import check_targets, check_writable, detect_output_format
from parallel_agent.report import RunReport, build_report, pipeline_node_names, read_failures
from parallel_agent.store.base import RunInfo, RunStore


async def _status(store: RunStore, task_id: str, with_report: bool = True) -> dict[str, Any]:
    info = await require_run(store, task_id)
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
    summary = info.extra.get("summary")
    stored = summary if isinstance(summary, dict) else {}
    for name, row in nodes.items():
        row["state"] = (stored.get("nodes") or {}).get(name, {}).get("state") or live_state(row)
    main = next(iter(nodes.values()), None)
    now = time.time()
    elapsed = (info.finished_at or now) - info.created_at
    done = main["items_done"] if main else 0
    total = main["items"] if main else 0
    failed = sum(n["items_failed"] for n in nodes.values())
    if stored.get("items") and info.finished_at is not None:
        # A finished run: the counts its summary recorded (failed chunks' items included).
        total, done, failed = (stored["items"].get(key, 0) for key in ("total", "done", "failed"))
    return {
        "schema_version": SCHEMA_VERSION,
        "task_id": task_id,
        "status": state,
        "state": state,
        "stop_reason": stored.get("stop_reason"),
        "error": stored.get("error") or info.extra.get("error"),
        "recorded_status": info.status,
        "pipeline": info.pipeline_name,
        "input": info.input_path,
        "output": info.output_path,
        "coordinator": holder,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "finished_at": info.finished_at,
        "elapsed_s": round(elapsed, 3),
        "items": {"total": total, "done": done, "failed": failed},
        "progress": round(done / total, 4) if total else None,
        "throughput_items_s": round(done / elapsed, 1) if elapsed > 0 else None,
        "nodes": nodes,
        "workers": [
            {**worker, "run": worker["runs"][task_id]}
            for worker in await store.live_workers()
            if task_id in (worker.get("runs") or {})
        ],
        "summary": info.extra.get("summary"),
        "report": (await _report(store, info)).to_dict() if with_report else None,
        "store": store.url,
    }


def live_state(counts: dict[str, Any]) -> str:
    """A node's state from its counters alone, while its run has no final summary."""
    if counts["sealed"] and counts["done"] + counts["failed"] == counts["chunks"]:
        if not (counts["items_failed"] or counts["failed"]):
            return "succeeded"
        return "partial" if counts["items_done"] else "failed"
    return "running" if counts["leased"] or counts["done"] or counts["failed"] else "waiting"


async def _report(store: RunStore, info: RunInfo) -> RunReport:
    """The run's report from the store; node durations come from the coordinator's summary
    (known once it finished)."""
    return await build_report(
        store,
        info.task_id,
        nodes=pipeline_node_names(info.pipeline_text),
        durations=stored_durations(info),
    )


def get_status(task_id: str, store: str | None = None, *, report: bool = True) -> dict[str, Any]:
    """Where a run stands, read from the store alone (works from another shell or machine).

    `report=False` leaves out the end-of-run report (`status --watch` polls without it).
    """
    return asyncio.run(with_store(store, lambda s: _status(s, task_id, report)))


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

    return asyncio.run(with_store(store, action))


def export_results(
    task_id: str,
    output: str,
    output_format: str | None = None,
    store: str | None = None,
    stdout: BinaryIO | None = None,
) -> int:
    """Write a finished run's output again from the store, without reprocessing anything."""
    fmt = detect_output_format(output, output_format)
    check_writable(output)

    async def action(s: RunStore) -> int:
        info = await require_run(s, task_id)
        _check_output(output, info, store)
        if "output_plan" not in info.extra:
            raise UsageError(f"task '{task_id}' has no results yet (status {info.status})")
        return await write_results(s, info, output, fmt, stdout)

    return asyncio.run(with_store(store, action))


def _check_output(output: str, info: RunInfo, store: str | None) -> None:
    """Refuse an output that would replace the run's input file or the store's file."""
    check_targets(
        [("--output", output)],
        [("the run's input", info.input_path), ("--store", store_file(resolve_store_url(store)))],
    )


def iter_failures(task_id: str, store: str | None = None) -> list[dict[str, Any]]:
    """Every failed record of a run: node, record number, input record and error."""

    async def action(s: RunStore) -> list[dict[str, Any]]:
        await require_run(s, task_id)
        failures = [failure async for failure in read_failures(s, task_id)]
        return sorted(failures, key=lambda failure: (failure["record"], failure["node"]))

    return asyncio.run(with_store(store, action))


def export_failed(task_id: str, output: str, store: str | None = None) -> int:
    """`pagent failures ID --output PATH`: write a run's failed input records again."""
    check_writable(output)

    async def action(s: RunStore) -> int:
        info = await require_run(s, task_id)
        _check_output(output, info, store)
        return await write_failed_records(s, info, output)

    return asyncio.run(with_store(store, action))
