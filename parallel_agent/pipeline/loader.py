"""Read a pipeline: safe YAML, `--set` overrides, then schema validation with located errors.

PyYAML's `safe_load` takes the last of two duplicate keys, expands aliases without limit and turns
`on:` into `True:`. Here the document is composed into a node tree and rebuilt by hand, so that
duplicate keys, alias bombs, non-string keys and exotic tags are refused, and every key path is
mapped to its line and column for the error messages (`pipeline.yaml, line 12, column 7:
nodes[2].node_config.timeout: must be > 0`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from parallel_agent.errors import Location, PipelineError, UsageError
from parallel_agent.pipeline.expressions import check_expressions, unknown_dependencies
from parallel_agent.pipeline.schema import (
    BUILTIN_MODULES,
    KNOWN_KEYS,
    PROBLEMS,
    KeyPath,
    Pipeline,
    Problem,
    dotted,
)

#: Aliases (`*name`) one document may use; anchors for shared settings are fine, hundreds are not.
MAX_ALIASES = 100
#: Values (scalars, lists, mappings) a document may expand to once aliases are followed; a
#: "billion laughs" file is refused when it crosses this, long before it fills memory.
MAX_VALUES = 100_000
#: Errors shown for one file; the rest are counted.
MAX_ERRORS = 20
#: One located error per line; the CLI prefixes each with "pagent: error:".
ERROR_SEPARATOR = "\n"

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}
_MODULE_TAGS = {*BUILTIN_MODULES, "class"}

Marks = dict[KeyPath, tuple[int, int]]


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts aliases and leaves dates as strings (values travel as JSON)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != f"{_TAG}timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases_seen = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _Refused(
                    f"more than {MAX_ALIASES} aliases (refusing a possible alias bomb)", mark
                )
        return super().compose_node(parent, index)


class _Refused(Exception):
    """A document refused for a reason of ours, at a place in the text."""

    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(message)
        self.message = message
        self.line = mark.line + 1
        self.column = mark.column + 1


class _Builder:
    """Turns the composed node tree into plain JSON-like values, recording where each path starts."""

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.marks: Marks = {}
        self.values = 0
        self.active: set[int] = set()
        self.flattened: set[int] = set()

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _Refused(
                f"the document expands to more than {MAX_VALUES} values (refusing a possible alias bomb)",
                node.start_mark,
            )
        self.marks.setdefault(path, _position(node.start_mark))
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if id(node) in self.active:
            raise _Refused("an alias refers to a value that contains it", node.start_mark)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode) and node.tag == f"{_TAG}seq":
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode) and node.tag == f"{_TAG}map":
                return self._mapping(node, path)
            raise _Refused(f"unsupported YAML tag '{node.tag}'", node.start_mark)
        finally:
            self.active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag not in _SCALAR_TAGS:
            raise _Refused(f"unsupported YAML tag '{node.tag}'", node.start_mark)
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, yaml.YAMLError):
            raise _Refused(
                f"'{node.value}' is not a valid {node.tag[len(_TAG) :]}", node.start_mark
            ) from None

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        if id(node) not in self.flattened:
            # Only the keys written in this mapping must be unique: `<<: *base` merges may be overridden.
            own = [key for key, _ in node.value if key.tag != f"{_TAG}merge"]
            seen: set[str] = set()
            for key_node in own:
                key = _key(key_node)
                if key in seen:
                    raise _Refused(f"duplicate key '{key}'", key_node.start_mark)
                seen.add(key)
            self.loader.flatten_mapping(node)
            self.flattened.add(id(node))
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _key(key_node)
            result[key] = self.build(value_node, (*path, key))
            self.marks[(*path, key)] = _position(key_node.start_mark)
        return result


def _key(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode) and node.tag == f"{_TAG}str":
        return str(node.value)
    if isinstance(node, yaml.ScalarNode):
        raise _Refused(
            f"key '{node.value}' is read as a {node.tag[len(_TAG) :]}, not a string; quote it",
            node.start_mark,
        )
    raise _Refused("a key must be a string, not a list or mapping", node.start_mark)


def _position(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _parse(text: str, source: str) -> tuple[Any, Marks]:
    """One YAML document → plain values and the position of every key path."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PipelineError("the pipeline is empty", location=Location(source))
        builder = _Builder(loader)
        return builder.build(root, ()), builder.marks
    except _Refused as exc:
        raise PipelineError(exc.message, location=Location(source, exc.line, exc.column)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:
            problem = f"{exc.problem} ({exc.context})"
        raise PipelineError(f"YAML syntax error: {problem}", location=where) from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"YAML error: {exc}", location=Location(source)) from None
    except RecursionError:
        raise PipelineError("the YAML is nested too deeply", location=Location(source)) from None
    finally:
        loader.dispose()


