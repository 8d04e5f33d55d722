"""The names other code imports from parallel_agent.graph and parallel_agent.caches, and the
walkthrough's import lines with `asimov` swapped for `parallel_agent`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import parallel_agent.caches as caches
import parallel_agent.graph as graph
import parallel_agent.graph.tasks as tasks

WALKTHROUGH = Path(__file__).resolve().parents[1].parent / "shared" / "walkthrough.md"


def test_graph_all_is_exact_and_sorted() -> None:
    assert graph.__all__ == [
        "Agent",
        "AgentModule",
        "Cache",
        "FlowControlConfig",
        "FlowControlModule",
        "FlowDecision",
        "Middleware",
        "ModuleConfig",
        "ModuleType",
        "Node",
        "NodeConfig",
        "NonRetryableException",
        "Plan",
        "SnapshotControl",
        "Task",
        "TaskStatus",
    ]
    public = {n for n in vars(graph) if not n.startswith("_")} - {
        "agent", "execution", "modules", "nodes", "plan", "snapshots", "tasks", "annotations",
    }  # fmt: skip
    assert public == set(graph.__all__)
    assert graph.Cache is caches.Cache
    assert {tasks.Task, tasks.TaskStatus} == {graph.Task, graph.TaskStatus}


def test_enums_use_lowercase_values() -> None:
    assert [m.value for m in graph.ModuleType] == [
        "planner",
        "executor",
        "flow_control",
        "subgraph",
    ]
    assert graph.TaskStatus.PARTIAL.value == "partial_failure"
    assert {s.value for s in graph.TaskStatus} == {
        "waiting", "executing", "stalled", "interrupted", "complete", "partial_failure",
        "no_output", "failed", "cancelled", "lost",
    }  # fmt: skip


def test_task_defaults() -> None:
    task = graph.Task(type="t", objective="o", params={"data": [1]})
    assert len(task.id) == 32 and task.status == graph.TaskStatus.WAITING
    assert task.result is None and task.error is None


def test_caches_exports_redis_lazily() -> None:
    from parallel_agent.caches.redis_cache import RedisCache

    assert set(caches.__all__) == {"Cache", "MemoryCache", "RedisCache"}
    assert caches.RedisCache is RedisCache
    assert issubclass(caches.MemoryCache, caches.Cache)
    assert RedisCache().url == "redis://localhost:6379/0"  # no connection until first use


def test_agent_module_subclasses_set_name_and_type_without_annotations() -> None:
    class M(graph.AgentModule):
        name = "m"
        type = graph.ModuleType.PLANNER

        def __init__(self, anything: object) -> None:
            self.anything = anything

    module = M(object())
    assert module.name == "m" and module.type == graph.ModuleType.PLANNER
    assert module.transactional
    flow = graph.FlowControlModule(flow_config=graph.FlowControlConfig())
    assert flow.name == "flow_control" and flow.type == graph.ModuleType.FLOW_CONTROL


def test_node_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        graph.NodeConfig(paralel=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="greater than or equal"):
        graph.NodeConfig(max_retries=-1)


def test_walkthrough_import_lines_resolve() -> None:
    if not WALKTHROUGH.exists():
        pytest.skip(f"{WALKTHROUGH} is missing")
    text = WALKTHROUGH.read_text()
    imports = re.findall(r"^from asimov[^\n]*\((?:[^)]*)\)|^from asimov[^\n]*", text, flags=re.M)
    assert len(imports) == 3
    for line in imports:
        exec(line.replace("asimov", "parallel_agent"), {})
