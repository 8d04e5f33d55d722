"""The program a worker process runs (`python -m parallel_agent.modules.worker`) for `processes: N`.

It reads its job description, then chunks, from stdin and answers each with the chunk's encoded
outputs and item errors on the original stdout; anything the user's code prints goes to stderr so it
cannot corrupt the protocol. The chunk payload is decoded and the outputs encoded here, so the
coordinating process only moves bytes.

A frame is two little-endian u32 lengths, then a JSON header and a binary body of those lengths.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from parallel_agent.jsonl import (
    check_jsonl,
    checked_values,
    decode_lines,
    dumps,
    encode_lines,
    loads,
)
from parallel_agent.modules.items import (
    ChunkFailure,
    ChunkOutcome,
    batch_outcome,
    call_items,
    describe,
    evaluate_items,
    is_identity,
)

if TYPE_CHECKING:
    from parallel_agent.modules.grouping import RunningTotal

_LENGTHS = struct.Struct("<II")
#: Allocations between two young-generation collections in a split's worker (Python's default
#: is 700; a chunk allocates hundreds of thousands of objects, none of them in a cycle).
_CHECK_GC_THRESHOLD = 100_000
#: Address space a worker process may use (RLIMIT_AS): past it an allocation of the user's code
#: raises MemoryError, an error of that chunk's item or chunk, instead of taking the machine.
ADDRESS_SPACE_LIMIT = 4 << 30


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    """One protocol message: lengths, JSON header, body."""
    return frame_head(header, len(body)) + body


def frame_head(header: dict[str, Any], body_size: int) -> bytes:
    """A message up to its body (sent on its own, a large body is not copied)."""
    head = dumps(header)
    return _LENGTHS.pack(len(head), body_size) + head


def split_lengths(prefix: bytes) -> tuple[int, int]:
    head, body = _LENGTHS.unpack(prefix)
    return int(head), int(body)


FRAME_PREFIX = _LENGTHS.size


def _read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    prefix = stream.read(FRAME_PREFIX)
    if len(prefix) < FRAME_PREFIX:
        return None
    head_size, body_size = split_lengths(prefix)
    header = loads(stream.read(head_size))
    return header, stream.read(body_size)


class _MapJob:
    """Runs a map or filter over each chunk it is sent."""

    def __init__(self, job: dict[str, Any], tokens: _TokenAsker | None = None) -> None:
        self.params = job.get("params", {})
        self.what = job["what"]
        self.keep_if_true = job["keep_if_true"]
        self.batch = job["batch"]
        if job["kind"] == "expr":
            from parallel_agent.conditions import compile_expression

            self.evaluate = compile_expression(job["source"], what=self.what).evaluate
        else:
            from parallel_agent.modules.loading import add_import_roots, import_object

            add_import_roots(*job["roots"])
            self.function = import_object(job["source"], what=self.what)
            if job.get("rate_limit") and not self.batch and tokens is not None:
                self.function = tokens.wrap(self.function)
        self.kind = job["kind"]
        self.identity = self.kind == "expr" and not self.keep_if_true and is_identity(job["source"])
        self.groupers = None
        if job.get("aggregates"):
            from parallel_agent.modules.grouping import build_groupers

            self.groupers = build_groupers(loads(job["aggregates"]), self.params)

    def run(self, records: list[Any], numbers: Sequence[int]) -> ChunkOutcome:
        if self.identity:  # `expr: item`: each item as it is
            return ChunkOutcome(outputs=records)
        if self.kind == "expr":
            return evaluate_items(self.evaluate, records, numbers, self.params, self.keep_if_true)
        if self.batch:
            values = self.function(records)
            return batch_outcome(self.what, records, numbers, values, self.keep_if_true)
        return call_items(self.function, records, numbers, self.keep_if_true)

    def answer(self, header: dict[str, Any], body: bytes) -> bytes:
        try:
            records = decode_lines(body)
            numbers = header.get("records") or range(
                header["first"] + 1, header["first"] + 1 + len(records)
            )
            outcome = self.run(records, numbers)
            partials = None
            if self.groupers:
                from parallel_agent.modules.grouping import chunk_partials

                partials = chunk_partials(self.groupers, outcome.outputs, numbers, outcome.origins)
        except ChunkFailure as exc:
            return frame({"fail": str(exc)})
        except Exception as exc:  # a batch function raising fails the chunk, as in-process
            return frame({"fail": describe(exc)})
        data, unencodable = encode_lines(outcome.outputs)
        errors = [[error.record, error.error, error.input] for error in outcome.errors]
        reply = {"errors": errors, "unencodable": unencodable, "origins": outcome.origins}
        if partials is not None:
            reply["partials"] = partials
        return frame(reply, data)


class _TokenAsker:
    """`rate_limit` in a worker process: before each item call it asks the coordinating process
    for a token (one frame each way), so the node's one limiter paces every process."""

    def __init__(self, requests: BinaryIO, replies: BinaryIO) -> None:
        self.requests = requests
        self.replies = replies

    def wrap(self, function: Any) -> Any:
        def limited(item: Any) -> Any:
            self.replies.write(frame({"token": 1}))
            self.replies.flush()
            if _read_frame(self.requests) is None:
                os._exit(0)  # the coordinator closed our input: it stopped this work

            return function(item)

        return limited


