"""The task a run works on, and the statuses a run can end in."""

from __future__ import annotations

import uuid
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from parallel_agent.caches.codec import register_type


class TaskStatus(str, Enum):  # noqa: UP042 (str mixin kept for the public API)
    """Lifecycle of a task; the string values are what stores and the CLI show."""

    WAITING = "waiting"
    EXECUTING = "executing"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"
    COMPLETE = "complete"
    PARTIAL = "partial_failure"
    NO_OUTPUT = "no_output"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"


def _new_id() -> str:
    return uuid.uuid4().hex


class Task(BaseModel):
    """What to do (`type`, `objective`, `params`) and, after a run, how it went."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=_new_id)
    type: str = ""
    objective: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    status: TaskStatus = TaskStatus.WAITING
    result: Any = None
    error: str | None = None


# A Task stored in a cache (the engine keeps one under "task") comes back as a Task.
register_type("task", Task)
