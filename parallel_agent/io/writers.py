"""Atomic output writers: a JSON array, JSON Lines or CSV, to a file or stdout.

A file is written to `.<name>.pagent-<random>.tmp` in the same folder (locked while its writer
lives, so the next run can tell a killed writer's leftover from a live one), flushed, fsynced,
closed explicitly (Python swallows ENOSPC at an implicit close), renamed over the target, and the
folder is fsynced. Any failure leaves no temp file and the previous target untouched, and raises
`OutputError` naming the path and the OS reason. A FIFO, a character device or a descriptor path
(`/dev/stdout`, `/dev/fd/N`) is written in place instead: renaming over it would replace it.
A symlinked target is written through the link (the link stays).

CSV output: the header comes from the first record's keys, in order. A later record with a key the
header lacks is an `OutputError` (a streamed file cannot go back and widen its header, and silently
dropping a field would lose data); a missing key is an empty cell. Lists and objects are written as
JSON, `None` as an empty cell, booleans as `true`/`false`; a record that is not an object is written
as a single `value` column.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import secrets
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import orjson

from parallel_agent.errors import OutputError, UsageError
from parallel_agent.io.targets import (
    check_kind,
    descriptor_of,
    hold,
    remove_leftovers,
    temp_name,
    writes_in_place,
)
from parallel_agent.jsonl import decode_lines, dumps

OutputFormat = Literal["json", "jsonl", "csv"]
_FORMATS: tuple[OutputFormat, ...] = ("json", "jsonl", "csv")
_EXTENSIONS: dict[str, OutputFormat] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
#: Values encoded before they are written out: memory stays this many lines, whatever the count.
WRITE_BATCH = 10_000
# Folders on some filesystems cannot be fsynced; that is not a failed write.
_NO_FOLDER_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES}


def detect_output_format(path: str, explicit: str | None = None) -> OutputFormat:
    """`--output-format`, else the output's extension; stdout (`-`, `/dev/stdout`) and other
    descriptors (`/dev/fd/N`) default to JSON Lines."""
    if explicit is not None:
        lowered = explicit.lower()
        if lowered not in _FORMATS:
            raise UsageError(f"unknown output format '{explicit}'; use one of: json, jsonl, csv")
        return lowered
    if descriptor_of(path) is not None:  # stdout, /dev/stdout, /dev/fd/N: a stream
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS and _is_stream(path):  # a FIFO, /dev/null: written in place
        return "jsonl"
    if suffix not in _EXTENSIONS:
        raise UsageError(
            f"cannot tell the output format of '{path}' from its extension; "
            "pass --output-format json, jsonl or csv"
        )
    return _EXTENSIONS[suffix]


def _is_stream(path: str) -> bool:
    """True for a FIFO or a character device (through symlinks), which have no extension."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _failed(target: str, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {target}: {exc.strerror or exc}")


def check_writable(target: str, option: str = "--output") -> None:
    """Fail before any work when the output is a folder, socket or block device (UsageError), or
    its folder is missing or refuses a new file (OutputError). Temp files a killed pagent left
    beside the output are removed here."""
    if writes_in_place(target):
        return
    check_kind(target, option)
    path = Path(os.path.realpath(target))
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"cannot write {target}: folder {folder} does not exist")
    probe = temp_name(path, secrets.token_hex(4))
    try:
        probe.open("xb").close()
    except OSError as exc:
        raise _failed(target, exc) from None
    with contextlib.suppress(OSError):
        probe.unlink()
    remove_leftovers(path)


