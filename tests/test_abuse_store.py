"""Fault and abuse cases of issue 11 that concern stops, limits and the run store, each run end to
end through the CLI: allocation bombs, signals during long chunks, `--max-failures`, `pagent
cancel` racing the end of a run, loop limits under `--quiet`, a Redis at high fan-out, a server
that is not Redis, bad store URLs, an evicting Redis, a Redis killed mid-run and a SQLite writer
stopped inside its transaction.

Each test cites the RELIABILITY.md promise it checks. Bounds on time are liveness bounds, far
above what a healthy run needs; the cases that could take the machine's memory on a regression
run under an RLIMIT_AS guard.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.redis_server import RedisServerFactory, redis_server_binary

from parallel_agent.conditions import compile_expression
from parallel_agent.modules.threads import run_in_thread
from parallel_agent.modules.worker import ADDRESS_SPACE_LIMIT
from parallel_agent.store import open_store
from parallel_agent.store.base import RunInfo

TESTS = Path(__file__).resolve().parent
PAGENT = [sys.executable, "-m", "parallel_agent"]
#: Address space a pagent under test may use where a regression would allocate without bound.
GUARD_BYTES = 2 << 30
#: Liveness bound: a stopped run that needs longer than this is hanging on its chunk.
STOP_BOUND_S = 30.0


def pipeline_text(map_module: str, node_config: str = "{}", chunk_size: int = 1) -> str:
    return f"""
name: abuse
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk_size}}}]}}
  - name: work
    dependencies: [split]
    modules: [{map_module}]
    node_config: {node_config}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate}}]}}
"""


class Case:
    """A pipeline, its input and the environment of one test, with helpers to run pagent."""

    def __init__(self, tmp: Path, pipeline: str, records: int, store: str | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.pipeline = tmp / "pipeline.yaml"
        self.pipeline.write_text(pipeline)
        self.data = tmp / "in.jsonl"
        self.data.write_text("".join(f"{i}\n" for i in range(records)))
        self.records = records
        self.slow, self.started, self.go = tmp / "slow", tmp / "started", tmp / "go"
        self.store = store or f"sqlite:///{tmp / 'state.db'}"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "PAGENT_STORE": self.store,
            "PAGENT_SLOW": str(self.slow),
            "PAGENT_STARTED": str(self.started),
            "PAGENT_GO": str(self.go),
        }

    def run_args(self, *extra: str) -> list[str]:
        return ["run", str(self.pipeline), "--data", str(self.data), *extra]

    def start(self, args: list[str], *, guard: int | None = None) -> subprocess.Popen[bytes]:
        def limit() -> None:
            if guard is not None:
                resource.setrlimit(resource.RLIMIT_AS, (guard, guard))

        return subprocess.Popen(
            [*PAGENT, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=limit,
        )

    def pagent(
        self, args: list[str], *, guard: int | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        process = self.start(args, guard=guard)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            kill_group(process)
        return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())

    def wait_started(self, process: subprocess.Popen[bytes], bound: float = STOP_BOUND_S) -> None:
        deadline = time.monotonic() + bound
        while not self.started.exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "the first chunk never started"
            time.sleep(0.05)

    def stored_run(self, task_id: str) -> RunInfo:
        async def read() -> RunInfo | None:
            store = open_store(self.store)
            await store.open()
            try:
                return await store.get_run(task_id)
            finally:
                await store.close()

        info = asyncio.run(read())
        assert info is not None
        return info


def kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def finish(process: subprocess.Popen[bytes], bound: float) -> tuple[int, str, str]:
    """Wait at most `bound` seconds for `process`; (exit code, stdout, stderr)."""
    try:
        out, err = process.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        kill_group(process)
        pytest.fail(f"pagent still ran {bound:g} s later")
    return process.returncode, out.decode(), err.decode()


def failures(case: Case, task_id: str) -> list[dict[str, Any]]:
    result = case.pagent(["failures", task_id])
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# -- sandbox and worker memory (promise 15) ------------------------------------------------------


def test_allocation_bomb_in_an_expression_is_an_item_error(tmp_path: Path) -> None:
    """Promise 15: an expression's memory is capped per evaluation, not per sequence. The nested
    bomb that reached 23.5 GB fails its item quickly, naming the budget (under a 2 GiB guard, so
    a regression meets MemoryError instead of the machine's memory)."""
    bomb = "[[0]*1000000 for _ in range(1000)]"
    case = Case(tmp_path, pipeline_text(f'{{use: map, expr: "{bomb}"}}'), records=2)
    result = case.pagent(
        case.run_args("--task-id", "bomb", "--output", str(tmp_path / "out.jsonl")),
        guard=GUARD_BYTES,
    )
    assert result.returncode == 1, result.stderr
    errors = failures(case, "bomb")
    assert [error["record"] for error in errors] == [1, 2]
    assert all("256 MiB" in error["error"] for error in errors), errors


def test_worker_processes_run_under_an_address_space_limit(tmp_path: Path) -> None:
    """Promise 15: `processes: N` workers run under RLIMIT_AS, so a function's allocation past it
    is an item error (mapping 5 GiB touches no memory, so the old code cannot hurt here)."""
    module = '{use: map, function: "steps_for_abuse:address_space_limit"}'
    case = Case(tmp_path, pipeline_text(module, "{processes: 1}"), records=1)
    out = tmp_path / "limit.jsonl"
    result = case.pagent(case.run_args("--output", str(out)))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [ADDRESS_SPACE_LIMIT]

    module = '{use: map, function: "steps_for_abuse:maps_five_gib"}'
    case = Case(tmp_path / "map", pipeline_text(module, "{processes: 1}"), records=1)
    result = case.pagent(case.run_args("--task-id", "five", "--output", str(out)))
    assert result.returncode == 1, result.stderr
    (error,) = failures(case, "five")
    assert "Cannot allocate memory" in error["error"] or "MemoryError" in error["error"]


def test_an_abandoned_evaluation_stops(tmp_path: Path) -> None:
    """Promise 16: an expression evaluation stops when its call is abandoned (the run stops),
    instead of running on in a thread for minutes."""
    expression = compile_expression("len([x for x in range(1000000)])", what="test")

    def many() -> list[Any]:
        return [expression.evaluate({}) for _ in range(1000)]

    async def main() -> None:
        call = asyncio.ensure_future(run_in_thread(many))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    def calls() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "pagent-call" and t.is_alive()}

    before = calls()
    asyncio.run(main())
    deadline = time.monotonic() + STOP_BOUND_S
    while calls() - before:
        assert time.monotonic() < deadline, "the evaluation kept running"
        time.sleep(0.05)


