"""The pipeline models on their own: defaults, constraints, module forms, cross-field checks, JSON Schema.

Cross-field checks report `pipeline_problems` errors whose context lists (relative path, message)
pairs; `problems_of` expands them the way the loader does, so paths are asserted exactly here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from parallel_agent.pipeline import (
    AgentSettings,
    AggregateSpec,
    ClassSpec,
    FilterSpec,
    MapSpec,
    NodeConfigSpec,
    NodeSpec,
    Pipeline,
    SplitSpec,
    TaskSettings,
    pipeline_json_schema,
)
from parallel_agent.pipeline.schema import PROBLEMS

KNOWN = "known modules: aggregate, filter, map, split"


def example() -> dict[str, Any]:
    """The brief's pipeline as the loader hands it to pydantic."""
    return {
        "name": "parallel-processing",
        "description": "optional text",
        "agent": {"max_concurrent_tasks": 3, "max_total_iterations": 50},
        "task": {
            "type": "parallel_processing",
            "objective": "Double every number",
            "params": {"factor": 2},
        },
        "nodes": [
            {"name": "splitter", "type": "planner", "modules": [{"use": "split", "chunk_size": 3}]},
            {
                "name": "processor",
                "type": "executor",
                "dependencies": ["splitter"],
                "modules": [{"use": "map", "expr": "item * 2"}],
                "node_config": {"concurrency": 3, "max_retries": 2, "timeout": 30},
            },
            {
                "name": "aggregator",
                "dependencies": ["processor"],
                "modules": [{"use": "aggregate"}],
                "node_config": {"condition": "len(completed_subtasks) == len(subtasks)"},
            },
            {
                "name": "router",
                "type": "flow_control",
                "decisions": [{"next_node": "processor", "condition": "len(pending) > 0"}],
                "default": "aggregator",
            },
        ],
    }


def with_modules(*modules: Any) -> dict[str, Any]:
    return {"name": "p", "nodes": [{"name": "a", "modules": list(modules)}]}


