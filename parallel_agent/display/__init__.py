"""Rendering of run events for people (stderr) and machines (JSON Lines)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from parallel_agent.display.events_file import JsonLinesEvents
from parallel_agent.display.plain import PlainLines
from parallel_agent.events import EventSink, MultiSink

if TYPE_CHECKING:
    from rich.console import Console


def no_color(environ: Mapping[str, str] | None = None) -> bool:
    """True when `NO_COLOR` is set to a non-empty value (https://no-color.org)."""
    return bool((os.environ if environ is None else environ).get("NO_COLOR"))


def make_console(
    file: TextIO | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    force_terminal: bool | None = None,
    width: int | None = None,
) -> Console:
    """A Rich console for human output: stderr unless `file`; no colour under NO_COLOR."""
    from rich.console import Console

    return Console(
        file=file,
        stderr=file is None,
        no_color=no_color(environ),
        force_terminal=force_terminal,
        width=width,
    )


def make_sink(
    *,
    quiet: bool = False,
    progress_interval: float = 10.0,
    stream: TextIO | None = None,
    events_path: str | None = None,
) -> EventSink:
    """Human progress on stderr (none when `quiet`), plus JSON Lines events when `events_path`.

    A terminal gets the live display; anything else (a file, a pipe, `TERM=dumb`) plain lines.
    """
    sinks: list[EventSink] = []
    target = stream or sys.stderr
    if not quiet:
        if stream is None and target.isatty() and os.environ.get("TERM") != "dumb":
            from parallel_agent.display.live import LiveDisplay

            sinks.append(LiveDisplay(make_console()))
        else:
            sinks.append(PlainLines(target, interval=progress_interval))
    if events_path is not None:
        sinks.append(JsonLinesEvents(events_path))
    return MultiSink(*sinks)


__all__ = ["JsonLinesEvents", "PlainLines", "make_console", "make_sink", "no_color"]
