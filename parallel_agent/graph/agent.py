"""The engine: runs a graph of nodes over a cache, with guards, flow control, retries, limits
and optimistic transactions. docs/semantics.md states the rules this implements.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from parallel_agent.caches.cache import Cache
from parallel_agent.caches.codec import encode
from parallel_agent.caches.memory_cache import MemoryCache
from parallel_agent.caches.transactional import TransactionalCache
from parallel_agent.conditions import Condition, compile_condition
from parallel_agent.errors import (
    ConditionError,
    NodeExecutionError,
    NonRetryableException,
    PipelineError,
)
from parallel_agent.events import Event, EventSink, NodeFinished, NodeStarted
from parallel_agent.graph.modules import AgentModule, FlowControlModule, ModuleType
from parallel_agent.graph.nodes import Node
from parallel_agent.graph.plan import Plan
from parallel_agent.graph.tasks import Task, TaskStatus

Views = Callable[[frozenset[str]], Awaitable[dict[str, Any]]]
"""Called with the names a condition reads that the cache lacks; returns values for those it knows."""

MAX_CONFLICT_RETRIES = 100
MAX_BACKOFF_S = 2.0

SUCCEEDED, SKIPPED, FAILED, BLOCKED = "succeeded", "skipped", "failed", "blocked"


class _Stop(Exception):
    """Ends the run early with a reason (a limit or a failing condition)."""


class _Conflict(Exception):
    """A transactional attempt read data that changed before it could commit."""


def is_flow_control(node: Node) -> bool:
    """A node steers the run when it is FLOW_CONTROL or holds a FlowControlModule."""
    return node.type == ModuleType.FLOW_CONTROL or any(
        isinstance(m, FlowControlModule) for m in node.modules
    )


def _decisions(node: Node) -> list[tuple[str, Condition]]:
    """(next_node, compiled condition) for every decision of a flow-control node, in order."""
    out: list[tuple[str, Condition]] = []
    for module in node.modules:
        if isinstance(module, FlowControlModule):
            for number, d in enumerate(module.flow_config.decisions, start=1):
                what = f"node '{node.name}', decision {number} (next_node '{d.next_node}')"
                out.append((d.next_node, compile_condition(d.condition, what=what)))
    return out


def _default(node: Node) -> str | None:
    for module in node.modules:
        if isinstance(module, FlowControlModule) and module.flow_config.default is not None:
            return module.flow_config.default
    return None


class _Run:
    """Mutable state of one `run_task` call."""

    def __init__(self) -> None:
        self.visits: dict[str, int] = {}
        self.total = 0
        self.outcome: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.results: dict[str, list[Any]] = {}
        self.stop: str | None = None


class Agent:
    """Holds the graph and runs tasks through it.

    `max_concurrent_tasks` bounds how many nodes of a layer run at once; `max_total_iterations`
    bounds node visits over the whole run. `views` supplies values for condition names the cache
    does not hold (the YAML layer's computed keys). `events` receives NodeStarted/NodeFinished.
    """

    def __init__(
        self,
        cache: Cache | None = None,
        max_concurrent_tasks: int = 5,
        max_total_iterations: int = 100,
        events: EventSink | None = None,
        views: Views | None = None,
    ) -> None:
        if max_concurrent_tasks < 1 or max_total_iterations < 1:
            raise PipelineError("max_concurrent_tasks and max_total_iterations must be >= 1")
        self.cache: Cache = cache if cache is not None else MemoryCache()
        self.max_concurrent_tasks = max_concurrent_tasks
        self.max_total_iterations = max_total_iterations
        self.events = events
        self.views = views
        self.nodes: dict[str, Node] = {}
        self._guards: dict[str, Condition] = {}
        self._flows: dict[str, list[tuple[str, Condition]]] = {}

    def add_node(self, node: Node) -> None:
        """Add a node; names must be unique."""
        if node.name in self.nodes:
            raise PipelineError(f"duplicate node name '{node.name}'")
        self.nodes[node.name] = node

    def validate(self) -> Plan:
        """Check the graph and compile every condition, so mistakes fail before any work."""
        plan = Plan(self.nodes)
        controllers = self._controllers()
        if len(controllers) > 1:
            names = ", ".join(n.name for n in controllers)
            raise PipelineError(
                f"more than one loop controller (flow control without dependencies): {names}"
            )
        self._guards = {
            n.name: compile_condition(n.node_config.condition, what=f"node '{n.name}', condition")
            for n in self.nodes.values()
            if n.node_config.condition is not None
        }
        self._flows = {n.name: _decisions(n) for n in self.nodes.values() if is_flow_control(n)}
        return plan

    def warnings(self) -> list[str]:
        """Branches that validate but will not do what they seem to (see Plan.warnings)."""
        return Plan(self.nodes).warnings()

    def _controllers(self) -> list[Node]:
        """Flow-control nodes with no dependencies that no node depends on: loop controllers."""
        depended = {d for n in self.nodes.values() for d in n.dependencies}
        return [
            n
            for n in self.nodes.values()
            if is_flow_control(n) and not n.dependencies and n.name not in depended
        ]

    # -- running -------------------------------------------------------------------------

    async def run_task(self, task: Task) -> Task:
        """Run `task` through the graph; returns it with status, result and error set."""
        plan = self.validate()
        run = _Run()
        node_slots = asyncio.Semaphore(self.max_concurrent_tasks)
        controllers = self._controllers()
        controller = controllers[0] if controllers else None
        work = set(self.nodes) - ({controller.name} if controller else set())
        task.status = TaskStatus.EXECUTING
        task.result, task.error = None, None
        await self.cache.set("task", task)
        selected = plan.runnable(work)
        try:
            while True:
                before = await self._fingerprint() if controller else ""
                await self._pass(plan, run, selected, work, node_slots)
                if controller is None or await self._fingerprint() == before:
                    break  # no controller, or a fixpoint: another pass would change nothing
                target = await self._visit_controller(run, controller)
                if target is None:
                    break
                selected = plan.runnable(work, target)
        except _Stop as stop:
            run.stop = str(stop)
        self._finish(task, run)
        await self.cache.set("task", task)
        return task

    async def _fingerprint(self) -> str:
        return hashlib.sha256(encode(await self.cache.get_all(), sort_keys=True)).hexdigest()

    async def _pass(
        self, plan: Plan, run: _Run, selected: set[str], work: set[str], slots: asyncio.Semaphore
    ) -> None:
        """Run `selected` layer by layer; a branch point's jump re-plans from its target."""
        while True:
            jump: str | None = None
            for layer in plan.layers(selected):
                admitted = [name for name in layer if self._admit(run, name)]
                plain = [n for n in admitted if not is_flow_control(self.nodes[n])]
                await asyncio.gather(*(self._run_node(run, n, slots) for n in plain))
                for name in admitted:
                    if name not in plain and run.stop is None and jump is None:
                        jump = await self._branch(run, name)
                if run.stop is not None:
                    raise _Stop(run.stop)
                if jump is not None:
                    break
            if jump is None:
                return
            selected = plan.runnable(work, jump)

    def _admit(self, run: _Run, name: str) -> bool:
        """Count a visit, or record which limit stops the run."""
        if run.stop is not None:
            return False
        limit = self.nodes[name].node_config.max_visits
        if run.total >= self.max_total_iterations:
            run.stop = (
                f"max_total_iterations={self.max_total_iterations} reached "
                f"after {run.total} node visits (next: '{name}')"
            )
            return False
        if limit is not None and run.visits.get(name, 0) >= limit:
            run.stop = f"max_visits={limit} reached for node '{name}'"
            return False
        run.total += 1
        run.visits[name] = run.visits.get(name, 0) + 1
        self._emit(NodeStarted(node=name, visit=run.visits[name], at=time.time()))
        return True

    def _emit(self, event: Event) -> None:
        if self.events is not None:
            self.events.emit(event)

    def _finished(
        self, run: _Run, name: str, outcome: str, start: float, error: str | None
    ) -> None:
        run.outcome[name] = outcome
        if error is not None:
            run.errors[name] = error
        else:
            run.errors.pop(name, None)
        self._emit(
            NodeFinished(
                at=time.time(),
                node=name,
                outcome=SKIPPED if outcome == BLOCKED else outcome,
                duration_s=time.monotonic() - start,
                error=error,
            )
        )

    async def _namespace(self, names: frozenset[str]) -> dict[str, Any]:
        """One consistent snapshot of the cache keys a condition reads, then views; else None."""
        values = await self.cache.get_many(names) if names else {}
        missing = frozenset(names - values.keys())
        if missing and self.views is not None:
            values.update(await self.views(missing))
        return {name: values.get(name) for name in names}

    async def _guard(self, run: _Run, name: str, start: float) -> bool:
        """True when the node should run; a failing condition stops the run."""
        guard = self._guards.get(name)
        if guard is None:
            return True
        try:
            return bool(guard.evaluate(await self._namespace(guard.names)))
        except ConditionError as exc:
            run.stop = str(exc)
            self._finished(run, name, FAILED, start, str(exc))
            return False

    async def _visit_controller(self, run: _Run, node: Node) -> str | None:
        """Consult the loop controller (one visit); None ends the run."""
        if not self._admit(run, node.name):
            raise _Stop(run.stop or "limit reached")
        target = await self._branch(run, node.name)
        if run.stop is not None:
            raise _Stop(run.stop)
        return target

    async def _branch(self, run: _Run, name: str) -> str | None:
        """Evaluate a flow-control node: first true decision, else default, else None."""
        start = time.monotonic()
        if not await self._guard(run, name, start):
            if run.stop is None:
                self._finished(run, name, SKIPPED, start, None)
            return None
        decisions = self._flows.get(name, [])
        names: frozenset[str] = frozenset().union(*(cond.names for _, cond in decisions))
        namespace = await self._namespace(names)  # all decisions see the same snapshot
        target: str | None = None
        try:
            for next_node, cond in decisions:
                if cond.evaluate(namespace):
                    target = next_node
                    break
            else:
                target = _default(self.nodes[name])
        except ConditionError as exc:
            run.stop = str(exc)
            self._finished(run, name, FAILED, start, str(exc))
            return None
        run.results[name] = [{"status": "success", "result": {"next_node": target}}]
        self._finished(run, name, SUCCEEDED, start, None)
        return target

    async def _run_node(self, run: _Run, name: str, slots: asyncio.Semaphore) -> None:
        node = self.nodes[name]
        start = time.monotonic()
        upstream = [d for d in node.dependencies if run.outcome.get(d) in (FAILED, BLOCKED)]
        if upstream:
            self._finished(
                run, name, BLOCKED, start, f"not run: upstream node '{upstream[0]}' failed"
            )
            return
        if not await self._guard(run, name, start):
            if run.stop is None:
                self._finished(run, name, SKIPPED, start, None)
            return
        # Modules get their own semaphore for sub-work: the node slot is already held, and a
        # module acquiring that one again could deadlock a full layer.
        budget = asyncio.Semaphore(self.max_concurrent_tasks)
        try:
            async with slots:
                if node.node_config.parallel:
                    outcomes = await asyncio.gather(
                        *(self._module(node, m, budget) for m in node.modules),
                        return_exceptions=True,
                    )
                    for outcome in outcomes:
                        if isinstance(outcome, BaseException):
                            raise outcome
                    results = list(outcomes)
                else:
                    results = [await self._module(node, m, budget) for m in node.modules]
        except NodeExecutionError as exc:
            self._finished(run, name, FAILED, start, str(exc))
            return
        run.results[name] = results
        self._finished(run, name, SUCCEEDED, start, None)

    async def _module(self, node: Node, module: AgentModule, budget: asyncio.Semaphore) -> Any:
        """Run one module with timeout and retries; raise NodeExecutionError when it gives up."""
        config = node.node_config
        label = f"node '{node.name}', module '{module.name or type(module).__name__}'"
        attempts = config.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(config.timeout):
                    result = await self._attempt(module, budget)
            except NonRetryableException as exc:
                raise NodeExecutionError(f"{label}: {exc}") from exc
            except TimeoutError:
                last = f"timed out after {config.timeout}s"
            except Exception as exc:  # a module may raise anything; it is a failed attempt
                last = f"{type(exc).__name__}: {exc}"
            else:
                if not (isinstance(result, dict) and result.get("status") == "error"):
                    return result
                last = f"returned error: {result.get('error') or result.get('result')}"
            if attempt + 1 < attempts:
                backoff = min(config.retry_delay * (2**attempt), MAX_BACKOFF_S)
                await asyncio.sleep(backoff * (0.5 + random.random()))
        raise NodeExecutionError(f"{label} failed after {attempts} attempt(s): {last}")

    async def _attempt(self, module: AgentModule, budget: asyncio.Semaphore) -> Any:
        """One attempt; transactional modules re-run on conflicts, which use no retries."""
        if not module.transactional:
            return await module.process(self.cache, budget)
        for conflict in range(MAX_CONFLICT_RETRIES):
            view = TransactionalCache(self.cache)
            try:
                result = await module.process(view, budget)
                if not await view.commit():
                    raise _Conflict
            except _Conflict:
                pass
            except Exception:
                if not await view.stale():
                    raise
                # It read an inconsistent mix of old and new values: a conflict, not a failure.
            else:
                return result
            await asyncio.sleep(random.uniform(0, 0.001 * min(conflict + 1, 20)))
        raise RuntimeError(f"gave up after {MAX_CONFLICT_RETRIES} conflicting commits")

    def _finish(self, task: Task, run: _Run) -> None:
        unfinished = {
            n: e for n, e in run.errors.items() if run.outcome.get(n) in (FAILED, BLOCKED)
        }
        reasons = [run.stop] if run.stop else []
        reasons += [
            e if e.startswith("node '") else f"node '{n}': {e}"
            for n, e in unfinished.items()
            if e != run.stop
        ]
        if not reasons:
            task.status = TaskStatus.COMPLETE
        elif any(outcome == SUCCEEDED for outcome in run.outcome.values()) or run.results:
            task.status = TaskStatus.PARTIAL
        else:
            task.status = TaskStatus.FAILED
        task.error = "; ".join(reasons) or None
        task.result = dict(run.results)
