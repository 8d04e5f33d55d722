"""Pipeline files: YAML safety, errors with key path, line and column, overrides, hashing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from parallel_agent.errors import Location, PipelineError, UsageError
from parallel_agent.pipeline import (
    AggregateSpec,
    ClassSpec,
    FilterSpec,
    MapSpec,
    SplitSpec,
    apply_overrides,
    load_pipeline,
    load_pipeline_text,
    pipeline_hash,
)
from parallel_agent.pipeline.loader import MAX_ALIASES, MAX_ERRORS, MAX_VALUES, check_pipeline_text

EXAMPLE = """\
name: parallel-processing
description: optional text
agent: {max_concurrent_tasks: 3, max_total_iterations: 50}
task: {type: parallel_processing, objective: Double every number, params: {factor: 2}}
nodes:
  - name: splitter
    type: planner
    modules: [{use: split, chunk_size: 3}]
  - name: processor
    type: executor
    dependencies: [splitter]
    modules: [{use: map, expr: "item * 2"}]       # or function: "pkg.mod:callable"
    node_config: {concurrency: 3, max_retries: 2, timeout: 30}
  - name: aggregator
    type: executor
    dependencies: [processor]
    modules: [{use: aggregate}]
    node_config: {condition: "len(completed_subtasks) == len(subtasks)"}
  - name: router
    type: flow_control
    decisions: [{next_node: processor, condition: "len(pending) > 0"}]
    default: aggregator
"""

TINY = "name: p\nnodes: [{name: a, modules: [{use: split}]}]\n"


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(PipelineError) as caught:
        load_pipeline_text(text, "p.yaml", overrides)
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_the_example_loads() -> None:
    pipeline = load_pipeline_text(EXAMPLE)
    assert pipeline.name == "parallel-processing"
    assert pipeline.description == "optional text"
    assert pipeline.agent.max_concurrent_tasks == 3
    assert pipeline.task.type == "parallel_processing"
    assert pipeline.task.params == {"factor": 2}
    assert [(n.name, n.type) for n in pipeline.nodes] == [
        ("splitter", "planner"),
        ("processor", "executor"),
        ("aggregator", "executor"),
        ("router", "flow_control"),
    ]
    assert pipeline.nodes[1].modules == [MapSpec(use="map", expr="item * 2")]
    assert pipeline.nodes[1].node_config.timeout == 30
    assert pipeline.nodes[3].default == "aggregator"


def test_every_module_form_loads() -> None:
    text = """\
name: forms
nodes:
  - {name: s, modules: [{use: split}]}
  - {name: m1, dependencies: [s], modules: [{use: map, function: "pkg.mod:f", batch: true}]}
  - {name: m2, dependencies: [s], modules: [{use: map, command: "jq -c .", env: {LANG: C}}]}
  - {name: f, dependencies: [m1], modules: [{use: filter, expr: "item > 2"}]}
  - {name: a, dependencies: [f], modules: [{use: aggregate, reduce: sum, field: n}]}
  - {name: c, dependencies: [a], modules: [{class: "pkg.mod:Thing", params: {n: 1}}]}
