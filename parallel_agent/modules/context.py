"""What a built-in data module needs to know about the run it belongs to.

The run service (`app.run`) builds one `RunContext` per run and hands it to every built-in module, so modules reach
the run store, the input and the event sink without global state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from parallel_agent.errors import PagentError, StateLostError
from parallel_agent.events import Event, EventSink
from parallel_agent.modules.grouping import MergedPartials
from parallel_agent.store.base import NodeCounts, RunStore


@dataclass
class InputSource:
    """Where the records come from: a path (or `-` with an already-open binary stream) and its format."""

    path: str
    fmt: str
    data_key: str = "data"
    stream: BinaryIO | None = None
    head: int | None = None
    """Read only the first `head` records (`pagent run --head N`, to try a pipeline on a sample)."""


@dataclass
class FailureBudget:
    """Counts failed items across the whole run and trips once `--max-failures` is exceeded."""

    limit: int | None = None
    failed: int = 0

    def add(self, count: int) -> bool:
        """Record `count` more failures; True once the budget is exceeded."""
        self.failed += count
        return self.exceeded

    @property
    def exceeded(self) -> bool:
        return self.limit is not None and self.failed > self.limit


@dataclass
class RunContext:
    """Per-run state shared by the built-in modules of one pipeline."""

    task_id: str
    store: RunStore
    owner: str
    source: InputSource | None = None
    params: dict[str, Any] = field(default_factory=dict)
    events: EventSink = field(default_factory=EventSink)
    failures: FailureBudget = field(default_factory=FailureBudget)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    stop_kind: str | None = None
    """Why the run stopped early, as a word scripts can test (STOP_KINDS); `stop_reason` says it."""
    handback: asyncio.Event = field(default_factory=asyncio.Event)
    """Set HANDBACK_GRACE_S after `stop`: chunks still in flight are then abandoned and their
    leases released, so a resume (or another worker) redoes them."""
    consumers: dict[str, list[str]] = field(default_factory=dict)
    """For each data node, the data nodes that consume its output."""
    fatal: PagentError | None = None
    """An error that ends the whole run with its own exit code (bad input, store lost, ...)."""
    producers: dict[str, str] = field(default_factory=dict)
    """For each data node but the split, the data node whose output it consumes."""
    gated: frozenset[str] = frozenset()
    """Branch targets and what lies downstream of them: nodes that run only when chosen."""
    claims_chunks: bool = True
    """False on a `--workers-only` coordinator: `pagent worker` processes claim every chunk."""
    merged: dict[str, MergedPartials] = field(default_factory=dict)
    """{aggregate: the partials the split committed for it, merged as it queued them}."""
    drained: set[str] = field(default_factory=set)
    """Nodes whose queue this coordinator saw drained (every chunk done or failed)."""
    sealed: dict[str, tuple[int, int]] = field(default_factory=dict)
    """{node: (chunks, items)} of each queue this coordinator saw sealed: a store that later
    holds less, or no seal, lost writes (see `check_sealed`)."""

    def emit(self, event: Event) -> None:
        self.events.emit(event)

    def check_sealed(self, node: str, counts: NodeCounts, *, finished: bool = False) -> None:
        """Raise StateLostError when the store holds less of `node`'s queue than this
        coordinator saw sealed. A Redis that restarts from an older snapshot (or fails over to a
        lagging replica) comes back with the run's keys and marker intact, but without what was
        written since: chunks, commits, the seal. Unchecked, the run ended exit 0 with records
        missing, or waited forever for a seal it had already written. `finished`: the node's
        chunks were all done or failed, so none may be open again."""
        seen = self.sealed.get(node)
        if seen is None:
            return
        undone = finished and (counts.pending > 0 or counts.leased > 0)
        if (
            not counts.sealed
            or counts.chunks_total < seen[0]
            or counts.items_total < seen[1]
            or undone
        ):
            raise StateLostError(
                f"the store lost writes of task '{self.task_id}': node '{node}' was queued "
                f"and sealed with {seen[0]:,} chunks ({seen[1]:,} records), and the store now "
                f"holds {counts.chunks_total:,} ({counts.items_total:,})"
                f"{'' if counts.sealed else ', unsealed'}"
                f"{', with finished chunks undone' if undone else ''} (a Redis restarted from an older "
                "snapshot, or a failover to a replica that lagged?); resume it to redo what is "
                "missing"
            )

    def fail_run(self, error: PagentError) -> None:
        """Stop the run because of `error`; the run service raises it once the engine has stopped."""
        if self.fatal is None:
            self.fatal = error
        self.request_stop(str(error), kind="error")

    def request_stop(self, reason: str, kind: str = "error") -> None:
        """Ask every worker to stop claiming new chunks (first reason wins; `kind` is one of
        STOP_KINDS); chunks in flight get HANDBACK_GRACE_S to finish, then are handed back."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_kind = kind
        if not self.stop.is_set():
            self.stop.set()
            asyncio.get_running_loop().call_later(HANDBACK_GRACE_S, self.handback.set)

    async def stop_run(self, reason: str, kind: str = "error") -> None:
        """Stop the run in every process: here at once, and in the store (`extra.stop`), where
        the coordinator and each `pagent worker` look every third of a lease."""
        self.request_stop(reason, kind=kind)
        await self.store.update_run(
            self.task_id, extra={RUN_STOP_KEY: reason, RUN_STOP_KIND_KEY: kind}
        )

    @staticmethod
    def now() -> float:
        return time.time()


#: Why a run stopped before its end: Ctrl-C or a signal, `pagent cancel`, `--max-failures`,
#: `on_error: stop`, the engine's `max_total_iterations`/`max_visits`, or an error (store, input).
STOP_KINDS = ("interrupt", "cancel", "max_failures", "on_error_stop", "iteration_limit", "error")

#: Run extra keys holding why a process stopped the whole run (`--max-failures`, `on_error: stop`)
#: and that stop's kind (STOP_KINDS), for the other processes of the run.
RUN_STOP_KEY = "stop"
RUN_STOP_KIND_KEY = "stop_kind"
#: How long a background loop gets to finish its current step once told to stop.
STOP_GRACE_S = 2.0
#: How long chunks in flight get to finish once the run stops (a signal, `pagent cancel`,
#: `--max-failures`, a fatal error) before they are abandoned and handed back (README).
HANDBACK_GRACE_S = 3.0


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def wait_for_any(events: Sequence[asyncio.Event], seconds: float) -> None:
    """Wait until one of `events` is set or `seconds` pass."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def stop_loop(task: asyncio.Future[Any], done: asyncio.Event) -> None:
    """Stop a background loop that ends once `done` is set (a lease heartbeat, the coordinator
    lock): its store call in flight may finish; one still running after STOP_GRACE_S is
    cancelled. Never cancel() alone: Python 3.11's wait_for, inside redis-py, can swallow a
    cancel, which would leave the loop running (and a chunk leased) for ever. Re-raises what
    the loop failed with."""
    done.set()
    finished, _ = await asyncio.wait({task}, timeout=STOP_GRACE_S)
    if not finished:
        task.cancel()
        finished, _ = await asyncio.wait({task}, timeout=STOP_GRACE_S)
    if finished and not task.cancelled() and (error := task.exception()) is not None:
        raise error
