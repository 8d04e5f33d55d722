"""A run's summary (`--json`) and the per-node run times it carries across resumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parallel_agent.graph import TaskStatus
from parallel_agent.pipeline.build import BuiltPipeline
from parallel_agent.report import RunReport
from parallel_agent.store.base import RunInfo, RunStore

#: Version of the JSON that `run --json` and `status --json` print (docs/json.md); it changes
#: when a field is removed or changes meaning, not when one is added.
SCHEMA_VERSION = 1


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
    #: why the run stopped before its end (STOP_KINDS in modules.context), None when it did not
    stop_reason: str | None = None
    #: the results, when `parallel_agent.run(..., results=True)` asked for them (not in to_dict)
    results: list[Any] | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    """What aggregates skipped (missing fields, nulls) or cut (collect past its limit)."""
    """`--output-node NODE=PATH`: {node: {path, rows}} written besides `--output`."""

    @property
    def exit_code(self) -> int:
        return 0 if self.status == TaskStatus.COMPLETE.value else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "task_id": self.task_id,
            "status": self.status,
            "stop_reason": self.stop_reason,
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
            "outputs": self.outputs,
            "notices": self.notices,
        }


def stored_durations(info: RunInfo) -> dict[str, float]:
    """Node run times recorded in the run's last summary (none before its first run ended)."""
    summary = info.extra.get("summary")
    durations: dict[str, float] = {}
    if isinstance(summary, dict):
        for node, values in (summary.get("nodes") or {}).items():
            if isinstance(values, dict) and isinstance(values.get("duration_s"), int | float):
                durations[node] = float(values["duration_s"])
    return durations


def node_durations(info: RunInfo, measured: dict[str, float]) -> dict[str, float]:
    """Each node's run time over every coordinator of the run: a resume adds its own time to
    what earlier runs recorded, so items/s stays items over the time spent on them."""
    durations = stored_durations(info)
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
            "items_done": node_counts.items_done,
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
        stop_reason=data.get("stop_reason"),
        nodes=data.get("nodes", {}),
        report=RunReport.from_dict(data["report"]) if data.get("report") else None,
        outputs=data.get("outputs") or {},
        notices=data.get("notices") or [],
    )
