"""`processes: N`: maps and filters on worker processes give the same results and the same failure
handling as in-process work, and never leave a worker process behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli, map_pipeline, numbers, write_pipeline  # noqa: F401 - fixture

from parallel_agent.modules import pool as pool_module
from parallel_agent.modules.items import ChunkFailure
from parallel_agent.modules.pool import PooledProcessor, WorkerJob

WORKER = b"parallel_agent.modules.worker"


def worker_processes() -> list[int]:
    """Live worker processes started by this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and WORKER in cmdline:
            found.append(int(entry.name))
    return found


def run_map(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    module: str,
    node_config: str,
    count: int = 10,
    *extra: str,
) -> tuple[Any, Path]:
    output = tmp_path / "out.jsonl"
    pipeline = write_pipeline(tmp_path, map_pipeline(module, node_config))
    result = cli(
        "run", pipeline, "--data", numbers(tmp_path, count), "--output", str(output), *extra
    )
    assert worker_processes() == [], "a worker process outlived its run"
    return result, output


def lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "module",
    [
        "{use: map, function: 'steps_for_tests:double'}",
        "{use: map, expr: 'item * 2'}",
        "{use: map, function: 'steps_for_tests:batch_square', batch: true}",
        "{use: filter, function: 'steps_for_tests:is_even'}",
        "{use: filter, expr: 'item % 2 == 0'}",
    ],
)
def test_worker_processes_give_the_in_process_results(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    module: str,
) -> None:
    here, there = tmp_path / "in", tmp_path / "workers"
    here.mkdir()
    there.mkdir()
    expected, in_process = run_map(cli, here, module, "{concurrency: 2}", 25)
    result, output = run_map(cli, there, module, "{processes: 2}", 25)
    assert expected.exit_code == 0
    assert result.exit_code == 0, result.stderr
    assert output.read_bytes() == in_process.read_bytes()
    assert len(lines(output)) > 0


def test_item_errors_keep_their_record_numbers(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    module = "{use: map, function: 'steps_for_tests:fail_on_seven'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 2}", 10, "--json")
    assert result.exit_code == 1
    assert lines(output) == [i * 10 for i in range(10) if i != 7]
    task_id = json.loads(result.stdout)["task_id"]
    failures = cli("failures", task_id)
    listed = [json.loads(line) for line in failures.stdout.splitlines()]
    assert [(f["record"], f["input"]) for f in listed] == [(8, 7)]
    assert "ValueError: seven is not allowed" in listed[0]["error"]


def test_what_a_function_prints_never_reaches_the_output(
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    module = "{use: map, function: 'steps_for_tests:chatty_double'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 2}", 10)
    assert result.exit_code == 0, result.stderr
    assert lines(output) == [i * 2 for i in range(10)]


def test_unencodable_results_are_item_errors(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    module = "{use: map, function: 'steps_for_tests:returns_set'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 1}", 6, "--json")
    assert result.exit_code == 1
    assert lines(output) == [0, 1, 2, 4, 5]
    failures = cli("failures", json.loads(result.stdout)["task_id"])
    listed = [json.loads(line) for line in failures.stdout.splitlines()]
    assert [f["record"] for f in listed] == [4]
    assert "not JSON-serialisable" in listed[0]["error"]


