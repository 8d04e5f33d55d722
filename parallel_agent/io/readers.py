"""Streaming readers for JSON (an array, or an object holding one), JSON Lines and CSV.

Every reader reads the input in blocks, so memory does not grow with the input, hashes the raw bytes
as it goes (the input's identity for resume), and reports malformed data as an `InputDataError` that
names the file, line, column and record number.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from parallel_agent.errors import InputDataError, Location, UsageError
from parallel_agent.io.records import Chunk

Format = Literal["json", "jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("json", "jsonl", "csv")
BLOCK_SIZE = 1 << 20
_EXTENSIONS: dict[str, Format] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}


def detect_format(path: str, explicit: str | None = None) -> Format:
    """The format named by `--format`, else by the file's extension."""
    if explicit is not None:
        lowered = explicit.lower()
        if lowered not in FORMATS:
            raise UsageError(f"unknown format '{explicit}'; use one of: {', '.join(FORMATS)}")
        return lowered
    if path == "-":
        raise UsageError("reading from stdin (-): pass --format json, jsonl or csv")
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise UsageError(
            f"cannot tell the format of '{path}' from its extension; "
            "pass --format json, jsonl or csv"
        )
    return _EXTENSIONS[suffix]


class _HashingSource:
    """Reads blocks from a file or stream, counting and hashing the bytes it hands out."""

    def __init__(self, source: str | BinaryIO, block_size: int) -> None:
        self.block_size = block_size
        self.hasher = hashlib.sha256()
        self.size = 0
        if isinstance(source, str):
            try:
                self.stream: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
            self.owned = True
        else:
            self.stream = source
            self.owned = False

    def blocks(self) -> Iterator[bytes]:
        """Blocks of input; the first holds at least 3 bytes when the input does (a whole BOM)."""
        first = True
        while True:
            block = self.stream.read(self.block_size)
            while first and block and len(block) < 3:
                more = self.stream.read(self.block_size)
                if not more:
                    break
                block += more
            first = False
            if not block:
                return
            self.hasher.update(block)
            self.size += len(block)
            yield block

    def close(self) -> None:
        if self.owned:
            self.stream.close()


class ChunkReader:
    """Iterates an input as `Chunk`s of `chunk_size` records; after the end, `size`, `sha256` and
    `records` describe what was read."""

    def __init__(
        self,
        source: str | BinaryIO,
        fmt: Format,
        chunk_size: int,
        *,
        data_key: str = "data",
        display_name: str | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise UsageError("chunk_size must be at least 1")
        self.source = source
        self.fmt = fmt
        self.chunk_size = chunk_size
        self.data_key = data_key
        self.name = display_name or (source if isinstance(source, str) else "<stdin>")
        self.block_size = block_size
        self.size = 0
        self.sha256 = ""
        self.records = 0

    def __iter__(self) -> Iterator[Chunk]:
        source = _HashingSource(self.source, self.block_size)
        try:
            values = _VALUE_READERS[self.fmt](source, self.name, self.data_key)
            batch: list[Any] = []
            index = first = 0
            for value in values:
                batch.append(value)
                if len(batch) >= self.chunk_size:
                    yield Chunk(index, first, batch)
                    index += 1
                    first += len(batch)
                    batch = []
            if batch:
                yield Chunk(index, first, batch)
                first += len(batch)
            self.records = first
            self.size = source.size
            self.sha256 = source.hasher.hexdigest()
        finally:
            source.close()


def read_chunks(
    source: str | BinaryIO,
    fmt: Format | str,
    chunk_size: int,
    *,
    data_key: str = "data",
    display_name: str | None = None,
    block_size: int = BLOCK_SIZE,
) -> ChunkReader:
    """A streaming reader of `source` in chunks of `chunk_size` records."""
    return ChunkReader(
        source,
        detect_format("", fmt),
        chunk_size,
        data_key=data_key,
        display_name=display_name,
        block_size=block_size,
    )


def iter_records(
    source: str | BinaryIO,
    fmt: Format | str,
    *,
    data_key: str = "data",
    display_name: str | None = None,
    block_size: int = BLOCK_SIZE,
) -> Iterator[Any]:
    """Every record's value, streamed."""
    for chunk in read_chunks(
        source, fmt, 4096, data_key=data_key, display_name=display_name, block_size=block_size
    ):
        yield from chunk.records


def _error(
    name: str, message: str, line: int | None, column: int | None, record: int | None
) -> InputDataError:
    return InputDataError(message, location=Location(name, line, column, record))


def _json_reason(exc: orjson.JSONDecodeError) -> str:
    return str(exc.msg).rstrip(": ") if getattr(exc, "msg", None) else str(exc)


# ---- JSON Lines ---------------------------------------------------------------------------------


def _read_jsonl(source: _HashingSource, name: str, data_key: str) -> Iterator[Any]:
    loads = orjson.loads
    carry = b""
    line_number = 0
    record = 0
    first = True
    for block in source.blocks():
        if first:
            if block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8) :]
            first = False
        data = carry + block
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        carry = data[cut + 1 :]
        lines = data[:cut].split(b"\n")
        try:
            values = [loads(line) for line in lines if line.strip()]
        except orjson.JSONDecodeError:
            values = None
        if values is None:
            _locate_jsonl_error(lines, name, line_number, record)
        else:
            line_number += len(lines)
            record += len(values)
            yield from values
    if carry.strip():
        try:
            value = loads(carry)
        except orjson.JSONDecodeError:
            _locate_jsonl_error([carry], name, line_number, record)
        yield value


