"""Options that several commands share, declared once so their names and help stay the same."""

from __future__ import annotations

from typing import Annotated

import typer

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="PAGENT_STORE",
        help="Run store URL: sqlite:///path.db, redis://host:6379/0, memory:// "
        "(default: the embedded SQLite file).",
    ),
]

FailedOutputOption = Annotated[
    str | None,
    typer.Option(
        "--failed-output",
        help="Write the failed input records to PATH, in the input's format, to run again.",
    ),
]
