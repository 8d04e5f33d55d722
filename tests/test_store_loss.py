"""Run keys that vanish mid-run (issue 11: eviction; promises 6 and 18): a key evicted by a
maxmemory policy or deleted by someone else, a FLUSHDB, a policy changed to evicting after the
store opened, a run recreated under the same id, a lost coordinator lock. Each ends in store loss
(exit 4, one line naming what was lost), never a Lua error shown as "unexpected", a hang, or exit 0
with records missing.

The store-level cases run on the shared Redis under a unique prefix (only that prefix's keys are
deleted); the end-to-end cases that flush or reconfigure a server start their own
(tests/helpers/redis_server.py). A gate processor holds the run at its first chunk while the test
acts; time bounds are liveness bounds (the coordinator checks its lock and the run's generation
every COORDINATOR_TTL_S / 3 = 10 s).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers.redis_server import RedisServerFactory, redis_server_binary
from helpers.runs import make_info
from test_abuse_store import PAGENT, Case, finish, kill_group, pipeline_text

from parallel_agent.errors import StateLostError
from parallel_agent.store import open_store
from parallel_agent.store.base import ChunkSpec, Lease
from parallel_agent.store.keys import TaskKeys
from parallel_agent.store.redis import RedisStore

NODE = "map"
#: Liveness bound for a run that must notice a loss at its next lock renewal (10 s) and then
#: hand its gated chunk back (3 s): far above that, far below the gate's own 60 s.
NOTICE_BOUND_S = 40.0
GATED = '{use: map, function: "steps_for_abuse:gated_double"}'

needs_redis_server = pytest.mark.skipif(
    redis_server_binary() is None, reason="redis-server is not installed"
)


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStore]:
    backend = open_store(redis_url, prefix=redis_prefix)
    assert isinstance(backend, RedisStore)
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServerFactory]:
    factory = RedisServerFactory(tmp_path / "redis")
    yield factory
    factory.stop_all()


async def started_run(store: RedisStore) -> Lease:
    """A run of three chunks on NODE, chunk 0 leased: every kind of key exists."""
    info = make_info()
    assert await store.create_run(info)
    await store.add_chunks(info.task_id, NODE, [ChunkSpec(i, i, 1, b"[1]") for i in range(3)])
    (lease,) = await store.claim(info.task_id, NODE, "w", lease_s=60)
    return lease


# -- store level: the scripts check the keys they touch --------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("suffix", ["payload", "meta", "ready", "counters", "leases"])
async def test_a_vanished_key_is_store_loss_at_the_next_transition(
    store: RedisStore, suffix: str
) -> None:
    """Promise 18: a key evicted or deleted behind the scripts' back is reported by name (before,
    a missing payload was read as an empty chunk, a missing meta was a Lua error)."""
    lease = await started_run(store)
    key = TaskKeys(store.prefix, lease.task_id).node(NODE, suffix)
    assert await store.client.delete(key) == 1
    with pytest.raises(StateLostError, match=f"lost its key {key}"):
        await store.claim(lease.task_id, NODE, "w", lease_s=60)
    with pytest.raises(StateLostError, match=f"lost its key {key}"):
        await store.counts(lease.task_id, NODE)


@pytest.mark.redis
@pytest.mark.parametrize("name", ["extra", "nodes"])
async def test_a_vanished_run_key_is_store_loss_at_the_final_status(
    store: RedisStore, name: str
) -> None:
    """Promise 18: the run's own keys too (a lost node list would leave the node keys without
    the finished TTL, a lost extra would drop the run's settings)."""
    lease = await started_run(store)
    key = getattr(TaskKeys(store.prefix, lease.task_id), name)
    assert await store.client.delete(key) == 1
    with pytest.raises(StateLostError, match=f"lost its key {key}"):
        await store.update_run(lease.task_id, status="complete")


