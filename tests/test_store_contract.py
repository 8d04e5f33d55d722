"""One contract suite for every run store backend (memory, SQLite, real Redis, fakeredis), plus the
backend-specific promises: owner-only SQLite files, cross-process claims, Redis timeouts, TTLs,
authentication errors and store-loss detection across a Redis restart.

Time is controlled with explicit `now` arguments; the only sleeps wait for real lock TTLs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.redis_server import RedisServerFactory, redis_server_binary
from helpers.runs import T0, make_info

from parallel_agent.app.lock_wait import live_coordinator, take_stale_lock
from parallel_agent.errors import RunCancelledError, StateLostError, StoreError, UsageError
from parallel_agent.jsonl import dumps
from parallel_agent.store import default_store_url, mask_url, open_store
from parallel_agent.store.base import (
    ChunkSpec,
    ChunkState,
    Lease,
    NodeCounts,
    RunInfo,
    RunStore,
    rate_burst,
)
from parallel_agent.store.memory import MemoryStore
from parallel_agent.store.redis import RedisStore
from parallel_agent.store.sqlite import SqliteStore

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
NODE = "map"


def specs(indices: range | list[int], size: int = 10) -> list[ChunkSpec]:
    return [ChunkSpec(i, i * size, size, f"payload-{i}".encode()) for i in indices]


async def redis_keys(store: RunStore) -> list[bytes]:
    """Every key under the store's prefix (Redis backends only)."""
    assert isinstance(store, RedisStore)
    return [key async for key in store.client.scan_iter(match=f"{store.prefix}:*", count=500)]


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis), "fakeredis"]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunStore]:
    kind = request.param
    backend: RunStore
    if kind == "memory":
        backend = open_store("memory://")
    elif kind == "sqlite":
        backend = open_store(f"sqlite://{tmp_path}/state/pagent.db")
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        backend = open_store(url, prefix=request.getfixturevalue("redis_prefix"))
    else:
        import fakeredis

        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        backend = RedisStore("redis://fake:6379/0", prefix="fake", client=client)
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
async def run(store: RunStore) -> RunInfo:
    info = make_info()
    assert await store.create_run(info)
    return info


async def claim(store: RunStore, limit: int = 1, at: float = T0, **kw: Any) -> list[Lease]:
    return await store.claim("t1", NODE, "w1", lease_s=10, limit=limit, now=at, **kw)


async def commit(store: RunStore, lease: Lease, result: bytes = b"r", ok: int = 10) -> bool:
    return await store.commit(
        lease, result=result, errors=b"[]", items_ok=ok, items_failed=10 - ok, duration_s=0.5
    )


# -- runs ----------------------------------------------------------------------------------------


async def test_create_run_is_create_if_absent(store: RunStore) -> None:
    info = make_info()
    assert await store.create_run(info)
    assert await store.get_run("t1") == info
    rival = make_info(pipeline_name="other")
    assert not await store.create_run(rival)
    assert await store.create_run(info), "the same run again (a retried call) is not a rival"
    assert await store.get_run("t1") == info
    assert await store.get_run("nope") is None


async def test_update_run_merges_extra_and_sets_fields(store: RunStore, run: RunInfo) -> None:
    await store.update_run("t1", status="executing", extra={"summary": {"done": 1}})
    await store.update_run("t1", output_path="/out.json", finished_at=T0 + 5)
    info = await store.get_run("t1")
    assert info is not None
    assert info.status == "executing"
    assert info.output_path == "/out.json"
    assert info.finished_at == T0 + 5
    assert info.extra == {"options": {"concurrency": 4}, "summary": {"done": 1}}
    assert info.updated_at > T0
    assert (info.params, info.generation) == (run.params, run.generation)
    with pytest.raises(StateLostError):
        await store.update_run("missing", status="executing")


async def test_add_to_count_is_shared_and_atomic(store: RunStore, run: RunInfo) -> None:
    """Issue 13: a run-wide count (failed items) that every process adds to."""
    assert await store.add_to_count("t1", "failed_items", 3) == 3
    results = await asyncio.gather(
        *(store.add_to_count("t1", "failed_items", 1) for _ in range(20))
    )
    assert sorted(results) == list(range(4, 24))
    info = await store.get_run("t1")
    assert info is not None and info.extra["failed_items"] == 23
    await store.update_run("t1", extra={"failed_items": 0})  # a resume starts the count again
    assert await store.add_to_count("t1", "failed_items", 2) == 2
    with pytest.raises(StateLostError):
        await store.add_to_count("nope", "failed_items", 1)


async def test_worker_heartbeats_expire(store: RunStore) -> None:
    """Issue 13: `pagent worker` beats into a shared store; a worker that stops beating drops
    out. Stores that are one machine's (memory, SQLite) keep no workers."""
    await store.beat_worker("h:1:ab", {"host": "h", "pid": 1, "runs": ["t1"]}, ttl_s=0.3)
    await store.beat_worker("h:2:cd", {"host": "h", "pid": 2, "runs": []}, ttl_s=30)
    workers = await store.live_workers()
    if not isinstance(store, RedisStore):
        assert workers == []
        return
    assert sorted(w["pid"] for w in workers) == [1, 2]
    assert all(0 <= w["last_seen"] < 30 for w in workers)
    await asyncio.sleep(0.4)
    assert [w["pid"] for w in await store.live_workers()] == [2]
    await store.beat_worker("h:2:cd", {"host": "h", "pid": 2, "runs": ["t1"]}, ttl_s=30)
    assert [w["runs"] for w in await store.live_workers()] == [["t1"]]


