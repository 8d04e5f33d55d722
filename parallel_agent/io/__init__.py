"""Data in and out: streaming readers with located errors, atomic writers.

Readers: `detect_format`, then `read_chunks` (the fast path, chunks of values) or `iter_records`
(each value with its record number and line). Writers: `detect_output_format`, `check_writable`
before any work, then `open_writer` as a context manager.
"""

from parallel_agent.io.readers import (
    BLOCK_SIZE,
    FORMATS,
    MAX_RECORD_SIZE,
    ChunkReader,
    Format,
    detect_format,
    iter_records,
    read_chunks,
)
from parallel_agent.io.records import Chunk, InputIdentity, Record
from parallel_agent.io.targets import check_targets
from parallel_agent.io.writers import (
    OutputFormat,
    Writer,
    check_writable,
    detect_output_format,
    open_writer,
    write_records_like_input,
)

__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "MAX_RECORD_SIZE",
    "Chunk",
    "ChunkReader",
    "Format",
    "InputIdentity",
    "OutputFormat",
    "Record",
    "Writer",
    "check_targets",
    "check_writable",
    "detect_format",
    "detect_output_format",
    "iter_records",
    "open_writer",
    "read_chunks",
    "write_records_like_input",
]