@pytest.mark.redis
async def test_keys_emptied_by_the_scripts_are_not_loss(store: RedisStore) -> None:
    """The check knows which keys a script emptied itself (Redis deletes an empty key): a run
    whose ready, leases and payload emptied in the normal way reads back whole."""
    lease = await started_run(store)
    leases = [lease, *await store.claim(lease.task_id, NODE, "w", lease_s=60, limit=5)]
    for each in leases:
        assert await store.commit(
            each, result=b"[2]", errors=b"", items_ok=1, items_failed=0, duration_s=0.1
        )
    assert (await store.counts(lease.task_id, NODE)).done == 3
    assert [r.index async for r in store.results(lease.task_id, NODE)] == [0, 1, 2]


@pytest.mark.redis
@pytest.mark.parametrize("suffix", ["result", "errors", "done", "meta"])
async def test_results_with_a_vanished_key_are_store_loss(store: RedisStore, suffix: str) -> None:
    """Promise 18: reading the results of a run that lost a key raises StateLostError, never a
    shorter output (before: a lost result hash came out as empty chunks, a lost done set as no
    results at all)."""
    lease = await started_run(store)
    assert await store.commit(
        lease, result=b"[2]", errors=b"", items_ok=1, items_failed=0, duration_s=0.1
    )
    await store.client.delete(TaskKeys(store.prefix, lease.task_id).node(NODE, suffix))
    with pytest.raises(StateLostError, match="lost"):
        _ = [result async for result in store.results(lease.task_id, NODE)]


@pytest.mark.redis
async def test_a_run_recreated_under_the_same_id_is_refused_by_every_transition(
    store: RedisStore, redis_url: str
) -> None:
    """Promise 6: the generation marker is checked inside the scripts, so a coordinator whose
    run was lost and recreated by someone else (a flush, then a new `pagent run --task-id`)
    cannot change the new run."""
    lease = await started_run(store)
    other = open_store(redis_url, prefix=store.prefix)
    await other.open()
    try:
        await other.delete_run(lease.task_id)
        assert await other.create_run(make_info(generation="another"))
        await other.add_chunks(lease.task_id, NODE, [ChunkSpec(0, 0, 1, b"[1]")])
    finally:
        await other.close()
    with pytest.raises(StateLostError, match="belongs to another run"):
        await store.claim(lease.task_id, NODE, "w", lease_s=60)
    with pytest.raises(StateLostError, match="belongs to another run"):
        await store.commit(
            lease, result=b"[2]", errors=b"", items_ok=1, items_failed=0, duration_s=0.1
        )


# -- end to end: a run held at its first chunk while its keys vanish -------------------------------


def gated_case(tmp_path: Path, url: str, records: int = 6) -> Case:
    return Case(tmp_path, pipeline_text(GATED, "{concurrency: 1}"), records=records, store=url)


def assert_store_loss(code: int, err: str, *words: str) -> None:
    """Exit 4 with one line of error naming what was lost; never "unexpected" or a traceback."""
    assert code == 4, err
    assert "unexpected" not in err and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pagent: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], err


@needs_redis_server
@pytest.mark.fault
@pytest.mark.parametrize("suffix", ["payload", "meta", "ready"])
def test_a_run_key_deleted_mid_run_ends_in_store_loss(
    tmp_path: Path, own_redis: RedisServerFactory, suffix: str
) -> None:
    """Promises 6 and 18: a key of the running run deleted (as eviction would) while chunk 0
    runs: exit 4 naming the key, no output (before: empty chunks, a Lua error or a hang)."""
    server = own_redis(durable=False)
    case = gated_case(tmp_path, server.url)
    out = tmp_path / "out.jsonl"
    process = case.start(case.run_args("--task-id", "loss", "--output", str(out)))
    try:
        case.wait_started(process)
        key = f"pagent:loss:n:work:{suffix}"
        with redis.Redis(port=server.port) as client:
            assert client.delete(key) == 1
        case.go.touch()
        code, _, err = finish(process, NOTICE_BOUND_S)
    finally:
        kill_group(process)
    assert_store_loss(code, err, key)
    assert not out.exists()