async def test_token_bucket_is_shared_by_every_caller(store: RunStore, run: RunInfo) -> None:
    """Issue 13: `rate_limit` is one budget for the whole run. Two callers (two processes) of
    one bucket together never get more than its burst plus the rate times the time passed."""
    first = store.token_bucket("t1", "work", rate=8.0)
    second = store.token_bucket("t1", "work", rate=8.0)
    if not isinstance(store, RedisStore):
        assert first is None  # one process is the whole run: its own limiter is exact
        return
    assert first is not None and second is not None
    started = time.monotonic()
    granted = 0
    for take in (first, second, first, second):
        got, wait = await take(5)
        assert 0 <= got <= rate_burst(8.0)
        assert got == 5 or wait > 0
        granted += got
    elapsed = time.monotonic() - started
    assert granted <= rate_burst(8.0) + 8.0 * elapsed + 1
    other_node = store.token_bucket("t1", "other", rate=8.0)  # its own budget, empty at first
    assert other_node is not None
    got, wait = await other_node(1)
    assert got == 0 and 0 < wait <= 1 / 8.0
    await asyncio.sleep(wait)
    assert (await other_node(1))[0] == 1
    await store.add_chunks("t1", "work", [ChunkSpec(0, 0, 1, b"1\n")])
    await store.add_chunks("t1", "other", [ChunkSpec(0, 0, 1, b"1\n")])
    await store.delete_run("t1")  # the buckets go with the run
    assert await store.client.keys(f"{store.prefix}:t1:*") == []


async def test_list_and_delete_runs(store: RunStore) -> None:
    for number in range(3):
        assert await store.create_run(make_info(f"t{number}", created_at=T0 + 10 - number))
    assert [info.task_id for info in await store.list_runs()] == ["t2", "t1", "t0"]
    await store.add_chunks("t1", NODE, specs(range(3)))
    await store.delete_run("t1")
    await store.delete_run("t1")
    assert await store.get_run("t1") is None
    assert [info.task_id for info in await store.list_runs()] == ["t2", "t0"]
    assert await store.nodes("t1") == []


async def test_gc_drops_only_old_finished_runs(store: RunStore) -> None:
    await store.create_run(make_info("old-done"))
    await store.create_run(make_info("new-done"))
    await store.create_run(make_info("old-running"))
    await store.create_run(make_info("old-failed"))
    await store.add_chunks("old-done", NODE, specs(range(2)))
    await store.update_run("old-done", status="complete", finished_at=T0)
    await store.update_run("new-done", status="complete", finished_at=T0 + 1000)
    await store.update_run("old-running", status="executing")
    await store.update_run("old-failed", status="failed", finished_at=T0)
    dropped = await store.gc(older_than_s=500, now=T0 + 1100)
    assert sorted(dropped) == ["old-done", "old-failed"]
    assert sorted(i.task_id for i in await store.list_runs()) == ["new-done", "old-running"]
    assert await store.gc(older_than_s=0, now=T0 + 2000) == ["new-done"]


async def test_check_generation_detects_lost_state(store: RunStore, run: RunInfo) -> None:
    await store.check_generation("t1", run.generation)
    with pytest.raises(StateLostError, match="another run"):
        await store.check_generation("t1", "not-the-generation")
    await store.delete_run("t1")
    with pytest.raises(StateLostError, match="gone"):
        await store.check_generation("t1", run.generation)


async def test_transitions_on_a_lost_run_raise(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(2)))
    [lease] = await claim(store)
    await store.delete_run("t1")
    with pytest.raises(StateLostError):
        await claim(store)
    with pytest.raises(StateLostError):
        await commit(store, lease)
    with pytest.raises(StateLostError):
        await store.add_chunks("t1", NODE, specs(range(1)))
    with pytest.raises(StateLostError):
        await store.counts("t1", NODE)


# -- lock ----------------------------------------------------------------------------------------


async def test_lock_is_exclusive_and_reentrant(store: RunStore) -> None:
    assert await store.lock_holder("t1") is None
    assert await store.acquire_lock("t1", "a", 30)
    assert await store.lock_holder("t1") == "a"
    assert not await store.acquire_lock("t1", "b", 30)
    assert await store.acquire_lock("t1", "a", 30)
    assert await store.renew_lock("t1", "a", 30)
    assert not await store.renew_lock("t1", "b", 30)
    await store.release_lock("t1", "b")
    assert not await store.acquire_lock("t1", "b", 30)
    await store.release_lock("t1", "a")
    assert await store.acquire_lock("t1", "b", 30)
    assert await store.acquire_lock("t2", "a", 30), "locks are per task id"


async def test_dead_holders_lock_expires(store: RunStore) -> None:
    assert await store.acquire_lock("t1", "dead", 0.15)
    assert not await store.acquire_lock("t1", "b", 30)
    await asyncio.sleep(0.3)
    assert await store.lock_holder("t1") is None
    assert not await store.renew_lock("t1", "dead", 30)
    assert await store.acquire_lock("t1", "b", 30)
    assert not await store.acquire_lock("t1", "dead", 30)


async def test_lock_state_reads_holder_and_time_left(store: RunStore) -> None:
    assert await store.lock_state("t1") is None
    assert await store.acquire_lock("t1", "a", 30)
    state = await store.lock_state("t1")
    assert state is not None and state[0] == "a" and 25 < state[1] <= 30
    assert await store.acquire_lock("t2", "b", 0.15)
    await asyncio.sleep(0.3)
    assert await store.lock_state("t2") is None, "an expired lock has no holder"


