"""`pagent graph`: a pipeline's nodes, dependencies, layers and flow decisions, before it runs."""

from __future__ import annotations

import json
from graphlib import TopologicalSorter

from parallel_agent.pipeline import NodeSpec, Pipeline


def module_label(node: NodeSpec) -> str:
    """A short description of what a node does."""
    if node.type == "flow_control":
        return "flow control"
    parts = []
    for module in node.modules:
        data = module.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
        use = data.pop("use", "class")
        details = ", ".join(f"{key}: {value}" for key, value in data.items())
        parts.append(f"{use} {details}".strip())
    return "; ".join(parts)


def layers(pipeline: Pipeline) -> list[list[str]]:
    """Nodes grouped by dependency depth, each layer in file order (the order the engine runs)."""
    sorter = TopologicalSorter({node.name: node.dependencies for node in pipeline.nodes})
    sorter.prepare()
    order = {node.name: i for i, node in enumerate(pipeline.nodes)}
    result = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=order.__getitem__)
        result.append(ready)
        sorter.done(*ready)
    return result


def chosen_by(pipeline: Pipeline) -> dict[str, list[str]]:
    """{branch target: the branch points choosing it}, for targets that run only when chosen
    (those not upstream of their branch point; docs/semantics.md)."""
    nodes = {node.name: node for node in pipeline.nodes}
    depended = {d for node in pipeline.nodes for d in node.dependencies}

    def upstream(name: str) -> set[str]:
        seen: set[str] = set()
        stack = list(nodes[name].dependencies)
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(nodes[dep].dependencies)
        return seen | {name}

    found: dict[str, list[str]] = {}
    for node in pipeline.nodes:
        if node.type != "flow_control" or not (node.dependencies or node.name in depended):
            continue
        before = upstream(node.name)
        targets = [d.next_node for d in node.decisions] + [node.default or ""]
        for target in dict.fromkeys(t for t in targets if t and t not in before):
            found.setdefault(target, []).append(node.name)
    return found


def _behind_targets(
    pipeline: Pipeline, gated: dict[str, list[str]]
) -> dict[str, list[tuple[str, str]]]:
    """{node: (target, branch point) for each branch target it is downstream of}: such a node
    runs only when its target is chosen."""
    children: dict[str, list[str]] = {node.name: [] for node in pipeline.nodes}
    for node in pipeline.nodes:
        for dependency in node.dependencies:
            children.setdefault(dependency, []).append(node.name)
    found: dict[str, list[tuple[str, str]]] = {}
    for target, points in gated.items():
        seen: set[str] = set()
        stack = list(children.get(target, []))
        while stack:
            name = stack.pop()
            if name in seen or name == target:
                continue
            seen.add(name)
            stack.extend(children.get(name, []))
        for name in sorted(seen):
            found.setdefault(name, []).extend((target, point) for point in points)
    return found


def render_text(pipeline: Pipeline) -> str:
    nodes = {node.name: node for node in pipeline.nodes}
    gated = chosen_by(pipeline)
    behind = _behind_targets(pipeline, gated)
    lines = [f"pipeline {pipeline.name}"]
    for number, layer in enumerate(layers(pipeline), start=1):
        lines.append(f"layer {number}:")
        for name in layer:
            node = nodes[name]
            after = f" (after {', '.join(node.dependencies)})" if node.dependencies else ""
            lines.append(f"  {name} [{node.type}] {module_label(node)}{after}")
            if node.node_config.condition:
                lines.append(f"      runs only if: {node.node_config.condition}")
            for point in gated.get(name, []):
                lines.append(f"      runs only when {point} chooses it")
            for target, point in behind.get(name, []):
                lines.append(f"      runs only when {point} chooses {target}")
            for decision in node.decisions:
                lines.append(f"      -> {decision.next_node} if {decision.condition}")
            if node.default is not None:
                lines.append(f"      -> {node.default} otherwise")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return json.dumps(text)


def render_mermaid(pipeline: Pipeline) -> str:
    lines = ["flowchart TD"]
    for node in pipeline.nodes:
        label = f"{node.name}<br/>{module_label(node)}".replace('"', "#quot;")
        shape = ('{"', '"}') if node.type == "flow_control" else ('["', '"]')
        lines.append(f"    {node.name}{shape[0]}{label}{shape[1]}")
    for node in pipeline.nodes:
        for dependency in node.dependencies:
            lines.append(f"    {dependency} --> {node.name}")
        for decision in node.decisions:
            condition = decision.condition.replace('"', "#quot;").replace("|", "#124;")
            lines.append(f'    {node.name} -.->|"{condition}"| {decision.next_node}')
        if node.default is not None:
            lines.append(f'    {node.name} -.->|"default"| {node.default}')
    return "\n".join(lines) + "\n"


def render_dot(pipeline: Pipeline) -> str:
    lines = [f"digraph {_quote(pipeline.name)} {{", "  rankdir=TB;"]
    for node in pipeline.nodes:
        shape = "diamond" if node.type == "flow_control" else "box"
        label = f"{node.name}\n{module_label(node)}"
        lines.append(f"  {_quote(node.name)} [shape={shape}, label={_quote(label)}];")
    for node in pipeline.nodes:
        for dependency in node.dependencies:
            lines.append(f"  {_quote(dependency)} -> {_quote(node.name)};")
        for decision in node.decisions:
            lines.append(
                f"  {_quote(node.name)} -> {_quote(decision.next_node)} "
                f"[style=dashed, color=blue, label={_quote(decision.condition)}];"
            )
        if node.default is not None:
            lines.append(
                f'  {_quote(node.name)} -> {_quote(node.default)} [style=dashed, color=blue, label="default"];'
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


RENDERERS = {"text": render_text, "mermaid": render_mermaid, "dot": render_dot}
