"""Live display and plain lines rendered at a fixed width with a fake clock; a real pseudo-terminal run."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from parallel_agent.display import make_console, no_color
from parallel_agent.display.live import LiveDisplay
from parallel_agent.display.plain import PlainLines
from parallel_agent.display.report import report_lines
from parallel_agent.display.report_table import report_renderable
from parallel_agent.events import (
    ChunkDone,
    ChunkFailed,
    ChunksPlanned,
    ChunkStarted,
    ItemFailed,
    NodeFinished,
    NodeProgress,
    NodeStarted,
    RunFinished,
    RunStarted,
)
from parallel_agent.report import FailureGroup, NodeReport, RunReport

ROOT = Path(__file__).resolve().parent.parent
SGR = re.compile(r"\x1b\[([0-9;]*)m")
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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


def test_displays_count_progress_from_the_store() -> None:
    """Issue 13: chunks other hosts commit reach the coordinator's display as the store's counts,
    which replace what its own process counted."""
    clock = FakeClock()
    display = LiveDisplay(
        Console(file=io.StringIO(), width=80, color_system=None), clock=clock, auto_refresh=False
    )
    output = io.StringIO()
    lines = PlainLines(output, interval=3, clock=clock)
    for sink in (display, lines):
        feed(sink, clock)
        clock.now += 3
        sink.emit(
            NodeProgress(node="work", chunks_done=4, items_done=38, items_failed=2, in_flight=0)
        )
    frame = io.StringIO()
    Console(file=frame, width=80, color_system=None).print(display.view)
    assert "38/40 items  4/4 chunks" in frame.getvalue()
    display.close()
    assert (
        output.getvalue().splitlines()[-1].startswith("pagent: 38/40 items, 4/4 chunks, 2 failed")
    )


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


# ---- end-of-run report, held-back node failures, NO_COLOR ----------------------------------------

REPORT = RunReport(
    nodes=(
        NodeReport("split", duration_s=0.0123),
        NodeReport(
            "work",
            duration_s=6.0,
            chunks=4,
            chunks_done=3,
            chunks_failed=1,
            items_processed=30,
            items_failed=11,
            retries=2,
            chunk_p50_s=0.5,
            chunk_p95_s=1.25,
            items_in=40,
            items_out=24,
            items_dropped=5,
            items_per_s=30 / 6.0,
        ),
        NodeReport("collect", duration_s=0.0004),
    ),
    failures=(
        FailureGroup(
            "timed out after 1 s", 10, (31, 32, 33, 34, 35), ("work",), "timed out after 1 s"
        ),
        FailureGroup(
            "ZeroDivisionError", 1, (17,), ("work",), "ZeroDivisionError: division by zero"
        ),
    ),
)

REPORT_LINES = [
    "node       time  chunks  items/s  p50 chunk  p95 chunk  retries  failed",
    "split     12 ms       -        -          -          -        -       -",
    "work     6.00 s     3/4        5     500 ms     1.25 s        2      11",
    "collect  0.4 ms       -        -          -          -        -       -",
    "records in -> out:",
    "  work  40 -> 24  (5 dropped, 11 failed)",
    "failed records by error type:",
    "  10  timed out after 1 s  records 31, 32, 33, 34, 35, …  in work",
    "      e.g. timed out after 1 s",
    "   1  ZeroDivisionError  record 17  in work",
    "      e.g. ZeroDivisionError: division by zero",
]


def finished(report: RunReport | None = REPORT, **extra: object) -> RunFinished:
    summary: dict[str, object] = {
        "items": {"done": 29, "total": 40, "failed": 11},
        "duration_s": 6.0,
        "report": report.to_dict() if report is not None else None,
        **extra,
    }
    return RunFinished(task_id="t-1", status="partial_failure", summary=summary)


def test_report_lines_are_a_plain_table_and_failures_by_type() -> None:
    assert report_lines(REPORT) == REPORT_LINES


def test_report_lines_never_exceed_the_width() -> None:
    wide = RunReport(
        nodes=(
            NodeReport(
                "a_node_with_a_really_long_descriptive_name_indeed",
                duration_s=7384.0,
                chunks=123456,
                chunks_done=123456,
                items_processed=12_345_678,
                items_failed=1_234_567,
                retries=98765,
                chunk_p50_s=59.994,
                chunk_p95_s=3600.0,
                items_per_s=12_345_678 / 7384.0,
            ),
        ),
        failures=(
            FailureGroup(
                "command exited with status 3",
                1_234_567,
                (100001, 200002, 300003, 400004, 500005),
                ("a_node_with_a_really_long_descriptive_name_indeed",),
                "command exited with status 3 on records 100001-100100: " + "x" * 200,
            ),
        ),
    )
    lines = report_lines(wide)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    # the name gives way to the figures down to 10 characters, then the p95 column goes
    assert lines[0].split() == [
        "node",
        "time",
        "chunks",
        "items/s",
        "p50",
        "chunk",
        "retries",
        "failed",
    ]
    assert lines[1].startswith("a_node_with_a_r…  2:03:04")
    assert "123456/123456" in lines[1] and "59.99 s" in lines[1] and "1:00:00" not in lines[1]
    assert lines[2] == "records in -> out:"
    assert lines[3].endswith("0 -> 0  (1,234,567 failed)")
    assert lines[5].startswith("  1,234,567  command exited with status 3  records 100001, ")
    assert lines[6].endswith("x…")


def test_report_renders_in_rich_at_80_columns() -> None:
    output = io.StringIO()
    console = Console(file=output, width=80, force_terminal=True, color_system=None)
    console.print(report_renderable(REPORT))
    lines = [line.rstrip() for line in output.getvalue().splitlines()]
    # the same cells and spacing as the plain lines, with a rule under the header
    assert lines == [REPORT_LINES[0], "─" * len(REPORT_LINES[0]), *REPORT_LINES[1:]]


def test_rich_report_fits_80_columns_with_long_names() -> None:
    report = RunReport(
        nodes=(
            NodeReport("by_currency_and_region", duration_s=0.0004),
            NodeReport(
                "convert",
                duration_s=1.19,
                chunks=3,
                chunks_done=3,
                items_processed=60,
                chunk_p50_s=0.792,
                chunk_p95_s=1.15,
                items_per_s=60 / 1.19,
            ),
        )
    )
    output = io.StringIO()
    Console(file=output, width=80, color_system=None).print(report_renderable(report))
    lines = output.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split() == [
        "node", "time", "chunks", "items/s", "p50", "chunk", "p95", "chunk", "retries", "failed"
    ]  # fmt: skip
    assert lines[3].split() == ["convert", "1.19", "s", "3/3", "50", "792", "ms", "1.15", "s", "0", "0"]  # fmt: skip


def test_live_display_leaves_the_frame_and_the_report_at_the_end() -> None:
    output = io.StringIO()
    console = Console(file=output, width=80, force_terminal=True, color_system=None)
    clock = FakeClock()
    display = LiveDisplay(console, clock=clock, auto_refresh=False)
    feed(display, clock)
    display.emit(NodeFinished(node="work", outcome="succeeded", duration_s=6.0))
    display.emit(finished(failed_output={"path": "failed.jsonl", "records": 11}))
    display.close()
    text = output.getvalue()
    final = text[text.rindex("partial_failure") :]
    assert REPORT_LINES[2] in final
    assert "  10  timed out after 1 s  records 31, 32, 33, 34, 35, …  in work" in final
    assert final.rstrip().endswith("pagent: 11 failed records written to failed.jsonl")
    assert all(len(line) <= 80 for line in CONTROL.sub("", final).splitlines())


def test_live_display_erases_its_frame_when_the_run_ends_in_an_error() -> None:
    output = io.StringIO()
    console = Console(file=output, width=80, force_terminal=True, color_system=None)
    display = LiveDisplay(console, clock=FakeClock(), auto_refresh=False)
    display.emit(RunStarted(task_id="t-1", pipeline="demo", nodes=("split", "work")))
    display.emit(NodeFinished(node="split", outcome="failed", error="bad input"))
    display.emit(NodeFinished(node="work", outcome="skipped", error="not run: upstream"))
    display.close()
    text = output.getvalue()
    assert "pagent: task t-1 started (pipeline demo)" in text
    last_frame = text[text.rindex("t-1 demo") :]
    # the frame is printed once more, then erased line by line from the bottom up
    assert last_frame.endswith("\x1b[1A\x1b[2K" * last_frame.count("\n"))
    assert "failed records by error type" not in text


def test_plain_lines_end_with_the_summary_and_the_report() -> None:
    output = io.StringIO()
    clock = FakeClock()
    lines = PlainLines(output, interval=3, clock=clock)
    feed(lines, clock)
    lines.emit(NodeFinished(node="other", outcome="failed", duration_s=0.5, error="boom"))
    lines.emit(NodeFinished(node="work", outcome="succeeded", duration_s=6.0))
    lines.emit(finished(failed_output={"path": "failed.jsonl", "records": 11}))
    lines.close()
    text = output.getvalue()
    assert "\x1b" not in text
    assert text.splitlines()[3:] == [
        "pagent: node work succeeded in 6.00 s",
        "pagent: node other failed in 0.50 s: boom",
        "pagent: task t-1 partial_failure: 29 of 40 items done, 11 failed, 6.00 s",
        *REPORT_LINES,
        "pagent: 11 failed records written to failed.jsonl",
    ]


def test_plain_lines_hold_node_failures_back_when_the_run_dies_of_an_error() -> None:
    output = io.StringIO()
    lines = PlainLines(output, clock=FakeClock())
    lines.emit(RunStarted(task_id="t-1", pipeline="demo", nodes=("split", "work")))
    lines.emit(NodeFinished(node="split", outcome="failed", error="data.json, line 2: bad"))
    lines.emit(NodeFinished(node="work", outcome="skipped", error="not run: upstream failed"))
    lines.close()
    assert output.getvalue() == "pagent: task t-1 started (pipeline demo)\n"


def colour_codes(text: str) -> list[str]:
    """SGR parameter lists that set a foreground or background colour."""
    found = []
    for params in SGR.findall(text):
        numbers = [int(p) for p in params.split(";") if p]
        if any(30 <= n <= 49 or 90 <= n <= 107 for n in numbers):
            found.append(params)
    return found


def render_everything(console: Console) -> str:
    clock = FakeClock()
    display = LiveDisplay(console, clock=clock, auto_refresh=False)
    feed(display, clock)
    display.emit(finished())
    display.close()
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_no_color_environment_turns_colour_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    coloured = make_console(io.StringIO(), force_terminal=True, width=80)
    assert colour_codes(render_everything(coloured)), "a terminal gets colours by default"
    monkeypatch.setenv("NO_COLOR", "1")
    plain = make_console(io.StringIO(), force_terminal=True, width=80)
    text = render_everything(plain)
    assert colour_codes(text) == []
    assert "failed records by error type:" in text and "\x1b[" in text  # still a live display
    assert no_color({"NO_COLOR": "1"}) and not no_color({"NO_COLOR": ""}) and not no_color({})


NARROW = RunReport(
    nodes=(
        NodeReport("split", duration_s=0.004),
        NodeReport(
            "geocode-addresses",
            duration_s=12.64,
            chunks=40,
            chunks_done=38,
            chunks_failed=2,
            items_processed=2000,
            items_failed=41,
            retries=3,
            chunk_p50_s=0.02,
            chunk_p95_s=0.5,
            items_per_s=2000 / 12.64,
        ),
    ),
    failures=(FailureGroup("KeyError", 41, (1, 2, 3), ("geocode-addresses",), "KeyError: 'x'"),),
)


@pytest.mark.parametrize(
    ("width", "headings"),
    [
        (
            120,
            [
                "node",
                "time",
                "chunks",
                "items/s",
                "p50",
                "chunk",
                "p95",
                "chunk",
                "retries",
                "failed",
            ],
        ),
        (
            80,
            [
                "node",
                "time",
                "chunks",
                "items/s",
                "p50",
                "chunk",
                "p95",
                "chunk",
                "retries",
                "failed",
            ],
        ),
        (60, ["node", "time", "chunks", "items/s", "retries", "failed"]),
        (40, ["node", "time", "chunks", "failed"]),
        (30, ["node", "chunks", "failed"]),
    ],
)
def test_a_narrow_report_drops_columns_and_keeps_names_and_figures_whole(
    width: int, headings: list[str]
) -> None:
    """Issue 14 item 6: `sp…  23 ms` at 60 columns was unreadable."""
    lines = report_lines(NARROW, width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert lines[0].split() == headings
    assert lines[2].split()[0][:9] == "geocode-a"
    assert "38/40" in lines[2].split() and lines[2].split()[-1] == "41"


def test_a_very_narrow_report_is_key_value_lines() -> None:
    lines = report_lines(NARROW, 24)
    assert all(len(line) <= 24 for line in lines), "\n".join(lines)
    assert lines[:6] == [
        "split",
        "  time: 4.0 ms",
        "geocode-addresses",
        "  time: 12.64 s",
        "  chunks: 38/40",
        "  items/s: 158",
    ]
    assert "  failed: 41" in lines
