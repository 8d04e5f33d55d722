"""A run description for tests that drive a store directly."""

from __future__ import annotations

import uuid
from typing import Any

from parallel_agent.store.base import RunInfo

T0 = 1_000_000.0


def make_info(task_id: str = "t1", **changes: Any) -> RunInfo:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "pipeline_name": "demo",
        "pipeline_hash": "abc",
        "pipeline_text": "name: demo\n",
        "input_path": "/data/in.jsonl",
        "input_size": 123,
        "input_hash": None,
        "input_format": "jsonl",
        "params": {"k": [1, 2], "nested": {"x": 1.5}},
        "status": "waiting",
        "created_at": T0,
        "updated_at": T0,
        "finished_at": None,
        "generation": uuid.uuid4().hex,
        "output_path": None,
        "extra": {"options": {"concurrency": 4}},
    }
    fields.update(changes)
    return RunInfo(**fields)
