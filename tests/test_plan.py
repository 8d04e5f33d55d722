"""Planning: layers, descendants, and the graph errors reported before any work."""

from __future__ import annotations

import pytest

from parallel_agent.errors import PipelineError
from parallel_agent.graph import (
    FlowControlConfig,
    FlowControlModule,
    FlowDecision,
    ModuleType,
    Node,
    Plan,
)


def _nodes(*specs: tuple[str, list[str]]) -> dict[str, Node]:
    return {name: Node(name=name, dependencies=deps) for name, deps in specs}


def test_layers_and_downstream() -> None:
    plan = Plan(_nodes(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"])))
    assert plan.layers() == [["a"], ["b", "c"], ["d"]]
    assert plan.downstream_of("b") == {"b", "d"}
    assert plan.layers({"b", "d"}) == [["b"], ["d"]]


def test_unknown_dependency() -> None:
    with pytest.raises(PipelineError, match="node 'b' depends on unknown node 'x'"):
        Plan(_nodes(("b", ["x"])))


def test_cycle() -> None:
    with pytest.raises(PipelineError, match="cycle between nodes: "):
        Plan(_nodes(("a", ["b"]), ("b", ["a"])))


def test_decision_to_unknown_node() -> None:
    flow = FlowControlModule(
        flow_config=FlowControlConfig(
            decisions=[FlowDecision(next_node="nope", condition="true")], default=None
        )
    )
    nodes = {"f": Node(name="f", type=ModuleType.FLOW_CONTROL, modules=[flow])}
    with pytest.raises(PipelineError, match="unknown node 'nope'"):
        Plan(nodes)


def test_cycle_message_names_the_cycle_in_order() -> None:
    with pytest.raises(PipelineError) as info:
        Plan(_nodes(("a", ["c"]), ("b", ["a"]), ("c", ["b"]), ("d", [])))
    cycle = str(info.value).removeprefix("cycle between nodes: ").split(" → ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"} and len(cycle) == 4


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(PipelineError, match="cycle between nodes: a → a"):
        Plan(_nodes(("a", ["a"])))


def test_default_to_unknown_node() -> None:
    flow = FlowControlModule(flow_config=FlowControlConfig(decisions=[], default="ghost"))
    nodes = {"f": Node(name="f", type=ModuleType.FLOW_CONTROL, modules=[flow])}
    with pytest.raises(PipelineError, match="flow control node 'f' jumps to unknown node 'ghost'"):
        Plan(nodes)


def test_replan_from_a_target_keeps_upstream_out() -> None:
    plan = Plan(_nodes(("split", []), ("p0", ["split"]), ("p1", ["split"]), ("agg", ["p0", "p1"])))
    assert plan.layers() == [["split"], ["p0", "p1"], ["agg"]]
    assert plan.downstream_of("p0") == {"p0", "agg"}
    # "p1" is not re-run; "agg" waits only on what is re-planned.
    assert plan.layers(plan.downstream_of("p0")) == [["p0"], ["agg"]]
