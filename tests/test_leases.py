"""Leases end to end, on the embedded SQLite store and on the real Redis: a processor that is paused
(SIGSTOP) or killed (SIGKILL) while it holds a chunk loses the chunk once its lease expires, its
late work is rejected by the fencing token, and a healthy chunk that outlives its lease (the
heartbeat renews it) is never stolen.

A real `pagent` is stopped at an exact point by a gate in its map function
(`steps_for_leases.gated_double`), never after a guessed sleep. Only one coordinator runs a task
(a second `pagent run --task-id` exits 6, see test_faults.py; it does not join as a worker), so
the other worker is this test process, which claims, renews and commits through the store API
exactly as a worker does.

Each test reports missing, duplicated and re-executed records (the ledger counts executions, the
output counts occurrences) and asserts that none are missing or duplicated.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from parallel_agent.store import open_store
from parallel_agent.store.base import ChunkState, Lease, NodeCounts, RunStore

pytestmark = pytest.mark.fault

T = TypeVar("T")
TESTS = Path(__file__).resolve().parent
PAGENT = [sys.executable, "-m", "parallel_agent"]
RECORDS = 40
CHUNK = 10
CHUNKS = RECORDS // CHUNK
LAST = RECORDS - 1  # the last record of the last chunk
LEASE = 1.0  # seconds; short so that an expiry costs a second
MAX_RETRIES = 5
NODE = "work"
#: Outer bound of every wait: a liveness check, not a speed one.
DEADLINE_S = 30.0

PIPELINE = """
name: leases
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk}}}]}}
  - name: {node}
    dependencies: [split]
    modules: [{{use: map, function: "steps_for_leases:gated_double"}}]
    node_config: {{concurrency: {concurrency}, lease: {lease}, max_retries: {retries}, retry_delay: 0.05}}
  - {{name: collect, dependencies: [{node}], modules: [{{use: aggregate}}]}}
"""


class StoreClient:
    """The test process as a second worker: the store API on a private event loop."""

    def __init__(self, url: str) -> None:
        self.runner = asyncio.Runner()
        self.store: RunStore = open_store(url)
        self.call(self.store.open())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def close(self) -> None:
        try:
            self.call(self.store.close())
        finally:
            self.runner.close()

    def claim(self, task: str, *, lease_s: float) -> list[Lease]:
        return self.call(
            self.store.claim(
                task, NODE, "test-worker", lease_s=lease_s, limit=1, max_attempts=MAX_RETRIES + 1
            )
        )

    def commit(self, lease: Lease, result: bytes) -> bool:
        return self.call(
            self.store.commit(
                lease,
                result=result,
                errors=b"[]",
                items_ok=lease.count,
                items_failed=0,
                duration_s=0.0,
            )
        )

    def counts(self, task: str) -> NodeCounts:
        return self.call(self.store.counts(task, NODE))

    def attempts(self, task: str) -> dict[int, int]:
        """Chunk index → the attempt whose commit is the chunk's result."""

        async def collect() -> dict[int, int]:
            return {result.index: result.attempt async for result in self.store.results(task, NODE)}

        return self.call(collect())