async def test_stale_lock_of_another_host_is_waited_out(store: RunStore) -> None:
    """Promise 6 (coordinator failover): a lock its holder no longer renews is taken when it
    expires, after one line saying so; meanwhile nobody else can take it."""
    ttl = 0.9
    assert await store.acquire_lock("t1", "elsewhere:1:dead", ttl)
    lines: list[str] = []
    assert await take_stale_lock(store, "t1", "me", ttl, lines.append) == "taken"
    assert await store.lock_holder("t1") == "me"
    assert len(lines) == 1 and "elsewhere:1:dead" in lines[0], lines
    assert not await store.acquire_lock("t1", "elsewhere:1:dead", ttl)


async def test_lock_renewed_by_a_live_holder_is_not_taken(store: RunStore) -> None:
    ttl = 0.9
    assert await store.acquire_lock("t1", "elsewhere:1:live", ttl)

    async def keep() -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            assert await store.renew_lock("t1", "elsewhere:1:live", ttl)

    keeper = asyncio.ensure_future(keep())
    try:
        outcome = await take_stale_lock(store, "t1", "me", ttl, lambda line: None)
        assert outcome == "renewed", "seen alive, not merely waited out"
        assert await store.lock_holder("t1") == "elsewhere:1:live"
    finally:
        keeper.cancel()


async def test_live_coordinator_is_one_that_renews_or_runs_here(store: RunStore) -> None:
    """`pagent status` says stalled when this is None: a holder elsewhere that missed its
    renewal (a third of the TTL plus the slack), or a process of this machine that is gone."""
    assert await live_coordinator(store, "t1") is None
    assert await store.acquire_lock("t1", "elsewhere:1:x", 0.9)
    assert await live_coordinator(store, "t1", ttl_s=0.9) == "elsewhere:1:x"
    await asyncio.sleep(0.5)
    assert await live_coordinator(store, "t1", ttl_s=0.9) is None, "missed its renewal"
    here = f"{socket.gethostname()}:{os.getpid()}:ab"
    assert await store.acquire_lock("t2", here, 30)
    assert await live_coordinator(store, "t2") == here
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}:ab"
    assert await store.acquire_lock("t3", dead, 30)
    assert await live_coordinator(store, "t3") is None, "its process is gone"


# -- chunks --------------------------------------------------------------------------------------


async def test_add_chunks_is_idempotent(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(5)))
    await store.add_chunks("t1", NODE, [ChunkSpec(3, 999, 1, b"changed"), *specs(range(5, 8))])
    counts = await store.counts("t1", NODE)
    assert (counts.chunks_total, counts.pending, counts.items_total) == (8, 8, 80)
    leases = await claim(store, limit=8)
    assert [lease.index for lease in leases] == list(range(8))
    assert (leases[3].first_record, leases[3].count, leases[3].payload) == (30, 10, b"payload-3")


async def test_a_chunk_added_with_its_partial_is_committed_once(
    store: RunStore, run: RunInfo
) -> None:
    """A split that reduced a chunk for an aggregate adds it done with the partial: counted
    and read back as a claim and commit would leave it, never claimable, and added once
    however often the split runs again (a resume); the others stay pending beside it."""
    numbered = dumps([5, 9])
    done = [
        ChunkSpec(0, 0, 10, b"", partial=b'{"agg": 0}'),
        ChunkSpec(2, 20, 2, b"", records=numbered, partial=b'{"agg": 2}'),
    ]
    await store.add_chunks("t1", NODE, [*done, *specs([1, 3])])
    await store.add_chunks("t1", NODE, [ChunkSpec(0, 0, 10, b"", partial=b'{"agg": "again"}')])
    counts = await store.counts("t1", NODE)
    assert (counts.chunks_total, counts.pending, counts.done, counts.items_total) == (4, 2, 2, 32)
    assert (counts.items_done, counts.items_failed, counts.items_out) == (12, 0, 12)
    leases = await claim(store, limit=10)
    assert [lease.index for lease in leases] == [1, 3]
    results = [result async for result in store.results("t1", NODE)]
    assert [(r.index, r.first_record, r.count) for r in results] == [(0, 0, 10), (2, 20, 2)]
    assert [r.partial for r in results] == [b'{"agg": 0}', b'{"agg": 2}']
    assert all(r.result == b"" and r.errors == b"[]" for r in results)
    assert [(r.items_ok, r.items_failed) for r in results] == [(10, 0), (2, 0)]
    assert results[1].numbers == [5, 9]
    assert await commit(store, leases[0], ok=10)
    assert [r.index async for r in store.results("t1", NODE)] == [0, 1, 2]


async def test_nodes_in_creation_order_and_seal(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", "b", specs(range(1)))
    await store.add_chunks("t1", "a", specs(range(1)))
    await store.add_chunks("t1", "b", specs(range(1, 2)))
    assert not (await store.counts("t1", "c")).sealed
    await store.seal("t1", "c")
    await store.seal("t1", "a")
    assert await store.nodes("t1") == ["b", "a", "c"]
    assert (await store.counts("t1", "a")).sealed
    assert not (await store.counts("t1", "b")).sealed
    assert await store.counts("t1", "c") == NodeCounts(0, 0, 0, 0, 0, 0, 0, 0, 0, True)


async def test_claim_takes_lowest_indices_with_new_tokens(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs([4, 0, 3, 1, 2]))
    first = await claim(store, limit=3)
    assert [lease.index for lease in first] == [0, 1, 2]
    assert all(lease.attempt == 1 and lease.token >= 1 for lease in first)
    assert all(lease.owner == "w1" and lease.expires_at == T0 + 10 for lease in first)
    assert [lease.index for lease in await claim(store, limit=3)] == [3, 4]
    assert await claim(store, limit=3) == []


async def test_concurrent_claimers_take_each_chunk_once(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(60)))
    claimed: list[int] = []

    async def worker(number: int) -> None:
        while leases := await store.claim("t1", NODE, f"w{number}", lease_s=60, limit=2):
            for lease in leases:
                claimed.append(lease.index)
                assert await commit(store, lease)

    await asyncio.gather(*(worker(number) for number in range(8)))
    assert sorted(claimed) == list(range(60))
    counts = await store.counts("t1", NODE)
    assert (counts.done, counts.pending, counts.leased, counts.items_done) == (60, 0, 0, 600)


