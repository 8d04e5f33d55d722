"""`pagent status`, `results`, `failures`, `list`, `resume`, `cancel`, `gc`: runs remembered by the store."""

# Annotations stay objects here (no `from __future__ import annotations`): Typer reads every
# command's signature on each command line, and a string annotation costs it an eval (10 ms).

import shutil
import sys
import time
from typing import Annotated, Any

import typer

from parallel_agent.cli.errors import handled_errors
from parallel_agent.cli.options import (
    FailedOutputOption,
    JsonOption,
    StoreOption,
    SummaryOption,
    check_stdout_clash,
    report_run,
)
from parallel_agent.cli.process import freeze_startup_objects
from parallel_agent.jsonl import ascii_text


def _debug(ctx: typer.Context) -> bool:
    return bool((ctx.obj or {}).get("debug"))


def _emit_json(value: Any) -> None:
    sys.stdout.write(ascii_text(value) + "\n")
    sys.stdout.flush()


def _when(timestamp: float | None) -> str:
    return (
        "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    )


def status(
    ctx: typer.Context,
    task_id: Annotated[
        str, typer.Argument(metavar="TASK_ID", help="The task id printed when the run started.")
    ],
    store: StoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the run live (from the store) until it ends.")
    ] = False,
) -> None:
    """Show where a run stands: status, counts, node states, report.

    Exit 0 found, 2 unknown id, 4 store unreachable.

    Example: pagent status 20261128-235941-255f10 --json
    """
    from parallel_agent.app import get_status
    from parallel_agent.display.report import report_lines, stop_text

    freeze_startup_objects()
    with handled_errors(_debug(ctx)):
        if watch:
            from parallel_agent.display import make_console
            from parallel_agent.display.live import watch_status

            watch_status(make_console(), lambda: get_status(task_id, store, report=False))
        report = get_status(task_id, store)
    if as_json:
        _emit_json(report)
        return
    items = report["items"]
    progress = report["progress"]
    lines = [
        f"task       {report['task_id']}",
        f"status     {report['status']}{_stalled_note(report)}",
        f"pipeline   {report['pipeline']}",
        f"input      {report['input'] or '-'}",
        f"started    {_when(report['created_at'])}",
        f"finished   {_when(report['finished_at'])}",
        f"items      {items['done']} of {items['total']} done"
        + (f" ({progress:.0%})" if progress is not None else "")
        + f", {items['failed']} failed",
        f"throughput {report['throughput_items_s'] or 0:,.0f} items/s over {report['elapsed_s']:.1f} s",
    ]
    stop = stop_text(report)
    if stop:
        lines.append(f"stopped    {stop.removeprefix('stopped early: ')}")
    for node, counts in report["nodes"].items():
        lines.append(
            f"  {node:<16} {counts['state']}: chunks {counts['done']}/{counts['chunks']} done, "
            f"{counts['leased']} in flight, {counts['failed']} failed, {counts['retries']} retries"
        )
    for worker in report.get("workers") or []:
        lines.append(
            f"  worker {worker['host']}:{worker['pid']}  {worker['run']['chunks']} chunks, "
            f"{worker['run']['items']} items, last seen {worker['last_seen']:.1f} s ago"
        )
    if report.get("report"):
        from parallel_agent.report import RunReport

        lines.append("")
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 80
        lines.extend(report_lines(RunReport.from_dict(report["report"]), width))
    sys.stdout.write("\n".join(lines) + "\n")


def _stalled_note(report: dict[str, Any]) -> str:
    """Why a run is stalled and what to do; `pagent worker`s may still be working on it."""
    if report["status"] != "stalled":
        return ""
    task_id, workers = report["task_id"], len(report.get("workers") or [])
    if not workers:
        return f" (no live coordinator: pagent resume {task_id})"
    return (
        f" (no live coordinator; {workers} worker{'s' if workers > 1 else ''} still processing "
        f"chunks, but only a coordinator aggregates and writes the output: pagent resume {task_id})"
    )


def results(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task id.")],
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="PATH", help="Where to write (- for stdout).")
    ] = "-",
    output_format: Annotated[
        str | None,
        typer.Option("--output-format", metavar="FORMAT", help="json, jsonl or csv."),
    ] = None,
    store: StoreOption = None,
) -> None:
    """Write a run's results again from the store.

    Example: pagent results 20261128-235941-255f10 --output out.jsonl
    """
    from parallel_agent.app import export_results

    freeze_startup_objects()
    with handled_errors(_debug(ctx)):
        count = export_results(
            task_id,
            output,
            output_format,
            store,
            stdout=sys.stdout.buffer if output == "-" else None,
        )
    sys.stderr.write(f"pagent: {count} items written to {output}\n")


