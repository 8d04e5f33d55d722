"""The run store interface: what every backend (memory, SQLite, Redis) guarantees.

This is the only heavily documented store module; backends implement the abstract methods and add
nothing the application services may rely on. A behaviour that differs between backends is a bug caught by
`tests/test_store_contract.py`.

Vocabulary:

* A *run* (one per task id) is a `RunInfo` row plus, per data node, a queue of chunks.
* A *chunk* moves PENDING → LEASED → DONE, or to FAILED when its attempts are used up. A LEASED
  chunk whose lease expired is claimable again; a FAILED chunk comes back with `retry_failed`.
* A *lease* is the right to work on a chunk until `expires_at`. Each claim issues a fencing token
  that is strictly greater than every earlier token of that chunk; `commit`, `fail`, `renew` and
  `release` are accepted only while the chunk is LEASED under that same token.
* *Counters* per node are kept in the same atomic step as every transition, so `counts` never scans.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from parallel_agent.errors import RunCancelledError, StateLostError

#: Run statuses after which a run never changes by itself; `gc` drops them and Redis expires them.
FINISHED_STATUSES = frozenset({"complete", "partial_failure", "no_output", "failed", "cancelled"})
#: The status `pagent cancel` records; claims refuse it.
CANCELLED = "cancelled"

#: How long a finished run's Redis keys live before they expire (7 days).
DEFAULT_FINISHED_TTL_S = 7 * 24 * 3600.0

#: Total time a store call keeps retrying a lost connection or a locked database before giving up.
DEFAULT_RETRY_BUDGET_S = 15.0


class ChunkState(StrEnum):
    """Where a chunk is in its life; the values go to SQL, Redis and JSON unchanged."""

    #: waiting to be claimed (possibly not before a backoff deadline)
    PENDING = "pending"
    #: claimed under a lease; claimable again once the lease expires
    LEASED = "leased"
    #: committed; its result is final (first commit wins)
    DONE = "done"
    #: out of attempts; on the failed list with its last error until `retry_failed`
    FAILED = "failed"


@dataclass(frozen=True)
class RunInfo:
    """Everything needed to recognise, resume and report a run; one per task id."""

    task_id: str
    pipeline_name: str
    pipeline_hash: str
    pipeline_text: str
    input_path: str | None
    input_size: int | None
    input_hash: str | None
    input_format: str | None
    params: dict[str, Any]
    status: str
    created_at: float
    updated_at: float
    finished_at: float | None
    #: random marker written at create; a store that lost the run cannot show it
    #: (see check_generation)
    generation: str
    output_path: str | None = None
    #: free JSON (options, summary); `update_run(extra=...)` merges top-level keys
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkSpec:
    """A chunk to queue: its position in the input and its records as opaque bytes."""

    index: int
    first_record: int
    count: int
    payload: bytes
    records: bytes = b""
    """The input record numbers of the payload's items (see `record_numbers`)."""
    partial: bytes = b""
    """When set, the chunk is added already DONE with this as its consuming aggregates' partial
    (a split's worker reduced it for a `compute:` aggregate): committed as a claim and commit
    would (no result, no errors, every item ok), with no round trips for either. Adding stays
    idempotent per index, so the partial counts once. In a cancelled run it is added PENDING
    with its payload instead, like any chunk: nothing is committed after a cancel."""


@dataclass(frozen=True)
class Lease:
    """A claimed chunk; `token` fences every later write, `attempt` counts claims of this chunk."""

    task_id: str
    node: str
    index: int
    token: int
    owner: str
    first_record: int
    count: int
    payload: bytes
    attempt: int
    expires_at: float
    records: bytes = b""
    """The input record numbers of the payload's items (see `record_numbers`)."""

    @cached_property
    def numbers(self) -> Sequence[int]:
        """Decoded once: the processor and the commit both read them."""
        return record_numbers(self.first_record, self.count, self.records)