@needs_redis_server
@pytest.mark.fault
def test_a_flush_mid_run_then_a_new_coordinator_is_a_clean_takeover(
    tmp_path: Path, own_redis: RedisServerFactory
) -> None:
    """Promise 6: FLUSHDB (or a restart without persistence) while chunk 0 runs, then a second
    `pagent run` of the same task id creates the run again and takes the (flushed) lock. The
    first coordinator's generation check (at its lock renewal, and in every script) ends it,
    exit 4, without touching the new run; the second finishes with the right output. Before,
    the first renewed its chunk lease in the new run (same token) and ran on beside it. A long
    lease keeps the chunk heartbeat out of the way."""
    server = own_redis(durable=False)
    case = Case(
        tmp_path,
        pipeline_text(GATED, "{concurrency: 1, lease: 300}"),
        records=6,
        store=server.url,
    )
    out = tmp_path / "out.jsonl"
    first = case.start(case.run_args("--task-id", "flushed"))
    second = None
    try:
        case.wait_started(first)
        with redis.Redis(port=server.port) as client:
            client.flushdb()
        case.started.unlink()
        second = case.start(case.run_args("--task-id", "flushed", "--output", str(out)))
        case.wait_started(second)
        code, _, err = finish(first, NOTICE_BOUND_S)
        assert_store_loss(code, err, "flushed")
        assert "belongs to another run" in err or "is gone" in err, err
        case.go.touch()
        code, _, err = finish(second, NOTICE_BOUND_S)
    finally:
        kill_group(first)
        if second is not None:
            kill_group(second)
    assert code == 0, err
    assert sorted(json.loads(line) for line in out.read_text().splitlines()) == [
        2 * i for i in range(6)
    ]


@needs_redis_server
@pytest.mark.fault
def test_an_evicting_policy_set_mid_run_stops_the_run(
    tmp_path: Path, own_redis: RedisServerFactory
) -> None:
    """Promises 6 and 18: `CONFIG SET maxmemory` with an `allkeys-*` policy after the store
    opened is refused like one set before: exit 4 at the next check (before: the run went on)."""
    server = own_redis(durable=False)
    case = gated_case(tmp_path, server.url)
    process = case.start(case.run_args("--task-id", "evicting"))
    try:
        case.wait_started(process)
        with redis.Redis(port=server.port) as client:
            client.config_set("maxmemory-policy", "allkeys-lru")
            client.config_set("maxmemory", "64mb")
        code, _, err = finish(process, NOTICE_BOUND_S)
    finally:
        kill_group(process)
    assert_store_loss(code, err, "evicts keys", "allkeys-lru")
    with redis.Redis(port=server.port) as client:  # pagent itself now refuses this server
        assert client.hget("pagent:evicting:run", "status") == b'"failed"'


@needs_redis_server
@pytest.mark.fault
@pytest.mark.parametrize("holder", [None, "elsewhere:4242:beef"])
def test_a_lost_coordinator_lock_stops_the_coordinator(
    tmp_path: Path, own_redis: RedisServerFactory, holder: str | None
) -> None:
    """Promise 9: a coordinator whose lock expired or was evicted (a `volatile-*` policy may
    evict it: it is the only key of a running run with a TTL), or was taken by another
    coordinator, stops at its next renewal, exit 4, and records nothing beside the new holder
    (before: the failed renewal was ignored and both ran)."""
    server = own_redis(durable=False)
    case = gated_case(tmp_path, server.url)
    process = case.start(case.run_args("--task-id", "locked", "--json"))
    lock = "pagent:locked:lock"
    try:
        case.wait_started(process)
        with redis.Redis(port=server.port) as client:
            if holder is None:
                assert client.delete(lock) == 1
            else:
                client.set(lock, holder, px=600_000)
        code, out, err = finish(process, NOTICE_BOUND_S)
    finally:
        kill_group(process)
    assert_store_loss(code, err, "coordinator lock", "was lost")
    assert (holder or "expired or evicted") in err
    assert not out.strip() or json.loads(out)["status"] != "complete"
    assert case.stored_run("locked").status == "executing", "nothing recorded beside the holder"
    with redis.Redis(port=server.port) as client:
        assert client.get(lock) == (holder.encode() if holder else None)


def _sealed_chunks(client: redis.Redis, task_id: str, node: str) -> tuple[int, bool]:
    counters = client.hgetall(TaskKeys("pagent", task_id).node(node, "counters"))
    return int(counters.get(b"chunks_total", 0)), counters.get(b"sealed") == b"1"


