"""Pydantic models of the pipeline YAML, in the words of the Python API (Agent, Node, NodeConfig,
FlowDecision).

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
Checks that span several fields raise `pipeline_problems` errors whose context lists each problem
with its own relative path, so the loader can point at the exact key (and its line) instead of at
the enclosing node.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from graphlib import CycleError, TopologicalSorter
from typing import Annotated, Any, Literal, NoReturn

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

#: `package.module:attribute`; only the shape is checked here, importing happens when building.
IMPORT_PATH = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
NODE_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"

#: The error type of cross-field checks; its context holds `problems`: (relative path, message) pairs.
PROBLEMS = "pipeline_problems"

KeyPath = tuple[str | int, ...]
Problem = tuple[KeyPath, str]


def dotted(path: Sequence[str | int]) -> str:
    """`("nodes", 2, "node_config")` → `nodes[2].node_config`, the form every message uses."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _fail(problems: Sequence[Problem]) -> NoReturn:
    text = "; ".join(
        f"{dotted(path)}: {message}" if path else message for path, message in problems
    )
    raise PydanticCustomError(PROBLEMS, "{text}", {"text": text, "problems": list(problems)})


class Strict(BaseModel):
    """Base of every model: unknown keys are errors; infinities and NaN are not numbers here."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class AgentSettings(Strict):
    """Engine limits: the walkthrough's `Agent(max_concurrent_tasks=..., max_total_iterations=...)`."""

    max_concurrent_tasks: int = Field(
        5, ge=1, description="Nodes of one layer that run at the same time."
    )
    max_total_iterations: int = Field(
        100, ge=1, description="Node visits in one run before a loop is stopped."
    )


class TaskSettings(Strict):
    """The `Task` handed to the agent; expressions and conditions see `params`."""

    type: str = Field("pipeline", description="The task's type.")
    objective: str = Field("", description="The task's objective, free text.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Task parameters, visible to expressions as `params`; `--set KEY=VALUE` sets one.",
    )


class NodeConfigSpec(Strict):
    """How a node runs: the walkthrough's `NodeConfig`, plus settings for processing data in chunks."""

    parallel: bool = Field(False, description="Run the node's modules concurrently.")
    condition: str | None = Field(
        None, description="Guard expression: while it is false the node is skipped, not failed."
    )
    max_retries: int = Field(2, ge=0, description="Retries of a failed chunk (or module run).")
    retry_delay: float = Field(
        0.5, ge=0, description="Backoff base in seconds; the delay doubles with each attempt."
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds one chunk (or one module run) may take; none by default."
    )
    concurrency: int = Field(4, ge=1, description="Chunks the node works on at the same time.")
    on_error: Literal["fail_chunk", "skip", "stop"] = Field(
        "skip",
        description="What a failing item does: goes to the failed list (skip), fails its whole "
        "chunk (fail_chunk), or stops the run (stop).",
    )
    max_visits: int | None = Field(
        None, ge=1, description="Visits of this node in one run (loop guard); unlimited by default."
    )
    lease: float = Field(
        30.0,
        gt=0,
        description="Seconds a chunk claim lasts without renewal (renewed while worked).",
    )
    rate_limit: float | None = Field(
        None, gt=0, description="Item calls per second across the node; unlimited by default."
    )
    processes: int = Field(
        0,
        ge=0,
        description="Worker processes for a CPU-bound `expr` or sync `function` (one chunk each), "
        "or for a split parsing JSON Lines input; 0 does the work in this process.",
    )


class SplitSpec(Strict):
    """`use: split`: stream the input and queue chunks for the nodes that depend on this one."""

    use: Literal["split"] = Field(description="Module kind.")
    chunk_size: int = Field(1000, ge=1, description="Records per chunk.")
    max_record_size: int = Field(
        64 << 20,
        ge=1,
        description="Longest input record in bytes (a JSON Lines line, a JSON array's value); "
        "a longer one is a located error (exit 3). Default 64 MiB.",
    )


