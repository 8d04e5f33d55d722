"""`pagent run`, `pagent validate`, `pagent schema`."""

# Annotations stay objects here (no `from __future__ import annotations`): Typer reads every
# command's signature on each command line, and a string annotation costs it an eval (10 ms).

import json
import sys
from typing import Annotated

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
from parallel_agent.errors import UsageError


def _debug(ctx: typer.Context) -> bool:
    return bool((ctx.obj or {}).get("debug"))


def run(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(metavar="PIPELINE", help="The pipeline YAML file.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", metavar="PATH", help="Input file, or - for stdin.")
    ] = None,
    data_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="Input format: json, jsonl or csv (default: from the extension).",
        ),
    ] = None,
    data_key: Annotated[
        str,
        typer.Option(
            "--data-key",
            metavar="KEY",
            help="Key of the record array when the JSON input is an object.",
        ),
    ] = "data",
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output file (.json, .jsonl, .csv), or - for stdout.",
        ),
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option(
            "--output-format",
            metavar="FORMAT",
            help="Output format when the extension does not say.",
        ),
    ] = None,
    output_nodes: Annotated[
        list[str] | None,
        typer.Option(
            "--output-node",
            metavar="NODE=PATH",
            help="Also write NODE's result to PATH (NODE=PATH, format from the extension); "
            "repeatable.",
        ),
    ] = None,
    task_id: Annotated[
        str | None,
        typer.Option(
            "--task-id",
            metavar="TASK_ID",
            help="Name the run (default: a new id). Reusing a finished id returns its summary.",
        ),
    ] = None,
    store: StoreOption = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a pipeline value: KEY=VALUE (task.params.KEY) or a.b.c=VALUE; repeatable.",
        ),
    ] = None,
    max_failures: Annotated[
        int | None,
        typer.Option(
            "--max-failures", min=0, metavar="N", help="Stop the run once more than N items failed."
        ),
    ] = None,
    failed_output: FailedOutputOption = None,
    head: Annotated[
        int | None,
        typer.Option(
            "--head",
            min=1,
            metavar="N",
            help="Process only the first N records (try a pipeline on a sample).",
        ),
    ] = None,
    workers_only: Annotated[
        bool,
        typer.Option(
            "--workers-only",
            help="Split and aggregate here, but leave every chunk to `pagent worker` processes.",
        ),
    ] = False,
    as_json: JsonOption = False,
    summary_path: SummaryOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")
    ] = False,
    events: Annotated[
        str | None,
        typer.Option(
            "--events",
            metavar="PATH",
            help="Write run events as JSON Lines to PATH (or - for stdout).",
        ),
    ] = None,
    progress_interval: Annotated[
        float,
        typer.Option(
            "--progress-interval",
            min=0.1,
            metavar="SECONDS",
            help="Seconds between progress lines when not on a terminal.",
        ),
    ] = 10.0,
) -> None:
    """Run a pipeline over input data (JSON, JSON Lines or CSV).

    Example: pagent run pipelines/parallel_processing.yaml --data pipelines/data/numbers.json
    --output out.json
    """
    if data is not None and data != "-":
        from parallel_agent.digest import start_sha256

        start_sha256(data)  # on the other core, while the rest of pagent loads
    from parallel_agent.app import RunOptions, check_run_paths, run_pipeline
    from parallel_agent.display import make_sink

    with handled_errors(_debug(ctx)):
        options = RunOptions(
            pipeline=pipeline,
            data=data,
            data_format=data_format,
            data_key=data_key,
            output=output,
            output_format=output_format,
            task_id=task_id,
            store=store,
            overrides=overrides or [],
            max_failures=max_failures,
            failed_output=failed_output,
            head=head,
            workers_only=workers_only,
            output_nodes=output_nodes or [],
            stdin=sys.stdin.buffer if data == "-" else None,
            stdout=sys.stdout.buffer if output == "-" else None,
        )
        check_stdout_clash(output=output, as_json=as_json, events=events)
        check_run_paths(options, [("--events", events), ("--json", "-" if as_json else None)])
        sink = make_sink(quiet=quiet, progress_interval=progress_interval, events_path=events)
        freeze_startup_objects()
        report_run(
            sink, lambda: run_pipeline(options, sink), as_json=as_json, summary_path=summary_path
        )


def validate(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(metavar="PIPELINE", help="The pipeline YAML file.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a pipeline value; repeatable."),
    ] = None,
) -> None:
    """Check a pipeline without running it.

    Checks the schema, the graph, every expression and condition, and the imports; warns about
    condition names no module is known to write.

    Example: pagent validate pipelines/parallel_processing.yaml --set factor=3
    """
    from pathlib import Path

    from parallel_agent.pipeline.build import check_pipeline
    from parallel_agent.pipeline.loader import check_pipeline_text, read_pipeline_text

    with handled_errors(_debug(ctx)):
        text = read_pipeline_text(pipeline)
        loaded, warnings = check_pipeline_text(text, pipeline, overrides or [])
        warnings += check_pipeline(loaded, pipeline_dir=Path(pipeline).parent)
        for warning in warnings:
            sys.stderr.write(f"pagent: warning: {warning}\n")
        sys.stderr.write(f"{pipeline}: ok ({len(loaded.nodes)} nodes)\n")


def graph(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(metavar="PIPELINE", help="The pipeline YAML file.")],
    fmt: Annotated[
        str, typer.Option("--format", metavar="FORMAT", help="text, mermaid or dot.")
    ] = "text",
) -> None:
    """Show a pipeline's nodes, dependencies and decisions.

    Example: pagent graph pipelines/parallel_processing.yaml --format mermaid
    """
    from parallel_agent.display.graph import RENDERERS
    from parallel_agent.pipeline import load_pipeline

    with handled_errors(_debug(ctx)):
        if fmt not in RENDERERS:
            raise UsageError(f"unknown graph format '{fmt}'; use one of: {', '.join(RENDERERS)}")
        loaded = load_pipeline(pipeline)
        sys.stdout.write(RENDERERS[fmt](loaded))


def schema() -> None:
    """Print the pipeline file's JSON Schema (for editors).

    Example: pagent schema > pipeline.schema.json
    """
    from parallel_agent.pipeline import pipeline_json_schema

    sys.stdout.write(json.dumps(pipeline_json_schema(), indent=2) + "\n")


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(validate)
    app.command()(schema)
    app.command()(graph)
