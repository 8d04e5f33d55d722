"""Rendering of run events for people (stderr) and machines (JSON Lines)."""

from __future__ import annotations

import sys
from typing import TextIO

from parallel_agent.display.plain import PlainLines
from parallel_agent.events import EventSink


def make_sink(
    *, quiet: bool = False, progress_interval: float = 10.0, stream: TextIO | None = None
) -> EventSink:
    """The sink for human output on stderr; `quiet` keeps only errors (which the CLI prints itself)."""
    if quiet:
        return EventSink()
    return PlainLines(stream or sys.stderr, interval=progress_interval)


__all__ = ["PlainLines", "make_sink"]
