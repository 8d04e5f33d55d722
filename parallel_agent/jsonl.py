"""How values become JSON bytes and back, exactly: the one codec of records, results, the run
store and worker processes, decoded and encoded in C-level passes.

orjson is the fast path, but it holds integers of 64 bits and numbers as doubles only: it reads a
longer integer as a rounded float, `3.141592653589793238462643` as `3.141592653589793`, `1e-400`
as 0 and refuses `1e400`. A number keeps its value through a double when it has at most 15
significant digits and lies in the double's normal range (DBL_DIG), so text without a run of 16
digits or dots and without a negative three-digit exponent is read by orjson alone (one C-level
scan decides; a number past the range is refused by orjson, and then read exactly). Other text is written back with orjson and compared (whitespace aside): the same
text means every number was a shortest form and keeps its value (machine-written floats of 17
digits are). Only when a number would change is the text read again by the standard library:
integers exactly, and a number that a double cannot hold as written as a `decimal.Decimal`.
Writing falls back per value, where orjson refused a big integer, and writes a Decimal as its
exact text. Ordinary data never takes either detour.

Shared by the readers (JSON Lines input is stored as it was read), the writers, the stores, the
chunk workers and the worker processes.
"""

from __future__ import annotations

import collections
import decimal
import json
import math
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

#: What orjson writes and reads at most: a value nested deeper cannot be stored.
MAX_DEPTH = 254
#: Significant digits every double keeps as written (DBL_DIG): a number with more may change.
_DBL_DIG = 15
#: Digits and dots become "0" and "E" becomes "e": then a run of 16 zeros or "e-000" is where
#: a number may not survive a double (see `may_change`).
_NUMBER_CHARS = bytes.maketrans(b"0123456789.E", b"00000000000e")
_LONG_RUN = b"0" * (_DBL_DIG + 1)
_WHITESPACE = b" \t\n\r"
_NOT_FINITE = "ValueError: result is NaN or infinite, which JSON cannot hold"
_UNENCODABLE = "TypeError: result is not JSON-serialisable"
#: Significant digits a Decimal result may have (about MAX_INT_BITS of an expression's ints).
EXACT_DIGITS = 30_000
#: The context expressions and reducers compute in: Decimal arithmetic is exact or fails
#: (`decimal.Inexact`, a clear error), never rounded silently; the precision bounds one step.
EXACT_CONTEXT = decimal.Context(
    prec=EXACT_DIGITS,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[
        decimal.Inexact,
        decimal.InvalidOperation,
        decimal.DivisionByZero,
        decimal.Overflow,
        decimal.Underflow,
    ],
)


def may_change(data: bytes | str) -> bool:
    """True when `data` has a run of 16 digits or dots, or a negative three-digit exponent: only
    then can a number in it lose its value as a double (an integer past 64 bits has 19 digits;
    a positive exponent changes nothing in range, and orjson refuses a number past it)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    scanned = data.translate(_NUMBER_CHARS)
    if scanned.find(_LONG_RUN) >= 0:
        return True
    # A search for a one-byte needle is a memchr, many times faster than one for "e-000" in
    # text full of digits; most data has no minus sign at all.
    return b"-" in scanned and b"e-000" in scanned


def round_trips(data: bytes | str, value: Any) -> bool:
    """True when `value`, read from the JSON text `data` by orjson, holds every number of `data`
    as written.

    orjson writes `value` back: the same text (the store's payloads are orjson's), or the same
    once JSON's whitespace is deleted from both, means every number token of `data` is one that
    orjson writes, a shortest form, which it reads back to itself. Compact JSON has one way to
    split it into tokens, so equal texts have equal tokens; a changed number, an escape written
    differently or a duplicate key makes them differ, and the caller reads `data` exactly."""
    return not may_change(data) or _writes_back(data, value)


def lines_round_trip(joined: bytes, lines: list[bytes], values: list[Any]) -> bool:
    """`round_trips` for `values`, read one per line from `lines` (the lines of `joined`): the
    text is scanned once as it is (separators are neither digits nor dots, so it scans as the
    array of its lines would), and the array is joined only when a number may change."""
    return not may_change(joined) or _writes_back(b"[" + b",".join(lines) + b"]", values)


def _writes_back(data: bytes | str, value: Any) -> bool:
    """The comparison of `round_trips`, for text the scan could not clear."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    try:
        written = orjson.dumps(value)
    except TypeError:  # nested deeper than orjson writes
        return False
    if written == data:
        return True
    return data.translate(None, _WHITESPACE) == written.translate(None, _WHITESPACE)


def exact_number(text: str) -> float | Decimal:
    """The number `text` (not an integer) as a float when a double holds it as written (its
    shortest form denotes the same decimal value), else as a Decimal of exactly that value."""
    value = float(text)
    if math.isfinite(value):
        shortest = repr(value)
        if shortest == text or Decimal(shortest) == Decimal(text):
            return value
    try:
        return Decimal(text)
    except decimal.InvalidOperation:
        raise _OutOfRange(text) from None


