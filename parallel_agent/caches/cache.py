"""The cache contract every backend implements: a namespaced key-value store with mailboxes
and versioned reads plus conditional commits, which the engine uses for optimistic transactions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Self

KeySet = set[str]  # `set` is also a method name below, so annotations use this alias
Scope = tuple[str, str]
"""What scoped keys get before and after them: `("p:", ":s")` turns "key" into "p:key:s"."""

SEPARATOR = ":"
"""Joins a `with_prefix`/`with_suffix` scope and a key, as the framework does: `p:key`."""


class Cache(ABC):
    """Async key-value store under `prefix`. Values are JSON (Tasks round-trip as Tasks).

    Every write bumps the key's version; `read_versioned` + `commit_if_unchanged` give
    compare-and-set over several keys at once, so concurrent modules cannot lose updates.

    Keys (and mailbox names) may be scoped: `async with cache.with_prefix("p"):` makes `cache`
    itself read and write `p:key` for `key` inside the block (in this task; scopes nest), and
    `cache.with_prefix("p")` used without `async with` is a view that always does. `keys()` and
    `get_all()` list the keys of the current scope without it.
    """

    def __init__(
        self,
        prefix: str = "",
        *,
        scope: Scope = ("", ""),
        default_prefix: str = "",
        default_suffix: str = "",
    ) -> None:
        """`default_prefix`/`default_suffix` (the framework's names) start the cache inside that
        scope, as if `with_prefix(default_prefix)` were entered for good."""
        before, after = scope
        if default_prefix:
            before += default_prefix + SEPARATOR
        if default_suffix:
            after = SEPARATOR + default_suffix + after
        scope = (before, after)
        self.prefix = prefix
        self._scope: ContextVar[Scope] = ContextVar("cache_scope", default=scope)
        self._parent: Cache | None = None
        self._tokens: list[Token[Scope]] = []

    def _scoped(self, key: str) -> str:
        """`key` as stored under the current scope (relative to `prefix`)."""
        before, after = self._scope.get()
        return before + key + after

    def _unscoped(self, stored: str) -> str | None:
        """The key a stored name (relative to `prefix`) has in the current scope, or None."""
        before, after = self._scope.get()
        if len(stored) < len(before) + len(after):
            return None
        if not (stored.startswith(before) and stored.endswith(after)):
            return None
        return stored[len(before) : len(stored) - len(after)]

    @abstractmethod
    def _view(self, scope: Scope) -> Self:
        """Another handle on the same data whose default scope is `scope`."""

    def _child(self, scope: Scope) -> Self:
        view = self._view(scope)
        view._parent = self
        return view

    def with_prefix(self, prefix: str) -> Self:
        """Scope keys as `prefix:key`: a view, or with `async with`, this cache in the block."""
        before, after = self._scope.get()
        return self._child((before + prefix + SEPARATOR, after))

    def with_suffix(self, suffix: str) -> Self:
        """Scope keys as `key:suffix`, like `with_prefix`."""
        before, after = self._scope.get()
        return self._child((before, SEPARATOR + suffix + after))

    async def __aenter__(self) -> Cache:
        """Entering a `with_prefix`/`with_suffix` view scopes the cache it came from."""
        if self._parent is None:
            return self
        self._tokens.append(self._parent._scope.set(self._scope.get()))
        return self._parent

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._parent is not None and self._tokens:
            self._parent._scope.reset(self._tokens.pop())

    @abstractmethod
    async def get(self, key: str, default: Any = None) -> Any:
        """The value under `key`, or `default` when absent."""

    @abstractmethod
    async def set(self, key: str, value: Any) -> None:
        """Store `value` under `key`."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key` (no error when absent)."""

    @abstractmethod
    async def keys(self) -> KeySet:
        """Keys under this prefix, without the prefix."""

    @abstractmethod
    async def get_all(self) -> dict[str, Any]:
        """Every key under this prefix with its value, read as one snapshot."""

    @abstractmethod
    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The present ones among `keys`, read as one consistent snapshot."""

    @abstractmethod
    async def clear(self) -> None:
        """Delete everything under this prefix, and nothing else."""

    @abstractmethod
    async def publish_to_mailbox(self, mailbox: str, value: Any) -> None:
        """Append `value` to the FIFO `mailbox`."""

    @abstractmethod
    async def get_message(self, mailbox: str, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Pop the oldest message; wait up to `timeout` seconds (None: do not wait). None if empty."""

    @abstractmethod
    async def peek_mailbox(self, mailbox: str) -> list[Any]:
        """Every message in `mailbox`, oldest first, without removing any (a broadcast read)."""

    @abstractmethod
    async def read_versioned(self, keys: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """`{key: (value, version)}` for every requested key (absent: `(None, version)`)."""

    @abstractmethod
    async def commit_if_unchanged(
        self,
        expected: dict[str, int],
        writes: dict[str, Any],
        deletes: KeySet,
        messages: list[tuple[str, Any]],
    ) -> bool:
        """Atomically apply writes, deletes and messages iff every key in `expected` still has
        that version; return whether it did."""

    async def close(self) -> None:
        """Release connections; the default has nothing to release."""
        return None
