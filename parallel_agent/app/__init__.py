"""The library API (application services) behind the command line, one idea a module.

- `api`: `run(pipeline, data, ...)`, the entry point for notebooks and scripts;
- `run`: run and resume a pipeline (`run_pipeline`, `resume_run`);
- `inspect`: read-only questions about runs (status, list, results, failures);
- `maintenance`: cancel a run, drop finished runs;
- `outputs` and `summary`: what a run writes and reports.

The CLI is a thin shell over these functions; scripts and tests call them directly.
"""

from parallel_agent.app.api import run
from parallel_agent.app.inspect import (
    export_failed,
    export_results,
    get_status,
    iter_failures,
    list_runs,
)
from parallel_agent.app.maintenance import cancel_run, gc_runs
from parallel_agent.app.run import RunOptions, check_run_paths, resume_run, run_pipeline
from parallel_agent.app.summary import RunSummary

__all__ = [
    "RunOptions",
    "RunSummary",
    "cancel_run",
    "check_run_paths",
    "export_failed",
    "export_results",
    "gc_runs",
    "get_status",
    "iter_failures",
    "list_runs",
    "resume_run",
    "run",
    "run_pipeline",
]
