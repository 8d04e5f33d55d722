"""Redis run store (`redis://`, `rediss://`, `unix://`) for runs shared by several machines.

Each chunk transition (add, seal, claim, renew, commit, fail, release, retry) is one Lua script
call, so it is atomic and one round trip; scripts live in `store/lua/` and are re-sent by redis-py
after a server restart (NOSCRIPT). Lease deadlines use the server's clock unless a caller passes
`now`. Every connection has connect and read timeouts, and lost connections are retried with
backoff within a budget shared by every call of one outage, then reported as StoreError naming the
masked URL. Connections come from a bounded pool that callers wait on (any `concurrency` works).
Key layout: keys.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, fields
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from parallel_agent.errors import StateLostError, StoreError, UsageError
from parallel_agent.jsonl import dumps, loads
from parallel_agent.store.base import (
    CANCELLED,
    DEFAULT_FINISHED_TTL_S,
    DEFAULT_RETRY_BUDGET_S,
    FINISHED_STATUSES,
    RESULTS_BATCH,
    ChunkResult,
    ChunkSpec,
    ChunkState,
    FailedChunk,
    Lease,
    NodeCounts,
    RetryBudget,
    RunInfo,
    RunStore,
    TokenBucket,
    mask_url,
    rate_burst,
    results_batch,
    run_cancelled,
    run_missing,
)
from parallel_agent.store.keys import TaskKeys, runs_index, worker_key, workers_index

T = TypeVar("T")

#: Seconds to open a TCP connection and to wait for any reply; URL query options override them.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_SOCKET_TIMEOUT_S = 5.0
#: Connections one store opens at most; more concurrent calls wait for a free one (URL option
#: `max_connections`), so a node's `concurrency` never exceeds the pool or the server's limit.
DEFAULT_MAX_CONNECTIONS = 32
#: Query options a store URL may carry (besides `prefix`, taken off before the store is built,
#: and redis-py's TLS options `ssl_*`, passed through).
URL_OPTIONS = frozenset(
    {
        "connect_timeout", "socket_timeout", "retry_budget", "finished_ttl", "max_connections",
        "db", "client_name", "health_check_interval", "socket_keepalive",
    }
)  # fmt: skip
#: Eviction policies that may drop keys without a TTL, i.e. the state of a running run.
EVICTING_POLICIES = ("allkeys-",)
#: Runs read per round trip by list_runs.
RUNS_BATCH = 100
#: What a script returns when the run's key is gone.
LOST = b"LOST"
#: What the claim script returns when the run is cancelled.
CANCELLED_REPLY = b"CANCELLED"

SCRIPTS = (
    "create_run",
    "update_run",
    "add_chunks",
    "seal",
    "claim",
    "renew",
    "commit",
    "fail",
    "release",
    "retry_failed",
    "lock",
    "counts",
    "add_to_count",
    "beat",
    "take_tokens",
)
#: Scripts that run inside common.lua's guarded(): KEYS[1] is the run hash, the last ARGV the
#: generation marker the run must carry ('' = not known yet), and a key of the run that vanished
#: (evicted, deleted) since a script last saw it is reported instead of read as empty.
GUARDED = frozenset(SCRIPTS) - {"create_run", "lock", "beat", "take_tokens"}
_RUN_FIELDS = [f.name for f in fields(RunInfo) if f.name != "extra"]
_COUNTER_FIELDS = [f.name for f in fields(NodeCounts)]


@functools.cache
def script_source(name: str) -> str:
    """A script's text with the shared helpers (common.lua) in front."""
    folder = resources.files("parallel_agent.store") / "lua"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    if name in GUARDED:
        return f"{common}\nreturn guarded(function()\n{body}\nend)\n"
    return f"{common}\n{body}"


def _option(query: dict[str, str], name: str, default: float, url: str) -> float:
    try:
        value = float(query.pop(name, default))
    except ValueError:
        raise UsageError(f"store URL {mask_url(url)}: {name} must be a number of seconds") from None
    if value <= 0:
        raise UsageError(f"store URL {mask_url(url)}: {name} must be positive")
    return value