@dataclass
class Setup:
    tmp: Path
    store_url: str
    env: dict[str, str]
    ledger: Path
    gates: Path
    data: Path
    client: StoreClient
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pipeline(self, concurrency: int) -> Path:
        path = self.tmp / f"leases-{concurrency}.yaml"
        path.write_text(
            PIPELINE.format(
                chunk=CHUNK, node=NODE, concurrency=concurrency, lease=LEASE, retries=MAX_RETRIES
            )
        )
        return path

    def start(self, task: str, *, concurrency: int, gate: int) -> subprocess.Popen[bytes]:
        """`pagent run` of the gated pipeline in its own session (so it can be stopped whole)."""
        env = {**self.env, "PAGENT_GATE_RECORDS": str(gate)}
        args = ["run", str(self.pipeline(concurrency)), "--data", str(self.data)]
        args += ["--output", str(self.output), "--task-id", task, "--quiet"]
        proc = subprocess.Popen(
            [*PAGENT, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    @property
    def output(self) -> Path:
        return self.tmp / "out.jsonl"

    def at_gate(self, record: int) -> None:
        wait_until(lambda: (self.gates / f"at-{record}").exists(), f"pagent reaching {record}")

    def open_gate(self, record: int) -> None:
        (self.gates / f"open-{record}").touch()

    def execute(self, lease: Lease, count: int | None = None) -> bytes:
        """Do (the first `count` records of) a chunk's work as the test worker: ledger lines, and
        the result as the store keeps it (JSON Lines). The input is 0..RECORDS-1, so the records
        follow from the chunk's range, whatever the payload's encoding."""
        first = lease.first_record
        records = list(range(first, first + (lease.count if count is None else count)))
        with self.ledger.open("a") as handle:
            handle.write("".join(f"{record}\n" for record in records))
        return b"".join(orjson.dumps(record * 2) + b"\n" for record in records)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    if request.param == "sqlite":
        store_url = f"sqlite://{tmp_path / 'state.db'}"
    else:
        redis_url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
        store_url = f"{redis_url}?prefix={prefix}"
    gates = tmp_path / "gates"
    gates.mkdir()
    data = tmp_path / "in.jsonl"
    data.write_text("".join(f"{i}\n" for i in range(RECORDS)))
    ledger = tmp_path / "ledger.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PAGENT_STORE": store_url,
        "PAGENT_LEDGER": str(ledger),
        "PAGENT_GATE_DIR": str(gates),
        "PYTHONFAULTHANDLER": "1",
    }
    client = StoreClient(store_url)
    state = Setup(tmp_path, store_url, env, ledger, gates, data, client)
    try:
        yield state
    finally:
        for proc in state.procs:
            if proc.poll() is None:  # a failed test may leave it stopped or gated
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        client.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Wait for `pagent` to end; if it does not, fail with the stacks of its threads (faulthandler
    prints them on SIGABRT) so that a hang in CI says where it hangs."""
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        _, stderr = proc.communicate(timeout=10)
        pytest.fail(f"pagent did not finish; its threads:\n{stderr.decode()[-6000:]}")
    return proc.returncode, stderr.decode()


def report(setup: Setup) -> tuple[list[int], list[int], int]:
    values = [json.loads(line) for line in setup.output.read_text().splitlines()]
    seen = collections.Counter(value // 2 for value in values)
    missing = [i for i in range(RECORDS) if seen[i] == 0]
    duplicated = [i for i, n in seen.items() if n > 1]
    executions = collections.Counter(int(line) for line in setup.ledger.read_text().split())
    reexecuted = sum(n - 1 for n in executions.values() if n > 1)
    print(f"missing={len(missing)} duplicated={len(duplicated)} re-executed={reexecuted}")
    return missing, duplicated, reexecuted


def is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rpartition(")")[2].split()[0] == "T"


def write_lock_free(database: str) -> bool:
    """True when nobody holds the SQLite file's write lock (a stopped holder would block all)."""
    connection = sqlite3.connect(database, timeout=0.1, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


def pause(setup: Setup, proc: subprocess.Popen[bytes]) -> None:
    """SIGSTOP the run, but never in the middle of a SQLite write: a stopped process holding the
    write lock would block every other process, which is SQLite's nature, not this test's topic."""
    for _ in range(100):
        os.killpg(proc.pid, signal.SIGSTOP)
        wait_until(lambda: is_stopped(proc.pid), "SIGSTOP to take effect")
        if not setup.store_url.startswith("sqlite"):
            return
        if write_lock_free(setup.store_url.removeprefix("sqlite://")):
            return
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    pytest.fail("the paused run always held the SQLite write lock")


def claim_after_expiry(setup: Setup, task: str, *, lease_s: float) -> Lease:
    """Claim as the test worker until the store hands out a chunk (after the holder's lease
    expired, when no other chunk is claimable)."""
    leases: list[Lease] = []

    def claimed() -> bool:
        leases.extend(setup.client.claim(task, lease_s=lease_s))
        return bool(leases)

    wait_until(claimed, "the lease to expire and the chunk to be claimable")
    return leases[0]


def test_paused_processor_continued_after_its_lease_passed_loses_the_chunk(setup: Setup) -> None:
    """SIGSTOP `pagent` on the last chunk; the test worker takes the chunk once the lease expired;
    SIGCONT: the continued processor's heartbeat and commit are rejected; the chunk is done once."""
    task = "paused"
    proc = setup.start(task, concurrency=1, gate=LAST)
    setup.at_gate(LAST)  # pagent holds the last chunk; every other chunk is done
    pause(setup, proc)
    try:
        # A stopped coordinator is alive: its task id stays busy, nobody joins it as a worker.
        args = ["run", str(setup.pipeline(1)), "--data", str(setup.data), "--task-id", task]
        second = subprocess.run(
            [*PAGENT, *args, "--quiet"], env=setup.env, capture_output=True, timeout=60
        )
        assert second.returncode == 6, second.stderr.decode()
        lease = claim_after_expiry(setup, task, lease_s=DEADLINE_S)
        assert (lease.index, lease.attempt) == (CHUNKS - 1, 2)
        result = setup.execute(lease)
        setup.open_gate(LAST)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    wait_until(lambda: (setup.gates / f"passed-{LAST}").exists(), "pagent to finish its chunk")
    # Let the continued processor try its heartbeat or commit first (the usual order); every
    # assertion below holds in either order.
    time.sleep(LEASE / 2)
    counts = setup.client.counts(task)
    assert (counts.done, counts.leased) == (CHUNKS - 1, 1), "the late work must not land"
    assert setup.client.call(setup.client.store.renew(lease, DEADLINE_S)), "the chunk is ours"
    stale = dataclasses.replace(lease, token=lease.token - 1)
    assert not setup.client.commit(stale, result), "a commit under an older token is rejected"
    assert setup.client.commit(lease, result)
    code, stderr = finish(proc)
    assert code == 0, stderr
    missing, duplicated, reexecuted = report(setup)
    assert missing == [] and duplicated == []
    assert reexecuted == CHUNK, "only the paused chunk ran twice"
    assert setup.client.attempts(task) == {0: 1, 1: 1, 2: 1, 3: 2}


def test_late_commit_of_an_expired_lease_is_rejected(setup: Setup) -> None:
    """The test worker claims a chunk, does half of it and pauses; `pagent` takes the chunk after
    the lease expired and finishes the run; the paused worker's late renew, commit, fail and
    release are all rejected and change nothing."""
    task = "late"
    gate = CHUNK - 1  # the last record of chunk 0
    proc = setup.start(task, concurrency=1, gate=gate)
    setup.at_gate(gate)  # pagent's only worker holds chunk 0; the rest is pending
    (stale,) = setup.client.claim(task, lease_s=LEASE)
    assert (stale.index, stale.attempt) == (1, 1)
    result = setup.execute(stale, CHUNK // 2)  # half done, then paused
    setup.open_gate(gate)
    code, stderr = finish(proc)  # pagent waits for the paused lease to expire, then takes it
    assert code == 0, stderr
    client = setup.client
    assert not client.call(client.store.renew(stale, LEASE))
    assert not client.commit(stale, result), "a commit with a stale fencing token is rejected"
    state = client.call(client.store.fail(stale, "late failure", retry_in_s=None))
    assert state == ChunkState.DONE
    client.call(client.store.release(stale))
    counts = client.counts(task)
    assert (counts.done, counts.pending, counts.leased, counts.failed) == (CHUNKS, 0, 0, 0)
    assert (counts.items_done, counts.retries) == (RECORDS, 1)
    missing, duplicated, reexecuted = report(setup)
    assert missing == [] and duplicated == []
    assert reexecuted == CHUNK // 2, "only what the paused worker did ran twice"
    assert client.attempts(task) == {0: 1, 1: 2, 2: 1, 3: 1}


def test_killed_processor_chunk_is_taken_after_its_lease_expired(setup: Setup) -> None:
    """SIGKILL `pagent` while it holds the last chunk; `pagent resume` takes the lock of the dead
    coordinator, waits for the dead lease to expire and does the chunk once more; nothing else."""
    task = "killed"
    proc = setup.start(task, concurrency=1, gate=LAST)
    setup.at_gate(LAST)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    setup.open_gate(LAST)
    resumed = subprocess.run(
        [*PAGENT, "resume", task, "--quiet"],
        env=setup.env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    missing, duplicated, reexecuted = report(setup)
    assert missing == [] and duplicated == []
    assert reexecuted == CHUNK, "only the chunk in flight ran again"
    assert setup.client.attempts(task) == {0: 1, 1: 1, 2: 1, 3: 2}
    counts = setup.client.counts(task)
    assert (counts.done, counts.failed, counts.retries) == (CHUNKS, 0, 1)


def test_healthy_chunk_longer_than_its_lease_is_never_stolen(setup: Setup) -> None:
    """The last chunk runs for three leases; the heartbeat renews it, so neither pagent's other
    worker nor the test worker (claiming all the while) can take it: one attempt per chunk."""
    task = "healthy"
    proc = setup.start(task, concurrency=2, gate=LAST)
    setup.at_gate(LAST)
    stolen: list[Lease] = []
    held_until = time.monotonic() + 3 * LEASE  # the chunk's length: the scenario, not a bound
    while time.monotonic() < held_until and not stolen:
        stolen += setup.client.claim(task, lease_s=DEADLINE_S)
        time.sleep(0.05)
    for lease in stolen:  # let the run finish so the failure below is the only one
        setup.client.call(setup.client.store.release(lease))
    setup.open_gate(LAST)
    code, stderr = finish(proc)
    assert code == 0, stderr
    assert stolen == [], "a heartbeating chunk was handed to another worker"
    missing, duplicated, reexecuted = report(setup)
    assert missing == [] and duplicated == []
    assert reexecuted == 0
    assert setup.client.attempts(task) == dict.fromkeys(range(CHUNKS), 1)
    assert setup.client.counts(task).retries == 0
