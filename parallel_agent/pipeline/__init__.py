"""Pipeline files: YAML in, a validated `Pipeline` out (building the agent is in `build`)."""

from parallel_agent.pipeline.loader import (
    apply_overrides,
    load_pipeline,
    load_pipeline_text,
    pipeline_hash,
    pipeline_json_schema,
)
from parallel_agent.pipeline.schema import (
    AgentSettings,
    AggregateSpec,
    ClassSpec,
    DecisionSpec,
    FilterSpec,
    MapSpec,
    ModuleSpec,
    NodeConfigSpec,
    NodeSpec,
    Pipeline,
    SplitSpec,
    TaskSettings,
)

__all__ = [
    "AgentSettings",
    "AggregateSpec",
    "ClassSpec",
    "DecisionSpec",
    "FilterSpec",
    "MapSpec",
    "ModuleSpec",
    "NodeConfigSpec",
    "NodeSpec",
    "Pipeline",
    "SplitSpec",
    "TaskSettings",
    "apply_overrides",
    "load_pipeline",
    "load_pipeline_text",
    "pipeline_hash",
    "pipeline_json_schema",
]
