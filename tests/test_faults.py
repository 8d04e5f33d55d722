"""Crashes, interrupts and concurrent coordinators: nothing is lost, nothing is output twice.

Each test reports missing, duplicated and re-executed records (the ledger counts executions; the
output counts occurrences) and asserts that none are missing or duplicated.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
RECORDS = 300
PAGENT = [sys.executable, "-m", "parallel_agent"]

PIPELINE = """
name: ledger
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 10}]}
  - name: work
    dependencies: [split]
    modules: [{use: map, function: "steps_for_tests:ledger_double"}]
    node_config: {concurrency: 3, lease: 1.0, max_retries: 5, retry_delay: 0.05}
  - {name: collect, dependencies: [work], modules: [{use: aggregate}]}
"""

pytestmark = pytest.mark.fault


def pagent(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PAGENT, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    pipeline = tmp_path / "ledger.yaml"
    pipeline.write_text(PIPELINE)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(f"{i}\n" for i in range(RECORDS)))
    ledger = tmp_path / "ledger.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PAGENT_LEDGER": str(ledger),
        "PAGENT_STORE": f"sqlite:///{tmp_path / 'state.db'}",
    }
    return {
        "pipeline": str(pipeline),
        "data": str(data),
        "ledger": ledger,
        "env": env,
        "tmp": tmp_path,
    }


def report(output: Path, ledger: Path) -> tuple[list[int], list[int], int]:
    values = [json.loads(line) for line in output.read_text().splitlines()]
    seen = collections.Counter(value // 2 for value in values)
    missing = [i for i in range(RECORDS) if seen[i] == 0]
    duplicated = [i for i, n in seen.items() if n > 1]
    executions = collections.Counter(int(line) for line in ledger.read_text().split())
    reexecuted = sum(n - 1 for n in executions.values() if n > 1)
    print(f"missing={len(missing)} duplicated={len(duplicated)} re-executed={reexecuted}")
    return missing, duplicated, reexecuted


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr.decode()


def workers_of(ledger: Path) -> list[int]:
    """Worker processes (`processes: N`) still alive that belong to this test's runs."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if b"parallel_agent.modules.worker" not in (entry / "cmdline").read_bytes():
                continue
            if str(ledger).encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    ("stop", "processes"),
    [
        (signal.SIGINT, 0),
        (signal.SIGINT, 2),
        (signal.SIGTERM, 2),
        (signal.SIGHUP, 2),  # the terminal went away
    ],
    ids=["SIGINT", "SIGINT-processes", "SIGTERM-processes", "SIGHUP-processes"],
)
def test_stop_signal_exits_130_and_resume_completes(
    setup: dict[str, Any], stop: signal.Signals, processes: int
) -> None:
    if processes:
        pipeline = Path(setup["pipeline"])
        pipeline.write_text(
            pipeline.read_text().replace("concurrency: 3,", f"processes: {processes},")
        )
    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "0.01"}
    output = setup["tmp"] / "out.jsonl"
    proc = pagent(
        [
            "run",
            setup["pipeline"],
            "--data",
            setup["data"],
            "--output",
            str(output),
            "--task-id",
            "interrupt-me",
        ],
        env,
    )
    deadline = time.monotonic() + 30
    while not setup["ledger"].exists() or len(setup["ledger"].read_text().split()) < 40:
        assert time.monotonic() < deadline, "the run never started working"
        time.sleep(0.02)
    proc.send_signal(stop)
    code, stderr = finish(proc)
    assert code == 130, stderr
    assert "pagent resume interrupt-me" in stderr
    assert not output.exists()
    assert workers_of(setup["ledger"]) == [], "a worker process outlived the interrupted run"
    status = subprocess.run(
        [*PAGENT, "status", "interrupt-me", "--json"],
        env=env,
        capture_output=True,
        check=True,
    )
    assert json.loads(status.stdout)["state"] == "interrupted"
    resumed = subprocess.run(
        [*PAGENT, "resume", "interrupt-me"],
        env=env,
        capture_output=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    missing, duplicated, _ = report(output, setup["ledger"])
    assert missing == [] and duplicated == []


def test_sighup_ignored_at_start_is_left_ignored(setup: dict[str, Any]) -> None:
    """`nohup pagent run ...`: whoever started the run chose to ignore SIGHUP, so it carries on."""
    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "0.01"}
    output = setup["tmp"] / "out.jsonl"
    proc = subprocess.Popen(
        [*PAGENT, "run", setup["pipeline"], "--data", setup["data"], "--output", str(output)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 30
    while not setup["ledger"].exists() or len(setup["ledger"].read_text().split()) < 40:
        assert time.monotonic() < deadline, "the run never started working"
        time.sleep(0.02)
    proc.send_signal(signal.SIGHUP)
    code, stderr = finish(proc)
    assert code == 0, stderr
    missing, duplicated, _ = report(output, setup["ledger"])
    assert missing == [] and duplicated == []


def test_worker_processes_die_with_a_killed_coordinator(setup: dict[str, Any]) -> None:
    """Workers lead their own process groups (so a kill takes along what the user's code
    started), so nothing in the terminal reaches them: a coordinator killed outright takes them
    along (Linux's parent-death signal), even in the middle of a long item."""
    pipeline = Path(setup["pipeline"])
    pipeline.write_text(pipeline.read_text().replace("concurrency: 3,", "processes: 2,"))
    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "600"}
    proc = pagent(["run", setup["pipeline"], "--data", setup["data"]], env)
    deadline = time.monotonic() + 30
    while len(workers_of(setup["ledger"])) < 2 or not setup["ledger"].exists():
        assert time.monotonic() < deadline, "the workers never started working"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the coordinator alone, as the OOM killer would
    proc.wait(timeout=10)  # (its pipes may stay open as long as a worker holds them)
    while workers_of(setup["ledger"]):
        assert time.monotonic() < deadline + 30, "a worker outlived its killed coordinator"
        time.sleep(0.02)
    proc.communicate(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, setup: dict[str, Any]) -> Any:
    """The store under test: the embedded SQLite file, or the real Redis under a unique prefix."""
    if request.param == "sqlite":
        yield setup["env"]["PAGENT_STORE"]
        return
    redis_url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    yield f"{redis_url}?prefix={prefix}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_sigkill_at_random_points_then_resume(
    setup: dict[str, Any], seed: int, store_url: str
) -> None:
    setup["env"]["PAGENT_STORE"] = store_url
    rng = random.Random(seed)
    kill_after = rng.uniform(0.4, 1.6)  # seconds after processing starts, + 0.4
    setup["env"]["PAGENT_LEDGER_SLEEP"] = "0.01"
    print(f"seed={seed} kill_after={kill_after:.2f}s")
    output = setup["tmp"] / "out.jsonl"
    task = f"kill-{seed}"
    proc = pagent(
        [
            "run",
            setup["pipeline"],
            "--data",
            setup["data"],
            "--output",
            str(output),
            "--task-id",
            task,
            "--quiet",
        ],
        setup["env"],
    )
    wait_for_ledger(setup["ledger"], 1)  # the run exists; now kill at a seeded point
    time.sleep(kill_after - 0.4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    resumed = subprocess.run(
        [*PAGENT, "resume", task, "--quiet"],
        env=setup["env"],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    missing, duplicated, reexecuted = report(output, setup["ledger"])
    assert missing == [] and duplicated == []
    assert reexecuted <= 3 * 10, "only chunks in flight may run again (concurrency x chunk size)"
    reference = [json.dumps(i * 2) for i in range(RECORDS)]
    assert output.read_text().splitlines() == reference


def test_second_coordinator_with_the_same_task_id_exits_6(setup: dict[str, Any]) -> None:
    gate = setup["tmp"] / "gate"
    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "0.01", "PAGENT_LEDGER_GATE": str(gate)}
    args = ["run", setup["pipeline"], "--data", setup["data"], "--task-id", "busy", "--quiet"]
    first = pagent(args, env)
    deadline = time.monotonic() + 30
    while not setup["ledger"].exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = subprocess.run(
        [*PAGENT, *args],
        env=env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert second.returncode == 6, second.stderr.decode()
    assert "busy" in second.stderr.decode() or "another coordinator" in second.stderr.decode()
    gate.touch()
    code, stderr = finish(first)
    assert code == 0, stderr


def test_unreachable_redis_exits_4_naming_the_url(setup: dict[str, Any]) -> None:
    done = subprocess.run(
        [
            *PAGENT,
            "run",
            setup["pipeline"],
            "--data",
            setup["data"],
            "--store",
            "redis://:secret@127.0.0.1:1/0",
        ],
        env=setup["env"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 4, stderr
    assert "127.0.0.1:1" in stderr and "secret" not in stderr
    assert "Traceback" not in stderr


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    """Own redis-server processes on free ports (never the shared one), for restart tests."""
    from helpers.redis_server import RedisServerFactory, redis_server_binary

    if redis_server_binary() is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("redis-server is not installed; CI=true requires it")
        pytest.skip("redis-server is not installed")
    factory = RedisServerFactory(tmp_path / "redis")
    yield factory
    factory.stop_all()


def wait_for_ledger(ledger: Path, lines: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ledger.exists() or len(ledger.read_text().split()) < lines:
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.02)


@pytest.mark.slow
def test_redis_restart_without_persistence_is_state_lost(
    setup: dict[str, Any], redis_server: Any
) -> None:
    server = redis_server(durable=False)
    env = {
        **setup["env"],
        "PAGENT_LEDGER_SLEEP": "0.01",
        "PAGENT_STORE": f"{server.url}?retry_budget=5",
    }
    proc = pagent(["run", setup["pipeline"], "--data", setup["data"], "--task-id", "volatile"], env)
    wait_for_ledger(setup["ledger"], 30)
    server.kill()
    server.restart()
    code, stderr = finish(proc, timeout=60)
    assert code == 4, stderr
    assert "Traceback" not in stderr
    assert "gone" in stderr or "lost" in stderr


@pytest.mark.slow
def test_redis_restart_with_appendonly_completes_or_resumes(
    setup: dict[str, Any], redis_server: Any
) -> None:
    server = redis_server(durable=True)
    env = {
        **setup["env"],
        "PAGENT_LEDGER_SLEEP": "0.01",
        "PAGENT_STORE": f"{server.url}?retry_budget=10",
    }
    output = setup["tmp"] / "out.jsonl"
    proc = pagent(
        [
            "run",
            setup["pipeline"],
            "--data",
            setup["data"],
            "--task-id",
            "durable",
            "--output",
            str(output),
        ],
        env,
    )
    wait_for_ledger(setup["ledger"], 30)
    server.kill()
    server.restart()
    code, stderr = finish(proc, timeout=90)
    if code != 0:
        assert code in (4, 130), stderr
        resumed = subprocess.run(
            [*PAGENT, "resume", "durable"],
            env=env,
            capture_output=True,
            check=False,
            timeout=90,
        )
        assert resumed.returncode == 0, resumed.stderr.decode()
    missing, duplicated, _ = report(output, setup["ledger"])
    assert missing == [] and duplicated == []


def test_black_holed_redis_fails_without_hanging(setup: dict[str, Any]) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        done = subprocess.run(
            [
                *PAGENT,
                "run",
                setup["pipeline"],
                "--data",
                setup["data"],
                "--store",
                f"redis://127.0.0.1:{port}/0?socket_timeout=0.5&connect_timeout=0.5&retry_budget=1",
            ],
            env=setup["env"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 4, done.stderr.decode()
        assert f"127.0.0.1:{port}" in done.stderr.decode()
        assert time.monotonic() - started < 50, "liveness bound, not a speed test"
    finally:
        listener.close()


@pytest.mark.parametrize("hanging", ["hangs_on_thirty", "blocks_on_thirty"])
def test_failing_retried_and_hanging_items(setup: dict[str, Any], hanging: str) -> None:
    """`blocks_on_thirty` is sync: its hung thread is abandoned, and the command still ends."""
    pipeline = setup["tmp"] / "mixed.yaml"
    pipeline.write_text(f"""
name: mixed
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 1}}]}}
  - name: a
    dependencies: [split]
    modules: [{{use: map, function: "steps_for_tests:fail_on_seven"}}]
  - name: b
    dependencies: [a]
    modules: [{{use: map, function: "steps_for_tests:fails_once_divided"}}]
    node_config: {{on_error: fail_chunk, max_retries: 2, retry_delay: 0}}
  - name: c
    dependencies: [b]
    modules: [{{use: map, function: "steps_for_tests:{hanging}"}}]
    node_config: {{timeout: 0.5, max_retries: 0}}
  - {{name: out, dependencies: [c], modules: [{{use: aggregate}}]}}
""")
    data = setup["tmp"] / "ten.jsonl"
    data.write_text("".join(f"{i}\n" for i in range(10)))
    output = setup["tmp"] / "out.json"
    env = {**setup["env"], "PAGENT_TEST_MARKERS": str(setup["tmp"])}
    done = subprocess.run(
        [
            *PAGENT,
            "run",
            str(pipeline),
            "--data",
            str(data),
            "--output",
            str(output),
            "--json",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["items"]["failed"] == 2
    # 7 always fails (failed list); 5 fails once then succeeds; 3 hangs and is cancelled.
    assert json.loads(output.read_text()) == [i * 10 for i in range(10) if i not in (3, 7)]
    failures = subprocess.run(
        [*PAGENT, "failures", summary["task_id"]],
        env=env,
        capture_output=True,
        check=True,
    )
    records = sorted(json.loads(line)["record"] for line in failures.stdout.decode().splitlines())
    assert records == [4, 8]


def test_output_lost_at_the_end_exits_5_and_results_rewrites_it(setup: dict[str, Any]) -> None:
    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "0.005"}
    folder = setup["tmp"] / "vanishing"
    folder.mkdir()
    output = folder / "out.jsonl"
    proc = pagent(
        [
            "run",
            setup["pipeline"],
            "--data",
            setup["data"],
            "--task-id",
            "out5",
            "--output",
            str(output),
        ],
        env,
    )
    wait_for_ledger(setup["ledger"], 10)
    folder.rmdir()
    code, stderr = finish(proc)
    assert code == 5, stderr
    executions = len(setup["ledger"].read_text().split())
    good = setup["tmp"] / "good.jsonl"
    again = subprocess.run(
        [*PAGENT, "results", "out5", "--output", str(good)],
        env=env,
        capture_output=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr.decode()
    assert len(setup["ledger"].read_text().split()) == executions, "nothing was processed again"
    missing, duplicated, _ = report(good, setup["ledger"])
    assert missing == [] and duplicated == []


@pytest.mark.slow
def test_sqlite_under_kills_with_status_readers(setup: dict[str, Any]) -> None:
    import sqlite3
    import threading

    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "0.005"}
    output = setup["tmp"] / "out.jsonl"
    problems: list[str] = []
    stop = threading.Event()

    def read_status() -> None:
        while not stop.is_set():
            done = subprocess.run(
                [*PAGENT, "status", "kills", "--json"],
                env=env,
                capture_output=True,
                check=False,
            )
            text = done.stderr.decode()
            if done.returncode not in (0, 2) or "locked" in text or "Traceback" in text:
                problems.append(f"{done.returncode}: {text}")

    reader = threading.Thread(target=read_status)
    reader.start()
    try:
        rng = random.Random(42)
        command = [
            "run",
            setup["pipeline"],
            "--data",
            setup["data"],
            "--task-id",
            "kills",
            "--output",
            str(output),
            "--quiet",
        ]
        for attempt in range(4):
            proc = pagent(command, env)
            if attempt == 0:
                wait_for_ledger(setup["ledger"], 1)
            time.sleep(rng.uniform(0.05, 0.6))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            command = ["resume", "kills", "--quiet"]
        final = subprocess.run(
            [*PAGENT, *command],
            env=env,
            capture_output=True,
            check=False,
            timeout=120,
        )
        assert final.returncode == 0, final.stderr.decode()
    finally:
        stop.set()
        reader.join(timeout=30)
    assert problems == []
    database = env["PAGENT_STORE"].removeprefix("sqlite://")
    # `with sqlite3.connect()` commits but does not close (Python 3.13 warns about that).
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    missing, duplicated, _ = report(output, setup["ledger"])
    assert missing == [] and duplicated == []


def test_status_watch_follows_a_run_from_another_process(setup: dict[str, Any]) -> None:
    env = {**setup["env"], "PAGENT_LEDGER_SLEEP": "0.005"}
    proc = pagent(
        ["run", setup["pipeline"], "--data", setup["data"], "--task-id", "watched", "--quiet"], env
    )
    wait_for_ledger(setup["ledger"], 1)
    watch = subprocess.run(
        [*PAGENT, "status", "watched", "--watch", "--json"],
        env=env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    code, stderr = finish(proc)
    assert code == 0, stderr
    assert watch.returncode == 0, watch.stderr.decode()
    assert json.loads(watch.stdout)["state"] == "complete"
    screen = watch.stderr.decode()
    assert "watched" in screen and "300/300 items" in screen and "work" in screen
    assert "\x1b" not in screen, "not a terminal: no escape codes"