"""
    modules = [node.modules[0] for node in load_pipeline_text(text).nodes]
    assert modules == [
        SplitSpec(use="split"),
        MapSpec(use="map", function="pkg.mod:f", batch=True),
        MapSpec(use="map", command="jq -c .", env={"LANG": "C"}),
        FilterSpec(use="filter", expr="item > 2"),
        AggregateSpec(use="aggregate", reduce="sum", field="n"),
        ClassSpec(class_="pkg.mod:Thing", params={"n": 1}),
    ]


def test_load_pipeline_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    assert load_pipeline(path).name == "parallel-processing"
    assert load_pipeline(str(path), ["factor=3"]).task.params == {"factor": 3}


# ---- schema errors: path, line, column, short message ---------------------------------------


def test_schema_error_names_file_line_column_and_path() -> None:
    text = EXAMPLE.replace("timeout: 30", "timeout: 0")
    with pytest.raises(PipelineError) as caught:
        load_pipeline_text(text, "pipeline.yaml")
    assert str(caught.value) == (
        "pipeline.yaml, line 13, column 51: nodes[1].node_config.timeout: must be > 0"
    )
    assert caught.value.location == Location("pipeline.yaml", 13, 51)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "{concurrency: 3,",
            "{concurency: 3,",
            "p.yaml, line 13, column 19: nodes[1].node_config.concurency: unknown key 'concurency' (did you mean 'concurrency'?)",
        ),
        (
            "use: map",
            "use: mapp",
            "p.yaml, line 12, column 16: nodes[1].modules[0].use: unknown module 'mapp'; "
            "known modules: aggregate, filter, map, split",
        ),
        (
            "dependencies: [processor]",
            "dependencies: [procesor]",
            "p.yaml, line 16, column 20: nodes[2].dependencies[0]: "
            "unknown node 'procesor' (did you mean 'processor'?)",
        ),
        (
            "default: aggregator",
            "default: nowhere",
            "p.yaml, line 22, column 5: nodes[3].default: unknown node 'nowhere'",
        ),
        (
            "next_node: processor",
            "next_node: procesor",
            "p.yaml, line 21, column 18: nodes[3].decisions[0].next_node: "
            "unknown node 'procesor' (did you mean 'processor'?)",
        ),
        (
            "name: parallel-processing\n",
            "",
            "p.yaml, line 1, column 1: name: required",
        ),
        (
            "concurrency: 3",
            "concurrency: three",
            "p.yaml, line 13, column 19: nodes[1].node_config.concurrency: must be an integer",
        ),
        (
            "chunk_size: 3",
            "chunk_size: 0",
            "p.yaml, line 8, column 28: nodes[0].modules[0].chunk_size: must be >= 1",
        ),
        (
            'expr: "item * 2"',
            'function: "not a path"',
            "p.yaml, line 12, column 26: nodes[1].modules[0].function: "
            "must look like 'package.module:attribute'",
        ),
        (
            'expr: "item * 2"',
            'expr: "item", command: cat',
            "p.yaml, line 12, column 15: nodes[1].modules[0]: "
            "give exactly one of expr, function, command",
        ),
        (
            "type: planner",
            "type: planer",
            "p.yaml, line 7, column 5: nodes[0].type: "
            "must be one of 'planner', 'executor', 'flow_control' or 'subgraph'",
        ),
        (
            "  - name: router\n",
            "  - name: 2router\n",
            "p.yaml, line 19, column 5: nodes[3].name: "
            "must start with a letter or _ and hold only letters, digits, _ and -",
        ),
    ],
)
def test_error_messages(old: str, new: str, expected: str) -> None:
    assert old in EXAMPLE
    assert error_of(EXAMPLE.replace(old, new, 1)) == expected


def test_flow_control_rules_are_located() -> None:
    text = EXAMPLE.replace("    default: aggregator\n", "    modules: [{use: aggregate}]\n")
    assert error_of(text) == (
        "p.yaml, line 22, column 5: nodes[3].modules: "
        "a flow_control node takes decisions and default, not modules"
    )
    text = EXAMPLE.replace("    type: flow_control\n", "")
    assert error_of(text) == (
        "p.yaml, line 19, column 5: nodes[3].modules: an executor node needs at least one module\n"
        "p.yaml, line 20, column 5: nodes[3].decisions: only flow_control nodes take decisions\n"
        "p.yaml, line 21, column 5: nodes[3].default: only flow_control nodes take a default"
    )


def test_several_errors_one_per_line_in_file_order() -> None:
    text = EXAMPLE.replace("timeout: 30", "timeout: -1").replace(
        "max_total_iterations: 50", "max_total_iterations: 0"
    )
    message = error_of(text)
    assert message.splitlines() == [
        "p.yaml, line 3, column 34: agent.max_total_iterations: must be >= 1",
        "p.yaml, line 13, column 51: nodes[1].node_config.timeout: must be > 0",
    ]


def test_a_flood_of_errors_is_cut_short() -> None:
    nodes = "".join(
        f"  - {{name: n{i}, modules: [{{use: split, chunk_size: 0}}]}}\n" for i in range(30)
    )
    lines = error_of("name: p\nnodes:\n" + nodes).splitlines()
    assert len(lines) == MAX_ERRORS + 1
    assert lines[0] == "p.yaml, line 3, column 39: nodes[0].modules[0].chunk_size: must be >= 1"
    assert lines[-1] == f"... and {30 - MAX_ERRORS} more errors"


def test_dependency_cycle_is_reported() -> None:
    text = EXAMPLE.replace(
        "modules: [{use: split, chunk_size: 3}]",
        "modules: [{use: split}]\n    dependencies: [aggregator]",
    )
    message = error_of(text)
    assert message.startswith("p.yaml, line ")
    assert "dependency cycle: " in message
    assert all(f"'{name}'" in message for name in ("splitter", "processor", "aggregator"))


# ---- YAML safety ------------------------------------------------------------------------------


def test_duplicate_keys_are_refused_at_the_second_one() -> None:
    assert (
        error_of("name: a\nnodes: []\nname: b\n")
        == "p.yaml, line 3, column 1: duplicate key 'name'"
    )
    nested = EXAMPLE.replace("{concurrency: 3,", "{concurrency: 3, concurrency: 4,")
    assert error_of(nested) == "p.yaml, line 13, column 35: duplicate key 'concurrency'"


def test_merge_keys_may_be_overridden_but_not_repeated() -> None:
    text = """\
