"""The walkthrough's cache keys as views computed from the run store, for conditions.

A YAML pipeline's conditions may read `subtasks`, `completed_subtasks`, `pending_subtasks`,
`failed_subtasks` and `final_results` as the walkthrough's program kept them in its cache; here they are
derived from the store (the chunks of the first node fed by the split), so there is one source of truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from parallel_agent.modules.aggregate import iter_outputs
from parallel_agent.modules.context import RunContext

if TYPE_CHECKING:
    from parallel_agent.pipeline.build import BuiltPipeline

VIEW_NAMES = frozenset(
    {
        "subtasks",
        "completed_subtasks",
        "pending_subtasks",
        "failed_subtasks",
        "final_results",
        "params",
    }
)


class StoreViews:
    """Computes the view names a condition asks for; other names are left out (they read as None)."""

    def __init__(self, ctx: RunContext, node: str | None, built: BuiltPipeline) -> None:
        self.ctx = ctx
        self.node = node
        self.built = built

    async def __call__(self, names: frozenset[str]) -> dict[str, Any]:
        wanted = names & VIEW_NAMES
        values: dict[str, Any] = {}
        if "params" in wanted:
            values["params"] = self.ctx.params
        if wanted & {"subtasks", "completed_subtasks", "pending_subtasks", "failed_subtasks"}:
            values.update(await self._chunks())
        if "final_results" in wanted:
            values["final_results"] = await self._final_results()
        return {name: value for name, value in values.items() if name in wanted}

    async def _chunks(self) -> dict[str, Any]:
        if self.node is None:
            return {}
        store, task_id = self.ctx.store, self.ctx.task_id
        counts = await store.counts(task_id, self.node)
        status = ["pending"] * counts.chunks_total
        async for result in store.results(task_id, self.node):
            if result.index < len(status):
                status[result.index] = "completed"
        for failed in await store.failed_chunks(task_id, self.node):
            if failed.index < len(status):
                status[failed.index] = "failed"
        subtasks = [{"id": f"subtask_{i}", "status": s} for i, s in enumerate(status)]
        return {
            "subtasks": subtasks,
            "completed_subtasks": [s for s in subtasks if s["status"] != "pending"],
            "pending_subtasks": [s for s in subtasks if s["status"] == "pending"],
            "failed_subtasks": [s for s in subtasks if s["status"] == "failed"],
        }

    async def _final_results(self) -> Any:
        plan = await self.built.output_plan()
        if plan is None:
            return None
        if "value" in plan:
            return plan["value"]
        return [value async for value in iter_outputs(self.ctx, plan["node"])]
