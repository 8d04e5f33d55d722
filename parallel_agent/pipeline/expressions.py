"""Every expression and condition of a pipeline, compiled once when the file is loaded, so that a
syntax error, a forbidden construct or a misspelled name is reported with the file's line and
column (like any YAML error), all of them at once, before anything runs.

A map or filter `expr` reads only `item`, `record`, `index` and `params`; an aggregate `expr` only
`results` and `params`. Conditions read cache keys, so any name may be meant: one that no module
is known to write reads as None, which `pagent validate` warns about.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from parallel_agent.conditions import (
    AGGREGATE_NAMES,
    ITEM_NAMES,
    compile_condition,
    compile_expression,
)
from parallel_agent.errors import ConditionError
from parallel_agent.pipeline.schema import KeyPath, Problem

Names = frozenset[str] | None

#: Names a condition can count on: the walkthrough's views computed from the store, and the
#: `task` and `final_results` keys the engine and the built-in aggregate write.
CONDITION_NAMES = frozenset(
    {
        "subtasks",
        "completed_subtasks",
        "pending_subtasks",
        "failed_subtasks",
        "final_results",
        "params",
        "task",
    }
)


def _sites(node: dict[str, Any], here: KeyPath) -> Iterator[tuple[KeyPath, Any, str, Names]]:
    """(key path, text, what, names it may read; None for a condition) of each expression."""
    modules = node.get("modules")
    for position, spec in enumerate(modules if isinstance(modules, list) else []):
        if not isinstance(spec, dict) or not isinstance(spec.get("expr"), str):
            continue
        use = spec.get("use")
        if use in ("map", "filter"):
            yield (*here, "modules", position, "expr"), spec["expr"], str(use), ITEM_NAMES
        elif use == "aggregate":
            yield (*here, "modules", position, "expr"), spec["expr"], "aggregate", AGGREGATE_NAMES
    config = node.get("node_config")
    if isinstance(config, dict) and isinstance(config.get("condition"), str):
        yield (*here, "node_config", "condition"), config["condition"], "condition", None
    decisions = node.get("decisions")
    for position, decision in enumerate(decisions if isinstance(decisions, list) else []):
        if isinstance(decision, dict) and isinstance(decision.get("condition"), str):
            what = f"decision {position + 1}"
            yield (*here, "decisions", position, "condition"), decision["condition"], what, None


def check_expressions(doc: dict[str, Any]) -> tuple[list[Problem], list[Problem]]:
    """Compile every expression of a parsed pipeline document (before, and whatever, the schema
    says of the rest): (errors, warnings), each at its key path."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    nodes = doc.get("nodes")
    nodes = [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []
    custom = any(
        isinstance(spec, dict) and "class" in spec
        for node in nodes
        for spec in (node.get("modules") if isinstance(node.get("modules"), list) else [])
    )
    for index, node in enumerate(doc.get("nodes") or []):
        if not isinstance(node, dict):
            continue
        name = node.get("name", index)
        for path, text, kind, names in _sites(node, ("nodes", index)):
            what = f"node '{name}', {kind}"
            try:
                if names is not None:
                    compile_expression(text, what=what, names=names)
                    continue
                condition = compile_condition(text, what=what)
            except ConditionError as exc:
                errors.append((path, f"{exc.problem} (node '{name}')"))
                continue
            if custom:
                continue  # a custom module may write any cache key
            for unknown in sorted(condition.names - CONDITION_NAMES):
                close = difflib.get_close_matches(unknown, sorted(CONDITION_NAMES), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                warnings.append(
                    (
                        path,
                        f"condition of node '{name}' reads '{unknown}', which no module is "
                        f"known to write: it reads as None{hint}",
                    )
                )
    return errors, warnings


def unknown_dependencies(doc: dict[str, Any]) -> list[Problem]:
    """Dependencies naming no node of the document (read before, and whatever, the schema says)."""
    nodes = doc.get("nodes")
    nodes = [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []
    names = [str(node["name"]) for node in nodes if isinstance(node.get("name"), str)]
    problems: list[Problem] = []
    for index, node in enumerate(doc.get("nodes") or []):
        dependencies = node.get("dependencies") if isinstance(node, dict) else None
        for position, name in enumerate(dependencies if isinstance(dependencies, list) else []):
            if isinstance(name, str) and name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                path: KeyPath = ("nodes", index, "dependencies", position)
                problems.append((path, f"unknown node '{name}'{hint}"))
    return problems