async def test_expired_lease_is_reclaimed_with_a_new_token(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(1)))
    [old] = await claim(store)
    assert await claim(store, at=T0 + 5) == [], "a live lease is never stolen"
    [new] = await claim(store, at=T0 + 11)
    assert (new.index, new.attempt) == (0, 2)
    assert new.token > old.token
    assert not await commit(store, old, result=b"stale"), "stale token after a reclaim"
    assert not await store.renew(old, 10, now=T0 + 11)
    assert await store.fail(old, "late", retry_in_s=None, now=T0 + 11) is ChunkState.LEASED
    await store.release(old)
    assert await commit(store, new, result=b"fresh")
    [result] = [r async for r in store.results("t1", NODE)]
    assert (result.result, result.attempt) == (b"fresh", 2)
    assert (await store.counts("t1", NODE)).retries == 1


async def test_commit_of_expired_but_unclaimed_lease_is_accepted(
    store: RunStore, run: RunInfo
) -> None:
    await store.add_chunks("t1", NODE, specs(range(1)))
    [lease] = await claim(store)
    assert await commit(store, lease)
    assert await claim(store, at=T0 + 100) == []


async def test_first_commit_wins(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(1)))
    [lease] = await claim(store)
    assert await commit(store, lease, result=b"first", ok=7)
    assert await commit(store, lease, result=b"second", ok=10), "a retried commit is idempotent"
    [result] = [r async for r in store.results("t1", NODE)]
    assert (result.result, result.items_ok, result.items_failed) == (b"first", 7, 3)
    counts = await store.counts("t1", NODE)
    assert (counts.done, counts.leased, counts.items_done, counts.items_failed) == (1, 0, 7, 3)
    assert await store.fail(lease, "late", retry_in_s=None) is ChunkState.DONE
    assert not await store.renew(lease, 10)


async def test_renew_extends_only_the_current_lease(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(1)))
    [lease] = await claim(store)
    assert await store.renew(lease, 10, now=T0 + 8)
    assert await claim(store, at=T0 + 15) == [], "renewed until T0 + 18"
    [again] = await claim(store, at=T0 + 19)
    assert again.token > lease.token
    assert not await store.renew(lease, 10, now=T0 + 19)
    assert await store.renew(again, 10, now=T0 + 20)


async def test_fail_with_backoff_then_for_good(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(2)))
    [lease] = await claim(store)
    assert await store.fail(lease, "boom", retry_in_s=5, now=T0) is ChunkState.PENDING
    [other] = await claim(store, at=T0 + 1)
    assert other.index == 1, "chunk 0 waits for its backoff"
    assert await claim(store, at=T0 + 3) == []
    [retry] = await claim(store, at=T0 + 6)
    assert (retry.index, retry.attempt) == (0, 2)
    assert await store.fail(retry, "boom again", retry_in_s=None) is ChunkState.FAILED
    [failed] = await store.failed_chunks("t1", NODE)
    assert (failed.index, failed.first_record, failed.count) == (0, 0, 10)
    assert (failed.payload, failed.error, failed.attempts) == (b"payload-0", "boom again", 2)
    counts = await store.counts("t1", NODE)
    assert (counts.failed, counts.leased, counts.pending, counts.retries) == (1, 1, 0, 1)


async def test_expired_lease_out_of_attempts_goes_to_failed(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(2)))
    await claim(store, max_attempts=2)
    [second] = await claim(store, at=T0 + 11, max_attempts=2)
    assert (second.index, second.attempt) == (0, 2)
    [leftover] = await claim(store, at=T0 + 22, max_attempts=2)
    assert leftover.index == 1, "chunk 0 is not handed out a third time"
    [failed] = await store.failed_chunks("t1", NODE)
    assert (failed.index, failed.attempts) == (0, 2)
    assert failed.error == "lease expired after 2 attempts"
    assert not await commit(store, second), "a FAILED chunk takes no late commit"
    counts = await store.counts("t1", NODE)
    assert (counts.failed, counts.leased, counts.done) == (1, 1, 0)


async def test_commit_adds_its_outputs_to_items_out(store: RunStore, run: RunInfo) -> None:
    """Issue 12: a filter's kept items are counted with the commit that stores them."""
    await store.add_chunks("t1", NODE, specs(range(2)))
    a, b = await claim(store, limit=2)
    assert await store.commit(
        a, result=b"1\n", errors=b"[]", items_ok=10, items_failed=0, duration_s=0.1, outputs=1
    )
    assert await store.commit(
        a, result=b"1\n", errors=b"[]", items_ok=10, items_failed=0, duration_s=0.1, outputs=1
    ), "the same lease's commit again is accepted and counts nothing twice"
    assert await store.commit(
        b, result=b"", errors=b"[]", items_ok=10, items_failed=0, duration_s=0.1, outputs=0
    )
    counts = await store.counts("t1", NODE)
    assert (counts.items_done, counts.items_out) == (20, 1)


