"""Turn a validated pipeline into an engine `Agent` wired to one run's context.

Built-in data nodes (split/map/filter/aggregate) pass data through the run store: the split queues
chunks for its consumers, a map or filter consumes its producer's committed chunks, and an aggregate
reads its producer's results in input order. Custom `class:` modules and flow-control nodes run on the
engine as they would in Python.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from parallel_agent.conditions import AGGREGATE_NAMES, compile_condition, compile_expression
from parallel_agent.errors import PipelineError
from parallel_agent.graph import (
    Agent,
    AgentModule,
    FlowControlConfig,
    FlowControlModule,
    FlowDecision,
    ModuleType,
    Node,
    NodeConfig,
)
from parallel_agent.graph.tasks import Task
from parallel_agent.modules.aggregate import stored
from parallel_agent.modules.builtin import AggregateModule, ChunkModule, SplitModule
from parallel_agent.modules.chunks import NodeSettings
from parallel_agent.modules.context import RunContext
from parallel_agent.modules.grouping import GroupingError, build_groupers
from parallel_agent.modules.loading import add_import_roots, import_object
from parallel_agent.modules.pool import PooledProcessor, WorkerJob
from parallel_agent.modules.processors import (
    ChunkProcessor,
    CommandProcessor,
    ExpressionProcessor,
    FunctionProcessor,
    ensure_callable,
)
from parallel_agent.pipeline.schema import (
    AggregateSpec,
    ClassSpec,
    FilterSpec,
    MapSpec,
    NodeSpec,
    Pipeline,
    SplitSpec,
)

DATA_USES = ("split", "map", "filter", "aggregate")


@dataclass
class BuiltPipeline:
    """An agent ready to run, plus what the run service needs to report on and write its output."""

    pipeline: Pipeline
    agent: Agent
    ctx: RunContext
    processing_nodes: list[str] = field(default_factory=list)
    main_node: str | None = None
    main_candidates: list[str] = field(default_factory=list)
    """The split's consumers: the run is counted by one that ran (a branch may skip some)."""
    result_node: str | None = None
    """The node whose result `--output` writes (see `output_node`)."""
    output_node: str | None = None
    value_node: str | None = None

    @contextlib.asynccontextmanager
    async def workers(self) -> AsyncIterator[None]:
        """Start the worker processes of `processes:` maps and filters now, while the input is
        split (a split starts its own only if it will use them), and stop every processor's
        workers when the run ends, however it ends."""
        processors: list[ChunkProcessor] = []
        checkers: list[PooledProcessor] = []
        for node in self.agent.nodes.values():
            for module in node.modules:
                if isinstance(module, ChunkModule):
                    processors.append(module.processor)
                elif isinstance(module, SplitModule) and module.checker is not None:
                    checkers.append(module.checker)
        for processor in processors:
            if isinstance(processor, PooledProcessor) and self.ctx.claims_chunks:
                processor.warm_up(self.ctx.params)
        try:
            yield
        finally:
            for processor in [*processors, *checkers]:
                await processor.close()

    def make_task(self, task_id: str) -> Task:
        settings = self.pipeline.task
        return Task(
            id=task_id,
            type=settings.type,
            objective=settings.objective,
            params=dict(settings.params),
        )

    async def output_plan(self, node: str | None = None) -> dict[str, Any] | None:
        """Where `node`'s output (default: the pipeline's output node) comes from: a node's
        results in input order, or one computed value."""
        if node is None or node == self.result_node:
            value_node, results_node = self.value_node, self.output_node
        else:
            uses, producers, _ = _wire_data_nodes(self.pipeline)
            if node not in {n.name for n in self.pipeline.nodes}:
                raise PipelineError(f"--output-node: there is no node '{node}'")
            if uses.get(node) not in ("map", "filter", "aggregate"):
                raise PipelineError(f"--output-node: '{node}' is not a map, filter or aggregate")
            value_node, results_node = _output_source(self.pipeline, node, uses, producers)
        if value_node is not None:
            run = await self.ctx.store.get_run(self.ctx.task_id)
            extra = run.extra if run is not None else {}
            text = stored(extra, "aggregate_json", value_node)
            if text is not None:  # group-by rows, as JSON text: exact integers past 64 bits
                return {"value_json": text}
            return {"value": stored(extra, "aggregate", value_node)}
        if results_node is not None:
            return {"node": results_node}
        return None


