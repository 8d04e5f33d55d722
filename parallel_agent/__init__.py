"""pagent: run YAML pipelines of parallel agents over JSON, JSON Lines and CSV data.

`parallel_agent.run(pipeline, data, ...)` runs a pipeline from Python (a notebook, a script) and
returns its summary (`parallel_agent.app.api.run`); the command line is `pagent`.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "run"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `pagent` itself starts without loading the library API.
    if name == "run":
        from parallel_agent.app.api import run

        return run
    raise AttributeError(f"module 'parallel_agent' has no attribute {name!r}")