# -- signals, --max-failures, cancel (promise 16) --------------------------------------------------


@pytest.mark.fault
def test_sigint_during_a_long_chunk_exits_130_soon_and_resumes_exactly(tmp_path: Path) -> None:
    """Promise 16: the first SIGINT ends the run 130 after a short grace, handing back chunks in
    flight (here sync calls sleeping 60 s, left behind), and the resume outputs every record
    exactly once."""
    module = '{use: map, function: "steps_for_abuse:slow_double"}'
    case = Case(tmp_path, pipeline_text(module, "{concurrency: 2}", chunk_size=5), records=20)
    case.slow.touch()
    process = case.start(case.run_args("--task-id", "sig"))
    try:
        case.wait_started(process)
        process.send_signal(signal.SIGINT)
        code, _, err = finish(process, STOP_BOUND_S)
    finally:
        kill_group(process)
    assert code == 130, err
    assert "pagent resume sig" in err
    assert case.stored_run("sig").status == "interrupted"
    case.slow.unlink()
    out = tmp_path / "out.jsonl"
    result = case.pagent(["resume", "sig", "--output", str(out)])
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [i * 2 for i in range(20)]


@pytest.mark.fault
def test_max_failures_stops_promptly_and_records_why(tmp_path: Path) -> None:
    """Promise 16: once `--max-failures` is exceeded the run stops within the grace, handing
    back the chunk in flight (a 60 s call) instead of waiting for it, and the store's summary
    says why."""
    module = '{use: map, function: "steps_for_abuse:fails_zero_else_slow"}'
    case = Case(tmp_path, pipeline_text(module, "{concurrency: 2}"), records=6)
    case.slow.touch()
    process = case.start(case.run_args("--task-id", "mf", "--max-failures", "0", "--json"))
    try:
        code, out, err = finish(process, STOP_BOUND_S)
    finally:
        kill_group(process)
    assert code == 1, err
    summary = json.loads(out)
    assert summary["status"] == "failed"
    assert "--max-failures" in summary["error"]
    assert "--max-failures" in err
    stored = case.stored_run("mf")
    assert stored.status == "failed"
    assert "--max-failures" in stored.extra["summary"]["error"]
    assert summary["items"]["done"] == 0, "the slow chunk was handed back, not finished"


