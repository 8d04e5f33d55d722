"""Records as the readers hand them out: each knows its place in the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Record:
    """One input record: its 1-based record number, the 1-based line it starts on, and its value."""

    number: int
    line: int
    value: Any


@dataclass(frozen=True)
class Chunk:
    """Consecutive records; `first_record` is the 0-based number of the first one."""

    index: int
    first_record: int
    records: list[Any]


@dataclass(frozen=True)
class InputIdentity:
    """What was read, so a resume can tell whether the input changed since the first run."""

    size: int
    sha256: str
    records: int


@dataclass(frozen=True)
class PayloadChunk:
    """A chunk as it is stored: its records as JSON Lines bytes. For JSON Lines input, where its
    first record is and which blank lines were skipped after it, to locate a malformed record."""

    index: int
    first_record: int
    count: int
    payload: bytes
    first_line: int = 0
    blank_lines: tuple[int, ...] = ()