@dataclass(frozen=True)
class ChunkResult:
    """A committed chunk's outputs, as handed to `commit`."""

    index: int
    first_record: int
    count: int
    result: bytes
    errors: bytes
    items_ok: int
    items_failed: int
    duration_s: float
    attempt: int
    records: bytes = b""
    """The input record numbers of the result's items (see `record_numbers`); `count` is the
    chunk's input size, which the result has only when `records` is empty."""
    partial: bytes = b""
    """The consuming aggregates' partials of the result (JSON), committed with it; may be empty."""

    @property
    def numbers(self) -> Sequence[int]:
        return record_numbers(self.first_record, self.count, self.records)


@dataclass(frozen=True)
class FailedChunk:
    """A chunk on the failed list: its records, its last error and how many attempts it had."""

    index: int
    first_record: int
    count: int
    payload: bytes
    error: str
    attempts: int
    records: bytes = b""
    """The input record numbers of the payload's items (see `record_numbers`)."""

    @property
    def numbers(self) -> Sequence[int]:
        return record_numbers(self.first_record, self.count, self.records)


@dataclass(frozen=True)
class NodeCounts:
    """One node's counters. `retries` counts claims beyond a chunk's first attempt; `items_failed`
    counts items that failed inside committed chunks (items of FAILED chunks are not included)."""

    chunks_total: int
    pending: int
    leased: int
    done: int
    failed: int
    items_total: int
    items_done: int
    items_failed: int
    retries: int
    sealed: bool
    items_out: int = 0
    """Outputs committed (a filter's kept items; a map's results): what the node emitted."""


def record_numbers(first_record: int, count: int, records: bytes) -> Sequence[int]:
    """The 1-based input record numbers of a chunk's items, so that every node reports a failure
    under the number of the input record it came from. `records` is empty while the items are
    the input's records `first_record + 1` to `first_record + count` in a row (the usual case);
    after a filter dropped items or a map skipped failed ones, it is their numbers as a JSON
    array."""
    if not records:
        return range(first_record + 1, first_record + count + 1)
    numbers: list[int] = orjson.loads(records)
    return numbers


def encode_record_numbers(first_record: int, numbers: Sequence[int]) -> bytes:
    """`records` for items numbered `numbers` (ascending) in a chunk starting after
    `first_record`: empty when they are the records right after it, in a row."""
    if not numbers or (
        numbers[0] == first_record + 1 and numbers[-1] == first_record + len(numbers)
    ):
        return b""
    return orjson.dumps(list(numbers))


#: Chunks read per round trip when streaming results: at most this many...
RESULTS_BATCH = 256
#: ...and about this many records, so memory stays flat however big the chunks are.
RESULTS_BATCH_RECORDS = 50_000


