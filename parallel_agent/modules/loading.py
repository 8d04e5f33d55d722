"""Import `package.module:attribute` references named in a pipeline, with errors that name them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from parallel_agent.errors import PipelineError


def add_import_roots(*folders: str | Path) -> None:
    """Let pipelines import modules that sit next to them or in the working directory: each
    folder goes first on the import path (moved there if it was already on it), the last one
    given first. A worker process, whose path starts with its working directory, so gets the
    same order as the coordinator: the same module for the same name."""
    for folder in folders:
        text = str(Path(folder).resolve())
        while text in sys.path:
            sys.path.remove(text)
        sys.path.insert(0, text)


def import_object(reference: str, *, what: str) -> Any:
    """Return the object `reference` ("pkg.mod:attr.sub") names, or raise a PipelineError saying why not."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise PipelineError(f"{what}: '{reference}' is not of the form 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail in any way; the user needs the reason
        raise PipelineError(
            f"{what}: cannot import '{reference}': {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PipelineError(
                f"{what}: cannot import '{reference}': module '{module_name}' has no attribute "
                f"'{attribute}'"
            ) from None
    return target
