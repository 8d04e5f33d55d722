"""The one place that turns errors into a line on stderr and an exit code (no traceback unless --debug)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from parallel_agent.errors import PagentError

#: Exit codes scripts rely on; the README documents the same table.
EXIT_OK = 0
EXIT_FAILED_ITEMS = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_STORE = 4
EXIT_OUTPUT = 5
EXIT_BUSY = 6
EXIT_INTERRUPTED = 130


def say_error(message: str) -> None:
    """One `pagent: error:` line per problem (a pipeline may have several)."""
    for line in message.splitlines() or [message]:
        sys.stderr.write(f"pagent: error: {line}\n")
    sys.stderr.flush()


def say_stop_reason(exit_code: int, error: str | None) -> None:
    """Why a run ended short (a loop limit, `--max-failures`, a cancel, a failed node), as an
    error line: printed also under `--quiet`, since errors are never quiet."""
    if exit_code != EXIT_OK and error:
        say_error(error)


@contextmanager
def handled_errors(debug: bool) -> Iterator[None]:
    """Map PagentError to its exit code; anything unexpected exits 1 with one line (traceback with --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except PagentError as exc:
        if debug:
            raise
        say_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        say_error("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if debug:
            raise
        say_error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        raise typer.Exit(EXIT_FAILED_ITEMS) from None
