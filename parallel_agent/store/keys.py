"""Every Redis key the run store uses, in one place.

    <prefix>:runs                      ZSET  task id → created_at: the run index for list_runs/gc
    <prefix>:workers                   ZSET  worker id → expiry of its last heartbeat
    <prefix>:worker:<worker id>        STRING its last heartbeat (JSON), with a PX expiry
    <prefix>:<task>:run                HASH  RunInfo fields, each value JSON (extra is separate)
    <prefix>:<task>:extra              HASH  RunInfo.extra: top-level key → JSON (merge = HSET)
    <prefix>:<task>:lock               STRING owner of the coordinator lock, with a PX expiry
    <prefix>:<task>:nodes              ZSET  node → creation sequence number
    <prefix>:<task>:n:<node>:counters  HASH  chunks_total pending leased done failed items_total
                                             items_done items_failed retries sealed
    <prefix>:<task>:n:<node>:meta      HASH  index → JSON {state, tok, att, first, count, nb, owner,
                                             exp, err, ok, bad, dur}
    <prefix>:<task>:n:<node>:payload   HASH  index → input records (dropped when the chunk is DONE)
    <prefix>:<task>:n:<node>:result    HASH  index → committed result bytes
    <prefix>:<task>:n:<node>:errors    HASH  index → committed item errors
    <prefix>:<task>:n:<node>:records   HASH  index → the payload's record numbers, if not in a row
    <prefix>:<task>:n:<node>:result_records  HASH  index → the result's record numbers, likewise
    <prefix>:<task>:n:<node>:partial   HASH  index → the consuming aggregates' partials (JSON)
    <prefix>:<task>:n:<node>:ready     ZSET  index → index: PENDING chunks claimable now
    <prefix>:<task>:n:<node>:delayed   ZSET  index → not_before: PENDING chunks in backoff
    <prefix>:<task>:n:<node>:leases    ZSET  index → lease expiry: LEASED chunks (reclaim scan)
    <prefix>:<task>:n:<node>:done      ZSET  index → index: DONE chunks, for ordered streaming
    <prefix>:<task>:n:<node>:failed    ZSET  index → index: FAILED chunks
    <prefix>:<task>:n:<node>:bucket    HASH  the node's run-wide rate_limit tokens (expires unused)

The run and worker indexes and the heartbeats are the only keys outside a task's namespace; it holds no data of its own and members
whose run expired are pruned by list_runs/gc. Every other key of a finished run gets the finished
TTL, except the lock, which keeps its own short expiry.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Per-node key suffixes (every key a node's chunks use: what gc and the finished TTL cover).
NODE_SUFFIXES = (
    "counters",
    "meta",
    "payload",
    "result",
    "errors",
    "records",
    "result_records",
    "partial",
    "ready",
    "delayed",
    "leases",
    "done",
    "failed",
)


@dataclass(frozen=True)
class TaskKeys:
    """Key names of one task under one prefix."""

    prefix: str
    task_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{self.task_id}"

    @property
    def runs(self) -> str:
        return runs_index(self.prefix)

    @property
    def run(self) -> str:
        return f"{self.base}:run"

    @property
    def extra(self) -> str:
        return f"{self.base}:extra"

    @property
    def lock(self) -> str:
        return f"{self.base}:lock"

    @property
    def nodes(self) -> str:
        return f"{self.base}:nodes"

    def node(self, node: str, suffix: str) -> str:
        """One per-node key, e.g. `node("map", "leases")`."""
        return f"{self.base}:n:{node}:{suffix}"

    def node_keys(self, node: str) -> list[str]:
        """All per-node keys, in NODE_SUFFIXES order."""
        return [self.node(node, suffix) for suffix in NODE_SUFFIXES]

    def data_keys(self, nodes: list[str]) -> list[str]:
        """Every key holding the task's data (all but the lock): what the finished TTL covers."""
        keys = [self.run, self.extra, self.nodes]
        for node in nodes:
            keys.extend(self.node_keys(node))
        return keys


def runs_index(prefix: str) -> str:
    """The ZSET of every task id under `prefix`."""
    return f"{prefix}:runs"


def workers_index(prefix: str) -> str:
    """The ZSET of `pagent worker` ids under `prefix`, scored by heartbeat expiry."""
    return f"{prefix}:workers"


def worker_key(prefix: str, worker: str) -> str:
    """One worker's last heartbeat."""
    return f"{prefix}:worker:{worker}"
