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
        self.gates = self._gates()
        """{target: the nodes it gates} for every branch target that runs only when chosen."""
        self._check_alternatives()

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

    def targets(self, name: str) -> list[str]:
        """The nodes a flow-control node's decisions and default name, in order, once each."""
        found: list[str] = []
        for module in self.nodes[name].modules:
            if isinstance(module, FlowControlModule):
                config = module.flow_config
                for target in [d.next_node for d in config.decisions] + [config.default or ""]:
                    if target and target not in found:
                        found.append(target)
        return found

    def branch_points(self) -> list[str]:
        """Flow-control nodes that are part of the data flow (they have dependencies, or nodes
        depend on them): evaluated in place, as opposed to the loop controller."""
        return [
            name
            for name, node in self.nodes.items()
            if self.targets(name) and (node.dependencies or self.children[name])
        ]

    def upstream_of(self, name: str) -> set[str]:
        """Every node `name` (transitively) depends on."""
        seen: set[str] = set()
        stack = list(self.nodes[name].dependencies)
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(self.nodes[dep].dependencies)
        return seen

    def _gates(self) -> dict[str, set[str]]:
        """A branch target that is not upstream of its branch point runs only when chosen, and so
        does everything downstream of it (a target upstream of it is a loop back: not gated)."""
        gates: dict[str, set[str]] = {}
        for point in self.branch_points():
            before = self.upstream_of(point) | {point}
            for target in self.targets(point):
                if target not in before:
                    gates[target] = self.downstream_of(target)
        return gates

    def _check_alternatives(self) -> None:
        """Refuse a branch target downstream of another target of the same branch point: only
        one of them is chosen, so it would run on what the other never made (or never run)."""
        for point in self.branch_points():
            before = self.upstream_of(point) | {point}
            targets = [t for t in self.targets(point) if t not in before]
            for first in targets:
                behind = self.downstream_of(first)
                for later in targets:
                    if later != first and later in behind:
                        raise PipelineError(
                            f"flow control node '{point}' chooses between '{first}' and "
                            f"'{later}', but '{later}' depends on '{first}', which does not run "
                            f"when '{later}' is chosen: choose between nodes that do not depend "
                            "on each other"
                        )

    def runnable(self, work: set[str], jump: str | None = None) -> set[str]:
        """What a pass runs: from `jump` (or everything) within `work`, minus the nodes gated by a
        branch target other than `jump` that lies in that range."""
        reach = (self.downstream_of(jump) if jump is not None else set(self.nodes)) & work
        for target, gated in self.gates.items():
            if target != jump and target in reach:
                reach -= gated
        return reach

    def warnings(self) -> list[str]:
        """Branches that will not do what they seem to: a target that runs anyway, before its
        branch point decides, and a node that needs two alternatives of one branch point."""
        found: list[str] = []
        for point in self.branch_points():
            before = self.upstream_of(point)
            targets = self.targets(point)
            for target in targets:
                if target == point:
                    found.append(f"flow control node '{point}' jumps to itself")
                elif target in before:
                    found.append(
                        f"node '{target}' is a target of flow control node '{point}' but runs "
                        f"unconditionally before it (it is upstream of '{point}'); choosing it "
                        "runs it again"
                    )
            found.extend(self._shadowed(point))
            gated = [t for t in targets if t in self.gates]
            for name in self.nodes:
                needs = [t for t in gated if name in self.gates[t]]
                if len(needs) > 1:
                    found.append(
                        f"node '{name}' can never run with all it needs: it is downstream of "
                        f"{' and '.join(repr(t) for t in needs)}, alternatives of flow control "
                        f"node '{point}' (only one of them is chosen)"
                    )
        return found

    def _shadowed(self, point: str) -> list[str]:
        """Decisions (and a default) after one whose condition is always true never apply."""
        for module in self.nodes[point].modules:
            if not isinstance(module, FlowControlModule):
                continue
            config = module.flow_config
            for number, decision in enumerate(config.decisions, start=1):
                if decision.condition is None or decision.condition.strip() in (
                    "true",
                    "True",
                    "1",
                ):
                    later = [d.next_node for d in config.decisions[number:]]
                    later += [config.default] if config.default else []
                    if later:
                        return [
                            f"flow control node '{point}': decision {number} always holds, so "
                            f"{', '.join(repr(t) for t in later)} after it can never be chosen"
                        ]
        return []

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
