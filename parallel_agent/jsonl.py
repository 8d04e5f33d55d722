"""How chunk results are stored: JSON Lines bytes, encoded and decoded in C-level passes.

Shared by the readers (JSON Lines input is stored as it was read), the chunk workers and the
worker processes.
"""

from __future__ import annotations

import collections
from typing import Any

import orjson


def encode_lines(values: list[Any]) -> tuple[bytes, list[int]]:
    """Encode values as JSON Lines; return the bytes and the positions of unencodable values."""
    dumps = orjson.dumps
    try:
        return b"".join([dumps(value) + b"\n" for value in values]), []
    except TypeError:
        pass
    parts: list[bytes] = []
    bad: list[int] = []
    for position, value in enumerate(values):
        try:
            parts.append(dumps(value) + b"\n")
        except TypeError:
            bad.append(position)
    return b"".join(parts), bad


def decode_lines(data: bytes) -> list[Any]:
    """Decode JSON Lines bytes written by `encode_lines` in one C-level pass."""
    if not data:
        return []
    body = data[:-1] if data.endswith(b"\n") else data
    return list(orjson.loads(b"[" + body.replace(b"\n", b",") + b"]"))


def check_jsonl(payload: bytes) -> int | None:
    """The position of the first line of a JSON Lines payload that is not one JSON value, or None.

    Parsing is the only way to know; the values are dropped (the payload is what gets stored).
    """
    lines = payload.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    try:
        collections.deque(map(orjson.loads, lines), maxlen=0)
    except orjson.JSONDecodeError:
        for position, text in enumerate(lines):
            try:
                orjson.loads(text)
            except orjson.JSONDecodeError:
                return position
    return None
