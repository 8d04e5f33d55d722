"""Streaming readers for JSON (an array, or an object holding one), JSON Lines and CSV.

Every reader reads the input in blocks (64 KiB by default), so memory does not grow with the input;
hashes the raw bytes as it goes (the input's identity for resume); and reports malformed data as an
`InputDataError` whose text is `path, line L, column C, record R: what is wrong`. Lines, columns and
records are 1-based; columns count characters.

Readers produce *batches* (a list of values per block, plus the line each value starts on when that
was asked for) so the hot path stays inside orjson and list operations, with no Python work per
record beyond what the format needs.

CSV values stay strings: the header row names the fields and no type is guessed, so a value
round-trips exactly (a zip code "02134" keeps its zero).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from parallel_agent.errors import InputDataError, Location, UsageError
from parallel_agent.io.records import Chunk, InputIdentity, PayloadChunk, Record
from parallel_agent.jsonl import (
    MAX_DEPTH,
    check_jsonl,
    encode_lines,
    first_too_deep,
    lines_round_trip,
    loads,
    too_deep,
)

Format = Literal["json", "jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("json", "jsonl", "csv")
#: Bytes read at a time: 64 KiB keeps a block's parsed records in the CPU cache (faster than 1 MiB).
BLOCK_SIZE = 1 << 16
#: The longest record read by default (a JSON Lines line, a JSON array's value): 64 MiB. A longer
#: one is a located error (exit 3), so a runaway line cannot take the machine's memory.
MAX_RECORD_SIZE = 64 << 20
_BOM = b"\xef\xbb\xbf"
_EXTENSIONS: dict[str, Format] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}

# Parsed values and, when asked for, the line each one starts on.
_Batch = tuple[list[Any], Sequence[int] | None]


def _too_long(
    name: str, limit: int, line: int | None, column: int | None, record: int | None
) -> InputDataError:
    return _located(
        name,
        f"record longer than the maximum record size ({limit:,} bytes; "
        "the split's max_record_size sets it)",
        line,
        column,
        record,
    )


def detect_format(path: str, explicit: str | None = None) -> Format:
    """The format named by `--format`, else by the file's extension; stdin (`-`) needs `--format`."""
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


def _empty(name: str, expected: str) -> InputDataError:
    """An input with nothing in it (no bytes, or only blank lines): refused in every format, so
    an upstream step that wrote nothing is noticed; `[]` or a header-only CSV is 0 records."""
    return _located(name, f"empty input: {expected}", 1, 1, None)


def _located(
    name: str, message: str, line: int | None, column: int | None, record: int | None
) -> InputDataError:
    return InputDataError(message, location=Location(name, line, column, record))


def _chars(data: bytes) -> int:
    """Characters in `data` (columns count characters, as editors show them)."""
    return len(data.decode("utf-8", "replace"))