def _data_use(node: NodeSpec) -> str | None:
    uses = [module.use for module in node.modules if module.use in DATA_USES]
    if not uses:
        return None
    if len(node.modules) != 1:
        raise PipelineError(
            f"node '{node.name}': a node with a built-in '{uses[0]}' module must have only that module"
        )
    return uses[0]


def _wire_data_nodes(
    pipeline: Pipeline,
) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """Each data node's `use`, each consumer's producer, and each producer's consumers."""
    uses = {node.name: use for node in pipeline.nodes if (use := _data_use(node)) is not None}
    producers: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for node in pipeline.nodes:
        use = uses.get(node.name)
        if use is None or use == "split":
            continue
        sources = [d for d in node.dependencies if uses.get(d) in ("split", "map", "filter")]
        if len(sources) != 1:
            raise PipelineError(
                f"node '{node.name}' ({use}) needs exactly one data dependency (a split, map or "
                f"filter node); it has {len(sources)}: {', '.join(sources) or 'none'}"
            )
        direct = use == "aggregate" and uses[sources[0]] == "split"
        if direct and not _computes(node):
            raise PipelineError(
                f"node '{node.name}' aggregates '{sources[0]}' directly, which only an aggregate "
                "with `compute:` can; put a map or filter between"
            )
        producers[node.name] = sources[0]
        if use != "aggregate" or direct:
            consumers.setdefault(sources[0], []).append(node.name)
    return uses, producers, consumers


def _runs_user_code(options: dict[str, Any]) -> bool:
    """An aggregate with a `function:` reducer: the split's workers leave its partials to the
    aggregate, where the node's `timeout` and retries govern the user's code (a split has
    neither)."""
    compute = options.get("compute") or {}
    return any(isinstance(spec, dict) and "function" in spec for spec in compute.values())


def _computes(node: NodeSpec) -> bool:
    """A `compute:` aggregate: the only kind that may consume a split (its chunks' partials)."""
    return any(
        isinstance(spec, AggregateSpec) and spec.compute is not None for spec in node.modules
    )


GROUPING_KEYS = ("group_by", "compute", "sort_by", "descending", "top")


def partial_aggregates(
    pipeline: Pipeline, producers: dict[str, str], params: dict[str, Any]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{producer: {aggregate node: its grouping options}} for every `compute:` aggregate, whose
    partials the producer computes with each chunk; each is checked (reducers, expressions,
    functions) so a mistake fails before any work."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for node in pipeline.nodes:
        for spec in node.modules:
            if isinstance(spec, AggregateSpec) and spec.compute is not None:
                options = spec.model_dump(include=set(GROUPING_KEYS))
                try:
                    build_groupers({node.name: options}, params)
                except GroupingError as exc:
                    raise PipelineError(str(exc)) from None
                found.setdefault(producers[node.name], {})[node.name] = options
    return found


def _processor(
    node: NodeSpec,
    spec: MapSpec | FilterSpec,
    pipeline_dir: Path,
    aggregates: dict[str, dict[str, Any]] | None = None,
) -> ChunkProcessor:
    what = f"node '{node.name}', {spec.use}"
    grouping = orjson.dumps(aggregates).decode() if aggregates else ""
    keep = isinstance(spec, FilterSpec)
    config = node.node_config
    if spec.expr is not None:
        processor = ExpressionProcessor(spec.expr, what, keep_if_true=keep)
        if config.processes:
            return _pooled(
                "expr", spec.expr, what, keep, False, config.processes, pipeline_dir, grouping
            )
        return processor
    if spec.function is not None:
        target = ensure_callable(import_object(spec.function, what=what), spec.function, what)
        batch = isinstance(spec, MapSpec) and spec.batch
        if config.processes:
            if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
                getattr(target, "__call__", None)  # noqa: B004 - async callable objects
            ):
                raise PipelineError(
                    f"{what}: processes needs a sync function; '{spec.function}' is async "
                    "(async functions already overlap their waits in one process)"
                )
            return _pooled(
                "function",
                spec.function,
                what,
                keep,
                batch,
                config.processes,
                pipeline_dir,
                grouping,
                rate_limit=config.rate_limit,
            )
        return FunctionProcessor(
            target,
            what,
            batch=batch,
            keep_if_true=keep,
            concurrency=config.concurrency,
            rate_limit=config.rate_limit,
        )
    command = spec.command if isinstance(spec, MapSpec) else None
    if command is None:
        raise PipelineError(f"{what}: needs expr, function or command")
    env = spec.env if isinstance(spec, MapSpec) else None
    return CommandProcessor(command, what, env=env, cwd=str(pipeline_dir.resolve()))


