"""`parallel_agent.run(...)`: run a pipeline from a notebook or a script, like `pagent run`.

Keyword arguments instead of options, Python values for params, the summary back (and the results
on request) instead of exit codes: an error raises the same `PagentError` the CLI turns into an
exit code. It works where an event loop is already running (Jupyter): the run then gets a thread
of its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from parallel_agent.app.run import RunOptions, run_pipeline
from parallel_agent.app.summary import RunSummary
from parallel_agent.errors import UsageError
from parallel_agent.events import EventSink
from parallel_agent.jsonl import decode_lines

T = TypeVar("T")


def run(
    pipeline: str | Path,
    data: str | Path | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    results: bool = False,
    store: str | None = None,
    task_id: str | None = None,
    head: int | None = None,
    max_failures: int | None = None,
    failed_output: str | Path | None = None,
    events: EventSink | None = None,
) -> RunSummary:
    """Run `pipeline` over `data` (a JSON, JSON Lines or CSV file) and return its summary.

    `params` set `task.params` (Python values), `overrides` are `--set KEY=VALUE` strings;
    `output` writes the results to a file; `results=True` returns them instead, as
    `summary.results` (a list in input order, or the aggregate's value in a one-item list; None
    when the run wrote no output: see `summary.status`).
    `store` is a store URL (default: the same SQLite file as the CLI; `"memory://"` keeps
    nothing). A run with failed items returns normally: look at `summary.status`.
    """
    if results and output is not None:
        raise UsageError("give output= to write the results, or results=True to get them back")
    sets = [*overrides, *(f"{key}={json.dumps(value)}" for key, value in (params or {}).items())]
    buffer = io.BytesIO() if results else None
    options = RunOptions(
        pipeline=str(pipeline),
        data=None if data is None else str(data),
        output="-" if results else (None if output is None else str(output)),
        output_format="jsonl" if results else None,
        task_id=task_id,
        store=store,
        overrides=sets,
        max_failures=max_failures,
        failed_output=None if failed_output is None else str(failed_output),
        head=head,
        stdout=buffer,
    )
    summary = _outside_any_event_loop(lambda: run_pipeline(options, events))
    if buffer is not None:
        # Nothing written (no_output, failed, interrupted): None, never an empty list that
        # reads like a run over nothing.
        written = summary.output is not None
        summary.results = list(decode_lines(buffer.getvalue())) if written else None
        summary.output = None
    return summary


def _outside_any_event_loop(call: Callable[[], T]) -> T:
    """`call()` here, or on a thread of its own when this thread runs an event loop (a notebook
    cell): `asyncio.run` cannot start inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed back to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="pagent-run")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value
