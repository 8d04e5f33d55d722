"""Redis-backed cache on redis.asyncio.

A value lives at `prefix + key` as JSON (a scoped key at `prefix + "p:" + key`). Versions live in
one hash at the prefix (`with_prefix` views and scopes share it), one field per full key, so every
view of the same keys sees the same versions. Versions only ever go up, even across `clear()`, so a version
number is never reused for a different value. A conditional commit is one Lua script: atomic for
every client of the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, Self
from urllib.parse import quote

import redis.asyncio as aioredis

from parallel_agent.caches.cache import Cache, KeySet, Scope
from parallel_agent.caches.codec import decode, encode

HIDDEN = "\x00"
"""Marks engine-internal keys under a prefix (the versions hash, mailboxes); never listed."""

# KEYS: [versions hash, write keys..., delete keys..., mailbox keys...]
# ARGV: [n_expected, n_writes, n_deletes, n_messages,
#        (full key, version) * n_expected, value * n_writes, payload * n_messages]
_COMMIT = """
local h = KEYS[1]
local ne, nw, nd, nm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local a, k = 5, 2
for i = 1, ne do
  local have = tonumber(redis.call('HGET', h, ARGV[a]) or '0')
  if have ~= tonumber(ARGV[a + 1]) then return 0 end
  a = a + 2
end
for i = 1, nw do
  redis.call('SET', KEYS[k], ARGV[a])
  redis.call('HINCRBY', h, KEYS[k], 1)
  k, a = k + 1, a + 1
end
for i = 1, nd do
  redis.call('DEL', KEYS[k])
  redis.call('HINCRBY', h, KEYS[k], 1)
  k = k + 1
end
for i = 1, nm do
  redis.call('RPUSH', KEYS[k], ARGV[a])
  k, a = k + 1, a + 1
