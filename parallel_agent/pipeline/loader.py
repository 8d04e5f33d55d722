"""Read a pipeline file: YAML with duplicate keys and alias bombs refused, then schema validation
whose errors name the key path and its line and column in the file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from parallel_agent.errors import Location, PipelineError, UsageError
from parallel_agent.pipeline.schema import Pipeline

#: Aliases (`*name`) a file may use; anchors are handy, a "billion laughs" file is not.
MAX_ALIASES = 50

Marks = dict[tuple[str | int, ...], tuple[int, int]]


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys and too many aliases."""

    aliases_seen = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.MarkedYAMLError(
                    problem=f"more than {MAX_ALIASES} aliases (refusing a possible alias bomb)",
                    problem_mark=mark,
                )
        return super().compose_node(parent, index)


def _build(node: yaml.Node, path: tuple[str | int, ...], marks: Marks, loader: _Loader) -> Any:
    """Turn a composed YAML node into Python values, remembering where each path starts."""
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise _yaml_error("keys must be plain values", key_node.start_mark)
            if key in result:
                raise _yaml_error(f"duplicate key '{key}'", key_node.start_mark)
            result[key] = _build(value_node, (*path, str(key)), marks, loader)
            marks[(*path, str(key))] = (
                key_node.start_mark.line + 1,
                key_node.start_mark.column + 1,
            )
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), marks, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


class _PositionedError(Exception):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


def _yaml_error(message: str, mark: Any) -> _PositionedError:
    return _PositionedError(message, mark.line + 1, mark.column + 1)


def _parse(text: str, source: str) -> tuple[Any, Marks]:
    loader = _Loader(text)
    marks: Marks = {}
    try:
        root = loader.get_single_node()
        if root is None:
            raise PipelineError("the pipeline file is empty", location=Location(source))
        return _build(root, (), marks, loader), marks
    except _PositionedError as exc:
        raise PipelineError(str(exc), location=Location(source, exc.line, exc.column)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        problem = exc.problem or exc.context or "invalid YAML"
        raise PipelineError(f"YAML syntax error: {problem}", location=where) from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"YAML error: {exc}", location=Location(source)) from None
    finally:
        loader.dispose()


def _format_path(parts: Sequence[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _human(error: Any) -> str:
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"unknown key '{error['loc'][-1]}'"
    if kind == "missing":
        return "required"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        symbol = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }[kind]
        key = {
            "greater_than": "gt",
            "greater_than_equal": "ge",
            "less_than": "lt",
            "less_than_equal": "le",
        }[kind]
        limit = context.get(key)
        return (
            f"must be {symbol} {limit:g}"
            if isinstance(limit, int | float)
            else f"must be {symbol} {limit}"
        )
    if kind.startswith("int_"):
        return "must be an integer"
    if kind.startswith("float_"):
        return "must be a number"
    if kind.startswith("bool_"):
        return "must be true or false"
    if kind == "string_pattern_mismatch":
        if error["loc"][-1] in ("function", "class"):
            return "must look like 'package.module:attribute'"
        return f"must match {context.get('pattern')}"
    if kind == "literal_error":
        return f"must be one of {context.get('expected')}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _validation_error(exc: ValidationError, source: str, marks: Marks) -> PipelineError:
    lines = []
    for error in exc.errors():
        loc = tuple(
            part
            for part in error["loc"]
            if not (
                isinstance(part, str) and part in ("split", "map", "filter", "aggregate", "class")
            )
        )
        path = _format_path(loc)
        probe: tuple[str | int, ...] = tuple(loc)
        while probe and probe not in marks:
            probe = probe[:-1]
        line, column = marks.get(probe, (None, None))
        where = str(Location(source, line, column))
        lines.append(f"{where}: {path + ': ' if path else ''}{_human(error)}")
    return PipelineError("; ".join(lines))


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Helm-style `--set`: `key=value` sets task.params.key; `a.b.c=value` sets a path, with
    `nodes.<name>` addressing a node by name. Values are YAML scalars."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {override!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".") if "." in key else ["task", "params", key]
        target: Any = doc
        for position, part in enumerate(parts[:-1]):
            if position == 0 and part == "nodes" and isinstance(target.get("nodes"), list):
                name = parts[1]
                matches = [
                    n for n in target["nodes"] if isinstance(n, dict) and n.get("name") == name
                ]
                if not matches:
                    raise UsageError(f"--set {override!r}: no node named '{name}'")
                target = {"__node__": matches[0]}
                continue
            if position == 1 and "__node__" in target:
                target = target["__node__"]
                continue
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"--set {override!r}: '{part}' is not a mapping")
            target = child
        if "__node__" in target:
            raise UsageError(f"--set {override!r}: name a key inside the node")
        target[parts[-1]] = value
    return doc


def load_pipeline_text(
    text: str, source: str = "<string>", overrides: Sequence[str] = ()
) -> Pipeline:
    """Parse and validate a pipeline given as text."""
    doc, marks = _parse(text, source)
    if not isinstance(doc, dict):
        raise PipelineError(
            "the pipeline must be a mapping with name and nodes", location=Location(source, 1, 1)
        )
    doc = apply_overrides(doc, overrides)
    try:
        return Pipeline.model_validate(doc)
    except ValidationError as exc:
        raise _validation_error(exc, source, marks) from None


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
    """Read, parse and validate a pipeline file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PipelineError(f"cannot read pipeline {path}: {reason}") from None
    return load_pipeline_text(text, str(path), overrides)


def pipeline_hash(pipeline: Pipeline) -> str:
    """A hash of what the pipeline means (formatting and comments do not change it)."""
    canonical = json.dumps(pipeline.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pipeline_json_schema() -> dict[str, Any]:
    """JSON Schema of the pipeline file, for editors."""
    return Pipeline.model_json_schema(by_alias=True)