name: p
nodes:
  - name: a
    modules: [{use: split}]
    node_config: &cfg {max_retries: 1, timeout: 3}
  - name: b
    dependencies: [a]
    modules: [{use: map, expr: item}]
    node_config: {<<: *cfg, max_retries: 5}
"""
    config = load_pipeline_text(text).nodes[1].node_config
    assert (config.max_retries, config.timeout) == (5, 3)
    repeated = text.replace("max_retries: 5}", "max_retries: 5, max_retries: 6}")
    assert error_of(repeated) == "p.yaml, line 9, column 45: duplicate key 'max_retries'"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("on: 1", "p.yaml, line 3, column 1: key 'on' is read as a bool, not a string; quote it"),
        ("1: x", "p.yaml, line 3, column 1: key '1' is read as a int, not a string; quote it"),
        ("[a]: x", "p.yaml, line 3, column 1: a key must be a string, not a list or mapping"),
    ],
)
def test_keys_must_be_strings(line: str, expected: str) -> None:
    assert error_of(TINY + line + "\n") == expected


def test_quoted_keys_and_dates_stay_strings() -> None:
    text = TINY + "task: {params: {'on': 1, '1': 2, day: 2024-01-31}}\n"
    assert load_pipeline_text(text).task.params == {"on": 1, "1": 2, "day": "2024-01-31"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "!!binary aGk=",
            "p.yaml, line 3, column 20: unsupported YAML tag 'tag:yaml.org,2002:binary'",
        ),
        ("!!set {a}", "p.yaml, line 3, column 20: unsupported YAML tag 'tag:yaml.org,2002:set'"),
        ("!custom 3", "p.yaml, line 3, column 20: unsupported YAML tag '!custom'"),
        ("!!int ten", "p.yaml, line 3, column 20: 'ten' is not a valid int"),
        (
            "!!python/object:os.system x",
            "p.yaml, line 3, column 20: unsupported YAML tag 'tag:yaml.org,2002:python/object:os.system'",
        ),
    ],
)
def test_only_plain_json_values(value: str, expected: str) -> None:
    assert error_of(TINY + f"task: {{params: {{x: {value}}}}}\n") == expected


def billion_laughs(width: int, levels: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n" + TINY


@pytest.mark.parametrize(("width", "levels"), [(9, 9), (2, 45)])
def test_alias_bombs_are_refused_quickly(width: int, levels: int) -> None:
    started = time.monotonic()
    message = error_of(billion_laughs(width, levels))
    assert message.endswith(
        f"the document expands to more than {MAX_VALUES} values (refusing a possible alias bomb)"
    )
    assert time.monotonic() - started < 10, "a liveness bound, not a speed test"


def test_too_many_aliases_are_refused() -> None:
    text = "x: &x 1\nys: [" + ", ".join(["*x"] * (MAX_ALIASES + 1)) + "]\n" + TINY
    expected = f"p.yaml, line 2, column {6 + 4 * MAX_ALIASES}: more than {MAX_ALIASES} aliases"
    assert error_of(text).startswith(expected)


def test_a_value_containing_itself_is_refused() -> None:
    assert error_of(TINY + "task: &t {params: {me: *t}}\n") == (
        "p.yaml, line 3, column 7: an alias refers to a value that contains it"
    )


def test_anchors_within_budget_work() -> None:
    text = TINY.replace("name: p", "name: &n p") + "description: *n\n"
    assert load_pipeline_text(text).description == "p"


# ---- unreadable, empty, malformed -----------------------------------------------------------


def test_yaml_syntax_error_has_line_column_and_problem() -> None:
    message = error_of("name: x\nnodes: [\n  {name: a\n")
    assert message.startswith("p.yaml, line 4, column 1: YAML syntax error: expected ',' or '}'")


def test_tab_indentation_is_a_syntax_error_with_position() -> None:
    message = error_of("name: x\nnodes:\n\t- a\n")
    assert message.startswith("p.yaml, line 3, column 1: YAML syntax error: found character '\\t'")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n"])
def test_empty_pipeline(text: str) -> None:
    assert error_of(text) == "p.yaml: the pipeline is empty"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert error_of(text) == (
        "p.yaml, line 1, column 1: the pipeline must be a mapping with name and nodes"
    )


def test_one_document_only() -> None:
    message = error_of(TINY + "---\n" + TINY)
    assert message == (
        "p.yaml, line 3, column 1: YAML syntax error: but found another document "
        "(expected a single document in the stream)"
    )


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    message = error_of("name: p\nnodes: " + "[" * 5000 + "]" * 5000 + "\n")
    assert message == "p.yaml: the YAML is nested too deeply"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path)
    assert str(caught.value) == f"cannot read pipeline {path}: No such file or directory"
    assert caught.value.exit_code == 2


def test_directory_and_binary_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="Is a directory"):
        load_pipeline(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(PipelineError, match=f"cannot read pipeline {binary}: .*utf-8"):
        load_pipeline(binary)


def test_a_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + TINY.encode())
    assert load_pipeline(path).name == "p"


# ---- overrides -------------------------------------------------------------------------------


def test_overrides_set_params_node_keys_and_agent() -> None:
    pipeline = load_pipeline_text(
        EXAMPLE,
        overrides=(
            "factor=3",
            "label=a b",
            "nodes.processor.node_config.concurrency=8",
            "nodes.processor.modules.0.expr=item + 1",
            "agent.max_concurrent_tasks=2",
            "nodes.aggregator.node_config.parallel=true",
        ),
    )
    assert pipeline.task.params == {"factor": 3, "label": "a b"}
    assert pipeline.nodes[1].node_config.concurrency == 8
    assert pipeline.nodes[1].modules[0] == MapSpec(use="map", expr="item + 1")
    assert pipeline.agent.max_concurrent_tasks == 2
    assert pipeline.nodes[2].node_config.parallel is True


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("8", 8),
        ("2.5", 2.5),
        ("true", True),
        ("null", None),
        ("", ""),
        ('"8"', "8"),
        ("'a b'", "a b"),
        ("a: b", "a: b"),
        ("- x", "- x"),
        ("[1, 2]", [1, 2]),
        ("{a: 1}", {"a": 1}),
        ("2024-01-31", "2024-01-31"),
        ("x=y", "x=y"),
        ("[unclosed", "[unclosed"),
    ],
)
def test_override_values_are_yaml_scalars(raw: str, value: Any) -> None:
    assert apply_overrides({}, [f"k={raw}"]) == {"task": {"params": {"k": value}}}


def test_apply_overrides_leaves_its_input_alone() -> None:
    doc: dict[str, Any] = {
        "task": {"params": {"a": 1}},
        "nodes": [{"name": "n", "node_config": None}],
    }
    result = apply_overrides(doc, ["a=2", "nodes.n.node_config.timeout=5", "nodes.0.type=planner"])
    assert doc == {"task": {"params": {"a": 1}}, "nodes": [{"name": "n", "node_config": None}]}
    assert result == {
        "task": {"params": {"a": 2}},
        "nodes": [{"name": "n", "node_config": {"timeout": 5}, "type": "planner"}],
    }


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("novalue", "--set 'novalue': expected KEY=VALUE"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        (
            "nodes.procesor.node_config.concurrency=1",
            "--set 'nodes.procesor.node_config.concurrency=1': no node named 'procesor' (did you mean 'processor'?)",
        ),
        ("nodes.processor..timeout=1", "--set 'nodes.processor..timeout=1': empty key in the path"),
        (
            "agent.max_concurrent_tasks.x=1",
            "--set 'agent.max_concurrent_tasks.x=1': agent.max_concurrent_tasks is a value, not a mapping or list",
        ),
        (
            "nodes.processor.modules.3.expr=x",
            "--set 'nodes.processor.modules.3.expr=x': nodes[1].modules has no item 3",
        ),
    ],
)
def test_malformed_overrides_are_usage_errors(override: str, expected: str) -> None:
    with pytest.raises(UsageError) as caught:
        load_pipeline_text(EXAMPLE, overrides=(override,))
    assert str(caught.value) == expected
    assert caught.value.exit_code == 2


def test_a_bad_override_value_is_blamed_on_the_override() -> None:
    message = error_of(EXAMPLE, ("nodes.processor.node_config.concurrency=0",))
    assert message == (
        "--set nodes.processor.node_config.concurrency=0: "
        "nodes[1].node_config.concurrency: must be >= 1"
    )
    message = error_of(EXAMPLE, ("nodes.router.node_config.timout=1",))
    assert message == (
        "--set nodes.router.node_config.timout=1: nodes[3].node_config.timout: unknown key 'timout' "
        "(did you mean 'timeout'?)"
    )


# ---- hashing -------------------------------------------------------------------------------


def test_hash_ignores_formatting_comments_order_and_spelled_out_defaults() -> None:
    reformatted = """\
