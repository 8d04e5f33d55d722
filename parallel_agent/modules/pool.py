"""`processes: N` — run CPU-bound work of a node on N worker processes.

Threads cannot run Python code on two cores at once; worker processes can. Each worker is a
long-lived `python -m parallel_agent.modules.worker` that receives a chunk's stored payload as bytes
and returns its outputs already encoded, so the coordinator never decodes records. A map or filter
sends its chunks; a split sends JSON Lines input to be checked. A chunk that times out, loses its
lease or is interrupted kills its worker (the only way to stop a running Python function); a fresh
one takes its place for the next chunk.

Each worker leads its own process group, so a kill takes along whatever the user's code started.
That also keeps the terminal's Ctrl-C from reaching workers: the coordinator stops them itself,
through `close` at the end of a run however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parallel_agent.jsonl import dumps, loads
from parallel_agent.modules.items import ChunkFailure, ChunkOutcome, ItemError
from parallel_agent.modules.processors import RateLimiter
from parallel_agent.modules.worker import FRAME_PREFIX, frame, frame_head, split_lengths

#: Bytes a worker's pipes hold (Linux lets any process ask for up to 1 MiB).
PIPE_SIZE = 1 << 20
#: Seconds a worker gets to exit after its input is closed, before it is killed.
EXIT_GRACE_S = 5.0
#: Seconds a worker whose pipe closed gets to end on its own, before it is killed.
DYING_GRACE_S = 1.0


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of a node runs."""

    kind: str  # "expr", "function", or "check-jsonl" (a split checking its input)
    source: str
    what: str
    keep_if_true: bool = False
    batch: bool = False
    roots: tuple[str, ...] = ()
    #: `rate_limit` of a per-item function: a worker asks this process for a token before
    #: each call, so the node's one limiter (shared by the run's processes on Redis) holds
    rate_limit: float | None = None
    aggregates: str = ""
    """JSON {aggregate node: options} of the aggregates fed by this node: the workers compute
    their partials of each chunk's outputs (modules/grouping.py)."""


