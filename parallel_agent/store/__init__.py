"""Pick a run store by URL. Backends are imported lazily so `memory://` and SQLite never load redis.

    memory://                       in this process only (tests, throw-away runs)
    sqlite:///abs/path/state.db     embedded default; `sqlite://relative.db` is relative to the cwd
    redis://[[user]:password@]host[:port][/db]   (also rediss:// for TLS)
    unix://[[user]:password@]/path/redis.sock[?db=N]

Query options (Redis): connect_timeout, socket_timeout and retry_budget in seconds, finished_ttl in
seconds (how long a finished run's keys live), max_connections, redis-py's ssl_*; any other is a
usage error. SQLite: retry_budget.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from parallel_agent.errors import UsageError
from parallel_agent.store.base import RunStore, mask_url

__all__ = ["RunStore", "default_store_url", "mask_url", "open_store"]

SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix")


def default_store_url() -> str:
    """The embedded SQLite file under the user's state folder ($XDG_STATE_HOME/pagent/state.db)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite://{Path(base).expanduser().resolve() / 'pagent' / 'state.db'}"


def open_store(url: str, *, prefix: str = "pagent") -> RunStore:
    """Build the store for `url` (not yet connected: call `await store.open()`).

    `prefix` namespaces Redis keys (`<prefix>:<task_id>:...`); other backends ignore it. A Redis
    URL may carry its own, `redis://host:6379/0?prefix=team-a`, which wins.
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "memory":
        from parallel_agent.store.memory import MemoryStore

        return MemoryStore(url)
    if scheme == "sqlite":
        from parallel_agent.store.sqlite import SqliteStore

        return SqliteStore(url)
    if scheme in {"redis", "rediss", "unix"}:
        from parallel_agent.store.redis import RedisStore

        url, prefix = _take_prefix(url, prefix)
        return RedisStore(url, prefix=prefix)
    raise UsageError(
        f"unknown store URL {mask_url(url)!r}; use sqlite:///path/to/state.db, "
        "redis://host:6379/0, rediss://..., unix:///path/redis.sock or memory://"
    )


def _take_prefix(url: str, prefix: str) -> tuple[str, str]:
    """Split a `prefix=` query parameter off a Redis URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    chosen = [value for key, value in query if key == "prefix"]
    if not chosen:
        return url, prefix
    rest = urlencode([(key, value) for key, value in query if key != "prefix"])
    return urlunsplit(parts._replace(query=rest)), chosen[-1]
