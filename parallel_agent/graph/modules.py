"""Module kinds and the base class user modules subclass.

`AgentModule` is a plain class on purpose: subclasses set `name = "x"` without annotations,
write their own `__init__` and keep arbitrary attributes, which a pydantic model would refuse.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from parallel_agent.conditions import compile_condition

if TYPE_CHECKING:
    from parallel_agent.caches.cache import Cache


class ModuleType(str, Enum):  # noqa: UP042 (str mixin kept for the public API)
    """What a module (and the node holding it) does; FLOW_CONTROL nodes steer the run."""

    PLANNER = "planner"
    EXECUTOR = "executor"
    FLOW_CONTROL = "flow_control"
    SUBGRAPH = "subgraph"


class ModuleConfig(BaseModel):
    """Free-form module settings; extra keys are kept so modules define their own."""

    model_config = ConfigDict(extra="allow")


class AgentModule:
    """A unit of work in a node. Override `process`.

    `transactional = True` (the default) makes the engine run `process` against an optimistic
    transaction: reads are versioned, writes buffered and committed only if nothing they read
    changed meanwhile; otherwise `process` runs again. Set it to False for modules with side
    effects outside the cache; they then see the shared cache directly.
    """

    name: str = ""
    type: ModuleType = ModuleType.EXECUTOR
    transactional: bool = True

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        """Do the work; return `{"status": "success" | "error", "result": ...}`.

        `semaphore` bounds sub-work the module spawns (`max_concurrent_tasks` permits, fresh for
        each node visit); it is not the node slot the engine holds, so acquiring it is safe."""
        raise NotImplementedError(f"{type(self).__name__}.process is not implemented")


class FlowDecision(BaseModel):
    """Jump to `next_node` when `condition` (a sandboxed expression over cache keys) holds."""

    next_node: str
    condition: str


class FlowControlConfig(BaseModel):
    """Decisions tried in order, first true wins; `default` when none holds (None ends the run)."""

    decisions: list[FlowDecision] = Field(default_factory=list)
    default: str | None = None


class FlowControlModule(AgentModule):
    """Carries a FlowControlConfig; the engine evaluates it, `process` is never the mechanism."""

    name = "flow_control"
    type = ModuleType.FLOW_CONTROL
    transactional = False

    def __init__(self, flow_config: FlowControlConfig, name: str = "flow_control") -> None:
        self.flow_config = flow_config
        self.name = name

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        """Evaluate the decisions against `cache` (the engine does this itself, with views)."""
        config = self.flow_config
        compiled = [
            (
                d.next_node,
                compile_condition(d.condition, what=f"decision {i} (next_node '{d.next_node}')"),
            )
            for i, d in enumerate(config.decisions, start=1)
        ]
        names: frozenset[str] = frozenset().union(*(c.names for _, c in compiled))
        values = await cache.get_many(names)
        target = next((n for n, c in compiled if c.evaluate(values)), config.default)
        return {"status": "success", "result": {"next_node": target}}
