"""Shared fixtures: a real Redis (skipped on a laptop without one, a failure when CI=true) with a
unique key prefix per test that is deleted afterwards. Never FLUSHALL: the server is shared."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

REDIS_URL = os.environ.get("PAGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# A runner may start the suite with stop signals ignored (a background job of a non-interactive
# shell ignores SIGINT). pagent keeps an ignored signal ignored on purpose (`nohup`), so the
# processes these tests start and then interrupt must not inherit that: a signal handled here is
# reset to its default in every child at exec.
for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_signum) is signal.SIG_IGN:
        signal.signal(
            _signum, signal.default_int_handler if _signum == signal.SIGINT else signal.SIG_DFL
        )


def _redis_reachable(url: str) -> str | None:
    """Return None when Redis answers PING, else the reason it does not."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        client.ping()
        client.close()
    except Exception as exc:  # any failure means "not reachable"; the reason is reported
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis server; skip the test without one, fail in CI."""
    reason = _redis_reachable(REDIS_URL)
    if reason is not None:
        message = f"Redis at {REDIS_URL} is not reachable ({reason})"
        if IN_CI:
            pytest.fail(f"{message}; CI=true requires it")
        pytest.skip(message)
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A key prefix unique to this test."""
    return f"pagent-test:{uuid.uuid4().hex}:"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (SCAN + UNLINK), and nothing else."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=500))
        while batch:
            client.unlink(*batch[:500])
            batch = batch[500:]
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_url: str, key_prefix: str) -> Iterator[str]:
    """A unique prefix on the real Redis, cleaned up after the test."""
    yield key_prefix
    delete_prefix(redis_url, key_prefix)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    """An asyncio Redis client on the real server."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
