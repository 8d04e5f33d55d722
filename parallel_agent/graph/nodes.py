"""Nodes: named groups of modules with dependencies and per-node execution settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from parallel_agent.graph.modules import AgentModule, ModuleType


class NodeConfig(BaseModel):
    """How a node runs; unknown keys are an error so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    parallel: bool = False
    """Run the node's modules concurrently instead of in order."""
    condition: str | None = None
    """Guard: a sandboxed expression over cache keys; false skips the node (not a failure)."""
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

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    name: str = Field(min_length=1)
    type: ModuleType = ModuleType.EXECUTOR
    modules: list[AgentModule] = Field(default_factory=list)
    dependencies: list[str] = Field(default_factory=list)
    node_config: NodeConfig = Field(default_factory=NodeConfig)
