"""Runs the walkthrough's program unchanged (bar the package name) on both cache backends,
with random delays injected into every cache call to shake out races."""

from __future__ import annotations
import __future__

import asyncio
import random
import re
from pathlib import Path
from typing import Any

import pytest

from parallel_agent.caches.memory_cache import MemoryCache
from parallel_agent.graph import Agent, Task, TaskStatus

WALKTHROUGH = Path("/work/shared/walkthrough.md")
RUNS = 20
SEED = 20240601


class _Delayed:
    """Proxy that sleeps a random 0-3 ms before every coroutine call of the wrapped cache."""

    def __init__(self, inner: Any, rng: random.Random) -> None:
        self._inner = inner
        self._rng = rng

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def delayed(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(self._rng.uniform(0, 0.003))
            return await attr(*args, **kwargs)

        return delayed


def _program() -> Any:
    if not WALKTHROUGH.exists():
        pytest.skip(f"{WALKTHROUGH} is missing")
    blocks = re.findall(r"```python\n(.*?)```", WALKTHROUGH.read_text(), flags=re.S)
    source = "\n".join(blocks).replace("asimov", "parallel_agent")
    # The program annotates `cache: Cache` without importing Cache. Postponed annotations (what
    # Python 3.14 does lazily by default) never evaluate them, so it runs unchanged.
    code = compile(source, str(WALKTHROUGH), "exec", flags=__future__.annotations.compiler_flag)
    namespace: dict[str, Any] = {"__name__": "walkthrough"}
    exec(code, namespace)
    return namespace


async def _run(namespace: dict[str, Any], make_cache: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[tuple[Task, Any]] = []
    original = Agent.run_task

    async def capture(self: Agent, task: Task) -> Task:
        result = await original(self, task)
        captured.append((result, self.cache))
        return result

    monkeypatch.setattr(Agent, "run_task", capture)
    namespace["RedisCache"] = make_cache
    for _ in range(RUNS):
        await namespace["main"]()
    assert len(captured) == RUNS
    for task, cache in captured:
        assert task.status == TaskStatus.COMPLETE, task.error
        assert await cache.get("final_results") == list(range(0, 40, 2))
        assert await cache.get("task") == task


async def test_walkthrough_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SEED)
    await _run(_program(), lambda: _Delayed(MemoryCache(), rng), monkeypatch)


@pytest.mark.redis
async def test_walkthrough_redis(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_prefix: str
) -> None:
    from parallel_agent.caches.redis_cache import RedisCache

    made: list[RedisCache] = []
    rng = random.Random(SEED)

    def factory() -> Any:
        cache = RedisCache(url=redis_url, prefix=f"{redis_prefix}{len(made)}:")
        made.append(cache)
        return _Delayed(cache, rng)

    try:
        await _run(_program(), factory, monkeypatch)
    finally:
        for cache in made:
            await cache.close()


async def test_walkthrough_trace_is_the_documented_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/semantics.md walks through these 19 visits; they must stay within the program's 50."""
    from parallel_agent.events import EventSink, NodeFinished

    finished: list[str] = []

    class Sink(EventSink):
        def on_node_finished(self, event: NodeFinished) -> None:
            finished.append(f"{event.node}:{event.outcome}")

    namespace = _program()
    original_init = Agent.__init__

    def init(self: Agent, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.events = Sink()

    monkeypatch.setattr(Agent, "__init__", init)
    namespace["RedisCache"] = MemoryCache
    await namespace["main"]()
    loop = ["processor_0:succeeded", "aggregator:skipped", "flow_control:succeeded"]
    assert sorted(finished[1:4]) == [f"processor_{i}:succeeded" for i in range(3)]
    assert finished[:1] + finished[4:] == [
        "splitter:succeeded",
        "aggregator:skipped",  # 3 of 7 chunks done: the guard is false
        "flow_control:succeeded",  # decision 1: chunks pending -> processor_0
        *loop * 3,
        "processor_0:succeeded",  # the 7th chunk
        "aggregator:succeeded",  # guard true: final_results written
        "flow_control:succeeded",  # decision 4 -> aggregator
        "aggregator:succeeded",  # changes nothing: fixpoint, the run ends
    ]
    assert len(finished) == 19
