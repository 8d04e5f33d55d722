"""The end-of-run report on screen: a table of nodes and the failures by error type.

Two renderings of the same cells: `report_lines` here (plain text for logs, `pagent status` and
non-terminals; never wider than `width`, no escape codes) and `report_renderable` in
`display.report_table` (a Rich table for the live display's final summary; Rich is imported only
there). The data comes from `parallel_agent.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from parallel_agent.events import ChunksPlanned
from parallel_agent.report import FailureGroup, NodeReport, RunReport

HEADINGS = ("node", "time", "chunks", "items/s", "p50 chunk", "p95 chunk", "retries", "failed")
FAILURES_TITLE = "failed records by error type:"
_ELLIPSIS = "…"


#: How each stop reason (`stop_reason` in `--json`) reads in the report.
STOP_WORDS = {
    "interrupt": "interrupted (Ctrl-C or a stop signal)",
    "cancel": "cancelled (pagent cancel)",
    "max_failures": "--max-failures exceeded",
    "on_error_stop": "a record failed under on_error: stop",
    "iteration_limit": "an iteration limit was reached",
    "error": "an error",
}


def stop_text(summary: Mapping[str, Any]) -> str | None:
    """`stopped early: --max-failures exceeded: more than 5 items failed`, or None for a run that
    was not stopped."""
    kind = summary.get("stop_reason")
    if not kind:
        return None
    error = summary.get("error")
    words = STOP_WORDS.get(str(kind), str(kind))
    return f"stopped early: {words}" + (f": {error}" if error and kind != "cancel" else "")


def resumed_text(event: ChunksPlanned) -> str | None:
    """`resumed (32 of 40 chunks already done)` when a node's chunks were done before."""
    before = event.chunks_done + event.chunks_failed
    if not before:
        return None
    return f"resumed ({before:,} of {event.chunks:,} chunks already done)"


def format_seconds(seconds: float | None) -> str:
    """A duration in at most 7 characters: `<0.1 ms`, `0.4 ms`, `399 ms`, `1.19 s`, `0:02:05`."""
    if seconds is None:
        return "-"
    if seconds < 0.00005:
        return "<0.1 ms"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def node_cells(node: NodeReport) -> tuple[str, ...]:
    """One node's cells, in HEADINGS order; chunk figures are `-` for nodes without chunks."""
    duration = format_seconds(node.duration_s)
    if not node.chunks:
        return (node.node, duration, "-", "-", "-", "-", "-", "-")
    rate = node.items_per_s
    return (
        node.node,
        duration,
        f"{node.chunks_done}/{node.chunks}",
        "-" if rate is None else f"{rate:,.0f}",
        format_seconds(node.chunk_p50_s),
        format_seconds(node.chunk_p95_s),
        str(node.retries),
        f"{node.items_failed:,}",
    )


def records_text(group: FailureGroup) -> str:
    """`record 8` / `records 8, 17, 23, …` (the ellipsis when more records failed)."""
    numbers = ", ".join(str(number) for number in group.first_records)
    more = f", {_ELLIPSIS}" if group.count > len(group.first_records) else ""
    label = "record" if group.count == 1 else "records"
    return f"{label} {numbers}{more}"


def failure_cells(group: FailureGroup) -> tuple[str, str]:
    """A failure group's count and `records 8, 17, … in node` text."""
    return f"{group.count:,}", f"{records_text(group)}  in {', '.join(group.nodes)}"