# the same pipeline, written differently
nodes:
  - name: splitter
    modules:
      - use: split
        chunk_size: 3
    type: planner
    node_config: {max_retries: 2, on_error: skip}
  - {name: processor, dependencies: [splitter], modules: [{expr: item * 2, use: map}],
     node_config: {timeout: 30.0, max_retries: 2, concurrency: 3}}
  - name: aggregator
    dependencies: [processor]
    modules: [{use: aggregate}]
    node_config:
      condition: len(completed_subtasks) == len(subtasks)
  - name: router
    type: flow_control
    default: aggregator
    decisions:
      - next_node: processor
        condition: len(pending) > 0
task: {params: {factor: 2}, objective: Double every number, type: parallel_processing}
agent: {max_total_iterations: 50, max_concurrent_tasks: 3}
description: optional text
name: parallel-processing
"""
    digest = pipeline_hash(load_pipeline_text(EXAMPLE))
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert pipeline_hash(load_pipeline_text(reformatted)) == digest


@pytest.mark.parametrize(
    "override",
    ["factor=3", "nodes.processor.node_config.timeout=31", "nodes.processor.modules.0.expr=item*2"],
)
def test_hash_changes_with_meaning(override: str) -> None:
    before = pipeline_hash(load_pipeline_text(EXAMPLE))
    assert pipeline_hash(load_pipeline_text(EXAMPLE, overrides=(override,))) != before


def test_override_of_unknown_node_suggests_the_closest_name() -> None:
    with pytest.raises(UsageError) as info:
        load_pipeline_text(EXAMPLE, "p.yaml", ["nodes.procesor.node_config.concurrency=8"])
    assert str(info.value) == (
        "--set 'nodes.procesor.node_config.concurrency=8': no node named 'procesor' "
        "(did you mean 'processor'?)"
    )


SEVERAL_PROBLEMS = """\
name: t
nodes:
  - {name: split, modules: [{use: split, chunk_size: 2}]}
  - name: m
    dependencies: [split]
    node_config: {concurency: 3}
    modules: [{use: filter, expr: "item['v'] > 2 or verbose"}]
  - name: n
    dependencies: [m]
    modules: [{use: map, expr: "item['v'] * factr"}]
  - name: o
    dependencies: [n]
    modules: [{use: map, expr: 'item["a" == 1'}]
  - name: p
    dependencies: [o]
    modules: [{use: aggregate, expr: "sum(result)"}]
