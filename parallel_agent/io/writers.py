"""Atomic output writers: JSON array, JSON Lines or CSV, to a file or stdout.

A file is written to a temp file in the same folder, flushed, fsynced, closed (checking every error:
Python swallows ENOSPC at an implicit close), renamed over the target and the folder fsynced. Any
failure leaves no partial file and the previous target untouched, and raises `OutputError`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import orjson

from parallel_agent.errors import OutputError, UsageError

OutputFormat = Literal["json", "jsonl", "csv"]
_EXTENSIONS: dict[str, OutputFormat] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}


def detect_output_format(path: str, explicit: str | None = None) -> OutputFormat:
    """`--output-format`, else the output's extension; stdout (`-`) defaults to JSON Lines."""
    if explicit is not None:
        if explicit not in ("json", "jsonl", "csv"):
            raise UsageError(f"unknown output format '{explicit}'; use one of: json, jsonl, csv")
        return explicit  # type: ignore[return-value]
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise UsageError(
            f"cannot tell the output format of '{path}' from its extension; "
            "pass --output-format json, jsonl or csv"
        )
    return _EXTENSIONS[suffix]


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_writable(target: str) -> None:
    """Fail early (before any work) when the output's folder is missing or not writable."""
    folder = Path(target).parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: folder {folder} does not exist")
    probe = folder / f".pagent-probe-{secrets.token_hex(4)}.tmp"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {_reason(exc)}") from None
    if Path(target).is_dir():
        raise OutputError(f"cannot write {target}: it is a folder")


class Writer:
    """Streams values to the output; commits on a clean exit, discards on an exception."""

    def __init__(self, target: str, fmt: OutputFormat, stdout: BinaryIO | None = None) -> None:
        self.target = target
        self.fmt = fmt
        self.temp: Path | None = None
        self.count = 0
        self.csv_fields: list[str] | None = None
        if target == "-":
            self.stream: BinaryIO = stdout or sys.stdout.buffer
        else:
            folder = Path(target).parent
            self.temp = folder / f".{Path(target).name}.{secrets.token_hex(4)}.tmp"
            try:
                self.stream = self.temp.open("xb")
            except OSError as exc:
                raise OutputError(f"cannot write {target}: {_reason(exc)}") from None

    def __enter__(self) -> Writer:
        if self.fmt == "json":
            self._put(b"[")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def _put(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.target}: {_reason(exc)}") from None

    def write(self, values: Iterable[Any]) -> None:
        """Append values (records or results)."""
        if self.fmt == "csv":
            self._write_csv(values)
            return
        try:
            encoded = [orjson.dumps(value) for value in values]
        except TypeError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.target}: {exc}") from None
        if not encoded:
            return
        if self.fmt == "jsonl":
            self._put(b"\n".join(encoded) + b"\n")
        else:
            self._put((b",\n" if self.count else b"\n") + b",\n".join(encoded))
        self.count += len(encoded)

    def write_encoded_jsonl(self, lines: bytes) -> None:
        """Append pre-encoded JSON Lines (one value per line, newline-terminated)."""
        if not lines:
            return
        if self.fmt == "jsonl":
            self._put(lines)
            self.count += lines.count(b"\n")
            return
        self.write(orjson.loads(b"[" + lines.rstrip(b"\n").replace(b"\n", b",") + b"]"))

    def _write_csv(self, values: Iterable[Any]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for value in values:
            row = value if isinstance(value, dict) else {"value": value}
            if self.csv_fields is None:
                self.csv_fields = list(row)
                writer.writerow(self.csv_fields)
            extra = [key for key in row if key not in self.csv_fields]
            if extra:
                self.discard()
                raise OutputError(
                    f"cannot write {self.target}: record {self.count + 1} has fields "
                    f"{', '.join(extra)} that the CSV header (from the first record) lacks"
                )
            writer.writerow([_cell(row.get(field)) for field in self.csv_fields])
            self.count += 1
        self._put(buffer.getvalue().encode("utf-8"))

    def commit(self) -> None:
        if self.fmt == "json":
            self._put(b"\n]\n" if self.count else b"]\n")
        if self.temp is None:
            try:
                self.stream.flush()
            except OSError as exc:
                raise OutputError(f"cannot write to stdout: {_reason(exc)}") from None
            return
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            os.replace(self.temp, self.target)
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.target}: {_reason(exc)}") from None
        self.temp = None
        _fsync_folder(Path(self.target).parent)

    def discard(self) -> None:
        """Drop the temp file; the target is left as it was."""
        if self.temp is None:
            return
        with contextlib.suppress(OSError):
            self.stream.close()
        with contextlib.suppress(OSError):
            self.temp.unlink()
        self.temp = None


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def open_writer(target: str, fmt: OutputFormat | str, *, stdout: BinaryIO | None = None) -> Writer:
    """A writer for `target` (a path, or `-` for stdout) in `fmt`; use it as a context manager."""
    return Writer(target, detect_output_format(target, fmt), stdout)
