"""`pagent worker`: many processes, one run, on a private redis-server (loopback).

Every case keeps a ledger (host, pid, record, time of each call) and checks the output against a
single-host run of the same pipeline byte for byte: nothing missing, nothing duplicated
(RELIABILITY promises 1-3: every record exactly once in the output or the failed list).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
PAGENT = [sys.executable, "-m", "parallel_agent"]

PIPELINE = """
name: fleet
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 10}}]}}
  - name: work
    dependencies: [split]
    modules: [{{use: map, function: "{function}"}}]
    node_config: {{concurrency: 2, lease: {lease}, max_retries: 5, retry_delay: 0.05{extra}}}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate}}]}}
"""

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@dataclass
class Fleet:
    """One test's folder, private Redis and pipeline; starts coordinators and workers."""

    tmp: Path
    store: str
    pipeline: Path
    data: Path
    ledger: Path
    env: dict[str, str]
    records: int
    procs: list[subprocess.Popen[bytes]]

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*PAGENT, *args],
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, task_id: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(
            "run", str(self.pipeline), "--data", str(self.data), "--task-id", task_id,
            "--output", str(self.tmp / f"{task_id}.jsonl"), "--store", self.store, "-q", *extra,
        )  # fmt: skip

    def worker(
        self, *extra: str, pipeline: Path | None = None, **env: str
    ) -> subprocess.Popen[bytes]:
        return self.start(
            "worker", "--store", self.store, "--pipeline", str(pipeline or self.pipeline), *extra,
            env={**self.env, **env},
        )  # fmt: skip

    def ledger_rows(self) -> list[tuple[int, int, float]]:
        """(pid, record, time) of every call so far."""
        if not self.ledger.exists():
            return []
        rows = []
        for line in self.ledger.read_text().splitlines():
            _host, pid, item, at = line.split()
            rows.append((int(pid), int(item), float(at)))
        return rows

    def wait_for(self, predicate: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"never happened: {what}"
            time.sleep(0.02)

    def single_host_output(self) -> bytes:
        """The same pipeline on one host (its own SQLite store): the reference output."""
        out = self.tmp / "reference.jsonl"
        env = {**self.env, "PAGENT_LEDGER": str(self.tmp / "reference-ledger.txt")}
        done = subprocess.run(
            [*PAGENT, "run", str(self.pipeline), "--data", str(self.data), "--output", str(out),
             "--store", f"sqlite:///{self.tmp / 'reference.db'}", "-q"],
            env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        return out.read_bytes()

    def check_output(self, task_id: str) -> None:
        """Byte for byte the single-host output; nothing missing, nothing twice."""
        output = (self.tmp / f"{task_id}.jsonl").read_bytes()
        values = [int(line) // 3 for line in output.splitlines()]
        counts = collections.Counter(values)
        missing = [i for i in range(self.records) if counts[i] == 0]
        twice = [i for i, n in counts.items() if n > 1]
        assert not missing and not twice, f"missing={missing[:10]} twice={twice[:10]}"
        assert output == self.single_host_output()


def finish(proc: subprocess.Popen[bytes], timeout: float = 90) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr.decode()


def make_pipeline(
    path: Path,
    *,
    function: str = "steps_for_workers:ledger_triple",
    lease: float = 1.0,
    extra: str = "",
) -> Path:
    path.write_text(PIPELINE.format(function=function, lease=lease, extra=extra))
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    from helpers.redis_server import RedisServerFactory, redis_server_binary

    if redis_server_binary() is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("redis-server is not installed; CI=true requires it")
        pytest.skip("redis-server is not installed")
    servers = RedisServerFactory(tmp_path / "redis")
    server = servers(durable=False)
    records = 600
    data = tmp_path / "in.jsonl"
    data.write_text("".join(f"{i}\n" for i in range(records)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PAGENT_LEDGER": str(tmp_path / "ledger.txt"),
        "PAGENT_LEDGER_SLEEP": "0.01",
    }
    env.pop("PAGENT_STORE", None)
    fleet = Fleet(
        tmp=tmp_path,
        store=f"{server.url}?retry_budget=5",
        pipeline=make_pipeline(tmp_path / "fleet.yaml"),
        data=data,
        ledger=tmp_path / "ledger.txt",
        env=env,
        records=records,
        procs=[],
    )
    fleet.server = server  # type: ignore[attr-defined]
    try:
        yield fleet
    finally:
        for proc in fleet.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        servers.stop_all()


def test_coordinator_and_three_workers_all_commit(fleet: Fleet) -> None:
    """Two workers named the run (they exit once it ended), one leaves after --idle-exit. Items
    take 20 ms, so the work lasts several seconds and the unnamed worker, started last and
    scanning for runs once a second, still finds chunks on a loaded machine (at 10 ms it once
    found none on Python 3.13 in CI)."""
    fleet.env["PAGENT_LEDGER_SLEEP"] = "0.02"
    workers = [fleet.worker("--task-id", "t3"), fleet.worker("--task-id", "t3")]
    coordinator = fleet.run("t3")
    workers.append(fleet.worker("--idle-exit", "3"))
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    for worker in workers:
        code, stderr = finish(worker)
        assert code == 0, stderr
        assert "Traceback" not in stderr
    pids = {pid for pid, _, _ in fleet.ledger_rows()}
    assert pids == {coordinator.pid, *(w.pid for w in workers)}, "every process works chunks"
    fleet.check_output("t3")


def test_workers_only_coordinator_claims_nothing(fleet: Fleet) -> None:
    workers = [fleet.worker("--task-id", "wo") for _ in range(2)]
    coordinator = fleet.run("wo", "--workers-only")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    for worker in workers:
        assert finish(worker)[0] == 0
    pids = {pid for pid, _, _ in fleet.ledger_rows()}
    assert coordinator.pid not in pids
    assert pids == {w.pid for w in workers}
    fleet.check_output("wo")


def test_workers_only_coordinator_displays_progress_from_the_store(fleet: Fleet) -> None:
    """Its own process commits nothing: every count it shows comes from the store."""
    events = fleet.tmp / "events.jsonl"
    worker = fleet.worker("--task-id", "pg")
    coordinator = fleet.run("pg", "--workers-only", "--events", str(events))
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    assert finish(worker)[0] == 0
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    assert not [e for e in seen if e["kind"] == "chunk_done"]
    progress = [e for e in seen if e["kind"] == "node_progress" and e["node"] == "work"]
    assert progress and progress[-1]["items_done"] == fleet.records
    assert progress[-1]["chunks_done"] == fleet.records // 10


def test_workers_only_without_workers_says_so_and_waits_for_one(fleet: Fleet) -> None:
    """No silent wait: one line when no worker works on the run, one when a worker joins; the
    run waits meanwhile (a fleet may start later) and then completes exactly."""
    events = fleet.tmp / "events.jsonl"
    coordinator = fleet.run("alone", "--workers-only", "--events", str(events))

    def notices() -> list[str]:
        if not events.exists():
            return []
        lines = events.read_text().splitlines()
        return [e["message"] for e in map(json.loads, lines) if e["kind"] == "notice"]

    fleet.wait_for(lambda: notices(), "a line saying no worker works on the run")
    assert "no `pagent worker` is working on run alone" in notices()[0], notices()
    assert coordinator.poll() is None, "it keeps waiting"
    assert not fleet.ledger_rows()
    worker = fleet.worker("--task-id", "alone")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    assert finish(worker)[0] == 0
    said = notices()
    assert len(said) == 2 and "`pagent worker`s are working on run alone again" in said[1], said
    fleet.check_output("alone")


def test_workers_compute_the_partial_aggregates_of_their_chunks(fleet: Fleet) -> None:
    """A `compute:` aggregate's partials are computed with each chunk, by whoever works it:
    rows equal to a single-host run's with every chunk done by a worker."""
    fleet.pipeline.write_text(
        fleet.pipeline.read_text().replace(
            "modules: [{use: aggregate}]",
            "modules: [{use: aggregate, group_by: {rest: 'item % 7'}, "
            "compute: {n: count, total: {sum: {expr: 'item'}}}}]",
        )
    )
    workers = [fleet.worker("--task-id", "pa") for _ in range(2)]
    coordinator = fleet.run("pa", "--workers-only")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    for worker in workers:
        assert finish(worker)[0] == 0
    assert coordinator.pid not in {pid for pid, _, _ in fleet.ledger_rows()}
    rows = [json.loads(line) for line in (fleet.tmp / "pa.jsonl").read_text().splitlines()]
    assert sum(row["n"] for row in rows) == fleet.records
    assert (fleet.tmp / "pa.jsonl").read_bytes() == fleet.single_host_output()


def test_workers_only_coordinator_reduces_its_split_fed_aggregate_itself(fleet: Fleet) -> None:
    """A `compute:` aggregate fed by the split is the coordinator's work even with
    --workers-only (`pagent worker`s work maps and filters only): chunks the split queued as
    their lines (no split `processes` here) are reduced by the coordinator, so the run ends
    instead of waiting for a worker that never takes them."""
    fleet.pipeline.write_text(
        "output: collect\n"
        + fleet.pipeline.read_text()
        + "  - {name: by_rest, dependencies: [split], modules: [{use: aggregate, "
        "group_by: {rest: 'item % 7'}, compute: {n: count}}]}\n"
    )
    by_rest = fleet.tmp / "by_rest.json"
    workers = [fleet.worker("--task-id", "sa", "--idle-exit", "5")]
    coordinator = fleet.run("sa", "--workers-only", "--output-node", f"by_rest={by_rest}")
    code, stderr = finish(coordinator, timeout=60)
    assert code == 0, stderr
    for worker in workers:
        assert finish(worker)[0] == 0
    rows = {row["rest"]: row["n"] for row in json.loads(by_rest.read_text())}
    assert rows == {rest: len(range(rest, fleet.records, 7)) for rest in range(7)}


def test_worker_killed_mid_chunk_is_reclaimed(fleet: Fleet) -> None:
    victim = fleet.worker("--task-id", "k9")
    other = fleet.worker("--task-id", "k9")
    coordinator = fleet.run("k9")
    fleet.wait_for(
        lambda: sum(pid == victim.pid for pid, _, _ in fleet.ledger_rows()) >= 5,
        "the victim works a chunk",
    )
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    assert finish(other)[0] == 0
    executions = collections.Counter(item for _, item, _ in fleet.ledger_rows())
    assert any(n > 1 for n in executions.values()), "the killed worker's chunk ran again"
    fleet.check_output("k9")


def test_stopped_worker_late_commit_is_rejected(fleet: Fleet) -> None:
    """SIGSTOP past the lease, SIGCONT: the chunk it held was done by another; its commit loses."""
    sleeper = fleet.worker("--task-id", "st")
    coordinator = fleet.run("st")
    fleet.wait_for(
        lambda: any(pid == sleeper.pid for pid, _, _ in fleet.ledger_rows()), "the worker works"
    )
    os.killpg(sleeper.pid, signal.SIGSTOP)
    stopped_at = len(fleet.ledger_rows())
    fleet.wait_for(lambda: len(fleet.ledger_rows()) > stopped_at + 100, "others go on")
    # Its lease (1 s) has long expired by the time the others did 100 more records.
    fleet.wait_for(lambda: coordinator.poll() is not None or len(fleet.ledger_rows()) > 400, "x")
    os.killpg(sleeper.pid, signal.SIGCONT)
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    code, stderr = finish(sleeper)
    assert code == 0, stderr
    fleet.check_output("st")


def test_coordinator_killed_and_resumed_while_workers_go_on(fleet: Fleet) -> None:
    """Promise 6; and `pagent status` meanwhile says `stalled` (no live coordinator: its lock's
    process is gone) while listing the workers that still process chunks."""
    fleet.env["PAGENT_LEDGER_SLEEP"] = "0.05"  # the workers outlast the status below
    workers = [fleet.worker("--task-id", "fo") for _ in range(2)]
    coordinator = fleet.run("fo")
    fleet.wait_for(
        lambda: {pid for pid, _, _ in fleet.ledger_rows()} >= {w.pid for w in workers},
        "both workers work",
    )
    os.killpg(coordinator.pid, signal.SIGKILL)
    coordinator.wait(timeout=10)
    killed_at = len(fleet.ledger_rows())
    status = subprocess.run([*PAGENT, "status", "fo", "--store", fleet.store], env=fleet.env,
                            capture_output=True, timeout=60, text=True)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert (
        "status     stalled (no live coordinator; 2 workers still processing chunks"
        in status.stdout
    ), status.stdout
    assert all(f":{worker.pid}  " in status.stdout for worker in workers), status.stdout
    fleet.wait_for(lambda: len(fleet.ledger_rows()) > killed_at + 50, "workers go on alone")
    resumed = fleet.start("resume", "fo", "--store", fleet.store, "-q")
    code, stderr = finish(resumed)
    assert code == 0, stderr
    for worker in workers:
        assert finish(worker)[0] == 0
    fleet.check_output("fo")


def test_cancel_stops_every_worker(fleet: Fleet) -> None:
    env = {"PAGENT_LEDGER_SLEEP": "0.05"}
    fleet.env.update(env)
    workers = [fleet.worker("--task-id", "cx") for _ in range(3)]
    coordinator = fleet.run("cx")
    fleet.wait_for(
        lambda: len({pid for pid, _, _ in fleet.ledger_rows()} & {w.pid for w in workers}) == 3,
        "all three workers work",
    )
    done = subprocess.run(
        [*PAGENT, "cancel", "cx", "--store", fleet.store], env=fleet.env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    for worker in workers:
        code, stderr = finish(worker, timeout=30)
        assert code == 0, stderr
        assert "left run cx (cancelled)" in stderr
    finish(coordinator, timeout=30)
    assert len({item for _, item, _ in fleet.ledger_rows()}) < fleet.records


@pytest.mark.parametrize("limit", ["max-failures", "on_error-stop"])
def test_failure_limits_are_counted_in_the_store_and_stop_every_worker(
    fleet: Fleet, limit: str
) -> None:
    """The coordinator claims nothing (--workers-only), so only the count the workers share in
    the store can stop the run; every worker leaves it with the run's reason."""
    fleet.env.update({"PAGENT_LEDGER_SLEEP": "0.05", "PAGENT_FAIL_EVERY": "7"})
    extra = ", on_error: stop" if limit == "on_error-stop" else ""
    fleet.pipeline = make_pipeline(
        fleet.tmp / "failing.yaml", function="steps_for_workers:ledger_fail_multiples", extra=extra
    )
    workers = [fleet.worker("--task-id", "mf") for _ in range(3)]
    options = ["--max-failures", "10"] if limit == "max-failures" else []
    coordinator = fleet.run("mf", "--workers-only", "--json", *options)
    stdout, stderr = coordinator.communicate(timeout=90)
    assert coordinator.returncode == 1, stderr
    summary = json.loads(stdout)
    reason = "more than 10 items failed" if limit == "max-failures" else "(on_error: stop)"
    assert summary["status"] == "failed" and reason in summary["error"]
    for worker in workers:
        code, stderr = finish(worker)
        assert code == 0, stderr
        assert "left run mf (" in stderr and reason in stderr
    rows = fleet.ledger_rows()
    assert coordinator.pid not in {pid for pid, _, _ in rows}
    assert len({item for _, item, _ in rows}) < fleet.records, "the run stopped early"


def test_workers_and_status_show_the_live_workers(fleet: Fleet) -> None:
    fleet.env["PAGENT_LEDGER_SLEEP"] = "0.1"  # the run lasts until it is cancelled below
    workers = [fleet.worker("--task-id", "hb") for _ in range(2)]
    coordinator = fleet.run("hb")

    def pagent_json(*args: str) -> Any:
        done = subprocess.run([*PAGENT, *args, "--store", fleet.store, "--json"],
                              env=fleet.env, capture_output=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        return json.loads(done.stdout)

    def both_listed() -> bool:
        listed = pagent_json("workers")
        working = [w for w in listed if w["runs"].get("hb", {}).get("chunks", 0) > 0]
        return sorted(w["pid"] for w in working) == sorted(w.pid for w in workers)

    fleet.wait_for(both_listed, "both workers beat with chunks of run hb")
    status = pagent_json("status", "hb")
    assert sorted(w["pid"] for w in status["workers"]) == sorted(w.pid for w in workers)
    assert all(w["run"]["items"] > 0 for w in status["workers"])
    subprocess.run([*PAGENT, "cancel", "hb", "--store", fleet.store], env=fleet.env, timeout=60)
    finish(coordinator)
    for worker in workers:
        assert finish(worker)[0] == 0
    assert pagent_json("workers") == [], "a worker that exits takes its entry with it"


@pytest.mark.parametrize("processes", [0, 2])
def test_rate_limit_is_one_budget_across_every_process(fleet: Fleet, processes: int) -> None:
    """rate_limit 40/s with a coordinator and 3 workers (each with 2 worker processes of its own,
    or none): from the ledger's times, no one-second window holds more calls than the limit plus
    its burst (each process alone would allow 40)."""
    from parallel_agent.store.base import rate_burst

    records = 160
    fleet.data.write_text("".join(f"{i}\n" for i in range(records)))
    fleet.records = records
    fleet.env["PAGENT_LEDGER_SLEEP"] = "0"
    extra = ", rate_limit: 40" + (f", processes: {processes}" if processes else "")
    fleet.pipeline = make_pipeline(fleet.tmp / "limited.yaml", extra=extra)
    workers = [fleet.worker("--task-id", "rl") for _ in range(3)]
    coordinator = fleet.run("rl")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    for worker in workers:
        assert finish(worker)[0] == 0
    rows = fleet.ledger_rows()
    assert len({pid for pid, _, _ in rows}) >= 3, "several processes called the function"
    times = sorted(at for _, _, at in rows)
    busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    print(f"busiest one-second window: {busiest} calls")
    assert busiest <= 40 + rate_burst(40)
    fleet.check_output("rl")


def test_worker_of_another_pipeline_claims_nothing(fleet: Fleet) -> None:
    other = make_pipeline(fleet.tmp / "other.yaml", lease=2.0)
    stranger = fleet.worker("--idle-exit", "1", pipeline=other)
    coordinator = fleet.run("np")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    code, stderr = finish(stranger)
    assert code == 0, stderr
    assert stranger.pid not in {pid for pid, _, _ in fleet.ledger_rows()}
    fleet.check_output("np")


def test_named_run_whose_code_the_worker_lacks_is_refused(fleet: Fleet) -> None:
    """--task-id without the run's pipeline file: its `function:` is named only in Redis."""
    other = make_pipeline(
        fleet.tmp / "other.yaml", function="steps_for_workers:ledger_fail_multiples"
    )
    coordinator = fleet.run("nl")
    refuser = fleet.worker("--task-id", "nl", pipeline=other)
    code, stderr = finish(refuser)
    assert code == 1, stderr
    assert "refusing run nl" in stderr and "steps_for_workers:ledger_triple" in stderr
    assert stderr.count("refusing") == 1
    assert finish(coordinator)[0] == 0
    assert refuser.pid not in {pid for pid, _, _ in fleet.ledger_rows()}


@pytest.mark.parametrize("variant", ["different", "missing"])
def test_worker_with_other_module_code_refuses(fleet: Fleet, variant: str) -> None:
    """The worker's `steps_for_workers` differs from the coordinator's, or is not there."""
    elsewhere = fleet.tmp / "elsewhere"
    elsewhere.mkdir()
    if variant == "different":
        source = (TESTS / "steps_for_workers.py").read_text() + "\n# another version\n"
        (elsewhere / "steps_for_workers.py").write_text(source)
    pipeline = make_pipeline(elsewhere / "fleet.yaml")
    helper = fleet.worker("--task-id", "md")
    odd = fleet.start(
        "worker", "--store", fleet.store, "--pipeline", str(pipeline), "--task-id", "md",
        env={**fleet.env, "PYTHONPATH": str(elsewhere)},
    )  # fmt: skip
    coordinator = fleet.run("md")
    code, stderr = finish(odd)
    assert code == 1, stderr
    assert stderr.count("refusing run md") == 1
    assert "steps_for_workers" in stderr
    if variant == "different":
        assert "module steps_for_workers: digest" in stderr
    else:
        assert "cannot import module 'steps_for_workers'" in stderr
    assert finish(coordinator)[0] == 0
    assert finish(helper)[0] == 0
    assert odd.pid not in {pid for pid, _, _ in fleet.ledger_rows()}
    fleet.check_output("md")


def test_any_pipeline_runs_the_stored_pipelines_code(fleet: Fleet) -> None:
    """The opt-out: a worker without the run's pipeline file works it all the same."""
    other = make_pipeline(
        fleet.tmp / "other.yaml", function="steps_for_workers:ledger_fail_multiples"
    )
    trusting = fleet.worker("--task-id", "ap", "--any-pipeline", pipeline=other)
    coordinator = fleet.run("ap", "--workers-only")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    assert finish(trusting)[0] == 0
    assert {pid for pid, _, _ in fleet.ledger_rows()} == {trusting.pid}
    fleet.check_output("ap")


def test_worker_caps_processes_on_its_host(fleet: Fleet) -> None:
    """`processes: 3` in the pipeline, `--processes 1` on the worker: one worker process of its
    own does every chunk."""
    fleet.pipeline = make_pipeline(fleet.tmp / "procs.yaml", extra=", processes: 3")
    fleet.records = 200
    fleet.data.write_text("".join(f"{i}\n" for i in range(fleet.records)))
    worker = fleet.worker("--task-id", "pc", "--processes", "1")
    coordinator = fleet.run("pc", "--workers-only")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    assert finish(worker)[0] == 0
    pids = {pid for pid, _, _ in fleet.ledger_rows()}
    assert len(pids) == 1 and pids != {worker.pid}, "one child process of the worker"
    fleet.check_output("pc")


def test_redis_restart_without_persistence_exits_4(fleet: Fleet) -> None:
    """Everyone working the run sees the store lost. Each worker must have joined before the
    restart: one that had not would wait, rightly, for a run that is not there yet."""
    fleet.env["PAGENT_LEDGER_SLEEP"] = "0.05"  # the run outlasts the workers' start-up
    workers = [fleet.worker("--task-id", "rr") for _ in range(2)]
    coordinator = fleet.run("rr")
    working = {worker.pid for worker in workers}
    fleet.wait_for(
        lambda: working <= {pid for pid, _, _ in fleet.ledger_rows()}, "both workers join the run"
    )
    fleet.server.restart()  # type: ignore[attr-defined]
    for proc in [coordinator, *workers]:
        code, stderr = finish(proc, timeout=60)
        assert code == 4, stderr
        assert "Traceback" not in stderr


def test_a_named_run_that_is_not_there_is_waited_for_out_loud(fleet: Fleet) -> None:
    """A mistyped --task-id (or a worker that starts before its coordinator) waited without a
    word (found by a hostile-user helper). It says once that the run is not there yet, and
    joins it when it starts; a run it has seen that vanishes is store loss (exit 4)."""
    said = fleet.tmp / "worker.err"
    with said.open("wb") as stderr_file:
        worker = subprocess.Popen(
            [*PAGENT, "worker", "--store", fleet.store, "--pipeline", str(fleet.pipeline)]
            + ["--task-id", "late"],
            env=fleet.env,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            start_new_session=True,
        )
    fleet.procs.append(worker)
    fleet.wait_for(
        lambda: worker.poll() is not None or b"waiting for it to start" in said.read_bytes(),
        "the worker saying it waits",
    )
    coordinator = fleet.run("late")
    assert finish(coordinator)[0] == 0
    assert worker.wait(timeout=90) == 0
    stderr = said.read_text()
    assert stderr.count("no run late in ") == 1, stderr
    assert "joined run late" in stderr


def test_sigterm_drains_the_worker_and_hands_chunks_back(fleet: Fleet) -> None:
    """In-flight chunks outlive the drain grace: they are handed back at once (no lease of the
    drained worker is left), and the next worker finishes the run."""
    from parallel_agent.modules.context import HANDBACK_GRACE_S
    from parallel_agent.store import open_store

    fleet.pipeline = make_pipeline(
        fleet.tmp / "slow.yaml", function="steps_for_workers:ledger_slow_start", lease=60.0
    )
    slow = {"PAGENT_SLOW_BELOW": "20", "PAGENT_SLOW_SLEEP": str(HANDBACK_GRACE_S / 5)}
    leaver = fleet.worker("--task-id", "dr", **slow)
    coordinator = fleet.run("dr", "--workers-only")
    fleet.wait_for(
        lambda: sum(pid == leaver.pid for pid, _, _ in fleet.ledger_rows()) >= 2,
        "the worker works both slow chunks",
    )
    leaver.send_signal(signal.SIGTERM)
    code, stderr = finish(leaver)
    assert code == 130, stderr

    async def leased() -> int:
        store = open_store(fleet.store)
        await store.open()
        try:
            return (await store.counts("dr", "work")).leased
        finally:
            await store.close()

    assert asyncio.run(leased()) == 0, "the drained worker's chunks are back in the queue"
    finisher = fleet.worker("--task-id", "dr")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    assert finish(finisher)[0] == 0
    fleet.check_output("dr")


def test_an_acl_user_limited_to_pagents_keys_runs_coordinator_and_worker(fleet: Fleet) -> None:
    """docs/workers.md's ACL user, on a server with a password: a coordinator and a worker."""
    import redis
    from helpers.redis_server import RedisServer

    server = RedisServer(fleet.tmp / "acl-redis", durable=False, password="admin-secret")
    server.start()
    try:
        admin = redis.Redis(port=server.port, password="admin-secret")
        admin.execute_command(
            "ACL", "SETUSER", "pagent", "on", ">worker-secret", "~pagent:*",
            "+@read", "+@write", "+@scripting", "+@connection", "+@transaction", "+time",
        )  # fmt: skip
        admin.close()
        fleet.store = f"redis://pagent:worker-secret@127.0.0.1:{server.port}/0"
        worker = fleet.worker("--task-id", "acl")
        coordinator = fleet.run("acl")
        code, stderr = finish(coordinator)
        assert code == 0, stderr
        code, stderr = finish(worker)
        assert code == 0, stderr
        assert "worker-secret" not in stderr
        assert worker.pid in {pid for pid, _, _ in fleet.ledger_rows()}
        fleet.check_output("acl")
    finally:
        server.stop()


def test_rate_limit_with_processes_on_one_machine(tmp_path: Path) -> None:
    """`processes: 2` with `rate_limit` (refused before): each worker process asks the run's
    process for a token before every call, so the node's one limiter paces both."""
    pipeline = make_pipeline(tmp_path / "p.yaml", extra=", rate_limit: 20, processes: 2")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(f"{i}\n" for i in range(60)))
    ledger = tmp_path / "ledger.txt"
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        "PAGENT_LEDGER": str(ledger),
        "PAGENT_LEDGER_SLEEP": "0",
    }
    done = subprocess.run(
        [*PAGENT, "run", str(pipeline), "--data", str(data), "--output", str(tmp_path / "o.jsonl"),
         "--store", f"sqlite:///{tmp_path / 's.db'}", "-q"],
        env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "o.jsonl").read_text() == "".join(f"{i * 3}\n" for i in range(60))
    rows = [line.split() for line in ledger.read_text().splitlines()]
    assert len({pid for _, pid, _, _ in rows}) == 2, "both worker processes called it"
    times = sorted(float(at) for _, _, _, at in rows)
    busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    assert busiest <= 20 + 1


@pytest.mark.parametrize("store", ["sqlite:///x.db", "memory://"])
def test_worker_refuses_a_store_other_than_redis(tmp_path: Path, store: str) -> None:
    pipeline = make_pipeline(tmp_path / "p.yaml")
    done = subprocess.run(
        [*PAGENT, "worker", "--store", store, "--pipeline", str(pipeline)],
        capture_output=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "needs a Redis store" in done.stderr.decode()
