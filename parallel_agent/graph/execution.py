"""Running a node's modules: transactions, middlewares, output mailboxes, timeouts and retries.

Shared by `Agent` (which adds planning, guards and flow control around it) and `Node.run`.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

from parallel_agent.caches.transactional import TransactionalCache
from parallel_agent.errors import NodeExecutionError, NonRetryableException

if TYPE_CHECKING:
    from parallel_agent.caches.cache import Cache
    from parallel_agent.graph.modules import AgentModule
    from parallel_agent.graph.nodes import Node

MAX_CONFLICT_RETRIES = 100
MAX_BACKOFF_S = 2.0


class _Conflict(Exception):
    """A transactional attempt read data that changed before it could commit."""


def module_label(node: Node, module: AgentModule) -> str:
    """How errors name a module: `node 'n', module 'm'`."""
    return f"node '{node.name}', module '{module.name or type(module).__name__}'"


async def run_modules(
    node: Node,
    cache: Cache,
    budget: asyncio.Semaphore,
    modules: list[AgentModule] | None = None,
) -> list[Any]:
    """Run the node's `modules` (default: all; concurrently when `parallel`); their results in
    module order.

    Raises NodeExecutionError for the first module that gives up. In a sequential node a module
    whose `config.stop_on_success` is set ends the node when it succeeds."""
    chosen = node.modules if modules is None else modules
    if node.node_config.parallel:
        outcomes = await asyncio.gather(
            *(run_module(node, m, cache, budget) for m in chosen),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)
    results = []
    for module in chosen:
        results.append(await run_module(node, module, cache, budget))
        if module.config.stop_on_success:
            break
    return results


async def run_module(
    node: Node, module: AgentModule, cache: Cache, budget: asyncio.Semaphore
) -> Any:
    """Run one module with timeout and retries; raise NodeExecutionError when it gives up."""
    config = node.node_config
    module.container = node
    label = module_label(node, module)
    attempts = config.max_retries + 1 if config.retry_on_failure else 1
    limits = [t for t in (config.timeout, module.config.timeout) if t is not None]
    limit = min(limits, default=None)
    last = ""
    for attempt in range(attempts):
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                result = await _attempt(module, cache, budget)
        except NonRetryableException as exc:
            raise NodeExecutionError(f"{label}: {exc}") from exc
        except TimeoutError as exc:
            if limit is not None and deadline.expired():
                last = f"execution timed out after {limit:g}s"
            else:  # raised by the module itself
                last = f"TimeoutError: {exc}"
        except Exception as exc:  # a module may raise anything; it is a failed attempt
            last = f"{type(exc).__name__}: {exc}"
        else:
            if module.is_success(result):
                return result
            last = f"returned error: {result.get('error') or result.get('result')}"
        if attempt + 1 < attempts:
            backoff = min(config.retry_delay * (2**attempt), MAX_BACKOFF_S)
            await asyncio.sleep(backoff * (0.5 + random.random()))
    raise NodeExecutionError(f"{label} failed after {attempts} attempt(s): {last}")


async def _outcome(module: AgentModule, cache: Cache, budget: asyncio.Semaphore) -> Any:
    """`process`, then the output mailbox (the raw result), then the middlewares in order."""
    result = await module.process(cache, budget)
    if module.output_mailbox:
        await cache.publish_to_mailbox(module.output_mailbox, result)
    for middleware in module.config.middlewares:
        result = await middleware.process(result, cache)
    return result


async def _attempt(module: AgentModule, cache: Cache, budget: asyncio.Semaphore) -> Any:
    """One attempt; transactional modules re-run on conflicts, which use no retries."""
    if not module.transactional:
        return await _outcome(module, cache, budget)
    for conflict in range(MAX_CONFLICT_RETRIES):
        view = TransactionalCache(cache)
        try:
            result = await _outcome(module, view, budget)
            if not await view.commit():
                raise _Conflict
        except _Conflict:
            pass
        except Exception:
            if not await view.stale():
                raise
            # It read an inconsistent mix of old and new values: a conflict, not a failure.
        else:
            return result
        await asyncio.sleep(random.uniform(0, 0.001 * min(conflict + 1, 20)))
    raise RuntimeError(f"gave up after {MAX_CONFLICT_RETRIES} conflicting commits")
