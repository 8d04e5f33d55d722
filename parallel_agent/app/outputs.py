"""Writing what a run produced: its output from the store, and its failed input records."""

from __future__ import annotations

import asyncio
import csv
import itertools
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

from parallel_agent.app.common import check_input_unchanged
from parallel_agent.errors import PipelineError, UsageError
from parallel_agent.io import (
    detect_output_format,
    open_writer,
    read_chunks,
    write_records_like_input,
)
from parallel_agent.jsonl import decode_lines, loads
from parallel_agent.modules.aggregate import value_rows
from parallel_agent.pipeline.build import BuiltPipeline
from parallel_agent.report import read_failures
from parallel_agent.store.base import RunInfo, RunStore


async def write_results(
    store: RunStore,
    info: RunInfo,
    target: str,
    fmt: str,
    stdout: BinaryIO | None = None,
    built: BuiltPipeline | None = None,
    node: str | None = None,
) -> int:
    """Write a run's output (or, with `node`, that node's) atomically from what the store holds;
    return the number of items or rows written."""
    if node is not None and built is not None:
        output = await built.output_plan(node)
    else:
        output = await built.output_plan() if built is not None else info.extra.get("output_plan")
    if output is None:
        raise PipelineError("this pipeline produces no output (no aggregate or data node)")
    if built is not None and node is None:
        await store.update_run(info.task_id, extra={"output_plan": output})
    if "value_json" in output:
        return _write_value(loads(output["value_json"]), target, fmt, stdout)
    if "value" in output:
        return _write_value(output["value"], target, fmt, stdout)
    written = 0
    with open_writer(target, fmt, stdout=stdout) as writer:
        async for result in store.results(info.task_id, output["node"]):
            if fmt == "jsonl":
                writer.write_encoded_jsonl(result.result)
                written += result.result.count(b"\n")
            else:
                values = decode_lines(result.result)
                writer.write(values)
                written += len(values)
    return written


def _write_value(value: Any, target: str, fmt: str, stdout: BinaryIO | None) -> int:
    """An aggregate's value: the whole document in JSON; rows in JSON Lines and CSV (a list's
    items, a group_by's groups as {key, items}, or the value itself as one row). Either way the
    count returned is of those rows, so a format does not change what "rows written" says."""
    rows = value_rows(value)
    if fmt == "json":
        with open_writer(target, fmt, stdout=stdout, document=True) as writer:
            writer.write_document(value)
        return len(rows)
    with open_writer(target, fmt, stdout=stdout) as writer:
        writer.write(rows)
    return len(rows)


#: Signals that interrupt a run resumably (SIGHUP: the terminal went away; not on Windows).


def failed_output_format(target: str, input_format: str) -> str:
    """Failed records are written in the input's format; a target named for another is refused."""
    if target != "-":
        try:
            named = detect_output_format(target)
        except UsageError:
            named = None  # no telling extension: the input's format it is
        if named is not None and named != input_format:
            raise UsageError(
                f"failed records are written in the input's format ({input_format}); "
                f"{target} names {named}: give it a .{input_format} name"
            )
    return input_format


async def write_failed_records(store: RunStore, info: RunInfo, target: str) -> int:
    """Write the input records that failed (in any node) to `target` atomically, in the input's
    own format and order (a CSV keeps its header), so the file can be fed back to `pagent run`.

    The records are read back from the input file by record number (every node numbers its
    failures by input record); a file that changed since the run started is refused
    (InputDataError). Returns how many records were written.
    """
    if info.input_path is None or info.input_format is None:
        raise UsageError(
            f"task '{info.task_id}' read stdin (or no input); its failed records cannot be read back"
        )
    fmt = failed_output_format(target, info.input_format)
    wanted: set[int] = set()
    async for failure in read_failures(store, info.task_id, with_input=False):
        wanted.add(int(failure["record"]))
    data_key = str(info.extra.get("data_key", "data"))
    return await asyncio.to_thread(
        _write_input_records, info, fmt, data_key, sorted(wanted), target
    )


def _write_input_records(
    info: RunInfo, fmt: str, data_key: str, numbers: list[int], target: str
) -> int:
    """Copy the records numbered `numbers` (1-based, ascending) from the input to `target`."""
    assert info.input_path is not None
    check_input_unchanged(info)
    # The run read this input already: no record size limit applies a second time.
    reader = read_chunks(
        info.input_path, fmt, 4096, data_key=data_key, max_record_size=sys.maxsize, hashing=False
    )
    chunks = iter(reader)
    first = next(chunks, None)
    fields = None
    if fmt == "csv":
        if first is not None and first.records and isinstance(first.records[0], dict):
            fields = [str(key) for key in first.records[0]]
        else:
            fields = _csv_header(info.input_path)

    def selected() -> Iterator[Any]:
        wanted = iter(numbers)
        number = next(wanted, None)
        for chunk in itertools.chain([first] if first is not None else [], chunks):
            end = chunk.first_record + len(chunk.records)
            while number is not None and number <= end:
                if number > chunk.first_record:
                    yield chunk.records[number - chunk.first_record - 1]
                number = next(wanted, None)
            if number is None:
                return

    return write_records_like_input(target, fmt, selected(), fields=fields)


def _csv_header(path: str) -> list[str] | None:
    """The header row of a CSV file with no records (None if the file is empty)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row in csv.reader(handle):
            if row and any(cell.strip() for cell in row):
                return row
    return None