class _CheckJob:
    """Parses JSON Lines input for the split, so a big input is checked on every core; with
    `aggregates` (the `compute:` aggregates the split feeds directly) it also reduces each chunk
    it checked to their partials, from the same parse.

    A request may name aggregates in `totals`: the chunk's partials for them are also merged
    into this worker's running totals, which a `collect` request hands over (and starts anew)."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.keep: list[Any] = []
        self.quick = True
        """False once a chunk was not of the quick shape (`lines_partials`): the input then
        most likely is not, and trying each chunk would read it twice."""
        self.groupers = None
        self.totals: dict[str, RunningTotal | None] = {}
        """{aggregate: this worker's running total, None once a merge into it failed}"""
        if job.get("aggregates"):
            from parallel_agent.modules.grouping import build_groupers

            self.groupers = build_groupers(loads(job["aggregates"]), job.get("params"))

    def answer(self, header: dict[str, Any], body: bytes) -> bytes:
        if header.get("collect"):
            return self._collect()
        if not self.groupers:
            return frame({"bad": check_jsonl(body)})
        from parallel_agent.modules.grouping import lines_partials, partial_text, split_partials

        partials = None
        if self.quick:
            try:
                partials = lines_partials(self.groupers, body)
            except Exception:  # never the chunk's failure: the checked path reads it again
                partials = None
            self.quick = partials is not None
        if partials is None:
            values = checked_values(body)
            if isinstance(values, int):
                return frame({"bad": values})
            # Python hands an arena of small objects back to the system once all of it is free,
            # and each chunk's records would then be faulted in again, page by page (measured:
            # 47,000 page faults fewer over 1,000,000 records). A few records of each chunk,
            # kept until the next one is parsed, keep its arenas for the next chunk.
            self.keep = values[::64]
            partials = split_partials(self.groupers, values, header["first"])
        texts = {node: partial_text({node: partial}) for node, partial in partials.items()}
        for node in header.get("totals") or ():
            self._add_to_total(node, partials.get(node), header["first"])
        return frame({"bad": None, "partials": texts})

    def _add_to_total(self, node: str, partial: dict[str, Any] | None, first: int) -> None:
        """Merge a chunk's partial (already written out: the merge may take over its lists)."""
        from parallel_agent.modules.grouping import GroupingError, RunningTotal

        assert self.groupers is not None
        if node not in self.totals:
            grouper = self.groupers.get(node)
            self.totals[node] = RunningTotal(grouper) if grouper is not None else None
        total = self.totals[node]
        if total is None:
            return
        try:
            if partial is None:
                raise GroupingError("a chunk without its partial")
            total.add(partial, first)
        except GroupingError:  # the coordinator then merges the stored partials, and says why
            self.totals[node] = None

    def _collect(self) -> bytes:
        """Hand over the running totals that are whole, and start anew."""
        from parallel_agent.modules.grouping import partial_text

        totals = {}
        for node, total in self.totals.items():
            if total is not None:
                with contextlib.suppress(Exception):  # left out: the coordinator then merges
                    totals[node] = partial_text(total.dump())  # the stored partials
        self.totals = {}
        return frame({"totals": totals})


class _BrokenJob:
    def __init__(self, problem: str) -> None:
        self.problem = problem

    def answer(self, header: dict[str, Any], body: bytes) -> bytes:
        return frame({"fail": self.problem})


def _job(
    description: dict[str, Any], tokens: _TokenAsker | None = None
) -> _MapJob | _CheckJob | _BrokenJob:
    if description["kind"] == "check-jsonl":
        try:
            return _CheckJob(description)
        except Exception as exc:  # every chunk then fails with the reason
            return _BrokenJob(f"worker process could not load the aggregates' reducers: {exc}")
    try:
        return _MapJob(description, tokens)
    except Exception as exc:  # reported on every chunk, so the chunk fails with the reason
        return _BrokenJob(f"worker process could not load {description['source']}: {exc}")


#: prctl(2) option: the signal a process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def _die_with_coordinator() -> None:
    """A worker leads its own process group (so that a kill takes along what the user's code
    started), which also shields it from the terminal's signals: if the coordinator is killed
    outright, Linux sends the worker SIGKILL, so it never runs on orphaned."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere a worker ends at its next request, when it reads end of input
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the coordinator was gone before the request took effect
        os._exit(1)


def _limit_memory() -> None:
    """Cap this worker's address space at ADDRESS_SPACE_LIMIT (or the lower limit it inherited)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = ADDRESS_SPACE_LIMIT
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    _die_with_coordinator()
    _limit_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when its workers stop
    # Requests arrive on a private copy of stdin; the user's code (and anything it starts) reads
    # /dev/null, as in-process, and can never eat a request.
    requests = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the worker
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the user's print() goes to stderr, never into the protocol
    description = _read_frame(requests)
    if description is None:
        return
    job = _job(description[0], _TokenAsker(requests, replies))
    if isinstance(job, _CheckJob):
        # pagent's parsing and sandboxed expressions run here, never a user's function, and
        # parsed JSON holds no reference cycles: the cyclic GC need not scan each chunk's
        # records as they pile up (it still runs, rarely).
        gc.freeze()
        gc.set_threshold(_CHECK_GC_THRESHOLD)
    while (request := _read_frame(requests)) is not None:
        try:
            replies.write(job.answer(*request))
            replies.flush()
        except BrokenPipeError:
            return
    if isinstance(job, _CheckJob):
        os._exit(0)  # no user function to finish: skip tearing the interpreter down


if __name__ == "__main__":
    main()