@pytest.mark.fault
def test_cancel_is_never_overwritten_by_complete(tmp_path: Path) -> None:
    """Promise 16: `pagent cancel` is checked at every claim, so a run that could finish within
    the coordinator's lock renewal still ends `cancelled` (exit 1), never `complete`."""
    module = '{use: map, function: "steps_for_abuse:gated_double"}'
    case = Case(tmp_path, pipeline_text(module, "{concurrency: 1}"), records=6)
    process = case.start(case.run_args("--task-id", "cx", "--json"))
    try:
        case.wait_started(process)
        cancelled = case.pagent(["cancel", "cx"])
        assert cancelled.returncode == 0, cancelled.stderr
        case.go.touch()
        code, out, err = finish(process, STOP_BOUND_S)
    finally:
        kill_group(process)
    assert code == 1, err
    assert json.loads(out)["status"] == "cancelled"
    assert case.stored_run("cx").status == "cancelled"


def test_iteration_limit_is_named_also_under_quiet(tmp_path: Path) -> None:
    """Promise 16 (errors are never quiet): a run stopped by `max_total_iterations` names the
    limit on stderr under `--quiet`, and in `--json` (`error`)."""
    lines = ["name: chain", "agent: {max_total_iterations: 5}", "nodes:"]
    lines.append("  - {name: split, type: planner, modules: [{use: split, chunk_size: 2}]}")
    previous = "split"
    for number in range(8):
        lines.append(
            f"  - {{name: m{number}, dependencies: [{previous}], "
            '"modules": [{use: map, expr: "item"}]}'
        )
        previous = f"m{number}"
    case = Case(tmp_path, "\n".join(lines) + "\n", records=3)
    result = case.pagent(case.run_args("--quiet", "--json"))
    assert result.returncode == 1
    assert "max_total_iterations=5 reached" in result.stderr
    assert "max_total_iterations=5 reached" in json.loads(result.stdout)["error"]


# -- Redis faults (promise 18, and 5 for the budget) ----------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_high_fan_out_on_redis_completes_exactly(tmp_path: Path, redis_url: str) -> None:
    """Promise 18: concurrency 500 with one record per chunk shares a bounded connection pool
    (it ended "Too many connections", an ExceptionGroup and re-executed chunks)."""
    records = 3000
    case = Case(
        tmp_path,
        pipeline_text('{use: map, expr: "item * 2"}', "{concurrency: 500}"),
        records=records,
        store=f"{redis_url}?prefix=pagent-test-fanout-{os.getpid()}-{time.time_ns()}",
    )
    out = tmp_path / "out.jsonl"
    try:
        result = case.pagent(case.run_args("--task-id", "fan", "--output", str(out)), timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert [json.loads(line) for line in out.read_text().splitlines()] == [
            i * 2 for i in range(records)
        ]
        for symptom in ("ExceptionGroup", "never awaited", "unexpected", "Too many"):
            assert symptom not in result.stderr
    finally:
        from conftest import delete_prefix

        delete_prefix(redis_url, case.store.partition("prefix=")[2])


@pytest.fixture
def http_server() -> Iterator[int]:
    """A TCP server on a free port that answers everything like an HTTP server would."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join()
    listener.close()


def test_a_server_that_is_not_redis_is_exit_4(tmp_path: Path, http_server: int) -> None:
    """Promise 18: a server that is not Redis on the store's port is one line, exit 4."""
    case = Case(tmp_path, pipeline_text('{use: map, expr: "item"}'), records=1)
    result = case.pagent(["list", "--store", f"redis://127.0.0.1:{http_server}/0"])
    assert result.returncode == 4, result.stderr
    assert "is not a Redis server" in result.stderr
    assert "unexpected" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.redis
@pytest.mark.parametrize("suffix", ["/abc", "/0?colour=blue"])
def test_a_bad_redis_url_is_exit_2(tmp_path: Path, redis_url: str, suffix: str) -> None:
    """Promise 18: a database that is not a number (it ran on database 0) or an unknown option
    is a usage error, exit 2, before anything runs."""
    base = redis_url.rsplit("/", 1)[0]
    case = Case(tmp_path, pipeline_text('{use: map, expr: "item"}'), records=1)
    result = case.pagent(["list", "--store", f"{base}{suffix}"])
    assert result.returncode == 2, result.stderr
    assert "store URL" in result.stderr


needs_redis_server = pytest.mark.skipif(
    redis_server_binary() is None, reason="redis-server is not installed"
)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServerFactory]:
    factory = RedisServerFactory(tmp_path / "redis")
    yield factory
    factory.stop_all()


