"""`pagent run`, `pagent validate`, `pagent schema`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from parallel_agent.cli.errors import handled_errors, say_stop_reason
from parallel_agent.cli.options import FailedOutputOption, StoreOption
from parallel_agent.cli.process import freeze_startup_objects
from parallel_agent.errors import UsageError
from parallel_agent.jsonl import ascii_text


def _debug(ctx: typer.Context) -> bool:
    return bool((ctx.obj or {}).get("debug"))


def run(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(help="The pipeline YAML file.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Input file, or - for stdin.")
    ] = None,
    data_format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="Input format: json, jsonl or csv (default: from the extension)."
        ),
    ] = None,
    data_key: Annotated[
        str,
        typer.Option(
            "--data-key", help="Key of the record array when the JSON input is an object."
        ),
    ] = "data",
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Output file (.json, .jsonl, .csv), or - for stdout."),
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option("--output-format", help="Output format when the extension does not say."),
    ] = None,
    output_nodes: Annotated[
        list[str] | None,
        typer.Option(
            "--output-node",
            help="Also write NODE's result to PATH (NODE=PATH, format from the extension); "
            "repeatable.",
        ),
    ] = None,
    task_id: Annotated[
        str | None,
        typer.Option(
            "--task-id",
            help="Name the run (default: a new id). Reusing a finished id returns its summary.",
        ),
    ] = None,
    store: StoreOption = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a pipeline value: KEY=VALUE (task.params.KEY) or a.b.c=VALUE; repeatable.",
        ),
    ] = None,
    max_failures: Annotated[
        int | None,
        typer.Option("--max-failures", min=0, help="Stop the run once more than N items failed."),
    ] = None,
    failed_output: FailedOutputOption = None,
    workers_only: Annotated[
        bool,
        typer.Option(
            "--workers-only",
            help="Split and aggregate here, but leave every chunk to `pagent worker` processes.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout at the end.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")
    ] = False,
    events: Annotated[
        str | None,
        typer.Option("--events", help="Write run events as JSON Lines to PATH (or - for stdout)."),
    ] = None,
    progress_interval: Annotated[
        float,
        typer.Option(
            "--progress-interval",
            min=0.1,
            help="Seconds between progress lines when not on a terminal.",
        ),
    ] = 10.0,
) -> None:
    """Run a pipeline over input data."""
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
            workers_only=workers_only,
            output_nodes=output_nodes or [],
            stdin=sys.stdin.buffer if data == "-" else None,
            stdout=sys.stdout.buffer if output == "-" else None,
        )
        if events == "-" and (output == "-" or as_json):
            raise UsageError("--events - shares stdout with the results or --json; give it a file")
        check_run_paths(options, [("--events", events), ("--json", "-" if as_json else None)])
        sink = make_sink(quiet=quiet, progress_interval=progress_interval, events_path=events)
        freeze_startup_objects()
        try:
            summary = run_pipeline(options, sink)
        finally:
            sink.close()
        if as_json:
            sys.stdout.write(ascii_text(summary.to_dict()) + "\n")
            sys.stdout.flush()
        say_stop_reason(summary.exit_code, summary.error)
        raise typer.Exit(summary.exit_code)


def validate(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(help="The pipeline YAML file.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a pipeline value.")
    ] = None,
) -> None:
    """Check a pipeline without running it (schema, graph, conditions, imports)."""
    from pathlib import Path

    from parallel_agent.pipeline import load_pipeline
    from parallel_agent.pipeline.build import check_pipeline

    with handled_errors(_debug(ctx)):
        loaded = load_pipeline(pipeline, overrides or [])
        for warning in check_pipeline(loaded, pipeline_dir=Path(pipeline).parent):
            sys.stderr.write(f"pagent: warning: {warning}\n")
        sys.stderr.write(f"{pipeline}: ok ({len(loaded.nodes)} nodes)\n")


def graph(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Argument(help="The pipeline YAML file.")],
    fmt: Annotated[str, typer.Option("--format", help="text, mermaid or dot.")] = "text",
) -> None:
    """Show how a pipeline will run: nodes, dependencies, layers and flow decisions."""
    from parallel_agent.display.graph import RENDERERS
    from parallel_agent.pipeline import load_pipeline

    with handled_errors(_debug(ctx)):
        if fmt not in RENDERERS:
            raise UsageError(f"unknown graph format '{fmt}'; use one of: {', '.join(RENDERERS)}")
        loaded = load_pipeline(pipeline)
        sys.stdout.write(RENDERERS[fmt](loaded))


def schema() -> None:
    """Print the pipeline file's JSON Schema (for editors)."""
    from parallel_agent.pipeline import pipeline_json_schema

    sys.stdout.write(json.dumps(pipeline_json_schema(), indent=2) + "\n")


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(validate)
    app.command()(schema)
    app.command()(graph)
