"""`--events PATH|-`: every run event as one JSON object per line, for scripts and dashboards."""

from __future__ import annotations

import sys
import time
from typing import IO

import orjson

from parallel_agent.errors import OutputError
from parallel_agent.events import Event, EventSink

#: Longest time an event may sit in the buffer before it is flushed.
FLUSH_EVERY_S = 1.0


class JsonLinesEvents(EventSink):
    """Writes events as JSON Lines, buffered and flushed at least every second and at the end."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.owned = target != "-"
        try:
            self.stream: IO[bytes] = open(target, "ab") if self.owned else sys.stdout.buffer  # noqa: SIM115
        except OSError as exc:
            raise self._failed(exc) from None
        self.last_flush = time.monotonic()

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write {self.target}: {exc.strerror or exc}")

    def emit(self, event: Event) -> None:
        try:
            self.stream.write(orjson.dumps(event.to_dict()) + b"\n")
            now = time.monotonic()
            if now - self.last_flush >= FLUSH_EVERY_S or event.kind in (
                "run_started",
                "notice",  # it says why the run waits: a reader needs it now
                "run_finished",
            ):
                self.stream.flush()
                self.last_flush = now
        except OSError as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        try:
            self.stream.flush()
            if self.owned:
                self.stream.close()
        except OSError as exc:
            raise self._failed(exc) from None