@pytest.mark.parametrize(
    ("function", "config", "reason"),
    [
        ("dies_on_three", "", "worker process exited with status 3"),
        ("exits_on_three", "", "worker process exited with status 3"),
        ("sleeps_on_three", ", timeout: 0.5", "timed out after 0.5 s"),
    ],
)
def test_a_worker_that_dies_or_hangs_fails_only_its_chunk(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    function: str,
    config: str,
    reason: str,
) -> None:
    """A crash ends the worker; a hang is stopped by killing it. A fresh worker takes the rest."""
    module = f"{{use: map, function: 'steps_for_tests:{function}'}}"
    node_config = f"{{processes: 2, max_retries: 1, retry_delay: 0{config}}}"
    result, output = run_map(cli, tmp_path, module, node_config, 9, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["chunks"] == {"total": 3, "done": 2, "failed": 1}
    assert lines(output) == [0, 1, 2, 6, 7, 8]
    failed = [json.loads(line) for line in cli("failures", summary["task_id"]).stdout.splitlines()]
    assert [f["record"] for f in failed] == [4, 5, 6]
    assert all(reason in f["error"] for f in failed)


@pytest.mark.parametrize(
    ("module", "config", "message"),
    [
        (
            "{use: map, command: 'cat'}",
            "{processes: 2}",
            "nodes[1].node_config.processes: processes needs a split, or a map or filter with expr or function",
        ),
        (
            "{use: map, function: 'steps_for_tests:async_increment'}",
            "{processes: 2}",
            "processes needs a sync function; 'steps_for_tests:async_increment' is async",
        ),
    ],
)
def test_processes_only_where_they_can_work(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    module: str,
    config: str,
    message: str,
) -> None:
    pipeline = write_pipeline(tmp_path, map_pipeline(module, config))
    result = cli("validate", pipeline)
    assert result.exit_code == 2
    assert message in result.stderr


def split_pipeline(processes: int) -> str:
    return f"""
name: test
nodes:
  - name: split
    type: planner
    modules: [{{use: split, chunk_size: 4}}]
    node_config: {{processes: {processes}}}
  - {{name: work, dependencies: [split], modules: [{{use: map, expr: "item['x'] * 2"}}]}}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate}}]}}
"""


def test_a_split_checks_json_lines_on_worker_processes(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "in.jsonl"
    data.write_bytes(
        b"".join(b'{"x": %d}\r\n' % i + (b"\n  \n" if i % 7 == 0 else b"") for i in range(30))
    )
    outputs = []
    for processes in (0, 2):
        output = tmp_path / f"out-{processes}.json"
        pipeline = write_pipeline(tmp_path, split_pipeline(processes), f"p{processes}.yaml")
        result = cli("run", pipeline, "--data", str(data), "--output", str(output))
        assert result.exit_code == 0, result.stderr
        outputs.append(json.loads(output.read_text()))
        assert worker_processes() == []
    assert outputs[0] == outputs[1] == [i * 2 for i in range(30)]


def split_aggregate_pipeline(processes: int) -> str:
    """The split feeding a `compute:` aggregate directly: its workers also compute partials."""
    return split_pipeline(processes).split("  - {name: work")[0] + (
        "  - {name: totals, dependencies: [split], modules: [{use: aggregate, "
        "compute: {n: count, total: {sum: x}}}]}\n"
    )


@pytest.mark.parametrize("form", [split_pipeline, split_aggregate_pipeline])
def test_a_split_on_workers_locates_bad_input_as_in_process(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    form: Any,
) -> None:
    data = tmp_path / "in.jsonl"
    lines = [b'{"x": %d}' % i for i in range(40)]
    lines[25] = b'{"x": 25,,}'
    data.write_bytes(b"\n".join(lines[:10]) + b"\n\n" + b"\n".join(lines[10:]) + b"\n")
    errors = []
    for processes in (0, 2):
        output = tmp_path / "out.json"
        pipeline = write_pipeline(tmp_path, form(processes), f"p{processes}.yaml")
        result = cli("run", pipeline, "--data", str(data), "--output", str(output))
        assert result.exit_code == 3
        assert not output.exists()
        errors.append(result.stderr.strip().splitlines()[-1])
    assert errors[0] == errors[1]
    assert "in.jsonl, line 27, column 10, record 26: invalid JSON" in errors[1]


@pytest.mark.parametrize("config", ["{concurrency: 2}", "{processes: 2}"])
def test_a_filter_answer_that_cannot_be_tested_fails_only_its_item(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    config: str,
) -> None:
    module = "{use: filter, function: 'steps_for_tests:undecidable_on_three'}"
    result, output = run_map(cli, tmp_path, module, config, 6)
    assert result.exit_code == 1
    assert lines(output) == [0, 2, 4]


def test_user_code_in_a_worker_reads_an_empty_stdin(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    module = "{use: map, function: 'steps_for_tests:reads_stdin'}"
    result, output = run_map(cli, tmp_path, module, "{processes: 1, timeout: 20}", 4)
    assert result.exit_code == 0, result.stderr
    assert lines(output) == [0, 1, 2, 3]


# ---- what a worker leaves behind: processes it started, pipes, idle slots ------------------------

POOL_STEPS = '''
"""Functions the worker-process tests run; each gets the path of a file to write a pid to."""
import os
import subprocess
import threading
import time


def _write_pid(path, pid):
    with open(path + ".tmp", "w") as handle:
        handle.write(str(pid))
    os.replace(path + ".tmp", path)


def spawn_and_block(path):
    """Starts a process that would outlive its worker, then never returns."""
    _write_pid(path, subprocess.Popen(["sleep", "600"]).pid)
    time.sleep(600)


def spawn_and_linger(path):
    """Returns, leaving a process it started and a thread that keeps its worker from exiting."""
    _write_pid(path, subprocess.Popen(["sleep", "600"]).pid)
    threading.Thread(target=time.sleep, args=(600,)).start()
    return 1


def escape_and_block(path):
    """Forks a process that leaves the worker's session, holding the worker's pipes open."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(600)
        os._exit(0)
    _write_pid(path, pid)
    time.sleep(600)
'''

#: Seconds a test waits for something that should happen at once (a bound, not a measurement).
LIVENESS_S = 30.0


def pool_steps(tmp_path: Path) -> None:
    (tmp_path / "pool_steps.py").write_text(POOL_STEPS)


def pool_of(tmp_path: Path, function: str, size: int = 1) -> PooledProcessor:
    pool_steps(tmp_path)
    job = WorkerJob(
        "function", f"pool_steps:{function}", "node 'work', map", roots=(str(tmp_path),)
    )
    return PooledProcessor(job, size)


def alive(pid: int) -> bool:
    """Running (a zombie is not: it only waits for a parent that may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pid: int) -> bool:
    """Whether `pid` stops running within LIVENESS_S."""
    deadline = time.monotonic() + LIVENESS_S
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_pid(path: Path) -> int:
    deadline = time.monotonic() + LIVENESS_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} was never written"
        time.sleep(0.02)
    return int(path.read_text())


@contextlib.contextmanager
def killed_afterwards(pid_file: Path) -> Iterator[None]:
    """Whatever happens, the process named in `pid_file` does not outlive the test."""
    try:
        yield
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def unclosed_transports() -> list[str]:
    """ResourceWarnings of objects that were still open when collected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_chunk_that_times_out_takes_the_processes_it_started_along(
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    pool_steps(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(str(pid_file)) + "\n")
    module = "{use: map, function: 'pool_steps:spawn_and_block'}"
    pipeline = write_pipeline(
        tmp_path, map_pipeline(module, "{processes: 1, timeout: 2, max_retries: 0}")
    )
    with killed_afterwards(pid_file):
        result = cli("run", pipeline, "--data", str(data), "--json")
        assert result.exit_code == 1, result.stderr
        assert worker_processes() == []
        assert gone(read_pid(pid_file)), "a process started by a killed worker outlived the run"


async def test_a_worker_that_will_not_exit_is_killed_with_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "EXIT_GRACE_S", 0.2)
    pool = pool_of(tmp_path, "spawn_and_linger")
    pid_file = tmp_path / "grandchild.pid"
    with killed_afterwards(pid_file):
        await pool.process_chunk([str(pid_file)], range(1, 2), {})
        worker = pool.idle[0].process.pid
        async with asyncio.timeout(LIVENESS_S):
            await pool.close()
        assert not alive(worker)
        assert await asyncio.to_thread(gone, read_pid(pid_file))


async def test_a_killed_worker_frees_its_pipes_even_when_another_process_holds_them(
    tmp_path: Path,
) -> None:
    """The killed worker forked a process into its own session, out of reach of the kill, that
    holds the worker's pipes: the pool still closes its ends of them at once, and `close`
    returns."""
    before = open_fds()
    pool = pool_of(tmp_path, "escape_and_block")
    pid_file = tmp_path / "escaped.pid"
    with killed_afterwards(pid_file):
        call = asyncio.ensure_future(pool.process_chunk([str(pid_file)], range(1, 2), {}))
        await asyncio.to_thread(read_pid, pid_file)
        call.cancel()  # as a timeout or a lost lease does
        with pytest.raises(asyncio.CancelledError):
            await call
        del call
        deadline = time.monotonic() + LIVENESS_S
        while open_fds() != before:  # at once, not only when the pool closes
            assert time.monotonic() < deadline, "the killed worker's pipes are still open"
            await asyncio.sleep(0.02)
        async with asyncio.timeout(LIVENESS_S):
            await pool.close()
        assert unclosed_transports() == []
        assert open_fds() == before


def expr_pool() -> PooledProcessor:
    return PooledProcessor(WorkerJob("expr", "item * 2", "node 'work', map"), 1)


@pytest.mark.parametrize(
    "noticed",
    [
        None,  # as it happens: writing the next request to a dead worker fails
        BrokenPipeError(32, "Broken pipe"),
        ConnectionResetError("Connection lost"),
        asyncio.IncompleteReadError(b"", 8),
    ],
)
async def test_a_worker_that_died_fails_its_chunk_with_its_exit_status(
    monkeypatch: pytest.MonkeyPatch, noticed: BaseException | None
) -> None:
    """However the coordinator notices that a worker died (writing, draining or reading), the
    chunk fails with the worker's exit status, the worker is let go, and the next chunk gets a
    fresh one."""
    before = open_fds()
    pool = expr_pool()
    assert (await pool.process_chunk([1], range(1, 2), {})).encoded == b"2\n"
    (worker,) = pool.idle
    os.kill(worker.process.pid, signal.SIGKILL)  # as the kernel's OOM killer would
    async with asyncio.timeout(LIVENESS_S):
        await worker.process.wait()
    if noticed is not None:

        async def dead_call(self: Any, request: dict[str, Any], body: bytes) -> Any:
            raise noticed

        monkeypatch.setattr(pool_module._Worker, "call", dead_call)
    with pytest.raises(ChunkFailure) as failure:
        await pool.process_chunk([2], range(2, 3), {})
    assert str(failure.value) == (
        "node 'work', map: worker process was killed by SIGKILL on the chunk starting at record 2"
    )
    del failure, worker
    assert pool.idle == [] and pool.busy == set()
    monkeypatch.undo()
    assert (await pool.process_chunk([3], range(3, 4), {})).encoded == b"6\n"
    async with asyncio.timeout(LIVENESS_S):
        await pool.close()
    assert unclosed_transports() == []
    assert open_fds() == before


async def test_a_call_that_ends_after_close_does_not_leave_its_worker_idle() -> None:
    """A call that was waiting for its worker to start when the pool was closed ends normally,
    and its worker exits instead of waiting, idle, for a chunk that will never come."""
    pool = expr_pool()
    pool.warm_up({})
    call = asyncio.ensure_future(pool.process_chunk([1], range(1, 2), {}))
    await asyncio.sleep(0)
    assert pool.starting == [], "the call took the worker being started"
    await pool.close()
    assert (await call).encoded == b"2\n"
    assert pool.idle == []
    deadline = time.monotonic() + LIVENESS_S
    while worker_processes():
        assert time.monotonic() < deadline, "the worker outlived its closed pool"
        await asyncio.sleep(0.02)
    assert unclosed_transports() == []


def test_a_split_starts_no_checking_workers_it_will_not_use(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """JSON input is parsed while it is read, and a resumed split whose queue is sealed reads
    nothing: neither needs the processes that check JSON Lines."""
    started: list[str] = []
    start = PooledProcessor._start

    async def counted(self: PooledProcessor, params: dict[str, Any]) -> Any:
        started.append(self.job.kind)
        return await start(self, params)

    monkeypatch.setattr(PooledProcessor, "_start", counted)
    pipeline = write_pipeline(tmp_path, split_pipeline(2))
    data = tmp_path / "in.json"
    data.write_text(json.dumps([{"x": i} for i in range(10)]))
    result = cli("run", pipeline, "--data", str(data), "--output", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.stderr
    assert "check-jsonl" not in started

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"x": i} if i != 5 else {"y": i}) + "\n" for i in range(10)))
    result = cli("run", pipeline, "--data", str(data), "--task-id", "sealed", "--json")
    assert result.exit_code == 1, result.stderr  # record 6 has no x: the run can be resumed
    started.clear()
    result = cli("resume", "sealed", "--json")
    assert result.exit_code == 1, result.stderr
    assert "check-jsonl" not in started


@pytest.mark.parametrize("processes", [0, 2])
def test_a_module_next_to_the_pipeline_comes_before_one_in_the_working_directory(
    tmp_path: Path, processes: int
) -> None:
    """The same name, two modules: the one next to the pipeline wins, in this process and in
    worker processes alike (a worker's path starts with its working directory; it used to
    import the working directory's module, so `processes` changed the results)."""
    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
        (folder / "which_one.py").write_text(f"def f(item):\n    return '{folder.name}'\n")
    (there / "p.yaml").write_text(
        map_pipeline('{use: map, function: "which_one:f"}', f"{{processes: {processes}}}")
    )
    (here / "in.jsonl").write_text("".join(f"{i}\n" for i in range(6)))
    done = subprocess.run(
        [sys.executable, "-m", "parallel_agent", "run", str(there / "p.yaml"), "--data",
         "in.jsonl", "--output", "out.json", "--store", "memory://", "-q"],
        cwd=here, capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((here / "out.json").read_text()) == ["there"] * 6