def _pooled(
    kind: str,
    source: str,
    what: str,
    keep: bool,
    batch: bool,
    size: int,
    pipeline_dir: Path,
    aggregates: str = "",
    rate_limit: float | None = None,
) -> PooledProcessor:
    job = WorkerJob(
        kind=kind,
        source=source,
        what=what,
        keep_if_true=keep,
        batch=batch,
        roots=(str(Path.cwd()), str(pipeline_dir.resolve())),
        aggregates=aggregates,
        rate_limit=rate_limit,
    )
    return PooledProcessor(job, size)


def _settings(node: NodeSpec) -> NodeSettings:
    config = node.node_config
    return NodeSettings(
        node=node.name,
        # One chunk per worker process: a chunk waiting for a free worker would eat its timeout.
        concurrency=config.processes or config.concurrency,
        max_attempts=config.max_retries + 1,
        retry_delay=config.retry_delay,
        timeout=config.timeout,
        on_error=config.on_error,
        lease_s=config.lease,
    )


def _class_module(spec: ClassSpec, node: NodeSpec) -> AgentModule:
    what = f"node '{node.name}', class"
    target = import_object(spec.class_, what=what)
    if not (isinstance(target, type) and issubclass(target, AgentModule)):
        raise PipelineError(f"{what}: '{spec.class_}' is not an AgentModule subclass")
    try:
        return target(**spec.params)
    except TypeError as exc:
        raise PipelineError(f"{what}: cannot create '{spec.class_}': {exc}") from None