def _locate_jsonl_error(lines: list[bytes], name: str, line_number: int, record: int) -> None:
    for offset, line in enumerate(lines):
        if not line.strip():
            continue
        record += 1
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise _error(
                name,
                f"invalid JSON: {_json_reason(exc)}",
                line_number + offset + 1,
                exc.colno,
                record,
            ) from None
    raise AssertionError("no invalid line found")  # pragma: no cover - caller saw one fail


# ---- JSON (streamed array) ----------------------------------------------------------------------

_WS = re.compile(rb"[ \t\r\n]*")
_STRING_TAIL = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)
_STRUCTURE = re.compile(rb'["\[\]{}]')
_SCALAR_END = re.compile(rb"[,\]}\s]")


class _JsonScanner:
    """Finds where JSON values end in a growing buffer, tracking lines for error messages."""

    def __init__(self, source: _HashingSource, name: str) -> None:
        self.blocks = source.blocks()
        self.name = name
        self.buf = b""
        self.pos = 0
        self.line_base = 1  # line of buf[0]
        self.column_base = 1  # column of buf[0]
        self.eof = False
        self.started = False

    def more(self) -> bool:
        """Append the next block (dropping consumed bytes); False at end of input."""
        if self.eof:
            return False
        block = next(self.blocks, None)
        if block is None:
            self.eof = True
            return False
        if not self.started:
            self.started = True
            if block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8) :]
        consumed = self.buf[: self.pos]
        newlines = consumed.count(b"\n")
        if newlines:
            self.line_base += newlines
            self.column_base = len(consumed) - consumed.rfind(b"\n")
        else:
            self.column_base += len(consumed)
        self.buf = self.buf[self.pos :] + block
        self.pos = 0
        return True

    def where(self, offset: int) -> tuple[int, int]:
        """Line and column of buf[offset]."""
        newlines = self.buf.count(b"\n", 0, offset)
        if newlines:
            return self.line_base + newlines, offset - self.buf.rfind(b"\n", 0, offset)
        return self.line_base, self.column_base + offset

    def fail(self, message: str, offset: int, record: int | None) -> InputDataError:
        line, column = self.where(offset)
        return _error(self.name, message, line, column, record)

    def skip_ws(self) -> int | None:
        """Advance past whitespace; return the next byte or None at end of input."""
        while True:
            match = _WS.match(self.buf, self.pos)
            assert match is not None
            self.pos = match.end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return None

    def value_end(self, record: int | None) -> int:
        """End offset of the JSON value starting at pos (reading more input as needed)."""
        start = self.pos
        while True:
            end = self._scan(start)
            if end is not None:
                return end
            offset = start - self.pos
            if not self.more():
                end = self._scan(self.pos + offset)
                if end is not None:
                    return end
                raise self.fail("unexpected end of data inside a value", len(self.buf), record)
            start = self.pos + offset

    def _scan(self, start: int) -> int | None:
        buf = self.buf
        first = buf[start]
        if first == 0x22:  # a string
            match = _STRING_TAIL.match(buf, start + 1)
            return match.end() if match else None
        if first not in b"[{":
            match = _SCALAR_END.search(buf, start)
            return match.start() if match else (None if not self.eof else len(buf))
        depth = 0
        position = start
        while True:
            match = _STRUCTURE.search(buf, position)
            if match is None:
                return None
            char = buf[match.start()]
            if char == 0x22:
                tail = _STRING_TAIL.match(buf, match.end())
                if tail is None:
                    return None
                position = tail.end()
                continue
            depth += 1 if char in b"[{" else -1
            position = match.end()
            if depth == 0:
                return position

    def parse(self, end: int, record: int | None) -> Any:
        start = self.pos
        try:
            value = orjson.loads(self.buf[start:end])
        except orjson.JSONDecodeError as exc:
            raise self.fail(f"invalid JSON: {_json_reason(exc)}", start + exc.pos, record) from None
        self.pos = end
        return value


def _read_json(source: _HashingSource, name: str, data_key: str) -> Iterator[Any]:
    scanner = _JsonScanner(source, name)
    first = scanner.skip_ws()
    if first is None:
        raise _error(name, "empty input: expected a JSON array or object", 1, 1, None)
    if first == ord("{"):
        _find_key(scanner, data_key)
    elif first != ord("["):
        raise scanner.fail(
            f"expected a JSON array of records or an object holding one under '{data_key}'",
            scanner.pos,
            None,
        )
    yield from _stream_array(scanner)
    if first == ord("{"):
        _finish_object(scanner)
    if scanner.skip_ws() is not None:
        raise scanner.fail("unexpected data after the end of the JSON document", scanner.pos, None)


