"""The run store's own speed and footprint, next to `redis-benchmark` on the same server.

    python bench/store_bench.py [--redis redis://127.0.0.1:6379/0] [--chunks 5000] [--records 1000000]

1. Chunk transitions per second: one client, sequential claim + commit cycles (two transitions,
   each one atomic store call: a Lua script on Redis, a `BEGIN IMMEDIATE` transaction on SQLite),
   on the embedded SQLite store and on the Redis store, next to
   `redis-benchmark -q -c 1 -n 20000 -t set,get` on the same server, as ratios; and next to plain
   SETs through redis-py's asyncio client (the store's client library), which shows how much of
   the gap is the Python client rather than the store's scripts.
2. Redis memory per 1,000,000 records of results: INFO `used_memory` before and after committing
   `{"id": i, "y": 2i}` for every record through the store API (chunks of 1,000), plus the sum of
   `MEMORY USAGE` over the run's keys (immune to other clients of a shared server).
3. Keys left under the private prefix after `pagent gc`: must be 0, else the script exits 1.

Everything on Redis lives under a private prefix (`pagent-bench:<random>`) that is deleted at the
end; the server is never flushed. `redis-benchmark -t set,get` writes the key `key:__rand_int__`;
it is deleted afterwards unless it existed before.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import redis

from parallel_agent.store import open_store
from parallel_agent.store.base import ChunkSpec, RunInfo, RunStore

NODE = "work"
BENCH_KEY = "key:__rand_int__"  # what `redis-benchmark -t set,get` writes
MIB = 1024 * 1024


def run_info(task_id: str) -> RunInfo:
    now = time.time()
    return RunInfo(
        task_id=task_id,
        pipeline_name="store-bench",
        pipeline_hash="bench",
        pipeline_text="name: store-bench\n",
        input_path=None,
        input_size=None,
        input_hash=None,
        input_format="jsonl",
        params={},
        status="executing",
        created_at=now,
        updated_at=now,
        finished_at=None,
        generation=uuid.uuid4().hex,
    )


def small_chunks(count: int) -> Iterator[ChunkSpec]:
    """Chunks of 10 small records: the cost is the transition, not the bytes."""
    for index in range(count):
        first = index * 10
        payload = b"".join(b'{"id":%d,"x":%d}\n' % (i, i) for i in range(first, first + 10))
        yield ChunkSpec(index, first, 10, payload)


async def add_all(store: RunStore, task_id: str, chunks: Iterator[ChunkSpec]) -> None:
    batch: list[ChunkSpec] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == 50:
            await store.add_chunks(task_id, NODE, batch)
            batch = []
    if batch:
        await store.add_chunks(task_id, NODE, batch)
    await store.seal(task_id, NODE)


def result_of(first: int, count: int) -> bytes:
    return b"".join(b'{"id":%d,"y":%d}\n' % (i, 2 * i) for i in range(first, first + count))


async def claim_commit_all(store: RunStore, task_id: str) -> tuple[int, int]:
    """Claim and commit chunks one by one until none is left; return the cycles done and the
    bytes of results committed."""
    cycles = size = 0
    while True:
        leases = await store.claim(task_id, NODE, "bench", lease_s=300, limit=1)
        if not leases:
            return cycles, size
        (lease,) = leases
        result = result_of(lease.first_record, lease.count)
        size += len(result)
        committed = await store.commit(
            lease,
            result=result,
            errors=b"[]",
            items_ok=lease.count,
            items_failed=0,
            duration_s=0.0,
        )
        if not committed:
            raise SystemExit(f"commit of chunk {lease.index} was rejected")
        cycles += 1


async def transitions(url: str, chunks: int) -> float:
    """Claim + commit cycles per second on one store, one client, sequential."""
    store = open_store(url)
    await store.open()
    task_id = f"transitions-{uuid.uuid4().hex[:8]}"
    try:
        await store.create_run(run_info(task_id))
        await add_all(store, task_id, small_chunks(chunks))
        started = time.perf_counter()
        cycles, _ = await claim_commit_all(store, task_id)
        elapsed = time.perf_counter() - started
        counts = await store.counts(task_id, NODE)
        if cycles != chunks or counts.done != chunks or counts.items_done != chunks * 10:
            raise SystemExit(f"{url}: {cycles} cycles, {counts} (expected {chunks} chunks done)")
        await store.delete_run(task_id)
        return cycles / elapsed
    finally:
        await store.close()


async def client_set_rate(url: str, key: str, calls: int) -> float:
    """SETs per second through redis-py's asyncio client, the store's own client library, one
    connection, sequential: what a store call costs before any script runs."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        started = time.perf_counter()
        for _ in range(calls):
            await client.set(key, b"xxx")
        elapsed = time.perf_counter() - started
        await client.unlink(key)
    finally:
        await client.aclose()
    return calls / elapsed