def column_widths(rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """Each column as wide as its widest cell, two spaces apart; when that exceeds `width`, the
    node names (first column) give way, down to 4 characters, so the figures stay whole."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    rest = sum(widths[1:]) + 2 * (len(widths) - 1)
    widths[0] = max(4, min(widths[0], width - rest))
    return widths


#: Columns a narrow terminal gives up first, in this order; `node`, `chunks` and `failed` stay.
DROP_FIRST = ("p95 chunk", "p50 chunk", "items/s", "retries", "time")
KEEP = ("node", "chunks", "failed")
#: Node names keep at least this many characters (or their whole length) before columns go.
MIN_NODE_WIDTH = 10


def choose_columns(rows: Sequence[Sequence[str]], width: int) -> list[int] | None:
    """The columns (indices) of the node table that fit in `width` with whole figures and node
    names of at least MIN_NODE_WIDTH characters, dropping DROP_FIRST in order (columns it does
    not name go before them); None when even `node`, `chunks` and `failed` do not fit."""
    headings = list(rows[0])
    order = [h for h in headings if h not in KEEP and h not in DROP_FIRST]
    order += [h for h in DROP_FIRST if h in headings]
    columns = list(range(len(headings)))
    names = min(max(len(row[0]) for row in rows), MIN_NODE_WIDTH)
    while True:
        figures = sum(max(len(row[c]) for row in rows) for c in columns[1:])
        if names + figures + 2 * (len(columns) - 1) <= width:
            return columns
        if not order:
            return None
        columns.remove(headings.index(order.pop(0)))


def key_value_lines(report: RunReport, width: int) -> list[str]:
    """The node table as `node` lines followed by `  key: value` lines, for very narrow screens."""
    lines: list[str] = []
    for node in report.nodes:
        cells = node_cells(node)
        lines.append(_clip(cells[0], width))
        pairs = [f"{h}: {c}" for h, c in zip(HEADINGS[1:], cells[1:], strict=True) if c != "-"]
        line = " "
        for pair in pairs:
            if len(line) + 2 + len(pair) > width and line.strip():
                lines.append(line.rstrip(","))
                line = " "
            line += f" {pair},"
        if line.strip():
            lines.append(_clip(line.rstrip(","), width))
    return lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + _ELLIPSIS


def table_lines(report: RunReport, width: int) -> list[str]:
    """The node table in `width` columns: whole, without the least useful columns, or as
    key: value lines when even node, chunks and failed do not fit side by side."""
    full = [HEADINGS, *(node_cells(node) for node in report.nodes)]
    columns = choose_columns(full, width)
    if columns is None:
        return key_value_lines(report, width)
    rows = [[row[c] for c in columns] for row in full]
    widths = column_widths(rows, width)
    lines = []
    for row in rows:
        cells = [_clip(row[0], widths[0]).ljust(widths[0])]
        cells += [cell.rjust(size) for cell, size in zip(row[1:], widths[1:], strict=True)]
        lines.append(_clip("  ".join(cells).rstrip(), width))
    return lines


def outputs_lines(summary: dict[str, Any]) -> list[str]:
    """How many rows went to `--output` and to each `--output-node` file."""
    lines = []
    written = (summary.get("items") or {}).get("output")
    if summary.get("output") and summary["output"] != "-" and written is not None:
        lines.append(f"pagent: {_rows(written)} written to {summary['output']}")
    for node, target in (summary.get("outputs") or {}).items():
        lines.append(f"pagent: {_rows(target['rows'])} of {node} written to {target['path']}")
    return lines


def _rows(count: int) -> str:
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


def records_lines(report: RunReport) -> list[str]:
    """Records in and out of each node that works chunks (a filter's kept and dropped), and of
    each aggregate over a map's or filter's results (records in, rows out)."""
    nodes = [node for node in report.nodes if node.chunks or node.items_in]
    if not nodes:
        return []
    name_width = max(len(node.node) for node in nodes)
    lines = ["records in -> out:"]
    for node in nodes:
        extra = []
        if node.items_dropped:
            extra.append(f"{node.items_dropped:,} dropped")
        if node.items_failed:
            extra.append(f"{node.items_failed:,} failed")
        tail = f"  ({', '.join(extra)})" if extra else ""
        lines.append(f"  {node.node:<{name_width}}  {node.items_in:,} -> {node.items_out:,}{tail}")
    return lines


def report_lines(report: RunReport, width: int = 80) -> list[str]:
    """The report as plain lines of at most `width` characters."""
    lines: list[str] = []
    if report.nodes:
        lines.extend(table_lines(report, width))
        lines.extend(_clip(line, width) for line in records_lines(report))
    if report.failures:
        lines.append(_clip(FAILURES_TITLE, width))
        count_width = max(len(f"{group.count:,}") for group in report.failures)
        for group in report.failures:
            count, where = failure_cells(group)
            lines.append(_clip(f"  {count:>{count_width}}  {group.error_type}  {where}", width))
            lines.append(_clip(f"  {'':>{count_width}}  e.g. {group.example}", width))
    return lines