def _stream_array(scanner: _JsonScanner) -> Iterator[Any]:
    scanner.pos += 1  # the opening bracket
    record = 0
    if scanner.skip_ws() == ord("]"):
        scanner.pos += 1
        return
    while True:
        nxt = scanner.skip_ws()
        if nxt is None:
            raise scanner.fail(
                "unterminated array: expected a value or ']'", len(scanner.buf), record + 1
            )
        record += 1
        if nxt in b",]}":
            raise scanner.fail("expected a record (a JSON value)", scanner.pos, record)
        end = scanner.value_end(record)
        yield scanner.parse(end, record)
        nxt = scanner.skip_ws()
        if nxt == ord(","):
            scanner.pos += 1
            continue
        if nxt == ord("]"):
            scanner.pos += 1
            return
        if nxt is None:
            raise scanner.fail("unterminated array: expected ',' or ']'", len(scanner.buf), record)
        raise scanner.fail("expected ',' or ']' after a record", scanner.pos, record)


def _find_key(scanner: _JsonScanner, data_key: str) -> None:
    """Advance through the top-level object to the array under `data_key`."""
    scanner.pos += 1
    while True:
        nxt = scanner.skip_ws()
        if nxt != ord('"'):
            if nxt == ord("}"):
                raise scanner.fail(f"the JSON object has no '{data_key}' array", scanner.pos, None)
            raise scanner.fail(
                "expected a key in the JSON object", scanner.pos if nxt else len(scanner.buf), None
            )
        key = scanner.parse(scanner.value_end(None), None)
        if scanner.skip_ws() != ord(":"):
            raise scanner.fail("expected ':' after a key", scanner.pos, None)
        scanner.pos += 1
        value_start = scanner.skip_ws()
        if value_start is None:
            raise scanner.fail("unexpected end of data", len(scanner.buf), None)
        if key == data_key:
            if value_start != ord("["):
                raise scanner.fail(f"'{data_key}' must hold an array of records", scanner.pos, None)
            return
        scanner.parse(scanner.value_end(None), None)
        nxt = scanner.skip_ws()
        if nxt == ord(","):
            scanner.pos += 1
            continue
        raise scanner.fail(
            f"the JSON object has no '{data_key}' array",
            scanner.pos if nxt else len(scanner.buf),
            None,
        )


def _finish_object(scanner: _JsonScanner) -> None:
    while True:
        nxt = scanner.skip_ws()
        if nxt == ord("}"):
            scanner.pos += 1
            return
        if nxt != ord(","):
            raise scanner.fail(
                "expected ',' or '}' in the JSON object",
                scanner.pos if nxt else len(scanner.buf),
                None,
            )
        scanner.pos += 1
        scanner.skip_ws()
        scanner.parse(scanner.value_end(None), None)
        if scanner.skip_ws() != ord(":"):
            raise scanner.fail("expected ':' after a key", scanner.pos, None)
        scanner.pos += 1
        scanner.skip_ws()
        scanner.parse(scanner.value_end(None), None)


# ---- CSV ----------------------------------------------------------------------------------------


class _LineCounter:
    """Feeds decoded lines to csv.reader while counting physical lines, so errors are located."""

    def __init__(self, source: _HashingSource, name: str) -> None:
        self.lines_iter = self._split(source)
        self.name = name
        self.lines = 0

    @staticmethod
    def _split(source: _HashingSource) -> Iterator[bytes]:
        carry = b""
        for block in source.blocks():
            parts = (carry + block).split(b"\n")
            carry = parts.pop()
            for part in parts:
                yield part + b"\n"
        if carry:
            yield carry

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = next(self.lines_iter)
        self.lines += 1
        if self.lines == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error(
                self.name, f"invalid UTF-8 ({exc.reason})", self.lines, exc.start + 1, None
            ) from None


def _read_csv(source: _HashingSource, name: str, data_key: str) -> Iterator[Any]:
    lines = _LineCounter(source, name)
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    record = 0
    while True:
        start_line = lines.lines + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            text = str(exc)
            if "unexpected end of data" in text or "EOF" in text:
                raise _error(
                    name,
                    "unterminated quoted field (the quote opens on this line)",
                    start_line,
                    None,
                    record + 1 if header else None,
                ) from None
            raise _error(
                name, f"malformed CSV: {text}", lines.lines, None, record + 1 if header else None
            ) from None
        if not row or (len(row) == 1 and row[0] == "" and lines.lines == start_line):
            continue
        if header is None:
            _check_header(row, name, start_line)
            header = row
            continue
        record += 1
        if len(row) != len(header):
            raise _error(
                name,
                f"expected {len(header)} fields as in the header, found {len(row)}",
                start_line,
                None,
                record,
            )
        yield dict(zip(header, row, strict=True))


def _check_header(row: list[str], name: str, line: int) -> None:
    seen: set[str] = set()
    for position, field in enumerate(row, start=1):
        if not field.strip():
            raise _error(name, f"header field {position} is empty", line, None, None)
        if field in seen:
            raise _error(name, f"header field '{field}' appears twice", line, None, None)
        seen.add(field)


_VALUE_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}
