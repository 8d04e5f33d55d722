"""Rendering of run events for people (stderr) and machines (JSON Lines)."""

from __future__ import annotations

import sys
from typing import TextIO

from parallel_agent.display.events_file import JsonLinesEvents
from parallel_agent.display.plain import PlainLines
from parallel_agent.events import EventSink, MultiSink


def make_sink(
    *,
    quiet: bool = False,
    progress_interval: float = 10.0,
    stream: TextIO | None = None,
    events_path: str | None = None,
) -> EventSink:
    """Human progress on stderr (none when `quiet`), plus JSON Lines events when `events_path`."""
    sinks: list[EventSink] = []
    target = stream or sys.stderr
    if not quiet:
        if stream is None and target.isatty():
            from rich.console import Console

            from parallel_agent.display.live import LiveDisplay

            sinks.append(LiveDisplay(Console(stderr=True)))
        else:
            sinks.append(PlainLines(target, interval=progress_interval))
    if events_path is not None:
        sinks.append(JsonLinesEvents(events_path))
    return MultiSink(*sinks)


__all__ = ["JsonLinesEvents", "PlainLines", "make_sink"]