@needs_redis_server
def test_an_evicting_redis_is_refused_as_store_loss(
    tmp_path: Path, own_redis: RedisServerFactory
) -> None:
    """Promise 18 (and 6): a Redis whose maxmemory policy may evict any key would drop a run's
    state as silently as a restart without persistence: exit 4 before the run starts."""
    import redis

    server = own_redis(durable=False)
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", "allkeys-lru")
    case = Case(tmp_path, pipeline_text('{use: map, expr: "item"}'), records=3, store=server.url)
    out = tmp_path / "out.jsonl"
    unlimited = case.pagent(case.run_args("--output", str(out)))
    assert unlimited.returncode == 0, "without a maxmemory limit nothing is ever evicted"
    out.unlink()
    client.config_set("maxmemory", "64mb")
    client.close()
    result = case.pagent(case.run_args("--output", str(out)))
    assert result.returncode == 4, result.stderr
    assert "evicts keys" in result.stderr
    assert not out.exists()


@needs_redis_server
@pytest.mark.fault
def test_redis_killed_mid_run_exits_4_within_the_budget(
    tmp_path: Path, own_redis: RedisServerFactory
) -> None:
    """Promise 5: every store call of one outage shares the retry budget, so a Redis killed
    mid-run ends the run (exit 4) about one budget later, not one budget per call (43 s for a
    15 s budget). The bound is the budget plus generous slack, below two budgets."""
    budget = 5.0
    server = own_redis(durable=False)
    module = '{use: map, function: "steps_for_abuse:slow_double"}'
    case = Case(
        tmp_path,
        pipeline_text(module, "{concurrency: 1, lease: 1.0}"),
        records=3,
        store=f"{server.url}?retry_budget={budget:g}&connect_timeout=1&socket_timeout=1",
    )
    case.slow.touch()
    process = case.start(case.run_args())
    try:
        case.wait_started(process)
        server.kill()
        killed = time.monotonic()
        code, _, err = finish(process, 60)
        elapsed = time.monotonic() - killed
    finally:
        kill_group(process)
    assert code == 4, err
    assert "cannot reach" in err
    assert elapsed < 2 * budget, f"exit {elapsed:.1f} s after the kill"


# -- SQLite readers (promise 17) ---------------------------------------------------------------------

STOPPER = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE runs SET updated_at = updated_at")
print("in transaction", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.fault
def test_a_stopped_sqlite_writer_blocks_no_reader(tmp_path: Path) -> None:
    """Promise 17: with a process stopped (SIGSTOP) inside a write transaction, `status`,
    `list`, `results` and `failures` answer from a snapshot; a writer waits out its budget and
    names the process holding the lock."""
    case = Case(tmp_path, pipeline_text('{use: map, expr: "item * 2"}'), records=4)
    out = tmp_path / "out.jsonl"
    done = case.pagent(case.run_args("--task-id", "done", "--output", str(out)))
    assert done.returncode == 0, done.stderr
    stopper = subprocess.Popen(
        [sys.executable, "-c", STOPPER, str(tmp_path / "state.db")], stdout=subprocess.PIPE
    )
    try:
        assert stopper.stdout is not None
        assert stopper.stdout.readline() == b"in transaction\n"
        deadline = time.monotonic() + STOP_BOUND_S
        while Path(f"/proc/{stopper.pid}/stat").read_text().split()[2] != "T":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for args in (
            ["status", "done"],
            ["list"],
            ["results", "done", "--output", str(tmp_path / "again.jsonl")],
            ["failures", "done"],
        ):
            result = case.pagent(args, timeout=STOP_BOUND_S)
            assert result.returncode == 0, (args, result.stderr)
        assert (tmp_path / "again.jsonl").read_text() == out.read_text()
        writer = case.pagent(
            case.run_args("--store", f"sqlite:///{tmp_path / 'state.db'}?retry_budget=1"),
            timeout=STOP_BOUND_S,
        )
        assert writer.returncode == 4, writer.stderr
        assert f"held by process {stopper.pid}" in writer.stderr
    finally:
        stopper.kill()
        stopper.communicate()