class _OutOfRange(ValueError):
    """A number whose exponent not even a Decimal holds."""

    def __init__(self, text: str) -> None:
        super().__init__(f"the number {text[:40]} has an exponent out of range")
        self.text = text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_loads(data: bytes | str) -> Any:
    """The standard library's parse, integers exact and numbers by `exact_number`; its errors
    as orjson's (the readers locate those)."""
    text = data if isinstance(data, str) else data.decode("utf-8")
    try:
        value = json.loads(text, parse_float=exact_number, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise orjson.JSONDecodeError(exc.msg, exc.doc, exc.pos) from None
    except _OutOfRange as exc:
        raise orjson.JSONDecodeError(str(exc), text, max(text.find(exc.text), 0)) from None
    except ValueError as exc:  # an integer past the standard library's digit limit
        raise orjson.JSONDecodeError(str(exc), text, 0) from None
    _refuse_lone_surrogates(text, value)
    return value


#: A `\uD800`-`\uDFFF` escape (or a backslash before such text: `_refuse_lone_surrogates`
#: then looks closer).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(text: str, value: Any) -> None:
    """Refuse, as orjson does, a string holding half a surrogate pair: the standard library
    reads one, so a line with a number past the double range was accepted or refused by the
    order of its fields (orjson stops at the first of the two problems it meets)."""
    found = _SURROGATE_ESCAPE.search(text)
    if found is None:
        return
    try:
        dumps(value)
    except TypeError as exc:
        if "surrogates" in str(exc):
            raise orjson.JSONDecodeError(
                "unpaired surrogate in a string", text, found.start()
            ) from None


def loads(data: bytes | str) -> Any:
    """Parse one JSON document (orjson's grammar), every number kept exact: integers of any
    size, and numbers a double cannot hold as written as Decimals."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):  # a number past the double range: read it exactly
            raise
        return _exact_loads(data)
    if round_trips(data, value):
        return value
    return _exact_loads(data)


def dumps(value: Any, option: int = 0, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode `value` with orjson; integers beyond 64 bits and Decimals are written exactly.
    TypeError for what JSON cannot hold, as orjson says it."""
    encode = _exact_default if default is None else _with_decimals(default)
    try:
        return orjson.dumps(value, default=encode, option=option)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
    exact = lambda item: _big_ints_as_text(encode(item))  # noqa: E731
    return orjson.dumps(_big_ints_as_text(value), default=exact, option=option)


def _exact_default(value: Any) -> Any:
    """What orjson cannot write itself: a Decimal as its exact text (a NaN or infinity as null,
    which `not_finite` then finds, as for a float)."""
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode()) if value.is_finite() else None
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _with_decimals(default: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def encode(value: Any) -> Any:
        return _exact_default(value) if isinstance(value, Decimal) else default(value)

    return encode


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


def ascii_text(value: Any) -> str:
    """One line of JSON in ASCII for a terminal (`--json`, `failures`): the standard library's
    text, or, for a value holding Decimals, which it cannot write as numbers, the exact text
    with every other character escaped."""
    try:
        return json.dumps(value)
    except TypeError:
        text = dumps(value).decode()
    return _NOT_ASCII.sub(_escape, text)


_NOT_ASCII = re.compile(r"[^\x00-\x7f]")


def _escape(match: re.Match[str]) -> str:
    """A character as JSON's \\u escape (two, a surrogate pair, past the first plane)."""
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def not_finite(value: Any) -> bool:
    """True when `value` holds a NaN or an infinity (JSON has neither; orjson writes `null`)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Decimal):
        return not value.is_finite()
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
        data = b"".join([dumps_fast(value, default=_exact_default) + b"\n" for value in values])
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
    body = data[:-1] if data.endswith(b"\n") else data
    array = b"[" + body.replace(b"\n", b",") + b"]"
    try:
        values = list(orjson.loads(array))
    except orjson.JSONDecodeError:
        return [loads(line) for line in _lines(data)]
    if round_trips(array, values):
        return values
    return [loads(line) for line in _lines(data)]


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
                loads(text)
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
        dumps(loads(text))
    except TypeError:
        return True
    return False


def checked_values(payload: bytes) -> list[Any] | int:
    """The values of a JSON Lines payload, read as `decode_lines` reads them (every number
    exact), or the position of the first line `check_jsonl` refuses: one parse does both,
    for a split that checks a chunk and uses its values."""
    lines = _lines(payload)
    try:
        values = list(_values(lines))
    except orjson.JSONDecodeError:
        values = None
    if values is None or first_too_deep(payload, lines) is not None:
        bad = check_jsonl(payload)
        if bad is not None:
            return bad
        return [loads(line) for line in lines]  # a number past the double range, read exactly
    if lines_round_trip(payload, lines, values):
        return values
    return [loads(line) for line in lines]  # a number a double would change, read exactly


class PlainLines(NamedTuple):
    """What `plain_lines` found: the lines, and whether a parser that skips the fields it is
    not asked for may read them (`skippable`)."""

    lines: list[bytes]
    skippable: bool


def plain_lines(payload: bytes) -> PlainLines | None:
    """The lines of a JSON Lines payload when `orjson.loads` of each gives what
    `checked_values` gives (no line nested too deep, no number a double would change), so a
    caller may parse them itself, one by one; None when the payload needs `checked_values`.
    A line that is not JSON is still the caller's to find.

    `skippable` says the text is valid UTF-8: msgspec, reading only some fields of each
    record, checks the fields it skips as orjson does, except that it lets invalid UTF-8 pass
    there (and a number past the double range, `1e999`, which pagent reads too, exactly), so
    only then is its reading the same as `checked_values`'s."""
    lines = _lines(payload)
    if may_change(payload):
        return None
    try:
        deep = first_too_deep(payload, lines)
    except orjson.JSONDecodeError:  # a long, bracket-heavy line that is not JSON
        return None
    if deep is not None:
        return None
    return PlainLines(lines, _valid_utf8(payload))


def _valid_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _lines(data: bytes) -> list[bytes]:
    """The lines of JSON Lines bytes; a final newline ends the last line rather than adding one."""
    if not data:
        return []
    return (data[:-1] if data.endswith(b"\n") else data).split(b"\n")


def _values(lines: list[bytes]) -> Iterator[Any]:
    """The one way both functions parse: each line on its own."""
    return map(orjson.loads, lines)
