"""Options that several commands share, declared once so their names and help stay the same."""

# Annotations stay objects here (no `from __future__ import annotations`): Typer reads every
# command's signature on each command line, and a string annotation costs it an eval (10 ms).

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import typer

from parallel_agent.cli.errors import say_stop_reason
from parallel_agent.errors import InterruptedRunError, OutputError, UsageError
from parallel_agent.jsonl import ascii_text

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="PAGENT_STORE",
        metavar="URL",
        help="Run store URL: sqlite:///path.db, redis://host:6379/0, memory:// "
        "(default: the embedded SQLite file).",
    ),
]

FailedOutputOption = Annotated[
    str | None,
    typer.Option(
        "--failed-output",
        metavar="PATH",
        help="Write the failed input records to PATH, in the input's format, to run again.",
    ),
]

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print the JSON summary (docs/json.md) on stdout at the end."),
]

SummaryOption = Annotated[
    str | None,
    typer.Option(
        "--summary",
        metavar="PATH",
        help="Write the JSON summary to PATH at the end (works with --output -).",
    ),
]


def check_stdout_clash(*, output: str | None, as_json: bool, events: str | None = None) -> None:
    """Refuse two writers on stdout: results (`--output -`), the summary (`--json`) and events
    (`--events -`) would be mixed into one stream no script could take apart."""
    writers = [
        name
        for name, used in (
            ("--output -", output == "-"),
            ("--json", as_json),
            ("--events -", events == "-"),
        )
        if used
    ]
    if len(writers) > 1:
        raise UsageError(
            f"{' and '.join(writers)} would all write to stdout; keep one there and send the "
            "others to files (--summary PATH for the summary, --events PATH, --output PATH)"
        )


def write_summary(summary: dict[str, Any], *, as_json: bool, path: str | None) -> None:
    """`--json` on stdout and `--summary PATH` in a file: the same document."""
    text = ascii_text(summary) + "\n"
    if path is not None:
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(
                f"cannot write the summary to {path}: {exc.strerror or exc}"
            ) from None
    if as_json:
        sys.stdout.write(text)
        sys.stdout.flush()


class _Sink(Protocol):
    def close(self) -> None: ...


def report_run(
    sink: _Sink, start: Callable[[], Any], *, as_json: bool, summary_path: str | None
) -> NoReturn:
    """Run or resume with `sink` showing progress, then close it before anything is written to
    stdout: the summary (an interrupted run's too), the stop reason, the exit code."""
    try:
        summary = start()
    except InterruptedRunError as exc:
        sink.close()  # first: the live display must be off before stdout is written
        if exc.summary is not None:
            write_summary(exc.summary, as_json=as_json, path=summary_path)
        raise
    except BaseException:
        sink.close()
        raise
    sink.close()
    write_summary(summary.to_dict(), as_json=as_json, path=summary_path)
    say_stop_reason(summary.exit_code, summary.error)
    raise typer.Exit(summary.exit_code)
