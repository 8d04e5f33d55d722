"""User reducers for the group-by tests (`function: steps_for_grouping:<name>`)."""

from __future__ import annotations

from typing import Any


class SquareSum:
    """A mergeable reducer: the sum of squares of the item's `amount` (0 when it is missing)."""

    @staticmethod
    def init() -> int:
        return 0

    @staticmethod
    def add(state: int, item: Any) -> int:
        amount = item.get("amount")
        return state + (round(amount) ** 2 if amount is not None else 0)

    @staticmethod
    def merge(a: int, b: int) -> int:
        return a + b

    @staticmethod
    def result(state: int) -> dict[str, int]:
        return {"squares": state}


def median(values: list[float]) -> float:
    """A plain function over the group's values (kept whole)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class Pids:
    """A mergeable reducer whose state is the set of process ids that computed it."""

    @staticmethod
    def init() -> list[int]:
        import os

        return [os.getpid()]

    @staticmethod
    def add(state: list[int], item: Any) -> list[int]:
        return state

    @staticmethod
    def merge(a: list[int], b: list[int]) -> list[int]:
        return sorted(set(a) | set(b))


class Ledger:
    """A mergeable count that also appends each item's `id` to the file $PAGENT_LEDGER and
    sleeps $PAGENT_LEDGER_SLEEP seconds, so a test can kill a run midway (as `ledger_identity`
    does for a map)."""

    @staticmethod
    def init() -> int:
        return 0

    @staticmethod
    def add(state: int, item: Any) -> int:
        import os
        import time

        path = os.environ["PAGENT_LEDGER"]
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, f"{item['id']}\n".encode())
        finally:
            os.close(descriptor)
        time.sleep(float(os.environ.get("PAGENT_LEDGER_SLEEP", "0.002")))
        return state + 1

    @staticmethod
    def merge(a: int, b: int) -> int:
        return a + b


class SetState:
    """A reducer whose state is a set: not JSON, so it cannot be stored."""

    @staticmethod
    def init() -> set[Any]:
        return set()

    @staticmethod
    def add(state: set[Any], value: Any) -> set[Any]:
        return state | {value}

    @staticmethod
    def merge(a: set[Any], b: set[Any]) -> set[Any]:
        return a | b


def distinct_set(values: list[Any]) -> set[Any]:
    """A plain reducer whose result is a set."""
    return set(values)
