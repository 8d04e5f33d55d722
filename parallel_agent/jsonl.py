"""How chunk results are stored: JSON Lines bytes, encoded and decoded in C-level passes.

Shared by the readers (JSON Lines input is stored as it was read), the chunk workers and the
worker processes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
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
    """Decode JSON Lines bytes, as written by `encode_lines` or passed by `check_jsonl` (every
    payload in the run store is one or the other).

    The lines are read as one JSON array, one C-level parse (about twice as fast as a parse per
    line): for lines that are each one JSON value, that gives each line's value. The array nests
    every value a level deeper, so a line at orjson's limit of 1024 levels fails that way; any
    failure is settled by parsing each line on its own, which reads exactly what `check_jsonl`
    accepts.
    """
    if not data:
        return []
    body = data[:-1] if data.endswith(b"\n") else data
    try:
        return list(orjson.loads(b"[" + body.replace(b"\n", b",") + b"]"))
    except orjson.JSONDecodeError:
        return list(_values(_lines(data)))


def check_jsonl(payload: bytes) -> int | None:
    """The position of the first line of a JSON Lines payload that is not one JSON value, or None.

    Parsing is the only way to know; the values are dropped (the payload is what gets stored).
    """
    lines = _lines(payload)
    try:
        collections.deque(_values(lines), maxlen=0)
    except orjson.JSONDecodeError:
        for position, text in enumerate(lines):
            try:
                orjson.loads(text)
            except orjson.JSONDecodeError:
                return position
    return None


def checked_values(payload: bytes) -> list[Any] | int:
    """The values of a JSON Lines payload, parsed line by line exactly as `check_jsonl` checks
    it (so a split can check a chunk and use its values in one parse), or the position of its
    first line that is not one JSON value."""
    try:
        return list(_values(_lines(payload)))
    except orjson.JSONDecodeError:
        bad = check_jsonl(payload)
        assert bad is not None  # the same parse failed above
        return bad


def _lines(data: bytes) -> list[bytes]:
    """The lines of JSON Lines bytes; a final newline ends the last line rather than adding one."""
    if not data:
        return []
    return (data[:-1] if data.endswith(b"\n") else data).split(b"\n")


def _values(lines: list[bytes]) -> Iterator[Any]:
    """The one way both functions parse: each line on its own."""
    return map(orjson.loads, lines)
