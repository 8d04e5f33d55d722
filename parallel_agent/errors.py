"""Every error pagent raises on purpose, with the exit code the command line maps it to.

    PagentError                      exit 1 unless a subclass says otherwise
    ├── UsageError                   2  bad arguments or options
    ├── PipelineError                2  the pipeline file or graph is invalid (cycle, unknown node, bad key)
    │   └── ConditionError           2  a condition or expression is invalid or tries to escape the sandbox
    ├── InputDataError               3  the input data is malformed (file, line, column, record number)
    ├── StoreError                   4  the run store is unreachable
    │   └── StateLostError           4  the store came back without the run's state
    ├── OutputError                  5  the output cannot be written
    ├── TaskBusyError                6  another coordinator holds the task id
    ├── InterruptedRunError          130 the run was interrupted and can be resumed
    ├── RunCancelledError            1  a claim on a run that `pagent cancel` cancelled
    ├── NodeExecutionError           1  a module failed after its retries (engine level)
    │   └── NonRetryableException    1  raised by a module to fail at once, without retries
    └── LimitExceededError           1  a loop limit (max_total_iterations, max_visits) stopped the run

Lower layers raise these; only `parallel_agent.cli` turns them into a line on stderr and an exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Location:
    """Where in a file something went wrong; every part is optional and 1-based."""

    path: str | None = None
    line: int | None = None
    column: int | None = None
    record: int | None = None

    def __str__(self) -> str:
        parts: list[str] = []
        if self.path is not None:
            parts.append(self.path)
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.column is not None:
            parts.append(f"column {self.column}")
        if self.record is not None:
            parts.append(f"record {self.record}")
        return ", ".join(parts)


class PagentError(Exception):
    """Base of every error pagent raises deliberately; carries an exit code and an optional location."""

    exit_code: int = 1

    def __init__(self, message: str, *, location: Location | None = None) -> None:
        self.message = message
        self.location = location
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.location is not None and str(self.location):
            return f"{self.location}: {self.message}"
        return self.message


class UsageError(PagentError):
    """Raised when command-line arguments or library arguments are invalid."""

    exit_code = 2


class PipelineError(PagentError):
    """Raised when a pipeline (YAML file or graph built in Python) is invalid."""

    exit_code = 2


class ConditionError(PipelineError):
    """Raised when a condition or expression cannot be compiled, fails, or tries to escape the sandbox.

    The message reads `KeyError: 'x' in expression "item['x']" (node 'parse', map)`: the short
    error type first, where it happened after; `problem` is the message without that last part."""

    def __init__(
        self, message: str, *, location: Location | None = None, problem: str | None = None
    ) -> None:
        self.problem = problem or message
        super().__init__(message, location=location)


class InputDataError(PagentError):
    """Raised when input data is malformed; the location names file, line, column and record."""

    exit_code = 3


class StoreError(PagentError):
    """Raised when the run store cannot be reached within its retry budget."""

    exit_code = 4


class StateLostError(StoreError):
    """Raised when the store answers but the run's state is gone (e.g. a Redis restart without persistence)."""


class CoordinatorLockLostError(StateLostError):
    """Raised when a coordinator's lock on its task expired, was evicted or taken: another
    coordinator may run the task now, so this one stops and records nothing."""


class OutputError(PagentError):
    """Raised when the output cannot be written; no partial file is left behind."""

    exit_code = 5


class TaskBusyError(PagentError):
    """Raised when another live coordinator holds the task id."""

    exit_code = 6


class InterruptedRunError(PagentError):
    """Raised when a run stops on SIGINT/SIGTERM/SIGHUP; its state is kept for `pagent resume`.
    `summary` is the run's summary (what `--json` prints), when it got that far."""

    exit_code = 130
    summary: dict[str, Any] | None = None


class RunCancelledError(PagentError):
    """Raised by a chunk claim once `pagent cancel` has cancelled the run: nobody takes new work."""


class NodeExecutionError(PagentError):
    """Raised when a node's module fails after its retries are used up."""


class NonRetryableException(NodeExecutionError):
    """Raised by a module to fail its node at once: the engine does not retry it."""


class LimitExceededError(PagentError):
    """Raised when a loop limit (max_total_iterations or a node's max_visits) stops the run."""