async def test_release_hands_back_without_using_an_attempt(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(1)))
    [lease] = await claim(store)
    await store.release(lease)
    counts = await store.counts("t1", NODE)
    assert (counts.pending, counts.leased, counts.retries) == (1, 0, 0)
    [again] = await claim(store)
    assert again.attempt == 1
    assert again.token > lease.token
    assert not await commit(store, lease)
    await store.release(lease)
    assert (await store.counts("t1", NODE)).leased == 1


async def test_counts_follow_every_transition(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(6)))
    a, b, c, d, e = await claim(store, limit=5)
    assert await commit(store, a, ok=10)
    assert await commit(store, b, ok=8)
    await store.fail(c, "x", retry_in_s=None)
    await store.fail(d, "y", retry_in_s=100)
    await store.release(e)
    await claim(store, at=T0 + 11)
    assert await store.counts("t1", NODE) == NodeCounts(
        chunks_total=6,
        pending=2,
        leased=1,
        done=2,
        failed=1,
        items_total=60,
        items_done=18,
        items_failed=2,
        retries=0,
        sealed=False,
        items_out=18,  # outputs default to the items that succeeded
    )
    assert await store.counts("t1", "empty") == NodeCounts(0, 0, 0, 0, 0, 0, 0, 0, 0, False)


async def test_results_stream_in_index_order(store: RunStore, run: RunInfo) -> None:
    total = 600  # more than two fetch batches
    await store.add_chunks("t1", NODE, specs(range(total), size=1))
    leases = await store.claim("t1", NODE, "w", lease_s=60, limit=total, now=T0)
    for lease in reversed(leases):
        await store.commit(
            lease,
            result=f"out-{lease.index}".encode(),
            errors=b"[]",
            items_ok=1,
            items_failed=0,
            duration_s=lease.index / 1000,
        )
    results = [result async for result in store.results("t1", NODE)]
    assert [r.index for r in results] == list(range(total))
    assert all(r.result == f"out-{r.index}".encode() for r in results)
    assert (results[7].first_record, results[7].count, results[7].attempt) == (7, 1, 1)
    durations = await store.chunk_durations("t1", NODE)
    assert durations == pytest.approx([index / 1000 for index in range(total)])


