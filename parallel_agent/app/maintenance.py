"""Changing runs from outside: cancel one, drop finished ones."""

from __future__ import annotations

import asyncio
import time

from parallel_agent.app.common import FINISHED, require_run, with_store
from parallel_agent.graph import TaskStatus
from parallel_agent.store.base import RunStore


def cancel_run(task_id: str, store: str | None = None) -> str:
    """Mark a run cancelled: every claim refuses it from now on (on any machine), the coordinator
    also notices at its next lock renewal, and its final status never overwrites the cancel."""

    async def action(s: RunStore) -> str:
        info = await require_run(s, task_id)
        if info.status in FINISHED:
            return info.status
        await s.update_run(task_id, status=TaskStatus.CANCELLED.value, finished_at=time.time())
        return str(TaskStatus.CANCELLED.value)

    return asyncio.run(with_store(store, action))


def gc_runs(older_than_s: float, store: str | None = None) -> list[str]:
    """Drop finished runs older than `older_than_s`; return their task ids."""
    return asyncio.run(with_store(store, lambda s: s.gc(older_than_s)))
