"""Engine semantics: guards, flow control, retries, limits, transactions, status, events."""

from __future__ import annotations

import asyncio
import inspect
import random
from typing import Any

import pytest

from parallel_agent.caches import Cache, MemoryCache
from parallel_agent.errors import NonRetryableException, PipelineError
from parallel_agent.events import EventSink, NodeFinished
from parallel_agent.graph import (
    Agent,
    AgentModule,
    FlowControlConfig,
    FlowControlModule,
    FlowDecision,
    ModuleType,
    Node,
    NodeConfig,
    Task,
    TaskStatus,
)


class Incr(AgentModule):
    """Read-modify-write of a counter; loses updates without transactions."""

    name = "incr"

    def __init__(self, key: str = "n", transactional: bool = True) -> None:
        self.key = key
        self.transactional = transactional

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        value = await cache.get(self.key, 0)
        await asyncio.sleep(0.001)
        await cache.set(self.key, value + 1)
        return {"status": "success", "result": value + 1}


class Flaky(AgentModule):
    name = "flaky"

    def __init__(self, failures: int, exc: type[Exception] = RuntimeError) -> None:
        self.failures = failures
        self.calls = 0
        self.exc = exc

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc("boom")
        return {"status": "success", "result": self.calls}


class Outcomes(EventSink):
    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []

    def on_node_finished(self, event: NodeFinished) -> None:
        self.finished.append((event.node, event.outcome))


def _flow(decisions: list[tuple[str, str]], default: str | None = None, **kw: Any) -> Node:
    config = FlowControlConfig(
        decisions=[FlowDecision(next_node=n, condition=c) for n, c in decisions], default=default
    )
    return Node(
        name="flow", type=ModuleType.FLOW_CONTROL, modules=[FlowControlModule(config)], **kw
    )


