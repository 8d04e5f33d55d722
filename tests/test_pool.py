"""`processes: N`: maps and filters on worker processes give the same results and the same failure
handling as in-process work, and never leave a worker process behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli, map_pipeline, numbers, write_pipeline  # noqa: F401 - fixture

WORKER = b"parallel_agent.modules.worker"


def worker_processes() -> list[int]:
    """Live worker processes started by this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and WORKER in cmdline:
            found.append(int(entry.name))
    return found


def run_map(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    module: str,
    node_config: str,
    count: int = 10,
    *extra: str,
) -> tuple[Any, Path]:
    output = tmp_path / "out.jsonl"
    pipeline = write_pipeline(tmp_path, map_pipeline(module, node_config))
    result = cli(
        "run", pipeline, "--data", numbers(tmp_path, count), "--output", str(output), *extra
    )
    assert worker_processes() == [], "a worker process outlived its run"
    return result, output


def lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "module",
    [
        "{use: map, function: 'steps_for_tests:double'}",
        "{use: map, expr: 'item * 2'}",
        "{use: map, function: 'steps_for_tests:batch_square', batch: true}",
        "{use: filter, function: 'steps_for_tests:is_even'}",
        "{use: filter, expr: 'item % 2 == 0'}",
    ],
)
def test_worker_processes_give_the_in_process_results(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    module: str,
) -> None:
    here, there = tmp_path / "in", tmp_path / "workers"
    here.mkdir()
    there.mkdir()
    expected, in_process = run_map(cli, here, module, "{concurrency: 2}", 25)
    result, output = run_map(cli, there, module, "{processes: 2}", 25)
    assert expected.exit_code == 0
    assert result.exit_code == 0, result.stderr
    assert output.read_bytes() == in_process.read_bytes()
    assert len(lines(output)) > 0


def test_item_errors_keep_their_record_numbers(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    module = "{use: map, function: 'steps_for_tests:fail_on_seven'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 2}", 10, "--json")
    assert result.exit_code == 1
    assert lines(output) == [i * 10 for i in range(10) if i != 7]
    task_id = json.loads(result.stdout)["task_id"]
    failures = cli("failures", task_id)
    listed = [json.loads(line) for line in failures.stdout.splitlines()]
    assert [(f["record"], f["input"]) for f in listed] == [(8, 7)]
    assert "ValueError: seven is not allowed" in listed[0]["error"]


def test_what_a_function_prints_never_reaches_the_output(
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    module = "{use: map, function: 'steps_for_tests:chatty_double'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 2}", 10)
    assert result.exit_code == 0, result.stderr
    assert lines(output) == [i * 2 for i in range(10)]


def test_unencodable_results_are_item_errors(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    module = "{use: map, function: 'steps_for_tests:returns_set'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 1}", 6, "--json")
    assert result.exit_code == 1
    assert lines(output) == [0, 1, 2, 4, 5]
    failures = cli("failures", json.loads(result.stdout)["task_id"])
    listed = [json.loads(line) for line in failures.stdout.splitlines()]
    assert [f["record"] for f in listed] == [4]
    assert "not JSON-serialisable" in listed[0]["error"]


