"""Streaming readers: every format, every located error, tiny blocks to cross block boundaries."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from parallel_agent.errors import InputDataError, UsageError
from parallel_agent.io import BLOCK_SIZE, Record, detect_format, iter_records, read_chunks
from parallel_agent.jsonl import check_jsonl, decode_lines

BLOCKS = [1, 2, 3, 7, 64, BLOCK_SIZE]


def values(data: bytes, fmt: str, block_size: int = 5, **options: Any) -> list[Any]:
    """Values through the chunked (fast) path, which the stored-payload path must agree with."""
    reader = read_chunks(io.BytesIO(data), fmt, 2, block_size=block_size, **options)
    found = [value for chunk in reader for value in chunk.records]
    assert payload_values(data, fmt, block_size, **options) == found
    return found


def payload_values(data: bytes, fmt: str, block_size: int = 5, **options: Any) -> list[Any]:
    """Values through the chunks the split stores: checked here, or later as a worker does."""
    found = []
    for check_here in (True, False):
        reader = read_chunks(io.BytesIO(data), fmt, 2, block_size=block_size, **options)
        got: list[Any] = []
        for chunk in reader.payload_chunks(check=check_here):
            if not check_here and fmt == "jsonl":
                bad = check_jsonl(chunk.payload)
                if bad is not None:
                    raise reader.jsonl_error(chunk, bad)
            decoded = decode_lines(chunk.payload)
            assert chunk.count == len(decoded) and chunk.first_record == len(got)
            got.extend(decoded)
        found.append(got)
    assert found[0] == found[1]
    return found[0]


def records(data: bytes, fmt: str, block_size: int = 5, **options: Any) -> list[tuple[int, Any]]:
    """(line, value) through the located path."""
    found = list(iter_records(io.BytesIO(data), fmt, block_size=block_size, **options))
    assert [r.number for r in found] == list(range(1, len(found) + 1))
    return [(r.line, r.value) for r in found]


def error(data: bytes, fmt: str, block_size: int = 5, **options: Any) -> str:
    """The error message, which must be the same on the fast and the located path."""
    messages = []
    for read in (values, records, payload_values):
        with pytest.raises(InputDataError) as caught:
            read(data, fmt, block_size, display_name="in.x", **options)
        assert caught.value.exit_code == 3
        messages.append(str(caught.value))
    assert messages[0] == messages[1] == messages[2]
    return messages[0]


# ---- JSON Lines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCKS)
def test_jsonl_skips_blank_lines_and_handles_bom_and_crlf(block_size: int) -> None:
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n  \n[1, 2]\r\n\t\n"s"\n3'
    assert values(data, "jsonl", block_size) == [{"a": 1}, [1, 2], "s", 3]
    assert records(data, "jsonl", block_size) == [(1, {"a": 1}), (4, [1, 2]), (6, "s"), (7, 3)]


@pytest.mark.parametrize("block_size", BLOCKS)
def test_blank_lines_anywhere_in_a_block_are_skipped_on_every_path(block_size: int) -> None:
    """Whitespace-only lines first, last, in a row or alone in a block are skipped, and the
    chunk payloads number the records the line-by-line reader does."""
    rng = random.Random(3)
    for _ in range(150):
        lines, want = [], []
        for number in range(rng.randint(1, 12)):
            if rng.random() < 0.4:
                lines.append(rng.choice(["", " ", "\t", " \r", "\x0b", "\x0c "]))
            else:
                lines.append(str(number))
                want.append((len(lines), number))
        if not want:
            continue
        data = ("\n".join(lines) + rng.choice(["", "\n"])).encode()
        assert records(data, "jsonl", block_size) == want, data
        assert payload_values(data, "jsonl", block_size) == [value for _, value in want], data


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100, 1000])
@pytest.mark.parametrize("block_size", [1, 7, 4096, BLOCK_SIZE])
def test_payload_chunks_cut_uneven_lines_exactly(chunk_size: int, block_size: int) -> None:
    """The split's chunks are sliced from the blocks where counts say a chunk ends: with lines
    of very uneven length (one byte to 50,000), blank lines and blocks of every size, each chunk
    holds exactly its records' lines, and locates each of them on its own line (the records
    are not JSON, so that each can be located as the malformed one)."""
    rng = random.Random(chunk_size * 31 + block_size)
    lines: list[bytes] = []
    want: list[tuple[int, bytes]] = []  # (line number, text) of each record
    for number in range(2500):
        roll = rng.random()
        if roll < 0.05:
            lines.append(rng.choice([b"", b" ", b"\t"]))
            continue
        if roll < 0.06:
            text = b"x" * rng.randint(5_000, 50_000)
        else:
            text = b"x" + str(number * rng.choice([1, 1000, 10**12])).encode()
        lines.append(text)
        want.append((len(lines), text))
    data = b"\n".join(lines) + rng.choice([b"", b"\n"])
    reader = read_chunks(io.BytesIO(data), "jsonl", chunk_size, block_size=block_size)
    got = 0
    for chunk in reader.payload_chunks(check=False):
        expected = want[got : got + chunk_size]
        assert chunk.first_record == got and chunk.count == len(expected)
        assert chunk.payload == b"".join(text + b"\n" for _, text in expected)
        for position, (line, _) in enumerate(expected):
            assert f"line {line}," in str(reader.jsonl_error(chunk, position))
        got += chunk.count
    assert got == len(want) and reader.records == len(want)
    assert reader.sha256 == hashlib.sha256(data).hexdigest()


def test_jsonl_final_newline_and_empty_input() -> None:
    assert values(b"1\n2\n", "jsonl") == [1, 2]
    expected = "in.x, line 1, column 1: empty input: expected JSON Lines records"
    assert error(b"", "jsonl") == expected
    assert error(b"\xef\xbb\xbf\n\n", "jsonl") == expected


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_an_empty_input_is_an_error_in_every_format(fmt: str) -> None:
    """RELIABILITY.md promise 13: an input with nothing in it (an upstream step that wrote
    nothing) is exit 3 in every format, never a silent run over 0 records."""
    assert "empty input" in error(b"", fmt)
    assert "empty input" in error(b" \n\n", fmt)


def test_an_empty_array_and_a_header_only_csv_are_zero_records() -> None:
    assert values(b"[]", "json") == []
    assert values(b'{"data": []}', "json") == []
    assert values(b"a,b\n", "csv") == []


@pytest.mark.parametrize("block_size", [1, 4, BLOCK_SIZE])
def test_jsonl_error_has_line_column_and_record(block_size: int) -> None:
    message = error(b'{"a": 1}\n\n{"a": 2}\n{"a": 3,,}\n', "jsonl", block_size)
    assert message == (
        "in.x, line 4, column 9, record 3: invalid JSON: unexpected character, expected a string key"
    )


def test_jsonl_error_columns_count_characters() -> None:
    assert error('{"é": 3,,}\n'.encode(), "jsonl").startswith("in.x, line 1, column 9, record 1:")


def test_jsonl_error_on_last_line_without_newline() -> None:
    assert error(b"1\n2\n{", "jsonl").startswith("in.x, line 3, column 2, record 3:")


def test_jsonl_invalid_utf8_is_located() -> None:
    message = error(b'1\n"ok \xc3\xa9 \xff"\n', "jsonl")
    assert message == "in.x, line 2, column 7, record 2: invalid UTF-8 (invalid start byte)"


# ---- JSON ---------------------------------------------------------------------------------------

ARRAY = b'[1, "a]b\\"c,", {"x": [1, {"y": "},{"}]},\n null, true, -2.5e3, [], "\xc3\xa9"]'
ARRAY_VALUES = [1, 'a]b"c,', {"x": [1, {"y": "},{"}]}, None, True, -2500.0, [], "é"]


@pytest.mark.parametrize("block_size", BLOCKS)
def test_json_array_streamed_across_blocks(block_size: int) -> None:
    assert values(ARRAY, "json", block_size) == ARRAY_VALUES
    assert records(ARRAY, "json", block_size) == [(1, v) for v in ARRAY_VALUES[:3]] + [
        (2, v) for v in ARRAY_VALUES[3:]
    ]


@pytest.mark.parametrize("block_size", [1, 3, 64, BLOCK_SIZE])
def test_json_object_with_data_key_and_other_keys(block_size: int) -> None:
    data = b'{"meta": {"n": [1, 2], "s": "[{"}, "rows": [{"id": 1},\n{"id": 2}], "tail": {"a": 1}}'
    assert values(data, "json", block_size, data_key="rows") == [{"id": 1}, {"id": 2}]
    assert records(data, "json", block_size, data_key="rows") == [(1, {"id": 1}), (2, {"id": 2})]


def test_json_empty_array_and_whitespace() -> None:
    assert values(b" \n[ \n ] \n", "json") == []
    assert values(b'\xef\xbb\xbf{"data": []}', "json") == []


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-(10**6), 10**6)
    if kind == 1:
        return rng.choice([None, True, False, 1.5, -0.0, 1e300])
    if kind in (2, 3, 4):
        return "".join(rng.choice('ab,:[]{}"\\\n\t é😀') for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return {f"k{i}{rng.choice('[,{')}": random_value(rng, depth + 1) for i in range(3)}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


@pytest.mark.parametrize("seed", range(20))
def test_json_random_documents_match_orjson(seed: int) -> None:
    rng = random.Random(seed)
    expected = [random_value(rng) for _ in range(rng.randrange(1, 60))]
    option = orjson.OPT_INDENT_2 if seed % 2 else 0
    data = orjson.dumps(expected, option=option)
    for block_size in (1, 5, 17, 256, BLOCK_SIZE):
        assert values(data, "json", block_size) == expected, (seed, block_size)
    assert [value for _, value in records(data, "json", 7)] == expected


def test_json_many_records_use_whole_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    expected = [{"id": i, "s": f"[{i}]", "n": [i, {"a": i}]} for i in range(20_000)]
    path.write_bytes(orjson.dumps(expected))
    reader = read_chunks(str(path), "json", 1000, block_size=4096)
    chunks = list(reader)
    assert [value for chunk in chunks for value in chunk.records] == expected
    assert [c.first_record for c in chunks] == list(range(0, 20_000, 1000))
    assert reader.records == 20_000


def test_json_record_much_larger_than_a_block() -> None:
    huge = {"s": "x]" * 200_000, "list": [{"a": [i]} for i in range(20_000)]}
    data = orjson.dumps([1, huge, 2])
    assert values(data, "json", 512) == [1, huge, 2]
    assert records(data, "json", 512) == [(1, 1), (1, huge), (1, 2)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"[1, 2,\n 3, }\n", "in.x, line 2, column 5, record 4: expected a record (a JSON value)"),
        (b"[1, 2,]", "in.x, line 1, column 7, record 3: expected a record (a JSON value)"),
        (b"[1, 2", "in.x, line 1, column 6, record 2: unterminated array: expected ',' or ']'"),
        (
            b"[1,\n",
            "in.x, line 2, column 1, record 2: unterminated array: expected a record or ']'",
        ),
        (b"[1 2]", "in.x, line 1, column 4, record 1: expected ',' or ']' after a record"),
        (b"[1, 2] x", "in.x, line 1, column 8: unexpected data after the end of the JSON document"),
        (
            b'[1,\n  {"a": tru}]',
            "in.x, line 2, column 9, record 2: invalid JSON: invalid literal, expected 'true'",
        ),
        (
            b'[{"a": "\xff"}]',
            "in.x, line 1, column 9, record 1: invalid UTF-8 (invalid start byte)",
        ),
        (b'{"meta": 1}', "in.x, line 1, column 11: the JSON object has no 'data' array of records"),
        (b'{"data": 5}', "in.x, line 1, column 10: 'data' must hold an array of records"),
        (b'{"data": [1]', "in.x, line 1, column 13: expected ',' or '}' in the JSON object"),
        (b"\n  42", "in.x, line 2, column 3: expected a JSON array of records or an object"),
        (b"", "in.x, line 1, column 1: empty input: expected a JSON array or object"),
        (b'["abc', "in.x, line 1, column 6, record 1: unexpected end of data inside a value"),
    ],
)
def test_json_errors_are_located(data: bytes, expected: str) -> None:
    assert error(data, "json").startswith(expected)


def test_json_error_location_counts_across_blocks() -> None:
    data = b"[\n" + b'{"a": [1, "]"]},\n' * 50 + b'{"a": x}]\n'
    for block_size in (1, 7, BLOCK_SIZE):
        message = error(data, "json", block_size)
        assert message.startswith("in.x, line 52, column 7, record 51: invalid JSON"), block_size


def test_json_error_column_on_one_long_line() -> None:
    data = b"[" + b'"\xc3\xa9",' * 1000 + b"nope]"  # 4 characters, 5 bytes per record
    message = error(data, "json", 64)
    assert message.startswith("in.x, line 1, column 4002, record 1001: invalid JSON")


# ---- CSV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCKS)
def test_csv_quotes_newlines_utf8_bom_and_empty_lines(block_size: int) -> None:
    data = '\ufeffname,note\r\n"Smith, J","line one\nline two"\n\n  \nZoë,"say ""hi"""\r\n'.encode()
    assert records(data, "csv", block_size) == [
        (2, {"name": "Smith, J", "note": "line one\nline two"}),
        (6, {"name": "Zoë", "note": 'say "hi"'}),
    ]
    assert values(data, "csv", block_size) == [r for _, r in records(data, "csv", block_size)]


