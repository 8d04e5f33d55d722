"""The agent-graph API built the way the framework's documentation shows it (issue 15): keyword-
built modules and configs, unconditional jumps, agent and module mailboxes, middleware, module
timeouts, stop_on_success, node_results, Node.run, nodes added while running, scoped caches and
snapshots. Each graph runs on the in-process cache and on a real Redis (unique prefix)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError

from parallel_agent.caches import Cache, MemoryCache
from parallel_agent.errors import PipelineError
from parallel_agent.graph import (
    Agent,
    AgentModule,
    FlowControlConfig,
    FlowControlModule,
    FlowDecision,
    Middleware,
    ModuleConfig,
    ModuleType,
    Node,
    NodeConfig,
    SnapshotControl,
    Task,
    TaskStatus,
)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        yield MemoryCache()
        return
    from parallel_agent.caches.redis_cache import RedisCache

    url = request.getfixturevalue("redis_url")
    backend = RedisCache(url=url, prefix=request.getfixturevalue("redis_prefix"))
    yield backend
    await backend.close()


class Say(AgentModule):
    """Returns `Said <name>` and counts its runs."""

    runs: int = Field(default=0)

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        self.runs += 1
        return {"status": "success", "result": f"Said {self.name}"}


class Boom(AgentModule):
    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        raise ValueError(f"boom in {self.name}")


def say(name: str, **fields: Any) -> Say:
    fields.setdefault("config", ModuleConfig())
    return Say(name=name, type=ModuleType.EXECUTOR, **fields)


def node(name: str, *modules: AgentModule, deps: tuple[str, ...] = (), **extra: Any) -> Node:
    return Node(name=name, modules=list(modules), dependencies=list(deps), **extra)


async def outcome(agent: Agent) -> dict[str, Any]:
    message = await agent.cache.get_message(agent.output_mailbox)
    assert isinstance(message, dict)
    return message


# -- 1. constructor forms ------------------------------------------------------------------


def test_modules_take_every_field_as_a_keyword() -> None:
    module = say("m", input_mailboxes=["in"], output_mailbox="out", dependencies=["x"])
    assert (module.name, module.type, module.output_mailbox) == ("m", ModuleType.EXECUTOR, "out")
    assert list(module.input_mailboxes) == ["in"] and list(module.dependencies) == ["x"]
    assert module.runs == 0  # a pydantic Field default becomes the instance's value
    other = Say(name="o", type="planner", config={"timeout": 2})
    assert other.type == ModuleType.PLANNER and other.config.timeout == 2
    assert module.config is not other.config is not Say().config  # configs are not shared


def test_class_attribute_form_annotated_or_not() -> None:
    class Plain(AgentModule):
        name = "plain"
        type = ModuleType.PLANNER
        threshold = 3

    class Annotated(AgentModule):
        name: str = "annotated"
        limit: int = 5

    assert (Plain().name, Plain().type, Plain().threshold) == ("plain", ModuleType.PLANNER, 3)
    assert Plain(threshold=4, name="renamed").threshold == 4
    assert Annotated(limit=7).limit == 7 and Annotated().name == "annotated"


def test_unknown_keywords_are_errors_that_name_them() -> None:
    with pytest.raises(TypeError, match="'colour'"):
        Say(name="m", colour="red")
    with pytest.raises(TypeError, match="'strength'"):
        Middleware(strength=1)
    with pytest.raises(ValidationError, match="max_visits"):
        ModuleConfig(max_visits=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="paralel"):
        NodeConfig(paralel=True)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="dependecies"):
        Node(name="n", dependecies=["a"])  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="when"):
        FlowDecision(next_node="x", when="true")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="fallback"):
        FlowControlConfig(decisions=[], fallback="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'retries'"):
        FlowControlModule(name="f", flow_config=FlowControlConfig(), retries=1)
    with pytest.raises(TypeError, match="flow_config"):
        FlowControlModule(name="f")
    with pytest.raises(ValidationError, match="objectiv"):
        Task(type="t", objectiv="o")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'graph_name'"):
        Agent(graph_name="x")  # type: ignore[call-arg]


def test_flow_control_module_takes_name_type_and_config() -> None:
    flow = FlowControlModule(
        name="router",
        type=ModuleType.FLOW_CONTROL,
        config=ModuleConfig(),
        flow_config=FlowControlConfig(decisions=[FlowDecision(next_node="a")]),
    )
    assert flow.name == "router" and flow.flow_config.decisions[0].condition is None


# -- 2. unconditional jumps ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "chosen", "not_run"), [(True, "one", "two"), (False, "two", "one")]
)
async def test_decision_without_condition_is_a_jump(
    cache: Cache, flag: bool, chosen: str, not_run: str
) -> None:
    await cache.set("flag", flag)
    router = FlowControlModule(
        name="router",
        type=ModuleType.FLOW_CONTROL,
        flow_config=FlowControlConfig(
            decisions=[
                FlowDecision(condition="flag == true", next_node="one"),
                FlowDecision(next_node="two"),
            ]
        ),
    )
    agent = Agent(cache=cache)
    agent.add_multiple_nodes(
        [
            node("start", router),
            node("one", say("m1"), deps=("start",)),
            node("two", say("m2"), deps=("start",)),
        ]
    )
    task = await agent.run_task(Task(type="t", objective="o"))
    message = await outcome(agent)
    assert task.status == TaskStatus.COMPLETE and message["status"] == TaskStatus.COMPLETE
    assert chosen in message["result"] and not_run not in message["result"]
    assert message["result"]["start"]["results"][0]["result"] == {"next_node": chosen}


async def test_a_flow_control_node_runs_its_other_modules_before_deciding(cache: Cache) -> None:
    def build(first: AgentModule) -> Agent:
        router = FlowControlModule(
            name="router",
            flow_config=FlowControlConfig(decisions=[FlowDecision(next_node="next")]),
        )
        agent = Agent(cache=cache)
        agent.add_node(node("start", first, router, node_config=NodeConfig(max_retries=0)))
        agent.add_node(node("next", say("n"), deps=("start",)))
        return agent

    worker = say("work")
    agent = build(worker)
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.COMPLETE and worker.runs == 1
    assert task.result["start"] == [
        {"status": "success", "result": "Said work"},
        {"status": "success", "result": {"next_node": "next"}},
    ]
    failing = build(Boom(name="bad"))
    task = await failing.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.FAILED and "next" not in task.result
    assert "node 'start', module 'bad' failed after 1 attempt(s)" in str(task.error)


async def test_a_decision_consumes_its_condition_variables_and_keeps_metadata(
    cache: Cache,
) -> None:
    class Flag(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("rounds", await cache.get("rounds", 0) + 1)
            if await cache.get("rounds") < 3:
                await cache.set("again", True)
            return {"status": "success"}

    loop = FlowControlModule(
        name="loop",
        flow_config=FlowControlConfig(
            decisions=[
                FlowDecision(
                    condition="again == true",
                    next_node="work",
                    condition_variables=["again"],
                    metadata={"why": "flag set"},
                )
            ]
        ),
    )
    agent = Agent(cache=cache)
    agent.add_node(node("work", Flag(name="flag")))
    agent.add_node(node("loop", loop, type=ModuleType.FLOW_CONTROL))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.COMPLETE and await cache.get("rounds") == 3
    assert await cache.get("again") is None  # consumed by the last jump
    assert agent.node_results["loop"]["results"][0]["result"] == {"next_node": None}
    assert agent.node_results["work"]["status"] == "success"
    jump = FlowDecision(next_node="x", metadata={"why": "always"})
    router = FlowControlModule(name="r", flow_config=FlowControlConfig(decisions=[jump]))
    branching = Agent(cache=cache)
    branching.add_multiple_nodes([node("start", router), node("x", say("x"), deps=("start",))])
    task = await branching.run_task(Task(type="t", objective="o"))
    assert task.result["start"] == [
        {"status": "success", "result": {"next_node": "x", "metadata": {"why": "always"}}}
    ]


def test_node_fields_are_validated_on_assignment() -> None:
    built = node("n", say("a"))
    with pytest.raises(ValidationError, match="dependencies"):
        built.dependencies = (["x"],)  # type: ignore[assignment]


# -- 3. mailboxes --------------------------------------------------------------------------


async def test_output_mailbox_gets_each_node_result_in_the_frameworks_shape(cache: Cache) -> None:
    agent = Agent(cache=cache)
    agent.add_node(node("A", say("a")))
    agent.add_node(node("B", say("b"), deps=("A",)))
    agent.add_node(node("C", say("c"), deps=("A",)))
    agent.add_node(node("D", say("d"), deps=("B", "C")))
    await agent.run_task(Task(type="t", objective="o"))
    message = await outcome(agent)
    assert message["status"] == TaskStatus.COMPLETE and "failed_chains" not in message
    assert message["result"] == agent.node_results
    assert {n: r["results"][0]["result"] for n, r in message["result"].items()} == {
        "A": "Said a",
        "B": "Said b",
        "C": "Said c",
        "D": "Said d",
    }
    assert await cache.get_message(agent.error_mailbox) is None


async def test_failed_chains_and_error_mailbox(cache: Cache) -> None:
    agent = Agent(cache=cache)
    agent.add_multiple_nodes(
        [
            node("A", say("a")),
            node("B", Boom(name="b"), node_config=NodeConfig(max_retries=1, retry_delay=0)),
            node("C", say("c"), deps=("A",)),
            node("D", say("d"), deps=("B",)),
            node("E", say("e"), deps=("D",)),
        ]
    )
    task = await agent.run_task(Task(type="t", objective="o"))
    message = await outcome(agent)
    assert task.status == message["status"] == TaskStatus.PARTIAL
    assert message["failed_chains"] == [["B", "D", "E"]]
    assert message["result"]["B"]["status"] == "error"
    assert {"A", "C"} <= set(message["result"]) and "D" not in message["result"]
    assert "B" not in task.result  # a failed node's module results are not the task's result
    error = await cache.get_message(agent.error_mailbox)
    assert error["status"] == "error" and error["node"] == "B"
    assert "ValueError: boom in b" in error["error"] and "2 attempt(s)" in error["error"]
    assert await cache.get_message(agent.error_mailbox) is None


async def test_limit_stops_are_published_on_the_error_mailbox(cache: Cache) -> None:
    loop = FlowControlModule(
        name="loop", flow_config=FlowControlConfig(decisions=[FlowDecision(next_node="A")])
    )
    agent = Agent(cache=cache, max_total_iterations=5, error_mailbox="errors")
    agent.add_multiple_nodes(
        [node("A", say("a")), node("loop", loop, type=ModuleType.FLOW_CONTROL)]
    )

    class Counter(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("n", await cache.get("n", 0) + 1)  # never a fixpoint
            return {"status": "success", "result": None}

    agent.nodes["A"].modules.append(Counter(name="count"))
    task = await agent.run_task(Task(type="t", objective="o"))
    error = await cache.get_message("errors")
    assert error == {"status": "error", "error": task.error}
    assert "max_total_iterations=5" in str(task.error)
    assert (await outcome(agent))["status"] == task.status


async def test_module_output_mailbox_feeds_a_later_module(cache: Cache) -> None:
    class Reader(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            got = [await cache.get_message(box) for box in self.input_mailboxes]
            return {"status": "success", "result": got}

    agent = Agent(cache=cache)
    agent.add_node(node("A", say("a", output_mailbox="from_a")))
    agent.add_node(node("B", say("b", output_mailbox="from_b")))
    reader = Reader(name="r", input_mailboxes=["from_a", "from_b"], output_mailbox="from_r")
    agent.add_node(node("R", reader, deps=("A", "B")))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.result["R"][0]["result"] == [
        {"status": "success", "result": "Said a"},
        {"status": "success", "result": "Said b"},
    ]
    assert await cache.get_message("from_r") == task.result["R"][0]
    assert await cache.get_message("from_a") is None  # each result was published once


async def test_several_modules_read_one_message_with_peek_mailbox(cache: Cache) -> None:
    class Peeker(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            seen = [(await cache.peek_mailbox(box))[0]["result"] for box in self.input_mailboxes]
            return {"status": "success", "result": f"{self.name} saw {', '.join(seen)}"}

    agent = Agent(cache=cache)
    agent.add_node(node("A", say("a", output_mailbox="from_a")))
    for name in ("B1", "B2"):
        agent.add_node(node(name, Peeker(name=name, input_mailboxes=["from_a"]), deps=("A",)))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert [task.result[n][0]["result"] for n in ("B1", "B2")] == ["B1 saw Said a", "B2 saw Said a"]
    assert len(await cache.peek_mailbox("from_a")) == 1


async def test_empty_mailbox_names_publish_nothing(cache: Cache) -> None:
    agent = Agent(cache=cache, output_mailbox="", error_mailbox="")
    agent.add_node(node("A", Boom(name="b"), node_config=NodeConfig(max_retries=0)))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.FAILED
    for box in ("", "agent_output", "agent_error"):
        assert await cache.get_message(box) is None


# -- 4. middleware, module timeout, stop_on_success ----------------------------------------


class Tag(Middleware):
    label: str = ""

    async def process(self, data: Any, cache: Cache) -> Any:
        await cache.set(f"seen_{self.label}", data["result"])
        return {**data, "result": f"{data['result']}+{self.label}"}


async def test_middlewares_apply_in_order_with_the_modules_cache(cache: Cache) -> None:
    agent = Agent(cache=cache)
    config = ModuleConfig(middlewares=[Tag(label="one"), Tag(label="two")])
    agent.add_node(node("A", Say(name="a", config=config)))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.result["A"][0]["result"] == "Said a+one+two"
    assert await cache.get("seen_one") == "Said a" and await cache.get("seen_two") == "Said a+one"


class Stuck(AgentModule):
    """Hangs on its first `hang` runs, then succeeds."""

    hang: int = 1
    runs: int = 0

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        self.runs += 1
        if self.runs <= self.hang:
            await asyncio.Event().wait()
        return {"status": "success", "result": self.runs}


async def test_module_timeout_fails_the_attempt_and_is_retried(cache: Cache) -> None:
    agent = Agent(cache=cache)
    retried = Stuck(name="late", config=ModuleConfig(timeout=0.05))
    never = Stuck(name="never", hang=99, config=ModuleConfig(timeout=0.05))
    agent.add_node(node("ok", retried, node_config=NodeConfig(max_retries=1, retry_delay=0)))
    agent.add_node(node("bad", never, node_config=NodeConfig(max_retries=2, retry_delay=0)))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.result["ok"] == [{"status": "success", "result": 2}]
    assert never.runs == 3 and task.status == TaskStatus.PARTIAL
    assert "module 'never' failed after 3 attempt(s): execution timed out after 0.05s" in str(
        task.error
    )


async def test_stop_on_success_skips_the_rest_of_a_sequential_node(cache: Cache) -> None:
    first = say("first", config=ModuleConfig(stop_on_success=True))
    second = say("second")
    agent = Agent(cache=cache)
    agent.add_node(node("A", first, second))
    agent.add_node(node("B", say("x"), say("y")))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert [r["result"] for r in task.result["A"]] == ["Said first"] and second.runs == 0
    assert len(task.result["B"]) == 2


# -- 5. node_results, add_multiple_nodes, Node.run, new_nodes, unstorable results -----------


def test_add_multiple_nodes_adds_all_or_none() -> None:
    agent = Agent()
    agent.add_multiple_nodes([node("A", say("a")), node("B", say("b"), deps=("A",))])
    assert agent.graph == {"A": [], "B": ["A"]}
    with pytest.raises(PipelineError, match="duplicate node name 'A'"):
        agent.add_multiple_nodes([node("C", say("c")), node("A", say("a"))])
    assert set(agent.nodes) == {"A", "B"}
    assert set(Agent(nodes=[node("X", say("x"))]).nodes) == {"X"}


async def test_node_run_returns_the_frameworks_shape(cache: Cache) -> None:
    good = node("n", say("a"), say("b"))
    assert await good.run(cache, asyncio.Semaphore(2)) == {
        "status": "success",
        "results": [
            {"status": "success", "result": "Said a"},
            {"status": "success", "result": "Said b"},
        ],
    }
    bad = node("m", Boom(name="x"), node_config=NodeConfig(max_retries=0))
    result = await bad.run(cache, asyncio.Semaphore(1))
    assert result["status"] == "error" and "node 'm', module 'x'" in result["error"]


class Writes(AgentModule):
    key: str = ""

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        await cache.set(self.key, sorted(await cache.keys()))
        return {"status": "success", "result": self.key}


async def test_new_nodes_are_inserted_into_the_running_plan(cache: Cache) -> None:
    dynamic = node("dynamic", Writes(name="w", key="dynamic_saw"))

    class Creator(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            assert self.container is not None and self.container.name == "creator"
            return {"status": "success", "result": "added", "new_nodes": [dynamic]}

    agent = Agent(cache=cache)
    agent.add_multiple_nodes(
        [
            node("creator", Creator(name="c")),
            node("side", say("s")),
            node("final", Writes(name="f", key="final_saw"), deps=("creator",)),
        ]
    )
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.COMPLETE, task.error
    assert agent.graph["dynamic"] == ["creator"] and "dynamic" in agent.graph["final"]
    assert task.result["creator"][0]["new_nodes"] == ["dynamic"]
    assert "dynamic_saw" in await cache.get("final_saw")  # final ran after the new node
    assert set(agent.node_results) == {"creator", "side", "dynamic", "final"}
    assert (await outcome(agent))["result"]["dynamic"]["status"] == "success"


async def test_a_revisited_parent_may_return_its_new_node_again(cache: Cache) -> None:
    dynamic_module = say("dyn")
    dynamic = node("dynamic", dynamic_module)

    class Creator(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("rounds", await cache.get("rounds", 0) + 1)
            return {"status": "success", "new_nodes": [dynamic]}

    loop = FlowControlModule(
        name="loop",
        flow_config=FlowControlConfig(
            decisions=[FlowDecision(condition="rounds < 2", next_node="creator")]
        ),
    )
    agent = Agent(cache=cache)
    agent.add_multiple_nodes(
        [
            node("creator", Creator(name="c")),
            node("final", say("f"), deps=("creator",)),
            node("loop", loop, type=ModuleType.FLOW_CONTROL),
        ]
    )
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.COMPLETE, task.error
    assert dynamic_module.runs == 2 and task.result["creator"][0]["new_nodes"] == ["dynamic"]


async def test_bad_new_nodes_fail_the_creating_node(cache: Cache) -> None:
    class Creator(AgentModule):
        new: Any = None

        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            return {"status": "success", "new_nodes": self.new}

    agent = Agent(cache=cache)
    orphan = node("orphan", say("o"), deps=("nowhere",))
    agent.add_node(node("a", Creator(name="c", new=[orphan])))
    agent.add_node(node("b", Creator(name="c", new=["not a node"])))
    agent.add_node(node("c", Creator(name="c", new=[node("a", say("x"))])))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.FAILED and set(agent.nodes) == {"a", "b", "c"}
    assert "node 'a': cannot add new nodes: node 'orphan' depends on unknown node" in str(
        task.error
    )
    assert "node 'b': new_nodes must be a list of Node" in str(task.error)
    assert "node 'c': new node name 'a' is already used" in str(task.error)


async def test_a_result_that_cannot_be_stored_fails_its_node(cache: Cache) -> None:
    class Opaque(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            return {"status": "success", "result": object()}

    agent = Agent(cache=cache)
    agent.add_node(node("opaque", Opaque(name="o")))
    agent.add_node(node("fine", say("f")))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.PARTIAL
    assert (
        "node 'opaque', module 'o' returned a result that cannot be stored (values are JSON): "
        "Type is not JSON serializable: object" in str(task.error)
    )
    assert await cache.get("task") == task
    assert (await outcome(agent))["result"]["opaque"]["status"] == "error"


async def test_max_concurrent_tasks_changed_after_construction_is_honoured(cache: Cache) -> None:
    running = peak = 0

    class Probe(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            for _ in range(5):
                await asyncio.sleep(0)
            running -= 1
            return {"status": "success"}

    agent = Agent(cache=cache)
    agent.max_concurrent_tasks = 2
    agent.add_multiple_nodes([node(f"n{i}", Probe(name="p")) for i in range(6)])
    assert (await agent.run_task(Task(type="t", objective="o"))).status == TaskStatus.COMPLETE
    assert peak == 2


async def test_generator_modules_fail_clearly(cache: Cache) -> None:
    class Streams(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> Any:
            yield {"status": "success"}

    agent = Agent(cache=cache)
    agent.add_node(node("gen", Streams(name="s"), node_config=NodeConfig(max_retries=0)))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.FAILED
    assert "module 's' failed after 1 attempt(s): TypeError" in str(task.error)


# -- 6. scoped caches inside modules -------------------------------------------------------


async def test_modules_scope_their_keys_with_async_with(cache: Cache) -> None:
    class Scoped(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            async with cache.with_prefix(self.name):
                await cache.set("count", await cache.get("count", 0) + 1)
                await cache.publish_to_mailbox("done", self.name)
                return {"status": "success", "result": sorted(await cache.keys())}

    agent = Agent(cache=cache)
    agent.add_node(node("A", Scoped(name="alpha"), Scoped(name="beta")))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert [r["result"] for r in task.result["A"]] == [["count"], ["count"]]
    assert await cache.get("alpha:count") == 1 and await cache.get("beta:count") == 1
    async with cache.with_prefix("beta"):
        assert await cache.get_message("done") == "beta"


def test_redis_cache_takes_the_frameworks_connection_keywords() -> None:
    from parallel_agent.caches.redis_cache import RedisCache

    assert RedisCache(host="cache.local", port=6380, db=2, password="p@ss:").url == (
        "redis://:p%40ss%3A@cache.local:6380/2"
    )
    assert RedisCache(host="::1").url == "redis://[::1]:6379/0"
    assert RedisCache(db=3).url == "redis://localhost:6379/3"
    with pytest.raises(ValueError, match="either url or host"):
        RedisCache("redis://elsewhere:6379/0", host="cache.local")


async def test_default_prefix_and_suffix_start_the_cache_scoped(cache: Cache) -> None:
    if isinstance(cache, MemoryCache):
        scoped: Cache = MemoryCache(default_prefix="test", default_suffix="v1", _store=cache._store)
    else:
        from parallel_agent.caches.redis_cache import RedisCache

        assert isinstance(cache, RedisCache)
        scoped = RedisCache(cache.url, cache.prefix, default_prefix="test", default_suffix="v1")
    await scoped.set("k", 1)
    await scoped.publish_to_mailbox("box", "m")
    assert await scoped.get_all() == {"k": 1} and await scoped.keys() == {"k"}
    assert await cache.get_all() == {"test:k:v1": 1}
    assert await cache.get_message("test:box:v1") == "m"
    async with scoped.with_prefix("inner"):
        await scoped.set("k", 2)
    assert await cache.get("test:inner:k:v1") == 2
    await scoped.close()


async def test_an_agent_can_run_on_a_scoped_view(cache: Cache) -> None:
    class Count(AgentModule):
        output_mailbox = "counted"

        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("n", await cache.get("n", 0) + 1)
            return {"status": "success", "result": sorted(await cache.keys())}

    agent = Agent(cache=cache.with_prefix("run1"))
    agent.add_node(node("A", Count(name="c")))
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.result["A"][0]["result"] == ["n", "task"]
    assert await cache.keys() == {"run1:n", "run1:task"}
    async with cache.with_prefix("run1"):
        assert (await cache.get_message("counted"))["result"] == ["n", "task"]
        assert (await cache.get_message("agent_output"))["status"] == TaskStatus.COMPLETE


# -- 7. snapshots --------------------------------------------------------------------------


class Gate(AgentModule):
    """Writes its key; blocks forever when `block` is set (an interrupted run)."""

    block: bool = False
    runs: int = 0
    started: Any = None

    async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
        self.runs += 1
        if self.block:
            if self.started is not None:
                self.started.set()
            await asyncio.Event().wait()
        await cache.set(self.name, await cache.get("trail", []))
        await cache.set("trail", [*await cache.get("trail", []), self.name])
        return {"status": "success", "result": self.name}


def snapshot_graph(agent: Agent, block: bool, started: asyncio.Event | None = None) -> None:
    agent.add_multiple_nodes(
        [
            node("A", Gate(name="a")),
            node(
                "B",
                Gate(name="b", block=block, started=started),
                deps=("A",),
                snapshot=SnapshotControl.ALWAYS,
            ),
            node("C", Gate(name="c"), deps=("B",)),
        ]
    )


async def test_an_interrupted_run_continues_from_its_snapshot(cache: Cache, tmp_path: Path) -> None:
    started = asyncio.Event()
    first = Agent(cache=cache, auto_snapshot=True, snapshot_dir=tmp_path)
    snapshot_graph(first, block=True, started=started)
    task = Task(type="t", objective="o", params={"n": 1})
    running = asyncio.create_task(first.run_task(task))
    await started.wait()
    running.cancel()  # interrupted while B runs
    with pytest.raises(asyncio.CancelledError):
        await running
    [path] = first.snapshots
    assert path == tmp_path / task.id / "0_B"
    await cache.set("junk", 1)  # whatever happened after the snapshot is undone

    second = Agent(cache=cache)
    snapshot_graph(second, block=False)
    resumed = await second.run_from_snapshot(path)
    assert resumed.status == TaskStatus.COMPLETE and resumed.id == task.id
    assert resumed.params == {"n": 1}
    assert second.nodes["A"].modules[0].runs == 0  # type: ignore[attr-defined]
    assert await cache.get("trail") == ["a", "b", "c"] and await cache.get("junk") is None
    assert [resumed.result[n][0]["result"] for n in "ABC"] == ["a", "b", "c"]
    assert (await outcome(second))["status"] == TaskStatus.COMPLETE


@pytest.mark.parametrize(
    ("control", "count"), [(SnapshotControl.ALWAYS, 3), (SnapshotControl.ONCE, 1)]
)
async def test_snapshot_control_once_and_always(
    cache: Cache, tmp_path: Path, control: SnapshotControl, count: int
) -> None:
    class Bump(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("n", await cache.get("n", 0) + 1)
            return {"status": "success", "result": None}

    loop = FlowControlModule(
        name="loop",
        flow_config=FlowControlConfig(decisions=[FlowDecision(condition="n < 3", next_node="B")]),
    )
    agent = Agent(cache=cache, auto_snapshot=True, snapshot_dir=tmp_path)
    agent.add_multiple_nodes(
        [
            node("A", say("a")),
            node("B", Bump(name="bump"), deps=("A",), snapshot=control),
            node("loop", loop, type=ModuleType.FLOW_CONTROL),
        ]
    )
    task = await agent.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.COMPLETE and await cache.get("n") == 3
    assert [p.name for p in agent.snapshots] == [f"{i}_B" for i in range(count)]
    resumed = await agent.run_from_snapshot(agent.snapshots[-1])
    assert resumed.status == TaskStatus.COMPLETE and await cache.get("n") == 3


async def test_the_loop_controller_can_be_snapshotted(cache: Cache, tmp_path: Path) -> None:
    class Bump(AgentModule):
        async def process(self, cache: Cache, semaphore: asyncio.Semaphore) -> dict[str, Any]:
            await cache.set("n", await cache.get("n", 0) + 1)
            return {"status": "success", "result": None}

    def build() -> Agent:
        loop = FlowControlModule(
            name="loop",
            flow_config=FlowControlConfig(
                decisions=[FlowDecision(condition="n < 3", next_node="A")]
            ),
        )
        agent = Agent(cache=cache, auto_snapshot=True, snapshot_dir=tmp_path)
        agent.add_node(node("A", Bump(name="bump")))
        agent.add_node(
            node("loop", loop, type=ModuleType.FLOW_CONTROL, snapshot=SnapshotControl.ALWAYS)
        )
        return agent

    first = build()
    task = await first.run_task(Task(type="t", objective="o"))
    assert task.status == TaskStatus.COMPLETE and await cache.get("n") == 3
    assert [p.name for p in first.snapshots] == ["0_loop", "1_loop", "2_loop"]
    second = build()
    resumed = await second.run_from_snapshot(first.snapshots[1])  # taken when n was 2
    assert resumed.status == TaskStatus.COMPLETE and await cache.get("n") == 3
    assert [p.name for p in second.snapshots] == ["3_loop", "4_loop"]  # numbering goes on
    assert resumed.result["A"] == [{"status": "success", "result": None}]


async def test_no_snapshots_without_auto_snapshot(cache: Cache, tmp_path: Path) -> None:
    agent = Agent(cache=cache, snapshot_dir=tmp_path)
    snapshot_graph(agent, block=False)
    await agent.run_task(Task(type="t", objective="o"))
    assert agent.snapshots == [] and list(tmp_path.iterdir()) == []


async def test_run_from_snapshot_refuses_what_it_cannot_use(cache: Cache, tmp_path: Path) -> None:
    agent = Agent(cache=cache, auto_snapshot=True, snapshot_dir=tmp_path)
    snapshot_graph(agent, block=False)
    await agent.run_task(Task(type="t", objective="o"))
    [path] = agent.snapshots
    partial = Agent(cache=cache)
    partial.add_node(node("A", Gate(name="a")))
    with pytest.raises(PipelineError, match="needs node\\(s\\) this agent does not have: B, C"):
        await partial.run_from_snapshot(path)
    with pytest.raises(PipelineError, match="cannot read snapshot"):
        await agent.run_from_snapshot(tmp_path / "missing")
    (path / "agent.json").write_text('{"format": "other"}')
    with pytest.raises(PipelineError, match="is not a pagent-snapshot/1 snapshot"):
        await agent.run_from_snapshot(path)
    (path / "agent.json").write_text("{not json")
    with pytest.raises(PipelineError, match="is not valid JSON"):
        await agent.run_from_snapshot(path)
