"""Pydantic models of the pipeline YAML; `extra="forbid"` everywhere so typos are caught."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
KNOWN_MODULES = ("aggregate", "filter", "map", "split")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AgentSettings(Strict):
    """Engine limits (the walkthrough's `Agent(...)` arguments)."""

    max_concurrent_tasks: int = Field(5, ge=1, description="Nodes of a layer that run at once.")
    max_total_iterations: int = Field(
        100, ge=1, description="Node visits before a loop is stopped."
    )


class TaskSettings(Strict):
    """The task handed to the agent; `params` are visible to expressions as `params`."""

    type: str = "pipeline"
    objective: str = ""
    params: dict[str, Any] = Field(default_factory=dict)


class NodeConfigSpec(Strict):
    """How a node runs (the walkthrough's `NodeConfig`, plus data-processing settings)."""

    parallel: bool = Field(False, description="Run the node's modules concurrently.")
    condition: str | None = Field(None, description="Guard: the node is skipped while false.")
    max_retries: int = Field(2, ge=0, description="Retries of a failed chunk (or module).")
    retry_delay: float = Field(0.5, ge=0, description="Backoff base in seconds (doubles per try).")
    timeout: float | None = Field(None, gt=0, description="Seconds per chunk (or module run).")
    concurrency: int = Field(4, ge=1, description="Chunks the node works on at once.")
    on_error: Literal["fail_chunk", "skip", "stop"] = Field(
        "skip", description="What a failing item does: skip it, fail its chunk, or stop the run."
    )
    max_visits: int | None = Field(None, ge=1, description="Visits of this node in a loop.")
    lease: float = Field(30.0, gt=0, description="Seconds a chunk claim lasts without renewal.")
    rate_limit: float | None = Field(None, gt=0, description="Item calls per second for the node.")


class SplitSpec(Strict):
    use: Literal["split"]
    chunk_size: int = Field(1000, ge=1)


class MapSpec(Strict):
    use: Literal["map"]
    expr: str | None = None
    function: str | None = Field(None, pattern=IMPORT_PATH)
    command: str | None = None
    batch: bool = False
    env: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> MapSpec:
        given = [k for k in ("expr", "function", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of expr, function, command")
        if self.batch and self.function is None:
            raise ValueError("batch: true needs function")
        if self.env is not None and self.command is None:
            raise ValueError("env needs command")
        return self


class FilterSpec(Strict):
    use: Literal["filter"]
    expr: str | None = None
    function: str | None = Field(None, pattern=IMPORT_PATH)

    @model_validator(mode="after")
    def _one_kind(self) -> FilterSpec:
        if (self.expr is None) == (self.function is None):
            raise ValueError("give exactly one of expr, function")
        return self


class AggregateSpec(Strict):
    use: Literal["aggregate"]
    reduce: Literal["sum", "count", "min", "max"] | None = None
    group_by: str | None = None
    expr: str | None = None
    field: str | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> AggregateSpec:
        if sum(v is not None for v in (self.reduce, self.group_by, self.expr)) > 1:
            raise ValueError("give at most one of reduce, group_by, expr")
        if self.field is not None and self.reduce is None:
            raise ValueError("field needs reduce")
        return self


class ClassSpec(Strict):
    use: Literal["class"] = "class"
    class_: str = Field(alias="class", pattern=IMPORT_PATH)
    params: dict[str, Any] = Field(default_factory=dict)


ModuleSpec = SplitSpec | MapSpec | FilterSpec | AggregateSpec | ClassSpec
_BY_USE: dict[str, type[BaseModel]] = {
    "split": SplitSpec,
    "map": MapSpec,
    "filter": FilterSpec,
    "aggregate": AggregateSpec,
}


class DecisionSpec(Strict):
    next_node: str
    condition: str


class NodeSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    type: Literal["planner", "executor", "flow_control", "subgraph"] = "executor"
    dependencies: list[str] = Field(default_factory=list)
    modules: list[Annotated[ModuleSpec, Field(discriminator="use")]] = Field(default_factory=list)
    node_config: NodeConfigSpec = Field(default_factory=NodeConfigSpec)
    decisions: list[DecisionSpec] = Field(default_factory=list)
    default: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _tag_modules(cls, data: Any) -> Any:
        """Give `class:` modules their tag and turn an unknown `use` into one clear message."""
        if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
            return data
        modules = []
        for module in data["modules"]:
            if isinstance(module, dict) and "class" in module and "use" not in module:
                module = {"use": "class", **module}
            elif isinstance(module, dict):
                use = module.get("use")
                if use is None:
                    raise ValueError(
                        "module needs 'use' (one of: " + ", ".join(KNOWN_MODULES) + ") or 'class'"
                    )
                if use not in _BY_USE and use != "class":
                    raise ValueError(
                        f"unknown module '{use}'; known modules: {', '.join(KNOWN_MODULES)}"
                    )
            modules.append(module)
        return {**data, "modules": modules}

    @model_validator(mode="after")
    def _shape(self) -> NodeSpec:
        if self.type == "flow_control":
            if self.modules:
                raise ValueError("a flow_control node has decisions and default, not modules")
            if not self.decisions and self.default is None:
                raise ValueError("a flow_control node needs decisions or a default")
        else:
            if not self.modules:
                raise ValueError(f"a {self.type} node needs at least one module")
            if self.decisions or self.default is not None:
                raise ValueError("only flow_control nodes take decisions and default")
        return self


class Pipeline(Strict):
    """A pipeline file."""

    name: str = Field(min_length=1)
    description: str | None = None
    agent: AgentSettings = Field(default_factory=AgentSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    nodes: list[NodeSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Pipeline:
        names = [node.name for node in self.nodes]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"node name '{name}' is used twice")
            seen.add(name)
        for node in self.nodes:
            for dependency in node.dependencies:
                if dependency == node.name:
                    raise ValueError(f"node '{node.name}' depends on itself")
                _check_known(dependency, names, f"node '{node.name}' depends on")
            for decision in node.decisions:
                _check_known(decision.next_node, names, f"node '{node.name}' decides for")
            if node.default is not None:
                _check_known(node.default, names, f"node '{node.name}' defaults to")
        return self


def _check_known(name: str, names: list[str], what: str) -> None:
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"{what} unknown node '{name}'{hint}")
