"""Pipeline files: YAML safety, located schema errors, overrides, hashing, JSON Schema."""

from __future__ import annotations

import time

import pytest

from parallel_agent.errors import PipelineError, UsageError
from parallel_agent.pipeline import (
    ClassSpec,
    MapSpec,
    load_pipeline_text,
    pipeline_hash,
    pipeline_json_schema,
)

BASE = """\
name: p
nodes:
  - name: split
    type: planner
    modules: [{use: split, chunk_size: 3}]
  - name: work
    dependencies: [split]
    modules: [{use: map, expr: "item * 2"}]
    node_config: {concurrency: 3}
"""


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(PipelineError) as caught:
        load_pipeline_text(text, "p.yaml", overrides)
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_example_loads_with_defaults() -> None:
    pipeline = load_pipeline_text(BASE)
    assert [node.name for node in pipeline.nodes] == ["split", "work"]
    work = pipeline.nodes[1]
    assert isinstance(work.modules[0], MapSpec)
    assert work.node_config.concurrency == 3
    assert work.node_config.on_error == "skip"
    assert pipeline.agent.max_total_iterations == 100


def test_schema_error_names_path_line_and_column() -> None:
    text = BASE.replace("{concurrency: 3}", "{concurrency: 3, timeout: 0}")
    assert error_of(text) == "p.yaml, line 9, column 35: nodes[1].node_config.timeout: must be > 0"


def test_unknown_key_is_named() -> None:
    text = BASE.replace("{concurrency: 3}", "{concurency: 3}")
    assert "nodes[1].node_config.concurency: unknown key 'concurency'" in error_of(text)


def test_unknown_module_lists_the_known_ones() -> None:
    message = error_of(BASE.replace("use: map", "use: mapp"))
    assert "unknown module 'mapp'; known modules: aggregate, filter, map, split" in message


def test_map_needs_exactly_one_kind() -> None:
    assert "exactly one of expr, function, command" in error_of(
        BASE.replace('expr: "item * 2"', 'expr: "item", command: "cat"')
    )


def test_function_must_be_an_import_path() -> None:
    message = error_of(BASE.replace('expr: "item * 2"', "function: not_a_path"))
    assert "nodes[1].modules[0].function: must look like 'package.module:attribute'" in message


def test_unknown_dependency_gets_a_suggestion() -> None:
    message = error_of(BASE.replace("dependencies: [split]", "dependencies: [splt]"))
    assert "unknown node 'splt' (did you mean 'split'?)" in message


def test_duplicate_keys_are_refused_with_their_line() -> None:
    message = error_of("name: a\nname: b\nnodes: []\n")
    assert message == "p.yaml, line 2, column 1: duplicate key 'name'"


def test_yaml_syntax_error_has_line_and_column() -> None:
    message = error_of("name: x\nnodes: [\n  {name: a\n")
    assert message.startswith("p.yaml, line 4, column 1: YAML syntax error")


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, 10):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 9)}]")
    started = time.monotonic()
    assert "aliases" in error_of("\n".join(lines) + "\nname: x\nnodes: []\n")
    assert time.monotonic() - started < 5, "a liveness bound, not a speed test"


def test_class_module_and_flow_control_shapes() -> None:
    text = BASE + (
        "  - name: custom\n    dependencies: [work]\n"
        "    modules: [{class: 'pkg.mod:Thing', params: {n: 1}}]\n"
        "  - name: loop\n    type: flow_control\n"
        "    decisions: [{next_node: work, condition: 'true'}]\n"
    )
    pipeline = load_pipeline_text(text)
    module = pipeline.nodes[2].modules[0]
    assert isinstance(module, ClassSpec)
    assert module.class_ == "pkg.mod:Thing"
    assert module.params == {"n": 1}
    bad = BASE + "  - name: loop\n    type: flow_control\n    modules: [{use: split}]\n"
    assert "flow_control node has decisions and default, not modules" in error_of(bad)


def test_overrides_set_params_and_node_keys() -> None:
    pipeline = load_pipeline_text(
        BASE,
        overrides=(
            "factor=3",
            "nodes.work.node_config.concurrency=8",
            "agent.max_total_iterations=7",
        ),
    )
    assert pipeline.task.params == {"factor": 3}
    assert pipeline.nodes[1].node_config.concurrency == 8
    assert pipeline.agent.max_total_iterations == 7
    with pytest.raises(UsageError, match="no node named 'nope'"):
        load_pipeline_text(BASE, overrides=("nodes.nope.node_config.concurrency=1",))
    with pytest.raises(UsageError, match="KEY=VALUE"):
        load_pipeline_text(BASE, overrides=("novalue",))


def test_hash_ignores_formatting_but_not_meaning() -> None:
    reformatted = "# a comment\n" + BASE.replace("{concurrency: 3}", "\n      concurrency: 3")
    assert pipeline_hash(load_pipeline_text(BASE)) == pipeline_hash(load_pipeline_text(reformatted))
    changed = BASE.replace("item * 2", "item * 3")
    assert pipeline_hash(load_pipeline_text(BASE)) != pipeline_hash(load_pipeline_text(changed))


def test_json_schema_describes_nodes() -> None:
    schema = pipeline_json_schema()
    assert "nodes" in schema["properties"]
    assert "NodeConfigSpec" in schema["$defs"]