def test_csv_values_stay_strings_and_single_column_keeps_blanks() -> None:
    assert values(b"zip,n\n02134,1.50\n", "csv") == [{"zip": "02134", "n": "1.50"}]
    assert values(b"only\n  \nx\n", "csv") == [{"only": "  "}, {"only": "x"}]
    assert values(b"a,b\n", "csv") == []


def test_csv_many_rows_cross_batches(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n" + "".join(f'{i},"a\nb,{i}"\n' for i in range(10_000)))
    found = list(iter_records(str(path), "csv", block_size=1000))
    assert found[-1] == Record(10_000, 2 + 2 * 9_999, {"id": "9999", "text": "a\nb,9999"})
    assert len(found) == 10_000


@pytest.mark.parametrize("block_size", [1, 8, BLOCK_SIZE])
def test_csv_unterminated_quote_names_the_line_it_opened_on(block_size: int) -> None:
    data = b'a,b\n1,2\n"x\ny",3\n4,"oops\n5,6\n7,8\n'
    message = error(data, "csv", block_size)
    assert message == "in.x, line 5, record 3: unterminated quoted field (the quote opens here)"


def test_csv_unterminated_quote_later_in_a_multiline_row() -> None:
    data = b'a,b,c\n"x\ny","ok ""q""\nstill",\n"2\n3",4,"open\n5,6,7\n'
    message = error(data, "csv")
    assert message == "in.x, line 6, record 2: unterminated quoted field (the quote opens here)"


def test_csv_unterminated_quote_before_a_large_remainder() -> None:
    data = b'a,b\n1,"never closed\n' + b"x,y\n" * 50_000
    message = error(data, "csv", 4096)
    assert message.startswith(
        "in.x, line 2, record 1: quoted field longer than the CSV field limit"
    )


def test_csv_ragged_row_after_a_multiline_field() -> None:
    message = error(b'a,b\n"1\n1",2\n3,4,5\n', "csv")
    assert message == "in.x, line 4, record 2: expected 2 fields as in the header, found 3"
    assert error(b"a,b\n1,2\n\n3\n", "csv").startswith("in.x, line 4, record 2: expected 2 fields")


def test_csv_malformed_quote_is_located() -> None:
    message = error(b'a,b\n1,2\n"x"y,3\n', "csv")
    assert message.startswith("in.x, line 3, record 2: malformed CSV:")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"a,,b\n", "in.x, line 1: header field 2 is empty"),
        (b"\na,b,a\n", "in.x, line 2: header field 'a' appears twice"),
    ],
)
def test_csv_bad_header(header: bytes, expected: str) -> None:
    assert error(header + b"1,2,3\n", "csv") == expected


