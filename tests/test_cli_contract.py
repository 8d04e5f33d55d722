"""Issue 14: a display and a CLI contract that never mislead.

States are true in every display (plain lines, the live display in a pseudo-terminal, status,
events, JSON), the stop reason is said, resume counts come from the store, one record carries one
number everywhere, and the JSON a script reads has one schema. Runs that are interrupted, killed
or cancelled are real `pagent` processes; a pseudo-terminal (pty) stands for a person's terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from parallel_agent.cli import app

TESTS = Path(__file__).resolve().parent
PAGENT = [sys.executable, "-m", "parallel_agent"]
DEADLINE_S = 60.0

GATED = """
name: gated
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 2}]}
  - name: work
    dependencies: [split]
    modules: [{use: map, function: "steps_for_tests:gate_on_eleven"}]
    node_config: {concurrency: 1, lease: 1.0}
  - {name: collect, dependencies: [work], modules: [{use: aggregate}]}
"""


def pipeline_with(tmp_path: Path, map_module: str, node_config: str = "{}") -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"""
name: contract
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 3}}]}}
  - name: work
    dependencies: [split]
    modules: [{map_module}]
    node_config: {node_config}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate}}]}}
"""
    )
    return str(path)


def numbers(tmp_path: Path, count: int = 10) -> str:
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(count)))
    return str(path)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """pagent in-process (plain mode: not a terminal) with a private SQLite store."""
    monkeypatch.setenv("PAGENT_STORE", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.setenv("PAGENT_TEST_MARKERS", str(tmp_path))
    monkeypatch.syspath_prepend(str(TESTS))
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Environment of a `pagent` process: private store, test steps importable."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PAGENT_STORE": f"sqlite:///{tmp_path / 'state.db'}",
        "PAGENT_TEST_MARKERS": str(tmp_path),
        "TERM": "xterm-256color",
    }


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Terminal:
    """A pseudo-terminal of `columns` x 24 on a `pagent` process's stderr (stdout is a pipe)."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = 100) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.proc = subprocess.Popen(
            [*PAGENT, *args],
            env={**env, "COLUMNS": str(columns)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.screen = b""

    def drain(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0)
            if not ready:
                return
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other side closed
                return
            if not chunk:
                return
            self.screen += chunk

    def finish(self) -> tuple[int, str, str]:
        """Wait for the process; (exit code, stdout, everything the terminal received)."""
        deadline = time.monotonic() + DEADLINE_S
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "pagent did not end"
            self.drain()
            time.sleep(0.02)
        self.drain()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read().decode()
        self.proc.stdout.close()
        os.close(self.master)
        return self.proc.returncode, stdout, self.screen.decode(errors="replace")


def plain(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PAGENT, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def communicate(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stdout, stderr


@contextlib.contextmanager
def gated_run(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The gated pipeline over 20 records (10 chunks, record 11 in chunk 6 waits at the gate)."""
    pipeline = tmp_path / "gated.yaml"
    pipeline.write_text(GATED)
    yield str(pipeline), numbers(tmp_path, 20)


# ---- states --------------------------------------------------------------------------------


def test_every_item_failed_is_a_failed_run_and_a_failed_node(cli: Any, tmp_path: Path) -> None:
    """Not `partial_failure` with `node succeeded` and `[]` written: nothing succeeded."""
    pipeline = pipeline_with(tmp_path, "{use: map, expr: \"item['nope']\"}")
    output = tmp_path / "out.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path), "--output", str(output), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "failed"
    assert summary["error"] == "every item failed (10 of 10)"
    assert summary["nodes"]["work"]["state"] == "failed"
    assert (summary["items"]["done"], summary["items"]["failed"]) == (0, 10)
    assert not output.exists()
    assert "node work failed" in result.stderr
    assert "node work succeeded" not in result.stderr
    assert f"task {summary['task_id']} failed: 0 of 10 items done, 10 failed" in result.stderr


def test_some_items_failed_is_a_partial_node(cli: Any, tmp_path: Path) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: '1 / (item % 3)'}")
    events_file = tmp_path / "ev.jsonl"
    result = cli(
        "run", pipeline, "--data", numbers(tmp_path), "--json", "--events", str(events_file)
    )
    summary = json.loads(result.stdout)
    assert (result.exit_code, summary["status"]) == (1, "partial_failure")
    assert summary["stop_reason"] is None
    assert {node: values["state"] for node, values in summary["nodes"].items()} == {
        "split": "succeeded",
        "work": "partial",
        "collect": "succeeded",
    }
    assert "node work partial" in result.stderr
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    finished = {e["node"]: e["outcome"] for e in events if e["kind"] == "node_finished"}
    assert finished["work"] == "partial"
    status = json.loads(cli("status", summary["task_id"], "--json").stdout)
    assert status["nodes"]["work"]["state"] == "partial"


@pytest.mark.parametrize(
    ("node_config", "options", "kind", "words"),
    [
        ("{}", ("--max-failures", "2"), "max_failures", "--max-failures exceeded"),
        ("{on_error: stop}", (), "on_error_stop", "a record failed under on_error: stop"),
    ],
)
def test_the_stop_reason_is_in_the_human_report_and_the_json(
    cli: Any, tmp_path: Path, node_config: str, options: tuple[str, ...], kind: str, words: str
) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: '1 / (item % 2)'}", node_config)
    result = cli("run", pipeline, "--data", numbers(tmp_path, 30), *options, "--json")
    summary = json.loads(result.stdout)
    assert (result.exit_code, summary["status"], summary["stop_reason"]) == (1, "failed", kind)
    assert f"pagent: stopped early: {words}" in result.stderr
    status = json.loads(cli("status", summary["task_id"], "--json").stdout)
    assert status["stop_reason"] == kind
    human = cli("status", summary["task_id"]).stdout
    assert re.search(rf"^stopped +{re.escape(words)}", human, re.MULTILINE)


# ---- one JSON schema -----------------------------------------------------------------------


def test_run_and_status_json_share_the_status_key_and_schema_version(
    cli: Any, tmp_path: Path
) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: 'item * 2'}")
    run = json.loads(cli("run", pipeline, "--data", numbers(tmp_path), "--json").stdout)
    status = json.loads(cli("status", run["task_id"], "--json").stdout)
    for document in (run, status):
        assert document["schema_version"] == 1
        assert document["status"] == "complete"
        assert document["stop_reason"] is None
        assert document["items"] == {**document["items"], "total": 10, "done": 10, "failed": 0}
    assert status["state"] == status["status"]  # the old key, kept for one release


def test_output_to_stdout_refuses_json_and_events_on_stdout(cli: Any, tmp_path: Path) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: 'item * 2'}")
    data = numbers(tmp_path)
    for extra in (("--json",), ("--events", "-"), ("--json", "--events", "-")):
        result = cli("run", pipeline, "--data", data, "--output", "-", *extra)
        assert result.exit_code == 2
        assert result.stdout == ""
        assert "--output -" in result.stderr and "would all write to stdout" in result.stderr
    result = cli("run", pipeline, "--data", data, "--json", "--events", "-")
    assert result.exit_code == 2 and "--json and --events -" in result.stderr
    summary = tmp_path / "summary.json"
    result = cli("run", pipeline, "--data", data, "--output", "-", "--summary", str(summary))
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == list(range(0, 20, 2))
    assert json.loads(summary.read_text())["status"] == "complete"


def test_list_json_is_one_array(cli: Any, tmp_path: Path) -> None:
    assert json.loads(cli("list", "--json").stdout) == []
    pipeline = pipeline_with(tmp_path, "{use: map, expr: 'item'}")
    for task in ("a-1", "b-1"):
        assert cli("run", pipeline, "--data", numbers(tmp_path), "--task-id", task).exit_code == 0
    runs = json.loads(cli("list", "--json").stdout)
    assert sorted(run["task_id"] for run in runs) == ["a-1", "b-1"]


def test_gc_dry_run_and_filters_say_what_they_drop(cli: Any, tmp_path: Path) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: 'item'}")
    for task in ("nightly-1", "nightly-2", "mine"):
        assert cli("run", pipeline, "--data", numbers(tmp_path), "--task-id", task).exit_code == 0
    dry = cli("gc", "--older-than", "0", "--task-id", "nightly-*", "--dry-run")
    assert dry.stdout.split() == ["nightly-1", "nightly-2"]
    assert "would drop 2 finished runs" in dry.stderr
    assert len(json.loads(cli("list", "--json").stdout)) == 3
    other = cli("gc", "--older-than", "0", "--pipeline", "another")
    assert other.stdout == "" and "dropped 0 finished runs" in other.stderr
    done = cli("gc", "--older-than", "0", "--task-id", "nightly-*")
    assert done.stdout.split() == ["nightly-1", "nightly-2"]
    assert [run["task_id"] for run in json.loads(cli("list", "--json").stdout)] == ["mine"]


# ---- one record numbering ------------------------------------------------------------------


def test_one_record_carries_one_number_everywhere(cli: Any, tmp_path: Path) -> None:
    """`record` in the expression, the failure report, `failures`, `--failed-output`, events and
    the JSON report all say 4 for the 4th input record; `index` is 3 beside it."""
    pipeline = pipeline_with(
        tmp_path, "{use: map, expr: \"[record, index] if record != 4 else item['nope']\"}"
    )
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"v": i}) + "\n" for i in range(6)))
    output, failed = tmp_path / "out.jsonl", tmp_path / "failed.jsonl"
    result = cli(
        "run", pipeline, "--data", str(data), "--output", str(output), "--json",
        "--failed-output", str(failed), "--events", str(tmp_path / "ev.jsonl"),
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert [json.loads(line) for line in output.read_text().splitlines()] == [
        [1, 0], [2, 1], [3, 2], [5, 4], [6, 5]
    ]  # fmt: skip
    assert summary["report"]["failures"][0]["first_records"] == [4]
    assert "record 4  in work" in result.stderr
    assert [json.loads(line) for line in failed.read_text().splitlines()] == [{"v": 3}]
    listed = cli("failures", summary["task_id"]).stdout.splitlines()
    assert [json.loads(line)["record"] for line in listed] == [4]
    events = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [e["record"] for e in events if e["kind"] == "item_failed"] == [4]


# ---- Ctrl-C, kill, resume, cancel in a terminal and in plain mode --------------------------


def test_ctrl_c_in_a_terminal_then_a_resume_after_a_kill(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Interrupted: the live display and the JSON say `interrupted`, not `succeeded`; collect was
    not reached. A resume killed mid-way and resumed again counts the chunks done before."""
    with gated_run(tmp_path) as (pipeline, data):
        args = ["run", pipeline, "--data", data, "--task-id", "cc", "--json"]
        terminal = Terminal(args, env)
        wait_until(lambda: (tmp_path / "at-gate").exists(), "record 11 at the gate")
        os.killpg(terminal.proc.pid, signal.SIGINT)  # what Ctrl-C sends the foreground group
        (tmp_path / "open-gate").touch()
        code, stdout, screen = terminal.finish()
    assert code == 130, screen
    summary = json.loads(stdout)
    assert (summary["status"], summary["stop_reason"]) == ("interrupted", "interrupt")
    states = {node: values.get("state") for node, values in summary["nodes"].items()}
    assert states == {"split": "succeeded", "work": "interrupted", "collect": "not reached"}
    assert re.search(r"work\s+interrupted", screen)
    assert not re.search(r"(work|collect)\s+succeeded", screen)
    assert "stopped early: interrupted" in screen
    done_before = summary["chunks"]["done"]
    assert 5 <= done_before < 10

    (tmp_path / "open-gate").unlink()
    (tmp_path / "at-gate").unlink()
    resumed = plain(["resume", "cc", "--json"], {**env, "PAGENT_TEST_MARKERS": str(tmp_path)})
    if done_before == 5:  # record 11's chunk is redone: it stops at the gate again; kill it there
        wait_until(lambda: (tmp_path / "at-gate").exists(), "record 11 at the gate again")
        os.killpg(resumed.pid, signal.SIGKILL)
        communicate(resumed)
        (tmp_path / "open-gate").touch()
        resumed = plain(["resume", "cc", "--json"], env)
    else:
        (tmp_path / "open-gate").touch()
    code, stdout, stderr = communicate(resumed)
    assert code == 0, stderr
    assert "pagent: task cc resumed (pipeline gated)" in stderr
    match = re.search(r"resumed \((\d+) of 10 chunks already done\)", stderr)
    assert match and int(match.group(1)) >= done_before
    final = json.loads(stdout)
    assert final["status"] == "complete"
    assert (final["items"]["done"], final["chunks"]["done"]) == (20, 10)
    assert "pagent: task cc complete: 20 of 20 items done, 0 failed" in stderr
    assert re.search(r"^work .* 10/10 ", stderr, re.MULTILINE)  # the report agrees


def test_cancel_says_cancelled_in_plain_mode_and_status(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with gated_run(tmp_path) as (pipeline, data):
        proc = plain(["run", pipeline, "--data", data, "--task-id", "cn", "--json"], env)
        wait_until(lambda: (tmp_path / "at-gate").exists(), "record 11 at the gate")
        cancel = subprocess.run(
            [*PAGENT, "cancel", "cn"], env=env, capture_output=True, text=True, check=False
        )
        assert cancel.returncode == 0, cancel.stderr
        (tmp_path / "open-gate").touch()  # the next claim sees the cancel
        code, stdout, stderr = communicate(proc)
    summary = json.loads(stdout)
    assert (code, summary["status"], summary["stop_reason"]) == (1, "cancelled", "cancel")
    assert summary["nodes"]["work"]["state"] == "cancelled"
    assert "node work succeeded" not in stderr
    assert "node work cancelled" in stderr
    assert "pagent: stopped early: cancelled (pagent cancel)" in stderr
    status = subprocess.run(
        [*PAGENT, "status", "cn", "--json"], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout)["status"] == "cancelled"


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize(
    ("columns", "headings"),
    [
        (120, ["node", "time", "chunks", "items/s", "p50", "chunk", "p95", "chunk", "retries"]),
        (80, ["node", "time", "chunks", "items/s", "p50", "chunk", "p95", "chunk", "retries"]),
        (60, ["node", "time", "chunks", "items/s", "retries"]),
        (40, ["node", "time", "chunks"]),
    ],
)
def test_the_report_fits_the_terminal_at_any_width(
    tmp_path: Path, env: dict[str, str], columns: int, headings: list[str]
) -> None:
    """Issue 14 item 6, in a pseudo-terminal: the final report drops columns rather than
    clipping names and figures (`sp…  23 ms`, `ge…  12.64…` at 60 columns before)."""
    pipeline = tmp_path / "narrow.yaml"
    pipeline.write_text(
        """
name: narrow
nodes:
  - {name: split-records, type: planner, modules: [{use: split, chunk_size: 3}]}
  - name: geocode-addresses
    dependencies: [split-records]
    modules: [{use: map, expr: "1 / (item % 3)"}]
  - {name: collect, dependencies: [geocode-addresses], modules: [{use: aggregate}]}
"""
    )
    terminal = Terminal(["run", str(pipeline), "--data", numbers(tmp_path)], env, columns)
    code, _, screen = terminal.finish()
    assert code == 1, screen
    text = ANSI.sub("", screen).replace("\r", "")
    report = text[text.rindex("\nnode ") + 1 :].splitlines()
    assert all(len(line) <= columns for line in report), "\n".join(report)
    assert report[0].split()[: len(headings)] == headings
    assert report[0].split()[-1] == "failed"
    names = [line.split()[0] for line in report[2:5]]
    assert names[0].startswith("split-rec") and names[2] == "collect"
    geocode = report[3].split()
    assert geocode[0].startswith("geocode-a")  # at least 10 characters of a name
    assert geocode[-1] == "4" and "4/4" in geocode  # whole figures


COMMANDS = (
    "run", "validate", "schema", "graph", "status", "results", "failures", "list", "resume",
    "cancel", "gc", "worker", "workers",
)  # fmt: skip


def test_help_has_whole_summaries_readable_placeholders_and_an_example(cli: Any) -> None:
    """Issue 14 item 7: no `<list[str]>` or `<str>` placeholders for options, no summary cut off
    with `...`, an example in every command's help."""
    listing = cli("--help").stdout
    summaries = listing[listing.index("Commands:") :].splitlines()[1:]
    assert len(summaries) == len(COMMANDS)
    assert not any(line.rstrip().endswith("...") for line in summaries), listing
    for command in COMMANDS:
        text = cli(command, "--help").stdout
        assert "Example: pagent " + command in text.replace("\n  ", " "), text
        options = text[text.index("Options:") :]
        assert "<" not in options, text
    run_help = cli("run", "--help").stdout
    for placeholder in ("--set KEY=VALUE", "--data PATH", "--output PATH", "--max-failures N"):
        assert placeholder in run_help
    assert "Usage: pagent run [OPTIONS] {PIPELINE}" in run_help


# ---- a sample, and the Python entry point ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_head_processes_only_the_first_records(cli: Any, tmp_path: Path, fmt: str) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: 'record'}")
    data = tmp_path / f"in.{fmt}"
    rows = [{"n": str(i)} for i in range(10)]
    if fmt == "jsonl":
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        data.write_text(json.dumps(rows))
    else:
        data.write_text("n\n" + "".join(f"{i}\n" for i in range(10)))
    output = tmp_path / "out.json"
    args = ("run", pipeline, "--data", str(data), "--output", str(output), "--task-id", "h")
    result = cli(*args, "--head", "4", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == [1, 2, 3, 4]  # chunk 2 cut after its first record
    assert json.loads(result.stdout)["items"]["total"] == 4
    again = cli(*args)
    assert again.exit_code == 2
    assert "was started with --head 4, not every record" in again.stderr
    assert cli(*args, "--head", "0").exit_code == 2


def test_run_from_python_returns_the_summary_and_the_results(tmp_path: Path) -> None:
    import asyncio

    import parallel_agent
    from parallel_agent.errors import PipelineError

    pipeline = pipeline_with(tmp_path, "{use: map, expr: \"item * params['factor']\"}")
    data = numbers(tmp_path, 5)
    summary = parallel_agent.run(
        pipeline, data, params={"factor": 3}, results=True, store="memory://"
    )
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert summary.results == [0, 3, 6, 9, 12]
    assert summary.to_dict()["items"]["done"] == 5

    async def in_a_notebook_cell() -> Any:  # an event loop is running already
        return parallel_agent.run(
            pipeline, data, params={"factor": 2}, head=2, results=True, store="memory://"
        )

    sample = asyncio.run(in_a_notebook_cell())
    assert sample.results == [0, 2]
    output = tmp_path / "out.jsonl"
    parallel_agent.run(pipeline, data, params={"factor": 1}, output=output, store="memory://")
    assert output.read_text().split() == ["0", "1", "2", "3", "4"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(pipeline).read_text().replace("params['factor']", "factr"))
    with pytest.raises(PipelineError, match="NameError: name 'factr' is not defined"):
        parallel_agent.run(bad, data, store="memory://")


@pytest.mark.parametrize("store", ["", "memory://"])
def test_ctrl_c_in_plain_mode_says_interrupted(
    tmp_path: Path, env: dict[str, str], store: str
) -> None:
    options = ["--store", store] if store else []
    with gated_run(tmp_path) as (pipeline, data):
        proc = plain(["run", pipeline, "--data", data, "--task-id", "pc", *options], env)
        wait_until(lambda: (tmp_path / "at-gate").exists(), "record 11 at the gate")
        os.killpg(proc.pid, signal.SIGINT)
        (tmp_path / "open-gate").touch()
        code, stdout, stderr = communicate(proc)
    assert (code, stdout) == (130, "")
    assert "pagent: node work interrupted" in stderr
    assert "pagent: node collect not reached" in stderr
    assert "succeeded" not in stderr.replace("node split succeeded", "")
    assert re.search(r"task pc interrupted: \d+ of 20 items done", stderr)
    assert "pagent: stopped early: interrupted (Ctrl-C or a stop signal)" in stderr
    if store:  # nothing to resume: the store was the process's own memory
        assert stderr.rstrip().endswith(
            "run interrupted; its in-process store (memory://) is gone with it, so it cannot be resumed"
        )
    else:
        assert stderr.rstrip().endswith("run interrupted; resume it with: pagent resume pc")


def test_max_failures_in_a_terminal_says_why_it_stopped(
    tmp_path: Path, env: dict[str, str]
) -> None:
    pipeline = pipeline_with(tmp_path, "{use: map, expr: '1 / (item % 2)'}", "{concurrency: 1}")
    args = ["run", pipeline, "--data", numbers(tmp_path, 60), "--max-failures", "2", "--json"]
    terminal = Terminal(args, env)
    code, stdout, screen = terminal.finish()
    summary = json.loads(stdout)
    assert (code, summary["status"], summary["stop_reason"]) == (1, "failed", "max_failures")
    text = ANSI.sub("", screen)
    assert "stopped early: --max-failures exceeded: more than 2 items failed" in text
    assert re.search(r"work\s+(failed|partial)", text)
    assert not re.search(r"work\s+succeeded", text)


def test_runs_close_every_descriptor_connection_and_process_they_open(tmp_path: Path) -> None:
    """Issue 14 item 9: a long-lived process (a notebook, a worker) running pipeline after
    pipeline keeps its descriptors: SQLite connections, worker processes and their pipes, the
    pipes of `command` maps are all closed (Python 3.13 warns about each one left open)."""
    import gc
    import warnings

    import parallel_agent

    pipeline = tmp_path / "procs.yaml"
    pipeline.write_text(
        """
name: procs
nodes:
  - {name: split, modules: [{use: split, chunk_size: 3}]}
  - name: work
    dependencies: [split]
    modules: [{use: map, expr: "item * 2"}]
    node_config: {processes: 2}
  - {name: cmd, dependencies: [work], modules: [{use: map, command: "cat"}]}
  - {name: collect, dependencies: [cmd], modules: [{use: aggregate}]}
"""
    )
    data = numbers(tmp_path, 30)
    store = f"sqlite:///{tmp_path / 'state.db'}"

    def descriptors() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = parallel_agent.run(pipeline, data, store=store, results=True)
        assert first.results == list(range(0, 60, 2))
        before = descriptors()
        for _ in range(3):
            assert parallel_agent.run(pipeline, data, store=store).status == "complete"
        assert descriptors() == before
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_the_command_line_runs_the_work_with_the_garbage_collector_on(tmp_path: Path) -> None:
    """`pagent` turns the cyclic GC off while it starts (process.pause_collector); a run's own
    work, where user code may leave reference cycles, has it on again."""
    pipeline = pipeline_with(tmp_path, '{use: map, function: "steps_for_tests:collector_on"}')
    out = tmp_path / "out.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
        "PAGENT_STORE": f"sqlite:///{tmp_path / 'state.db'}",
    }
    done = subprocess.run(
        [*PAGENT, "run", pipeline, "--data", numbers(tmp_path, 4), "--output", str(out), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == [True] * 4