# ---- overrides -------------------------------------------------------------------------------


def _override_value(raw: str) -> Any:
    """A YAML scalar (`8`, `true`, `"a b"`); a flow list or mapping only when written as one."""
    try:
        value, _ = _parse(raw, "--set")
    except PipelineError:
        return raw
    if isinstance(value, dict | list) and not raw.lstrip().startswith(("[", "{")):
        return raw
    return value


def _step(target: Any, part: str, walked: KeyPath, override: str) -> int | str:
    """The key or list index `part` names inside `target`; list items are found by index or name."""
    if not part:
        raise UsageError(f"--set {override!r}: empty key in the path")
    if isinstance(target, dict):
        return part
    if isinstance(target, list):
        if part.isdigit():
            if int(part) >= len(target):
                raise UsageError(f"--set {override!r}: {dotted(walked)} has no item {part}")
            return int(part)
        for index, item in enumerate(target):
            if isinstance(item, dict) and item.get("name") == part:
                return index
        what = "node" if walked == ("nodes",) else "item"
        names = [str(item["name"]) for item in target if isinstance(item, dict) and "name" in item]
        close = difflib.get_close_matches(part, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"--set {override!r}: no {what} named '{part}'{hint}")
    raise UsageError(f"--set {override!r}: {dotted(walked)} is a value, not a mapping or list")


