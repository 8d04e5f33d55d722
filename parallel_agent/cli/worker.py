"""`pagent worker`: join the runs of a Redis store and work their chunks."""

# Annotations stay objects here (no `from __future__ import annotations`): Typer reads every
# command's signature on each command line, and a string annotation costs it an eval (10 ms).

import json
import sys
from typing import Annotated

import typer

from parallel_agent.cli.errors import handled_errors
from parallel_agent.cli.process import freeze_startup_objects

#: `--store` of `worker` and `workers`: required, since workers meet only in a shared Redis.
RedisStoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="PAGENT_STORE",
        metavar="URL",
        help="The runs' Redis store: redis://host:6379/0.",
    ),
]


def worker(
    ctx: typer.Context,
    store: RedisStoreOption,
    pipelines: Annotated[
        list[str] | None,
        typer.Option(
            "--pipeline",
            "-p",
            metavar="PATH",
            help="A pipeline file whose runs this worker joins (same hash); repeatable.",
        ),
    ] = None,
    task_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--task-id",
            metavar="TASK_ID",
            help="Join only these runs (and exit once they ended); repeatable.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", min=1, metavar="N", help="Cap each node's concurrency on this host."
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes", min=1, metavar="N", help="Cap each node's worker processes on this host."
        ),
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(
            "--idle-exit", min=0, metavar="S", help="Exit 0 after S seconds with nothing to claim."
        ),
    ] = None,
    any_pipeline: Annotated[
        bool,
        typer.Option(
            "--any-pipeline",
            help="Also run code named only by a pipeline stored in Redis (trusted setups only).",
        ),
    ] = False,
) -> None:
    """Claim and process the chunks of a Redis store's runs.

    Example: pagent worker --store redis://host:6379/0 --pipeline pipeline.yaml
    """
    from parallel_agent.app.worker import WorkerOptions, run_worker

    freeze_startup_objects()
    with handled_errors(bool((ctx.obj or {}).get("debug"))):
        options = WorkerOptions(
            store=store,
            pipelines=pipelines or [],
            task_ids=task_ids or [],
            concurrency=concurrency,
            processes=processes,
            idle_exit=idle_exit,
            any_pipeline=any_pipeline,
        )
        raise typer.Exit(run_worker(options))


def workers(
    ctx: typer.Context,
    store: RedisStoreOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the workers as JSON.")] = False,
) -> None:
    """List the live `pagent worker` processes of a Redis store.

    Example: pagent workers --store redis://host:6379/0 --json
    """
    from parallel_agent.app.worker import list_workers

    with handled_errors(bool((ctx.obj or {}).get("debug"))):
        found = list_workers(store)
    if as_json:
        sys.stdout.write(json.dumps(found) + "\n")
        return
    if not found:
        sys.stdout.write("no live workers\n")
        return
    lines = [f"{'host':<20} {'pid':>7} {'runs':<24} {'chunks':>7} {'items/s':>9} {'seen':>7}"]
    for worker in found:
        runs = ",".join(worker.get("runs") or {}) or "-"
        lines.append(
            f"{worker['host']:<20} {worker['pid']:>7} {runs:<24} {worker['chunks']:>7} "
            f"{worker['items_per_s']:>9,.1f} {worker['last_seen']:>5.1f} s"
        )
    sys.stdout.write("\n".join(lines) + "\n")


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(workers)