def problems_of(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Every error as (full path, message or pydantic type), cross-field problems expanded."""
    with pytest.raises(ValidationError) as caught:
        Pipeline.model_validate(data)
    found: list[tuple[tuple[str | int, ...], str]] = []
    for error in caught.value.errors():
        loc = tuple(error["loc"])
        if error["type"] == PROBLEMS:
            found.extend(((*loc, *sub), message) for sub, message in error["ctx"]["problems"])
        else:
            found.append((loc, error["type"]))
    return found


# ---- the example and the defaults ------------------------------------------------------------


def test_example_validates_into_typed_models() -> None:
    pipeline = Pipeline.model_validate(example())
    assert pipeline.agent == AgentSettings(max_concurrent_tasks=3, max_total_iterations=50)
    assert pipeline.task.params == {"factor": 2}
    splitter, processor, aggregator, router = pipeline.nodes
    assert splitter.modules == [SplitSpec(use="split", chunk_size=3)]
    assert processor.node_config.timeout == 30.0
    assert processor.node_config.concurrency == 3
    assert aggregator.type == "executor"
    assert isinstance(aggregator.modules[0], AggregateSpec)
    assert router.decisions[0].next_node == "processor"
    assert router.default == "aggregator"
    assert router.modules == []


def test_defaults() -> None:
    pipeline = Pipeline.model_validate(with_modules({"use": "split"}))
    assert pipeline.description is None
    assert pipeline.agent == AgentSettings(max_concurrent_tasks=5, max_total_iterations=100)
    assert pipeline.task == TaskSettings(type="pipeline", objective="", params={})
    node = pipeline.nodes[0]
    assert (node.type, node.dependencies, node.decisions, node.default) == (
        "executor",
        [],
        [],
        None,
    )
    assert node.modules == [SplitSpec(use="split", chunk_size=1000)]
    assert node.node_config.model_dump() == {
        "parallel": False,
        "condition": None,
        "max_retries": 2,
        "retry_delay": 0.5,
        "timeout": None,
        "concurrency": 4,
        "on_error": "skip",
        "max_visits": None,
        "lease": 30.0,
        "rate_limit": None,
        "processes": 0,
    }


# ---- module forms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ({"use": "map", "expr": "item * 2"}, MapSpec(use="map", expr="item * 2")),
        (
            {"use": "map", "function": "pkg.mod:double", "batch": True},
            MapSpec(use="map", function="pkg.mod:double", batch=True),
        ),
        (
            {"use": "map", "command": "jq -c .", "env": {"LANG": "C"}},
            MapSpec(use="map", command="jq -c .", env={"LANG": "C"}),
        ),
        ({"use": "filter", "expr": "item > 1"}, FilterSpec(use="filter", expr="item > 1")),
        ({"use": "filter", "function": "m:keep"}, FilterSpec(use="filter", function="m:keep")),
        ({"use": "aggregate"}, AggregateSpec(use="aggregate")),
        (
            {"use": "aggregate", "reduce": "sum", "field": "total"},
            AggregateSpec(use="aggregate", reduce="sum", field="total"),
        ),
        ({"use": "aggregate", "group_by": "kind"}, AggregateSpec(use="aggregate", group_by="kind")),
        (
            {"use": "aggregate", "expr": "sum(results)"},
            AggregateSpec(use="aggregate", expr="sum(results)"),
        ),
        (
            {"class": "pkg.mod:Thing", "params": {"n": 1}},
            ClassSpec(class_="pkg.mod:Thing", params={"n": 1}),
        ),
        ({"use": "class", "class": "pkg.mod:Thing"}, ClassSpec(class_="pkg.mod:Thing")),
    ],
)
def test_each_module_form(module: dict[str, Any], expected: Any) -> None:
    assert Pipeline.model_validate(with_modules(module)).nodes[0].modules == [expected]


def test_class_module_dumps_under_its_yaml_key() -> None:
    dumped = ClassSpec(class_="a.b:C").model_dump(by_alias=True)
    assert dumped == {"use": "class", "class": "a.b:C", "params": {}}


@pytest.mark.parametrize(
    ("module", "problems"),
    [
        ({"use": "map"}, [(("map",), "give exactly one of expr, function, command")]),
        (
            {"use": "map", "expr": "item", "command": "cat"},
            [(("map",), "give exactly one of expr, function, command")],
        ),
        (
            {"use": "map", "expr": "item", "batch": True},
            [(("map", "batch"), "batch: true needs function")],
        ),
        (
            {"use": "map", "function": "m:f", "env": {"A": "1"}},
            [(("map", "env"), "env needs command")],
        ),
        ({"use": "filter"}, [(("filter",), "give exactly one of expr, function")]),
        (
            {"use": "filter", "expr": "x", "function": "m:f"},
            [(("filter",), "give exactly one of expr, function")],
        ),
        (
            {"use": "aggregate", "reduce": "sum", "group_by": "k"},
            [(("aggregate",), "give at most one of reduce, group_by, expr")],
        ),
        ({"use": "aggregate", "field": "v"}, [(("aggregate", "field"), "field needs reduce")]),
        ({"use": "mapp", "expr": "x"}, [(("use",), f"unknown module 'mapp'; {KNOWN}")]),
        ({"use": 3}, [(("use",), f"unknown module '3'; {KNOWN}")]),
        ({"expr": "x"}, [((), "a module needs use (aggregate, filter, map, split) or class")]),
        ("map", [((), f"a module is a mapping like {{use: map, expr: ...}}; {KNOWN}")]),
        ({"use": "map", "class": "m:C"}, [(("use",), "give either use or class, not both")]),
    ],
)
def test_module_problems_name_the_key(module: Any, problems: list[Any]) -> None:
    here = ("nodes", 0, "modules", 0)
    assert problems_of(with_modules(module)) == [((*here, *sub), text) for sub, text in problems]


@pytest.mark.parametrize("target", ["pkg:f", "pkg.mod:f", "a.b_c.d:Outer.inner", "_m:_f"])
def test_import_paths_that_look_right(target: str) -> None:
    Pipeline.model_validate(with_modules({"use": "map", "function": target}))
    Pipeline.model_validate(with_modules({"class": target}))


@pytest.mark.parametrize(
    "target", ["pkg.mod", "pkg.mod:", ":f", "pkg mod:f", "1pkg:f", "a..b:f", "a:b:c"]
)
def test_import_paths_are_checked_for_shape(target: str) -> None:
    assert problems_of(with_modules({"use": "filter", "function": target})) == [
        (("nodes", 0, "modules", 0, "filter", "function"), "string_pattern_mismatch")
    ]
    assert problems_of(with_modules({"class": target})) == [
        (("nodes", 0, "modules", 0, "class", "class"), "string_pattern_mismatch")
    ]


# ---- unknown keys and constraints -------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"nam": "x"}, ("nam",)),
        ({"agent": {"max_concurrent_task": 2}}, ("agent", "max_concurrent_task")),
        ({"task": {"param": {}}}, ("task", "param")),
        ({"nodes": [{"name": "a", "module": []}]}, ("nodes", 0, "module")),
        (
            {"nodes": [{"name": "a", "modules": [{"use": "split"}], "node_config": {"timout": 1}}]},
            ("nodes", 0, "node_config", "timout"),
        ),
        (
            {"nodes": [{"name": "a", "modules": [{"use": "split", "size": 1}]}]},
            ("nodes", 0, "modules", 0, "split", "size"),
        ),
        (
            {"nodes": [{"name": "a", "modules": [{"class": "m:C", "param": 1}]}]},
            ("nodes", 0, "modules", 0, "class", "param"),
        ),
        (
            {
                "nodes": [
                    {
                        "name": "a",
                        "type": "flow_control",
                        "decisions": [{"next_node": "a", "condition": "x", "if": 1}],
                    }
                ]
            },
            ("nodes", 0, "decisions", 0, "if"),
        ),
    ],
)
def test_unknown_keys_are_errors(patch: dict[str, Any], where: tuple[Any, ...]) -> None:
    data = {**with_modules({"use": "split"}), **patch}
    assert (where, "extra_forbidden") in problems_of(data)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("timeout", 0, "greater_than"),
        ("timeout", -1.5, "greater_than"),
        ("lease", 0, "greater_than"),
        ("rate_limit", 0, "greater_than"),
        ("concurrency", 0, "greater_than_equal"),
        ("max_retries", -1, "greater_than_equal"),
        ("retry_delay", -0.1, "greater_than_equal"),
        ("max_visits", 0, "greater_than_equal"),
        ("concurrency", 1.5, "int_type"),
        ("concurrency", "many", "int_type"),
        ("timeout", math.inf, "finite_number"),
        ("lease", math.nan, "finite_number"),
        ("on_error", "ignore", "literal_error"),
        ("parallel", "sometimes", "bool_type"),
    ],
)
def test_node_config_constraints(key: str, value: Any, kind: str) -> None:
    data = with_modules({"use": "split"})
    data["nodes"][0]["node_config"] = {key: value}
    assert problems_of(data) == [(("nodes", 0, "node_config", key), kind)]


def test_node_config_boundaries_are_allowed() -> None:
    config = NodeConfigSpec(
        max_retries=0, retry_delay=0, concurrency=1, max_visits=1, timeout=0.001
    )
    assert (config.max_retries, config.retry_delay, config.concurrency) == (0, 0.0, 1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"name": "", "nodes": [{"name": "a", "modules": [{"use": "split"}]}]},
            [(("name",), "string_too_short")],
        ),
        ({"name": "p", "nodes": []}, [(("nodes",), "too_short")]),
        ({"nodes": [{"name": "a", "modules": [{"use": "split"}]}]}, [(("name",), "missing")]),
        (
            {
                "name": "p",
                "agent": {"max_concurrent_tasks": 0},
                "nodes": [{"name": "a", "modules": [{"use": "split"}]}],
            },
            [(("agent", "max_concurrent_tasks"), "greater_than_equal")],
        ),
        (
            {"name": "p", "nodes": [{"name": "a", "modules": [{"use": "split", "chunk_size": 0}]}]},
            [(("nodes", 0, "modules", 0, "split", "chunk_size"), "greater_than_equal")],
        ),
        (
            {
                "name": "p",
                "nodes": [{"name": "a", "type": "worker", "modules": [{"use": "split"}]}],
            },
            [(("nodes", 0, "type"), "literal_error")],
        ),
    ],
)
def test_top_level_constraints(data: dict[str, Any], expected: list[Any]) -> None:
    assert problems_of(data) == expected


@pytest.mark.parametrize("name", ["a", "_a", "A-1", "split_2", "x-y-z"])
def test_node_names_that_are_allowed(name: str) -> None:
    assert NodeSpec(name=name, modules=[SplitSpec(use="split")]).name == name


@pytest.mark.parametrize("name", ["", "1a", "-a", "a b", "a.b", "a/b", "é"])
def test_node_names_that_are_refused(name: str) -> None:
    data = {"name": "p", "nodes": [{"name": name, "modules": [{"use": "split"}]}]}
    assert problems_of(data) == [(("nodes", 0, "name"), "string_pattern_mismatch")]


# ---- node shapes -----------------------------------------------------------------------------


def node(**fields: Any) -> dict[str, Any]:
    return {"name": "p", "nodes": [{"name": "a", **fields}]}


@pytest.mark.parametrize(
    ("fields", "problems"),
    [
        ({}, [(("modules",), "an executor node needs at least one module")]),
        (
            {"type": "planner", "modules": []},
            [(("modules",), "a planner node needs at least one module")],
        ),
        (
            {"type": "flow_control"},
            [((), "a flow_control node needs decisions or a default")],
        ),
        (
            {"type": "flow_control", "default": "a", "modules": [{"use": "split"}]},
            [(("modules",), "a flow_control node takes decisions and default, not modules")],
        ),
        (
            {"modules": [{"use": "split"}], "default": "a"},
            [(("default",), "only flow_control nodes take a default")],
        ),
        (
            {"modules": [{"use": "split"}], "decisions": [{"next_node": "a", "condition": "x"}]},
            [(("decisions",), "only flow_control nodes take decisions")],
        ),
    ],
)
def test_node_shape_rules(fields: dict[str, Any], problems: list[Any]) -> None:
    assert problems_of(node(**fields)) == [(("nodes", 0, *sub), text) for sub, text in problems]


def test_flow_control_with_only_decisions_or_only_default_is_fine() -> None:
    for fields in ({"decisions": [{"next_node": "a", "condition": "true"}]}, {"default": "a"}):
        data = node(modules=[{"use": "split"}])
        data["nodes"].append({"name": "loop", "type": "flow_control", **fields})
        assert Pipeline.model_validate(data).nodes[1].type == "flow_control"


def test_subgraph_node_takes_modules() -> None:
    assert (
        Pipeline.model_validate(node(type="subgraph", modules=[{"class": "m:G"}])).nodes[0].type
        == "subgraph"
    )


# ---- references between nodes ------------------------------------------------------------------


def test_references_are_checked_with_exact_paths_and_suggestions() -> None:
    data = example()
    data["nodes"][2]["dependencies"] = ["procesor"]
    data["nodes"][3]["decisions"][0]["next_node"] = "agregator"
    data["nodes"][3]["default"] = "nowhere"
    assert problems_of(data) == [
        (("nodes", 2, "dependencies", 0), "unknown node 'procesor' (did you mean 'processor'?)"),
        (
            ("nodes", 3, "decisions", 0, "next_node"),
            "unknown node 'agregator' (did you mean 'aggregator'?)",
        ),
        (("nodes", 3, "default"), "unknown node 'nowhere'"),
    ]


def test_node_names_are_unique() -> None:
    data = example()
    data["nodes"][2]["name"] = "splitter"
    data["nodes"][2]["dependencies"] = []
    data["nodes"][3]["default"] = "processor"
    assert problems_of(data) == [
        (("nodes", 2, "name"), "node name 'splitter' is already used by nodes[0]")
    ]


def test_self_and_repeated_dependencies() -> None:
    data = example()
    data["nodes"][1]["dependencies"] = ["splitter", "processor", "splitter"]
    assert problems_of(data) == [
        (("nodes", 1, "dependencies", 1), "a node cannot depend on itself"),
        (("nodes", 1, "dependencies", 2), "'splitter' is listed twice"),
    ]


def test_dependency_cycle_is_reported_at_a_dependency() -> None:
    data = example()
    data["nodes"][0]["dependencies"] = ["aggregator"]
    [(where, message)] = problems_of(data)
    assert where[0] == "nodes" and where[2] == "dependencies"
    assert message.startswith("dependency cycle: ")
    assert message.endswith(" (each depends on the next)")
    chain = message.removeprefix("dependency cycle: ").removesuffix(" (each depends on the next)")
    names = [part.strip("'") for part in chain.split(" -> ")]
    assert names[0] == names[-1]
    assert set(names) == {"splitter", "processor", "aggregator"}
    by_name = {n["name"]: n for n in data["nodes"]}
    for name, dependency in zip(names, names[1:], strict=False):
        assert dependency in by_name[name]["dependencies"], "each node depends on the next"
    assert data["nodes"][where[1]]["name"] == names[0]
    assert data["nodes"][where[1]]["dependencies"][where[3]] == names[1]


def test_flow_decisions_may_loop_back() -> None:
    """Loops are made by flow_control decisions, which are not dependencies."""
    pipeline = Pipeline.model_validate(example())
    assert pipeline.nodes[3].decisions[0].next_node == "processor"


# ---- JSON Schema -----------------------------------------------------------------------------


def walk(value: Any) -> Any:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def test_json_schema_is_self_contained_and_documented() -> None:
    schema = pipeline_json_schema()
    json.dumps(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert set(schema["required"]) == {"name", "nodes"}
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"name", "description", "agent", "task", "nodes", "output"}
    defs = schema["$defs"]
    for part in walk(schema):
        ref = part.get("$ref")
        if ref is not None:
            assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in defs
    for name, definition in {"Pipeline": schema, **defs}.items():
        assert definition.get("description"), name
        assert definition["additionalProperties"] is False, name
        assert set(definition.get("required", [])) <= set(definition["properties"]), name
        for key, field in definition["properties"].items():
            assert field.get("description"), f"{name}.{key} has no description"


def test_json_schema_describes_nodes_and_modules() -> None:
    schema = pipeline_json_schema()
    defs = schema["$defs"]
    assert schema["properties"]["nodes"]["items"] == {"$ref": "#/$defs/NodeSpec"}
    assert schema["properties"]["nodes"]["minItems"] == 1
    modules = defs["NodeSpec"]["properties"]["modules"]["items"]
    assert modules["discriminator"]["propertyName"] == "use"
    assert set(modules["discriminator"]["mapping"]) == {
        "split",
        "map",
        "filter",
        "aggregate",
        "class",
    }
    assert "class" in defs["ClassSpec"]["properties"]
    assert defs["ClassSpec"]["required"] == ["class"]
    timeout = defs["NodeConfigSpec"]["properties"]["timeout"]
    assert {"type": "number", "exclusiveMinimum": 0} in timeout["anyOf"]
    assert defs["NodeConfigSpec"]["properties"]["on_error"]["enum"] == [
        "fail_chunk",
        "skip",
        "stop",
    ]
