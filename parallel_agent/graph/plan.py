"""Static planning: validate the graph and order nodes into layers that may run concurrently."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from graphlib import CycleError, TopologicalSorter

from parallel_agent.errors import PipelineError
from parallel_agent.graph.modules import FlowControlModule
from parallel_agent.graph.nodes import Node


class Plan:
    """The validated graph: layers in dependency order and descendant lookups for jumps."""

    def __init__(self, nodes: Mapping[str, Node]) -> None:
        self.nodes = dict(nodes)
        self._check_references()
        self.order = self._order()
        self.children: dict[str, set[str]] = {name: set() for name in self.nodes}
        for node in self.nodes.values():
            for dep in node.dependencies:
                self.children[dep].add(node.name)

    def _check_references(self) -> None:
        for node in self.nodes.values():
            for dep in node.dependencies:
                if dep not in self.nodes:
                    raise PipelineError(f"node '{node.name}' depends on unknown node '{dep}'")
            for module in node.modules:
                if not isinstance(module, FlowControlModule):
                    continue
                config = module.flow_config
                targets = [d.next_node for d in config.decisions]
                if config.default is not None:
                    targets.append(config.default)
                for target in targets:
                    if target not in self.nodes:
                        raise PipelineError(
                            f"flow control node '{node.name}' jumps to unknown node '{target}'"
                        )

    def _order(self) -> list[str]:
        sorter: TopologicalSorter[str] = TopologicalSorter(
            {name: node.dependencies for name, node in self.nodes.items()}
        )
        try:
            return list(sorter.static_order())
        except CycleError as exc:
            cycle = exc.args[1]
            raise PipelineError(f"cycle between nodes: {' → '.join(cycle)}") from None

    def layers(self, only: Iterable[str] | None = None) -> list[list[str]]:
        """Layers of `only` (default: all nodes); dependencies outside `only` count as done."""
        chosen = set(self.nodes) if only is None else set(only)
        depth: dict[str, int] = {}
        for name in self.order:
            if name not in chosen:
                continue
            deps = [d for d in self.nodes[name].dependencies if d in chosen]
            depth[name] = 1 + max((depth[d] for d in deps), default=-1)
        result: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for name in self.nodes:  # insertion order inside a layer keeps runs predictable
            if name in depth:
                result[depth[name]].append(name)
        return result

    def downstream_of(self, target: str) -> set[str]:
        """`target` and every node that (transitively) depends on it."""
        seen = {target}
        stack = [target]
        while stack:
            for child in self.children[stack.pop()]:
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen
