"""JSON Lines payloads: what `check_jsonl` lets into the run store, `decode_lines` reads back, line for
line, with the same values as parsing each line on its own (no stored payload is anything else)."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from parallel_agent.jsonl import check_jsonl, checked_values, decode_lines, encode_lines, loads


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def as_written(text: str) -> float | Decimal:
    """A float when its shortest form has the value of `text`, else a Decimal (promise 14)."""
    number = float(text)
    if math.isfinite(number) and Decimal(repr(number)) == Decimal(text):
        return number
    return Decimal(text)


def each_line(payload: bytes) -> tuple[list[Any] | None, int | None]:
    """The reference: every line parsed on its own (orjson's grammar, integers exact, numbers
    a double cannot hold as written as Decimals, at most 254 levels deep: what orjson can write
    back); the values, or the first bad line."""
    if not payload:
        return [], None
    lines = (payload[:-1] if payload.endswith(b"\n") else payload).split(b"\n")
    values = []
    for position, line in enumerate(lines):
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if "infinity" not in str(exc):  # past a double's range: a number read exactly
                return None, position
        value = json.loads(line, parse_float=as_written)
        try:
            orjson.dumps(value)
        except TypeError as exc:
            if "Recursion" in str(exc):
                return None, position
        values.append(value)
    return values, None


@pytest.mark.parametrize(
    ("depth", "valid"),
    # orjson writes 254 levels (reads 1024): a deeper record could never be stored or written
    [(254, True), (255, False), (300, False), (1024, False), (1025, False)],
)
@pytest.mark.parametrize("before", [b"", b'{"x": 1}\n'])
def test_nesting_past_what_can_be_written_is_refused(
    depth: int, valid: bool, before: bytes
) -> None:
    payload = before + nested(depth) + b"\n"
    assert (check_jsonl(payload) is None) is valid
    assert isinstance(checked_values(payload), list) is valid
    if valid:
        assert len(decode_lines(payload)) == (2 if before else 1)
    else:
        assert check_jsonl(payload) == (1 if before else 0)


TRICKY = [
    nested(1024),
    nested(1025),
    b'{"a":' * 1024 + b"1" + b"}" * 1024,
    b"1" * 400,  # past a double: an integer read exactly
    b"[1e400, -1e-400, 3.141592653589793238462643, 0.30000000000000004]",  # Decimals and a float
    b"18446744073709551616",  # past 64 bits: read exactly
    b'{"n": [-123456789012345678901234567890, 1.5]}',
    b'"12345678901234567890 in a string"',
    b"NaN",
    b'"\\ud800"',  # a lone surrogate
    b"\xef\xbb\xbf1",  # a byte order mark
    b'{"x": 1} \t\r',
    b"",
    b"  ",
    b"1,2",  # two values on one line
    b"[3",  # a value split over two lines
    b"4]",
    b'"a\\u0000b"',
]


@pytest.fixture
def deep_compare() -> Iterator[None]:
    """Comparing values nested 1024 deep needs more than Python's default recursion limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.usefixtures("deep_compare")
def test_decode_reads_what_check_accepts_as_each_line_says() -> None:
    """Every payload of up to three tricky lines, with and without a final newline."""
    for count in (1, 2, 3):
        for lines in itertools.product(TRICKY, repeat=count):
            for end in (b"", b"\n"):
                payload = b"\n".join(lines) + end
                values, bad = each_line(payload)
                assert check_jsonl(payload) == bad, payload[:80]
                if bad is None:
                    assert decode_lines(payload) == values, payload[:80]
                # a split's one parse (check + values for its aggregates' partials)
                assert checked_values(payload) == (values if bad is None else bad), payload[:80]


@pytest.mark.parametrize("payload", [b"", b"\n", b"  \n", b"1\n\n", b"1\n2", b"1\r\n2\r\n"])
def test_empty_and_blank_lines(payload: bytes) -> None:
    values, bad = each_line(payload)
    assert check_jsonl(payload) == bad
    assert checked_values(payload) == (values if bad is None else bad)
    if bad is None:
        assert decode_lines(payload) == values


def test_what_encode_writes_decode_reads() -> None:
    values = [1, "two", {"three": [3.5, None, True]}, [], {}, "line\nbreak"]
    data, bad = encode_lines(values)
    assert bad == []
    assert check_jsonl(data) is None
    assert decode_lines(data) == values


@pytest.mark.parametrize(
    "line",
    [
        b'{"x": 1e-400}',  # the exponent's sign is the only minus sign
        b'{"x": 2.5E-400, "y": "a-b"}',
        b'{"x": -1e-400}',
        b'{"x": 1e-40, "y": -3}',  # a two-digit exponent: a double holds it
        b'{"x": 12345678901234567.5}',
        b'{"x": -0.5, "y": [1e-300, 7]}',
    ],
)
def test_a_number_a_double_changes_is_read_exactly_whatever_the_minus_signs(line: bytes) -> None:
    """`may_change` looks for the exponent only where the text has a minus sign at all: every
    value still equals the line read on its own, exactly."""
    payload = b'{"pad": 1}\n' * 3 + line + b"\n"
    values, bad = each_line(payload)
    assert bad is None
    assert checked_values(payload) == values
    assert decode_lines(payload) == values


@pytest.mark.parametrize(
    "line",
    [
        b'{"x": 1e999, "y": "\\ud800"}',
        b'{"y": "\\ud800", "x": 1e999}',
        b'{"x": 1e999, "y": "\\udc00 and more"}',
        b'{"x": 0.10000000000000000000001, "y": ["\\uDBFF"]}',
    ],
)
def test_a_lone_surrogate_is_refused_beside_a_number_read_exactly(line: bytes) -> None:
    """A line with a number orjson cannot hold is read again by the standard library, which
    takes half a surrogate pair that orjson refuses: such a line was accepted or refused by the
    order of its fields (found by a reviewer helper). Both orders are refused now."""
    with pytest.raises(orjson.JSONDecodeError):
        loads(line)


def test_surrogate_pairs_and_escaped_backslashes_beside_an_exact_number_are_read() -> None:
    assert loads(b'{"x": 1e999, "y": "\\ud83d\\ude00"}')["y"] == "\U0001f600"
    assert loads(b'{"x": 1e999, "y": "\\\\ud800"}')["y"] == "\\ud800"