class MapSpec(Strict):
    """`use: map`: one result per input item, from an expression, a Python callable or a command."""

    use: Literal["map"] = Field(description="Module kind.")
    expr: str | None = Field(
        None,
        description="Sandboxed expression over `item`, `record` (1-based input record number), "
        "`index` (`record - 1`) and `params`; any other name is an error.",
    )
    function: str | None = Field(
        None,
        pattern=IMPORT_PATH,
        description="`package.module:callable`, sync or async, called with each item.",
    )
    command: str | None = Field(
        None,
        description="Shell command run once per chunk: JSON Lines in on stdin, one JSON line out per item.",
    )
    batch: bool = Field(
        False, description="With `function`: call it once per chunk with the list of items."
    )
    env: dict[str, str] | None = Field(
        None, description="With `command`: extra environment variables for the command."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> MapSpec:
        given = [key for key in ("expr", "function", "command") if getattr(self, key) is not None]
        problems: list[Problem] = []
        if len(given) != 1:
            problems.append(((), "give exactly one of expr, function, command"))
        if self.batch and self.function is None:
            problems.append((("batch",), "batch: true needs function"))
        if self.env is not None and self.command is None:
            problems.append((("env",), "env needs command"))
        if problems:
            _fail(problems)
        return self


class FilterSpec(Strict):
    """`use: filter`: keep the items for which an expression or a callable is true."""

    use: Literal["filter"] = Field(description="Module kind.")
    expr: str | None = Field(
        None,
        description="Sandboxed expression over `item`, `record` (1-based input record number), "
        "`index` (`record - 1`) and `params`; any other name is an error.",
    )
    function: str | None = Field(
        None,
        pattern=IMPORT_PATH,
        description="`package.module:callable`, sync or async, called with each item.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> FilterSpec:
        if (self.expr is None) == (self.function is None):
            _fail([((), "give exactly one of expr, function")])
        return self


class AggregateSpec(Strict):
    """`use: aggregate`: every result in input order, or one value computed from them."""

    use: Literal["aggregate"] = Field(description="Module kind.")
    reduce: Literal["sum", "count", "min", "max"] | None = Field(
        None, description="Reduce the results to one value."
    )
    group_by: str | list[str] | dict[str, str] | None = Field(
        None,
        description="Group by this key of each result; with `compute` also a list of keys or "
        "{name: expression}. Without `compute`: {key: [results]}.",
    )
    compute: dict[str, str | dict[str, Any]] | None = Field(
        None,
        description="Named reducers per group, SQL style: `count`, {count_if: EXPR}, "
        "{sum|mean|min|max|first|last|count_distinct|collect: FIELD or {expr: EXPR}}, "
        "{function: pkg.mod:obj}; combined per chunk where the chunk is processed.",
    )
    sort_by: str | list[str] | None = Field(
        None, description="With `compute`: sort the rows by these columns."
    )
    descending: bool = Field(False, description="With `sort_by`: largest first.")
    top: int | None = Field(
        None, ge=1, description="With `compute`: keep only the first N rows (after sort_by)."
    )
    expr: str | None = Field(
        None, description="Sandboxed expression over `results` and `params` giving the value."
    )
    field: str | None = Field(
        None, description="With `reduce`: reduce this key of each result instead of the result."
    )

    @property
    def computes_value(self) -> bool:
        """False for the default form: every result in input order."""
        return any(v is not None for v in (self.reduce, self.group_by, self.expr, self.compute))

    def _column_problems(self) -> list[Problem]:
        """Output columns must have distinct names (a compute column named like a key replaced
        it), and sort_by must name one of them."""
        problems: list[Problem] = []
        keys = _key_names(self.group_by)
        if any(not name.strip() for name in keys):
            problems.append((("group_by",), "a group_by key needs a name"))
        elif len(set(keys)) < len(keys):
            problems.append((("group_by",), "a group_by key is named twice"))
        for name in self.compute or {}:
            if name in keys:
                problems.append(
                    (("compute", name), f"'{name}' is a group_by key too: name it differently")
                )
        if self.compute:
            columns = list(dict.fromkeys([*keys, *self.compute]))
            sort_by = [self.sort_by] if isinstance(self.sort_by, str) else self.sort_by or []
            for name in sort_by:
                if name not in columns:
                    problems.append(
                        (
                            ("sort_by",),
                            f"'{name}' is not a column; the columns: {', '.join(columns)}",
                        )
                    )
        return problems

    @model_validator(mode="after")
    def _at_most_one(self) -> AggregateSpec:
        problems: list[Problem] = []
        if sum(value is not None for value in (self.reduce, self.group_by, self.expr)) > 1:
            problems.append(((), "give at most one of reduce, group_by, expr"))
        if self.field is not None and self.reduce is None:
            problems.append((("field",), "field needs reduce"))
        problems.extend(self._column_problems())
        if self.compute is not None:
            if self.reduce is not None or self.expr is not None:
                problems.append((("compute",), "compute goes with group_by, not reduce or expr"))
            if not self.compute:
                problems.append((("compute",), "compute needs at least one reducer"))
        else:
            if self.group_by is not None and not isinstance(self.group_by, str):
                problems.append((("group_by",), "several keys or expressions need compute"))
            for key in ("sort_by", "top"):
                if getattr(self, key) is not None:
                    problems.append(((key,), f"{key} needs compute"))
            if self.descending:
                problems.append((("descending",), "descending needs sort_by"))
        if problems:
            _fail(problems)
        return self


def _key_names(group_by: str | list[str] | dict[str, str] | None) -> list[str]:
    """The output column names of an aggregate's keys."""
    if group_by is None:
        return []
    if isinstance(group_by, str):
        return [group_by]
    return list(group_by)


class ClassSpec(Strict):
    """`class: pkg.mod:MyModule`: your own `AgentModule` subclass, built with `params`."""

    model_config = ConfigDict(populate_by_name=True)

    use: Literal["class"] = Field(
        "class", description="Implied by `class`; there is no need to write it."
    )
    class_: str = Field(
        alias="class",
        pattern=IMPORT_PATH,
        description="`package.module:ClassName` of an AgentModule subclass.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the class."
    )


#: Built-in modules by their `use:` tag (the custom `class:` form is not among them).
BUILTIN_MODULES: dict[str, type[Strict]] = {
    "aggregate": AggregateSpec,
    "filter": FilterSpec,
    "map": MapSpec,
    "split": SplitSpec,
}
KNOWN_MODULES = ", ".join(sorted(BUILTIN_MODULES))


def _tag_module(value: Any) -> Any:
    """Check the `use` tag first, so an unknown one gives one clear message instead of pydantic's."""
    if isinstance(value, Strict):
        return value
    if not isinstance(value, dict):
        _fail(
            [
                (
                    (),
                    f"a module is a mapping like {{use: map, expr: ...}}; known modules: {KNOWN_MODULES}",
                )
            ]
        )
    use = value.get("use")
    if "class" in value:
        if use is None:
            return {"use": "class", **value}
        if use != "class":
            _fail([(("use",), "give either use or class, not both")])
        return value
    if use is None:
        _fail([((), f"a module needs use ({KNOWN_MODULES}) or class")])
    if use != "class" and (not isinstance(use, str) or use not in BUILTIN_MODULES):
        _fail([(("use",), f"unknown module '{use}'; known modules: {KNOWN_MODULES}")])
    return value


#: One module of a node: a built-in chosen by `use`, or a custom `class`.
ModuleSpec = Annotated[
    Annotated[
        SplitSpec | MapSpec | FilterSpec | AggregateSpec | ClassSpec, Field(discriminator="use")
    ],
    BeforeValidator(_tag_module),
]


class DecisionSpec(Strict):
    """A `FlowDecision`: go to `next_node` when `condition` holds."""

    next_node: str = Field(description="The node to run next.")
    condition: str = Field(description="Sandboxed expression; the first true decision wins.")


class NodeSpec(Strict):
    """A `Node`: a name, a type, its dependencies and what it does."""

    name: str = Field(
        pattern=NODE_NAME,
        description="Unique name: letters, digits, _ and -, not starting with a digit or -.",
    )
    type: Literal["planner", "executor", "flow_control", "subgraph"] = Field(
        "executor", description="The node's `ModuleType`."
    )
    dependencies: list[str] = Field(
        default_factory=list, description="Names of the nodes that must finish first."
    )
    modules: list[ModuleSpec] = Field(
        default_factory=list,
        description="What the node does; at least one, except for flow_control.",
    )
    node_config: NodeConfigSpec = Field(
        default_factory=NodeConfigSpec, description="How the node runs."
    )
    decisions: list[DecisionSpec] = Field(
        default_factory=list, description="flow_control only: tried in order, the first true wins."
    )
    default: str | None = Field(
        None, description="flow_control only: the node to run when no decision holds."
    )

    @model_validator(mode="after")
    def _shape(self) -> NodeSpec:
        problems: list[Problem] = []
        if self.type == "flow_control":
            if self.modules:
                problems.append(
                    (("modules",), "a flow_control node takes decisions and default, not modules")
                )
            if not self.decisions and self.default is None:
                problems.append(((), "a flow_control node needs decisions or a default"))
        else:
            if not self.modules:
                article = "an" if self.type == "executor" else "a"
                problems.append(
                    (("modules",), f"{article} {self.type} node needs at least one module")
                )
            if self.decisions:
                problems.append((("decisions",), "only flow_control nodes take decisions"))
            if self.default is not None:
                problems.append((("default",), "only flow_control nodes take a default"))
            problems.extend(self._process_problems())
        if problems:
            _fail(problems)
        return self

    def _process_problems(self) -> list[Problem]:
        """`processes` runs an `expr` or a sync `function` per chunk, and nothing else."""
        if not self.node_config.processes:
            return []
        where = ("node_config", "processes")
        if any(isinstance(m, SplitSpec) for m in self.modules):
            return []
        kinds = [m for m in self.modules if isinstance(m, MapSpec | FilterSpec)]
        if not kinds or any(isinstance(m, MapSpec) and m.command is not None for m in kinds):
            return [(where, "processes needs a split, or a map or filter with expr or function")]
        return []


class Pipeline(Strict):
    """A pipeline file: the agent's limits, the task, and the nodes of the graph."""

    model_config = ConfigDict(
        title="pagent pipeline",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    name: str = Field(min_length=1, description="The pipeline's name.")
    description: str | None = Field(None, description="Free text.")
    agent: AgentSettings = Field(default_factory=AgentSettings, description="Engine limits.")
    task: TaskSettings = Field(default_factory=TaskSettings, description="The task to run.")
    nodes: list[NodeSpec] = Field(min_length=1, description="The nodes of the graph.")
    output: str | None = Field(
        None,
        description="The node whose result `--output` writes (a map, filter or aggregate); "
        "by default the one data node nothing consumes.",
    )

    @model_validator(mode="after")
    def _references(self) -> Pipeline:
        problems = _reference_problems(self.nodes)
        names = [node.name for node in self.nodes]
        if self.output is not None and self.output not in names:
            problems.append((("output",), _unknown(self.output, names)))
        elif self.output is not None:
            node = self.nodes[names.index(self.output)]
            if not any(
                getattr(m, "use", None) in ("map", "filter", "aggregate") for m in node.modules
            ):
                problems.append(
                    (("output",), f"node '{self.output}' is not a map, filter or aggregate node")
                )
        if not problems:
            problems = _cycle_problems(self.nodes)
        if problems:
            _fail(problems)
        return self


def _unknown(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown node '{name}'{hint}"


def _reference_problems(nodes: Sequence[NodeSpec]) -> list[Problem]:
    """Unique names, and every dependency, decision and default naming an existing node."""
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if node.name in first:
            problems.append(
                (
                    ("nodes", index, "name"),
                    f"node name '{node.name}' is already used by nodes[{first[node.name]}]",
                )
            )
        first.setdefault(node.name, index)
    names = list(first)
    for index, node in enumerate(nodes):
        here: KeyPath = ("nodes", index)
        listed: set[str] = set()
        for position, dependency in enumerate(node.dependencies):
            where = (*here, "dependencies", position)
            if dependency == node.name:
                problems.append((where, "a node cannot depend on itself"))
            elif dependency not in first:
                problems.append((where, _unknown(dependency, names)))
            elif dependency in listed:
                problems.append((where, f"'{dependency}' is listed twice"))
            listed.add(dependency)
        for position, decision in enumerate(node.decisions):
            if decision.next_node not in first:
                where = (*here, "decisions", position, "next_node")
                problems.append((where, _unknown(decision.next_node, names)))
        if node.default is not None and node.default not in first:
            problems.append(((*here, "default"), _unknown(node.default, names)))
    return problems


def _cycle_problems(nodes: Sequence[NodeSpec]) -> list[Problem]:
    """A dependency cycle, found early so it is reported with its place in the file.

    Loops are made with flow_control decisions; dependencies must form a DAG (the engine checks too).
    """
    try:
        TopologicalSorter({node.name: node.dependencies for node in nodes}).prepare()
    except CycleError as exc:
        # graphlib lists each node before the one that depends on it; read it the other way round.
        cycle = list(reversed(exc.args[1]))
        index = next(i for i, node in enumerate(nodes) if node.name == cycle[0])
        position = nodes[index].dependencies.index(cycle[1])
        chain = " -> ".join(f"'{name}'" for name in cycle)
        return [
            (
                ("nodes", index, "dependencies", position),
                f"dependency cycle: {chain} (each depends on the next)",
            )
        ]
    return []


def _known_keys() -> frozenset[str]:
    """Every key a pipeline file may hold (field names and aliases), for "did you mean"."""
    keys: set[str] = set()
    pending: list[type[BaseModel]] = [Pipeline]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            keys.add(info.alias or name)
        pending.extend(sub for sub in Strict.__subclasses__() if sub not in seen)
    return frozenset(keys)


#: The keys of every section of a pipeline file.
KNOWN_KEYS = _known_keys()
