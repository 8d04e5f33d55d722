"""Changing runs from outside: cancel one, drop finished ones."""

from __future__ import annotations

import asyncio
import fnmatch
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


def gc_runs(
    older_than_s: float,
    store: str | None = None,
    *,
    task_glob: str | None = None,
    pipeline: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Drop finished runs older than `older_than_s` whose task id matches `task_glob` (shell
    wildcards) and whose pipeline is named `pipeline`; return their task ids. With `dry_run`
    nothing is dropped: the ids are those that would be. Unfinished runs are never dropped."""

    async def action(s: RunStore) -> list[str]:
        cutoff = time.time() - older_than_s
        chosen: list[str] = []
        for info in await s.list_runs():
            ended = info.finished_at if info.finished_at is not None else info.updated_at
            if (
                info.status in FINISHED
                and ended < cutoff
                and (task_glob is None or fnmatch.fnmatchcase(info.task_id, task_glob))
                and (pipeline is None or info.pipeline_name == pipeline)
            ):
                chosen.append(info.task_id)
        if not dry_run:
            for task_id in chosen:
                await s.delete_run(task_id)
        return sorted(chosen)

    return asyncio.run(with_store(store, action))
