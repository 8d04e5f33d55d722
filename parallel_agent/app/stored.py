"""A stored run's code: the pipeline stored with it, the processors rebuilt from it, and the
fingerprint of the code it runs (pagent's version, module files, commands).

The coordinator records the fingerprint when it creates a run (`code_manifest`); a worker joining
the run from another process or host rebuilds the map and filter processors from the stored
pipeline (`build_stored_nodes`) only after `code_mismatch` found its own code identical, so every
process of a run runs the same code or none of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shlex
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from parallel_agent import __version__
from parallel_agent.errors import PipelineError, UsageError
from parallel_agent.modules.context import RunContext
from parallel_agent.modules.loading import add_import_roots
from parallel_agent.pipeline import Pipeline, pipeline_hash
from parallel_agent.pipeline.build import ChunkNode, build_chunk_node, chunk_node_specs
from parallel_agent.pipeline.schema import ClassSpec, FilterSpec, MapSpec
from parallel_agent.store.base import RunInfo

#: A piece of code a pipeline names: ("function", "pkg.mod:f"), ("class", ...), or
#: ("command", text, environment as JSON) — the environment can change what a command runs.
CodeReference = tuple[str, ...]


def stored_pipeline(info: RunInfo) -> Pipeline:
    """The pipeline stored with the run, validated and checked against the run's hash."""
    try:
        pipeline = Pipeline.model_validate_json(info.pipeline_text)
    except ValidationError as exc:
        raise UsageError(
            f"task '{info.task_id}': its stored pipeline is not valid: {exc}"
        ) from None
    if pipeline_hash(pipeline) != info.pipeline_hash:
        raise UsageError(f"task '{info.task_id}': its stored pipeline does not match its hash")
    return pipeline


def code_references(pipeline: Pipeline) -> set[CodeReference]:
    """Every function, class and command the pipeline would run."""
    found: set[CodeReference] = set()
    for node in pipeline.nodes:
        for spec in node.modules:
            if isinstance(spec, MapSpec | FilterSpec) and spec.function is not None:
                found.add(("function", spec.function))
            elif isinstance(spec, MapSpec) and spec.command is not None:
                environment = orjson.dumps(spec.env or {}, option=orjson.OPT_SORT_KEYS).decode()
                found.add(("command", spec.command, environment))
            elif isinstance(spec, ClassSpec):
                found.add(("class", spec.class_))
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _module_digest(reference: str, pipeline_dir: Path) -> tuple[str, str]:
    """("module NAME", digest of its source file); PipelineError when it cannot be found."""
    module_name = reference.partition(":")[0]
    add_import_roots(Path.cwd(), pipeline_dir)
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise PipelineError(f"cannot import module '{module_name}': {exc}") from None
    if spec is None:
        raise PipelineError(f"cannot import module '{module_name}': not found")
    origin = spec.origin or ""
    try:
        digest = (
            _sha256(Path(origin).read_bytes())
            if Path(origin).is_file()
            else _sha256(origin.encode())
        )
    except OSError as exc:
        raise PipelineError(f"cannot read module '{module_name}' ({origin}): {exc}") from None
    return f"module {module_name}", digest


def _command_digest(command: str, environment: str, pipeline_dir: Path) -> tuple[str, str]:
    """The command's text and environment, plus every argument that is a file under the
    pipeline's folder (a script it runs)."""
    digest = hashlib.sha256(command.encode() + b"\0" + environment.encode())
    folder = pipeline_dir.resolve()
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for word in words:
        path = (folder / word).resolve()
        if path.is_file() and path.is_relative_to(folder):
            digest.update(b"\0" + word.encode() + b"\0" + path.read_bytes())
    return f"command {command}", digest.hexdigest()


def code_digests(pipeline: Pipeline, pipeline_dir: Path) -> dict[str, str]:
    """A digest of every module file the pipeline imports and of every command it runs."""
    digests: dict[str, str] = {}
    for reference in sorted(code_references(pipeline)):
        if reference[0] == "command":
            name, digest = _command_digest(reference[1], reference[2], pipeline_dir)
        else:
            name, digest = _module_digest(reference[1], pipeline_dir)
        digests[name] = digest
    return digests


def code_manifest(pipeline: Pipeline, pipeline_dir: Path) -> dict[str, Any]:
    """What the coordinator records with a run so workers can prove they run the same code."""
    return {"version": __version__, "digests": code_digests(pipeline, pipeline_dir)}


def code_mismatch(
    manifest: dict[str, Any] | None, pipeline: Pipeline, pipeline_dir: Path
) -> str | None:
    """Why this process's code differs from the run's (one line), or None when it is the same."""
    if not manifest:
        return "the run records no code digests (started by an older pagent)"
    if manifest.get("version") != __version__:
        return f"pagent {__version__} here, the run's coordinator has {manifest.get('version')}"
    try:
        mine = code_digests(pipeline, pipeline_dir)
    except PipelineError as exc:
        return str(exc)
    theirs: dict[str, str] | None = manifest.get("digests")
    if theirs is None:
        return f"the coordinator could not read its own code: {manifest.get('error')}"
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            return (
                f"{name}: digest {str(mine.get(name))[:12]} here, "
                f"{str(theirs.get(name))[:12]} on the coordinator"
            )
    return None


def build_stored_nodes(
    pipeline: Pipeline,
    pipeline_dir: Path,
    ctx: RunContext,
    *,
    max_concurrency: int | None = None,
    max_processes: int | None = None,
) -> list[ChunkNode]:
    """The run's map and filter nodes, their `concurrency` and `processes` capped for this host."""
    nodes = []
    for node, spec in chunk_node_specs(pipeline):
        config = node.node_config
        changes: dict[str, int] = {}
        if max_concurrency is not None:
            changes["concurrency"] = min(config.concurrency, max_concurrency)
        if max_processes is not None and config.processes:
            changes["processes"] = min(config.processes, max_processes)
        capped = node.model_copy(update={"node_config": config.model_copy(update=changes)})
        nodes.append(build_chunk_node(pipeline, capped, spec, pipeline_dir, ctx))
    return nodes