class Writer:
    """Streams values to the output; commits on a clean exit, discards on an exception.

    Use it through `open_writer` as a context manager. Values are encoded as they come, so the
    whole output never sits in memory.
    """

    def __init__(
        self,
        target: str,
        fmt: OutputFormat,
        *,
        stdout: BinaryIO | None = None,
        fields: Sequence[str] | None = None,
        document: bool = False,
    ) -> None:
        self.target = target
        #: JSON only: write one value as the whole document instead of an array of values.
        self.document = document and fmt == "json"
        self.fmt = fmt
        self.count = 0
        self.csv_fields: list[str] | None = list(fields) if fields is not None else None
        self.csv_header_written = False
        self.temp: Path | None = None
        self.owned = False
        if target == "-":
            self.stream: BinaryIO = stdout or sys.stdout.buffer
            return
        self.owned = True
        if writes_in_place(target):
            self.stream = self._open_in_place(target)
            return
        self.path = Path(os.path.realpath(target))
        self.stream = self._open_temp()
        with contextlib.suppress(OSError):  # no previous file: keep the default mode
            # Keep a replaced file's permissions: output may be private data.
            os.fchmod(self.stream.fileno(), stat.S_IMODE(os.stat(self.path).st_mode))

    def _open_in_place(self, target: str) -> BinaryIO:
        descriptor = descriptor_of(target)
        try:
            if descriptor is not None:
                return os.fdopen(os.dup(descriptor), "wb")
            return open(target, "wb")
        except OSError as exc:
            raise _failed(target, exc) from None

    def _open_temp(self) -> BinaryIO:
        """Create and lock our temp file; one that a cleaner removed before the lock is taken is
        made again."""
        while True:
            temp = temp_name(self.path, secrets.token_hex(4))
            try:
                stream = temp.open("xb")
            except OSError as exc:
                raise _failed(self.target, exc) from None
            try:
                if (
                    hold(stream.fileno())
                    and os.stat(temp).st_ino == os.fstat(stream.fileno()).st_ino
                ):
                    self.temp = temp
                    return stream
            except FileNotFoundError:
                pass
            stream.close()

    def __enter__(self) -> Writer:
        if self.fmt == "json" and not self.document:
            self._put(b"[")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def write_document(self, value: Any) -> None:
        """Write `value` as the whole JSON document (opened with `document=True`)."""
        try:
            self._put(dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
        except TypeError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.target}: {exc}") from None
        self.count += 1

    def write(self, values: Iterable[Any]) -> None:
        """Append values (records or results)."""
        if self.fmt == "csv":
            self._write_csv(values)
            return
        encoded: list[bytes] = []
        for value in values:
            try:
                encoded.append(dumps(value))
            except TypeError as exc:
                self.discard()
                number = self.count + len(encoded) + 1
                raise OutputError(
                    f"cannot write {self.target}: record {number} cannot be encoded as JSON: {exc}"
                ) from None
            if len(encoded) == WRITE_BATCH:
                self._put_encoded(b"\n".join(encoded), len(encoded))
                encoded = []
        if encoded:
            self._put_encoded(b"\n".join(encoded), len(encoded))

    def write_encoded_jsonl(self, lines: bytes) -> None:
        """Append pre-encoded JSON Lines (one compact JSON value per line, each ending in newline)."""
        if not lines:
            return
        if self.fmt == "csv":
            self.write(decode_lines(lines))
            return
        if not lines.endswith(b"\n"):
            lines += b"\n"
        if self.fmt == "jsonl":
            self._put(lines)
            self.count += lines.count(b"\n")
        else:
            self._put_encoded(lines[:-1], lines.count(b"\n"))

    def _put_encoded(self, body: bytes, count: int) -> None:
        """Append newline-separated encoded values: newline-ended for JSON Lines, comma-joined in JSON."""
        if self.fmt == "jsonl":
            self._put(body + b"\n")
        else:
            self._put((b",\n" if self.count else b"\n") + body.replace(b"\n", b",\n"))
        self.count += count

    def _write_csv(self, values: Iterable[Any]) -> None:
        table: list[list[str]] = []
        for value in values:
            row = value if isinstance(value, dict) else {"value": value}
            if self.csv_fields is None:
                self.csv_fields = [str(key) for key in row]
            if not self.csv_header_written:
                table.append(self.csv_fields)
                self.csv_header_written = True
            extra = [str(key) for key in row if key not in self.csv_fields]
            if extra:
                self.discard()
                raise OutputError(
                    f"cannot write {self.target}: record {self.count + 1} has fields "
                    f"{', '.join(extra)} that the CSV header (from the first record) lacks"
                )
            table.append([_cell(row.get(field)) for field in self.csv_fields])
            self.count += 1
            if len(table) >= WRITE_BATCH:
                self._put(csv_text(table).encode("utf-8"))
                table = []
        if table:
            self._put(csv_text(table).encode("utf-8"))

    def _put(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except OSError as exc:
            self.discard()
            raise _failed(self.target, exc) from None

    def commit(self) -> None:
        """Finish the output: close the array, and for a file fsync, close, rename, fsync folder."""
        if self.document:
            pass
        elif self.fmt == "json":
            self._put(b"\n]\n" if self.count else b"]\n")
        elif self.fmt == "csv" and not self.csv_header_written and self.csv_fields:
            self._put(csv_text([self.csv_fields]).encode("utf-8"))
        if self.temp is None:
            try:
                self.stream.flush()
                if self.owned:
                    self.owned = False
                    self.stream.close()
            except OSError as exc:
                raise _failed(self.target, exc) from None
            return
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.discard()
            raise _failed(self.target, exc) from None
        self.temp = None
        _fsync_folder(self.path)

    def discard(self) -> None:
        """Drop the temp file; the target is left as it was."""
        if self.temp is None:
            if self.owned:  # a FIFO or device written in place: what was written is gone
                self.owned = False
                with contextlib.suppress(OSError):
                    self.stream.close()
            return
        with contextlib.suppress(OSError):
            self.stream.close()
        with contextlib.suppress(OSError):
            self.temp.unlink()
        self.temp = None


def csv_text(rows: list[list[str]]) -> str:
    """`rows` as CSV, each line ended by "\n", every field read back as written.

    Python 3.11's writer leaves a carriage return unquoted when the line terminator is "\n",
    and a reader then ends the row there: a row holding one is written with every field quoted
    (the same text on every Python; a quoted field reads as the same string)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    text = buffer.getvalue()
    if "\r" not in text:
        return text
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in field for field in row) else plain).writerow(row)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return dumps(value).decode()
    return str(value)


def _fsync_folder(target: Path) -> None:
    """Make the rename durable; the file is in place already, so only a real I/O error is raised."""
    try:
        descriptor = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_FSYNC:
            raise _failed(str(target), exc) from None
    finally:
        os.close(descriptor)


def open_writer(
    target: str,
    fmt: OutputFormat | str,
    *,
    stdout: BinaryIO | None = None,
    fields: Sequence[str] | None = None,
    document: bool = False,
) -> Writer:
    """A writer for `target` (a path, or `-` for stdout) in `fmt`; use it as a context manager.

    `fields` fixes the CSV header (otherwise the first record's keys) and is written even when
    no record is.
    """
    return Writer(
        target, detect_output_format(target, fmt), stdout=stdout, fields=fields, document=document
    )


def write_records_like_input(
    target: str,
    fmt: OutputFormat | str,
    records: Iterable[Any],
    *,
    fields: Sequence[str] | None = None,
) -> int:
    """Write original input records back in the input's format (e.g. the failed ones); return how many.

    CSV records read by `read_chunks` are dicts in header order, so the header round-trips; pass
    the input's `fields` to keep it even when there is no record to write.
    """
    with open_writer(target, fmt, fields=fields) as writer:
        writer.write(records)
        return writer.count
