"""Live display and plain lines rendered at a fixed width with a fake clock; a real pseudo-terminal run."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from parallel_agent.display.live import LiveDisplay
from parallel_agent.display.plain import PlainLines
from parallel_agent.events import (
    ChunkDone,
    ChunkFailed,
    ChunksPlanned,
    ChunkStarted,
    ItemFailed,
    NodeFinished,
    NodeStarted,
    RunFinished,
    RunStarted,
)

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(sink: LiveDisplay | PlainLines, clock: FakeClock) -> None:
    sink.emit(RunStarted(task_id="t-1", pipeline="demo", nodes=("split", "work")))
    sink.emit(NodeStarted(node="work"))
    sink.emit(ChunksPlanned(node="work", chunks=4, items=40))
    for chunk in range(3):
        sink.emit(ChunkStarted(node="work", chunk=chunk, items=10))
        clock.now += 2
        sink.emit(
            ChunkDone(node="work", chunk=chunk, items=10, failed_items=1 if chunk == 1 else 0)
        )
    sink.emit(ItemFailed(node="work", record=17, error="ZeroDivisionError: division by zero"))
    sink.emit(ChunkStarted(node="work", chunk=3, items=10))
    sink.emit(
        ChunkFailed(node="work", chunk=3, attempt=1, error="timed out after 1 s", will_retry=True)
    )


def test_live_display_renders_bar_rows_and_errors_at_80_columns() -> None:
    output = io.StringIO()
    console = Console(file=output, width=80, force_terminal=True, color_system=None)
    clock = FakeClock()
    display = LiveDisplay(console, clock=clock, auto_refresh=False)
    feed(display, clock)
    frame = io.StringIO()
    Console(file=frame, width=80, color_system=None).print(display.view)
    text = frame.getvalue()
    assert (
        "t-1 demo  executing  29/40 items  3/4 chunks\n5 items/s  0:00:06 elapsed  ETA 0:00:02"
        in text
    )
    assert "work" in text and "running" in text and "3/4" in text
    assert "record 17: ZeroDivisionError: division by zero" in text
    assert "work chunk 3: timed out after 1 s" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    display.emit(NodeFinished(node="work", outcome="succeeded", duration_s=6.0))
    display.emit(RunFinished(task_id="t-1", status="complete", summary={"items": {"done": 39}}))
    display.close()
    final = output.getvalue()
    assert "pagent: task t-1 started (pipeline demo)" in final
    assert "complete" in final and "succeeded" in final


def test_plain_lines_have_no_escape_codes_and_report_progress() -> None:
    output = io.StringIO()
    clock = FakeClock()
    lines = PlainLines(output, interval=3, clock=clock)
    feed(lines, clock)
    lines.emit(NodeFinished(node="work", outcome="succeeded", duration_s=6.0))
    lines.emit(
        RunFinished(
            task_id="t-1",
            status="complete",
            summary={"items": {"done": 39, "total": 40, "failed": 1}, "duration_s": 6.0},
        )
    )
    text = output.getvalue()
    assert "\x1b" not in text
    assert text.splitlines() == [
        "pagent: task t-1 started (pipeline demo)",
        "pagent: 19/40 items, 2/4 chunks, 1 failed, 5 items/s, 4 s elapsed",
        "pagent: node work chunk 3 attempt 1 failed (retrying): timed out after 1 s",
        "pagent: node work succeeded in 6.00 s",
        "pagent: task t-1 complete: 39 of 40 items done, 1 failed, 6.00 s",
    ]


@pytest.mark.skipif(shutil.which("script") is None, reason="script(1) is not installed")
def test_live_display_in_a_real_pseudo_terminal(tmp_path: Path) -> None:
    command = (
        f"{sys.executable} -m parallel_agent run {ROOT / 'pipelines' / 'parallel_processing.yaml'} "
        f"--data {ROOT / 'pipelines' / 'data' / 'numbers.json'} --output {tmp_path / 'out.json'} "
        f"--store memory://"
    )
    done = subprocess.run(
        ["script", "-qec", command, str(tmp_path / "typescript")],
        capture_output=True,
        check=False,
        timeout=60,
    )
    screen = done.stdout.decode(errors="replace")
    assert done.returncode == 0, screen
    assert "\x1b[" in screen, "a terminal gets the live display"
    assert "in flight" in screen and "complete" in screen
    assert (tmp_path / "out.json").exists()