"""


def test_every_problem_of_a_file_is_reported_each_at_its_line_and_column() -> None:
    """Issue 14 item 4 and issue 11 item 13: expressions are checked when the file is loaded (so
    `validate` and `run` refuse them, exit 2), located like YAML errors, the error type first,
    all of them at once and together with the schema's own problems."""
    assert error_of(SEVERAL_PROBLEMS).splitlines() == [
        "p.yaml, line 6, column 19: nodes[1].node_config.concurency: unknown key 'concurency' "
        "(did you mean 'concurrency'?)",
        "p.yaml, line 7, column 29: nodes[1].modules[0].expr: NameError: name 'verbose' is not "
        "defined (it may read index, item, params, record) in expression "
        "\"item['v'] > 2 or verbose\" (node 'm')",
        "p.yaml, line 10, column 26: nodes[2].modules[0].expr: NameError: name 'factr' is not "
        "defined (it may read index, item, params, record) in expression \"item['v'] * factr\" "
        "(node 'n')",
        "p.yaml, line 13, column 26: nodes[3].modules[0].expr: SyntaxError: '[' was never closed "
        "in expression 'item[\"a\" == 1' (node 'o')",
        "p.yaml, line 16, column 32: nodes[4].modules[0].expr: NameError: name 'result' (did you "
        "mean 'results'?) is not defined (it may read params, results) in expression "
        "'sum(result)' (node 'p')",
    ]


