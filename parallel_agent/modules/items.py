"""Applying an expression or a sync callable to the items of one chunk, synchronously.

Shared by the in-process processors (on a thread) and the worker processes of `processes: N`, which
import only this (no asyncio) so that they start fast.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from parallel_agent.errors import ConditionError


@dataclass(frozen=True)
class ItemError:
    """One record that failed: its 1-based record number, the input record, and the error."""

    record: int
    error: str
    input: Any

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record, "error": self.error, "input": self.input}


@dataclass
class ChunkOutcome:
    """What a processor made of one chunk."""

    outputs: list[Any] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    encoded: bytes | None = None
    """The outputs already encoded as JSON Lines (by a worker process), instead of `outputs`."""
    unencodable: list[tuple[int, str]] = field(default_factory=list)
    """With `encoded`: positions of outputs that JSON could not hold, and why."""
    origins: list[int] | None = None
    """Positions (in the chunk) of the items the outputs came from, when some items gave none (a
    filter dropped them, or they failed); None: one output per item, in order."""
    partials: str | None = None
    """The consuming aggregates' partials of these outputs (JSON text), computed with them."""


def origins_without(count: int, skipped: list[int]) -> list[int] | None:
    """`ChunkOutcome.origins` for a chunk of `count` items of which `skipped` gave no output."""
    if not skipped:
        return None
    left_out = set(skipped)
    return [position for position in range(count) if position not in left_out]


class ChunkFailure(Exception):
    """The whole chunk failed (command exit status, wrong output); retried like a timeout."""


def describe(exc: BaseException) -> str:
    """`KeyError: 'x'`; an expression's error already starts with the error it wraps."""
    text = str(exc)
    if isinstance(exc, ConditionError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_identity(expr: str) -> bool:
    """`expr` is `item` alone: a map that passes each item through, no interpreter needed."""
    try:
        body = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return False
    return isinstance(body, ast.Name) and body.id == "item"


def evaluate_items(
    evaluate: Callable[[dict[str, Any]], Any],
    records: list[Any],
    numbers: Sequence[int],
    params: dict[str, Any],
    keep_if_true: bool,
) -> ChunkOutcome:
    """An expression per item (`evaluate` takes the names it sees); failures are per item.
    `numbers` are the items' 1-based input record numbers: `record` in the expression, the number
    failures are reported under; `index` is the same position 0-based (`record - 1`)."""
    outcome = ChunkOutcome()
    outputs, errors = outcome.outputs, outcome.errors
    skipped: list[int] = []
    for offset, item in enumerate(records):
        number = numbers[offset]
        try:
            value = evaluate(
                {"item": item, "record": number, "index": number - 1, "params": params}
            )
        except Exception as exc:  # a failing item is recorded, never fatal here
            errors.append(ItemError(number, describe(exc), item))
            skipped.append(offset)
            continue
        if not keep_if_true:
            outputs.append(value)
        elif value:
            outputs.append(item)
        else:
            skipped.append(offset)
    outcome.origins = origins_without(len(records), skipped)
    return outcome


def call_items(
    function: Callable[[Any], Any], records: list[Any], numbers: Sequence[int], keep_if_true: bool
) -> ChunkOutcome:
    """A sync function per item; failures are per item, under the item's record number."""
    outcome = ChunkOutcome()
    outputs, errors = outcome.outputs, outcome.errors
    skipped: list[int] = []
    for offset, item in enumerate(records):
        try:
            value = function(item)
            if not keep_if_true:
                outputs.append(value)
            elif value:  # a truth test can raise too: a failure of this item, as in-process
                outputs.append(item)
            else:
                skipped.append(offset)
        except Exception as exc:  # recorded per item
            errors.append(ItemError(numbers[offset], describe(exc), item))
            skipped.append(offset)
    outcome.origins = origins_without(len(records), skipped)
    return outcome


def span(numbers: Sequence[int]) -> str:
    """The records of a chunk, for messages: "records 11-20"."""
    if not numbers:
        return "no records"
    return f"records {numbers[0]}-{numbers[-1]}"


def batch_outcome(
    what: str, records: list[Any], numbers: Sequence[int], values: Any, keep_if_true: bool
) -> ChunkOutcome:
    """What a `batch: true` function returned for a chunk: one value per record, or a failure."""
    values = list(values)
    if len(values) != len(records):
        raise ChunkFailure(
            f"{what}: batch function returned {len(values)} results for "
            f"{len(records)} records ({span(numbers)})"
        )
    if not keep_if_true:
        return ChunkOutcome(outputs=values)
    outcome = ChunkOutcome()
    skipped: list[int] = []
    for offset, (item, value) in enumerate(zip(records, values, strict=True)):
        if value:
            outcome.outputs.append(item)
        else:
            skipped.append(offset)
    outcome.origins = origins_without(len(records), skipped)
    return outcome
