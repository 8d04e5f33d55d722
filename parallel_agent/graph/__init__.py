"""The graph model and engine: tasks, modules, nodes, planning and the Agent that runs them."""

from parallel_agent.caches.cache import Cache
from parallel_agent.errors import NonRetryableException
from parallel_agent.graph.agent import Agent
from parallel_agent.graph.modules import (
    AgentModule,
    FlowControlConfig,
    FlowControlModule,
    FlowDecision,
    Middleware,
    ModuleConfig,
    ModuleType,
)
from parallel_agent.graph.nodes import Node, NodeConfig, SnapshotControl
from parallel_agent.graph.plan import Plan
from parallel_agent.graph.tasks import Task, TaskStatus

__all__ = [
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