def benchmark_args(url: str) -> list[str]:
    """redis-benchmark's connection options for a redis:// or unix:// URL."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    args: list[str] = []
    if parts.scheme == "unix":
        args += ["-s", parts.path]
        db = query.get("db", "0")
    else:
        args += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        db = parts.path.strip("/") or "0"
        if parts.scheme == "rediss":
            args.append("--tls")
    if parts.username:
        args += ["--user", unquote(parts.username)]
    if parts.password:
        args += ["-a", unquote(parts.password), "--no-auth-warning"]
    return [*args, "--dbnum", db]


def redis_benchmark(url: str, client: redis.Redis) -> dict[str, float]:
    """`redis-benchmark -q -c 1 -n 20000 -t set,get` on the store's server: requests per second."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark is not installed")
    existed = bool(client.exists(BENCH_KEY))
    command = [binary, *benchmark_args(url), "-q", "-c", "1", "-n", "20000", "-t", "set,get"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    finally:
        if not existed:
            client.unlink(BENCH_KEY)
    if done.returncode != 0:
        raise SystemExit(f"redis-benchmark failed ({done.returncode}): {done.stderr[-2000:]}")
    rates: dict[str, float] = {}
    for line in re.split(r"[\r\n]+", done.stdout):
        found = re.match(r"\s*(\w+): ([\d.]+) requests per second", line)
        if found:
            rates[found.group(1).upper()] = float(found.group(2))
    if not {"SET", "GET"} <= rates.keys():
        raise SystemExit(f"cannot read redis-benchmark's output:\n{done.stdout[-2000:]}")
    return rates


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def keys_under(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}:*", count=1000))


def memory_usage(client: redis.Redis, keys: list[bytes]) -> int:
    """Sum of `MEMORY USAGE key SAMPLES 0` (every element counted)."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return sum(int(size or 0) for size in pipe.execute())


async def commit_records(url: str, task_id: str, records: int, chunk_size: int) -> int:
    """Queue `records` input records, claim and commit every chunk, finish the run; return the
    bytes of results committed."""
    store = open_store(url)
    await store.open()
    try:
        await store.create_run(run_info(task_id))

        def chunks() -> Iterator[ChunkSpec]:
            for index, first in enumerate(range(0, records, chunk_size)):
                count = min(chunk_size, records - first)
                payload = b"".join(
                    b'{"id":%d,"x":%d}\n' % (i, i) for i in range(first, first + count)
                )
                yield ChunkSpec(index, first, count, payload)

        await add_all(store, task_id, chunks())
        _, size = await claim_commit_all(store, task_id)
        counts = await store.counts(task_id, NODE)
        if counts.items_done != records:
            raise SystemExit(f"{counts.items_done} of {records} records committed")
        await store.update_run(task_id, status="complete", finished_at=time.time())
        return size
    finally:
        await store.close()


def gc_command(store_url: str) -> None:
    """`pagent gc` of every finished run under the private prefix."""
    done = subprocess.run(
        [sys.executable, "-m", "parallel_agent", "gc", "--older-than", "0", "--store", store_url],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise SystemExit(f"pagent gc failed ({done.returncode}): {done.stderr[-2000:]}")


def table(rows: list[list[str]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
        if number == 0:
            lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis",
        default=os.environ.get("PAGENT_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
        help="Redis server URL (default: redis://127.0.0.1:6379/0)",
    )
    parser.add_argument(
        "--chunks", type=int, default=5000, help="claim + commit cycles per store (default 5000)"
    )
    parser.add_argument(
        "--records",
        type=int,
        default=1_000_000,
        help="records of results for the memory figure (default 1,000,000)",
    )
    parser.add_argument("--chunk-size", type=int, default=1000, help="records per chunk (memory)")
    args = parser.parse_args()

    prefix = f"pagent-bench:{uuid.uuid4().hex[:12]}"
    store_url = f"{args.redis}{'&' if '?' in args.redis else '?'}prefix={prefix}"
    client = redis.Redis.from_url(args.redis, socket_connect_timeout=5, socket_timeout=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"cannot reach {args.redis}: {exc}") from None
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="pagent-store-bench-") as folder:
            sqlite_rate = asyncio.run(
                transitions(f"sqlite://{Path(folder) / 'state.db'}", args.chunks)
            )
        redis_rate = asyncio.run(transitions(store_url, args.chunks))
        rates = redis_benchmark(args.redis, client)
        py_rate = asyncio.run(client_set_rate(args.redis, f"{prefix}:set", 2 * args.chunks))

        before = used_memory(client)
        text = asyncio.run(commit_records(store_url, "memory", args.records, args.chunk_size))
        after = used_memory(client)
        keys = keys_under(client, prefix)
        usage = memory_usage(client, keys)
        gc_command(store_url)
        left = keys_under(client, prefix)
    finally:
        leftovers = keys_under(client, prefix)
        for start in range(0, len(leftovers), 500):
            client.unlink(*leftovers[start : start + 500])
        client.close()

    set_rate, get_rate = rates["SET"], rates["GET"]
    print(
        f"Chunk transitions, one client, sequential: {args.chunks} chunks of 10 records; "
        "a cycle is claim + commit = 2 transitions (2 store calls)."
    )
    rows = [["", "cycles/s", "transitions/s", "vs SET", "vs GET", "vs redis-py SET"]]
    for name, rate in (("SQLite store (tmp file)", sqlite_rate), ("Redis store", redis_rate)):
        calls = 2 * rate
        ratios = [calls / set_rate, calls / get_rate, calls / py_rate]
        rows.append([name, f"{rate:,.0f}", f"{calls:,.0f}", *(f"{r:.2f}" for r in ratios)])
    rows.append(["redis-benchmark SET -c 1", "", f"{set_rate:,.0f}", "1.00", "", ""])
    rows.append(["redis-benchmark GET -c 1", "", f"{get_rate:,.0f}", "", "1.00", ""])
    rows.append(["redis-py asyncio SET, 1 client", "", f"{py_rate:,.0f}", "", "", "1.00"])
    print(table(rows))
    print(f"Redis store / SQLite store: {redis_rate / sqlite_rate:.2f}")
    print()
    per_record = (after - before) / args.records
    per_million = per_record * 1_000_000 / MIB
    print(
        f"Redis memory for {args.records:,} records of results "
        f'({{"id": i, "y": 2i}}, chunks of {args.chunk_size}):'
    )
    print(
        f"  INFO used_memory: {before / MIB:.1f} MiB -> {after / MIB:.1f} MiB: "
        f"{per_record:.1f} bytes/record, {per_million:.1f} MiB per 1,000,000 records"
    )
    print(
        f"  MEMORY USAGE of the run's {len(keys)} keys: {usage / MIB:.1f} MiB: "
        f"{usage / args.records:.1f} bytes/record (the results' JSON Lines text itself: "
        f"{text / args.records:.1f} bytes/record)"
    )
    print(f"Keys left under {prefix}:* after `pagent gc`: {len(left)}")
    print(f"({time.perf_counter() - started:.1f} s)")
    if left:
        print("FAIL: gc left keys behind", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
