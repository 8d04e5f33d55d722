"""Taking the coordinator lock of a run whose coordinator died on another host.

A live coordinator renews its lock every TTL/3. A lock not renewed for longer than that (plus a
slack for a busy machine) belongs to a coordinator that is dead, frozen or cut off: waiting for it
to expire is safe: the lock is only taken once it expired, and an expired lock cannot be renewed
by its old holder (`renew_lock` fails). A renewal seen while waiting means the holder is alive:
the caller then refuses (exit 6). The whole wait is bounded by the TTL plus the slack.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Literal

from parallel_agent.store import RunStore

COORDINATOR_TTL_S = 30.0
"""The coordinator lock's time to live; its holder renews it every third of it."""

POLL_S = 0.5
"""How often the lock is read while waiting: a renewal shows as its expiry moving later."""

CLOCK_EPSILON_S = 0.02
"""Rounding of the store's time left (Redis PTTL is in milliseconds) and clock rate skew."""

LockWait = Literal["taken", "renewed", "taken by another", "timed out"]


def renewal_slack(ttl_s: float) -> float:
    """How late a renewal may be before its holder counts as not renewing."""
    return ttl_s / 10


def holder_is_here(owner: str) -> bool:
    """True when `owner` ("host:pid:nonce") names a process of this machine."""
    host, _, rest = owner.partition(":")
    return host == socket.gethostname() and rest.partition(":")[0].isdigit()


def holder_is_dead(owner: str) -> bool:
    """True when `owner` ("host:pid:nonce") names a process of this machine that no longer runs."""
    if not holder_is_here(owner):
        return False
    pid_text = owner.split(":")[1]
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def live_coordinator(
    store: RunStore, task_id: str, ttl_s: float = COORDINATOR_TTL_S
) -> str | None:
    """The lock's holder if it is alive as far as one can tell: a process of this machine that
    runs, or one elsewhere that renewed the lock within a third of its TTL plus the slack."""
    state = await store.lock_state(task_id)
    if state is None:
        return None
    holder, left = state
    if holder_is_here(holder):
        return None if holder_is_dead(holder) else holder
    renewed_ago = ttl_s - left
    return holder if renewed_ago <= ttl_s / 3 + renewal_slack(ttl_s) else None


async def _read(store: RunStore, task_id: str) -> tuple[str, float, float] | None:
    """The holder and the earliest and latest local instants its lock expires at (the time left
    was read somewhere between the two clock readings)."""
    before = time.monotonic()
    state = await store.lock_state(task_id)
    after = time.monotonic()
    return None if state is None else (state[0], before + state[1], after + state[1])


async def take_stale_lock(
    store: RunStore,
    task_id: str,
    owner: str,
    ttl_s: float,
    say: Callable[[str], None],
) -> LockWait:
    """Acquire the lock for `owner` once the other holder's lock expires ("taken"); stop as soon
    as the holder renews it ("renewed": it is alive) or another process takes it, or after
    TTL + slack ("timed out")."""
    deadline = time.monotonic() + ttl_s + renewal_slack(ttl_s)
    first = await _read(store, task_id)
    if first is None:
        return "taken" if await store.acquire_lock(task_id, owner, ttl_s) else "taken by another"
    holder, _, latest_expiry = first
    left = max(0.0, latest_expiry - time.monotonic())
    say(
        f"task '{task_id}' is locked by coordinator {holder}, last renewed "
        f"{max(0.0, ttl_s - left):.0f} s ago: waiting up to {left:.0f} s for the lock to "
        f"expire (a live coordinator renews it every {ttl_s / 3:.0f} s, which ends the wait)"
    )
    while time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_S, max(0.01, latest_expiry - time.monotonic())))
        state = await _read(store, task_id)
        if state is None:
            if await store.acquire_lock(task_id, owner, ttl_s):
                return "taken"
            state = await _read(store, task_id)
            if state is None:
                continue
        if state[0] != holder:
            return "taken by another"
        if state[1] > latest_expiry + CLOCK_EPSILON_S:
            return "renewed"
        latest_expiry = state[2]
    return "timed out"