class _Worker:
    def __init__(
        self, process: asyncio.subprocess.Process, limiter: RateLimiter | None = None
    ) -> None:
        self.process = process
        self.limiter = limiter
        """The node's `rate_limit`, whose tokens the worker asks for before each item call."""

    async def call(self, request: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """Send a request, answer the worker's token requests (`rate_limit`), return its reply."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(frame_head(request, len(body)))
        stdin.write(body)
        await stdin.drain()
        while True:
            head_size, body_size = split_lengths(await stdout.readexactly(FRAME_PREFIX))
            header = loads(await stdout.readexactly(head_size))
            body = await stdout.readexactly(body_size)
            if "token" not in header:
                return header, body
            if self.limiter is not None:
                await self.limiter.wait()
            stdin.write(frame({"granted": 1}))
            await stdin.drain()

    def kill(self) -> None:
        """SIGKILL the worker's process group: the worker and what the user's code started."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def close_pipes(self) -> None:
        """Close our ends of the pipes now: end of input tells the worker to exit, and a process
        it started may hold the other ends, which must not keep our file descriptors (or, on
        Python 3.11, `wait`) waiting for that process. A request not yet sent is dropped."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.transport.is_closing():  # abort() is not idempotent
            stdin.transport.abort()
        transport = _transport(self.process.stdout)
        if transport is not None:
            transport.close()

    async def close(self) -> int:
        """Let the worker exit, killing its process group if it has not within `EXIT_GRACE_S`;
        its exit status (negative: the signal that ended it)."""
        self.close_pipes()
        try:
            return await asyncio.wait_for(self.process.wait(), EXIT_GRACE_S)
        except TimeoutError:
            self.kill()
            return await self.process.wait()


@dataclass
class PooledProcessor:
    """A chunk processor whose work runs in `size` worker processes, started on first use (or
    by `warm_up`) and stopped by `close`."""

    job: WorkerJob
    size: int
    idle: list[_Worker] = field(default_factory=list)
    busy: set[_Worker] = field(default_factory=set)
    dead: list[_Worker] = field(default_factory=list)
    starting: list[asyncio.Future[_Worker]] = field(default_factory=list)
    slots: asyncio.Semaphore | None = None
    closed: bool = False
    limiter: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.job.rate_limit:
            self.limiter = RateLimiter(self.job.rate_limit)

    async def process_chunk(
        self, records: list[Any], numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        payload = b"".join(dumps(record) + b"\n" for record in records)
        return await self.process_payload(payload, numbers, params)

    async def process_payload(
        self, payload: bytes, numbers: Sequence[int], params: dict[str, Any]
    ) -> ChunkOutcome:
        """Send a chunk's stored payload to a free worker; its reply becomes the outcome."""
        first = numbers[0] - 1 if numbers else 0
        # Numbers in a row travel as the first one; others (after a filter) as the list.
        request: dict[str, Any] = {"first": first}
        if isinstance(numbers, list):
            request["records"] = numbers
        header, body = await self._call(request, payload, params)
        return ChunkOutcome(
            errors=[ItemError(record, error, item) for record, error, item in header["errors"]],
            encoded=body,
            unencodable=[(int(position), str(why)) for position, why in header["unencodable"]],
            origins=header.get("origins"),
            partials=header.get("partials"),
        )

    async def check_jsonl(
        self, payload: bytes, first: int = 0, totals: Sequence[str] = ()
    ) -> tuple[int | None, dict[str, str]]:
        """For a `check-jsonl` job: the position of the first line that is not JSON, or None;
        and the partials of the aggregates the job reduces for (`first`: the records before
        the chunk). The worker also merges the partials of the aggregates named in `totals`
        into its running totals (`collect_totals`)."""
        request: dict[str, Any] = {"first": first}
        if totals:
            request["totals"] = list(totals)
        header, _ = await self._call(request, payload, {})
        bad = header["bad"]
        return (None if bad is None else int(bad)), dict(header.get("partials") or {})

    async def collect_totals(self) -> list[dict[str, str]]:
        """Each idle worker's running totals ({aggregate: total as JSON text}), handed over
        and started anew. A worker that cannot answer gives none: the caller finds chunks
        missing from the totals, and does without them. The workers dump their totals at the
        same time."""

        async def collect(worker: _Worker) -> dict[str, str] | None:
            try:
                header, _ = await worker.call({"collect": 1}, b"")
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            return dict(header.get("totals") or {})

        found = await asyncio.gather(*map(collect, list(self.idle)))
        return [totals for totals in found if totals is not None]

    async def _call(
        self, request: dict[str, Any], body: bytes, params: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.size)
        async with self.slots:
            worker = await self._take(params)
            self.busy.add(worker)
            try:
                header, reply = await worker.call(request, body)
            except (asyncio.IncompleteReadError, ConnectionError):  # its pipes closed: it died
                self.busy.discard(worker)
                raise ChunkFailure(await self._died(worker, request)) from None
            except BaseException:  # timeout, lost lease, interrupt: stop the work for good
                self.busy.discard(worker)
                self._kill(worker)
                raise
            self.busy.discard(worker)
            if self.closed:  # the run stopped meanwhile: nothing will come to an idle worker
                await worker.close()
            else:
                self.idle.append(worker)
        if "fail" in header:
            raise ChunkFailure(str(header["fail"]))
        return header, reply

    def warm_up(self, params: dict[str, Any]) -> None:
        """Start the workers in the background, so they are ready when the first chunk is."""
        while not self.closed and len(self.idle) + len(self.starting) < self.size:
            self.starting.append(asyncio.ensure_future(self._start(params)))

    async def _take(self, params: dict[str, Any]) -> _Worker:
        if self.idle:
            return self.idle.pop()
        if self.starting:
            return await self.starting.pop()
        return await self._start(params)

    async def _start(self, params: dict[str, Any]) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "parallel_agent.modules.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=4 * PIPE_SIZE,  # buffer a reply in big reads, without pausing the pipe
            start_new_session=True,  # its own process group, for `_Worker.kill`
            # The coordinator's import path, so the worker imports what the pipeline imported.
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        _widen_pipes(process)
        job = self.job
        description = {
            "kind": job.kind,
            "source": job.source,
            "what": job.what,
            "keep_if_true": job.keep_if_true,
            "batch": job.batch,
            "roots": list(job.roots),
            "aggregates": job.aggregates,
            "params": params,
            "rate_limit": job.rate_limit,
        }
        assert process.stdin is not None
        process.stdin.write(frame(description))
        return _Worker(process, self.limiter)

    def _kill(self, worker: _Worker) -> None:
        """Kill a worker and let go of its pipes at once; `close` collects its exit."""
        worker.kill()
        worker.close_pipes()
        self.dead = [dead for dead in self.dead if dead.process.returncode is None]
        self.dead.append(worker)

    async def _died(self, worker: _Worker, request: dict[str, Any]) -> str:
        """Why a call failed: its worker's exit status. Whatever the worker started goes too,
        like its chunk's work.

        A worker whose pipe closed may still be exiting (`sys.exit` in the user's code closes
        its files, then runs the interpreter's teardown): it gets `DYING_GRACE_S` to end on its
        own, so that its own status is reported, not the SIGKILL sent after it."""
        try:
            await asyncio.wait_for(worker.process.wait(), DYING_GRACE_S)
        except TimeoutError:
            pass
        finally:  # also when the run is interrupted meanwhile: `close` then reaps it
            self._kill(worker)
        status = await worker.process.wait()
        if status < 0:
            try:
                ended = f"was killed by {signal.Signals(-status).name}"
            except ValueError:  # a signal without a name
                ended = f"was killed by signal {-status}"
        else:
            ended = f"exited with status {status}"
        where = f" on the chunk starting at record {request['first'] + 1}" if request else ""
        return f"{self.job.what}: worker process {ended}{where}"

    async def close(self) -> None:
        """Stop every worker: idle ones exit, busy ones are killed (the run is stopping). Every
        worker is told before the first wait, so a close cut short still stops them all."""
        self.closed = True
        for worker in self.busy:
            self._kill(worker)
        for worker in self.idle:
            worker.close_pipes()
        workers = [*self.idle, *self.dead]
        self.idle, self.busy, self.dead = [], set(), []
        started = await asyncio.gather(*self.starting, return_exceptions=True)
        self.starting = []
        workers.extend(worker for worker in started if isinstance(worker, _Worker))
        await asyncio.gather(*(worker.close() for worker in workers), return_exceptions=True)


def _widen_pipes(process: asyncio.subprocess.Process) -> None:
    """Let a whole chunk fit in the pipes (Linux: 64 KiB by default, 1 MiB allowed), so a chunk
    moves in a few system calls instead of dozens of wake-ups on both sides."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: pipes keep their size
        return
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setsize is None:
        return
    for stream in (process.stdin, process.stdout):
        transport = _transport(stream)
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        if pipe is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), setsize, PIPE_SIZE)


def _transport(stream: asyncio.StreamReader | asyncio.StreamWriter | None) -> Any:
    """The pipe transport under a process's stream (a reader's is not public)."""
    return getattr(stream, "transport", None) or getattr(stream, "_transport", None)
