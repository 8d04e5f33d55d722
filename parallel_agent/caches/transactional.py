"""A per-attempt transactional view used by the engine for optimistic concurrency.

Reads go through `read_versioned` and remember each key's version; writes, deletes and
mailbox messages are buffered and reads see them. `commit()` applies everything with
`commit_if_unchanged`, so a module that read stale data is simply run again.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Self

from parallel_agent.caches.cache import Cache, KeySet, Scope

_ABSENT = object()


class TransactionalCache(Cache):
    """Buffers one module attempt's effects on `base`; not shared between attempts."""

    def __init__(self, base: Cache, *, scope: Scope = ("", "")) -> None:
        super().__init__(base.prefix, scope=scope)
        self._base = base
        self._seen: dict[str, Any] = {}  # key -> value as read (or _ABSENT)
        self._versions: dict[str, int] = {}
        self._writes: dict[str, Any] = {}
        self._deletes: KeySet = set()
        self._messages: list[tuple[str, Any]] = []

    async def _load(self, keys: Iterable[str]) -> None:
        todo = [k for k in keys if k not in self._seen]
        if not todo:
            return
        for key, (value, version) in (await self._base.read_versioned(todo)).items():
            self._seen[key] = _ABSENT if value is None else value
            self._versions[key] = version

    def _current(self, key: str) -> Any:
        if key in self._writes:
            return self._writes[key]
        if key in self._deletes:
            return _ABSENT
        return self._seen.get(key, _ABSENT)

    async def get(self, key: str, default: Any = None) -> Any:
        key = self._scoped(key)
        await self._load([key])
        value = self._current(key)
        # A copy, as a remote cache would return: mutating it must not change the buffer.
        return default if value is _ABSENT else copy.deepcopy(value)

    async def set(self, key: str, value: Any) -> None:
        key = self._scoped(key)
        self._deletes.discard(key)
        self._writes[key] = copy.deepcopy(value)

    async def delete(self, key: str) -> None:
        key = self._scoped(key)
        self._writes.pop(key, None)
        self._deletes.add(key)

    async def keys(self) -> KeySet:
        # Every key seen is recorded, so a concurrent change to any of them forces a retry.
        await self._load(await self._base.keys())
        present = {k for k, v in self._seen.items() if v is not _ABSENT}
        stored = (present | set(self._writes)) - self._deletes
        keys = (self._unscoped(k) for k in stored)
        return {k for k in keys if k is not None}

    async def get_all(self) -> dict[str, Any]:
        return await self.get_many(await self.keys())

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        names = {k: self._scoped(k) for k in keys}
        await self._load(names.values())
        values = {k: self._current(stored) for k, stored in names.items()}
        return {k: copy.deepcopy(v) for k, v in values.items() if v is not _ABSENT}

    async def clear(self) -> None:
        for key in await self.keys():
            await self.delete(key)

    async def publish_to_mailbox(self, mailbox: str, value: Any) -> None:
        self._messages.append((self._scoped(mailbox), copy.deepcopy(value)))

    async def get_message(self, mailbox: str, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Not transactional: a popped message is consumed even if the attempt is retried."""
        return await self._base.get_message(self._scoped(mailbox), timeout)

    async def peek_mailbox(self, mailbox: str) -> list[Any]:
        """The committed messages, then this attempt's own (not transactional, like get_message)."""
        name = self._scoped(mailbox)
        own = [copy.deepcopy(value) for box, value in self._messages if box == name]
        return [*await self._base.peek_mailbox(name), *own]

    async def read_versioned(self, keys: Iterable[str]) -> dict[str, tuple[Any, int]]:
        return await self._base.read_versioned(keys)

    async def commit_if_unchanged(
        self,
        expected: dict[str, int],
        writes: dict[str, Any],
        deletes: KeySet,
        messages: list[tuple[str, Any]],
    ) -> bool:
        return await self._base.commit_if_unchanged(expected, writes, deletes, messages)

    def _view(self, scope: Scope) -> Self:
        """Another scope on the same transaction: reads, writes and messages stay shared."""
        view = type(self)(self._base, scope=scope)
        view._seen, view._versions = self._seen, self._versions
        view._writes, view._deletes, view._messages = self._writes, self._deletes, self._messages
        return view

    async def stale(self) -> bool:
        """True when a key this attempt read has changed since: its view may have been
        inconsistent, so an exception it raised is a conflict, not a failure."""
        if not self._versions:
            return False
        now = await self._base.read_versioned(self._versions)
        return any(now[k][1] != v for k, v in self._versions.items())

    async def commit(self) -> bool:
        """Apply the buffered effects iff nothing read has changed; True when applied."""
        if not (self._writes or self._deletes or self._messages):
            return True  # read-only attempts never conflict
        return await self._base.commit_if_unchanged(
            dict(self._versions), dict(self._writes), set(self._deletes), list(self._messages)
        )