@pytest.mark.parametrize(
    ("function", "config", "reason"),
    [
        ("dies_on_three", "", "worker process exited with status 3"),
        ("sleeps_on_three", ", timeout: 0.5", "timed out after 0.5 s"),
    ],
)
def test_a_worker_that_dies_or_hangs_fails_only_its_chunk(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    function: str,
    config: str,
    reason: str,
) -> None:
    """A crash ends the worker; a hang is stopped by killing it. A fresh worker takes the rest."""
    module = f"{{use: map, function: 'steps_for_tests:{function}'}}"
    node_config = f"{{processes: 2, max_retries: 1, retry_delay: 0{config}}}"
    result, output = run_map(cli, tmp_path, module, node_config, 9, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["chunks"] == {"total": 3, "done": 2, "failed": 1}
    assert lines(output) == [0, 1, 2, 6, 7, 8]
    failed = [json.loads(line) for line in cli("failures", summary["task_id"]).stdout.splitlines()]
    assert [f["record"] for f in failed] == [4, 5, 6]
    assert all(reason in f["error"] for f in failed)


@pytest.mark.parametrize(
    ("module", "config", "message"),
    [
        (
            "{use: map, command: 'cat'}",
            "{processes: 2}",
            "nodes[1].node_config.processes: processes needs a split, or a map or filter with expr or function",
        ),
        (
            "{use: map, function: 'steps_for_tests:double'}",
            "{processes: 2, rate_limit: 5}",
            "nodes[1].node_config.processes: processes cannot be combined with rate_limit",
        ),
        (
            "{use: map, function: 'steps_for_tests:async_increment'}",
            "{processes: 2}",
            "processes needs a sync function; 'steps_for_tests:async_increment' is async",
        ),
    ],
)
def test_processes_only_where_they_can_work(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    module: str,
    config: str,
    message: str,
) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline(module, config))
    result = cli("validate", pipeline)
    assert result.exit_code == 2
    assert message in result.stderr


def split_pipeline(processes: int) -> str:
    return f"""
name: test
nodes:
  - name: split
    type: planner
    modules: [{{use: split, chunk_size: 4}}]
    node_config: {{processes: {processes}}}
  - {{name: work, dependencies: [split], modules: [{{use: map, expr: "item['x'] * 2"}}]}}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate}}]}}
"""


def test_a_split_checks_json_lines_on_worker_processes(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "in.jsonl"
    data.write_bytes(
        b"".join(b'{"x": %d}\r\n' % i + (b"\n  \n" if i % 7 == 0 else b"") for i in range(30))
    )
    outputs = []
    for processes in (0, 2):
        output = tmp_path / f"out-{processes}.json"
        pipeline = write_pipeline(tmp_path, split_pipeline(processes), f"p{processes}.yaml")
        result = cli("run", pipeline, "--data", str(data), "--output", str(output))
        assert result.exit_code == 0, result.stderr
        outputs.append(json.loads(output.read_text()))
        assert worker_processes() == []
    assert outputs[0] == outputs[1] == [i * 2 for i in range(30)]


def test_a_split_on_workers_locates_bad_input_as_in_process(
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = tmp_path / "in.jsonl"
    lines = [b'{"x": %d}' % i for i in range(40)]
    lines[25] = b'{"x": 25,,}'
    data.write_bytes(b"\n".join(lines[:10]) + b"\n\n" + b"\n".join(lines[10:]) + b"\n")
    errors = []
    for processes in (0, 2):
        output = tmp_path / "out.json"
        pipeline = write_pipeline(tmp_path, split_pipeline(processes), f"p{processes}.yaml")
        result = cli("run", pipeline, "--data", str(data), "--output", str(output))
        assert result.exit_code == 3
        assert not output.exists()
        errors.append(result.stderr.strip().splitlines()[-1])
    assert errors[0] == errors[1]
    assert "in.jsonl, line 27, column 10, record 26: invalid JSON" in errors[1]


@pytest.mark.parametrize("config", ["{concurrency: 2}", "{processes: 2}"])
def test_a_filter_answer_that_cannot_be_tested_fails_only_its_item(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    config: str,
) -> None:
    module = "{use: filter, function: 'steps_for_tests:undecidable_on_three'}"
    result, output = run_map(cli, tmp_path, module, config, 6)
    assert result.exit_code == 1
    assert lines(output) == [0, 2, 4]


def test_user_code_in_a_worker_reads_an_empty_stdin(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    module = "{use: map, function: 'steps_for_tests:reads_stdin'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 1, timeout: 20}", 4)
    assert result.exit_code == 0, result.stderr
    assert lines(output) == [0, 1, 2, 3]
