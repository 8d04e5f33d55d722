"""Data in and out: streaming readers with located errors, atomic writers."""

from parallel_agent.io.readers import FORMATS, ChunkReader, detect_format, iter_records, read_chunks
from parallel_agent.io.records import Chunk, Record
from parallel_agent.io.writers import Writer, check_writable, detect_output_format, open_writer

__all__ = [
    "FORMATS",
    "Chunk",
    "ChunkReader",
    "Record",
    "Writer",
    "check_writable",
    "detect_format",
    "detect_output_format",
    "iter_records",
    "open_writer",
    "read_chunks",
]