@needs_redis_server
@pytest.mark.fault
def test_a_redis_back_from_an_older_snapshot_is_store_loss_not_a_hang(
    tmp_path: Path, own_redis: RedisServerFactory
) -> None:
    """Found by a hostile-user helper: a Redis that restarts from a snapshot taken mid-split
    comes back with the run's keys and marker intact, without the later chunks and the seal.
    The coordinator waited forever for the seal it had written (and a split-fed aggregate ended
    exit 0 with a third of the records missing). It now sees the store hold less than it
    sealed: exit 4 (a run over a file is then resumed; this one read stdin)."""
    server = own_redis(durable=False)
    case = Case(
        tmp_path, pipeline_text(GATED, "{concurrency: 1, lease: 300}"), records=0, store=server.url
    )
    process = run_on_stdin(case, "rolled")
    assert process.stdin is not None
    try:
        with redis.Redis(port=server.port) as client:
            # Lines of 4 KB: the reader takes the input in 64 KiB blocks, 16 records each.
            process.stdin.write(b"".join(b"%d%s\n" % (i, b" " * 4000) for i in range(20)))
            process.stdin.flush()
            wait_for(lambda: _sealed_chunks(client, "rolled", "work")[0] >= 16, "16 chunks")
            client.save()  # the snapshot: 16 chunks, no seal
            process.stdin.write(b"".join(b"%d%s\n" % (i, b" " * 4000) for i in range(20, 40)))
            process.stdin.close()
            process.stdin = None  # closed: communicate() must not flush it
            wait_for(lambda: _sealed_chunks(client, "rolled", "work") == (40, True), "the seal")
        case.wait_started(process)
        server.restart()  # kill -9, then back from the snapshot
        case.go.touch()
        code, _, err = finish(process, NOTICE_BOUND_S)
    finally:
        kill_group(process)
    assert_store_loss(code, err, "lost writes", "node 'work'", "40 chunks", "unsealed")


def run_on_stdin(case: Case, task_id: str) -> subprocess.Popen[bytes]:
    """`pagent run` of the case's pipeline reading JSON Lines from a pipe the test writes."""
    args = ["run", str(case.pipeline), "--data", "-", "--format", "jsonl", "--task-id", task_id]
    return subprocess.Popen(
        [*PAGENT, *args],
        env=case.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for(condition: Any, what: str, bound: float = NOTICE_BOUND_S) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)


@needs_redis_server
@pytest.mark.fault
def test_chunks_lost_to_an_older_snapshot_mid_split_are_store_loss_not_exit_0(
    tmp_path: Path, own_redis: RedisServerFactory
) -> None:
    """The helper's first case: a `compute` aggregate fed by the split, whose chunks are
    committed with their partials as they are queued. Chunks 16-31 are written after the
    snapshot and lost with the restart; the split goes on with 32-39 and seals. The run ended
    `complete`, exit 0, over 24 of the 40 records."""
    server = own_redis(durable=False)
    pipeline = """
name: rollback
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 1}]}
  - name: agg
    dependencies: [split]
    modules: [{use: aggregate, group_by: k, compute: {n: count}}]
"""
    case = Case(tmp_path, pipeline, records=0, store=server.url)
    process = run_on_stdin(case, "rolled")
    assert process.stdin is not None

    def send(numbers: range) -> None:
        assert process.stdin is not None  # lines of 4 KB: 16 to a 64 KiB block read
        process.stdin.write(b"".join(b'{"k": %d}%s\n' % (i % 3, b" " * 4000) for i in numbers))
        process.stdin.flush()

    try:
        with redis.Redis(port=server.port) as client:
            send(range(20))
            wait_for(lambda: _sealed_chunks(client, "rolled", "agg")[0] >= 16, "16 chunks")
            client.save()
            send(range(20, 36))
            wait_for(lambda: _sealed_chunks(client, "rolled", "agg")[0] >= 32, "32 chunks")
        server.restart()  # back with 16 chunks
        send(range(36, 40))
        process.stdin.close()
        process.stdin = None
        code, _, err = finish(process, NOTICE_BOUND_S)
    finally:
        kill_group(process)
    assert_store_loss(code, err, "lost writes", "node 'agg'", "40 chunks")
