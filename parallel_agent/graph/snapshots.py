"""Run snapshots as JSON files: what `Agent(auto_snapshot=True)` writes and `run_from_snapshot`
reads. A directory holds `agent.json` (the task, graph shape and engine state) and `cache.json`
(every cache key). Only JSON is kept: modules are code, and the graph's nodes are rebuilt by the
program before resuming.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from parallel_agent.caches.codec import decode, encode
from parallel_agent.errors import PipelineError
from parallel_agent.graph.tasks import Task

FORMAT = "pagent-snapshot/1"


@dataclass
class Snapshot:
    """Engine state before a layer ran: enough to run the rest of the graph as it would have."""

    task: Task
    graph: dict[str, list[str]]
    pending: list[str]
    """Nodes of the interrupted pass not run yet (the snapshot's layer and those after it)."""
    work: list[str]
    before: str
    """Cache fingerprint at the start of the interrupted pass (the fixpoint rule compares it)."""
    visits: dict[str, int]
    total: int
    outcome: dict[str, str]
    errors: dict[str, str]
    results: dict[str, list[Any]]
    failures: list[str]
    node_results: dict[str, Any]
    cache: dict[str, Any]


def directory(configured: Path | None) -> Path:
    """Where snapshots go: `configured`, else $PAGENT_SNAPSHOT_DIR, else <tmp>/pagent_snapshot."""
    if configured is not None:
        return configured
    env = os.environ.get("PAGENT_SNAPSHOT_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "pagent_snapshot"


def _next_number(folder: Path) -> int:
    """One more than the highest `<n>_...` snapshot in `folder`: a resumed run (another agent)
    goes on numbering instead of replacing the snapshots it came from."""
    numbers = [
        int(head)
        for entry in folder.iterdir()
        if (head := entry.name.split("_", 1)[0]).isdigit() and "_" in entry.name
    ]
    return max(numbers, default=-1) + 1


def _write_sync(state: Snapshot, folder: Path, hint: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=folder))
    try:
        body = {f.name: getattr(state, f.name) for f in fields(state) if f.name != "cache"}
        (staging / "agent.json").write_bytes(encode({"format": FORMAT, **body}))
        (staging / "cache.json").write_bytes(encode(state.cache))
        target = folder / f"{_next_number(folder)}_{hint}"
        staging.rename(target)  # a snapshot directory is complete or absent
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


async def write(state: Snapshot, folder: Path, hint: str) -> Path:
    """Write `state` as `folder/<n>_<hint>` without blocking the loop; returns that path."""
    return await asyncio.to_thread(_write_sync, state, folder, hint)


def read(path: Path) -> Snapshot:
    """Load a snapshot directory; PipelineError says what is wrong with it."""
    try:
        agent = decode((path / "agent.json").read_bytes())
        cache = decode((path / "cache.json").read_bytes())
    except OSError as exc:
        raise PipelineError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise PipelineError(f"snapshot {path} is not valid JSON: {exc}") from None
    if not isinstance(agent, dict) or agent.pop("format", None) != FORMAT:
        raise PipelineError(f"{path} is not a {FORMAT} snapshot")
    if not isinstance(cache, dict) or not isinstance(agent.get("task"), Task):
        raise PipelineError(f"snapshot {path} is incomplete")
    try:
        return Snapshot(**agent, cache=cache)
    except TypeError as exc:
        raise PipelineError(f"snapshot {path} is incomplete: {exc}") from None
