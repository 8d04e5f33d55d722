"""Plain progress lines for logs and pipes: no colour, no cursor movement, a line every interval.

Lines about nodes that failed or were skipped are held back until the run finishes and printed
with its summary: a run that dies of a fatal error (malformed input, a lost store) then ends with
its one `pagent: error:` line instead of a cascade of "failed"/"skipped because upstream failed".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from parallel_agent.display.report import outputs_lines, report_lines, resumed_text, stop_text
from parallel_agent.events import (
    ChunkDone,
    ChunkFailed,
    ChunksPlanned,
    EventSink,
    NodeFinished,
    NodeProgress,
    RunFinished,
    RunStarted,
)
from parallel_agent.report import RunReport, failed_output_message


class PlainLines(EventSink):
    """Writes the task id at the start, a progress line every `interval` seconds and when a node
    finishes, and at the end a summary line and the report (at most `width` columns)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        width: int = 80,
    ) -> None:
        self.stream = stream
        self.width = width
        self.held: list[str] = []
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last_line = self.started
        self.items_total = 0
        self.items_done = 0
        self.items_failed = 0
        self.chunks_total = 0
        self.chunks_done = 0
        self.main_node: str | None = None

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_run_started(self, event: RunStarted) -> None:
        self.started = self.clock()
        self.last_line = self.started
        verb = "resumed" if event.resumed else "started"
        self._write(f"pagent: task {event.task_id} {verb} (pipeline {event.pipeline})")

    def on_chunks_planned(self, event: ChunksPlanned) -> None:
        if self.main_node is None:
            self.main_node = event.node
            self.items_total = event.items
            self.chunks_total = event.chunks
            self.chunks_done = event.chunks_done
            self.items_done = event.items_done
            self.items_failed = event.items_failed
            if resumed_text(event):
                self._write(f"pagent: {resumed_text(event)}")

    def on_node_progress(self, event: NodeProgress) -> None:
        """The store's counts replace what this process counted (other hosts work too)."""
        if event.node == self.main_node:
            self.chunks_done = event.chunks_done
            self.items_done = event.items_done
            self.items_failed = event.items_failed
            self._maybe_progress()

    def on_chunk_done(self, event: ChunkDone) -> None:
        if event.node == self.main_node:
            self.chunks_done += 1
            self.items_done += event.items - event.failed_items
        self.items_failed += event.failed_items
        self._maybe_progress()

    def on_chunk_failed(self, event: ChunkFailed) -> None:
        retry = "retrying" if event.will_retry else "giving up"
        self._write(
            f"pagent: node {event.node} chunk {event.chunk} attempt {event.attempt} failed "
            f"({retry}): {event.error}"
        )

    def on_node_finished(self, event: NodeFinished) -> None:
        detail = f": {event.error}" if event.error else ""
        line = f"pagent: node {event.node} {event.outcome} in {event.duration_s:.2f} s{detail}"
        if event.outcome == "succeeded":
            self._write(line)
        else:
            self.held.append(line)

    def on_run_finished(self, event: RunFinished) -> None:
        summary = event.summary
        items = summary.get("items", {})
        lines = [*self.held]
        self.held.clear()
        lines.append(
            f"pagent: task {event.task_id} {event.status}: {items.get('done', 0)} of "
            f"{items.get('total', 0)} items done, {items.get('failed', 0)} failed, "
            f"{summary.get('duration_s', 0):.2f} s"
        )
        stop = stop_text(summary)
        if stop or summary.get("error"):
            lines.append(f"pagent: {stop or summary['error']}")
        lines.extend(f"pagent: note: {notice}" for notice in summary.get("notices") or [])
        lines.extend(outputs_lines(summary))
        report = summary.get("report")
        if report:
            lines.extend(report_lines(RunReport.from_dict(report), self.width))
        failed_output = summary.get("failed_output")
        if failed_output:
            lines.append(failed_output_message(failed_output["path"], failed_output["records"]))
        self._write("\n".join(lines))

    def close(self) -> None:
        # No run_finished: the run ended with an error, which the CLI prints as its last line.
        self.held.clear()

    def _maybe_progress(self) -> None:
        now = self.clock()
        if now - self.last_line < self.interval:
            return
        self.last_line = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.items_done / elapsed
        self._write(
            f"pagent: {self.items_done}/{self.items_total} items, "
            f"{self.chunks_done}/{self.chunks_total} chunks, {self.items_failed} failed, "
            f"{rate:,.0f} items/s, {elapsed:.0f} s elapsed"
        )