def test_a_condition_name_no_module_writes_is_a_warning_not_an_error() -> None:
    """Conditions read cache keys, so any name may be meant; one nobody is known to write reads
    as None (documented), and the loader says so as a located warning."""
    text = """\
name: t
nodes:
  - {name: split, modules: [{use: split, chunk_size: 2}]}
  - name: m
    dependencies: [split]
    node_config: {condition: "len(completed_subtask) > 0 and params['go']"}
    modules: [{use: map, expr: "record"}]
"""
    pipeline, warnings = check_pipeline_text(text, "p.yaml")
    assert pipeline.nodes[1].node_config.condition is not None
    assert warnings == [
        "p.yaml, line 6, column 19: nodes[1].node_config.condition: condition of node 'm' reads "
        "'completed_subtask', which no module is known to write: it reads as None (did you mean "
        "'completed_subtasks'?)"
    ]
    fixed = text.replace("completed_subtask)", "completed_subtasks)")
    assert check_pipeline_text(fixed, "p.yaml")[1] == []


def test_an_unknown_module_and_an_unknown_dependency_are_both_reported() -> None:
    """Issue 14: `use: mapp` used to hide the unknown dependency of the same file."""
    text = """\
name: t
nodes:
  - {name: split, modules: [{use: split, chunk_size: 2}]}
  - name: m
    dependencies: [splitt]
    modules: [{use: mapp, expr: "item"}]
"""
    assert error_of(text).splitlines() == [
        "p.yaml, line 5, column 20: nodes[1].dependencies[0]: unknown node 'splitt' (did you "
        "mean 'split'?)",
        "p.yaml, line 6, column 16: nodes[1].modules[0].use: unknown module 'mapp'; known "
        "modules: aggregate, filter, map, split",
    ]
