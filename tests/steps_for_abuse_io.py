"""Functions the data abuse tests (tests/test_abuse_io.py) name: user code that makes numbers JSON
cannot hold."""

from __future__ import annotations

import math


def not_a_number_on_three(item: int) -> float | int:
    """NaN for 3, an infinity for 4, the item otherwise."""
    if item == 3:
        return math.nan
    if item == 4:
        return -math.inf
    return item
