"""The cache contract every backend implements: a namespaced key-value store with mailboxes
and versioned reads plus conditional commits, which the engine uses for optimistic transactions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Self

KeySet = set[str]  # `set` is also a method name below, so annotations use this alias


class Cache(ABC):
    """Async key-value store under `prefix`. Values are JSON (Tasks round-trip as Tasks).

    Every write bumps the key's version; `read_versioned` + `commit_if_unchanged` give
    compare-and-set over several keys at once, so concurrent modules cannot lose updates.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

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

    @abstractmethod
    def with_prefix(self, prefix: str) -> Self:
        """A view sharing this backend whose keys live under `self.prefix + prefix`."""

    async def close(self) -> None:
        """Release connections; the default has nothing to release."""
        return None