def failures(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task id.")],
    store: StoreOption = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Write the failed input records to PATH (- for stdout) in the input's format, "
            "ready for pagent run, instead of listing them.",
        ),
    ] = None,
) -> None:
    """List failed records as JSON Lines, or write them for a rerun.

    Each line holds node, record number (1-based), input record and error.

    Example: pagent failures 20261128-235941-255f10 --output failed.jsonl
    """
    from parallel_agent.app import export_failed, iter_failures
    from parallel_agent.report import failed_output_message

    freeze_startup_objects()
    if output is not None:
        with handled_errors(_debug(ctx)):
            written = export_failed(task_id, output, store)
        sys.stderr.write(failed_output_message(output, written) + "\n")
        return
    with handled_errors(_debug(ctx)):
        found = iter_failures(task_id, store)
    for failure in found:
        sys.stdout.write(ascii_text(failure) + "\n")
    sys.stderr.write(f"pagent: {len(found)} failed records\n")


def list_command(
    ctx: typer.Context,
    store: StoreOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON array of runs (newest first).")
    ] = False,
) -> None:
    """List the runs the store remembers, newest first.

    Example: pagent list --json
    """
    from parallel_agent.app import list_runs

    with handled_errors(_debug(ctx)):
        runs = list_runs(store)
    if as_json:
        _emit_json(runs)
        return
    for run in runs:
        sys.stdout.write(
            f"{run['task_id']:<28} {run['status']:<16} {_when(run['created_at'])}  {run['pipeline']}\n"
        )


def resume(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task id to continue.")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", metavar="PATH", help="Output file (default: the run's own)."
        ),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run failed chunks again.")
    ] = False,
    store: StoreOption = None,
    as_json: JsonOption = False,
    summary_path: SummaryOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")
    ] = False,
    failed_output: FailedOutputOption = None,
) -> None:
    """Continue an interrupted or failed run, reusing finished chunks.

    Example: pagent resume 20261128-235941-255f10 --retry-failed
    """
    from parallel_agent.app import resume_run
    from parallel_agent.display import make_sink

    with handled_errors(_debug(ctx)):
        check_stdout_clash(output=output, as_json=as_json)
        sink = make_sink(quiet=quiet)
        freeze_startup_objects()
        report_run(
            sink,
            lambda: resume_run(
                task_id,
                output=output,
                retry_failed=retry_failed,
                store=store,
                events=sink,
                stdout=sys.stdout.buffer if output == "-" else None,
                failed_output=failed_output,
            ),
            as_json=as_json,
            summary_path=summary_path,
        )


def cancel(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task id.")],
    store: StoreOption = None,
) -> None:
    """Cancel a run: its coordinator stops claiming chunks.

    Example: pagent cancel 20261128-235941-255f10
    """
    from parallel_agent.app import cancel_run

    with handled_errors(_debug(ctx)):
        state = cancel_run(task_id, store)
    sys.stderr.write(f"pagent: task {task_id} {state}\n")


def gc(
    ctx: typer.Context,
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than", metavar="HOURS", help="Age in hours of finished runs to drop."
        ),
    ] = 168.0,
    task_glob: Annotated[
        str | None,
        typer.Option(
            "--task-id", metavar="GLOB", help="Only runs whose task id matches GLOB ('nightly-*')."
        ),
    ] = None,
    pipeline: Annotated[
        str | None,
        typer.Option("--pipeline", metavar="NAME", help="Only runs of the pipeline named NAME."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be dropped; drop nothing.")
    ] = False,
    store: StoreOption = None,
) -> None:
    """Drop finished runs older than --older-than hours.

    Each dropped (or, with --dry-run, droppable) task id is printed on stdout, one a line.
    Unfinished runs are never dropped; Redis keys of finished runs also expire on their own.

    Example: pagent gc --older-than 24 --task-id 'nightly-*' --dry-run
    """
    from parallel_agent.app import gc_runs

    with handled_errors(_debug(ctx)):
        dropped = gc_runs(
            older_than * 3600, store, task_glob=task_glob, pipeline=pipeline, dry_run=dry_run
        )
    for task_id in dropped:
        sys.stdout.write(task_id + "\n")
    verb = "would drop" if dry_run else "dropped"
    sys.stderr.write(f"pagent: {verb} {len(dropped)} finished runs\n")


def register(app: typer.Typer) -> None:
    app.command()(status)
    app.command()(results)
    app.command()(failures)
    app.command("list")(list_command)
    app.command()(resume)
    app.command()(cancel)
    app.command()(gc)
