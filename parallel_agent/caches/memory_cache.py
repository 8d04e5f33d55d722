"""In-process cache: the default for tests and single-process runs.

Values are stored encoded, exactly as Redis would hold them, so a module mutating what it read
never changes the cache behind the engine's back and both backends behave the same.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any, Self

from parallel_agent.caches.cache import Cache, KeySet, Scope
from parallel_agent.caches.codec import decode, encode


class _Mailbox(asyncio.Queue[bytes]):
    """A FIFO queue whose messages can also be read without taking them."""

    def _init(self, maxsize: int) -> None:  # the hook asyncio's own queue variants override
        self._queue: deque[bytes] = deque()

    def peek(self) -> list[bytes]:
        return list(self._queue)


class _Store:
    """State shared by a cache and its prefix views."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.versions: dict[str, int] = {}
        self.mailboxes: dict[str, _Mailbox] = {}


class MemoryCache(Cache):
    """A dict-backed Cache; no awaits inside an operation, so each one is atomic."""

    def __init__(
        self,
        prefix: str = "",
        *,
        scope: Scope = ("", ""),
        default_prefix: str = "",
        default_suffix: str = "",
        _store: _Store | None = None,
    ) -> None:
        super().__init__(
            prefix, scope=scope, default_prefix=default_prefix, default_suffix=default_suffix
        )
        self._store = _store if _store is not None else _Store()

    def _view(self, scope: Scope) -> Self:
        return type(self)(self.prefix, scope=scope, _store=self._store)

    def _full(self, key: str) -> str:
        before, after = self._scope.get()
        return self.prefix + before + key + after

    def _bump(self, full: str) -> None:
        self._store.versions[full] = self._store.versions.get(full, 0) + 1

    async def get(self, key: str, default: Any = None) -> Any:
        raw = self._store.data.get(self._full(key))
        return default if raw is None else decode(raw)

    async def set(self, key: str, value: Any) -> None:
        encoded = encode(value)
        full = self._full(key)
        self._store.data[full] = encoded
        self._bump(full)

    async def delete(self, key: str) -> None:
        full = self._full(key)
        if self._store.data.pop(full, None) is not None:
            self._bump(full)

    def _own(self, names: Iterable[str]) -> dict[str, str]:
        """Full name -> key in the current scope, for the names under this prefix and scope."""
        cut = len(self.prefix)
        own: dict[str, str] = {}
        for full in names:
            if full.startswith(self.prefix):
                key = self._unscoped(full[cut:])
                if key is not None:
                    own[full] = key
        return own

    async def keys(self) -> KeySet:
        return set(self._own(self._store.data).values())

    async def get_all(self) -> dict[str, Any]:
        data = self._store.data
        return {key: decode(data[full]) for full, key in self._own(data).items()}

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        data = self._store.data
        raws = {k: data.get(self._full(k)) for k in keys}
        return {k: decode(raw) for k, raw in raws.items() if raw is not None}

    async def clear(self) -> None:
        for full in self._own(list(self._store.data)):
            del self._store.data[full]
            self._bump(full)
        for name in self._own(list(self._store.mailboxes)):
            del self._store.mailboxes[name]

    def _queue(self, mailbox: str) -> _Mailbox:
        return self._store.mailboxes.setdefault(self._full(mailbox), _Mailbox())

    async def publish_to_mailbox(self, mailbox: str, value: Any) -> None:
        self._queue(mailbox).put_nowait(encode(value))

    async def get_message(self, mailbox: str, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        queue = self._queue(mailbox)
        if timeout is None or timeout <= 0:
            return None if queue.empty() else decode(queue.get_nowait())
        try:
            async with asyncio.timeout(timeout):
                return decode(await queue.get())
        except TimeoutError:
            return None

    async def peek_mailbox(self, mailbox: str) -> list[Any]:
        return [decode(raw) for raw in self._queue(mailbox).peek()]

    async def read_versioned(self, keys: Iterable[str]) -> dict[str, tuple[Any, int]]:
        data, versions = self._store.data, self._store.versions
        result: dict[str, tuple[Any, int]] = {}
        for key in keys:
            full = self._full(key)
            raw = data.get(full)
            result[key] = (None if raw is None else decode(raw), versions.get(full, 0))
        return result

    async def commit_if_unchanged(
        self,
        expected: dict[str, int],
        writes: dict[str, Any],
        deletes: KeySet,
        messages: list[tuple[str, Any]],
    ) -> bool:
        versions = self._store.versions
        if any(versions.get(self._full(k), 0) != v for k, v in expected.items()):
            return False
        encoded = {k: encode(v) for k, v in writes.items()}  # encode first: fail before writing
        payloads = [(m, encode(v)) for m, v in messages]
        for key, raw in encoded.items():
            self._store.data[self._full(key)] = raw
            self._bump(self._full(key))
        for key in deletes:
            self._store.data.pop(self._full(key), None)
            self._bump(self._full(key))
        for mailbox, raw in payloads:
            self._queue(mailbox).put_nowait(raw)
        return True