end
return 1
"""


DEFAULT_URL = "redis://localhost:6379/0"


def _url(host: str, port: int, db: int, password: str | None) -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    where = f"[{host}]" if ":" in host else host  # an IPv6 address
    return f"redis://{auth}{where}:{port}/{db}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCache(Cache):
    """A Cache on a Redis server; several processes may share one prefix safely.

    `RedisCache()` talks to localhost:6379; pass `url` for another server (redis://, rediss://,
    unix://), or the framework's `host`, `port`, `db` and `password`. Every command has connect and
    read timeouts, so a dead server fails instead of hanging.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        prefix: str = "pagent:cache:",
        *,
        client: aioredis.Redis | None = None,
        socket_timeout: float = 5.0,
        scope: Scope = ("", ""),
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        default_prefix: str = "",
        default_suffix: str = "",
    ) -> None:
        super().__init__(
            prefix, scope=scope, default_prefix=default_prefix, default_suffix=default_suffix
        )
        if (host, port, db, password) != (None, None, None, None):
            if url != DEFAULT_URL:
                raise ValueError("RedisCache: give either url or host/port/db/password, not both")
            url = _url(host or "localhost", port or 6379, db or 0, password)
        self.url = url
        self._owns_client = client is None
        self._client: aioredis.Redis = client or aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._commit = self._client.register_script(_COMMIT)

    def _view(self, scope: Scope) -> Self:
        """Another scope on the same connection; closing it is a no-op."""
        return type(self)(self.url, self.prefix, client=self._client, scope=scope)

    def _full(self, key: str) -> str:
        before, after = self._scope.get()
        return self.prefix + before + key + after

    @property
    def _versions(self) -> str:
        return self.prefix + HIDDEN + "versions"

    def _mailbox(self, mailbox: str) -> str:
        return self.prefix + HIDDEN + "mailbox:" + self._scoped(mailbox)

    async def get(self, key: str, default: Any = None) -> Any:
        raw = await self._client.get(self._full(key))
        return default if raw is None else decode(raw)

    async def set(self, key: str, value: Any) -> None:
        full = self._full(key)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(full, encode(value))
            pipe.hincrby(self._versions, full, 1)
            await pipe.execute()

    async def delete(self, key: str) -> None:
        full = self._full(key)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(full)
            pipe.hincrby(self._versions, full, 1)
            await pipe.execute()

    async def _scan(self, within: str = "") -> list[str]:
        """Full names of the keys under `prefix + within` in this scope (internal ones too)."""
        before, after = self._scope.get()
        match = _glob_escape(self.prefix + within + before) + "*" + _glob_escape(after)
        return [k.decode() async for k in self._client.scan_iter(match=match, count=500)]

    def _user_keys(self, names: list[str]) -> list[str]:
        cut = len(self.prefix)
        keys = (self._unscoped(n[cut:]) for n in names if HIDDEN not in n[cut:])
        return [k for k in keys if k is not None]

    async def keys(self) -> KeySet:
        return set(self._user_keys(await self._scan()))

    async def get_all(self) -> dict[str, Any]:
        return await self.get_many(self._user_keys(await self._scan()))

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        names = list(keys)
        if not names:
            return {}
        raws = await self._client.mget([self._full(k) for k in names])
        return {k: decode(raw) for k, raw in zip(names, raws, strict=True) if raw is not None}

    async def clear(self) -> None:
        """UNLINK this scope's keys and mailboxes; bump versions so none is ever reused."""
        found = await self._scan() + await self._scan(HIDDEN + "mailbox:")
        names = [n for n in dict.fromkeys(found) if n != self._versions]
        for start in range(0, len(names), 500):
            batch = names[start : start + 500]
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.unlink(*batch)
                for name in batch:
                    if HIDDEN not in name[len(self.prefix) :]:
                        pipe.hincrby(self._versions, name, 1)
                await pipe.execute()

    async def publish_to_mailbox(self, mailbox: str, value: Any) -> None:
        await self._client.rpush(self._mailbox(mailbox), encode(value))

    async def get_message(self, mailbox: str, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        name = self._mailbox(mailbox)
        if timeout is None or timeout <= 0:
            raw: bytes | None = await self._client.lpop(name)  # type: ignore[assignment]
            return decode(raw)
        deadline = time.monotonic() + timeout
        while True:  # short BLPOP slices stay below the socket timeout
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            popped = await self._client.blpop([name], timeout=max(0.01, min(left, 1.0)))
            if popped is not None:
                return decode(popped[1])
            await asyncio.sleep(0)

    async def peek_mailbox(self, mailbox: str) -> list[Any]:
        raws = await self._client.lrange(self._mailbox(mailbox), 0, -1)
        return [decode(raw) for raw in raws]

    async def read_versioned(self, keys: Iterable[str]) -> dict[str, tuple[Any, int]]:
        names = list(keys)
        if not names:
            return {}
        full = [self._full(k) for k in names]
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.mget(full)
            pipe.hmget(self._versions, full)
            raws, versions = await pipe.execute()
        return {
            k: (decode(raw), int(v or 0)) for k, raw, v in zip(names, raws, versions, strict=True)
        }

    async def commit_if_unchanged(
        self,
        expected: dict[str, int],
        writes: dict[str, Any],
        deletes: KeySet,
        messages: list[tuple[str, Any]],
    ) -> bool:
        payloads = [encode(value) for value in writes.values()]  # fail before touching Redis
        keys: list[str] = [self._versions]
        argv: list[Any] = [len(expected), len(writes), len(deletes), len(messages)]
        for key, version in expected.items():
            argv += [self._full(key), version]
        keys += [self._full(key) for key in writes]
        argv += payloads
        keys += [self._full(key) for key in deletes]
        for mailbox, value in messages:
            keys.append(self._mailbox(mailbox))
            argv.append(encode(value))
        return bool(await self._commit(keys=keys, args=argv))

    async def close(self) -> None:
        """Close the connection pool if this cache created it (views never close it)."""
        if self._owns_client:
            await self._client.aclose()
