"""Node states that tell the truth: the engine knows whether a node's modules returned, not whether
its items succeeded or a stop cut it short. `NodeStates` sits between the engine and the displays
and turns each `NodeFinished` into one of `events.NODE_STATES`, from the chunk events it has seen
and the counts the store held when the node started (`ChunksPlanned`).

- succeeded: every chunk finished and no item failed;
- partial: some items (or chunks) failed, some succeeded;
- failed: the node raised, or every item that reached it failed;
- interrupted / cancelled: a signal or `pagent cancel` stopped it before its chunks were done;
  a stop for another reason (`--max-failures`, `on_error: stop`, an error) makes it failed;
- skipped: its condition was false, or an upstream node failed;
- not reached: the run stopped before the node started.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from parallel_agent.events import (
    ChunkDone,
    ChunkFailed,
    ChunksPlanned,
    Event,
    EventSink,
    NodeFinished,
    NodeStarted,
)

NOT_CHOSEN = "not run: no branch chose it"
#: The state of a node that a stop of this kind left unfinished.
CUT_SHORT = {"interrupt": "interrupted", "cancel": "cancelled"}


@dataclass
class _Tally:
    planned: int | None = None
    chunks_finished: int = 0
    items_ok: int = 0
    items_failed: int = 0
    chunks_failed: int = 0
    started_after_stop: bool = False


class NodeStates(EventSink):
    """Forwards every event to `downstream`, with `NodeFinished.outcome` made truthful.

    `stop_kind` returns why the run is stopping (None while it is not); `chunked` names the nodes
    that work in chunks (set once the pipeline is built)."""

    def __init__(self, downstream: EventSink, stop_kind: Callable[[], str | None]) -> None:
        self.downstream = downstream
        self.stop_kind = stop_kind
        self.chunked: frozenset[str] = frozenset()
        self.tallies: dict[str, _Tally] = {}
        self.states: dict[str, str] = {}

    def _tally(self, node: str) -> _Tally:
        return self.tallies.setdefault(node, _Tally())

    def emit(self, event: Event) -> None:
        if isinstance(event, ChunksPlanned):
            tally = self._tally(event.node)
            tally.planned = event.chunks
            tally.chunks_finished = event.chunks_done + event.chunks_failed
            tally.items_ok = event.items_done
            tally.items_failed = event.items_failed
            tally.chunks_failed = event.chunks_failed
        elif isinstance(event, ChunkDone):
            tally = self._tally(event.node)
            tally.chunks_finished += 1
            tally.items_ok += event.items - event.failed_items
            tally.items_failed += event.failed_items
        elif isinstance(event, ChunkFailed) and not event.will_retry:
            tally = self._tally(event.node)
            tally.chunks_finished += 1
            tally.chunks_failed += 1
        elif isinstance(event, NodeStarted):
            self._tally(event.node).started_after_stop = self.stop_kind() is not None
        elif isinstance(event, NodeFinished):
            event = self._truthful(event)
            self.states[event.node] = event.outcome
        self.downstream.emit(event)

    def _truthful(self, event: NodeFinished) -> NodeFinished:
        if event.outcome != "succeeded":
            return event
        state = self.state_of(event.node)
        if state == event.outcome:
            return event
        return NodeFinished(
            at=event.at,
            node=event.node,
            outcome=state,
            duration_s=event.duration_s,
            error=event.error,
        )

    def state_of(self, node: str) -> str:
        """The state of a node whose modules returned."""
        tally = self.tallies.get(node) or _Tally()
        kind = self.stop_kind()
        if tally.started_after_stop:
            return "not reached"
        if node not in self.chunked:
            return "succeeded"
        unfinished = tally.planned is None or tally.chunks_finished < tally.planned
        if kind is not None and unfinished:
            return CUT_SHORT.get(kind, "failed")
        if not (tally.items_failed or tally.chunks_failed):
            return "succeeded"
        return "partial" if tally.items_ok else "failed"

    def not_reached(self, nodes: Iterable[str]) -> None:
        """Announce the nodes that never finished a visit (the run stopped before them)."""
        for node in nodes:
            if node not in self.states:
                self.emit(NodeFinished(at=time.time(), node=node, outcome="not reached"))

    def not_chosen(self, nodes: Iterable[str]) -> None:
        """Announce the nodes a run that went to its end never visited: branch targets no
        branch chose, and what lies downstream of them."""
        for node in nodes:
            if node not in self.states:
                self.emit(
                    NodeFinished(at=time.time(), node=node, outcome="skipped", error=NOT_CHOSEN)
                )

    def close(self) -> None:
        self.downstream.close()
