"""How values become JSON bytes and back, exactly: the one codec of records, results, the run
store and worker processes, decoded and encoded in C-level passes.

orjson is the fast path, but it holds integers of 64 bits only: it reads a longer one as a rounded
float, and refuses to write one. An integer that does not fit has at least 19 digits, so text
without a run of 19 digits is read by orjson alone (one C-level scan decides); a line, record or
batch with one is read again by the standard library, which keeps every integer exact. Writing
falls back per value, where orjson refused a big integer. Ordinary data never takes either detour.

Shared by the readers (JSON Lines input is stored as it was read), the writers, the stores, the
chunk workers and the worker processes.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import orjson

#: What orjson writes and reads at most: a value nested deeper cannot be stored.
MAX_DEPTH = 254
#: Digits of an integer that may not fit in 64 bits (2**63 has 19).
_LONG = 19
_DIGITS = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * _LONG
_NOT_FINITE = "ValueError: result is NaN or infinite, which JSON cannot hold"
_UNENCODABLE = "TypeError: result is not JSON-serialisable"


def may_hold_big_ints(data: bytes | str) -> bool:
    """True when `data` has a run of 19 digits (only then can an integer in it exceed 64 bits)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return data.translate(_DIGITS).find(_LONG_RUN) >= 0


def loads(data: bytes | str) -> Any:
    """Parse one JSON document (orjson's grammar), integers of any size kept exact."""
    value = orjson.loads(data)
    if may_hold_big_ints(data):
        return json.loads(data)
    return value


def dumps(value: Any, option: int = 0, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode `value` with orjson; integers beyond 64 bits are written exactly. TypeError for
    what JSON cannot hold, as orjson says it."""
    try:
        return orjson.dumps(value, default=default, option=option)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
    exact = None if default is None else (lambda item: _big_ints_as_text(default(item)))
    return orjson.dumps(_big_ints_as_text(value), default=exact, option=option)


def _big_ints_as_text(value: Any) -> Any:
    """`value` with every integer beyond 64 bits replaced by its exact JSON text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value
        return orjson.Fragment(str(value).encode())
    if isinstance(value, dict):
        return {key: _big_ints_as_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints_as_text(item) for item in value]
    return value


def not_finite(value: Any) -> bool:
    """True when `value` holds a NaN or an infinity (JSON has neither; orjson writes `null`)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(not_finite(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(not_finite(item) for item in value)
    return False


def encode_lines(values: list[Any]) -> tuple[bytes, list[tuple[int, str]]]:
    """Encode values as JSON Lines; return the bytes and, for each value left out, its position
    and why (not JSON, nested too deep, or a NaN or infinity, which orjson would write as null)."""
    dumps_fast = orjson.dumps
    try:
        data = b"".join([dumps_fast(value) + b"\n" for value in values])
    except TypeError:
        pass
    else:
        if b"null" not in data:  # a NaN or infinity is written `null`: only then look closer
            return data, []
    parts: list[bytes] = []
    bad: list[tuple[int, str]] = []
    for position, value in enumerate(values):
        try:
            encoded = dumps(value)
        except TypeError as exc:
            bad.append(
                (position, _UNENCODABLE if "Type is not" in str(exc) else f"TypeError: {exc}")
            )
            continue
        if b"null" in encoded and not_finite(value):
            bad.append((position, _NOT_FINITE))
            continue
        parts.append(encoded + b"\n")
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
    if may_hold_big_ints(data):
        return [loads(line) for line in _lines(data)]
    body = data[:-1] if data.endswith(b"\n") else data
    try:
        return list(orjson.loads(b"[" + body.replace(b"\n", b",") + b"]"))
    except orjson.JSONDecodeError:
        return list(_values(_lines(data)))


def check_jsonl(payload: bytes) -> int | None:
    """The position of the first line of a JSON Lines payload that is not one JSON value (or one
    nested deeper than `MAX_DEPTH`, which could not be stored), or None.

    Parsing is the only way to know; the values are dropped (the payload is what gets stored).
    """
    lines = _lines(payload)
    bad = None
    try:
        collections.deque(_values(lines), maxlen=0)
    except orjson.JSONDecodeError:
        for position, text in enumerate(lines):
            try:
                orjson.loads(text)
            except orjson.JSONDecodeError:
                bad = position
                break
    deep = first_too_deep(payload, lines if bad is None else lines[:bad])
    return deep if deep is not None else bad


#: Every byte but the opening brackets and the newline.
_NOT_OPENING = bytes(byte for byte in range(256) if byte not in b"[{\n")


def first_too_deep(payload: bytes, lines: list[bytes]) -> int | None:
    """The position of the first of `lines` (valid JSON, the lines of `payload`) nested deeper
    than `MAX_DEPTH`. Only a line of more than 2 x `MAX_DEPTH` bytes with that many opening
    brackets can be: C-level length checks and counts find them, so ordinary data is never
    walked."""
    if not lines or max(map(len, lines)) <= 2 * MAX_DEPTH + 1:
        return None  # a level takes two bytes, its opening and closing bracket
    if payload.count(b"[") + payload.count(b"{") <= MAX_DEPTH:
        return None
    openers = payload.translate(None, _NOT_OPENING).split(b"\n")
    for position, count in enumerate(map(len, openers[: len(lines)])):
        if count > MAX_DEPTH and too_deep(lines[position]):
            return position
    return None


def too_deep(text: bytes) -> bool:
    """True when the JSON value `text` is nested deeper than `MAX_DEPTH` (orjson cannot write it)."""
    try:
        orjson.dumps(orjson.loads(text))
    except TypeError:
        return True
    return False


def checked_values(payload: bytes) -> list[Any] | int:
    """The values of a JSON Lines payload, read as `decode_lines` reads them (integers of any
    size exact), or the position of the first line `check_jsonl` refuses: one parse does both,
    for a split that checks a chunk and uses its values."""
    lines = _lines(payload)
    try:
        values = list(_values(lines))
    except orjson.JSONDecodeError:
        values = None
    if values is None or first_too_deep(payload, lines) is not None:
        bad = check_jsonl(payload)
        assert bad is not None  # the same parse refused it above
        return bad
    if may_hold_big_ints(payload):
        return [
            loads(line) if may_hold_big_ints(line) else value
            for line, value in zip(lines, values, strict=True)
        ]
    return values


def _lines(data: bytes) -> list[bytes]:
    """The lines of JSON Lines bytes; a final newline ends the last line rather than adding one."""
    if not data:
        return []
    return (data[:-1] if data.endswith(b"\n") else data).split(b"\n")


def _values(lines: list[bytes]) -> Iterator[Any]:
    """The one way both functions parse: each line on its own."""
    return map(orjson.loads, lines)
