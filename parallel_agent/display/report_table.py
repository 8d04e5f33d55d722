"""The end-of-run report as a Rich table, for the live display's final summary.

The cells and widths are those of `display.report.report_lines`, so both renderings agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from parallel_agent.display.report import (
    FAILURES_TITLE,
    HEADINGS,
    choose_columns,
    column_widths,
    failure_cells,
    key_value_lines,
    node_cells,
    records_lines,
)
from parallel_agent.report import NodeReport, RunReport


class _NodeTable:
    """The node table, laid out like `report_lines` for the console's width when rendered."""

    def __init__(self, nodes: Sequence[NodeReport]) -> None:
        self.nodes = nodes

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        full = [HEADINGS, *(node_cells(node) for node in self.nodes)]
        columns = choose_columns(full, options.max_width)
        if columns is None:
            report = RunReport(nodes=tuple(self.nodes))
            for line in key_value_lines(report, options.max_width):
                yield Text(line, style="" if line.startswith(" ") else "bold", no_wrap=True)
            return
        rows = [[row[c] for c in columns] for row in full]
        widths = column_widths(rows, options.max_width)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
        for heading, size in zip(rows[0], widths, strict=True):
            node_column = heading == "node"
            table.add_column(
                heading,
                justify="left" if node_column else "right",
                width=size,
                no_wrap=True,
                overflow="ellipsis",
                style="bold" if node_column else None,
            )
        for node, cells in zip(self.nodes, rows[1:], strict=True):
            failed = Text(cells[-1], style="red" if node.items_failed else "")
            table.add_row(*cells[:-1], failed)
        yield table


def report_renderable(report: RunReport) -> RenderableType:
    """The report as Rich renderables: the node table and, if any, the failure groups."""
    parts: list[RenderableType] = []
    if report.nodes:
        parts.append(_NodeTable(report.nodes))
        for line in records_lines(report):
            parts.append(Text(line, no_wrap=True, overflow="ellipsis"))
    if report.failures:
        parts.append(Text(FAILURES_TITLE, style="bold red"))
        count_width = max(len(f"{group.count:,}") for group in report.failures)
        for group in report.failures:
            count, where = failure_cells(group)
            parts.append(
                Text.assemble(
                    f"  {count:>{count_width}}  ",
                    (group.error_type, "bold"),
                    f"  {where}",
                    no_wrap=True,
                    overflow="ellipsis",
                )
            )
            parts.append(
                Text(
                    f"  {'':>{count_width}}  e.g. {group.example}",
                    style="dim",
                    no_wrap=True,
                    overflow="ellipsis",
                )
            )
    return Group(*parts)
