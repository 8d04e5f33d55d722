"""Module kinds, module settings, middleware and the base class user modules subclass.

`AgentModule` is a plain class on purpose: subclasses set `name = "x"` without annotations,
write their own `__init__` and keep arbitrary attributes, which a pydantic model would refuse.
It also takes the framework's keyword form, `MyModule(name="n", type=..., config=...)`: every
field it or a subclass declares (annotated, or a plain class attribute) is a keyword argument, and
an unknown keyword is a TypeError naming it.
"""

from __future__ import annotations

import asyncio
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from parallel_agent.conditions import compile_condition

if TYPE_CHECKING:
    from parallel_agent.caches.cache import Cache


class ModuleType(str, Enum):  # noqa: UP042 (str mixin kept for the public API)
    """What a module (and the node holding it) does; FLOW_CONTROL nodes steer the run."""

    PLANNER = "planner"
    EXECUTOR = "executor"
    FLOW_CONTROL = "flow_control"
    SUBGRAPH = "subgraph"


_FIELDS: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _field_names(cls: type) -> frozenset[str]:
    """Public names `cls` declares as data (annotations, non-callable class attributes); cached
    per class, since walking the MRO costs more than the rest of building a module."""
    known = _FIELDS.get(cls)
    if known is None:
        known = _FIELDS[cls] = _declared(cls)
    return known


def _declared(cls: type) -> frozenset[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        names.update(getattr(klass, "__annotations__", {}))
        for name, value in vars(klass).items():
            if not callable(value) and not isinstance(value, property | staticmethod | classmethod):
                names.add(name)
    return frozenset(n for n in names if not n.startswith("_"))


class KeywordFields:
    """Builds an instance from keyword arguments naming its declared fields.

    Class attributes holding a pydantic `Field(...)` become the instance's default (so the
    framework's `attempt_count: int = Field(default=0)` works); unknown keywords are refused.
    """

    def __init__(self, **fields: Any) -> None:
        cls = type(self)
        known = _field_names(cls)
        unknown = sorted(set(fields) - known)
        if unknown:
            names = ", ".join(repr(n) for n in unknown)
            raise TypeError(
                f"{cls.__name__}() got unexpected keyword argument(s) {names}; "
                f"it accepts: {', '.join(sorted(known))}"
            )
        for name in known - set(fields):
            default = getattr(cls, name, None)
            if isinstance(default, FieldInfo):
                setattr(self, name, default.get_default(call_default_factory=True))
        for name, value in fields.items():
            setattr(self, name, value)


class Middleware(KeywordFields):
    """Transforms a module's result; a module's `config.middlewares` run in order on each result."""

    async def process(self, data: Any, cache: Cache) -> Any:
        """Return the (possibly changed) result; `cache` is the module's own view of the cache."""
        return data


class ModuleConfig(BaseModel):
    """How the engine runs one module; unknown keys are an error (put your own in `context`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    timeout: float | None = Field(default=None, gt=0)
    """Seconds one run of the module (middlewares and commit included) may take; a timed-out run
    is a failed, retried attempt. None: no limit of its own (NodeConfig.timeout still applies)."""
    middlewares: list[Middleware] = Field(default_factory=list)
    """Applied in order to every result the module returns."""
    stop_on_success: bool = False
    """In a sequential node: once this module succeeds, the node's remaining modules do not run."""
    context: dict[str, Any] = Field(default_factory=dict)
    """Free-form settings for the module itself; the engine never reads them."""


_DEFAULT_CONFIG = ModuleConfig()


class AgentModule(KeywordFields):
    """A unit of work in a node. Override `process`.

    `transactional = True` (the default) makes the engine run `process` against an optimistic
    transaction: reads are versioned, writes buffered and committed only if nothing they read
    changed meanwhile; otherwise `process` runs again. Set it to False for modules with side
    effects outside the cache; they then see the shared cache directly.

    `output_mailbox` (if set) receives every result `process` returns, in the same transaction;
    `input_mailboxes` documents the mailboxes the module reads (the engine does not read them).
    `container` is the node running the module, set by the engine before each run.
    """

    name: str = ""
    type: ModuleType = ModuleType.EXECUTOR
    transactional: bool = True
    config: ModuleConfig = _DEFAULT_CONFIG
    dependencies: tuple[str, ...] | list[str] = ()
    input_mailboxes: tuple[str, ...] | list[str] = ()
    output_mailbox: str = ""
    container: Any = None

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        if isinstance(self.config, dict):
            self.config = ModuleConfig.model_validate(self.config)
        if not isinstance(self.config, ModuleConfig):
            raise TypeError(f"{type(self).__name__}: config must be a ModuleConfig")
        self.type = ModuleType(self.type)
        if self.config is _DEFAULT_CONFIG:
            self.config = ModuleConfig()  # an instance of its own, safe to change

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        """Do the work; return `{"status": "success" | "error", "result": ...}`.

        `semaphore` bounds sub-work the module spawns (`max_concurrent_tasks` permits, fresh for
        each node visit); it is not the node slot the engine holds, so acquiring it is safe."""
        raise NotImplementedError(f"{type(self).__name__}.process is not implemented")

    def is_success(self, result: Any) -> bool:
        """Whether `result` counts as a success (anything but `{"status": "error"}`)."""
        return not (isinstance(result, dict) and result.get("status") == "error")


class FlowDecision(BaseModel):
    """Jump to `next_node` when `condition` (a sandboxed expression over cache keys) holds;
    no condition means an unconditional jump."""

    model_config = ConfigDict(extra="forbid")

    next_node: str
    condition: str | None = None
    condition_variables: list[str] = Field(default_factory=list)
    """Cache keys deleted when this decision is taken (a flag the jump consumes)."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Kept in the flow-control node's result next to `next_node` when the decision is taken."""


class FlowControlConfig(BaseModel):
    """Decisions tried in order, first true wins; `default` when none holds (None ends the run)."""

    model_config = ConfigDict(extra="forbid")

    decisions: list[FlowDecision] = Field(default_factory=list)
    default: str | None = None


class FlowControlModule(AgentModule):
    """Carries a FlowControlConfig; the engine evaluates it, `process` is never the mechanism."""

    name = "flow_control"
    type = ModuleType.FLOW_CONTROL
    transactional = False
    flow_config: FlowControlConfig

    def __init__(self, flow_config: FlowControlConfig | None = None, **fields: Any) -> None:
        if flow_config is None:
            raise TypeError("FlowControlModule() needs flow_config")
        super().__init__(flow_config=flow_config, **fields)

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        """Evaluate the decisions against `cache` (the engine does this itself, with views)."""
        config = self.flow_config
        compiled = [
            (
                d.next_node,
                None
                if d.condition is None
                else compile_condition(
                    d.condition, what=f"decision {i} (next_node '{d.next_node}')"
                ),
            )
            for i, d in enumerate(config.decisions, start=1)
        ]
        names: frozenset[str] = frozenset().union(*(c.names for _, c in compiled if c))
        values = await cache.get_many(names)  # every decision sees the same snapshot
        target = next((n for n, c in compiled if c is None or c.evaluate(values)), config.default)
        return {"status": "success", "result": {"next_node": target}}