def results_batch(counts: NodeCounts) -> int:
    """How many chunks of a node to fetch at once when streaming its results."""
    per_chunk = counts.items_total // max(1, counts.chunks_total)
    return max(1, min(RESULTS_BATCH, RESULTS_BATCH_RECORDS // max(1, per_chunk)))


def lease_expired_error(attempts: int) -> str:
    """The error recorded for a chunk whose last lease expired (the worker died or hung)."""
    return f"lease expired after {attempts} attempts"


def mask_url(url: str) -> str:
    """The URL with any password (in the user part or a `password=` query) replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable store URL>"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in pairs):
        query = urlencode(
            [(key, "***" if key.lower() == "password" else value) for key, value in pairs],
            safe="*",
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    return (
        masked + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    )


class RetryBudget:
    """Exponential backoff with jitter under a wall-clock deadline, shared by the backends so
    every store call gives up after the same bounded time (timeouts spent waiting included)."""

    def __init__(
        self,
        budget_s: float,
        *,
        first_s: float = 0.05,
        cap_s: float = 2.0,
        since: float | None = None,
    ) -> None:
        """`since`: when the trouble began (monotonic), if before now; the budget counts from it."""
        self.deadline = (time.monotonic() if since is None else since) + budget_s
        self.step = first_s
        self.cap_s = cap_s

    def next_delay(self) -> float | None:
        """The pause before the next try, or None when it would end past the deadline."""
        pause = random.uniform(self.step / 2, self.step)
        if time.monotonic() + pause > self.deadline:
            return None
        self.step = min(self.cap_s, self.step * 2)
        return pause


class RunStore(ABC):
    """Where runs, chunks, leases and results live, so a run survives its process.

    Every method is a coroutine (except `results`, an async iterator). A call that cannot reach the
    store within the retry budget raises `StoreError` whose message names the masked URL and the
    cause; no call hangs. A transition on a task id the store does not know (deleted, collected, or
    lost with a restarted server) raises `StateLostError`.

    Time: `now` arguments exist so tests control the clock; without them the memory and SQLite
    stores use this machine's clock and Redis uses the server's clock (one clock for all machines).
    """

    #: the store URL with any password masked; safe to print
    url: str

    # -- lifecycle -------------------------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect and check that the store answers, else
        `StoreError("cannot reach <masked url>: <cause>")`."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and threads; the store cannot be used afterwards."""

    # -- runs ------------------------------------------------------------------------------------

    @abstractmethod
    async def create_run(self, info: RunInfo) -> bool:
        """Store a new run. Atomic create-if-absent: False (nothing written) if the id exists.

        The very same run again (same generation) returns True, so a call retried after a lost
        reply is not mistaken for a rival coordinator.
        """

    @abstractmethod
    async def get_run(self, task_id: str) -> RunInfo | None:
        """The run, or None if the store does not know the task id."""

    @abstractmethod
    async def update_run(
        self,
        task_id: str,
        *,
        status: str | None = None,
        finished_at: float | None = None,
        output_path: str | None = None,
        extra: dict[str, Any] | None = None,
        unless_cancelled: bool = False,
    ) -> str:
        """Change the given fields atomically and set `updated_at`; `extra` keys are merged.
        Returns the status recorded after the change.

        `unless_cancelled`: a run that `pagent cancel` cancelled keeps that status (the other
        fields still change), so a coordinator finishing at that moment cannot overwrite it.

        Setting a finished status (FINISHED_STATUSES) starts the finished-run TTL on backends that
        expire keys (Redis); setting any other status cancels it (a resumed run lives on).
        Raises StateLostError if the run is gone.
        """

    @abstractmethod
    async def list_runs(self) -> list[RunInfo]:
        """Every run the store holds, oldest first."""

    @abstractmethod
    async def delete_run(self, task_id: str) -> None:
        """Remove every row or key of the task (run, chunks, results, counters, lock).
        Idempotent."""

    @abstractmethod
    async def add_to_count(self, task_id: str, key: str, amount: int) -> int:
        """Add `amount` to the integer `extra[key]` (0 when absent) atomically and return the
        new value: a count every process of a run shares (failed items against
        `--max-failures`, across the coordinator and every `pagent worker`). Raises
        StateLostError if the run is gone."""

    async def gc(self, older_than_s: float, now: float | None = None) -> list[str]:
        """Delete finished runs whose `finished_at` (else `updated_at`) is older than
        `older_than_s`; return their task ids. Unfinished runs are never collected."""
        cutoff = (self._now() if now is None else now) - older_than_s
        dropped: list[str] = []
        for info in await self.list_runs():
            ended = info.finished_at if info.finished_at is not None else info.updated_at
            if info.status in FINISHED_STATUSES and ended < cutoff:
                await self.delete_run(info.task_id)
                dropped.append(info.task_id)
        return dropped

    async def check_generation(self, task_id: str, generation: str) -> RunInfo:
        """The run; StateLostError unless it exists with this generation marker.

        Call it after (re)connecting, and periodically (the coordinator does at each lock
        renewal): a Redis without persistence that restarted is empty, and a run recreated under
        the same id has another marker. Never restart silently from zero.
        """
        info = await self.get_run(task_id)
        if info is None:
            raise run_missing(self.url, task_id)
        if info.generation != generation:
            raise StateLostError(
                f"task '{task_id}' in {self.url} belongs to another run (generation "
                f"{info.generation}, expected {generation}); its earlier state is gone"
            )
        return info

    # -- worker heartbeats -----------------------------------------------------------------------

    async def beat_worker(self, worker: str, state: dict[str, Any], ttl_s: float) -> None:
        """Record that `pagent worker` `worker` is alive, with what it does (`state`, JSON);
        the entry expires `ttl_s` after the last beat. Only a shared store (Redis) keeps them:
        workers never use the others, so they drop the beat."""
        return None

    async def live_workers(self) -> list[dict[str, Any]]:
        """The last heartbeat of every worker whose entry has not expired, each with
        `last_seen` (seconds ago, by the store's clock)."""
        return []

    # -- run-wide rate limits --------------------------------------------------------------------

    def token_bucket(self, task_id: str, name: str, rate: float) -> TokenBucket | None:
        """A token bucket of `rate` tokens a second that every process of the run draws from
        (`rate_limit` across hosts), or None where one process is the whole run (memory,
        SQLite: the process's own limiter is exact there)."""
        return None

    # -- coordinator lock ------------------------------------------------------------------------

    @abstractmethod
    async def acquire_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        """Take the task's coordinator lock for `ttl_s`. True if `owner` now holds it (re-acquiring
        one's own lock refreshes it); False while another owner's unexpired lock exists. A dead
        holder's lock expires after its TTL and can then be taken over."""

    @abstractmethod
    async def renew_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        """Extend `owner`'s lock by `ttl_s` from now; False if it expired or another owner has
        it (the coordinator must then stop)."""

    @abstractmethod
    async def release_lock(self, task_id: str, owner: str) -> None:
        """Drop the lock if `owner` holds it; someone else's lock is left alone."""

    @abstractmethod
    async def lock_holder(self, task_id: str) -> str | None:
        """The owner of the task's unexpired coordinator lock, or None (read only; for status)."""

    @abstractmethod
    async def lock_state(self, task_id: str) -> tuple[str, float] | None:
        """The owner of the task's unexpired coordinator lock and the seconds until it expires,
        read together, or None: whether the holder still renews it shows between two reads."""

    # -- chunks ----------------------------------------------------------------------------------

    @abstractmethod
    async def add_chunks(self, task_id: str, node: str, chunks: Sequence[ChunkSpec]) -> None:
        """Queue chunks as PENDING (DONE: those with a `partial`). Idempotent per (node, index):
        an index already present is left as it is, so a resumed split may add the same chunks
        again. Counters change in the same atomic step. The node joins `nodes()` on its first
        chunk."""

    @abstractmethod
    async def seal(self, task_id: str, node: str) -> None:
        """Record that no more chunks will be added to `node` (`counts().sealed`)."""

    @abstractmethod
    async def claim(
        self,
        task_id: str,
        node: str,
        owner: str,
        *,
        lease_s: float,
        limit: int = 1,
        max_attempts: int = 3,
        now: float | None = None,
    ) -> list[Lease]:
        """Lease up to `limit` chunks, lowest index first. Atomic: no chunk goes to two claimers.

        Takes chunks that are PENDING with `not_before <= now`, or LEASED with an expired lease.
        Each claim adds one to the chunk's attempt and issues a new, strictly greater token. An
        expired lease whose attempts reached `max_attempts` is moved to FAILED with
        "lease expired after N attempts" instead of being handed out. Empty list: nothing claimable.
        Raises RunCancelledError when the run is cancelled (checked in the same atomic step, so
        no worker anywhere takes a chunk after `pagent cancel` returned).
        """

    @abstractmethod
    async def renew(self, lease: Lease, lease_s: float, *, now: float | None = None) -> bool:
        """Push the lease's expiry to `now + lease_s`. False if the chunk is no longer LEASED under
        this token (reclaimed, failed, released, committed): the worker should stop."""

    @abstractmethod
    async def commit(
        self,
        lease: Lease,
        *,
        result: bytes,
        errors: bytes,
        items_ok: int,
        items_failed: int,
        duration_s: float,
        records: bytes = b"",
        partial: bytes = b"",
        outputs: int | None = None,
    ) -> bool:
        """Store the chunk's outputs and mark it DONE, with the counters, in one atomic step.
        `records` numbers the result's items (see `record_numbers`; empty: the chunk's range);
        `partial` is the consuming aggregates' partials of them, committed under the same token;
        `outputs` how many outputs `result` holds (default `items_ok`), added to `items_out`.

        Fenced: accepted only while the chunk is LEASED under this lease's token, so a commit from
        an expired lease nobody reclaimed yet is accepted, and a stale token after a reclaim is
        rejected (False). First commit wins: a DONE chunk is never overwritten. Repeating the same
        lease's commit (a retry after a lost reply) returns True without changing anything.
        """

    @abstractmethod
    async def fail(
        self, lease: Lease, error: str, *, retry_in_s: float | None, now: float | None = None
    ) -> ChunkState:
        """Record a failed attempt. `retry_in_s` None → FAILED with `error`; otherwise PENDING and
        not claimable before `now + retry_in_s`. Fenced like `commit`: with a stale token nothing
        changes. Returns the chunk's state after the call."""

    @abstractmethod
    async def release(self, lease: Lease) -> None:
        """Hand the chunk back (graceful stop): PENDING at once, the attempt not consumed.
        Fenced: a stale lease changes nothing."""

    @abstractmethod
    async def counts(self, task_id: str, node: str) -> NodeCounts:
        """The node's counters, read in one consistent step without scanning chunks. A node
        without chunks has all zeros."""

    @abstractmethod
    async def nodes(self, task_id: str) -> list[str]:
        """Nodes that have chunks (or were sealed), in the order they were first seen."""

    @abstractmethod
    def results(self, task_id: str, node: str) -> AsyncIterator[ChunkResult]:
        """DONE chunks in index order, fetched in batches so a million results are never in memory
        at once. Chunks committed during the iteration may or may not appear."""

    @abstractmethod
    async def failed_chunks(self, task_id: str, node: str) -> list[FailedChunk]:
        """FAILED chunks in index order with their payload and last error."""

    @abstractmethod
    async def retry_failed(self, task_id: str, node: str) -> int:
        """Move every FAILED chunk back to PENDING with its attempts reset (tokens keep growing);
        return how many moved."""

    @abstractmethod
    async def chunk_durations(self, task_id: str, node: str) -> list[float]:
        """Processing time of each DONE chunk, in index order (for p50/p95 reports)."""

    # -- helpers for backends --------------------------------------------------------------------

    def _now(self) -> float:
        """The store's clock when a caller passes no `now`."""
        return time.time()


#: Takes up to `want` tokens from a shared bucket in one round trip: (granted, seconds until
#: the next token when fewer were granted).
TokenBucket = Callable[[int], Awaitable[tuple[int, float]]]


def rate_burst(rate: float) -> int:
    """How many tokens a shared bucket holds (and hands out per round trip): a quarter second
    of the rate, at least one. Any one-second window holds at most `rate + burst` calls."""
    return max(1, math.ceil(rate / 4))


def run_cancelled(task_id: str) -> RunCancelledError:
    """The error of a claim on a cancelled run."""
    return RunCancelledError(f"task '{task_id}' was cancelled (pagent cancel)")


def run_missing(url: str, task_id: str) -> StateLostError:
    """The error for a transition on a run the store does not hold (deleted, collected or lost)."""
    return StateLostError(
        f"the state of task '{task_id}' is gone from {url} "
        "(the store was restarted without persistence or flushed, or the run was deleted)"
    )
