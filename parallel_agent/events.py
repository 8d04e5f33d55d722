"""Run events: what the engine and the application services report, and the no-op sink that displays override.

The engine and the application services never print; they call an `EventSink`. The display layer (Rich live view,
plain CI lines, JSON Lines events) subclasses it and overrides what it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The words every display uses for a node's state, in this order of precedence.
NODE_STATES = (
    "succeeded",
    "partial",
    "failed",
    "interrupted",
    "cancelled",
    "skipped",
    "not reached",
)


@dataclass(frozen=True)
class Event:
    """Base of all events; `kind` names the event in the JSON Lines stream."""

    kind: str = field(init=False, default="event")
    at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunStarted(Event):
    kind: str = field(init=False, default="run_started")
    task_id: str = ""
    pipeline: str = ""
    nodes: tuple[str, ...] = ()
    total_items: int | None = None
    resumed: bool = False
    """True when the task existed already: work done before is counted in `ChunksPlanned`."""


@dataclass(frozen=True)
class NodeStarted(Event):
    kind: str = field(init=False, default="node_started")
    node: str = ""
    visit: int = 1


@dataclass(frozen=True)
class NodeFinished(Event):
    kind: str = field(init=False, default="node_finished")
    node: str = ""
    #: succeeded | partial | failed | interrupted | cancelled | skipped | not reached (NODE_STATES)
    outcome: str = ""
    duration_s: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class ChunksPlanned(Event):
    kind: str = field(init=False, default="chunks_planned")
    node: str = ""
    chunks: int = 0
    items: int = 0
    #: chunks and items finished before this coordinator started (a resume), from the store
    chunks_done: int = 0
    chunks_failed: int = 0
    items_done: int = 0
    items_failed: int = 0


@dataclass(frozen=True)
class ChunkStarted(Event):
    kind: str = field(init=False, default="chunk_started")
    node: str = ""
    chunk: int = 0
    items: int = 0
    attempt: int = 1


@dataclass(frozen=True)
class ChunkDone(Event):
    kind: str = field(init=False, default="chunk_done")
    node: str = ""
    chunk: int = 0
    items: int = 0
    failed_items: int = 0
    attempt: int = 1
    duration_s: float = 0.0


@dataclass(frozen=True)
class ChunkFailed(Event):
    kind: str = field(init=False, default="chunk_failed")
    node: str = ""
    chunk: int = 0
    attempt: int = 1
    error: str = ""
    will_retry: bool = False
    duration_s: float = 0.0


@dataclass(frozen=True)
class ItemFailed(Event):
    kind: str = field(init=False, default="item_failed")
    node: str = ""
    record: int = 0
    error: str = ""


@dataclass(frozen=True)
class NodeProgress(Event):
    """A node's counts as the run store has them, from every process of the run: a coordinator
    on a shared store sends them so its display counts the chunks `pagent worker`s commit."""

    kind: str = field(init=False, default="node_progress")
    node: str = ""
    chunks_done: int = 0
    items_done: int = 0
    items_failed: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class RunFinished(Event):
    kind: str = field(init=False, default="run_finished")
    task_id: str = ""
    status: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


class EventSink:
    """Receives run events; every hook is a no-op so subclasses override only what they show."""

    def emit(self, event: Event) -> None:
        """Dispatch to `on_<kind>`; override to receive every event (e.g. a JSON Lines writer)."""
        handler = getattr(self, f"on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def close(self) -> None:
        """Flush and release whatever the sink holds."""


class MultiSink(EventSink):
    """Fans one event stream out to several sinks."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
