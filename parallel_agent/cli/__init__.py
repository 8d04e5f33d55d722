"""The `pagent` command line: a thin Typer shell over `parallel_agent.runner`."""

from __future__ import annotations

from typing import Annotated

import typer

from parallel_agent import __version__

app = typer.Typer(
    name="pagent",
    help="Run YAML pipelines of parallel agents over JSON, JSON Lines and CSV data.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"pagent {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """Global options."""
    ctx.obj = {"debug": debug}


def _register() -> None:
    from parallel_agent.cli import inspect, run

    run.register(app)
    inspect.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