async def test_results_of_big_chunks_stream_a_few_at_a_time(
    store: RunStore, run: RunInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetches hold about RESULTS_BATCH_RECORDS records, so memory stays flat with big chunks."""
    from parallel_agent.store import base

    monkeypatch.setattr(base, "RESULTS_BATCH_RECORDS", 25)  # chunks of 10: 2 per fetch
    await store.add_chunks("t1", NODE, specs(range(7), size=10))
    leases = await store.claim("t1", NODE, "w", lease_s=60, limit=7, now=T0)
    for lease in leases:
        await store.commit(
            lease,
            result=b"r%d" % lease.index,
            errors=b"[]",
            items_ok=10,
            items_failed=0,
            duration_s=0,
        )
    assert base.results_batch(await store.counts("t1", NODE)) == 2
    results = [result async for result in store.results("t1", NODE)]
    assert [(r.index, r.result, r.first_record) for r in results] == [
        (i, b"r%d" % i, i * 10) for i in range(7)
    ]


async def test_record_numbers_travel_with_payloads_and_results(
    store: RunStore, run: RunInfo
) -> None:
    """A chunk whose items are not consecutive input records (after a filter) keeps their
    numbers through claim, commit, results and the failed list; an empty `records` stays the
    consecutive range."""
    await store.add_chunks(
        "t1",
        NODE,
        [
            ChunkSpec(0, 0, 2, b"p0", b"[2,5]"),
            ChunkSpec(1, 10, 3, b"p1"),
            ChunkSpec(2, 20, 2, b"p2", b"[21,29]"),
        ],
    )
    leases = await claim(store, limit=3)
    assert [(lease.records, list(lease.numbers)) for lease in leases] == [
        (b"[2,5]", [2, 5]),
        (b"", [11, 12, 13]),
        (b"[21,29]", [21, 29]),
    ]
    assert (await store.counts("t1", NODE)).items_total == 7
    for lease, records in zip(leases[:2], [b"[5]", b""], strict=True):
        assert await store.commit(
            lease,
            result=b"r",
            errors=b"[]",
            items_ok=lease.count,
            items_failed=0,
            duration_s=0.1,
            records=records,
        )
    await store.fail(leases[2], "bad", retry_in_s=None)
    results = [result async for result in store.results("t1", NODE)]
    assert [(r.records, list(r.numbers)) for r in results] == [
        (b"[5]", [5]),
        (b"", [11, 12, 13]),
    ]
    (failed,) = await store.failed_chunks("t1", NODE)
    assert (failed.payload, list(failed.numbers)) == (b"p2", [21, 29])


async def test_retry_failed_resets_attempts(store: RunStore, run: RunInfo) -> None:
    await store.add_chunks("t1", NODE, specs(range(3)))
    leases = await claim(store, limit=3)
    for lease in leases[:2]:
        await store.fail(lease, "bad", retry_in_s=None)
    assert await store.retry_failed("t1", NODE) == 2
    assert await store.retry_failed("t1", NODE) == 0
    assert await store.failed_chunks("t1", NODE) == []
    counts = await store.counts("t1", NODE)
    assert (counts.failed, counts.pending, counts.leased) == (0, 2, 1)
    again = await claim(store, limit=3)
    assert [(lease.index, lease.attempt) for lease in again] == [(0, 1), (1, 1)]
    assert all(new.token > old.token for new, old in zip(again, leases, strict=False))


# -- open_store and URLs -------------------------------------------------------------------------


def test_open_store_dispatches_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    sqlite = open_store(f"sqlite://{tmp_path}/s.db")
    assert isinstance(sqlite, SqliteStore)
    assert sqlite.path == tmp_path / "s.db"
    four_slashes = open_store(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(four_slashes, SqliteStore)
    assert four_slashes.path == tmp_path / "s.db"
    relative = open_store("sqlite://rel/s.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == Path("rel/s.db")
    for url in ("redis://h:6379/0", "rediss://:pw@h/1", "unix:///tmp/r.sock?db=2"):
        assert isinstance(open_store(url, prefix="p:"), RedisStore)
    prefixed = open_store("redis://h", prefix="p:")
    assert isinstance(prefixed, RedisStore)
    assert prefixed.prefix == "p"
    with pytest.raises(UsageError, match=r"redis://u:\*\*\*@h"):
        open_store("redis://u:secret@h?connect_timeout=abc")
    with pytest.raises(UsageError, match="unknown store URL"):
        open_store("mongodb://u:secret@h")
    with pytest.raises(UsageError, match="names no file"):
        open_store("sqlite://")


def test_mask_url_hides_passwords() -> None:
    assert mask_url("redis://:pw@127.0.0.1:6390/0") == "redis://:***@127.0.0.1:6390/0"
    assert mask_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert mask_url("unix://u:pw@/tmp/r.sock?db=1") == "unix://u:***@/tmp/r.sock?db=1"
    assert mask_url("redis://h/0?password=pw&db=1") == "redis://h/0?password=***&db=1"
    assert mask_url("redis://user@h/0") == "redis://user@h/0"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"
    assert mask_url("sqlite:///x.db?password=pw") == "sqlite:///x.db?password=***"


def test_default_store_url_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_store_url() == f"sqlite://{tmp_path}/pagent/state.db"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_url() == f"sqlite://{tmp_path}/home/.local/state/pagent/state.db"


# -- SQLite --------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_sqlite_file_and_folder_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "state.db"
    os.chmod(tmp_path, 0o755)
    store = open_store(f"sqlite://{path}")
    await store.open()
    try:
        await store.create_run(make_info())
        assert mode(path) == 0o600
        assert mode(path.with_name("state.db-wal")) == 0o600
        assert mode(path.parent) == 0o700
        assert mode(tmp_path / "new") == 0o700
    finally:
        await store.close()
    assert mode(tmp_path) == 0o755, "an existing folder is left alone"


async def test_sqlite_busy_database_becomes_store_error(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "busy.db"
    store = open_store(f"sqlite://{path}?retry_budget=0.3")
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked by another process") as caught:
            await store.create_run(make_info())
        assert "database is locked" not in str(caught.value)
        blocker.execute("ROLLBACK")
        assert await store.create_run(make_info())
    finally:
        blocker.close()
        await store.close()


async def test_sqlite_file_that_is_not_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused, and the connection opened on it is closed (Python 3.13 warns about an unclosed
    one wherever the garbage collector happens to run: issue 14 item 9)."""
    import sqlite3

    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def recording_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", recording_connect)
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    store = open_store(f"sqlite://{path}")
    with pytest.raises(StoreError, match=f"{path}.*not a database"):
        await store.open()
    assert len(opened) == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")


async def test_sqlite_state_file_without_record_numbers_gets_them(tmp_path: Path) -> None:
    """A state file written before record numbers were kept: its runs go on (their chunks are
    numbered in a row), and the columns are added on open."""
    import sqlite3

    path = tmp_path / "before.db"
    store = open_store(f"sqlite://{path}")
    await store.open()
    assert await store.create_run(make_info())
    await store.add_chunks("t1", NODE, specs(range(2)))
    await store.close()
    connection = sqlite3.connect(path)
    for column in ("records", "result_records"):
        connection.execute(f"ALTER TABLE chunk_data DROP COLUMN {column}")
    connection.commit()
    connection.close()

    store = open_store(f"sqlite://{path}")
    await store.open()
    try:
        lease, _ = await claim(store, limit=2)
        assert (lease.records, list(lease.numbers)) == (b"", list(range(1, 11)))
        assert await commit(store, lease)
        (result,) = [result async for result in store.results("t1", NODE)]
        assert list(result.numbers) == list(range(1, 11))
    finally:
        await store.close()


async def test_sqlite_too_old_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    store = open_store(f"sqlite://{tmp_path}/old.db")
    with pytest.raises(StoreError, match="3.35"):
        await store.open()


CLAIMER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from parallel_agent.store import open_store

    async def main() -> None:
        store = open_store(sys.argv[1])
        await store.open()
        while not os.path.exists(sys.argv[3]):  # start together with the other process
            time.sleep(0.005)
        claimed = []
        while leases := await store.claim("t1", "map", sys.argv[2], lease_s=60, limit=1):
            for lease in leases:
                claimed.append(lease.index)
                await asyncio.sleep(0.001)
                await store.commit(lease, result=b"r", errors=b"[]", items_ok=1,
                                   items_failed=0, duration_s=0.0)
        await store.close()
        print(" ".join(map(str, claimed)))

    asyncio.run(main())
    """
)


async def test_sqlite_claims_from_two_processes_never_overlap(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/shared.db"
    go = tmp_path / "go"
    store = open_store(url)
    await store.open()
    await store.create_run(make_info())
    await store.add_chunks("t1", NODE, specs(range(150), size=1))
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLAIMER, url, f"p{number}", str(go), stdout=subprocess.PIPE
        )
        for number in range(2)
    ]
    try:
        await asyncio.sleep(0.3)  # not a timing assertion: only lets both processes open the store
        go.touch()
        async with asyncio.timeout(120):  # liveness guard
            outputs = [(await process.communicate())[0].decode() for process in processes]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert [process.returncode for process in processes] == [0, 0]
    per_process = [[int(index) for index in output.split()] for output in outputs]
    assert all(per_process), "both processes must have claimed chunks for the test to mean much"
    assert sorted(per_process[0] + per_process[1]) == list(range(150))
    counts = await store.counts("t1", NODE)
    assert (counts.done, counts.items_done, counts.pending, counts.leased) == (150, 150, 0, 0)
    await store.close()


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServerFactory]:
    """Own redis-server processes (never the shared one) for restart and password tests."""
    if redis_server_binary() is None:
        message = "redis-server is not installed"
        if IN_CI:
            pytest.fail(f"{message}; CI=true requires it")
        pytest.skip(message)
    factory = RedisServerFactory(tmp_path)
    yield factory
    factory.stop_all()


def redis_store(kind: str, request: pytest.FixtureRequest, query: str = "") -> RedisStore:
    """A Redis store on the real server (its own key prefix) or on fakeredis."""
    if kind == "redis":
        store = open_store(
            request.getfixturevalue("redis_url") + query,
            prefix=request.getfixturevalue("redis_prefix"),
        )
        assert isinstance(store, RedisStore)
        return store
    import fakeredis

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return RedisStore(f"redis://fake{query}", prefix="fake", client=client)


@pytest.mark.parametrize("cancelled", [False, True])
@pytest.mark.parametrize("kind", [pytest.param("redis", marks=pytest.mark.redis), "fakeredis"])
async def test_redis_sends_a_split_chunks_partial_once(
    kind: str, cancelled: bool, request: pytest.FixtureRequest
) -> None:
    """A split queues a reduced chunk as its partial, with a payload that ends with the same
    partial (stored only in a cancelled run): the script gets the partial once, and still
    stores what was given."""
    store = redis_store(kind, request)
    await store.open()
    try:
        await store.create_run(make_info())
        if cancelled:
            await store.update_run("t1", status="cancelled")
        partial = b'{"agg": "' + b"x" * 10_000 + b'"}'
        payload = b"\x00p\n" + partial
        sent: list[int] = []
        real = store._checked

        async def spy(task_id: str, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
            sent.append(sum(len(arg) for arg in args if isinstance(arg, bytes)))
            return await real(task_id, name, keys, args)

        store._checked = spy  # type: ignore[method-assign]
        await store.add_chunks("t1", NODE, [ChunkSpec(0, 0, 10, payload, partial=partial)])
        assert sent == [len(partial) + len(b"\x00p\n")]
        if cancelled:
            await store.update_run("t1", status="executing")
            (lease,) = await claim(store)
            assert lease.payload == payload
        else:
            assert (await store.counts("t1", NODE)).done == 1
    finally:
        await store.delete_run("t1")
        await store.close()


@pytest.mark.parametrize("kind", [pytest.param("redis", marks=pytest.mark.redis), "fakeredis"])
async def test_redis_keys_expire_when_finished_and_vanish_on_delete(
    kind: str, request: pytest.FixtureRequest
) -> None:
    store = redis_store(kind, request, "?finished_ttl=60")
    await store.open()
    try:
        await store.create_run(make_info())
        await store.acquire_lock("t1", "me", 30)
        await store.add_chunks("t1", NODE, specs(range(4)))
        leases = await claim(store, limit=4)
        await commit(store, leases[0])
        await store.fail(leases[1], "x", retry_in_s=None)
        await store.fail(leases[2], "y", retry_in_s=50)
        keys = await redis_keys(store)
        assert all(key.startswith(f"{store.prefix}:".encode()) for key in keys)
        await store.update_run("t1", status="complete", finished_at=T0)
        for key in keys:
            ttl = await store.client.pttl(key)
            if key.endswith(b":lock"):
                assert 0 < ttl <= 30_000, "the lock keeps its own short expiry"
            elif key != f"{store.prefix}:runs".encode():
                assert 0 < ttl <= 60_000, key
        await store.update_run("t1", status="executing")
        assert await store.client.pttl(f"{store.prefix}:t1:run") == -1, "a resumed run lives on"
        await store.delete_run("t1")
        assert await redis_keys(store) == []
        await store.create_run(make_info("t2"))
        await store.update_run("t2", status="complete", finished_at=T0)
        assert await store.gc(older_than_s=1, now=T0 + 10) == ["t2"]
        assert await redis_keys(store) == [], "nothing is left behind after gc"
    finally:
        await store.close()


async def test_fakeredis_server_clock_sets_lease_expiry() -> None:
    import fakeredis

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisStore("redis://fake", prefix="fake", client=client)
    await store.open()
    await store.create_run(make_info())
    await store.add_chunks("t1", NODE, specs(range(1)))
    [lease] = await store.claim("t1", NODE, "w", lease_s=10)
    server_now = float((await client.time())[0])
    assert server_now + 5 < lease.expires_at < server_now + 15
    await store.close()


async def test_redis_unreachable_names_masked_url_and_cause() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store(f"redis://:hunter2@127.0.0.1:{port}/0?retry_budget=0.3")
    async with asyncio.timeout(30):
        with pytest.raises(StoreError) as caught:
            await store.open()
    message = str(caught.value)
    assert message.startswith(f"cannot reach redis://:***@127.0.0.1:{port}/0")
    assert "refused" in message.lower()
    assert "hunter2" not in message
    await store.close()


async def test_black_holed_redis_fails_within_the_timeouts() -> None:
    with socket.socket() as tarpit:
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(16)  # accepts TCP handshakes in the backlog, never answers
        port = tarpit.getsockname()[1]
        store = open_store(
            f"redis://127.0.0.1:{port}/0?socket_timeout=0.2&connect_timeout=0.2&retry_budget=0.5"
        )
        started = time.monotonic()
        async with asyncio.timeout(30):  # liveness guard: a missing socket timeout hangs here
            with pytest.raises(StoreError, match=f"cannot reach redis://127.0.0.1:{port}/0"):
                await store.open()
        assert time.monotonic() - started < 30
        await store.close()


@pytest.mark.fault
async def test_wrong_redis_password_says_authentication_failed(
    redis_server: RedisServerFactory,
) -> None:
    server = redis_server(durable=False, password="right")
    url = f"redis://:wrong-secret@127.0.0.1:{server.port}/0?retry_budget=1"
    store = open_store(url)
    with pytest.raises(StoreError, match="authentication failed") as caught:
        await store.open()
    assert "wrong-secret" not in str(caught.value)
    await store.close()
    good = open_store(server.url)
    await good.open()
    await good.close()


@pytest.mark.fault
@pytest.mark.parametrize("durable", [False, True], ids=["volatile", "appendonly"])
async def test_redis_restart_loses_or_keeps_state(
    redis_server: RedisServerFactory, durable: bool
) -> None:
    server = redis_server(durable=durable)
    store = open_store(f"{server.url}?retry_budget=10", prefix="fault")
    await store.open()
    try:
        info = make_info()
        await store.create_run(info)
        await store.add_chunks("t1", NODE, specs(range(3)))
        [lease] = await claim(store)
        await commit(store, lease)
        server.restart()  # kill -9, same port
        if not durable:
            with pytest.raises(StateLostError):
                await store.check_generation("t1", info.generation)
            with pytest.raises(StateLostError):
                await claim(store)
            return
        await store.check_generation("t1", info.generation)
        [next_lease] = await claim(store)  # scripts are gone after a restart: NOSCRIPT reload
        assert next_lease.index == 1
        counts = await store.counts("t1", NODE)
        assert (counts.done, counts.leased, counts.pending) == (1, 1, 1)
        assert [r.index async for r in store.results("t1", NODE)] == [0]
    finally:
        await store.close()


# -- cancel (RELIABILITY.md promise 16) ------------------------------------------------------------


async def test_claim_refuses_a_cancelled_run(store: RunStore, run: RunInfo) -> None:
    """Promise 16: a cancel is never lost. The claim itself refuses a cancelled run (in the same
    atomic step), so no worker, here or on another machine, takes a chunk after `pagent cancel`."""
    await store.add_chunks("t1", NODE, specs(range(3)))
    assert len(await claim(store, limit=1)) == 1
    await store.update_run("t1", status="cancelled")
    with pytest.raises(RunCancelledError):
        await claim(store, limit=1)
    counts = await store.counts("t1", NODE)
    assert (counts.pending, counts.leased) == (2, 1)


async def test_a_cancelled_run_commits_no_chunk_added_with_its_partial(
    store: RunStore, run: RunInfo
) -> None:
    """Promise 16 again: a split that goes on adding after `pagent cancel` commits nothing; a
    chunk with a partial then waits PENDING with its payload, like any chunk."""
    await store.update_run("t1", status="cancelled")
    partial = b'{"agg": 0}'
    chunks = [
        ChunkSpec(0, 0, 10, b"lines", partial=partial),
        # As a split queues one: its payload ends with its partial (Redis sends that once).
        ChunkSpec(1, 10, 5, b"\x00partial\n" + partial, partial=partial),
        ChunkSpec(2, 15, 1, partial, partial=partial),
    ]
    await store.add_chunks("t1", NODE, chunks)
    counts = await store.counts("t1", NODE)
    assert (counts.pending, counts.done, counts.items_done, counts.items_out) == (3, 0, 0, 0)
    assert [result async for result in store.results("t1", NODE)] == []
    await store.update_run("t1", status="executing")  # to read the payloads back
    leases = await claim(store, limit=3)
    assert {lease.index: lease.payload for lease in leases} == {
        chunk.index: chunk.payload for chunk in chunks
    }


async def test_update_run_unless_cancelled_keeps_a_cancel(store: RunStore, run: RunInfo) -> None:
    """Promise 16: a coordinator finishing just after `pagent cancel` cannot overwrite it with
    `complete`; its other fields still change, and the recorded status is returned."""
    assert await store.update_run("t1", status="executing") == "executing"
    assert await store.update_run("t1", status="complete", unless_cancelled=True) == "complete"
    await store.update_run("t1", status="cancelled")
    recorded = await store.update_run(
        "t1", status="complete", extra={"summary": {"n": 1}}, unless_cancelled=True
    )
    assert recorded == "cancelled"
    info = await store.get_run("t1")
    assert info is not None
    assert (info.status, info.extra["summary"]) == ("cancelled", {"n": 1})
    assert await store.update_run("t1", status="interrupted") == "interrupted"  # resume may