def _explain_json(text: bytes, exc: orjson.JSONDecodeError) -> tuple[str, int]:
    """What is wrong with `text` and the byte offset where, preferring the UTF-8 error orjson hides."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 ({bad.reason})", bad.start
    reason = str(getattr(exc, "msg", "") or exc)
    return f"invalid JSON: {reason}", len(decoded[: exc.pos].encode("utf-8"))


class _Source:
    """Hands out the input in blocks, counting (and, unless told not to, hashing) the raw bytes
    on the way."""

    def __init__(self, source: str | BinaryIO, block_size: int, hashing: bool = True) -> None:
        self.block_size = block_size
        self.hasher = hashlib.sha256() if hashing else None
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
        """Blocks of input, the UTF-8 byte order mark dropped from the first (the hash keeps it)."""
        first = True
        while True:
            block = self.stream.read(self.block_size)
            if first:
                while block and len(block) < len(_BOM):
                    more = self.stream.read(self.block_size)
                    if not more:
                        break
                    block += more
            if not block:
                return
            if self.hasher is not None:
                self.hasher.update(block)
            self.size += len(block)
            if first:
                first = False
                if block.startswith(_BOM):
                    block = block[len(_BOM) :]
                    if not block:
                        continue
            yield block

    def close(self) -> None:
        if self.owned:
            self.stream.close()


class ChunkReader:
    """Iterates an input as `Chunk`s of `chunk_size` records.

    Once iteration has finished, `size`, `sha256`, `records` and `input_identity` describe what was
    read. Iterating again re-reads a path; a stream can be read once.
    """

    def __init__(
        self,
        source: str | BinaryIO,
        fmt: Format,
        chunk_size: int,
        *,
        data_key: str = "data",
        display_name: str | None = None,
        block_size: int = BLOCK_SIZE,
        max_record_size: int = MAX_RECORD_SIZE,
        hashing: bool = True,
    ) -> None:
        if chunk_size < 1:
            raise UsageError("chunk_size must be at least 1")
        self.max_record_size = max_record_size
        self.source = source
        self.fmt = fmt
        self.chunk_size = chunk_size
        self.data_key = data_key
        self.name = display_name or (source if isinstance(source, str) else "<stdin>")
        self.block_size = block_size
        self.hashing = hashing
        """False: `sha256` stays empty (a caller that knows the input's digest already)."""
        self.size = 0
        self.sha256 = ""
        self.records = 0
        self.complete = False

    @property
    def input_identity(self) -> InputIdentity:
        """Size, SHA-256 and record count of the whole input; only known after reading to the end."""
        if not self.complete:
            raise RuntimeError("the input identity is known only after reading to the end")
        return InputIdentity(self.size, self.sha256, self.records)

    def __iter__(self) -> Iterator[Chunk]:
        size = self.chunk_size
        index = first = 0
        pending: list[Any] = []
        for values, _ in self._batches(locate=False):
            if pending:
                taken = size - len(pending)
                pending.extend(values[:taken])
                if len(pending) < size:
                    continue
                values = values[taken:]
                yield Chunk(index, first, pending)
                index += 1
                first += size
            start = 0
            while len(values) - start >= size:
                yield Chunk(index, first, values[start : start + size])
                index += 1
                first += size
                start += size
            pending = values[start:] if start else values
        if pending:
            yield Chunk(index, first, pending)

    def payload_chunks(self, *, check: bool = True) -> Iterator[PayloadChunk]:
        """Chunks as the run store keeps them (JSON Lines bytes). JSON Lines input is passed on
        as read, never re-encoded; with `check=False` its lines are not parsed here, and the caller
        must run `check_jsonl` on every payload (worker processes do, in parallel)."""
        if self.fmt != "jsonl":
            for chunk in self:
                payload, bad = encode_lines(chunk.records)
                if bad:
                    number = chunk.first_record + bad[0][0] + 1
                    raise _located(
                        self.name,
                        f"nested deeper than {MAX_DEPTH} levels",
                        None,
                        None,
                        number,
                    )
                yield PayloadChunk(chunk.index, chunk.first_record, len(chunk.records), payload)
            return
        self.complete = False
        source = _Source(self.source, self.block_size, self.hashing)
        try:
            yield from self._jsonl_payloads(source, check)
        finally:
            source.close()
        self.size = source.size
        self.sha256 = source.hasher.hexdigest() if source.hasher is not None else ""
        self.complete = True

    def _jsonl_payloads(self, source: _Source, check: bool) -> Iterator[PayloadChunk]:
        """The input's non-blank lines, `chunk_size` at a time, as slices of the blocks read:
        no line is copied on its own, only each chunk's payload once (C-level counts find
        where a chunk ends)."""
        size = self.chunk_size
        index = record = 0
        parts: list[memoryview] = []  # the pending records' text, whole lines each
        pending = 0  # records in parts
        first_line = 1  # the line of the first pending record
        blanks: collections.deque[int] = collections.deque()  # blank lines after first_line
        for body, count, start, block_blanks in _jsonl_bodies(
            source, self.name, self.max_record_size
        ):
            if not pending:
                first_line = start
                blanks = collections.deque(blank for blank in block_blanks if blank > start)
            else:
                blanks.extend(block_blanks)
            offset = 0
            while pending + count >= size:
                taken = size - pending
                end = _end_of_lines(body, offset, taken, count)
                parts.append(memoryview(body)[offset:end])
                last = _line_of(first_line, blanks, size - 1)
                inside = _before(blanks, last)
                yield self._payload(index, record, size, parts, first_line, inside, check)
                first_line = _line_of(first_line, blanks, size)
                while blanks and blanks[0] <= first_line:
                    blanks.popleft()
                parts, pending = [], 0
                offset, count = end + 1, count - taken
                index += 1
                record += size
            if count:
                parts.append(memoryview(body)[offset:])
                pending += count
        if pending:
            yield self._payload(index, record, pending, parts, first_line, list(blanks), check)
            record += pending
        if record == 0:
            raise _empty(self.name, "expected JSON Lines records")
        self.records = record

    def _payload(
        self,
        index: int,
        first: int,
        count: int,
        parts: list[memoryview],
        first_line: int,
        blanks: list[int],
        check: bool,
    ) -> PayloadChunk:
        parts.append(memoryview(b""))  # the payload ends with a newline, joined in one copy
        payload = b"\n".join(parts)
        chunk = PayloadChunk(index, first, count, payload, first_line, tuple(blanks))
        if check:
            bad = check_jsonl(chunk.payload)
            if bad is not None:
                raise self.jsonl_error(chunk, bad)
        return chunk

    def jsonl_error(self, chunk: PayloadChunk, position: int) -> InputDataError:
        """The located error for the record at `position` of a chunk that `check_jsonl` refused."""
        text = chunk.payload.split(b"\n")[position]
        line = _line_of(chunk.first_line, chunk.blank_lines, position)
        return _jsonl_error(text, self.name, line, chunk.first_record + position + 1)

    def iter_records(self) -> Iterator[Record]:
        """Every record with its number and the line it starts on (slower than chunks for JSON)."""
        number = 0
        for values, starts in self._batches(locate=True):
            assert starts is not None
            for line, value in zip(starts, values, strict=True):
                number += 1
                yield Record(number, line, value)

    def _batches(self, *, locate: bool) -> Iterator[_Batch]:
        self.complete = False
        source = _Source(self.source, self.block_size, self.hashing)
        count = 0
        try:
            read = _READERS[self.fmt]
            for batch in read(source, self.name, self.data_key, locate, self.max_record_size):
                count += len(batch[0])
                yield batch
        finally:
            source.close()
        self.size = source.size
        self.sha256 = source.hasher.hexdigest() if source.hasher is not None else ""
        self.records = count
        self.complete = True


def read_chunks(
    source: str | BinaryIO,
    fmt: Format | str,
    chunk_size: int,
    *,
    data_key: str = "data",
    display_name: str | None = None,
    block_size: int = BLOCK_SIZE,
    max_record_size: int = MAX_RECORD_SIZE,
    hashing: bool = True,
) -> ChunkReader:
    """A streaming reader of `source` (a path or a binary stream) in chunks of `chunk_size` records."""
    return ChunkReader(
        source,
        detect_format("", fmt),
        chunk_size,
        data_key=data_key,
        display_name=display_name,
        block_size=block_size,
        max_record_size=max_record_size,
        hashing=hashing,
    )


def iter_records(
    source: str | BinaryIO,
    fmt: Format | str,
    *,
    data_key: str = "data",
    display_name: str | None = None,
    block_size: int = BLOCK_SIZE,
    max_record_size: int = MAX_RECORD_SIZE,
) -> Iterator[Record]:
    """Every record of `source` as a `Record(number, line, value)`, streamed."""
    reader = read_chunks(
        source,
        fmt,
        1,
        data_key=data_key,
        display_name=display_name,
        block_size=block_size,
        max_record_size=max_record_size,
    )
    return reader.iter_records()


# ---- JSON Lines ---------------------------------------------------------------------------------


def _read_jsonl(
    source: _Source, name: str, data_key: str, locate: bool, max_record: int
) -> Iterator[_Batch]:
    """One orjson call per line and nothing else per line, unless a line is bad."""
    record = 0
    for joined, count, first, blanks in _jsonl_bodies(source, name, max_record):
        texts = joined.split(b"\n") if count else []
        try:
            try:
                values = list(map(orjson.loads, texts))
            except orjson.JSONDecodeError:  # maybe a number past the double range: read exactly
                values = list(map(loads, texts))
            else:
                if not lines_round_trip(joined, texts, values):  # read them exactly
                    values = list(map(loads, texts))
            position = first_too_deep(joined, texts)
        except orjson.JSONDecodeError:
            position = check_jsonl(joined)
            assert position is not None
        if position is not None:
            line = _line_of(first, blanks, position)
            raise _jsonl_error(texts[position], name, line, record + position + 1) from None
        record += len(values)
        yield values, (_lines_of(first, blanks, len(texts)) if locate else None)
    if record == 0:
        raise _empty(name, "expected JSON Lines records")


#: A blank line in "\n" + block + "\n" (a literal first byte keeps the search fast).
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def _has_blank_line(body: bytes) -> bool:
    """True when one of the lines of `body` (no final newline) is empty or only whitespace:
    between two newlines, or the first or the last line."""
    if _BLANK_LINE.search(body) is not None:
        return True
    first = body.find(b"\n")
    if not (body if first < 0 else body[:first]).strip():
        return True
    return not body[body.rfind(b"\n") + 1 :].strip()


def _jsonl_bodies(
    source: _Source, name: str, max_record: int
) -> Iterator[tuple[bytes, int, int, list[int]]]:
    """Each block's non-blank lines as one text (no final newline), how many there are, the
    line number of the first, and the blank lines' numbers, without parsing anything. A line
    longer than `max_record` bytes is an error.

    A line that spans blocks is kept as its pieces and joined once it ends, and only the new
    block is searched for its end, so reading stays linear in the line's length. Only a block
    with a blank line is split into its lines.
    """
    pieces: list[bytes] = []  # the unfinished last line
    pending = 0  # its length
    line = 1
    records = 0  # non-blank lines handed out
    for block in source.blocks():
        cut = block.rfind(b"\n")
        if cut < 0:
            pieces.append(block)
            pending += len(block)
            if pending > max_record:
                raise _too_long(name, max_record, line, None, records + 1)
            continue
        body = block[:cut]
        if pieces:
            pieces.append(body)
            body = b"".join(pieces)
        rest = block[cut + 1 :]
        pieces, pending = ([rest], len(rest)) if rest else ([], 0)
        if len(body) > max_record:
            _check_lengths(body.split(b"\n"), name, max_record, line, records)
        if not _has_blank_line(body):
            count = body.count(b"\n") + 1
            records += count
            yield body, count, line, []
            line += count
            continue
        texts = body.split(b"\n")
        blank = [line + n for n, text in enumerate(texts) if not text.strip()]
        kept = [text for text in texts if text.strip()]
        if kept:
            first = next(line + n for n, text in enumerate(texts) if text.strip())
            records += len(kept)
            yield b"\n".join(kept), len(kept), first, blank
        else:
            yield b"", 0, line, blank
        line += len(texts)
    if pending > max_record:
        raise _too_long(name, max_record, line, None, records + 1)
    carry = b"".join(pieces)
    if carry.strip():
        yield carry, 1, line, []


def _end_of_lines(body: bytes, start: int, lines: int, total: int) -> int:
    """The offset in `body` where the first `lines` of its `total` lines from `start` end (the
    newline after them, or the end of `body`).

    The offset is guessed from the mean line length and corrected with C-level counts, halving
    the range each time, so finding it costs a few scans of the range, not a step per line."""
    if lines >= total:
        return len(body)
    low, high = start, len(body)  # the end lies in [low, high): after `below` newlines
    below, above = 0, total - 1  # newlines before low, and in [low, high)
    wanted = lines  # the wanted newline is the `wanted`-th counted from `start`
    # Within a few lines of the end, walking to it is cheaper than counting an eighth of the rest.
    while high - low > 256 and wanted - below > 32:
        span = high - low
        guess = low + span * (wanted - below) // (above + 1)
        # At least an eighth of the range goes each time, however uneven the lines.
        guess = min(max(guess, low + span // 8), high - span // 8)
        counted = body.count(b"\n", low, guess)
        if below + counted >= wanted:
            high, above = guess, counted
        else:
            low, below, above = guess, below + counted, above - counted
    position = low - 1
    for _ in range(wanted - below):
        position = body.find(b"\n", position + 1, high)
    return position


def _check_lengths(texts: list[bytes], name: str, limit: int, line: int, records: int) -> None:
    """Refuse the first of `texts` (lines from `line` on, after `records` records) over `limit`."""
    if max(map(len, texts)) <= limit:
        return
    for offset, text in enumerate(texts):
        if len(text) > limit:
            before = sum(1 for earlier in texts[:offset] if earlier.strip())
            raise _too_long(name, limit, line + offset, None, records + before + 1)


def _before(blanks: Iterable[int], line: int) -> list[int]:
    """The blank lines (ascending) before `line`, read no further than needed."""
    found: list[int] = []
    for blank in blanks:
        if blank >= line:
            break
        found.append(blank)
    return found


def _line_of(first_line: int, blanks: Sequence[int], position: int) -> int:
    """The line of the record at `position` (0-based) after the one on `first_line`."""
    return _lines_of(first_line, blanks, position + 1)[-1]


def _lines_of(first_line: int, blanks: Sequence[int], count: int) -> Sequence[int]:
    """The lines of `count` records from `first_line` on, skipping the `blanks` (ascending; any
    before `first_line` are ignored)."""
    if not blanks:
        return range(first_line, first_line + count)
    lines: list[int] = []
    line, pending = first_line, iter(blanks)
    blank = next(pending, None)
    while len(lines) < count:
        while blank is not None and blank < line:
            blank = next(pending, None)
        if blank != line:
            lines.append(line)
        line += 1
    return lines


def _jsonl_error(text: bytes, name: str, line: int, record: int) -> InputDataError:
    """The located error for one malformed line; `record` is its 1-based record number."""
    try:
        loads(text)
    except orjson.JSONDecodeError as exc:
        message, at = _explain_json(text, exc)
        return _located(name, message, line, _chars(text[:at]) + 1, record)
    if too_deep(text):
        return _located(name, f"nested deeper than {MAX_DEPTH} levels", line, 1, record)
    raise AssertionError("a line failed to parse once but not twice")


# ---- JSON (a streamed array) --------------------------------------------------------------------

_WS = re.compile(rb"[ \t\r\n]*")
_STRUCTURE = re.compile(rb'["\[\]{}]')
_SCALAR_END = re.compile(rb"[,\]}\s]")
_COMMA, _COLON, _QUOTE, _BACKSLASH = ord(","), ord(":"), ord('"'), ord("\\")
_OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT = b"[]{}"
#: Commas tried (from the end of the buffer) when looking for one between two records.
_COMMA_TRIES = 10_000


def _string_end(buf: bytes, start: int) -> int | None:
    """The offset after the quote that closes a JSON string whose text starts at `start`, or None
    if the buffer ends first. bytes.find jumps from quote to quote (a regex walks byte by byte,
    too slow for a string of many megabytes); a quote after an odd run of backslashes is escaped."""
    position = start
    while True:
        quote = buf.find(b'"', position)
        if quote < 0:
            return None
        before = quote
        while before > start and buf[before - 1] == _BACKSLASH:
            before -= 1
        if (quote - before) % 2 == 0:
            return quote + 1
        position = quote + 1


def _depth(buf: bytes, start: int, end: int) -> int:
    """Brackets opened minus closed in buf[start:end], ignoring that some may sit in strings."""
    return (
        buf.count(b"[", start, end)
        + buf.count(b"{", start, end)
        - buf.count(b"]", start, end)
        - buf.count(b"}", start, end)
    )


class _JsonScanner:
    """Finds where JSON values end in a sliding buffer and knows the line and column of any byte.

    Two ways through an array: `fast_batch` guesses the last comma between records in the buffer
    (bracket counts with bytes.count) and parses everything before it with one orjson call; the
    guess is proved right by the parse itself, because `[` + span + `]` is valid JSON only if the
    span is whole records. Otherwise (a bracket inside a string, bad data, line numbers wanted)
    `value_end` walks one record at a time, jumping over strings with a regex.
    """

    def __init__(self, source: _Source, name: str, max_record: int = MAX_RECORD_SIZE) -> None:
        self.max_record = max_record
        self.blocks = source.blocks()
        self.block_size = source.block_size
        self.name = name
        self.buf = b""
        self.pos = 0
        self.offset = 0  # input offset of buf[0]
        self.line_base = 1  # line of buf[0]
        self.column_base = 1  # column of buf[0]
        self.eof = False
        self.careful_until = 0  # input offset before which fast_batch is not tried again
        self.line_pos = 0  # line_at's cursor: buf[line_pos] is on line line_no
        self.line_no = 1

    def more(self, wanted: int = 0) -> bool:
        """Append the next block (or blocks, joined once, up to `wanted` bytes), dropping what was
        consumed; False at the end of input."""
        if self.eof:
            return False
        blocks: list[bytes] = []
        got = 0
        while not blocks or got < wanted:
            block = next(self.blocks, None)
            if block is None:
                self.eof = True
                break
            blocks.append(block)
            got += len(block)
        if not blocks:
            return False
        block = b"".join(blocks)
        consumed = self.buf[: self.pos]
        newline = consumed.rfind(b"\n")
        if newline >= 0:
            self.line_base += consumed.count(b"\n")
            self.column_base = 1 + _chars(consumed[newline + 1 :])
        else:
            self.column_base += _chars(consumed)
        self.offset += self.pos
        self.buf = self.buf[self.pos :] + block
        self.pos = 0
        self.line_pos, self.line_no = 0, self.line_base
        return True

    def where(self, offset: int) -> tuple[int, int]:
        """Line and column of buf[offset]."""
        newline = self.buf.rfind(b"\n", 0, offset)
        if newline >= 0:
            line = self.line_base + self.buf.count(b"\n", 0, offset)
            return line, _chars(self.buf[newline + 1 : offset]) + 1
        return self.line_base, self.column_base + _chars(self.buf[:offset])

    def line_at(self, offset: int) -> int:
        """Line of buf[offset], counting on from the last call (offsets only grow)."""
        self.line_no += self.buf.count(b"\n", self.line_pos, offset)
        self.line_pos = offset
        return self.line_no

    def fail(self, message: str, offset: int, record: int | None) -> InputDataError:
        line, column = self.where(offset)
        return _located(self.name, message, line, column, record)

    def skip_ws(self) -> int | None:
        """Advance past whitespace; return the next byte, or None at the end of input."""
        while True:
            match = _WS.match(self.buf, self.pos)
            assert match is not None
            self.pos = match.end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return None

    def fast_batch(self) -> list[Any] | None:
        """Every record from pos to the last comma between records in the buffer, or None."""
        if self.offset + self.pos < self.careful_until:
            return None
        while len(self.buf) - self.pos < self.block_size and self.more():
            pass
        buf, start = self.buf, self.pos
        cut = buf.rfind(b",", start)
        if cut < 0:
            return None
        depth = _depth(buf, start, cut)
        for _ in range(_COMMA_TRIES):
            if depth == 0:
                break
            previous = cut
            cut = buf.rfind(b",", start, previous)
            if cut < 0:
                return None
            depth -= _depth(buf, cut, previous)
        else:
            return None
        if cut - start > self.max_record:
            return None  # a record in it may be too long: walk them one by one
        try:
            values: list[Any] = loads(b"[" + buf[start:cut] + b"]")
        except orjson.JSONDecodeError:
            self.careful_until = self.offset + cut + 1
            return None
        self.pos = cut
        return values

    def value_end(self, record: int | None) -> int:
        """End offset of the JSON value starting at pos, reading more input as needed.

        A value longer than the buffer at least doubles the buffer before the next scan, so
        scanning a huge record stays linear.
        """
        while True:
            end = self._scan(self.pos)
            if end is not None and end - self.pos <= self.max_record:
                return end
            if self.eof and end is None:
                raise self.fail("unexpected end of data inside a value", len(self.buf), record)
            if end is not None or len(self.buf) - self.pos > self.max_record:
                line, column = self.where(self.pos)
                raise _too_long(self.name, self.max_record, line, column, record)
            self.more(len(self.buf) - self.pos)

    def _scan(self, start: int) -> int | None:
        buf = self.buf
        first = buf[start]
        if first == _QUOTE:
            return _string_end(buf, start + 1)
        if first not in (_OPEN_ARRAY, _OPEN_OBJECT):
            match = _SCALAR_END.search(buf, start)
            return match.start() if match else (len(buf) if self.eof else None)
        depth = 0
        position = start
        while True:
            match = _STRUCTURE.search(buf, position)
            if match is None:
                return None
            char = buf[match.start()]
            if char == _QUOTE:
                end = _string_end(buf, match.end())
                if end is None:
                    return None
                position = end
                continue
            depth += 1 if char in (_OPEN_ARRAY, _OPEN_OBJECT) else -1
            position = match.end()
            if depth == 0:
                return position

    def parse(self, end: int, record: int | None) -> Any:
        """Parse buf[pos:end] and move past it."""
        start = self.pos
        text = self.buf[start:end]
        try:
            value = loads(text)
        except orjson.JSONDecodeError as exc:
            message, at = _explain_json(text, exc)
            raise self.fail(message, start + at, record) from None
        self.pos = end
        return value

    def end_offset(self) -> int:
        return len(self.buf)


def _read_json(
    source: _Source, name: str, data_key: str, locate: bool, max_record: int
) -> Iterator[_Batch]:
    scanner = _JsonScanner(source, name, max_record)
    first = scanner.skip_ws()
    if first is None:
        raise _empty(name, "expected a JSON array or object")
    if first == _OPEN_OBJECT:
        _find_key(scanner, data_key)
    elif first != _OPEN_ARRAY:
        raise scanner.fail(
            f"expected a JSON array of records or an object holding one under '{data_key}'",
            scanner.pos,
            None,
        )
    yield from _stream_array(scanner, locate)
    if first == _OPEN_OBJECT:
        _finish_object(scanner)
    if scanner.skip_ws() is not None:
        raise scanner.fail("unexpected data after the end of the JSON document", scanner.pos, None)


def _stream_array(scanner: _JsonScanner, locate: bool) -> Iterator[_Batch]:
    scanner.pos += 1  # the opening bracket
    record = 0
    following = scanner.skip_ws()
    if following == _CLOSE_ARRAY:
        scanner.pos += 1
        return
    while True:
        if following is None:
            raise scanner.fail(
                "unterminated array: expected a record or ']'", scanner.end_offset(), record + 1
            )
        if following in (_COMMA, _CLOSE_ARRAY, _CLOSE_OBJECT):
            raise scanner.fail("expected a record (a JSON value)", scanner.pos, record + 1)
        values = None if locate else scanner.fast_batch()
        if values is not None:
            record += len(values)
            yield values, None
            scanner.pos += 1  # fast_batch stops at a comma
            following = scanner.skip_ws()
            continue
        record += 1
        line = scanner.line_at(scanner.pos) if locate else 0
        value = scanner.parse(scanner.value_end(record), record)
        yield [value], [line] if locate else None
        following = scanner.skip_ws()
        if following == _COMMA:
            scanner.pos += 1
            following = scanner.skip_ws()
            continue
        if following == _CLOSE_ARRAY:
            scanner.pos += 1
            return
        if following is None:
            raise scanner.fail(
                "unterminated array: expected ',' or ']'", scanner.end_offset(), record
            )
        raise scanner.fail("expected ',' or ']' after a record", scanner.pos, record)


def _find_key(scanner: _JsonScanner, data_key: str) -> None:
    """Advance through the top-level object to the array under `data_key`."""
    scanner.pos += 1
    missing = f"the JSON object has no '{data_key}' array of records"
    while True:
        following = scanner.skip_ws()
        if following != _QUOTE:
            if following == _CLOSE_OBJECT:
                raise scanner.fail(missing, scanner.pos, None)
            at = scanner.pos if following is not None else scanner.end_offset()
            raise scanner.fail("expected a key in the JSON object", at, None)
        key = scanner.parse(scanner.value_end(None), None)
        if scanner.skip_ws() != _COLON:
            raise scanner.fail("expected ':' after a key", scanner.pos, None)
        scanner.pos += 1
        value_start = scanner.skip_ws()
        if value_start is None:
            raise scanner.fail("unexpected end of data", scanner.end_offset(), None)
        if key == data_key:
            if value_start != _OPEN_ARRAY:
                raise scanner.fail(f"'{data_key}' must hold an array of records", scanner.pos, None)
            return
        scanner.parse(scanner.value_end(None), None)
        following = scanner.skip_ws()
        if following == _COMMA:
            scanner.pos += 1
            continue
        at = scanner.pos if following is not None else scanner.end_offset()
        raise scanner.fail(missing, at, None)


def _finish_object(scanner: _JsonScanner) -> None:
    """Check the rest of the top-level object after the records (its other keys are ignored)."""
    while True:
        following = scanner.skip_ws()
        if following == _CLOSE_OBJECT:
            scanner.pos += 1
            return
        if following != _COMMA:
            at = scanner.pos if following is not None else scanner.end_offset()
            raise scanner.fail("expected ',' or '}' in the JSON object", at, None)
        scanner.pos += 1
        if scanner.skip_ws() != _QUOTE:
            raise scanner.fail("expected a key in the JSON object", scanner.pos, None)
        scanner.parse(scanner.value_end(None), None)
        if scanner.skip_ws() != _COLON:
            raise scanner.fail("expected ':' after a key", scanner.pos, None)
        scanner.pos += 1
        if scanner.skip_ws() is None:
            raise scanner.fail("unexpected end of data", scanner.end_offset(), None)
        scanner.parse(scanner.value_end(None), None)


# ---- CSV ----------------------------------------------------------------------------------------

#: Rows handed out per batch.
_CSV_BATCH = 1024


class _CsvFeed:
    """Decodes the input into lines for csv.reader and keeps the text of the row being read.

    csv.reader counts physical lines (`line_num`), which places rows; the kept text lets an
    unterminated quote be traced to the line where it opened, which csv.reader cannot say.
    """

    def __init__(self, source: _Source, name: str) -> None:
        self.source = source
        self.name = name
        self.done = 0  # lines consumed by complete rows; the current row starts on done + 1
        self.kept: list[tuple[int, int, str]] = []  # (first line, line count, text) per block

    def lines(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._texts())

    def _texts(self) -> Iterator[io.StringIO]:
        carry = b""
        line = 1
        for block in self.source.blocks():
            if carry:
                block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                carry = block
                continue
            carry = block[cut:]
            yield self._decode(block[:cut], line)
            line += block.count(b"\n", 0, cut)
        if carry:
            yield self._decode(carry, line)

    def _decode(self, data: bytes, line: int) -> io.StringIO:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line += data.count(b"\n", 0, exc.start)
            column = _chars(data[data.rfind(b"\n", 0, exc.start) + 1 : exc.start]) + 1
            raise _located(self.name, f"invalid UTF-8 ({exc.reason})", line, column, None) from None
        count = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        self.kept = [kept for kept in self.kept if kept[0] + kept[1] > self.done + 1]
        self.kept.append((line, count, text))
        return io.StringIO(text)

    def error(self, exc: csv.Error, record: int | None, line_num: int) -> InputDataError:
        """Say what is wrong with the row starting on line done + 1."""
        opened = self._open_quote_line()
        if opened is not None:
            problem = "unterminated quoted field (the quote opens here)"
            if "field limit" in str(exc):
                problem = "quoted field longer than the CSV field limit: a missing closing quote?"
            return _located(self.name, problem, opened, None, record)
        return _located(self.name, f"malformed CSV: {exc}", line_num, None, record)

    def _open_quote_line(self) -> int | None:
        """The line where the current row's still-open quote opened, or None if none is open."""
        start = self.done + 1
        text = "".join(kept[2] for kept in self.kept)
        first = self.kept[0][0] if self.kept else 1
        rest = "\n".join(text.split("\n")[start - first :])
        line = opened = start
        quoted = closed = False
        at_field_start = True
        for char in rest:
            if quoted:
                if char == '"':
                    quoted, closed = False, True
                elif char == "\n":
                    line += 1
                continue
            if char == '"' and (at_field_start or closed):
                if at_field_start:
                    opened = line
                quoted, closed, at_field_start = True, False, False
                continue
            closed = False
            at_field_start = char in ",\n"
            if char == "\n":
                line += 1
        return opened if quoted else None


def _read_csv(
    source: _Source, name: str, data_key: str, locate: bool, max_record: int
) -> Iterator[_Batch]:
    feed = _CsvFeed(source, name)
    reader = csv.reader(feed.lines(), strict=True)
    header: list[str] = []
    width = -1  # no header yet
    values: list[Any] = []
    starts: list[int] = []
    handed = 0  # records in earlier batches
    end = 0
    append, batch_size = values.append, _CSV_BATCH
    try:
        for row in reader:
            start = end + 1
            end = feed.done = reader.line_num
            if len(row) != width:
                if not row or (width != 1 and len(row) == 1 and not row[0].strip()):
                    continue  # an empty (or, with several fields, blank) line
                if width < 0:
                    _check_header(row, name, start)
                    header, width = row, len(row)
                    continue
                raise _located(
                    name,
                    f"expected {width} fields as in the header, found {len(row)}",
                    start,
                    None,
                    handed + len(values) + 1,
                )
            # Lengths are equal (checked above); a strict= keyword would cost a third of the speed.
            append(dict(zip(header, row)))  # noqa: B905
            if locate:
                starts.append(start)
            if len(values) >= batch_size:
                yield values, starts if locate else None
                handed += len(values)
                values, starts = [], []
                append = values.append
    except csv.Error as exc:
        record = handed + len(values) + 1 if width >= 0 else None
        raise feed.error(exc, record, reader.line_num) from None
    if width < 0:
        raise _empty(name, "expected a CSV header row")
    if values:
        yield values, starts if locate else None


def _check_header(row: list[str], name: str, line: int) -> None:
    seen: set[str] = set()
    for position, field in enumerate(row, start=1):
        if not field.strip():
            raise _located(name, f"header field {position} is empty", line, None, None)
        if field in seen:
            raise _located(name, f"header field '{field}' appears twice", line, None, None)
        seen.add(field)


_READERS: dict[str, Callable[[_Source, str, str, bool, int], Iterator[_Batch]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
}
