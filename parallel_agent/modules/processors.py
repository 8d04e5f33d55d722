"""Per-chunk work of the built-in `map` and `filter` modules: an expression, a Python callable, or a
shell command applied to the records of one chunk.

Each processor turns a chunk's records into outputs plus per-item errors; what an item error does to
the chunk (`on_error`) is decided by the chunk worker, not here.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from parallel_agent.errors import PipelineError
from parallel_agent.jsonl import decode_lines, dumps, loads
from parallel_agent.modules.items import (
    ChunkFailure,
    ChunkOutcome,
    ItemError,
    batch_outcome,
    call_items,
    describe,
    evaluate_items,
    is_identity,
    origins_without,
    span,
)
from parallel_agent.modules.threads import run_in_thread
from parallel_agent.store.base import TokenBucket, rate_burst

_STDERR_TAIL = 2000


class ChunkProcessor(Protocol):
    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        """The chunk's records, numbered `numbers` in the input (for errors and `index`)."""
        ...

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        """The chunk as stored (JSON Lines); in-process processors decode it here."""
        ...

    async def close(self) -> None:
        """Release what the processor started (worker processes); called when its node ends."""
        ...


class InProcess:
    """Shared by the processors that run in the coordinating process."""

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        raise NotImplementedError

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        return await self.process_chunk(decode_lines(payload), numbers, params)

    async def close(self) -> None:
        """Nothing to release."""


