"""Nodes: named groups of modules with dependencies and per-node execution settings."""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from parallel_agent.errors import NodeExecutionError
from parallel_agent.graph.execution import run_modules
from parallel_agent.graph.modules import AgentModule, ModuleType

if TYPE_CHECKING:
    from parallel_agent.caches.cache import Cache


class SnapshotControl(str, Enum):  # noqa: UP042 (str mixin kept for the public API)
    """When `Agent(auto_snapshot=True)` snapshots the run before a node's layer runs."""

    NEVER = "never"
    ONCE = "once"
    """Before the node's first visit in a run."""
    ALWAYS = "always"
    """Before every visit."""


class NodeConfig(BaseModel):
    """How a node runs; unknown keys are an error so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    parallel: bool = False
    """Run the node's modules concurrently instead of in order."""
    condition: str | None = None
    """Guard: a sandboxed expression over cache keys; false skips the node (not a failure)."""
    retry_on_failure: bool = True
    """False: a module's first failed attempt fails the node (max_retries is not used)."""
    max_retries: int = Field(default=3, ge=0)
    """Failed attempts retried per module (exceptions, error results, timeouts)."""
    retry_delay: float = Field(default=0.05, ge=0)
    """Backoff base in seconds: attempt n waits retry_delay * 2**n (capped, with jitter)."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one module attempt may take."""
    max_visits: int | None = Field(default=None, ge=1)
    """Times the node may be visited in one run; reaching it stops the run."""


class Node(BaseModel):
    """A graph vertex; `dependencies` name the nodes that must run before it."""

    model_config = ConfigDict(
        arbitrary_types_allowed=True, extra="forbid", validate_assignment=True
    )

    name: str = Field(min_length=1)
    type: ModuleType = ModuleType.EXECUTOR
    modules: list[AgentModule] = Field(default_factory=list)
    dependencies: list[str] = Field(default_factory=list)
    node_config: NodeConfig = Field(default_factory=NodeConfig)
    snapshot: SnapshotControl = SnapshotControl.NEVER
    """With `Agent(auto_snapshot=True)`: when to snapshot the run before this node runs."""

    async def run(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        """Run the modules once, with their retries and timeouts but no guard or planning.

        Returns `{"status": "success", "results": [...]}`, or `{"status": "error", "error":
        ...}` naming the module that gave up."""
        try:
            results = await run_modules(self, cache, semaphore)
        except NodeExecutionError as exc:
            return {"status": "error", "error": str(exc)}
        return {"status": "success", "results": results}