def _engine_node(
    node: NodeSpec,
    ctx: RunContext,
    pipeline_dir: Path,
    uses: dict[str, str],
    aggregates: dict[str, dict[str, Any]] | None = None,
) -> Node:
    config = node.node_config
    kind = ModuleType(node.type)
    if kind == ModuleType.FLOW_CONTROL:
        for number, decision in enumerate(node.decisions, start=1):
            compile_condition(
                decision.condition,
                what=f"node '{node.name}', decision {number} (next_node '{decision.next_node}')",
            )
        flow = FlowControlConfig(
            decisions=[
                FlowDecision(next_node=d.next_node, condition=d.condition) for d in node.decisions
            ],
            default=node.default,
        )
        return Node(
            name=node.name,
            type=kind,
            modules=[FlowControlModule(flow_config=flow)],
            dependencies=list(node.dependencies),
            node_config=NodeConfig(condition=config.condition, max_visits=config.max_visits),
        )
    if config.condition is not None:
        compile_condition(config.condition, what=f"node '{node.name}', condition")
    modules: list[AgentModule] = []
    use = uses.get(node.name)
    for spec in node.modules:
        if isinstance(spec, SplitSpec):
            checker = None
            if config.processes:
                reduced = {
                    name: options
                    for name, options in (aggregates or {}).items()
                    if not _runs_user_code(options)
                }
                job = WorkerJob(
                    kind="check-jsonl",
                    source="",
                    what=f"node '{node.name}', split",
                    aggregates=orjson.dumps(reduced).decode() if reduced else "",
                )
                checker = PooledProcessor(job, config.processes)
            modules.append(
                SplitModule(ctx, node.name, spec.chunk_size, checker, spec.max_record_size)
            )
        elif isinstance(spec, MapSpec | FilterSpec):
            processor = _processor(node, spec, pipeline_dir, aggregates)
            share_rate_limit(processor, ctx, node.name)
            modules.append(
                ChunkModule(ctx, node.name, _settings(node), processor, spec.use, aggregates)
            )
        elif isinstance(spec, AggregateSpec):
            if spec.expr is not None:
                compile_expression(
                    spec.expr, what=f"node '{node.name}', aggregate expr", names=AGGREGATE_NAMES
                )
            direct = uses.get(ctx.producers.get(node.name, "")) == "split"
            settings = _settings(node) if direct else None
            modules.append(AggregateModule(ctx, node.name, spec.model_dump(), settings))
        else:
            modules.append(_class_module(spec, node))
    if use is not None:
        engine_config = NodeConfig(
            condition=config.condition, max_visits=config.max_visits, max_retries=0
        )
    else:
        engine_config = NodeConfig(
            parallel=config.parallel,
            condition=config.condition,
            max_retries=config.max_retries,
            retry_delay=config.retry_delay,
            timeout=config.timeout,
            max_visits=config.max_visits,
        )
    return Node(
        name=node.name,
        type=kind,
        modules=modules,
        dependencies=list(node.dependencies),
        node_config=engine_config,
    )


def build_pipeline(pipeline: Pipeline, ctx: RunContext, *, pipeline_dir: Path) -> BuiltPipeline:
    """Build the agent for one run; raises PipelineError for anything wrong, before any work."""
    from parallel_agent.caches.memory_cache import MemoryCache
    from parallel_agent.pipeline.views import StoreViews

    add_import_roots(Path.cwd(), pipeline_dir)
    uses, producers, consumers = _wire_data_nodes(pipeline)
    ctx.producers = producers
    ctx.consumers = consumers
    splits = [n.name for n in pipeline.nodes if uses.get(n.name) == "split"]
    # The nodes that work chunks: maps, filters and the aggregates fed by a split.
    processing = [
        n.name
        for n in pipeline.nodes
        if uses.get(n.name) in ("map", "filter") or producers.get(n.name) in splits
    ]
    main = next((c for s in splits for c in consumers.get(s, [])), None)
    built = BuiltPipeline(pipeline=pipeline, agent=None, ctx=ctx)  # type: ignore[arg-type]
    built.processing_nodes = processing
    built.main_node = main
    built.main_candidates = [c for s in splits for c in consumers.get(s, [])]
    views = StoreViews(ctx, main, built)
    agent = Agent(
        cache=MemoryCache(),
        max_concurrent_tasks=pipeline.agent.max_concurrent_tasks,
        max_total_iterations=pipeline.agent.max_total_iterations,
        events=ctx.events,
        views=views,
        output_mailbox="",  # the run store reports the outcome; nobody reads these messages
        error_mailbox="",
    )
    partials = partial_aggregates(pipeline, producers, ctx.params)
    for node in pipeline.nodes:
        agent.add_node(_engine_node(node, ctx, pipeline_dir, uses, partials.get(node.name)))
    gated = set().union(*agent.validate().gates.values())
    ctx.gated = frozenset(gated)
    if main in gated:  # a branch may never choose it: count the run by one that always runs
        main = next((c for s in splits for c in consumers.get(s, []) if c not in gated), main)
        built.main_node = views.node = main
    built.agent = agent
    built.result_node = output_node(pipeline, uses, producers)
    if built.result_node is not None:
        built.value_node, built.output_node = _output_source(
            pipeline, built.result_node, uses, producers
        )
    return built