class RateLimiter:
    """A token bucket shared by a node's workers: at most `rate` item calls per second. With a
    `bucket` (a shared store) the budget is the whole run's, across processes and hosts: tokens
    are fetched a batch per round trip and spent here."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.interval = 1.0 / rate
        self.next_at = 0.0
        self.lock = asyncio.Lock()
        self.bucket: TokenBucket | None = None
        self.tokens = 0
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        try:
            async with self.lock:
                if self.bucket is not None:
                    await self._take_shared(self.bucket)
                    return
                now = time.monotonic()
                if self.next_at > now:
                    await asyncio.sleep(self.next_at - now)
                    now = self.next_at
                self.next_at = max(self.next_at, now) + self.interval
        finally:
            self.waiting -= 1

    async def _take_shared(self, bucket: TokenBucket) -> None:
        """One token; a round trip fetches one for every call waiting here, no more, so no
        token is held back to be spent later (that would break the run-wide window)."""
        while not self.tokens:
            granted, wait = await bucket(min(self.waiting, rate_burst(self.rate)))
            self.tokens += granted
            if not granted:
                await asyncio.sleep(max(0.001, wait))
        self.tokens -= 1


@dataclass
class ExpressionProcessor(InProcess):
    """`expr:` — an asteval expression over `item`, `index` and `params`, evaluated per item."""

    expr: str
    what: str
    keep_if_true: bool = False

    def __post_init__(self) -> None:
        from parallel_agent.conditions import compile_expression  # asteval: only where used

        self.compiled = compile_expression(self.expr, what=self.what)
        self.identity = not self.keep_if_true and is_identity(self.expr)

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        return await run_in_thread(self.run_chunk, records, numbers, params)

    def run_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        if self.identity:  # `expr: item`: each item as it is
            return ChunkOutcome(outputs=list(records))
        return evaluate_items(self.compiled.evaluate, records, numbers, params, self.keep_if_true)


@dataclass
class FunctionProcessor(InProcess):
    """`function:` — a sync or async callable per item, or per chunk with `batch: true`."""

    function: Callable[..., Any]
    what: str
    batch: bool = False
    keep_if_true: bool = False
    concurrency: int = 1
    rate_limit: float | None = None

    def __post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            getattr(self.function, "__call__", None)  # noqa: B004 - async callable objects
        )
        self.limiter = RateLimiter(self.rate_limit) if self.rate_limit else None
        self.in_flight = asyncio.Semaphore(self.concurrency)

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        if self.batch:
            return await self._run_batch(records, numbers)
        if self.is_async:
            return await self._run_async(records, numbers)
        if self.limiter is not None:
            return await self._run_sync_limited(records, numbers)
        return await run_in_thread(self._run_sync, records, numbers)

    def _keep(self, outcome: ChunkOutcome, item: Any, value: Any) -> bool:
        """Add what `item` gives to the outputs; False if it gives nothing (a filter's no)."""
        if not self.keep_if_true:
            outcome.outputs.append(value)
        elif value:
            outcome.outputs.append(item)
        else:
            return False
        return True

    def _run_sync(self, records: list[Any], numbers: Sequence[int]) -> ChunkOutcome:
        return call_items(self.function, records, numbers, self.keep_if_true)

    async def _run_sync_limited(self, records: list[Any], numbers: Sequence[int]) -> ChunkOutcome:
        assert self.limiter is not None
        outcome = ChunkOutcome()
        skipped: list[int] = []
        for offset, item in enumerate(records):
            await self.limiter.wait()
            try:
                if not self._keep(outcome, item, await run_in_thread(self.function, item)):
                    skipped.append(offset)
            except Exception as exc:  # recorded per item
                outcome.errors.append(ItemError(numbers[offset], describe(exc), item))
                skipped.append(offset)
        outcome.origins = origins_without(len(records), skipped)
        return outcome

    async def _call_async(self, item: Any) -> Any:
        async with self.in_flight:
            if self.limiter is not None:
                await self.limiter.wait()
            return await self.function(item)

    async def _run_async(self, records: list[Any], numbers: Sequence[int]) -> ChunkOutcome:
        results = await asyncio.gather(
            *(self._call_async(item) for item in records), return_exceptions=True
        )
        outcome = ChunkOutcome()
        skipped: list[int] = []
        for offset, (item, value) in enumerate(zip(records, results, strict=True)):
            if isinstance(value, asyncio.CancelledError):
                raise value
            if isinstance(value, BaseException):
                outcome.errors.append(ItemError(numbers[offset], describe(value), item))
                skipped.append(offset)
            else:
                try:
                    kept = self._keep(outcome, item, value)
                except Exception as exc:  # a filter answer whose truth test raises
                    outcome.errors.append(ItemError(numbers[offset], describe(exc), item))
                    kept = False
                if not kept:
                    skipped.append(offset)
        outcome.origins = origins_without(len(records), skipped)
        return outcome

    async def _run_batch(self, records: list[Any], numbers: Sequence[int]) -> ChunkOutcome:
        if self.is_async:
            values = await self.function(records)
        else:
            values = await run_in_thread(self.function, records)
        return batch_outcome(self.what, records, numbers, values, self.keep_if_true)


@dataclass
class CommandProcessor(InProcess):
    """`command:` — a shell command per chunk: records as JSON Lines on stdin, one JSON line out per
    line in; a non-zero exit fails the chunk with the tail of its stderr."""

    command: str
    what: str
    env: dict[str, str] | None = None
    keep_if_true: bool = False
    cwd: str | None = None
    """Commands run in the pipeline file's folder, so relative script paths work from anywhere."""

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        import os

        payload = b"".join(dumps(item) + b"\n" for item in records)
        environment = {**os.environ, **(self.env or {})}
        process = await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            cwd=self.cwd,
        )
        try:
            stdout, stderr = await process.communicate(payload)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        where = span(numbers)
        if process.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise ChunkFailure(
                f"command exited with status {process.returncode} on {where}"
                + (f": {tail}" if tail else "")
            )
        lines = [line for line in stdout.split(b"\n") if line.strip()]
        if len(lines) != len(records):
            raise ChunkFailure(
                f"command printed {len(lines)} lines for {len(records)} input lines on {where}"
            )
        values = []
        for offset, line in enumerate(lines):
            try:
                values.append(loads(line))
            except orjson.JSONDecodeError as exc:
                raise ChunkFailure(
                    f"command output line {offset + 1} on {where} is not JSON: {exc}"
                ) from None
        return batch_outcome(self.what, records, numbers, values, self.keep_if_true)


def ensure_callable(target: Any, reference: str, what: str) -> Callable[..., Any | Awaitable[Any]]:
    if not callable(target):
        raise PipelineError(f"{what}: '{reference}' is not callable")
    return target  # type: ignore[no-any-return]