def test_csv_invalid_utf8_is_located() -> None:
    data = "a,b\n1,é\xff\n".encode().replace(b"\xc3\xbf", b"\xff")
    assert error(data, "csv") == "in.x, line 2, column 4: invalid UTF-8 (invalid start byte)"


# ---- chunks, identity, formats ------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1000])
@pytest.mark.parametrize("block_size", [1, 7, BLOCK_SIZE])
def test_chunks_are_consecutive(tmp_path: Path, chunk_size: int, block_size: int) -> None:
    path = tmp_path / "n.jsonl"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(37)))
    reader = read_chunks(str(path), "jsonl", chunk_size, block_size=block_size)
    chunks = list(reader)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(len(c.records) == chunk_size for c in chunks[:-1])
    assert [c.first_record for c in chunks] == list(range(0, 37, chunk_size))
    assert [v for c in chunks for v in c.records] == list(range(37))


def test_input_identity_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_bytes(b"\xef\xbb\xbfa\n1\n2\n")
    reader = read_chunks(str(path), "csv", 5)
    with pytest.raises(RuntimeError):
        _ = reader.input_identity
    assert [c.records for c in reader] == [[{"a": "1"}, {"a": "2"}]]
    identity = reader.input_identity
    assert identity.size == path.stat().st_size == reader.size
    assert identity.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == reader.sha256
    assert identity.records == 2


