"""Streaming readers: every format, every located error, tiny blocks to cross block boundaries."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest

from parallel_agent.errors import InputDataError, UsageError
from parallel_agent.io import detect_format, iter_records, read_chunks


def records(data: bytes, fmt: str, block_size: int = 5, **options: Any) -> list[Any]:
    return list(iter_records(io.BytesIO(data), fmt, block_size=block_size, **options))


def error(data: bytes, fmt: str, **options: Any) -> str:
    with pytest.raises(InputDataError) as caught:
        records(data, fmt, display_name="in.x", **options)
    assert caught.value.exit_code == 3
    return str(caught.value)


@pytest.mark.parametrize("block_size", [1, 3, 7, 1 << 20])
def test_jsonl_skips_blank_lines_and_handles_bom_and_crlf(block_size: int) -> None:
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n  \n[1, 2]\n"s"\n3'
    assert records(data, "jsonl", block_size) == [{"a": 1}, [1, 2], "s", 3]


def test_jsonl_error_has_line_column_and_record() -> None:
    message = error(b'{"a": 1}\n\n{"a": 2}\n{"a": 3,,}\n', "jsonl")
    assert message.startswith("in.x, line 4, column 9, record 3: invalid JSON")


def test_jsonl_error_on_last_line_without_newline() -> None:
    assert error(b"1\n2\n{", "jsonl").startswith("in.x, line 3, column 2, record 3:")


@pytest.mark.parametrize("block_size", [1, 4, 1 << 20])
def test_json_array_streamed_across_blocks(block_size: int) -> None:
    data = b'[1, "a]b\\"c", {"x": [1, {"y": "}"}]},\n null, true, -2.5e3, []]'
    assert records(data, "json", block_size) == [
        1,
        'a]b"c',
        {"x": [1, {"y": "}"}]},
        None,
        True,
        -2500.0,
        [],
    ]


def test_json_object_with_data_key_and_other_keys() -> None:
    data = b'{"meta": {"n": [1, 2]}, "rows": [{"id": 1}, {"id": 2}], "tail": "x"}'
    assert records(data, "json", 3, data_key="rows") == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"[1, 2,\n 3, }\n", "in.x, line 2, column 5, record 4: expected a record"),
        (b"[1, 2", "record 2: unterminated array"),
        (b"[1, 2] x", "unexpected data after the end"),
        (b'[1, {"a": tru}]', "record 2: invalid JSON"),
        (b'{"meta": 1}', "has no 'data' array"),
        (b'{"data": 5}', "'data' must hold an array"),
        (b"42", "expected a JSON array of records"),
        (b"", "empty input"),
    ],
)
def test_json_errors_are_located(data: bytes, expected: str) -> None:
    assert expected in error(data, "json")


def test_json_error_line_counts_across_blocks() -> None:
    data = b"[\n" + b"1,\n" * 50 + b"x]\n"
    assert error(data, "json").startswith("in.x, line 52, column 1, record 51:")


@pytest.mark.parametrize("block_size", [1, 6, 1 << 20])
def test_csv_quotes_newlines_utf8_bom_and_empty_lines(block_size: int) -> None:
    data = '\ufeffname,note\n"Smith, J","line one\nline two"\n\nZoë,"say ""hi"""\r\n'.encode()
    assert records(data, "csv", block_size) == [
        {"name": "Smith, J", "note": "line one\nline two"},
        {"name": "Zoë", "note": 'say "hi"'},
    ]


def test_csv_unterminated_quote_names_the_line_it_opened_on() -> None:
    message = error(b'a,b\n1,2\n"x\ny",3\n4,"oops\n5,6\n7,8\n', "csv")
    assert message.startswith("in.x, line 5, record 3: unterminated quoted field")


def test_csv_ragged_row_after_a_multiline_field() -> None:
    message = error(b'a,b\n"1\n1",2\n3,4,5\n', "csv")
    assert message == "in.x, line 4, record 2: expected 2 fields as in the header, found 3"


@pytest.mark.parametrize(
    ("header", "expected"),
    [(b"a,,b\n", "header field 2 is empty"), (b"a,b,a\n", "'a' appears twice")],
)
def test_csv_bad_header(header: bytes, expected: str) -> None:
    assert expected in error(header + b"1,2,3\n", "csv")


def test_invalid_utf8_is_located() -> None:
    assert (
        error(b"a,b\n1,\xff\n", "csv")
        == "in.x, line 2, column 3: invalid UTF-8 (invalid start byte)"
    )
    assert "invalid JSON" in error(b'"\xff"\n', "jsonl")


def test_chunks_size_and_hash_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(7)))
    reader = read_chunks(str(path), "jsonl", 3)
    chunks = list(reader)
    assert [(c.index, c.first_record, c.records) for c in chunks] == [
        (0, 0, [0, 1, 2]),
        (1, 3, [3, 4, 5]),
        (2, 6, [6]),
    ]
    assert reader.records == 7
    assert reader.size == path.stat().st_size
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_format_detection() -> None:
    assert detect_format("a.JSON") == "json"
    assert detect_format("a.ndjson") == "jsonl"
    assert detect_format("a.txt", "csv") == "csv"
    with pytest.raises(UsageError, match="--format"):
        detect_format("-")
    with pytest.raises(UsageError, match="extension"):
        detect_format("data.txt")
    with pytest.raises(UsageError, match="unknown format"):
        detect_format("a.json", "xml")


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        list(read_chunks(str(tmp_path / "nope.json"), "json", 2))