def output_node(pipeline: Pipeline, uses: dict[str, str], producers: dict[str, str]) -> str | None:
    """The node `--output` writes: `output:` if given, else the one data node nothing consumes
    (the sink of the data graph); several sinks without `output:` are refused, naming them."""
    if pipeline.output is not None:  # the schema checked it names a map, filter or aggregate
        return pipeline.output
    consumed = set(producers.values())
    sinks = [
        n.name
        for n in pipeline.nodes
        if uses.get(n.name) in ("map", "filter", "aggregate") and n.name not in consumed
    ]
    if len(sinks) > 1:
        raise PipelineError(
            f"the output is ambiguous: the data flow ends in {len(sinks)} nodes "
            f"({', '.join(sinks)}); name the one --output writes with a top-level "
            f"`output: NODE` (--output-node NODE=PATH writes others)"
        )
    return sinks[0] if sinks else None


def _output_source(
    pipeline: Pipeline, node: str, uses: dict[str, str], producers: dict[str, str]
) -> tuple[str | None, str | None]:
    """(value node, results node) for writing `node`: an aggregate that computes a value, or the
    results in input order of a map/filter (a plain aggregate's producer)."""
    if uses[node] != "aggregate":
        return None, node
    spec = next(n for n in pipeline.nodes if n.name == node).modules[0]
    assert isinstance(spec, AggregateSpec)
    if spec.computes_value:
        return node, None
    return None, producers[node]


def check_pipeline(pipeline: Pipeline, *, pipeline_dir: Path) -> list[str]:
    """Build the pipeline against a throwaway in-memory store: schema, graph, conditions, imports.
    Returns warnings about branches that will not do what they seem to."""
    from parallel_agent.store.memory import MemoryStore

    ctx = RunContext(task_id="validate", store=MemoryStore(), owner="validate")
    built = build_pipeline(pipeline, ctx, pipeline_dir=pipeline_dir)
    return built.agent.warnings()


@dataclass
class ChunkNode:
    """What a process that only works chunks (`pagent worker`) needs of a map or filter node:
    how it works its chunks, what processes them, and the partial aggregates it computes."""

    settings: NodeSettings
    processor: ChunkProcessor
    aggregates: dict[str, dict[str, Any]] | None = None


def chunk_node_specs(pipeline: Pipeline) -> list[tuple[NodeSpec, MapSpec | FilterSpec]]:
    """The pipeline's map and filter nodes with their module, in file order (checks the wiring)."""
    uses = _wire_data_nodes(pipeline)[0]
    found = []
    for node in pipeline.nodes:
        if uses.get(node.name) in ("map", "filter"):
            spec = node.modules[0]
            assert isinstance(spec, MapSpec | FilterSpec)
            found.append((node, spec))
    return found


def build_chunk_node(
    pipeline: Pipeline,
    node: NodeSpec,
    spec: MapSpec | FilterSpec,
    pipeline_dir: Path,
    ctx: RunContext,
) -> ChunkNode:
    """One map or filter node of `pipeline` without the rest of the graph, as the coordinator
    builds it (partial aggregates and a shared rate limit included)."""
    add_import_roots(Path.cwd(), pipeline_dir)
    producers = _wire_data_nodes(pipeline)[1]
    aggregates = partial_aggregates(pipeline, producers, ctx.params).get(node.name)
    processor = _processor(node, spec, pipeline_dir, aggregates)
    share_rate_limit(processor, ctx, node.name)
    return ChunkNode(_settings(node), processor, aggregates)


def share_rate_limit(processor: ChunkProcessor, ctx: RunContext, node: str) -> None:
    """`rate_limit` is the node's budget across every process of the run: on a shared store
    its limiter draws from the store's bucket."""
    if (
        isinstance(processor, FunctionProcessor)
        and processor.limiter is not None
        or isinstance(processor, PooledProcessor)
        and processor.limiter is not None
    ):
        processor.limiter.bucket = ctx.store.token_bucket(ctx.task_id, node, processor.limiter.rate)
