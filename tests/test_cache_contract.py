"""One behavioural suite run against every Cache backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from parallel_agent.caches import Cache, MemoryCache
from parallel_agent.graph import Task


@pytest.fixture(params=["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        yield MemoryCache(prefix="t:")
        return
    from parallel_agent.caches.redis_cache import RedisCache

    if request.param == "fakeredis":
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis()
        backend = RedisCache(prefix="t:", client=client)
        yield backend
        await client.aclose()
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    backend = RedisCache(url=url, prefix=prefix)
    yield backend
    await backend.close()


async def test_get_set_delete(cache: Cache) -> None:
    assert await cache.get("a", 5) == 5
    await cache.set("a", {"x": [1, 2]})
    assert await cache.get("a") == {"x": [1, 2]}
    await cache.delete("a")
    assert await cache.get("a") is None
    await cache.delete("missing")


async def test_keys_get_all_get_many_hide_internals(cache: Cache) -> None:
    await cache.set("a", 1)
    await cache.set("b", 2)
    await cache.publish_to_mailbox("box", "m")
    assert await cache.keys() == {"a", "b"}
    assert await cache.get_all() == {"a": 1, "b": 2}
    assert await cache.get_many(["a", "zz"]) == {"a": 1}


async def test_task_round_trips(cache: Cache) -> None:
    task = Task(type="t", params={"data": [1]})
    await cache.set("task", task)
    got = await cache.get("task")
    assert isinstance(got, Task) and got == task


async def test_unknown_tag_is_not_revived(cache: Cache) -> None:
    value = {"__pagent_type__": "os.system", "data": "id"}
    await cache.set("v", value)
    assert await cache.get("v") == value


async def test_prefix_views_and_clear(cache: Cache) -> None:
    child = cache.with_prefix("child")
    await child.set("k", 1)
    await cache.set("own", 2)
    assert await child.keys() == {"k"}
    await child.clear()
    assert await child.keys() == set()
    assert await cache.get("own") == 2
    await cache.clear()
    assert await cache.keys() == set()


async def test_mailbox_fifo(cache: Cache) -> None:
    await cache.publish_to_mailbox("m", 1)
    await cache.publish_to_mailbox("m", 2)
    assert await cache.get_message("m") == 1
    assert await cache.get_message("m", timeout=0.1) == 2
    assert await cache.get_message("m", timeout=0.05) is None


async def test_versioned_commit(cache: Cache) -> None:
    await cache.set("a", 1)
    seen = await cache.read_versioned(["a", "b"])
    assert seen["a"][0] == 1 and seen["b"][0] is None
    expected = {k: v for k, (_, v) in seen.items()}
    assert await cache.commit_if_unchanged(expected, {"b": 2}, {"a"}, [("m", "hi")])
    assert await cache.get_all() == {"b": 2}
    assert await cache.get_message("m") == "hi"
    # The same expectation is now stale.
    assert not await cache.commit_if_unchanged(expected, {"b": 3}, set(), [])
    await cache.set("b", 4)
    assert not await cache.commit_if_unchanged({"b": seen["b"][1]}, {"c": 1}, set(), [])
    assert await cache.get("c") is None


async def test_stored_values_are_copies(cache: Cache) -> None:
    value = {"xs": [1]}
    await cache.set("k", value)
    value["xs"].append(2)
    got = await cache.get("k")
    got["xs"].append(3)
    assert await cache.get("k") == {"xs": [1]}


async def test_non_json_values_are_refused(cache: Cache) -> None:
    with pytest.raises(TypeError, match="JSON"):
        await cache.set("k", object())
    assert await cache.get("k") is None


async def test_versions_never_repeat_across_delete_and_clear(cache: Cache) -> None:
    await cache.set("a", 1)
    before = (await cache.read_versioned(["a"]))["a"][1]
    await cache.clear()
    await cache.set("a", 2)
    after = (await cache.read_versioned(["a"]))["a"][1]
    assert after != before  # else a transaction that read the old "a" could commit on the new one
    assert not await cache.commit_if_unchanged({"a": before}, {"b": 1}, set(), [])


async def test_prefix_views_share_versions(cache: Cache) -> None:
    child = cache.with_prefix("c")
    seen = await child.read_versioned(["x"])
    await cache.set("c:x", 1)  # the same key, written through the parent
    assert await child.get("x") == 1
    assert not await child.commit_if_unchanged({"x": seen["x"][1]}, {"y": 1}, set(), [])


async def test_clear_leaves_sibling_prefixes_alone(cache: Cache) -> None:
    sibling = cache.with_prefix("s")
    await sibling.set("keep", 1)
    mine = cache.with_prefix("m")
    await mine.set("drop", 1)
    await mine.publish_to_mailbox("box", 1)
    await mine.clear()
    assert await sibling.get("keep") == 1
    assert await mine.get_message("box") is None


async def test_glob_characters_in_prefix_are_literal(cache: Cache) -> None:
    star = cache.with_prefix("a*")
    other = cache.with_prefix("ab")
    await star.set("k", 1)
    await other.set("k", 2)
    assert await star.keys() == {"k"}
    await star.clear()
    assert await other.get("k") == 2


async def test_get_message_waits_for_a_later_publish(cache: Cache) -> None:
    async def later() -> None:
        await asyncio.sleep(0.05)
        await cache.publish_to_mailbox("m", {"hello": 1})

    publisher = asyncio.create_task(later())
    assert await cache.get_message("m", timeout=2) == {"hello": 1}
    await publisher


async def test_commit_is_atomic_under_concurrent_writers(cache: Cache) -> None:
    """Many read-modify-write transactions on one key: exactly one wins per version."""
    await cache.set("n", 0)

    async def increment() -> int:
        conflicts = 0
        while True:
            (value, version) = (await cache.read_versioned(["n"]))["n"]
            await asyncio.sleep(0)
            if await cache.commit_if_unchanged({"n": version}, {"n": value + 1}, set(), []):
                return conflicts
            conflicts += 1

    conflicts = await asyncio.gather(*(increment() for _ in range(20)))
    assert await cache.get("n") == 20
    assert sum(conflicts) > 0  # the test really raced


async def test_with_prefix_as_async_with_scopes_the_cache_itself(cache: Cache) -> None:
    await cache.set("outside", 0)
    async with cache.with_prefix("p") as scoped:
        assert scoped is cache
        await cache.set("k", 1)
        assert await cache.get("k") == 1
        assert await cache.keys() == {"k"}
        assert await cache.get_all() == {"k": 1}
        assert await cache.get_many(["k", "outside"]) == {"k": 1}
    assert await cache.get("k") is None
    assert await cache.keys() == {"outside", "p:k"}
    assert await cache.get_all() == {"outside": 0, "p:k": 1}
    assert await cache.get("p:k") == 1


async def test_scopes_nest_and_suffixes_join_after_the_key(cache: Cache) -> None:
    async with cache.with_prefix("a"), cache.with_prefix("b"), cache.with_suffix("s"):
        await cache.set("k", 1)
        assert await cache.keys() == {"k"}
    async with cache.with_suffix("s"):
        assert await cache.keys() == {"a:b:k"}
    assert await cache.keys() == {"a:b:k:s"}
    view = cache.with_prefix("a").with_prefix("b").with_suffix("s")
    assert await view.get_all() == {"k": 1}
    await view.clear()
    assert await cache.keys() == set()


async def test_scoped_mailboxes_and_clear(cache: Cache) -> None:
    async with cache.with_prefix("p"):
        await cache.publish_to_mailbox("box", "scoped")
        await cache.set("k", 1)
    await cache.publish_to_mailbox("box", "root")
    await cache.set("keep", 2)
    async with cache.with_prefix("p"):
        assert await cache.get_message("box") == "scoped"
        await cache.publish_to_mailbox("box", "again")
        await cache.clear()
        assert await cache.get_message("box") is None
    assert await cache.get_all() == {"keep": 2}
    assert await cache.get_message("box") == "root"


async def test_scope_is_per_task(cache: Cache) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def scoped_writer() -> None:
        async with cache.with_prefix("p"):
            entered.set()
            await release.wait()
            await cache.set("mine", 1)

    writer = asyncio.create_task(scoped_writer())
    await entered.wait()
    await cache.set("root", 2)  # this task is not inside the other task's scope
    release.set()
    await writer
    assert await cache.get_all() == {"p:mine": 1, "root": 2}


async def test_transactional_view_scopes_like_its_base(cache: Cache) -> None:
    from parallel_agent.caches.transactional import TransactionalCache

    await cache.set("p:seen", 1)
    view = TransactionalCache(cache)
    async with view.with_prefix("p"):
        assert await view.get("seen") == 1
        await view.set("k", 2)
        await view.publish_to_mailbox("box", "m")
        assert await view.keys() == {"seen", "k"}
    assert await view.keys() == {"p:seen", "p:k"}
    assert await cache.get("p:k") is None  # buffered until commit
    assert await view.commit()
    assert await cache.get_all() == {"p:seen": 1, "p:k": 2}
    async with cache.with_prefix("p"):
        assert await cache.get_message("box") == "m"


async def test_peek_mailbox_reads_without_taking(cache: Cache) -> None:
    assert await cache.peek_mailbox("box") == []
    await cache.publish_to_mailbox("box", {"n": 1})
    await cache.publish_to_mailbox("box", {"n": 2})
    first = await cache.peek_mailbox("box")
    first[0]["n"] = 99  # a copy: changing it changes nothing stored
    assert await cache.peek_mailbox("box") == [{"n": 1}, {"n": 2}]
    assert await cache.get_message("box") == {"n": 1}
    assert await cache.peek_mailbox("box") == [{"n": 2}]
    async with cache.with_prefix("p"):
        await cache.publish_to_mailbox("box", "scoped")
        assert await cache.peek_mailbox("box") == ["scoped"]
    assert await cache.peek_mailbox("p:box") == ["scoped"]


async def test_transactional_peek_sees_its_own_messages_after_committed_ones(cache: Cache) -> None:
    from parallel_agent.caches.transactional import TransactionalCache

    await cache.publish_to_mailbox("box", "old")
    view = TransactionalCache(cache)
    await view.publish_to_mailbox("box", "new")
    assert await view.peek_mailbox("box") == ["old", "new"]
    assert await cache.peek_mailbox("box") == ["old"]
    assert await view.commit()
    assert await cache.peek_mailbox("box") == ["old", "new"]
