"""The live view in a terminal: an overall bar, a row per node and the last errors, in one Rich `Live`.

Event hooks only update counters (they may run ~100k times a second); Rich renders the state at most
`refresh_per_second` times a second on its own thread, so the display costs little throughput.
One frame takes about 3 ms to render (mostly the Rich table), so 4 frames a second cost about 1%
of a core; `bench/display_overhead.py` measures the whole display against `--quiet`.

When the run finishes, the last frame stays on screen followed by the end-of-run report. When it
ends with an error instead (no `run_finished`), the frame is erased so that the CLI's one
`pagent: error:` line is what remains.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from parallel_agent.display.report import outputs_lines, resumed_text, stop_text
from parallel_agent.display.report_table import report_renderable
from parallel_agent.events import (
    ChunkDone,
    ChunkFailed,
    ChunksPlanned,
    ChunkStarted,
    EventSink,
    ItemFailed,
    NodeFinished,
    NodeProgress,
    NodeStarted,
    Notice,
    RunFinished,
    RunStarted,
)
from parallel_agent.report import RunReport, failed_output_message

LAST_ERRORS = 5


@dataclass
class NodeRow:
    state: str = "waiting"
    chunks: int = 0
    done: int = 0
    in_flight: int = 0
    retries: int = 0
    failed_items: int = 0
    failed_chunks: int = 0


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunView:
    """The state behind the live display and `status --watch`, rendered on demand."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.task_id = ""
        self.pipeline = ""
        self.status = "executing"
        self.nodes: dict[str, NodeRow] = {}
        self.main: str | None = None
        self.items_total = 0
        self.items_done = 0
        self.items_failed = 0
        self.errors: deque[str] = deque(maxlen=LAST_ERRORS)
        self.finished_at: float | None = None

    def row(self, node: str) -> NodeRow:
        if node not in self.nodes:
            self.nodes[node] = NodeRow()
        return self.nodes[node]

    def __rich__(self) -> RenderableType:
        now = self.finished_at or self.clock()
        elapsed = max(now - self.started, 1e-9)
        rate = self.items_done / elapsed
        left = self.items_total - self.items_done - self.items_failed
        eta = _clock_text(left / rate) if rate > 0 and left > 0 else "-"
        main = self.nodes.get(self.main or "")
        chunks = f"{main.done}/{main.chunks} chunks" if main else ""
        header = Text.assemble(
            (f"{self.task_id} ", "bold"),
            f"{self.pipeline}  {self.status}  ",
            f"{self.items_done:,}/{self.items_total:,} items  {chunks}",
        )
        speed = Text(f"{rate:,.0f} items/s  {_clock_text(elapsed)} elapsed  ETA {eta}")
        bar = ProgressBar(
            total=max(self.items_total, 1), completed=self.items_done + self.items_failed
        )
        table = Table(box=box.SIMPLE_HEAD, show_header=True, pad_edge=False, expand=False)
        for column in ("node", "state", "done", "in flight", "retries", "failed"):
            table.add_column(column, justify="left" if column in ("node", "state") else "right")
        for name, row in self.nodes.items():
            total = f"{row.done}/{row.chunks}" if row.chunks else "-"
            failed = f"{row.failed_items} items" + (
                f", {row.failed_chunks} chunks" if row.failed_chunks else ""
            )
            table.add_row(name, row.state, total, str(row.in_flight), str(row.retries), failed)
        parts: list[RenderableType] = [header, speed, bar, table]
        if self.errors:
            parts.append(Text("last errors:", style="bold red"))
            parts.extend(
                Text(f"  {error}", overflow="ellipsis", no_wrap=True) for error in self.errors
            )
        return Group(*parts)


