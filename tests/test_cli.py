"""The command line contract: arguments, outputs, exit codes and one-line error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from parallel_agent.cli import app

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
TESTS = Path(__file__).resolve().parent
DEMO = str(PIPELINES / "parallel_processing.yaml")
NUMBERS = str(PIPELINES / "data" / "numbers.json")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Invoke pagent in-process with a private SQLite store; returns the click Result."""
    monkeypatch.setenv("PAGENT_STORE", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.setenv("PAGENT_TEST_MARKERS", str(tmp_path))
    monkeypatch.syspath_prepend(str(TESTS))
    runner = CliRunner()

    def invoke(*args: str, stdin: bytes | None = None) -> Any:
        return runner.invoke(app, list(args), input=stdin, catch_exceptions=False)

    return invoke


def write_pipeline(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def map_pipeline(
    map_module: str, node_config: str = "{}", chunk_size: int = 3, tail: str = ""
) -> str:
    return f"""
name: test
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk_size}}}]}}
  - name: work
    dependencies: [split]
    modules: [{map_module}]
    node_config: {node_config}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate{tail}}}]}}
"""


def numbers(tmp_path: Path, count: int = 10, name: str = "numbers.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(f"{i}\n" for i in range(count)))
    return str(path)


def test_walkthrough_pipeline_doubles_every_number(cli: Any, tmp_path: Path) -> None:
    output = tmp_path / "out.json"
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--output",
        str(output),
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == list(range(0, 40, 2))
    assert "task " in result.stderr and "started" in result.stderr


def test_json_summary_on_stdout(cli: Any, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--output",
        str(output),
        "--json",
        "--task-id",
        "summary-1",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["task_id"] == "summary-1"
    assert summary["status"] == "complete"
    assert summary["items"] == {"total": 20, "done": 20, "failed": 0, "output": 20}
    assert summary["chunks"] == {"total": 7, "done": 7, "failed": 0}
    assert summary["output"] == str(output)
    assert summary["duration_s"] >= 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == list(range(0, 40, 2))


def test_csv_in_csv_out_through_a_command(cli: Any, tmp_path: Path) -> None:
    output = tmp_path / "americas.csv"
    result = cli(
        "run",
        str(PIPELINES / "enrich_csv.yaml"),
        "--data",
        str(PIPELINES / "data" / "customers.csv"),
        "--output",
        str(output),
    )
    assert result.exit_code == 0, result.stderr
    lines = output.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,name,email,country,email_domain,region,name_length"
    assert lines[1].startswith('2,"Hopper, Grace",grace@example.com,US,example.com,AMER')
    assert len(lines) == 1 + 4


def test_rate_limited_async_example_groups_by_currency(cli: Any, tmp_path: Path) -> None:
    output = tmp_path / "totals.json"
    result = cli(
        "run",
        str(PIPELINES / "rate_limited_async.yaml"),
        "--data",
        str(PIPELINES / "data" / "orders.jsonl"),
        "--output",
        str(output),
    )
    assert result.exit_code == 0, result.stderr
    groups = json.loads(output.read_text())
    assert set(groups) <= {"EUR", "USD", "GBP", "JPY"}
    assert sum(len(orders) for orders in groups.values()) == 60
    assert all("price_eur" in order for orders in groups.values() for order in orders)


def test_csv_input_with_quotes_newlines_bom_and_blank_lines(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "people.csv"
    data.write_bytes('\ufeffname,note\n"Smith, J","line one\nline two"\n\nZoë,ünïcödé\n'.encode())
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: \"item['name']\"}"))
    output = tmp_path / "names.jsonl"
    result = cli("run", pipeline, "--data", str(data), "--output", str(output))
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()] == [
        "Smith, J",
        "Zoë",
    ]


def test_json_object_with_custom_data_key(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "wrapped.json"
    data.write_text(json.dumps({"meta": {"n": 3}, "rows": [1, 2, 3]}))
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: 'item + 1'}"))
    output = tmp_path / "out.json"
    result = cli(
        "run", pipeline, "--data", str(data), "--data-key", "rows", "--output", str(output)
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == [2, 3, 4]


def test_stdin_to_stdout(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path, map_pipeline("{use: map, function: 'steps_for_tests:double'}")
    )
    result = cli(
        "run",
        pipeline,
        "--data",
        "-",
        "--format",
        "jsonl",
        "--output",
        "-",
        "--quiet",
        stdin=b"1\n2\n3\n",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["2", "4", "6"]
    assert result.stderr == ""


def test_failed_item_is_reported_and_others_are_output(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path, map_pipeline("{use: map, function: 'steps_for_tests:fail_on_seven'}")
    )
    output = tmp_path / "out.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path), "--output", str(output), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "partial_failure"
    assert summary["items"]["failed"] == 1
    assert json.loads(output.read_text()) == [i * 10 for i in range(10) if i != 7]


def test_on_error_fail_chunk_fails_the_whole_chunk(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path,
        map_pipeline(
            "{use: map, function: 'steps_for_tests:fail_on_seven'}",
            "{on_error: fail_chunk, max_retries: 1, retry_delay: 0}",
        ),
    )
    output = tmp_path / "out.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path), "--output", str(output), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["chunks"]["failed"] == 1
    assert summary["items"]["failed"] == 3
    assert json.loads(output.read_text()) == [0, 10, 20, 30, 40, 50, 90]
    assert "record 8: ValueError: seven is not allowed" in result.stderr


def test_on_error_stop_stops_the_run(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path,
        map_pipeline("{use: map, function: 'steps_for_tests:fail_on_seven'}", "{on_error: stop}"),
    )
    output = tmp_path / "out.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path), "--output", str(output), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "failed"
    assert "on_error: stop" in json.loads(result.stdout)["error"]
    assert not output.exists()


def test_max_failures_stops_the_run(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: '1 / (item % 2)'}"))
    result = cli("run", pipeline, "--data", numbers(tmp_path, 30), "--max-failures", "2", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "failed"
    assert "--max-failures" in summary["error"]


def test_filter_and_reduce(cli: Any, tmp_path: Path) -> None:
    text = """
name: evens
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 4}]}
  - {name: evens, dependencies: [split], modules: [{use: filter, function: "steps_for_tests:is_even"}]}
  - {name: total, dependencies: [evens], modules: [{use: aggregate, reduce: sum}]}
"""
    output = tmp_path / "total.json"
    result = cli(
        "run", write_pipeline(tmp_path, text), "--data", numbers(tmp_path), "--output", str(output)
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == 0 + 2 + 4 + 6 + 8


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (", reduce: count", 10),
        (", reduce: max", 9),
        (", reduce: min", 0),
        (", expr: 'sum(results) * 2'", 90),
    ],
)
def test_aggregate_forms(cli: Any, tmp_path: Path, tail: str, expected: Any) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}", tail=tail))
    output = tmp_path / "value.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path), "--output", str(output))
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == expected


def test_batch_and_async_functions(cli: Any, tmp_path: Path) -> None:
    batch = write_pipeline(
        tmp_path,
        map_pipeline("{use: map, function: 'steps_for_tests:batch_square', batch: true}"),
        "b.yaml",
    )
    output = tmp_path / "squares.json"
    assert cli("run", batch, "--data", numbers(tmp_path), "--output", str(output)).exit_code == 0
    assert json.loads(output.read_text()) == [i * i for i in range(10)]
    asynchronous = write_pipeline(
        tmp_path,
        map_pipeline("{use: map, function: 'steps_for_tests:async_increment'}", "{concurrency: 5}"),
        "a.yaml",
    )
    assert (
        cli("run", asynchronous, "--data", numbers(tmp_path), "--output", str(output)).exit_code
        == 0
    )
    assert json.loads(output.read_text()) == [i + 1 for i in range(10)]


def test_batch_function_returning_too_few_results_fails_its_chunks(
    cli: Any, tmp_path: Path
) -> None:
    pipeline = write_pipeline(
        tmp_path,
        map_pipeline(
            "{use: map, function: 'steps_for_tests:batch_short', batch: true}",
            "{max_retries: 0}",
        ),
    )
    result = cli("run", pipeline, "--data", numbers(tmp_path), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["chunks"]["failed"] == 4
    assert "batch function returned 2 results for 3 records" in result.stderr


def test_command_failure_reports_stderr_tail(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path,
        map_pipeline(
            "{use: map, command: \"echo 'disk on fire' >&2; exit 3\"}", "{max_retries: 0}"
        ),
    )
    result = cli("run", pipeline, "--data", numbers(tmp_path, 3), "--json")
    assert result.exit_code == 1
    assert "command exited with status 3 on records 1-3: disk on fire" in result.stderr


def test_unserialisable_result_is_an_item_failure(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path, map_pipeline("{use: map, function: 'steps_for_tests:returns_set'}")
    )
    output = tmp_path / "out.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path, 6), "--output", str(output), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["items"]["failed"] == 1
    assert json.loads(output.read_text()) == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("processes", [0, 2])
def test_unserialisable_result_after_a_filter_keeps_its_record_number(
    cli: Any, tmp_path: Path, processes: int
) -> None:
    """Inputs 0-5 in one chunk; the filter drops 1 and 2, so the map sees 0, 3, 4, 5 and its set
    for 3 (input record 4) cannot be stored: the failure names record 4, the rest flows on."""
    pipeline = write_pipeline(
        tmp_path,
        f"""
name: test
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 6}}]}}
  - {{name: keep, dependencies: [split], modules: [{{use: filter, expr: "item not in (1, 2)"}}]}}
  - name: work
    dependencies: [keep]
    modules: [{{use: map, function: "steps_for_tests:returns_set"}}]
    node_config: {{processes: {processes}}}
  - name: after
    dependencies: [work]
    modules: [{{use: map, expr: "1 // (item - 5)"}}]
  - {{name: collect, dependencies: [after], modules: [{{use: aggregate}}]}}
""",
    )
    output = tmp_path / "out.json"
    result = cli("run", pipeline, "--data", numbers(tmp_path, 6), "--output", str(output), "--json")
    assert result.exit_code == 1
    assert json.loads(output.read_text()) == [1 // (0 - 5), 1 // (4 - 5)]
    listed = cli("failures", json.loads(result.stdout)["task_id"])
    failures = sorted((f["node"], f["record"]) for f in map(json.loads, listed.stdout.splitlines()))
    assert failures == [("after", 6), ("work", 4)]


def test_set_overrides_params_and_node_config(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path, map_pipeline("{use: map, expr: \"item * params['factor']\"}")
    )
    output = tmp_path / "out.json"
    result = cli(
        "run",
        pipeline,
        "--data",
        numbers(tmp_path, 4),
        "--output",
        str(output),
        "--set",
        "factor=5",
        "--set",
        "nodes.work.node_config.concurrency=1",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == [0, 5, 10, 15]


# ---- exit codes for bad usage, pipelines, input and output -------------------------------------


def assert_one_line_error(result: Any, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pagent: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_schema_error_names_the_key_path(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}", "{timeout: 0}"))
    result = cli("run", pipeline, "--data", numbers(tmp_path))
    assert_one_line_error(result, 2, "nodes[1].node_config.timeout")


def test_unknown_module_lists_known_ones(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: mapp, expr: item}"))
    result = cli("run", pipeline, "--data", numbers(tmp_path))
    assert result.exit_code == 2
    assert "unknown module 'mapp'" in result.stderr
    assert "aggregate, filter, map, split" in result.stderr


def test_function_that_cannot_be_imported(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, function: 'no_such_pkg.mod:fn'}"))
    result = cli("run", pipeline, "--data", numbers(tmp_path))
    assert_one_line_error(result, 2, "no_such_pkg.mod:fn")


def test_yaml_syntax_error_has_line_and_column(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, "name: x\nnodes: [\n  {name: a\n")
    result = cli("validate", pipeline)
    assert result.exit_code == 2
    assert "line" in result.stderr and "column" in result.stderr
    assert "Traceback" not in result.stderr


def test_cycle_is_rejected_naming_the_nodes(cli: Any, tmp_path: Path) -> None:
    text = """
name: cyclic
nodes:
  - {name: a, dependencies: [b], modules: [{use: map, expr: item}]}
  - {name: b, dependencies: [a], modules: [{use: map, expr: item}]}
"""
    result = cli("validate", write_pipeline(tmp_path, text))
    assert result.exit_code == 2
    assert "cycle" in result.stderr
    assert "'a'" in result.stderr or " a " in result.stderr


def test_missing_data_is_a_usage_error(cli: Any) -> None:
    result = cli("run", DEMO)
    assert_one_line_error(result, 2, "--data")


def test_stdin_needs_a_format(cli: Any) -> None:
    result = cli("run", DEMO, "--data", "-", stdin=b"1\n")
    assert_one_line_error(result, 2, "--format")


def test_malformed_json_lines_exit_3_with_location(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,,}\n')
    output = tmp_path / "out.json"
    result = cli(
        "run",
        DEMO,
        "--data",
        str(data),
        "--output",
        str(output),
    )
    assert_one_line_error(result, 3, "bad.jsonl", "line 3", "column", "record 3")
    assert not output.exists()


def test_malformed_json_exit_3(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "bad.json"
    data.write_text("[1, 2,\n 3, }\n")
    result = cli("run", DEMO, "--data", str(data))
    assert_one_line_error(result, 3, "bad.json", "line 2")


@pytest.mark.parametrize(
    "text",
    ['a,b\n1,2\n3,"oops\n5,6\n7,8\n', "a,b\n1,2\n3,4,5\n"],
    ids=["unterminated quote: where it opened", "ragged row"],
)
def test_bad_csv_names_its_line(cli: Any, tmp_path: Path, text: str) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(text)
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}"))
    result = cli("run", pipeline, "--data", str(data))
    assert_one_line_error(result, 3, "bad.csv", "line 3")


def test_unwritable_output_exit_5_before_running(cli: Any, tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "out.json"
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--output",
        str(target),
    )
    assert_one_line_error(result, 5, "missing-dir")
    assert not target.parent.exists()


def test_output_under_a_file_exit_5(cli: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--output",
        str(blocker / "o.json"),
    )
    assert result.exit_code == 5


def test_finished_task_id_is_reused_without_redoing_work(cli: Any, tmp_path: Path) -> None:
    args = (
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--task-id",
        "same",
        "--json",
    )
    first = cli(*args)
    assert first.exit_code == 0, first.stderr
    second = cli(*args)
    assert second.exit_code == 0, second.stderr
    assert json.loads(second.stdout)["reused"] is True
    other = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}"))
    third = cli("run", other, "--data", NUMBERS, "--task-id", "same")
    assert_one_line_error(third, 2, "different pipeline")


def test_validate_schema_version_help(cli: Any) -> None:
    assert cli("validate", DEMO).exit_code == 0
    schema = json.loads(cli("schema").stdout)
    assert "nodes" in json.dumps(schema)
    version = cli("--version")
    assert version.exit_code == 0 and version.stdout.startswith("pagent ")
    for command in ("run", "validate", "schema"):
        result = cli(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


@pytest.mark.redis
def test_run_on_real_redis(cli: Any, tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """On the shared server, under this test's own key prefix (the fixture deletes it): the
    default prefix would leave the run in the shared `pagent:runs` index."""
    output = tmp_path / "out.json"
    store = f"{redis_url}?prefix={redis_prefix.rstrip(':')}"
    result = cli("run", DEMO, "--data", NUMBERS, "--output", str(output), "--store", store)
    assert result.exit_code == 0, result.stderr
    assert json.loads(output.read_text()) == list(range(0, 40, 2))
    listed = cli("list", "--store", store, "--json")
    assert [run["status"] for run in json.loads(listed.stdout)] == ["complete"]


def test_no_escape_codes_when_not_a_terminal(cli: Any, tmp_path: Path) -> None:
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
    )
    assert result.exit_code == 0
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    assert os.environ.get("PAGENT_STORE", "").startswith("sqlite:///")


def test_events_file_has_the_run_as_json_lines(cli: Any, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--events",
        str(events),
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("chunk_done") == 7
    assert {"node_started", "node_finished", "chunks_planned", "chunk_started"} <= set(kinds)
    done = [line for line in lines if line["kind"] == "chunk_done"]
    assert sorted(line["chunk"] for line in done) == list(range(7))
    assert all(line["duration_s"] >= 0 and line["node"] == "processor" for line in done)
    assert lines[-1]["summary"]["items"]["done"] == 20


def test_events_to_stdout_conflicts_with_json(cli: Any) -> None:
    result = cli(
        "run",
        DEMO,
        "--data",
        NUMBERS,
        "--events",
        "-",
        "--json",
    )
    assert result.exit_code == 2


def test_graph_text_mermaid_and_dot(cli: Any, tmp_path: Path) -> None:
    text = """
name: looped
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 2}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item * 2"}]}
  - name: collect
    dependencies: [work]
    modules: [{use: aggregate}]
    node_config: {condition: "len(completed_subtasks) == len(subtasks)"}
  - name: loop
    type: flow_control
    decisions: [{next_node: work, condition: 'len(pending_subtasks) > 0 and "a|b" != "x"'}]
    default: collect
"""
    pipeline = write_pipeline(tmp_path, text)
    plain = cli("graph", pipeline)
    assert plain.exit_code == 0, plain.stderr
    assert plain.stdout.splitlines()[:4] == [
        "pipeline looped",
        "layer 1:",
        "  split [planner] split chunk_size: 2",
        "  loop [flow_control] flow control",
    ]
    assert "  collect [executor] aggregate (after work)" in plain.stdout
    assert "      runs only if: len(completed_subtasks) == len(subtasks)" in plain.stdout
    assert "      -> collect otherwise" in plain.stdout
    mermaid = cli("graph", pipeline, "--format", "mermaid").stdout
    assert mermaid.startswith("flowchart TD\n")
    assert "    split --> work" in mermaid and "    work --> collect" in mermaid
    assert (
        '-.->|"len(pending_subtasks) > 0 and #quot;a#124;b#quot; != #quot;x#quot;"| work' in mermaid
    )
    dot = cli("graph", pipeline, "--format", "dot").stdout
    assert dot.startswith('digraph "looped" {') and dot.rstrip().endswith("}")
    assert '"split" -> "work";' in dot
    assert 'label="len(pending_subtasks) > 0 and \\"a|b\\" != \\"x\\""' in dot
    assert cli("graph", pipeline, "--format", "svg").exit_code == 2


def test_several_pipeline_errors_are_each_one_prefixed_line(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: mapp, expr: item}", "{timeout: 0}"))
    result = cli("validate", pipeline)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"pagent: error: {pipeline}, line ") for line in lines)
    assert "unknown module 'mapp'" in lines[0] and "node_config.timeout: must be > 0" in lines[1]


def test_a_store_lost_while_renewing_a_lease_ends_the_run_with_exit_4(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat cannot renew (the store is gone past its retry budget): the chunk is not
    committed and the run ends with the store error, never a traceback or a silent retry."""
    from parallel_agent.errors import StoreError
    from parallel_agent.store.sqlite import SqliteStore

    async def unreachable(*args: Any, **kwargs: Any) -> bool:
        raise StoreError("store sqlite:///state.db failed: disk I/O error")

    monkeypatch.setattr(SqliteStore, "renew", unreachable)
    module = "{use: map, function: 'steps_for_tests:hangs_on_thirty'}"
    pipeline = write_pipeline(tmp_path, map_pipeline(module, "{lease: 0.3}", chunk_size=40))
    output = tmp_path / "out.jsonl"
    result = cli("run", pipeline, "--data", numbers(tmp_path, 40), "--output", str(output))
    assert result.exit_code == 4
    assert result.stderr.strip().splitlines()[-1].endswith("disk I/O error")
    assert "Traceback" not in result.stderr
    assert not output.exists()


# ---- end-of-run report, --failed-output, quiet and error output -------------------------------

FAILING_MAP = "{use: map, expr: \"100 // (int(item['id']) % 4)\"}"  # fails on ids 0, 4, 8
PEOPLE = [{"id": i, "name": f'Smith, "J{i}"\nline two' if i == 4 else f"n{i}"} for i in range(10)]


def people_file(tmp_path: Path, fmt: str) -> Path:
    """The same ten records as a JSON array, JSON Lines or CSV (CSV values are strings)."""
    path = tmp_path / f"people.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(PEOPLE, indent=1))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(person) + "\n" for person in PEOPLE))
    else:
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "name"])
            writer.writerows([person["id"], person["name"]] for person in PEOPLE)
    return path


def read_records(path: Path, fmt: str) -> list[Any]:
    if fmt == "json":
        return list(json.loads(path.read_text()))
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_failed_output_writes_the_failed_records_in_the_input_format(
    cli: Any, tmp_path: Path, fmt: str
) -> None:
    data = people_file(tmp_path, fmt)
    expected = [record for record in read_records(data, fmt) if int(record["id"]) % 4 == 0]
    assert [int(record["id"]) for record in expected] == [0, 4, 8]
    failed = tmp_path / f"failed.{fmt}"
    pipeline = write_pipeline(tmp_path, map_pipeline(FAILING_MAP))
    result = cli("run", pipeline, "--data", str(data), "--failed-output", str(failed), "--json")
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["failed_output"] == {"path": str(failed), "records": 3}
    assert read_records(failed, fmt) == expected
    if fmt == "csv":
        assert failed.read_text().splitlines()[0] == "id,name"
    assert f"pagent: 3 failed records written to {failed}" in result.stderr

    # fed back to `pagent run`, the file gives exactly those records
    identity = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}"), "identity.yaml")
    again = tmp_path / "again.jsonl"
    rerun = cli("run", identity, "--data", str(failed), "--output", str(again), "--quiet")
    assert rerun.exit_code == 0, rerun.stderr
    assert [json.loads(line) for line in again.read_text().splitlines()] == expected

    # and `pagent failures ID --output` writes the same file from the store
    task_id = summary["task_id"]
    copy = tmp_path / f"copy.{fmt}"
    exported = cli("failures", task_id, "--output", str(copy))
    assert exported.exit_code == 0, exported.stderr
    assert copy.read_bytes() == failed.read_bytes()


def test_failed_output_of_a_run_without_failures_keeps_the_csv_header(
    cli: Any, tmp_path: Path
) -> None:
    data = people_file(tmp_path, "csv")
    failed = tmp_path / "failed.csv"
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}"))
    result = cli("run", pipeline, "--data", str(data), "--failed-output", str(failed))
    assert result.exit_code == 0, result.stderr
    assert failed.read_text() == "id,name\n"


def test_failed_output_includes_records_of_failed_chunks(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path,
        map_pipeline(
            "{use: map, function: 'steps_for_tests:fail_on_seven'}",
            "{on_error: fail_chunk, max_retries: 0}",
        ),
    )
    failed = tmp_path / "failed.jsonl"
    result = cli(
        "run", pipeline, "--data", numbers(tmp_path), "--failed-output", str(failed), "--json"
    )
    assert result.exit_code == 1
    assert failed.read_text().split() == ["6", "7", "8"]  # chunk 2 holds records 7-9


def test_failed_output_is_checked_before_the_run(cli: Any, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline(FAILING_MAP))
    data = str(people_file(tmp_path, "csv"))
    wrong = cli("run", pipeline, "--data", data, "--failed-output", str(tmp_path / "f.json"))
    assert_one_line_error(wrong, 2, "input's format (csv)", "f.json")
    missing = cli(
        "run", pipeline, "--data", data, "--failed-output", str(tmp_path / "no" / "f.csv")
    )
    assert_one_line_error(missing, 5, "does not exist")
    stdin = cli(
        "run",
        pipeline,
        "--data",
        "-",
        "--format",
        "jsonl",
        "--failed-output",
        str(tmp_path / "f.jsonl"),
        stdin=b'{"id": 1}\n',
    )
    assert_one_line_error(stdin, 2, "--failed-output needs --data PATH")
    same = cli("run", pipeline, "--data", data, "--failed-output", data)
    assert_one_line_error(same, 2, "is the same file as --data")
    assert cli("list").stdout == ""  # nothing ran


def test_end_of_run_report_in_plain_mode_json_and_status(cli: Any, tmp_path: Path) -> None:
    data = people_file(tmp_path, "jsonl")
    pipeline = write_pipeline(tmp_path, map_pipeline(FAILING_MAP, "{max_retries: 0}"))
    result = cli("run", pipeline, "--data", str(data), "--json", "--task-id", "rep-1")
    assert result.exit_code == 1
    assert "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert all(len(line) <= 80 for line in lines)
    start = next(
        i for i, line in enumerate(lines) if line.startswith("pagent: task rep-1 partial_failure:")
    )
    assert lines[start].startswith(
        "pagent: task rep-1 partial_failure: 7 of 10 items done, 3 failed"
    )
    table = lines[start + 1 :]
    assert table[0].split() == (
        ["node", "time", "chunks", "items/s", "p50", "chunk", "p95", "chunk", "retries", "failed"]
    )
    assert [row.split()[0] for row in table[1:4]] == ["split", "work", "collect"]
    work = table[2].split()
    assert work[3] == "4/4" and work[-2:] == ["0", "3"]  # chunks; retries, failed items
    assert table[1].split()[3:] == ["-"] * 6  # the split has no chunks
    assert table[4:] == [
        "records in -> out:",
        "  work  10 -> 7  (3 failed)",
        "failed records by error type:",
        "  3  ZeroDivisionError  records 1, 5, 9  in work",
        '     e.g. ZeroDivisionError: integer division or modulo by zero in expression "…',
    ]  # clipped at 80 columns

    report = json.loads(result.stdout)["report"]
    assert [node["node"] for node in report["nodes"]] == ["split", "work", "collect"]
    work_node = report["nodes"][1]
    assert work_node["chunks"] == 4 and work_node["chunks_done"] == 4
    assert work_node["items_processed"] == 10 and work_node["items_failed"] == 3
    assert work_node["chunk_p50_s"] is not None and work_node["duration_s"] > 0
    assert len(report["failures"]) == 1
    group = report["failures"][0]
    assert group["error_type"] == "ZeroDivisionError"
    assert (group["count"], group["first_records"], group["nodes"]) == (3, [1, 5, 9], ["work"])

    status = cli("status", "rep-1", "--json")
    assert status.exit_code == 0
    assert json.loads(status.stdout)["report"]["failures"] == report["failures"]
    text = cli("status", "rep-1").stdout
    assert "failed records by error type:" in text
    assert "  3  ZeroDivisionError  records 1, 5, 9  in work" in text


def test_quiet_prints_nothing_even_with_failures(cli: Any, tmp_path: Path) -> None:
    data = people_file(tmp_path, "jsonl")
    pipeline = write_pipeline(tmp_path, map_pipeline(FAILING_MAP, "{max_retries: 0}"))
    result = cli("run", pipeline, "--data", str(data), "--quiet", "--json")
    assert result.exit_code == 1
    assert result.stderr == ""
    assert json.loads(result.stdout)["report"]["failures"][0]["count"] == 3


@pytest.mark.parametrize(
    ("name", "content"),
    [("bad.json", "[1, 2,\n 3, }\n"), ("bad.jsonl", '{"a": 1}\n{"a": 2,,}\n')],
)
def test_bad_input_prints_only_the_task_line_and_one_error(
    cli: Any, tmp_path: Path, name: str, content: str
) -> None:
    data = tmp_path / name
    data.write_text(content)
    result = cli("run", DEMO, "--data", str(data), "--store", "memory://")
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("pagent: task ") and lines[0].endswith(
        "started (pipeline parallel-processing)"
    )
    assert lines[1].startswith(f"pagent: error: {data}, line 2, column ")


def test_resume_adds_its_time_to_the_report_and_writes_failed_output(
    cli: Any, tmp_path: Path
) -> None:
    data = people_file(tmp_path, "jsonl")
    pipeline = write_pipeline(tmp_path, map_pipeline(FAILING_MAP, "{max_retries: 0}"))
    first = cli("run", pipeline, "--data", str(data), "--task-id", "res-1", "--json", "--quiet")
    assert first.exit_code == 1
    failed = tmp_path / "failed.jsonl"
    again = cli("resume", "res-1", "--failed-output", str(failed), "--json", "--quiet")
    assert again.exit_code == 1
    before = {n["node"]: n for n in json.loads(first.stdout)["report"]["nodes"]}
    after = {n["node"]: n for n in json.loads(again.stdout)["report"]["nodes"]}
    for node in ("split", "work", "collect"):  # the first run's time plus the resume's
        assert after[node]["duration_s"] >= before[node]["duration_s"] >= 0
    assert after["work"]["chunks_done"] == before["work"]["chunks_done"] == 4
    assert [json.loads(line)["id"] for line in failed.read_text().splitlines()] == [0, 4, 8]


@pytest.mark.parametrize("finished", ["partial", "complete"])
def test_run_under_an_earlier_task_id_refuses_a_changed_input(
    cli: Any, tmp_path: Path, finished: str
) -> None:
    """`pagent run --task-id T` continues (or reuses) run T, whose finished chunks came from
    the input as it was: a changed input, even of the same size, is exit 3 and no output, as
    for `pagent resume`, never old and new records mixed under exit 0."""
    data = people_file(tmp_path, "jsonl")
    text = FAILING_MAP if finished == "partial" else "{use: map, expr: item}"
    pipeline = write_pipeline(tmp_path, map_pipeline(text, "{max_retries: 0}"))
    first = cli("run", pipeline, "--data", str(data), "--task-id", "same", "--quiet")
    assert first.exit_code == (1 if finished == "partial" else 0), first.stderr
    original = data.read_bytes()
    changed = original.replace(b'"id": 5', b'"id": 7', 1)
    assert changed != original and len(changed) == len(original)
    data.write_bytes(changed)
    output = tmp_path / "out.json"
    again = cli("run", pipeline, "--data", str(data), "--task-id", "same", "--output", str(output))
    assert again.exit_code == 3, again.stderr
    assert "changed since it started" in again.stderr and "new --task-id" in again.stderr
    assert not output.exists()
    resumed = cli("resume", "same", "--output", str(output))
    assert resumed.exit_code == 3 and not output.exists()
    data.write_bytes(original)  # the input as the run read it: the run goes on
    assert (
        cli("run", pipeline, "--data", str(data), "--task-id", "same").exit_code == first.exit_code
    )


def test_stdin_under_an_earlier_task_id_is_refused(cli: Any, tmp_path: Path) -> None:
    """Standard input cannot be compared with what a run read: reading it under an existing
    task id, or continuing a run that read it with a file, is exit 2, never that run's output."""
    data = people_file(tmp_path, "jsonl")
    pipeline = write_pipeline(tmp_path, map_pipeline("{use: map, expr: item}"))
    output = tmp_path / "out.json"
    assert cli("run", pipeline, "--data", str(data), "--task-id", "file").exit_code == 0
    piped = cli(
        "run", pipeline, "--data", "-", "--format", "jsonl", "--task-id", "file",
        "--output", str(output), stdin=b'{"id": 99}\n',
    )  # fmt: skip
    assert piped.exit_code == 2 and "standard input cannot be compared" in piped.stderr
    first = cli(
        "run", pipeline, "--data", "-", "--format", "jsonl", "--task-id", "piped",
        stdin=data.read_bytes(),
    )  # fmt: skip
    assert first.exit_code == 0, first.stderr
    again = cli("run", pipeline, "--data", str(data), "--task-id", "piped", "--output", str(output))
    assert again.exit_code == 2 and "standard input cannot be compared" in again.stderr
    assert not output.exists()


@pytest.mark.parametrize("processes", [0, 2])
def test_failures_after_filters_and_failed_items_keep_their_input_record_numbers(
    cli: Any, tmp_path: Path, processes: int
) -> None:
    """Every node numbers a failure by the input record it came from, even when a filter upstream
    dropped items or a map upstream failed some (input i is record i + 1): the third chunk holds
    inputs 6, 7, 8; `keep` drops 7, `scale` fails on 8, and `invert` fails on what 6 became.
    In this process and on worker processes alike."""
    config = f"node_config: {{processes: {processes}}}"
    pipeline = write_pipeline(
        tmp_path,
        f"""
name: test
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 3}}]}}
  - name: keep
    dependencies: [split]
    modules: [{{use: filter, expr: "item % 2 == 0 and 1 / (item - 4) != 0"}}]
    {config}
  - name: scale
    dependencies: [keep]
    modules: [{{use: map, expr: "item * 10 if item != 8 else 1 / 0"}}]
    {config}
  - name: invert
    dependencies: [scale]
    modules: [{{use: map, expr: "1 / (item - 60)"}}]
    {config}
  - {{name: collect, dependencies: [invert], modules: [{{use: aggregate}}]}}
""",
    )
    failed = tmp_path / "failed.jsonl"
    output = tmp_path / "out.json"
    data = numbers(tmp_path)
    events = tmp_path / "events.jsonl"
    args = ["--data", data, "--output", str(output), "--failed-output", str(failed), "--json"]
    result = cli("run", pipeline, *args, "--events", str(events))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["failed_output"] == {"path": str(failed), "records": 3}
    assert [json.loads(line) for line in failed.read_text().splitlines()] == [4, 6, 8]
    assert json.loads(output.read_text()) == [1 / (0 - 60), 1 / (20 - 60)]
    listed = cli("failures", summary["task_id"])
    failures = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted((f["node"], f["record"], f["input"]) for f in failures) == [
        ("invert", 7, 60),
        ("keep", 5, 4),
        ("scale", 9, 8),
    ]
    nodes = summary["nodes"]
    # each node counts the items it received: 10 read, 4 kept (0 2 6 8), 3 scaled (0 2 6)
    assert [nodes[name]["items"] for name in ("keep", "scale", "invert")] == [10, 4, 3]
    assert [nodes[name]["items_failed"] for name in ("keep", "scale", "invert")] == [1, 1, 1]
    # every data node tells the displays what it was given (its row shows done/total chunks)
    planned = {
        line["node"]: (line["chunks"], line["items"])
        for line in map(json.loads, events.read_text().splitlines())
        if line["kind"] == "chunks_planned"
    }
    assert planned == {"keep": (4, 10), "scale": (4, 4), "invert": (4, 3)}


def test_resume_keeps_the_runs_overrides_and_a_refused_resume_changes_nothing(
    cli: Any, tmp_path: Path
) -> None:
    """A run started with `--set` resumes with the same overrides (resume has no `--set`; it
    took the file alone and refused it as a different pipeline). A resume refused because the
    pipeline changed (exit 2) leaves the run as it was: its state, and with `--retry-failed`
    its failed records."""
    pipeline = write_pipeline(
        tmp_path,
        map_pipeline("{use: map, expr: \"params['k'] // item\"}", node_config="{max_retries: 0}"),
    )
    data = numbers(tmp_path, 5)
    output = tmp_path / "out.json"
    args = ("--data", data, "--task-id", "sets", "--output", str(output))
    first = cli("run", pipeline, *args, "--set", "k=12")
    assert first.exit_code == 1, first.stderr  # item 0: ZeroDivisionError
    assert json.loads(output.read_text()) == [12, 6, 4, 3]
    again = cli("resume", "sets", "--retry-failed")
    assert again.exit_code == 1, again.stderr  # the same failure, with k=12 as before
    assert json.loads(output.read_text()) == [12, 6, 4, 3]

    def state() -> tuple[str, str]:
        status = json.loads(cli("status", "sets", "--json").stdout)
        return status["status"], cli("failures", "sets").stdout

    before = state()
    assert before[0] == "partial_failure" and "ZeroDivisionError" in before[1]
    Path(pipeline).write_text(Path(pipeline).read_text().replace("name: test", "name: edited"))
    for flags in ((), ("--retry-failed",)):
        refused = cli("resume", "sets", *flags)
        assert_one_line_error(refused, 2, "different pipeline")
        assert state() == before