def _apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[KeyPath, str]:
    """Apply `--set` overrides in place; returns the path each override set, for error messages."""
    applied: dict[KeyPath, str] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {override!r}: expected KEY=VALUE")
        parts = key.split(".") if "." in key else ["task", "params", key]
        target: Any = doc
        walked: KeyPath = ()
        for part, following in zip(parts, parts[1:], strict=False):
            step = _step(target, part, walked, override)
            walked = (*walked, step)
            child = target.get(step) if isinstance(target, dict) else target[step]
            if child is None:
                child = target[step] = [] if following.isdigit() else {}
            target = child
        last = _step(target, parts[-1], walked, override)
        target[last] = _override_value(raw)
        applied[(*walked, last)] = override
    return applied


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Helm-style `--set KEY=VALUE` on a parsed document, before validation; returns a new document.

    `a.b.c=v` sets a path; in a list, a segment picks the item by index or by its `name`
    (`nodes.processor.node_config.concurrency=8`); a key without a dot sets `task.params.<key>`.
    Values are read as YAML scalars. A malformed override or an unknown node is a UsageError.
    """
    result = copy.deepcopy(doc)
    _apply_overrides(result, overrides)
    return result


# ---- validation errors -----------------------------------------------------------------------

_COMPARISONS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}
_TYPES = {
    "finite": "a finite number",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
}


def _human(error: Any) -> str:
    """pydantic's error → a short message in the words of the YAML file."""
    kind: str = error["type"]
    context = error.get("ctx") or {}
    leaf = error["loc"][-1] if error["loc"] else None
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(leaf), sorted(KNOWN_KEYS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{leaf}'{hint}"
    if kind == "missing":
        return "required"
    if kind in _COMPARISONS:
        symbol, name = _COMPARISONS[kind]
        limit = context.get(name)
        shown = f"{limit:g}" if isinstance(limit, int | float) else str(limit)
        return f"must be {symbol} {shown}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must have at least {context.get('min_length')} item(s)"
    if kind == "string_pattern_mismatch":
        if leaf in ("function", "class"):
            return "must look like 'package.module:attribute'"
        if leaf == "name":
            return "must start with a letter or _ and hold only letters, digits, _ and -"
        return f"must match {context.get('pattern')}"
    if kind == "literal_error":
        return f"must be one of {context.get('expected')}"
    return _type_message(kind) or str(error["msg"]).removeprefix("Value error, ")


def _type_message(kind: str) -> str | None:
    for prefix, words in _TYPES.items():
        if kind.startswith(f"{prefix}_"):
            return f"must be {words}"
    return None


def _yaml_path(loc: Sequence[str | int]) -> KeyPath:
    """Drop the union tags pydantic inserts after `modules[i]` (`modules.0.map.expr`)."""
    parts: list[str | int] = []
    for i, part in enumerate(loc):
        tagged = i >= 2 and loc[i - 2] == "modules" and isinstance(loc[i - 1], int)
        if not (tagged and part in _MODULE_TAGS):
            parts.append(part)
    return tuple(parts)


def _problems(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for error in exc.errors():
        path = _yaml_path(error["loc"])
        if error["type"] == PROBLEMS:
            problems.extend(((*path, *sub), message) for sub, message in error["ctx"]["problems"])
        else:
            problems.append((path, _human(error)))
    return problems


def _where(path: KeyPath, source: str, marks: Marks, applied: dict[KeyPath, str]) -> Location | str:
    """The `--set` that wrote this path, or the line and column of its nearest written ancestor."""
    for end in range(len(path), 0, -1):
        if path[:end] in applied:
            return f"--set {applied[path[:end]]}"
    probe = path
    while probe and probe not in marks:
        probe = probe[:-1]
    line, column = marks.get(probe, (None, None))
    return Location(source, line, column)


def _located(
    problems: Sequence[Problem], source: str, marks: Marks, applied: dict[KeyPath, str]
) -> list[tuple[Location | str, KeyPath, str]]:
    located = [(_where(path, source, marks, applied), path, message) for path, message in problems]

    def order(item: tuple[Location | str, KeyPath, str]) -> tuple[int, int]:
        where = item[0]
        if isinstance(where, Location) and where.line is not None:
            return where.line, where.column or 0
        return 1 << 30, 0

    return sorted(located, key=order)


def _lines(located: Sequence[tuple[Location | str, KeyPath, str]]) -> list[str]:
    return [
        f"{where}: {dotted(path)}: {message}" if path else f"{where}: {message}"
        for where, path, message in located
    ]


def _located_error(
    problems: Sequence[Problem], source: str, marks: Marks, applied: dict[KeyPath, str]
) -> PipelineError:
    located = _located(problems, source, marks, applied)
    first_where, first_path, first_message = located[0]
    if len(located) == 1 and isinstance(first_where, Location):
        message = f"{dotted(first_path)}: {first_message}" if first_path else first_message
        return PipelineError(message, location=first_where)
    lines = _lines(located)
    if len(lines) > MAX_ERRORS:
        lines = [*lines[:MAX_ERRORS], f"... and {len(lines) - MAX_ERRORS} more errors"]
    # One line: the CLI writes each error as a single `pagent: error: ...` line.
    return PipelineError(ERROR_SEPARATOR.join(lines))


# ---- public API ------------------------------------------------------------------------------


def load_pipeline_text(
    text: str, source: str = "<string>", overrides: Sequence[str] = ()
) -> Pipeline:
    """Parse, override and validate a pipeline given as text; `source` names it in messages."""
    return check_pipeline_text(text, source, overrides)[0]


def check_pipeline_text(
    text: str, source: str = "<string>", overrides: Sequence[str] = ()
) -> tuple[Pipeline, list[str]]:
    """`load_pipeline_text`, plus the located warnings (`pagent validate` prints them)."""
    doc, marks = _parse(text, source)
    if doc is None:
        raise PipelineError("the pipeline is empty", location=Location(source))
    if not isinstance(doc, dict):
        line, column = marks[()]
        raise PipelineError(
            "the pipeline must be a mapping with name and nodes",
            location=Location(source, line, column),
        )
    applied = _apply_overrides(doc, overrides)
    errors, warnings = check_expressions(doc)
    try:
        pipeline = Pipeline.model_validate(doc)
    except ValidationError as exc:
        schema_errors = _problems(exc)
        # The graph's checks run only on a valid model: find unknown dependencies here too, so
        # that one run of `validate` shows every problem of the file.
        if not any("dependencies" in path for path, _ in schema_errors):
            schema_errors += unknown_dependencies(doc)
        errors = [*schema_errors, *errors]
    if errors:
        raise _located_error(errors, source, marks, applied)
    return pipeline, _lines(_located(warnings, source, marks, applied))


def read_pipeline_text(path: str | Path) -> str:
    """A pipeline file's text; an unreadable file is a PipelineError (exit 2)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PipelineError(f"cannot read pipeline {path}: {reason}") from None


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
    """Read, parse, override and validate a pipeline file; any problem is a PipelineError (exit 2)."""
    return load_pipeline_text(read_pipeline_text(path), str(path), overrides)


def pipeline_hash(pipeline: Pipeline) -> str:
    """sha256 of the validated model as canonical JSON: formatting, comments, key order and
    spelled-out defaults do not change it; any change of meaning does."""
    canonical = json.dumps(pipeline.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pipeline_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the pipeline file, for editors and `pagent schema`."""
    return Pipeline.model_json_schema(by_alias=True)