class LiveDisplay(EventSink):
    """Feeds a RunView from events and shows it in a Rich Live on the console (stderr)."""

    def __init__(
        self,
        console: Console,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_per_second: float = 4,
        auto_refresh: bool = True,
    ) -> None:
        self.console = console
        self.view = RunView(clock)
        self.finished: RunFinished | None = None
        self.live = Live(
            self.view,
            console=console,
            refresh_per_second=refresh_per_second,
            auto_refresh=auto_refresh,
            transient=False,
            # stdout carries results (`--output -`) and `--json`: never into the display
            redirect_stdout=False,
        )
        self.live.start()

    def on_run_started(self, event: RunStarted) -> None:
        self.view.task_id = event.task_id
        self.view.pipeline = event.pipeline
        self.view.started = self.view.clock()
        verb = "resumed" if event.resumed else "started"
        self.console.print(
            f"pagent: task {event.task_id} {verb} (pipeline {event.pipeline})",
            highlight=False,
            markup=False,
        )

    def on_notice(self, event: Notice) -> None:
        self.console.print(f"pagent: {event.message}", highlight=False, markup=False)

    def on_node_started(self, event: NodeStarted) -> None:
        self.view.row(event.node).state = "running"

    def on_node_finished(self, event: NodeFinished) -> None:
        self.view.row(event.node).state = event.outcome
        if event.error and event.outcome != "skipped":  # why a node was skipped is no error
            self.view.errors.append(f"node {event.node}: {event.error}")

    def on_chunks_planned(self, event: ChunksPlanned) -> None:
        row = self.view.row(event.node)
        row.chunks = event.chunks
        row.done = event.chunks_done
        row.failed_chunks = event.chunks_failed
        row.failed_items = event.items_failed
        if self.view.main is None:
            self.view.main = event.node
            self.view.items_total = event.items
            self.view.items_done = event.items_done
            self.view.items_failed = event.items_failed
            resumed = resumed_text(event)
            if resumed:
                self.console.print(f"pagent: {resumed}", highlight=False, markup=False)

    def on_chunk_started(self, event: ChunkStarted) -> None:
        row = self.view.row(event.node)
        row.in_flight += 1
        if event.attempt > 1:
            row.retries += 1

    def on_chunk_done(self, event: ChunkDone) -> None:
        row = self.view.row(event.node)
        row.in_flight = max(0, row.in_flight - 1)
        row.done += 1
        row.failed_items += event.failed_items
        if event.node == self.view.main:
            self.view.items_done += event.items - event.failed_items
            self.view.items_failed += event.failed_items

    def on_node_progress(self, event: NodeProgress) -> None:
        """The store's counts replace what this process counted (other hosts work too)."""
        row = self.view.row(event.node)
        row.done = event.chunks_done
        row.in_flight = event.in_flight
        row.failed_items = event.items_failed
        if event.node == self.view.main:
            self.view.items_done = event.items_done
            self.view.items_failed = event.items_failed

    def on_chunk_failed(self, event: ChunkFailed) -> None:
        row = self.view.row(event.node)
        row.in_flight = max(0, row.in_flight - 1)
        if not event.will_retry:
            row.failed_chunks += 1
        self.view.errors.append(f"{event.node} chunk {event.chunk}: {event.error}")

    def on_item_failed(self, event: ItemFailed) -> None:
        self.view.errors.append(f"record {event.record}: {event.error}")

    def on_run_finished(self, event: RunFinished) -> None:
        self.finished = event
        self.view.task_id = self.view.task_id or event.task_id
        self.view.status = event.status
        self.view.finished_at = self.view.clock()
        items = event.summary.get("items", {})
        self.view.items_done = items.get("done", self.view.items_done)
        self.view.items_total = items.get("total", self.view.items_total)
        self.view.items_failed = items.get("failed", self.view.items_failed)
        for node, counts in (event.summary.get("nodes") or {}).items():
            row = self.view.row(node)
            if "state" in counts:
                row.state = counts["state"]
            if "chunks" in counts:
                row.chunks, row.done = counts["chunks"], counts.get("done", row.done)
                row.failed_chunks = counts.get("failed", row.failed_chunks)

    def close(self) -> None:
        if self.finished is None:
            self.live.transient = True  # erase the frame: the error line will say what happened
            self.live.stop()
            return
        self.live.refresh()
        self.live.stop()
        summary = self.finished.summary
        stop = stop_text(summary)
        if stop or summary.get("error"):
            text = stop or summary["error"]
            self.console.print(f"pagent: {text}", highlight=False, markup=False)
        for notice in summary.get("notices") or []:
            self.console.print(f"pagent: note: {notice}", highlight=False, markup=False)
        for line in outputs_lines(summary):
            self.console.print(line, highlight=False, markup=False)
        if summary.get("report"):
            self.console.print(report_renderable(RunReport.from_dict(summary["report"])))
        failed_output = summary.get("failed_output")
        if failed_output:
            self.console.print(
                failed_output_message(failed_output["path"], failed_output["records"]),
                highlight=False,
                markup=False,
            )


def view_from_status(report: dict[str, Any], view: RunView | None = None) -> RunView:
    """A RunView filled from `pagent status --json` data (what `status --watch` shows)."""
    view = view or RunView()
    view.task_id = report["task_id"]
    view.pipeline = report["pipeline"]
    view.status = report.get("status") or report["state"]
    items = report["items"]
    view.items_total, view.items_done, view.items_failed = (
        items["total"],
        items["done"],
        items["failed"],
    )
    elapsed = float(report.get("elapsed_s") or 0.0)
    view.started = view.clock() - elapsed
    view.finished_at = view.clock() if report.get("finished_at") else None
    for name, counts in report["nodes"].items():
        row = view.row(name)
        row.chunks, row.done, row.in_flight = counts["chunks"], counts["done"], counts["leased"]
        row.retries, row.failed_items, row.failed_chunks = (
            counts["retries"],
            counts["items_failed"],
            counts["failed"],
        )
        row.state = counts.get("state", row.state)
        if view.main is None:
            view.main = name
    return view


def watch_status(
    console: Console,
    fetch: Callable[[], dict[str, Any]],
    *,
    interval: float = 0.5,
    finished: frozenset[str] = frozenset(
        {
            "complete",
            "partial_failure",
            "no_output",
            "failed",
            "cancelled",
            "interrupted",
            "stalled",
            "lost",
        }
    ),
) -> dict[str, Any]:
    """Show a run from the store alone until it ends; return its last status."""
    report = fetch()
    view = view_from_status(report)
    with Live(view, console=console, refresh_per_second=4, transient=False) as live:
        while (report.get("status") or report["state"]) not in finished:
            time.sleep(interval)
            report = fetch()
            view_from_status(report, view)
            live.refresh()
    return report