def test_a_reader_told_not_to_hash_gives_the_same_chunks(tmp_path: Path) -> None:
    """The split's reader (the run hashed its input when it started) skips the digest only."""
    path = tmp_path / "n.jsonl"
    path.write_bytes(b"1\n\n2\n3\n")
    found = []
    for hashing in (True, False):
        reader = read_chunks(str(path), "jsonl", 2, hashing=hashing)
        found.append([(c.index, c.count, c.payload) for c in reader.payload_chunks()])
        assert reader.size == path.stat().st_size and reader.records == 3
        assert bool(reader.sha256) == hashing
    assert found[0] == found[1]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_memory_does_not_grow_with_the_input(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"big.{fmt}"
    rows = [{"id": str(i), "text": f"a,b\n{i}" * 5} for i in range(120_000)]
    if fmt == "csv":
        path.write_text("id,text\n" + "".join(f'{r["id"]},"{r["text"]}"\n' for r in rows))
    elif fmt == "json":
        path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    else:
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    size = path.stat().st_size
    assert size > 6_000_000
    tracemalloc.start()
    try:
        count = sum(len(chunk.records) for chunk in read_chunks(str(path), fmt, 100))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(rows)
    # A block, a batch and a chunk: a reader holding the input (or its text) would pass 6 MB.
    assert peak < 4_000_000, f"peak {peak} bytes for a {size}-byte input"


def test_stream_errors_name_stdin() -> None:
    with pytest.raises(InputDataError, match=r"^<stdin>, line 1, column 1, record 1:"):
        list(read_chunks(io.BytesIO(b"x\n"), "jsonl", 1))


def test_format_detection() -> None:
    assert detect_format("a.JSON") == "json"
    assert detect_format("a.ndjson") == "jsonl"
    assert detect_format("dir.v2/a.Jsonl") == "jsonl"
    assert detect_format("a.txt", "CSV") == "csv"
    assert detect_format("-", "json") == "json"
    with pytest.raises(UsageError, match="--format"):
        detect_format("-")
    with pytest.raises(UsageError, match="extension"):
        detect_format("data.txt")
    with pytest.raises(UsageError, match="unknown format"):
        detect_format("a.json", "xml")


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        list(read_chunks(str(tmp_path / "nope.json"), "json", 2))


@pytest.mark.parametrize("block_size", [1, 3, 8, BLOCK_SIZE])
def test_jsonl_error_after_many_blank_lines_is_located_on_every_path(block_size: int) -> None:
    data = b"\n \n1\n\n2\n\r\n\n3\n4\n\t\n5\n\n6\n7,\n8\n"
    message = error(data, "jsonl", block_size)
    assert message.startswith("in.x, line 14, column 2, record 7: invalid JSON")


def test_a_record_json_cannot_store_again_is_an_input_error_not_a_lost_record() -> None:
    deep = "[" * 300 + "]" * 300
    data = f"[10, {deep}, 30, 40]".encode()
    reader = read_chunks(io.BytesIO(data), "json", 3, display_name="in.json")
    with pytest.raises(InputDataError) as caught:
        list(reader.payload_chunks())
    assert "record 2" in str(caught.value)


@pytest.mark.parametrize("block_size", [1, 7, BLOCK_SIZE])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_integers_past_64_bits_are_read_exactly(fmt: str, block_size: int) -> None:
    """RELIABILITY.md promise 14: orjson would round these to floats; the readers keep them."""
    numbers = [18446744073709551617, -9223372036854775809, 2**64 - 1, 10**40, 1.5]
    records = [{"n": number, "s": "12345678901234567890"} for number in numbers]
    text = "\n".join(json.dumps(record) for record in records)
    data = (text + "\n" if fmt == "jsonl" else "[" + text.replace("\n", ",") + "]").encode()
    found = values(data, fmt, block_size)
    assert found == records
    assert [type(record["n"]) for record in found] == [int, int, int, int, float]


@pytest.mark.parametrize("block_size", [1, 3, 16, BLOCK_SIZE])
def test_a_json_lines_record_past_the_maximum_size(block_size: int) -> None:
    """Promise 15: a line of exactly `max_record_size` bytes is read, one byte more is located,
    however the line falls across the read blocks."""
    fits, past = b'"' + b"x" * 8 + b'"', b'"' + b"y" * 9 + b'"'
    assert values(b"1\n\n" + fits + b"\n", "jsonl", block_size, max_record_size=10) == [1, "x" * 8]
    message = error(
        b"1\n\n" + fits + b"\n" + past + b"\n2\n", "jsonl", block_size, max_record_size=10
    )
    assert message == (
        "in.x, line 4, record 3: record longer than the maximum record size "
        "(10 bytes; the split's max_record_size sets it)"
    )
    unterminated = error(b"1\n" + past, "jsonl", block_size, max_record_size=10)
    assert "line 2, record 2: record longer" in unterminated
