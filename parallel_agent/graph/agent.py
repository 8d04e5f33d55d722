"""The engine: runs a graph of nodes over a cache, with guards, flow control, retries, limits
and optimistic transactions. docs/semantics.md states the rules this implements.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from parallel_agent.caches.cache import Cache
from parallel_agent.caches.codec import encode
from parallel_agent.caches.memory_cache import MemoryCache
from parallel_agent.conditions import Condition, compile_condition
from parallel_agent.errors import ConditionError, NodeExecutionError, PipelineError
from parallel_agent.events import Event, EventSink, NodeFinished, NodeStarted
from parallel_agent.graph import snapshots
from parallel_agent.graph.execution import module_label, run_modules
from parallel_agent.graph.modules import (
    AgentModule,
    FlowControlModule,
    FlowDecision,
    ModuleType,
)
from parallel_agent.graph.nodes import Node, SnapshotControl
from parallel_agent.graph.plan import Plan
from parallel_agent.graph.tasks import Task, TaskStatus

Views = Callable[[frozenset[str]], Awaitable[dict[str, Any]]]
"""Called with the names a condition reads that the cache lacks; returns values for those it knows."""

SUCCEEDED, SKIPPED, FAILED, BLOCKED = "succeeded", "skipped", "failed", "blocked"


class _Stop(Exception):
    """Ends the run early with a reason (a limit or a failing condition)."""


def is_flow_control(node: Node) -> bool:
    """A node steers the run when it is FLOW_CONTROL or holds a FlowControlModule."""
    return node.type == ModuleType.FLOW_CONTROL or any(
        isinstance(m, FlowControlModule) for m in node.modules
    )


def _decisions(node: Node) -> list[tuple[FlowDecision, Condition | None]]:
    """(decision, compiled condition or None: always) for every decision, in order."""
    out: list[tuple[FlowDecision, Condition | None]] = []
    for module in node.modules:
        if isinstance(module, FlowControlModule):
            for number, d in enumerate(module.flow_config.decisions, start=1):
                what = f"node '{node.name}', decision {number} (next_node '{d.next_node}')"
                condition = (
                    None if d.condition is None else compile_condition(d.condition, what=what)
                )
                out.append((d, condition))
    return out


def _first_duplicate(names: list[str], existing: Mapping[str, Node]) -> str | None:
    """The first of `names` already in `existing` or earlier in `names`."""
    seen: set[str] = set()
    for name in names:
        if name in existing or name in seen:
            return name
        seen.add(name)
    return None


def _default(node: Node) -> str | None:
    for module in node.modules:
        if isinstance(module, FlowControlModule) and module.flow_config.default is not None:
            return module.flow_config.default
    return None


class _PassState:
    """What one pass may still run. Its scope (every node it may reach), the branch targets
    chosen in it (each with the branch points that chose it) and the nodes it ran: it runs the
    scope's nodes not yet run, but for those gated by a target not chosen (a node downstream of
    two targets runs once both are chosen)."""

    def __init__(self, plan: Plan, work: set[str], selected: set[str]) -> None:
        self.plan = plan
        self.work = work
        self.scope = set(selected)
        for point in plan.branch_points():
            if point in selected:
                for target in plan.targets(point):
                    self.scope |= plan.downstream_of(target) & work
        self.chosen: dict[str, set[str]] = {
            target: set() for target, gated in plan.gates.items() if gated & selected
        }
        self.ran: set[str] = set()

    def selected(self) -> set[str]:
        closed: set[str] = set()
        for target, gated in self.plan.gates.items():
            if target not in self.chosen:
                closed |= gated
        return (self.scope - closed) - self.ran

    def add(self, inserted: list[str]) -> None:
        """Nodes a module added while running join the pass."""
        self.scope.update(inserted)

    def choose(self, decisions: list[tuple[str, str]]) -> None:
        """Branch points chose: a loop back (a target upstream of its branch point) runs again
        from its target, the branch points there deciding again; any other target joins the
        pass with what is downstream of it, once (a node already run is not run again)."""
        plan = self.plan
        again: set[str] = set()
        for point, target in decisions:
            if target in plan.upstream_of(point) | {point}:
                again |= plan.downstream_of(target) & self.work
        self.scope |= again
        self.ran -= again
        for target, points in list(self.chosen.items()):
            if points and points <= again:  # chosen by branch points that decide again
                del self.chosen[target]
        for point, target in decisions:
            if point not in again and target not in plan.upstream_of(point):
                self.chosen.setdefault(target, set()).add(point)
                self.scope |= plan.downstream_of(target) & self.work


class _Run:
    """Mutable state of one `run_task` call."""

    def __init__(self) -> None:
        self.visits: dict[str, int] = {}
        self.total = 0
        self.outcome: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.results: dict[str, list[Any]] = {}
        self.stop: str | None = None
        self.failures: list[str] = []  # failed nodes, in the order they failed
        self.inserted: list[str] = []  # nodes a module's `new_nodes` added during this layer
        self.before = ""  # cache fingerprint when the current pass began
        self.task: Task | None = None


class Agent:
    """Holds the graph and runs tasks through it.

    `max_concurrent_tasks` bounds how many nodes of a layer run at once; `max_total_iterations`
    bounds node visits over the whole run. `views` supplies values for condition names the cache
    does not hold (the YAML layer's computed keys). `events` receives NodeStarted/NodeFinished.

    At the end of a run the task's outcome is published to `output_mailbox` and each failure to
    `error_mailbox` ("" publishes nothing). `auto_snapshot` writes a snapshot before the layer of
    every node whose `snapshot` asks for one, under `snapshot_dir` (default: $PAGENT_SNAPSHOT_DIR,
    else <tmp>/pagent_snapshot); `run_from_snapshot` continues from one.
    """

    def __init__(
        self,
        cache: Cache | None = None,
        max_concurrent_tasks: int = 5,
        max_total_iterations: int = 100,
        events: EventSink | None = None,
        views: Views | None = None,
        *,
        nodes: Mapping[str, Node] | Iterable[Node] = (),
        output_mailbox: str = "agent_output",
        error_mailbox: str = "agent_error",
        auto_snapshot: bool = False,
        snapshot_dir: str | Path | None = None,
    ) -> None:
        if max_concurrent_tasks < 1 or max_total_iterations < 1:
            raise PipelineError("max_concurrent_tasks and max_total_iterations must be >= 1")
        self.cache: Cache = cache if cache is not None else MemoryCache()
        self.max_concurrent_tasks = max_concurrent_tasks
        self.max_total_iterations = max_total_iterations
        self.events = events
        self.views = views
        self.output_mailbox = output_mailbox
        self.error_mailbox = error_mailbox
        self.auto_snapshot = auto_snapshot
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.snapshots: list[Path] = []
        """Snapshot directories this agent wrote, oldest first."""
        self.node_results: dict[str, Any] = {}
        """Per node visited in the last run: `{"status": "success", "results": [...]}` or
        `{"status": "error", "error": ...}` (the framework's shape; not kept for skipped nodes)."""
        self.stopped: str | None = None
        """Why the last run stopped before its end (a limit, a condition that raised), or None
        when it went to its end (nodes may have failed on the way)."""
        self.nodes: dict[str, Node] = {}
        self._guards: dict[str, Condition] = {}
        self._flows: dict[str, list[tuple[FlowDecision, Condition | None]]] = {}
        self.add_multiple_nodes(nodes.values() if isinstance(nodes, Mapping) else nodes)

    def add_node(self, node: Node) -> None:
        """Add a node; names must be unique."""
        if node.name in self.nodes:
            raise PipelineError(f"duplicate node name '{node.name}'")
        self.nodes[node.name] = node

    def add_multiple_nodes(self, nodes: Iterable[Node]) -> None:
        """Add several nodes; on a duplicate name none of them is added."""
        new = list(nodes)
        taken = _first_duplicate([n.name for n in new], self.nodes)
        if taken is not None:
            raise PipelineError(f"duplicate node name '{taken}'")
        for node in new:
            self.add_node(node)

    @property
    def graph(self) -> dict[str, list[str]]:
        """Each node's dependencies, by node name."""
        return {name: list(node.dependencies) for name, node in self.nodes.items()}

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
        task.status = TaskStatus.EXECUTING
        task.result, task.error = None, None
        self.node_results = {}
        await self.cache.set("task", task)
        return await self._execute(task, plan, run, self._work(), None)

    async def run_from_snapshot(self, path: str | Path) -> Task:
        """Continue the run a snapshot directory recorded: the cache is restored to what it held
        then, finished nodes keep their results, and the run goes on from the snapshot's layer.

        The agent must hold the snapshot's nodes (modules are code: build the same graph first);
        see docs/semantics.md for what a snapshot keeps."""
        state = snapshots.read(Path(path))
        missing = sorted(set(state.graph) - set(self.nodes))
        if missing:
            raise PipelineError(
                f"snapshot {path} needs node(s) this agent does not have: {', '.join(missing)}"
            )
        for name, dependencies in state.graph.items():
            self.nodes[name].dependencies = list(dependencies)
        plan = self.validate()
        await self.cache.clear()
        for key, value in state.cache.items():
            await self.cache.set(key, value)
        run = _Run()
        run.visits, run.total = dict(state.visits), state.total
        run.outcome, run.errors, run.results = (
            dict(state.outcome),
            dict(state.errors),
            dict(state.results),
        )
        run.failures = list(state.failures)
        self.node_results = dict(state.node_results)
        work = self._work() & set(state.work)
        return await self._execute(state.task, plan, run, work, (set(state.pending), state.before))

    def _work(self) -> set[str]:
        """Every node but the loop controller."""
        controllers = self._controllers()
        return set(self.nodes) - {c.name for c in controllers[:1]}

    async def _execute(
        self,
        task: Task,
        plan: Plan,
        run: _Run,
        work: set[str],
        resume: tuple[set[str], str] | None,
    ) -> Task:
        """Passes until the controller ends the run; `resume` is (pending nodes, fingerprint)."""
        node_slots = asyncio.Semaphore(self.max_concurrent_tasks)
        controllers = self._controllers()
        controller = controllers[0] if controllers else None
        run.task = task
        selected, resumed = (
            (plan.runnable(work), None) if resume is None else (resume[0] & work, resume[1])
        )
        try:
            while True:
                if resumed is not None:
                    run.before, resumed = resumed, None
                else:
                    run.before = await self._fingerprint() if controller else ""
                await self._pass(plan, run, selected, work, node_slots)
                if controller is None or await self._fingerprint() == run.before:
                    break  # no controller, or a fixpoint: another pass would change nothing
                target = await self._visit_controller(run, controller)
                if target is None:
                    break
                selected = plan.runnable(work, target)
        except _Stop as stop:
            run.stop = str(stop)
        self._finish(task, run)
        await self.cache.set("task", task)
        await self._publish_outcome(task, run, plan)
        return task

    async def _fingerprint(self) -> str:
        return hashlib.sha256(encode(await self.cache.get_all(), sort_keys=True)).hexdigest()

    async def _pass(
        self, plan: Plan, run: _Run, selected: set[str], work: set[str], slots: asyncio.Semaphore
    ) -> None:
        """Run `selected` layer by layer. What a branch point chooses joins the rest of the pass
        (a target upstream of it, a loop back, runs again with what is downstream of it); every
        node of the pass not yet reached still runs (`_PassState`)."""
        state = _PassState(plan, work, selected)
        while True:
            replanned = False
            layers = plan.layers(state.selected())
            for index, layer in enumerate(layers):
                if self.auto_snapshot:
                    await self._snapshot_before(run, layer, layers[index:], work)
                admitted = [name for name in layer if self._admit(run, name)]
                state.ran.update(admitted)
                plain = [n for n in admitted if not is_flow_control(self.nodes[n])]
                await asyncio.gather(*(self._run_node(run, n, slots) for n in plain))
                chosen: list[tuple[str, str]] = []
                for name in admitted:
                    if name not in plain and run.stop is None:
                        target = await self._branch(run, name)
                        if target is not None:
                            chosen.append((name, target))
                if run.stop is not None:
                    raise _Stop(run.stop)
                if run.inserted:  # a module added nodes: re-plan the rest of this pass
                    plan.__dict__.update(vars(self.validate()))
                    work.update(run.inserted)
                    state.add(run.inserted)
                    run.inserted.clear()
                    replanned = True
                if chosen:
                    state.choose(chosen)
                    replanned = True
                if replanned:
                    break
            if not replanned:
                return

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
        if outcome == FAILED:
            run.failures.append(name)
            self.node_results[name] = {"status": "error", "error": error}
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
        if self.auto_snapshot:  # resuming runs an empty pass, then consults it again
            await self._snapshot_before(run, [node.name], [], self._work())
        if not self._admit(run, node.name):
            raise _Stop(run.stop or "limit reached")
        target = await self._branch(run, node.name)
        if run.stop is not None:
            raise _Stop(run.stop)
        return target

    async def _branch(self, run: _Run, name: str) -> str | None:
        """Evaluate a flow-control node: first true decision, else default, else None. A branch
        point whose dependency failed decides nothing, as any node would not run."""
        start = time.monotonic()
        node = self.nodes[name]
        upstream = [d for d in node.dependencies if run.outcome.get(d) in (FAILED, BLOCKED)]
        if upstream:
            self._finished(
                run, name, BLOCKED, start, f"not run: upstream node '{upstream[0]}' failed"
            )
            return None
        if not await self._guard(run, name, start):
            if run.stop is None:
                self._finished(run, name, SKIPPED, start, None)
            return None
        workers = [m for m in node.modules if not isinstance(m, FlowControlModule)]
        done: list[Any] = []
        if workers:  # a flow-control node's other modules run first, then it decides
            budget = asyncio.Semaphore(self.max_concurrent_tasks)
            try:
                done = await run_modules(node, self.cache, budget, workers)
                done = self._storable(run, node, done, workers)
            except NodeExecutionError as exc:
                self._finished(run, name, FAILED, start, str(exc))
                return None
        decisions = self._flows.get(name, [])
        names: frozenset[str] = frozenset().union(*(c.names for _, c in decisions if c))
        namespace = await self._namespace(names)  # all decisions see the same snapshot
        chosen: FlowDecision | None = None
        try:
            chosen = next((d for d, c in decisions if c is None or c.evaluate(namespace)), None)
        except ConditionError as exc:
            run.stop = str(exc)
            self._finished(run, name, FAILED, start, str(exc))
            return None
        target = chosen.next_node if chosen is not None else _default(node)
        decided: dict[str, Any] = {"next_node": target}
        if chosen is not None:
            for key in chosen.condition_variables:  # consumed by the jump
                await self.cache.delete(key)
            if chosen.metadata:
                decided["metadata"] = chosen.metadata
        run.results[name] = [*done, {"status": "success", "result": decided}]
        self.node_results[name] = {"status": "success", "results": run.results[name]}
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
                results = await run_modules(node, self.cache, budget)
            results = self._storable(run, node, results, node.modules)
        except NodeExecutionError as exc:
            self._finished(run, name, FAILED, start, str(exc))
            return
        run.results[name] = results
        self.node_results[name] = {"status": "success", "results": results}
        self._finished(run, name, SUCCEEDED, start, None)

    def _storable(
        self, run: _Run, node: Node, results: list[Any], modules: list[AgentModule]
    ) -> list[Any]:
        """Results as they are kept: `new_nodes` inserted into the graph and replaced by their
        names; anything else that is not JSON fails the node (NodeExecutionError)."""
        kept: list[Any] = []
        for module, result in zip(modules, results, strict=False):
            if isinstance(result, dict) and "new_nodes" in result:
                run.inserted.extend(self._insert(node.name, result["new_nodes"]))
                result = {**result, "new_nodes": [n.name for n in result["new_nodes"]]}
            try:
                encode(result)
            except TypeError as exc:
                raise NodeExecutionError(
                    f"{module_label(node, module)} returned a result that cannot be stored "
                    f"(values are JSON): {exc}"
                ) from None
            kept.append(result)
        return kept

    def _insert(self, parent: str, new_nodes: Any) -> list[str]:
        """Add `new_nodes` after `parent`: each depends on it (and on its own dependencies), and
        the nodes that depended on `parent` now also wait for them. Returns the names added
        (a node object already in the graph, returned again by a re-visited parent, is not)."""
        if not isinstance(new_nodes, list | tuple) or not all(
            isinstance(n, Node) for n in new_nodes
        ):
            raise NodeExecutionError(f"node '{parent}': new_nodes must be a list of Node")
        fresh = [n for n in new_nodes if self.nodes.get(n.name) is not n]
        names = [n.name for n in fresh]
        taken = _first_duplicate(names, self.nodes)
        if taken is not None:
            raise NodeExecutionError(f"node '{parent}': new node name '{taken}' is already used")
        own = {n.name: list(dict.fromkeys([*n.dependencies, parent])) for n in fresh}
        children = {
            n.name: list(dict.fromkeys([*n.dependencies, *names]))
            for n in self.nodes.values()
            if parent in n.dependencies
        }
        candidate = dict(self.nodes)
        for node in fresh:
            candidate[node.name] = node.model_copy(update={"dependencies": own[node.name]})
        for child, dependencies in children.items():
            candidate[child] = candidate[child].model_copy(update={"dependencies": dependencies})
        try:
            Plan(candidate)
            for node in fresh:
                if node.node_config.condition is not None:
                    compile_condition(node.node_config.condition, what=f"node '{node.name}'")
        except PipelineError as exc:
            raise NodeExecutionError(f"node '{parent}': cannot add new nodes: {exc}") from None
        for node in fresh:
            node.dependencies = own[node.name]
            self.nodes[node.name] = node
        for child, dependencies in children.items():
            self.nodes[child].dependencies = dependencies
        return names

    async def _publish_outcome(self, task: Task, run: _Run, plan: Plan) -> None:
        """The framework's messages: the task's outcome, and one per failure."""
        failed = [n for n in dict.fromkeys(run.failures) if run.outcome.get(n) == FAILED]
        chains = [[name, *sorted(plan.downstream_of(name) - {name})] for name in failed]
        if self.error_mailbox:
            for name in failed:
                error = run.errors.get(name)
                await self.cache.publish_to_mailbox(
                    self.error_mailbox, {"status": "error", "node": name, "error": error}
                )
            if run.stop is not None and run.stop not in run.errors.values():
                await self.cache.publish_to_mailbox(
                    self.error_mailbox, {"status": "error", "error": run.stop}
                )
        if self.output_mailbox:
            message: dict[str, Any] = {"status": task.status, "result": self.node_results}
            if task.status != TaskStatus.COMPLETE:
                message["failed_chains"] = chains
                message["error"] = task.error
            await self.cache.publish_to_mailbox(self.output_mailbox, message)

    async def _snapshot_before(
        self, run: _Run, layer: list[str], pending: list[list[str]], work: set[str]
    ) -> None:
        """Snapshot the run before `layer` runs if one of its nodes asks for it."""
        wanted = sorted(
            name
            for name in layer
            if self.nodes[name].snapshot == SnapshotControl.ALWAYS
            or (self.nodes[name].snapshot == SnapshotControl.ONCE and not run.visits.get(name))
        )
        if not wanted or run.task is None:
            return
        state = snapshots.Snapshot(
            task=run.task,
            graph=self.graph,
            pending=sorted({n for names in pending for n in names}),
            work=sorted(work),
            before=run.before,
            visits=run.visits,
            total=run.total,
            outcome=run.outcome,
            errors=run.errors,
            results=run.results,
            failures=run.failures,
            node_results=self.node_results,
            cache=await self.cache.get_all(),
        )
        folder = snapshots.directory(self.snapshot_dir) / run.task.id
        self.snapshots.append(await snapshots.write(state, folder, "-".join(wanted)))

    def _finish(self, task: Task, run: _Run) -> None:
        self.stopped = run.stop
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