class RedisStore(RunStore):
    """The run store in Redis; every key lives under `<prefix>:<task_id>:`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pagent",
        client: aioredis.Redis | None = None,
    ) -> None:
        """`client` replaces the connection made from `url` (tests pass a fakeredis client)."""
        self.url = mask_url(url)
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        _check_url(parts.scheme, parts.path, query, self.url)
        self.connect_timeout_s = _option(query, "connect_timeout", DEFAULT_CONNECT_TIMEOUT_S, url)
        self.socket_timeout_s = _option(query, "socket_timeout", DEFAULT_SOCKET_TIMEOUT_S, url)
        self.retry_budget_s = _option(query, "retry_budget", DEFAULT_RETRY_BUDGET_S, url)
        self.finished_ttl_s = _option(query, "finished_ttl", DEFAULT_FINISHED_TTL_S, url)
        self.max_connections = int(_option(query, "max_connections", DEFAULT_MAX_CONNECTIONS, url))
        self._outage_since: float | None = None
        """When the current run of failed calls began: the retry budget counts from there, so
        calls made during one outage share it instead of each waiting a whole budget."""
        self._connect_url = urlunsplit(parts._replace(query=urlencode(query)))
        self.prefix = prefix.rstrip(":") or "pagent"
        self._client = client
        self._scripts: dict[str, AsyncScript] = {}
        self._generations: dict[str, bytes] = {}
        """The generation marker (as stored) of each run this store created or checked: every
        guarded script refuses a run that carries another one (recreated after a loss)."""

    @property
    def client(self) -> aioredis.Redis:
        """The connection (for diagnostics and tests that inspect keys); open() first."""
        if self._client is None:
            raise StoreError(f"store {self.url} is not open")
        return self._client

    # -- plumbing --------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is None:
            try:
                # A bounded pool that makes callers wait for a free connection (never "Too many
                # connections" at a high `concurrency`); a wait past the budget is a StoreError.
                pool = aioredis.BlockingConnectionPool.from_url(
                    self._connect_url,
                    socket_connect_timeout=self.connect_timeout_s,
                    socket_timeout=self.socket_timeout_s,
                    # retries are ours (_call), bounded by the budget across reconnects
                    retry=Retry(NoBackoff(), 0),
                    max_connections=self.max_connections,
                    timeout=self.retry_budget_s,
                )
                self._client = aioredis.Redis.from_pool(pool)
            except ValueError as exc:
                raise UsageError(f"bad store URL {self.url}: {exc}") from None
        client = self._client
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}
        try:
            await self._call(lambda c: c.ping())
        except (AttributeError, TypeError, UnicodeDecodeError) as exc:
            # redis-py misreads some non-RESP replies before it can say so
            raise StoreError(f"{self.url} is not a Redis server ({exc})") from None
        await self._check_eviction()

    async def _check_eviction(self) -> None:
        """Refuse a server that may evict the keys of a running run (a `maxmemory` limit with
        `maxmemory-policy allkeys-*`): it loses state as silently as a restart without
        persistence. A server that hides CONFIG is trusted."""
        try:
            reply = await self._call(lambda c: c.config_get("maxmemory*"))
        except StoreError:
            return
        values = {_text(key): _text(value) for key, value in dict(reply).items()}
        policy = values.get("maxmemory-policy", "")
        limited = values.get("maxmemory", "0") not in ("", "0")
        if limited and policy.startswith(EVICTING_POLICIES):
            raise StateLostError(
                f"{self.url} evicts keys when full (maxmemory {values['maxmemory']}, "
                f"maxmemory-policy {policy}): the state of a run could be lost; use "
                "maxmemory-policy noeviction (or volatile-*)"
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run `op`, retrying lost connections and timeouts with backoff within the budget."""
        client = self._client
        if client is None:
            raise StoreError(f"store {self.url} is not open")
        budget: RetryBudget | None = None
        while True:
            started = time.monotonic()
            try:
                reply = await op(client)
            except AuthenticationError as exc:
                raise StoreError(f"authentication failed for {self.url}: {exc}") from None
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self._outage_since is None:
                    self._outage_since = started
                if budget is None:
                    budget = RetryBudget(self.retry_budget_s, since=self._outage_since)
                delay = budget.next_delay()
                if delay is None:
                    raise StoreError(f"cannot reach {self.url}: {_cause(exc)}") from None
                await asyncio.sleep(delay)
                continue
            except InvalidResponse as exc:  # not RESP: an HTTP server, ...
                raise StoreError(f"{self.url} is not a Redis server ({exc})") from None
            except ResponseError as exc:
                text = str(exc)
                if text.startswith(("NOAUTH", "WRONGPASS")):
                    raise StoreError(f"authentication failed for {self.url}: {text}") from None
                raise StoreError(f"{self.url} refused a command: {text}") from None
            self._outage_since = None
            return reply

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        return await self._call(lambda c: script(keys=list(keys), args=list(args), client=c))

    async def _checked(
        self, task_id: str, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """Run a guarded script; a run or a key of it that is gone raises StateLostError."""
        generation = self._generations.get(task_id, b"")
        reply = await self._script(name, keys, [*args, generation])
        if isinstance(reply, bytes) and reply.startswith(LOST):
            raise self._lost(task_id, reply.decode())
        return reply

    def _lost(self, task_id: str, reply: str) -> StateLostError:
        """The error for a guarded script's LOST reply."""
        _, _, what = reply.partition(" ")
        kind, _, name = what.partition(" ")
        if kind == "key":
            return StateLostError(
                f"the state of task '{task_id}' in {self.url} lost its key {name} (evicted by "
                "a maxmemory policy, or deleted by someone else): the run cannot go on"
            )
        if kind == "generation":
            expected = loads(self._generations.get(task_id, b'""'))
            found = "none" if name == "nil" else loads(name)
            return StateLostError(
                f"task '{task_id}' in {self.url} belongs to another run (generation {found}, "
                f"expected {expected}); its earlier state is gone"
            )
        return run_missing(self.url, task_id)

    def _keys(self, task_id: str) -> TaskKeys:
        return TaskKeys(self.prefix, task_id)

    # -- runs ------------------------------------------------------------------------------------

    async def create_run(self, info: RunInfo) -> bool:
        k = self._keys(info.task_id)
        data = asdict(info)
        run_pairs = [item for name in _RUN_FIELDS for item in (name, dumps(data[name]))]
        extra_pairs = [item for key, value in info.extra.items() for item in (key, dumps(value))]
        args = [
            info.task_id,
            repr(info.created_at),
            dumps(info.generation),
            len(_RUN_FIELDS),
        ]
        reply = await self._script(
            "create_run", [k.run, k.extra, k.runs], [*args, *run_pairs, *extra_pairs]
        )
        if reply == 1:
            self._generations[info.task_id] = dumps(info.generation)
        return bool(reply == 1)

    async def check_generation(self, task_id: str, generation: str) -> RunInfo:
        """Also refuse a server that now evicts any key (its policy changed since open), and
        make every later transition check this marker inside its script."""
        info = await super().check_generation(task_id, generation)
        await self._check_eviction()
        self._generations[task_id] = dumps(generation)
        return info

    async def get_run(self, task_id: str) -> RunInfo | None:
        k = self._keys(task_id)

        async def read(c: aioredis.Redis) -> list[Any]:
            async with c.pipeline(transaction=True) as pipe:
                pipe.hgetall(k.run)
                pipe.hgetall(k.extra)
                return await pipe.execute()

        run, extra = await self._call(read)
        return _run_info(run, extra)

    async def update_run(
        self,
        task_id: str,
        *,
        status: str | None = None,
        finished_at: float | None = None,
        output_path: str | None = None,
        extra: dict[str, Any] | None = None,
        unless_cancelled: bool = False,
    ) -> str:
        k = self._keys(task_id)
        changes: dict[str, Any] = {"updated_at": self._now()}
        if status is not None:
            changes["status"] = status
        if finished_at is not None:
            changes["finished_at"] = finished_at
        if output_path is not None:
            changes["output_path"] = output_path
        pairs = [item for name, value in changes.items() for item in (name, dumps(value))]
        extra_pairs = [item for key, value in (extra or {}).items() for item in (key, dumps(value))]
        guard = orjson.dumps(CANCELLED) if unless_cancelled else b""
        reply = await self._checked(
            task_id,
            "update_run",
            [k.run, k.extra, k.nodes],
            [guard, len(changes), *pairs, *extra_pairs],
        )
        recorded = str(orjson.loads(reply))
        if recorded in FINISHED_STATUSES:
            await self._expire(k, self.finished_ttl_s)
        elif status is not None:
            await self._expire(k, None)
        return recorded

    async def _expire(self, k: TaskKeys, ttl_s: float | None) -> None:
        """Start (or, with None, cancel) the finished-run TTL on every data key of the task."""
        nodes = await self.nodes(k.task_id)

        async def expire(c: aioredis.Redis) -> None:
            async with c.pipeline(transaction=True) as pipe:
                for key in k.data_keys(nodes):
                    if ttl_s is None:
                        pipe.persist(key)
                    else:
                        pipe.pexpire(key, int(ttl_s * 1000))
                await pipe.execute()

        await self._call(expire)

    async def add_to_count(self, task_id: str, key: str, amount: int) -> int:
        k = self._keys(task_id)
        return int(await self._checked(task_id, "add_to_count", [k.run, k.extra], [key, amount]))

    async def list_runs(self) -> list[RunInfo]:
        index = runs_index(self.prefix)
        ids = [raw.decode() for raw in await self._call(lambda c: _members(c, index))]
        infos: list[RunInfo] = []
        stale: list[str] = []
        for start in range(0, len(ids), RUNS_BATCH):
            batch = ids[start : start + RUNS_BATCH]

            async def read(c: aioredis.Redis, batch: list[str] = batch) -> list[Any]:
                async with c.pipeline(transaction=False) as pipe:
                    for task_id in batch:
                        k = self._keys(task_id)
                        pipe.hgetall(k.run)
                        pipe.hgetall(k.extra)
                    return await pipe.execute()

            replies = await self._call(read)
            for position, task_id in enumerate(batch):
                info = _run_info(replies[2 * position], replies[2 * position + 1])
                if info is None:
                    stale.append(task_id)
                else:
                    infos.append(info)
        if stale:
            await self._call(lambda c: c.zrem(index, *stale))
        return infos

    async def delete_run(self, task_id: str) -> None:
        k = self._keys(task_id)
        nodes = await self.nodes(task_id)

        async def delete(c: aioredis.Redis) -> None:
            async with c.pipeline(transaction=True) as pipe:
                pipe.unlink(*k.data_keys(nodes), k.lock, *(k.node(n, "bucket") for n in nodes))
                pipe.zrem(k.runs, task_id)
                await pipe.execute()

        await self._call(delete)

    # -- worker heartbeats -----------------------------------------------------------------------

    async def beat_worker(self, worker: str, state: dict[str, Any], ttl_s: float) -> None:
        keys = [workers_index(self.prefix), worker_key(self.prefix, worker)]
        ttl_ms = max(1, int(ttl_s * 1000))
        payload = orjson.dumps({**state, "ttl_ms": ttl_ms})
        await self._script("beat", keys, [worker, payload, ttl_ms])

    async def live_workers(self) -> list[dict[str, Any]]:
        index = workers_index(self.prefix)
        ids = [raw.decode() for raw in await self._call(lambda c: _members(c, index))]

        async def read(c: aioredis.Redis) -> list[Any]:
            async with c.pipeline(transaction=False) as pipe:
                for worker in ids:
                    pipe.get(worker_key(self.prefix, worker))
                    pipe.pttl(worker_key(self.prefix, worker))
                return await pipe.execute()

        replies = await self._call(read) if ids else []
        workers = []
        for at in range(0, len(replies), 2):
            state, left_ms = replies[at : at + 2]
            if state is None:  # expired since the index was read; the next beat prunes it
                continue
            entry = orjson.loads(state)
            seen_ms = max(0, int(entry.get("ttl_ms", 0)) - max(0, int(left_ms)))
            workers.append({**entry, "last_seen": seen_ms / 1000})
        return workers

    # -- run-wide rate limits --------------------------------------------------------------------

    def token_bucket(self, task_id: str, name: str, rate: float) -> TokenBucket | None:
        key = self._keys(task_id).node(name, "bucket")
        burst = rate_burst(rate)

        async def take(want: int) -> tuple[int, float]:
            reply = await self._script("take_tokens", [key], [repr(rate), burst, want, ""])
            return int(reply[0]), float(reply[1])

        return take

    # -- lock ------------------------------------------------------------------------------------

    async def _lock(self, op: str, task_id: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        reply = await self._script("lock", [self._keys(task_id).lock], [op, owner, ttl_ms])
        return bool(reply == 1)

    async def acquire_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        return await self._lock("acquire", task_id, owner, ttl_s)

    async def renew_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        return await self._lock("renew", task_id, owner, ttl_s)

    async def lock_holder(self, task_id: str) -> str | None:
        key = self._keys(task_id).lock
        value = await self._call(lambda client: client.get(key))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def lock_state(self, task_id: str) -> tuple[str, float] | None:
        key = self._keys(task_id).lock

        async def read(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                return await pipe.execute()

        value, left_ms = await self._call(read)
        if value is None or int(left_ms) <= 0:
            return None
        owner = value.decode() if isinstance(value, bytes) else str(value)
        return owner, int(left_ms) / 1000

    async def release_lock(self, task_id: str, owner: str) -> None:
        await self._lock("release", task_id, owner, 0)

    # -- chunks ----------------------------------------------------------------------------------

    def _node_keys(self, task_id: str, node: str, *suffixes: str) -> list[str]:
        k = self._keys(task_id)
        return [k.run, *(k.node(node, suffix) for suffix in suffixes)]

    async def add_chunks(self, task_id: str, node: str, chunks: Sequence[ChunkSpec]) -> None:
        if not chunks:
            return
        k = self._keys(task_id)
        suffixes = ("counters", "meta", "payload", "ready", "records", "result", "errors", "done")
        keys = [
            k.run,
            k.nodes,
            *(k.node(node, s) for s in (*suffixes, "result_records", "partial")),
        ]
        args: list[Any] = [node]
        for chunk in chunks:
            # A split's chunk with a partial carries that partial at the end of its payload too,
            # which only a cancelled run stores: the partial is sent once, the script joins them.
            joined = bool(chunk.partial) and chunk.payload.endswith(chunk.partial)
            args.extend(
                (
                    chunk.index,
                    chunk.first_record,
                    chunk.count,
                    chunk.payload[: -len(chunk.partial)] if joined else chunk.payload,
                    chunk.records,
                    chunk.partial,
                    1 if joined else 0,
                )
            )
        await self._checked(task_id, "add_chunks", keys, args)

    async def seal(self, task_id: str, node: str) -> None:
        k = self._keys(task_id)
        await self._checked(task_id, "seal", [k.run, k.nodes, k.node(node, "counters")], [node])

    async def claim(
        self,
        task_id: str,
        node: str,
        owner: str,
        *,
        lease_s: float,
        limit: int = 1,
        max_attempts: int = 3,
        now: float | None = None,
    ) -> list[Lease]:
        keys = self._node_keys(
            task_id,
            node,
            "counters",
            "meta",
            "payload",
            "ready",
            "delayed",
            "leases",
            "failed",
            "records",
        )
        args = [owner, repr(lease_s), limit, max_attempts, _time_arg(now)]
        reply = await self._checked(task_id, "claim", keys, args)
        if reply == CANCELLED_REPLY:
            raise run_cancelled(task_id)
        leases = []
        for at in range(0, len(reply), 8):
            index, token, attempt, first, count, payload, expires, records = reply[at : at + 8]
            leases.append(
                Lease(
                    task_id=task_id,
                    node=node,
                    index=int(index),
                    token=int(token),
                    owner=owner,
                    first_record=int(first),
                    count=int(count),
                    payload=payload or b"",
                    attempt=int(attempt),
                    expires_at=float(expires),
                    records=records or b"",
                )
            )
        return leases

    async def renew(self, lease: Lease, lease_s: float, *, now: float | None = None) -> bool:
        keys = self._node_keys(lease.task_id, lease.node, "meta", "leases")
        args = [lease.index, lease.token, repr(lease_s), _time_arg(now)]
        return bool(await self._checked(lease.task_id, "renew", keys, args) == 1)

    async def commit(
        self,
        lease: Lease,
        *,
        result: bytes,
        errors: bytes,
        items_ok: int,
        items_failed: int,
        duration_s: float,
        records: bytes = b"",
        partial: bytes = b"",
        outputs: int | None = None,
    ) -> bool:
        keys = self._node_keys(
            lease.task_id,
            lease.node,
            "counters",
            "meta",
            "payload",
            "result",
            "errors",
            "leases",
            "done",
            "records",
            "result_records",
            "partial",
        )
        args = [lease.index, lease.token, result, errors, items_ok, items_failed, repr(duration_s)]
        args += [records, partial, items_ok if outputs is None else outputs]
        return bool(await self._checked(lease.task_id, "commit", keys, args) == 1)

    async def fail(
        self, lease: Lease, error: str, *, retry_in_s: float | None, now: float | None = None
    ) -> ChunkState:
        keys = self._node_keys(
            lease.task_id, lease.node, "counters", "meta", "ready", "delayed", "leases", "failed"
        )
        retry = "" if retry_in_s is None else repr(max(0.0, retry_in_s))
        args = [lease.index, lease.token, error, retry, _time_arg(now)]
        reply = await self._checked(lease.task_id, "fail", keys, args)
        state = reply.decode()
        return ChunkState.FAILED if state == "missing" else ChunkState(state)

    async def release(self, lease: Lease) -> None:
        keys = self._node_keys(lease.task_id, lease.node, "counters", "meta", "ready", "leases")
        await self._checked(lease.task_id, "release", keys, [lease.index, lease.token])

    async def counts(self, task_id: str, node: str) -> NodeCounts:
        k = self._keys(task_id)
        keys = [k.run, k.nodes, *k.node_keys(node)]
        reply = await self._checked(task_id, "counts", keys, [])
        raw = dict(zip(reply[::2], reply[1::2], strict=True))
        total, pending, leased, done, failed, items, ok, bad, retries, sealed, out = (
            int(raw.get(name.encode(), 0)) for name in _COUNTER_FIELDS
        )
        return NodeCounts(
            total, pending, leased, done, failed, items, ok, bad, retries, bool(sealed), out
        )

    async def nodes(self, task_id: str) -> list[str]:
        raw = await self._call(lambda c: _members(c, self._keys(task_id).nodes))
        return [name.decode() for name in raw]

    async def _done_batches(
        self, task_id: str, node: str, *suffixes: str, batch: int = RESULTS_BATCH
    ) -> AsyncIterator[list[tuple[int, list[Any]]]]:
        """DONE indices in order, `batch` at a time, with HMGET of each per-node hash."""
        k = self._keys(task_id)
        after = "-inf"
        done_key = k.node(node, "done")
        while True:

            async def read(c: aioredis.Redis, after: str = after) -> list[Any]:
                indices = await _members(
                    c, done_key, after, "+inf", byscore=True, offset=0, num=batch
                )
                if not indices:
                    return []
                async with c.pipeline(transaction=False) as pipe:
                    for suffix in suffixes:
                        pipe.hmget(k.node(node, suffix), indices)
                    columns = await pipe.execute()
                return [
                    (int(index), [column[i] for column in columns])
                    for i, index in enumerate(indices)
                ]

            rows = await self._call(read)
            if rows:
                yield rows
            if len(rows) < batch:
                return
            after = f"({rows[-1][0]}"

    async def results(self, task_id: str, node: str) -> AsyncIterator[ChunkResult]:
        counts = await self.counts(task_id, node)
        streamed = 0
        async for rows in self._done_batches(
            task_id,
            node,
            "meta",
            "result",
            "errors",
            "result_records",
            "partial",
            batch=results_batch(counts),
        ):
            for index, (meta, result, errors, records, partial) in rows:
                if meta is None or result is None or errors is None:
                    raise self._vanished(task_id, node, f"chunk {index}")
                streamed += 1
                m = orjson.loads(meta)
                yield ChunkResult(
                    index=index,
                    first_record=int(m["first"]),
                    count=int(m["count"]),
                    result=result or b"",
                    errors=errors or b"",
                    items_ok=int(m.get("ok", 0)),
                    items_failed=int(m.get("bad", 0)),
                    duration_s=float(m.get("dur", 0.0)),
                    attempt=int(m["att"]),
                    records=records or b"",
                    partial=partial or b"",
                )
        if streamed < counts.done:
            raise self._vanished(task_id, node, f"{counts.done - streamed} done chunks")

    def _vanished(self, task_id: str, node: str, what: str) -> StateLostError:
        """A committed chunk that vanished while its results were read (evicted, deleted)."""
        return StateLostError(
            f"the state of task '{task_id}' in {self.url} lost {what} of node '{node}' while "
            "its results were read (evicted by a maxmemory policy, or deleted by someone else)"
        )

    async def chunk_durations(self, task_id: str, node: str) -> list[float]:
        durations: list[float] = []
        async for rows in self._done_batches(task_id, node, "meta"):
            durations.extend(
                float(orjson.loads(meta).get("dur", 0.0)) for _, (meta,) in rows if meta
            )
        return durations

    async def failed_chunks(self, task_id: str, node: str) -> list[FailedChunk]:
        k = self._keys(task_id)

        async def read(c: aioredis.Redis) -> list[FailedChunk]:
            indices = await _members(c, k.node(node, "failed"))
            if not indices:
                return []
            async with c.pipeline(transaction=False) as pipe:
                pipe.hmget(k.node(node, "meta"), indices)
                pipe.hmget(k.node(node, "payload"), indices)
                pipe.hmget(k.node(node, "records"), indices)
                metas, payloads, numbers = await pipe.execute()
            failed = []
            for index, meta, payload, records in zip(
                indices, metas, payloads, numbers, strict=True
            ):
                if meta is None or payload is None:
                    raise self._vanished(task_id, node, f"failed chunk {int(index)}")
                m = orjson.loads(meta)
                failed.append(
                    FailedChunk(
                        index=int(index),
                        first_record=int(m["first"]),
                        count=int(m["count"]),
                        payload=payload or b"",
                        error=str(m.get("err", "")),
                        attempts=int(m["att"]),
                        records=records or b"",
                    )
                )
            return failed

        return await self._call(read)

    async def retry_failed(self, task_id: str, node: str) -> int:
        keys = self._node_keys(task_id, node, "counters", "meta", "ready", "failed")
        return int(await self._checked(task_id, "retry_failed", keys, []))


async def _members(
    c: aioredis.Redis, key: str, start: int | str = 0, end: int | str = -1, **options: Any
) -> list[bytes]:
    """ZRANGE with the reply typed (redis-py annotates every reply as a union)."""
    return cast("list[bytes]", await c.zrange(key, start, end, **options))


def _check_url(scheme: str, path: str, query: dict[str, str], masked: str) -> None:
    """Refuse what redis-py would silently ignore or misread: an unknown option, a database that
    is not a number (it would run on database 0)."""
    unknown = sorted(name for name in set(query) - URL_OPTIONS if not name.startswith("ssl_"))
    if unknown:
        raise UsageError(
            f"store URL {masked}: unknown option {', '.join(unknown)} "
            f"(known: {', '.join(sorted(URL_OPTIONS | {'prefix'}))}, ssl_*)"
        )
    databases = [query["db"]] if "db" in query else []
    if scheme != "unix" and path.strip("/"):
        databases.append(path.strip("/"))
    for database in databases:
        if not database.isdigit():
            raise UsageError(f"store URL {masked}: the database must be a number, not {database!r}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _time_arg(now: float | None) -> str:
    """The `now` argument of a script: empty means the server's clock."""
    return "" if now is None else repr(now)


def _cause(exc: BaseException) -> str:
    """The operating system's words when a socket error is behind `exc` ("Connection refused")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def _run_info(run: dict[bytes, bytes], extra: dict[bytes, bytes]) -> RunInfo | None:
    if not run:
        return None
    values: dict[str, Any] = {name.decode(): loads(value) for name, value in run.items()}
    known: dict[str, Any] = {name: values.get(name) for name in _RUN_FIELDS}
    return RunInfo(
        **known,
        extra={key.decode(): loads(value) for key, value in extra.items()},
    )
