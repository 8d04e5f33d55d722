"""What every application service shares: the store URL, the run lookup, the input's fingerprint."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from parallel_agent.digest import file_sha256
from parallel_agent.errors import InputDataError, StoreError, UsageError
from parallel_agent.modules.context import (
    RUN_STOP_KEY,
    RUN_STOP_KIND_KEY,
    RunContext,
    wait_or_timeout,
)
from parallel_agent.store import default_store_url, open_store
from parallel_agent.store.base import RunInfo, RunStore

T = TypeVar("T")

#: What a task id may be: it names Redis keys, appears in file names and log lines.
TASK_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

#: Run states after which nothing more happens to a run (until a resume).
FINISHED = {"complete", "partial_failure", "no_output", "failed", "cancelled"}
#: Run states in which chunks are worked; any other makes every process of the run stop.
WORKING_STATES = frozenset({"waiting", "executing"})
#: Longest pause between two looks at a run's stored state by one of its processes.
MAX_WATCH_S = 5.0


def new_task_id() -> str:
    """A task id that sorts by start time and is unique enough to share a Redis."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def check_task_id(task_id: str) -> str:
    """Refuse (UsageError) a task id that is not 1-128 letters, digits, '.', '_' or '-', or that
    starts with '.'."""
    if TASK_ID.fullmatch(task_id) is None:
        raise UsageError(
            f"invalid task id {task_id!r}: use 1 to 128 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return task_id


def resolve_store_url(url: str | None) -> str:
    """`--store`, else `PAGENT_STORE`, else the embedded SQLite file under the user's state folder."""
    return url or os.environ.get("PAGENT_STORE") or default_store_url()


def store_file(url: str) -> str | None:
    """The file an embedded SQLite store lives in (outputs must never replace it), else None."""
    if not url.startswith("sqlite://"):
        return None
    path = url[len("sqlite://") :].split("?", 1)[0]
    return path or None


async def with_store(url: str | None, action: Callable[[RunStore], Awaitable[T]]) -> T:
    store = open_store(resolve_store_url(url))
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


async def require_run(store: RunStore, task_id: str) -> RunInfo:
    info = await store.get_run(check_task_id(task_id))
    if info is None:
        raise UsageError(f"unknown task id '{task_id}' in {store.url}")
    return info


def check_input_unchanged(info: RunInfo) -> None:
    """Refuse (InputDataError) an input file that is gone or differs from the one the run read."""
    path = info.input_path
    assert path is not None
    if not Path(path).is_file():
        raise InputDataError(f"the input of task '{info.task_id}' is gone: {path}")
    changed = InputDataError(
        f"the input of task '{info.task_id}' changed since it started: {path} (its finished "
        "work came from the earlier input; start a new run, with a new --task-id)"
    )
    if info.input_size is not None and Path(path).stat().st_size != info.input_size:
        raise changed
    if info.input_hash is not None and file_sha256(path) != info.input_hash:
        raise changed


def watch_interval(leases: list[float]) -> float:
    """How often a process of a run looks at its stored state: a third of the shortest lease."""
    return min(MAX_WATCH_S, max(0.05, min(leases, default=3 * MAX_WATCH_S) / 3))


async def watch_run(ctx: RunContext, generation: str, interval: float, done: asyncio.Event) -> None:
    """Until `done`: stop this process's work on the run once the run left the working states
    (`pagent cancel`, its end), another process stopped it (`--max-failures`, `on_error: stop`
    recorded in the store), or the run is gone from the store (state lost)."""
    while not await wait_or_timeout(done, interval):
        try:
            # gone or recreated: StateLostError; on Redis it also makes every later script of
            # this process check the marker, and refuses a server that now evicts any key
            current = await ctx.store.check_generation(ctx.task_id, generation)
        except StoreError as exc:
            ctx.fail_run(exc)
            return
        if current.extra.get(RUN_STOP_KEY):  # before the status its coordinator then sets
            kind = str(current.extra.get(RUN_STOP_KIND_KEY) or "error")
            ctx.request_stop(str(current.extra[RUN_STOP_KEY]), kind=kind)
            return
        if current.status not in WORKING_STATES:
            cancelled = current.status == "cancelled"
            ctx.request_stop(current.status, kind="cancel" if cancelled else "error")
            return