async def test_concurrent_transactional_modules_do_not_lose_updates() -> None:
    agent = Agent(max_concurrent_tasks=10)
    for i in range(10):
        agent.add_node(Node(name=f"n{i}", modules=[Incr()]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("n") == 10


async def test_parallel_modules_in_one_node() -> None:
    agent = Agent()
    agent.add_node(Node(name="n", modules=[Incr(), Incr()], node_config=NodeConfig(parallel=True)))
    task = await agent.run_task(Task())
    assert await agent.cache.get("n") == 2
    assert sorted(r["result"] for r in task.result["n"]) == [1, 2]


async def test_guard_false_skips_and_task_is_readable() -> None:
    sink = Outcomes()
    agent = Agent(events=sink)
    agent.add_node(Node(name="a", modules=[Incr()], node_config=NodeConfig(condition="n == 5")))
    agent.add_node(
        Node(name="b", modules=[Incr("m")], node_config=NodeConfig(condition="task.params['go']"))
    )
    task = await agent.run_task(Task(params={"go": True}))
    assert task.status == TaskStatus.COMPLETE
    assert ("a", "skipped") in sink.finished and ("b", "succeeded") in sink.finished
    assert await agent.cache.get("n") is None and await agent.cache.get("m") == 1


async def test_condition_error_fails_run_with_message() -> None:
    agent = Agent()
    agent.add_node(Node(name="a", node_config=NodeConfig(condition="len(missing) > 0")))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.FAILED
    assert task.error is not None and "node 'a', condition" in task.error


async def test_views_supply_missing_names() -> None:
    async def views(names: frozenset[str]) -> dict[str, Any]:
        return dict.fromkeys(names, 3)

    agent = Agent(views=views)
    agent.add_node(Node(name="a", modules=[Incr()], node_config=NodeConfig(condition="v == 3")))
    assert (await agent.run_task(Task())).status == TaskStatus.COMPLETE
    assert await agent.cache.get("n") == 1


async def test_retries_then_success_and_non_retryable() -> None:
    flaky = Flaky(2)
    agent = Agent()
    agent.add_node(Node(name="a", modules=[flaky], node_config=NodeConfig(retry_delay=0)))
    assert (await agent.run_task(Task())).status == TaskStatus.COMPLETE
    assert flaky.calls == 3

    fatal = Flaky(1, NonRetryableException)
    agent = Agent()
    agent.add_node(Node(name="ok", modules=[Incr()]))
    agent.add_node(Node(name="a", modules=[fatal], node_config=NodeConfig(retry_delay=0)))
    task = await agent.run_task(Task())
    assert fatal.calls == 1
    assert task.status == TaskStatus.PARTIAL and "node 'a'" in (task.error or "")


async def test_timeout_and_error_status_are_failed_attempts() -> None:
    class Slow(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await asyncio.sleep(1)
            return {}

    class Err(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            return {"status": "error", "error": "nope"}

    agent = Agent()
    cfg = NodeConfig(timeout=0.01, max_retries=1, retry_delay=0)
    agent.add_node(Node(name="slow", modules=[Slow()], node_config=cfg))
    agent.add_node(Node(name="err", modules=[Err()], node_config=cfg))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.FAILED
    assert "timed out" in (task.error or "") and "nope" in (task.error or "")


async def test_controller_loops_until_fixpoint() -> None:
    agent = Agent()
    agent.add_node(
        Node(name="a", modules=[Incr()], node_config=NodeConfig(condition="n == null or n < 5"))
    )
    agent.add_node(_flow([("a", "n < 5")], default="a"))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("n") == 5


async def test_iteration_limit_names_the_limit() -> None:
    agent = Agent(max_total_iterations=7)
    agent.add_node(Node(name="a", modules=[Incr()]))
    agent.add_node(_flow([("a", "true")]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.PARTIAL
    assert "max_total_iterations=7 reached" in (task.error or "")


async def test_max_visits_limit() -> None:
    agent = Agent()
    agent.add_node(Node(name="a", modules=[Incr()], node_config=NodeConfig(max_visits=3)))
    agent.add_node(_flow([("a", "true")]))
    task = await agent.run_task(Task())
    assert "max_visits=3 reached for node 'a'" in (task.error or "")
    assert await agent.cache.get("n") == 3


async def test_branch_point_jumps_downstream() -> None:
    agent = Agent()
    agent.add_node(Node(name="start", modules=[Incr("s")]))
    agent.add_node(_flow([("right", "s == 1")], default="left", dependencies=["start"]))
    agent.add_node(Node(name="left", modules=[Incr("l")], dependencies=["flow"]))
    agent.add_node(Node(name="right", modules=[Incr("r")], dependencies=["flow"]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("r") == 1 and await agent.cache.get("l") is None


async def test_upstream_failure_skips_dependents() -> None:
    agent = Agent()
    agent.add_node(Node(name="a", modules=[Flaky(99)], node_config=NodeConfig(max_retries=0)))
    agent.add_node(Node(name="b", modules=[Incr()], dependencies=["a"]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.FAILED
    assert await agent.cache.get("n") is None


def test_graph_errors() -> None:
    agent = Agent(cache=MemoryCache())
    agent.add_node(Node(name="a", dependencies=["b"]))
    agent.add_node(Node(name="b", dependencies=["a"]))
    with pytest.raises(PipelineError, match="cycle"):
        agent.validate()
    with pytest.raises(PipelineError, match="duplicate"):
        agent.add_node(Node(name="a"))


class Delayed:
    """Proxy that sleeps a random 0-3 ms before every coroutine call of the wrapped cache."""

    def __init__(self, inner: Any, rng: random.Random) -> None:
        self._inner = inner
        self._rng = rng

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def delayed(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(self._rng.uniform(0, 0.003))
            return await attr(*args, **kwargs)

        return delayed


class AppendToList(AgentModule):
    """The walkthrough's pattern: read a list, change it, write it back."""

    name = "append"

    def __init__(self, item: int, transactional: bool = True) -> None:
        self.item = item
        self.transactional = transactional

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        items = await cache.get("items") or []
        items.append(self.item)
        await asyncio.sleep(0.002)
        await cache.set("items", items)
        await cache.set(f"seen_{self.item}", len(items))
        return {"status": "success", "result": len(items)}


async def _append_concurrently(cache: Cache, transactional: bool) -> list[int]:
    agent = Agent(cache=cache, max_concurrent_tasks=12)
    for i in range(12):
        agent.add_node(Node(name=f"n{i}", modules=[AppendToList(i, transactional)]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE, task.error
    return sorted(await cache.get("items"))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_read_modify_write_is_serialized_with_random_delays_memory(seed: int) -> None:
    assert await _append_concurrently(Delayed(MemoryCache(), random.Random(seed)), True) == list(
        range(12)
    )


@pytest.mark.redis
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_read_modify_write_is_serialized_with_random_delays_redis(
    redis_url: str, redis_prefix: str, seed: int
) -> None:
    from parallel_agent.caches.redis_cache import RedisCache

    inner = RedisCache(redis_url, prefix=redis_prefix)
    try:
        items = await _append_concurrently(Delayed(inner, random.Random(seed)), True)
    finally:
        await inner.close()
    assert items == list(range(12))


async def test_without_transactions_the_same_program_loses_updates() -> None:
    """The control: the race the transactions prevent is real."""
    items = await _append_concurrently(Delayed(MemoryCache(), random.Random(1)), False)
    assert len(items) < 12


async def test_exception_after_a_stale_read_is_a_conflict_not_a_failure() -> None:
    class Pair(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("a", 1)
            await cache.set("b", 1)
            return {"status": "success"}

    class Checker(AgentModule):
        def __init__(self) -> None:
            self.calls = 0

        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            self.calls += 1
            a = await cache.get("a", 0)
            await asyncio.sleep(0.02)
            if a != await cache.get("b", 0):
                raise RuntimeError("saw a half-written pair")
            return {"status": "success", "result": a}

    checker = Checker()
    agent = Agent()
    agent.add_node(Node(name="check", modules=[checker], node_config=NodeConfig(max_retries=0)))
    agent.add_node(Node(name="pair", modules=[Pair()]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE, task.error
    assert checker.calls == 2 and task.result["check"][0]["result"] == 1


async def test_layer_concurrency_is_bounded_by_max_concurrent_tasks() -> None:
    running = peak = 0

    class Probe(AgentModule):
        transactional = False

        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            async with semaphore:  # the module's own budget: safe to acquire
                await asyncio.sleep(0.01)
            running -= 1
            return {"status": "success"}

    agent = Agent(max_concurrent_tasks=3)
    for i in range(8):
        agent.add_node(Node(name=f"n{i}", modules=[Probe()]))
    assert (await agent.run_task(Task())).status == TaskStatus.COMPLETE
    assert peak == 3


async def test_layers_follow_dependencies() -> None:
    order: list[str] = []

    class Record(AgentModule):
        transactional = False

        def __init__(self, label: str) -> None:
            self.label = label

        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            order.append(self.label)
            return {"status": "success"}

    agent = Agent()
    agent.add_node(Node(name="c", modules=[Record("c")], dependencies=["a", "b"]))
    agent.add_node(Node(name="b", modules=[Record("b")], dependencies=["a"]))
    agent.add_node(Node(name="a", modules=[Record("a")]))
    await agent.run_task(Task())
    assert order == ["a", "b", "c"]


async def test_retry_backoff_grows_exponentially(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, *args: Any) -> Any:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(random, "random", lambda: 0.5)  # jitter factor 0.5 + 0.5 = 1
    agent = Agent()
    flaky = Flaky(3)
    flaky.transactional = False
    agent.add_node(Node(name="a", modules=[flaky], node_config=NodeConfig(retry_delay=0.1)))
    assert (await agent.run_task(Task())).status == TaskStatus.COMPLETE
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])


async def test_retries_exhausted_fail_the_node_with_the_last_error() -> None:
    agent = Agent()
    agent.add_node(
        Node(name="a", modules=[Flaky(5)], node_config=NodeConfig(max_retries=2, retry_delay=0))
    )
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.FAILED
    assert task.error == "node 'a', module 'flaky' failed after 3 attempt(s): RuntimeError: boom"


async def test_decisions_in_order_then_default_then_end() -> None:
    class Mark(AgentModule):
        transactional = False

        def __init__(self, key: str) -> None:
            self.key = key

        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set(self.key, (await cache.get(self.key, 0)) + 1)
            return {"status": "success"}

    agent = Agent()
    agent.add_node(Node(name="first", modules=[Mark("first")]))
    agent.add_node(Node(name="second", modules=[Mark("second")]))
    # Both conditions hold on the first consultation: the first one listed wins.
    agent.add_node(_flow([("second", "second < 3"), ("first", "true")], default="first"))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.PARTIAL  # the loop never reaches a fixpoint...
    assert "max_total_iterations=100" in (task.error or "")  # ...so the limit ends it
    assert await agent.cache.get("second") == 3  # decision 1 while it held, then decision 2

    agent = Agent()
    agent.add_node(Node(name="first", modules=[Mark("first")]))
    agent.add_node(_flow([("first", "first < 2")], default=None))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE  # no decision and no default: the run ends
    assert await agent.cache.get("first") == 2

    agent = Agent()
    agent.add_node(Node(name="first", modules=[Mark("first")]))
    agent.add_node(Node(name="other", modules=[Mark("other")], dependencies=["first"]))
    agent.add_node(_flow([("first", "false")], default="other"))
    # The default re-plans from "other": "first" is upstream and keeps its single run.
    task = await agent.run_task(Task())
    assert await agent.cache.get("first") == 1


async def test_branch_point_can_loop_back_until_a_visit_limit() -> None:
    agent = Agent()
    agent.add_node(Node(name="work", modules=[Incr()], node_config=NodeConfig(max_visits=4)))
    agent.add_node(_flow([("work", "true")], dependencies=["work"]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.PARTIAL
    assert task.error == "max_visits=4 reached for node 'work'"
    assert await agent.cache.get("n") == 4


async def test_task_is_in_the_cache_during_and_after_the_run() -> None:
    class ReadTask(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            task = await cache.get("task")
            return {"status": "success", "result": [task.status.value, task.params.get("data")]}

    agent = Agent()
    agent.add_node(Node(name="r", modules=[ReadTask()]))
    task = await agent.run_task(Task(params={"data": [1, 2]}))
    assert task.result == {"r": [{"status": "success", "result": ["executing", [1, 2]]}]}
    stored = await agent.cache.get("task")
    assert isinstance(stored, Task) and stored.status == TaskStatus.COMPLETE


async def test_events_report_visits_and_outcomes() -> None:
    started: list[tuple[str, int]] = []
    sink = Outcomes()
    sink.on_node_started = lambda event: started.append((event.node, event.visit))  # type: ignore[method-assign]
    agent = Agent(events=sink)
    agent.add_node(
        Node(name="a", modules=[Incr()], node_config=NodeConfig(condition="n == null or n < 2"))
    )
    agent.add_node(_flow([("a", "true")]))
    await agent.run_task(Task())
    assert started[:4] == [("a", 1), ("flow", 1), ("a", 2), ("flow", 2)]
    assert ("a", "skipped") in sink.finished and ("a", "succeeded") in sink.finished


async def test_invalid_graphs_fail_before_any_work() -> None:
    agent = Agent()
    agent.add_node(Node(name="a", modules=[Incr()], dependencies=["ghost"]))
    with pytest.raises(PipelineError, match="node 'a' depends on unknown node 'ghost'"):
        await agent.run_task(Task())
    assert await agent.cache.get("task") is None

    agent = Agent()
    agent.add_node(Node(name="a", node_config=NodeConfig(condition="__import__('os')")))
    with pytest.raises(
        PipelineError, match=r"name '__import__' is not allowed .* \(node 'a', condition\)"
    ):
        agent.validate()


def _branch_agent(condition: str, *, target_deps: list[str]) -> tuple[Agent, Outcomes]:
    """The issue-12 shape: work -> gate (branch point) choosing `by_state` or `quarantine`, both
    depending on `target_deps` (not necessarily on the gate)."""
    events = Outcomes()
    agent = Agent(events=events)
    agent.add_node(Node(name="work", modules=[Incr("w")]))
    agent.add_node(_flow([("by_state", condition)], default="quarantine", dependencies=["work"]))
    agent.add_node(Node(name="by_state", modules=[Incr("b")], dependencies=target_deps))
    agent.add_node(Node(name="quarantine", modules=[Incr("q")], dependencies=target_deps))
    return agent, events


@pytest.mark.parametrize("target_deps", [["work"], ["work", "flow"]])
@pytest.mark.parametrize(
    ("condition", "chosen", "other"), [("w == 1", "b", "q"), ("w == 2", "q", "b")]
)
async def test_branch_targets_run_only_when_chosen_and_once(
    target_deps: list[str], condition: str, chosen: str, other: str
) -> None:
    """Issue 12: a branch target does not also run beside its branch point, and runs once."""
    agent, events = _branch_agent(condition, target_deps=target_deps)
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get(chosen) == 1
    assert await agent.cache.get(other) is None
    names = {"b": "by_state", "q": "quarantine"}
    assert [n for n, _ in events.finished].count(names[chosen]) == 1
    assert names[other] not in {n for n, _ in events.finished}
    assert set(task.result or {}) == {"work", "flow", names[chosen]}


async def test_nodes_downstream_of_a_branch_target_are_gated_with_it() -> None:
    agent, _ = _branch_agent("false", target_deps=["work"])
    agent.add_node(Node(name="after_b", modules=[Incr("ab")], dependencies=["by_state"]))
    agent.add_node(Node(name="after_w", modules=[Incr("aw")], dependencies=["work"]))
    await agent.run_task(Task())
    assert await agent.cache.get("ab") is None
    assert await agent.cache.get("aw") == 1
    assert await agent.cache.get("q") == 1


async def test_a_skipped_branch_point_runs_none_of_its_targets() -> None:
    agent, _ = _branch_agent("true", target_deps=["work"])
    agent.nodes["flow"].node_config = NodeConfig(condition="false")
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("b") is None and await agent.cache.get("q") is None


async def test_loop_controller_does_not_run_gated_branch_targets() -> None:
    """A controller's jump back upstream re-plans without the branch point's unchosen target."""
    agent = Agent()
    agent.add_node(Node(name="work", modules=[Incr("w")]))
    agent.add_node(
        Node(
            name="gate",
            type=ModuleType.FLOW_CONTROL,
            modules=[FlowControlModule(FlowControlConfig(decisions=[], default="done"))],
            dependencies=["work"],
        )
    )
    agent.add_node(Node(name="done", modules=[Incr("d")], dependencies=["work"]))
    agent.add_node(_flow([("work", "w < 3")]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("w") == 3
    assert await agent.cache.get("d") == 3  # chosen once per pass, never beside the gate


async def test_a_chosen_target_waits_for_its_own_upstream_in_later_layers() -> None:
    """A jump used to replace the rest of the pass: the target's own dependencies in later layers
    than the branch point never ran, and the target ran on nothing (found by a hostile-user
    helper: exit 0 with an empty output)."""
    events = Outcomes()
    agent = Agent(events=events)
    agent.add_node(Node(name="s", modules=[Incr("s")]))
    agent.add_node(_flow([("t", "true")], dependencies=["s"]))
    agent.add_node(Node(name="x", modules=[Incr("x")], dependencies=["s"]))
    agent.add_node(Node(name="m2", modules=[Incr("m2")], dependencies=["x"]))
    agent.add_node(Node(name="t", modules=[Incr("t")], dependencies=["m2"]))
    agent.add_node(Node(name="side", modules=[Incr("side")], dependencies=["m2"]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    for key in ("s", "x", "m2", "t", "side"):
        assert await agent.cache.get(key) == 1, key
    order = [name for name, _ in events.finished]
    assert order.index("m2") < order.index("t")


async def test_every_branch_point_of_a_layer_decides() -> None:
    agent = Agent()
    agent.add_node(Node(name="s", modules=[Incr("s")]))
    for point, target in (("g1", "a"), ("g2", "b")):
        config = FlowControlConfig(decisions=[FlowDecision(next_node=target, condition="true")])
        agent.add_node(
            Node(
                name=point,
                type=ModuleType.FLOW_CONTROL,
                modules=[FlowControlModule(config)],
                dependencies=["s"],
            )
        )
        agent.add_node(Node(name=target, modules=[Incr(target)], dependencies=["s"]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("a") == 1 and await agent.cache.get("b") == 1


async def test_a_loop_back_still_runs_the_rest_of_the_pass() -> None:
    agent = Agent()
    agent.add_node(Node(name="work", modules=[Incr("w")]))
    agent.add_node(_flow([("work", "w < 3")], dependencies=["work"]))
    agent.add_node(Node(name="a", modules=[Incr("a")], dependencies=["work"]))
    agent.add_node(Node(name="later", modules=[Incr("l")], dependencies=["a"]))
    agent.add_node(Node(name="r", modules=[Incr("r")]))
    agent.add_node(Node(name="r2", modules=[Incr("r2")], dependencies=["r"]))
    agent.add_node(Node(name="r3", modules=[Incr("r3")], dependencies=["r2"]))
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("w") == 3 and await agent.cache.get("a") == 3
    # "later" is downstream of the loop's target: it runs once, in the pass that does not loop.
    assert await agent.cache.get("l") == 1
    # "r3", in a later layer but outside the loop, runs once: the loop back does not drop it.
    assert await agent.cache.get("r") == 1 and await agent.cache.get("r3") == 1


def _point(name: str, target: str, condition: str, dependencies: list[str]) -> Node:
    config = FlowControlConfig(decisions=[FlowDecision(next_node=target, condition=condition)])
    return Node(
        name=name,
        type=ModuleType.FLOW_CONTROL,
        modules=[FlowControlModule(config)],
        dependencies=dependencies,
    )


def _agent(*nodes: Node) -> Agent:
    agent = Agent()
    for node in nodes:
        agent.add_node(node)
    return agent


def _node(name: str, *dependencies: str) -> Node:
    return Node(name=name, modules=[Incr(name)], dependencies=list(dependencies))


async def test_a_chosen_target_outlives_a_later_loop_back() -> None:
    """Found by a reviewer helper: a loop back dropped a target a branch point outside the loop
    had chosen earlier in the pass; it never ran, and the run was complete."""
    agent = _agent(
        _node("A"), _node("S"), _point("P0", "T0", "true", ["S"]),
        _node("X1", "A"), _node("X2", "X1"), _node("X3", "X2"), _node("T0", "P0", "X3"),
        _point("P2", "A", "A < 2", ["X1"]),
    )  # fmt: skip
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("A") == 2 and await agent.cache.get("T0") == 1


async def test_a_target_two_branch_points_choose_runs_once() -> None:
    agent = _agent(
        _node("A"), _point("P1", "handler", "true", ["A"]), _node("B", "A"),
        _point("P2", "handler", "true", ["B"]), _node("handler"),
    )  # fmt: skip
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("handler") == 1


@pytest.mark.parametrize("second", ["true", "false"])
async def test_a_node_behind_two_targets_runs_once_both_are_chosen(second: str) -> None:
    """D is downstream of T1 and of T2, targets of two branch points: it ran before P2 decided
    (and again after T2), or without T2 when P2 chose nothing."""
    agent = _agent(
        _node("A"), _point("P1", "T1", "true", ["A"]), _node("T1", "P1"),
        _node("B1", "A"), _node("B2", "B1"), _node("B3", "B2"),
        _point("P2", "T2", second, ["B3"]), _node("T2", "P2"), _node("D", "T1", "T2"),
    )  # fmt: skip
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.COMPLETE
    assert await agent.cache.get("T1") == 1
    assert await agent.cache.get("D") == (1 if second == "true" else None)


async def test_a_branch_point_whose_dependency_failed_chooses_nothing() -> None:
    """semantics.md: no target of a blocked branch point runs. It decided anyway, and its
    target ran (found by a reviewer helper)."""
    agent = _agent(
        Node(name="A", modules=[Flaky(5, NonRetryableException)]),
        _point("P", "T", "true", ["A"]),
        _node("T"),
    )
    task = await agent.run_task(Task())
    assert task.status == TaskStatus.FAILED
    assert "node 'P': not run: upstream node 'A' failed" in (task.error or "")
    assert await agent.cache.get("T") is None


def test_a_target_downstream_of_another_alternative_is_refused() -> None:
    agent = Agent()
    agent.add_node(Node(name="m", modules=[Incr("m")]))
    agent.add_node(_flow([("total", "true")], default="plus", dependencies=["m"]))
    agent.add_node(Node(name="plus", modules=[Incr("p")], dependencies=["m"]))
    agent.add_node(Node(name="total", modules=[Incr("t")], dependencies=["plus"]))
    with pytest.raises(PipelineError, match="'total' depends on 'plus', which does not run"):
        agent.validate()


def test_warnings_name_unconditional_and_unreachable_targets() -> None:
    agent = Agent()
    agent.add_node(Node(name="work", modules=[Incr("w")]))
    agent.add_node(_flow([("work", "true"), ("a", "true")], default="b", dependencies=["work"]))
    agent.add_node(Node(name="a", modules=[Incr("a")], dependencies=["flow"]))
    agent.add_node(Node(name="b", modules=[Incr("b")], dependencies=["flow"]))
    agent.add_node(Node(name="both", modules=[Incr("c")], dependencies=["a", "b"]))
    warnings = agent.warnings()
    assert any(
        "'work' is a target of flow control node 'flow' but runs unconditionally" in w
        for w in warnings
    )
    assert any("node 'both' can never run" in w and "'a' and 'b'" in w for w in warnings)
    assert any(
        "decision 1 always holds, so 'a', 'b' after it can never be chosen" in w for w in warnings
    )
    clean, _ = _branch_agent("w == 1", target_deps=["work"])
    assert clean.warnings() == []


def test_an_unconditional_decision_shadows_the_rest() -> None:
    agent = Agent()
    agent.add_node(Node(name="work", modules=[Incr("w")]))
    config = FlowControlConfig(
        decisions=[FlowDecision(next_node="a"), FlowDecision(next_node="b", condition="w > 1")]
    )
    agent.add_node(
        Node(
            name="flow",
            type=ModuleType.FLOW_CONTROL,
            modules=[FlowControlModule(config)],
            dependencies=["work"],
        )
    )
    agent.add_node(Node(name="a", modules=[Incr("a")], dependencies=["flow"]))
    agent.add_node(Node(name="b", modules=[Incr("b")], dependencies=["flow"]))
    assert agent.warnings() == [
        "flow control node 'flow': decision 1 always holds, so 'b' after it can never be chosen"
    ]
