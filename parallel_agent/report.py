"""The end-of-run report as data: per-node timings and counts, and failures grouped by error type.

Everything here is read from the run store (counters, chunk durations, failed items and chunks), so
the same report comes out at the end of `pagent run`, in its `--json` summary and in `pagent status`
from another shell. Rendering lives in `parallel_agent.display.report`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from parallel_agent.jsonl import decode_lines, loads
from parallel_agent.modules.aggregate import stored as stored_result
from parallel_agent.store.base import RunStore

#: How many record numbers each failure group keeps (the smallest ones).
FIRST_RECORDS = 5

_RECORD_PREFIX = re.compile(r"^record \d+: ")
_EXCEPTION_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_RECORD_SPAN = re.compile(r"\s*\(?\b(?:on )?records \d+-\d+\)?")
#: Errors that wrap the exception that matters (an expression's), named after their first ': '.
_WRAPPERS = frozenset({"ConditionError"})


def error_type(error: str) -> str:
    """The kind of an error message, to group failures by.

    It is the part before the first ':' when that is an exception name (`ValueError: bad` →
    `ValueError`; a `record N: ` prefix, as `on_error: fail_chunk` writes, is skipped). Messages
    without one (`timed out after 30 s`, `command exited with status 3 on records 1-3: ...`) keep
    their head, with record spans removed so chunks failing the same way group together. An
    expression's error (`ConditionError: node 'w', map: ZeroDivisionError: ...`) is grouped by the
    exception the expression raised.
    """
    text = _RECORD_PREFIX.sub("", error.strip(), count=1)
    head = text.split(":", 1)[0].strip()
    if head in _WRAPPERS:
        inner = next((part for part in text.split(": ")[1:] if _EXCEPTION_NAME.match(part)), None)
        return inner or head
    if _EXCEPTION_NAME.match(head):
        return head
    return _RECORD_SPAN.sub("", head).strip() or "error"


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile (0.5 for p50) by linear interpolation between the closest ranks
    (numpy's default): p50 of 1..10 is 5.5, p95 is 9.55. None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class NodeReport:
    """One node's line of the report. Chunk fields are zero for nodes without chunks (split,
    aggregate, custom modules); `duration_s` is None when the run's coordinator did not record it."""

    node: str
    duration_s: float | None = None
    chunks: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    #: items in committed chunks (succeeded or failed one by one)
    items_processed: int = 0
    #: failed items plus the items of failed chunks
    items_failed: int = 0
    retries: int = 0
    #: chunk times of the chunks the node worked itself (not those a split committed with their
    #: partials as it queued them: the split's workers did that work)
    chunk_p50_s: float | None = None
    chunk_p95_s: float | None = None
    #: records the node received (its chunks' items), emitted (outputs committed; an
    #: aggregate's rows) and dropped (processed without failing and without output: a filter's
    #: no; an aggregate reduces, it drops nothing)
    items_in: int = 0
    items_out: int = 0
    items_dropped: int = 0
    #: items processed per second of the node's own duration; None when it worked no chunk itself
    items_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        rate = self.items_per_s
        return {
            "node": self.node,
            "duration_s": _round(self.duration_s),
            "chunks": self.chunks,
            "chunks_done": self.chunks_done,
            "chunks_failed": self.chunks_failed,
            "items_processed": self.items_processed,
            "items_failed": self.items_failed,
            "items_per_s": None if rate is None else round(rate, 1),
            "chunk_p50_s": _round(self.chunk_p50_s),
            "chunk_p95_s": _round(self.chunk_p95_s),
            "retries": self.retries,
            "items_in": self.items_in,
            "items_out": self.items_out,
            "items_dropped": self.items_dropped,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeReport:
        return cls(
            node=data["node"],
            duration_s=data.get("duration_s"),
            chunks=data.get("chunks", 0),
            chunks_done=data.get("chunks_done", 0),
            chunks_failed=data.get("chunks_failed", 0),
            items_processed=data.get("items_processed", 0),
            items_failed=data.get("items_failed", 0),
            retries=data.get("retries", 0),
            chunk_p50_s=data.get("chunk_p50_s"),
            chunk_p95_s=data.get("chunk_p95_s"),
            items_in=data.get("items_in", 0),
            items_out=data.get("items_out", 0),
            items_dropped=data.get("items_dropped", 0),
            items_per_s=data.get("items_per_s"),
        )


@dataclass(frozen=True)
class FailureGroup:
    """Failed records sharing an error type: how many, the first record numbers, the nodes where
    they failed and the first message seen as an example."""

    error_type: str
    count: int
    first_records: tuple[int, ...]
    nodes: tuple[str, ...]
    example: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_type": self.error_type,
            "count": self.count,
            "first_records": list(self.first_records),
            "nodes": list(self.nodes),
            "example": self.example,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FailureGroup:
        return cls(
            error_type=data["error_type"],
            count=data["count"],
            first_records=tuple(data.get("first_records", ())),
            nodes=tuple(data.get("nodes", ())),
            example=data.get("example", ""),
        )


@dataclass(frozen=True)
class RunReport:
    """Per-node lines in pipeline order and failure groups, most frequent first."""

    nodes: tuple[NodeReport, ...] = ()
    failures: tuple[FailureGroup, ...] = ()

    @property
    def items_failed(self) -> int:
        return sum(group.count for group in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [node.to_dict() for node in self.nodes],
            "failures": [group.to_dict() for group in self.failures],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        return cls(
            nodes=tuple(NodeReport.from_dict(node) for node in data.get("nodes", ())),
            failures=tuple(FailureGroup.from_dict(group) for group in data.get("failures", ())),
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class _Group:
    count: int = 0
    records: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    example: str = ""

    def add(self, node: str, record: int, error: str) -> None:
        self.count += 1
        if not self.example:
            self.example = error
        if node not in self.nodes:
            self.nodes.append(node)
        if len(self.records) < FIRST_RECORDS or record < self.records[-1]:
            bisect.insort(self.records, record)
            del self.records[FIRST_RECORDS:]


async def read_failures(
    store: RunStore, task_id: str, *, with_input: bool = True
) -> AsyncIterator[dict[str, Any]]:
    """Every failed record of a run as `{node, record, error[, input]}`, node by node: items that
    failed inside committed chunks, then the records of failed chunks. Nodes without failures are
    not read (their results are never fetched)."""
    for node in await store.nodes(task_id):
        counts = await store.counts(task_id, node)
        if counts.items_failed:
            async for result in store.results(task_id, node):
                if not result.items_failed:
                    continue
                for error in loads(result.errors) if result.errors else []:
                    if not with_input:
                        error.pop("input", None)
                    yield {"node": node, **error}
        if not counts.failed:
            continue
        for chunk in await store.failed_chunks(task_id, node):
            numbers = chunk.numbers
            if with_input:
                for number, record in zip(numbers, decode_lines(chunk.payload), strict=False):
                    yield {"node": node, "record": number, "error": chunk.error, "input": record}
            else:
                for number in numbers:
                    yield {"node": node, "record": number, "error": chunk.error}


async def failure_groups(store: RunStore, task_id: str) -> tuple[FailureGroup, ...]:
    """Failed records grouped by `error_type`, most frequent first (ties by name)."""
    groups: dict[str, _Group] = {}
    async for failure in read_failures(store, task_id, with_input=False):
        error = str(failure.get("error", ""))
        groups.setdefault(error_type(error), _Group()).add(
            failure["node"], int(failure["record"]), error
        )
    ordered = sorted(groups.items(), key=lambda item: (-item[1].count, item[0]))
    return tuple(
        FailureGroup(kind, group.count, tuple(group.records), tuple(group.nodes), group.example)
        for kind, group in ordered
    )


async def build_report(
    store: RunStore,
    task_id: str,
    *,
    nodes: Sequence[str] = (),
    durations: Mapping[str, float] | None = None,
) -> RunReport:
    """The report of a run as the store holds it now (also while it runs).

    `nodes` gives the pipeline's order (nodes the store knows but `nodes` lacks come after);
    `durations` are the nodes' own run times as the coordinator measured them.
    """
    durations = durations or {}
    stored = await store.nodes(task_id)
    info = await store.get_run(task_id)
    extra = info.extra if info is not None else {}
    names = list(dict.fromkeys([*nodes, *stored]))
    dependencies = _dependencies(info.pipeline_text if info is not None else "")
    lines: list[NodeReport] = []
    for name in names:
        if name not in stored:
            # An aggregate over a map's or filter's results has no chunks of its own: it
            # received what those emitted, and emitted its rows.
            rows = stored_result(extra, "aggregate_rows", name)
            received = 0
            if rows is not None:
                for dependency in dependencies.get(name, []):
                    if dependency in stored:
                        received += (await store.counts(task_id, dependency)).items_out
            lines.append(
                NodeReport(
                    name,
                    duration_s=durations.get(name),
                    items_in=received,
                    items_out=0 if rows is None else int(rows),
                )
            )
            continue
        counts = await store.counts(task_id, name)
        # A chunk committed as it was queued (a split's partial) has no time of its own.
        chunk_times = [t for t in await store.chunk_durations(task_id, name) if t > 0]
        failed_chunk_items = (
            sum(chunk.count for chunk in await store.failed_chunks(task_id, name))
            if counts.failed
            else 0
        )
        processed = counts.items_done + counts.items_failed
        duration = durations.get(name)
        rows = stored_result(extra, "aggregate_rows", name)
        lines.append(
            NodeReport(
                name,
                duration_s=duration,
                chunks=counts.chunks_total,
                chunks_done=counts.done,
                chunks_failed=counts.failed,
                items_processed=processed,
                items_failed=counts.items_failed + failed_chunk_items,
                retries=counts.retries,
                chunk_p50_s=percentile(chunk_times, 0.5),
                chunk_p95_s=percentile(chunk_times, 0.95),
                items_in=counts.items_total,
                items_out=counts.items_out if rows is None else int(rows),
                items_dropped=0
                if rows is not None
                else max(0, counts.items_done - counts.items_out),
                items_per_s=processed / duration if chunk_times and duration else None,
            )
        )
    return RunReport(tuple(lines), await failure_groups(store, task_id))


def _dependencies(pipeline_text: str) -> dict[str, list[str]]:
    """{node: its dependencies} from a run's stored pipeline."""
    try:
        data = orjson.loads(pipeline_text)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(node["name"]): [str(d) for d in node.get("dependencies") or []]
        for node in data.get("nodes", [])
        if isinstance(node, dict) and "name" in node
    }


def pipeline_node_names(pipeline_text: str) -> list[str]:
    """Node names in pipeline order from a run's stored pipeline (`RunInfo.pipeline_text`)."""
    return list(_dependencies(pipeline_text))


def failed_output_message(path: str, written: int) -> str:
    """The line that tells where `--failed-output` went."""
    return f"pagent: {written} failed records written to {path}"
