"""Cache backends. RedisCache is imported lazily so redis is only loaded when used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from parallel_agent.caches.cache import Cache
from parallel_agent.caches.memory_cache import MemoryCache

if TYPE_CHECKING:
    from parallel_agent.caches.redis_cache import RedisCache

__all__ = ["Cache", "MemoryCache", "RedisCache"]


def __getattr__(name: str) -> Any:
    if name == "RedisCache":
        from parallel_agent.caches.redis_cache import RedisCache

        return RedisCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
