"""Fault-and-abuse cases for data in and out, each run end to end through the `pagent` command.

A hostile user's paths (the input itself through links, special files, folders), numbers past 64
bits, NaN from user code, huge and deeply nested records, empty files and odd task ids: each must
end in its documented exit code with one located line, or in output that is exactly right.
RELIABILITY.md promises 13 (nothing else harmed), 14 (values are exact) and 15 (limits hold).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
PAGENT = [sys.executable, "-m", "parallel_agent"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
BIG = [18446744073709551617, 12345678901234567890123, -9223372036854775809, 2**64 - 1, -(2**63)]

MAP = """
name: abuse
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 2{split}}}]{split_config}}}
  - name: work
    dependencies: [split]
    modules: [{module}]
    node_config: {{max_retries: 0{config}}}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate{aggregate}}}]}}
"""


def pipeline_text(
    module: str = '{use: map, expr: "item"}',
    *,
    split: str = "",
    split_config: str = "",
    config: str = "",
    aggregate: str = "",
) -> str:
    return MAP.format(
        module=module, split=split, split_config=split_config, config=config, aggregate=aggregate
    )


class Pagent:
    """Runs `pagent` in a folder of the test's own, with a private SQLite store: as a process
    (real file descriptors), or in this process through Typer's runner (cheaper, for cases that
    end before any special file is written)."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "PAGENT_STORE": f"sqlite:///{folder / 'state.db'}",
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
        }
        self.inline = monkeypatch is not None
        if monkeypatch is not None:
            monkeypatch.chdir(folder)
            monkeypatch.setenv("PAGENT_STORE", self.env["PAGENT_STORE"])
            monkeypatch.syspath_prepend(str(TESTS))

    def __call__(
        self, *args: str, stdin: bytes | None = None, stdout: Any = subprocess.PIPE
    ) -> subprocess.CompletedProcess[bytes]:
        if self.inline and stdout is subprocess.PIPE:
            from typer.testing import CliRunner

            from parallel_agent.cli import app

            result = CliRunner().invoke(app, list(args), input=stdin, catch_exceptions=False)
            return subprocess.CompletedProcess(
                args, result.exit_code, result.stdout_bytes, result.stderr_bytes
            )
        return subprocess.run(
            [*PAGENT, *args],
            cwd=self.folder,
            env=self.env,
            input=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )

    def pipeline(self, text: str = "", name: str = "pipeline.yaml") -> str:
        (self.folder / name).write_text(text or pipeline_text())
        return name

    def runs(self) -> list[str]:
        listed = self("list", "--json")
        assert listed.returncode == 0, listed.stderr
        return [run["task_id"] for run in json.loads(listed.stdout)]  # one JSON array


@pytest.fixture
def pagent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pagent:
    """`pagent` in this process (through Typer's runner)."""
    return Pagent(tmp_path, monkeypatch)


@pytest.fixture
def process(tmp_path: Path) -> Pagent:
    """`pagent` as a process of its own, with real standard streams."""
    return Pagent(tmp_path)


def one_error(result: subprocess.CompletedProcess[bytes], code: int, *fragments: str) -> str:
    """The one `pagent: error:` line of a command that had to fail with `code`."""
    stderr = result.stderr.decode()
    assert result.returncode == code, (result.returncode, stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("pagent: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def write_numbers(folder: Path, count: int = 6, name: str = "in.jsonl") -> Path:
    path = folder / name
    path.write_bytes(b"".join(b"%d\n" % number for number in range(count)))
    return path


# ---- promise 13: outputs never harm the input, each other, or a special file --------------------

LINKS: dict[str, Callable[[Path], str]] = {
    "same": lambda folder: "in.jsonl",
    "dot-slash": lambda folder: "./in.jsonl",
    "dot-dot": lambda folder: "sub/../in.jsonl",
    "symlink": lambda folder: (folder / "link.jsonl").symlink_to("in.jsonl") or "link.jsonl",
    "hard-link": lambda folder: os.link(folder / "in.jsonl", folder / "hard.jsonl") or "hard.jsonl",
}


@pytest.mark.parametrize("form", list(LINKS))
@pytest.mark.parametrize("option", ["--output", "--failed-output", "--events"])
def test_run_refuses_an_output_that_is_the_input(
    pagent: Pagent, tmp_path: Path, option: str, form: str
) -> None:
    """Promise 13: `--output`, `--failed-output` and `--events` resolving to `--data` (by name,
    `./`, `..`, a symlink or a hard link) are refused before the run, and the input is intact."""
    original = write_numbers(tmp_path).read_bytes()
    (tmp_path / "sub").mkdir()
    target = LINKS[form](tmp_path)
    pipeline = pagent.pipeline()
    result = pagent("run", pipeline, "--data", "in.jsonl", option, target)
    one_error(result, 2, f"{option} {target} is the same file as --data")
    assert (tmp_path / "in.jsonl").read_bytes() == original
    assert pagent.runs() == []  # nothing ran


@pytest.mark.parametrize("form", ["same", "symlink", "hard-link"])
def test_commands_reading_a_stored_run_refuse_its_input_as_output(
    pagent: Pagent, tmp_path: Path, form: str
) -> None:
    """Promise 13: `resume --output`, `results --output` and `failures --output` never replace
    the run's input (which `failures` and `resume --retry-failed` read back)."""
    original = write_numbers(tmp_path).read_bytes()
    pipeline = pagent.pipeline()
    done = pagent("run", pipeline, "--data", "in.jsonl", "--task-id", "t1", "-q")
    assert done.returncode == 0, done.stderr
    target = LINKS[form](tmp_path)
    for command in (["resume", "t1"], ["results", "t1"], ["failures", "t1"]):
        result = pagent(*command, "--output", target)
        one_error(result, 2, f"--output {target} is the same file as")
        assert (tmp_path / "in.jsonl").read_bytes() == original


def test_outputs_of_one_command_must_differ(pagent: Pagent, tmp_path: Path) -> None:
    """Promise 13: two outputs of one run resolving to one file are refused (a symlink too), as
    are the pipeline file, the store's file, and `--output -` with `--json` (both stdout)."""
    write_numbers(tmp_path)
    pipeline = pagent.pipeline()
    (tmp_path / "alias.jsonl").symlink_to("out.jsonl")
    cases = [
        (["--output", "out.jsonl", "--events", "alias.jsonl"], "--events alias.jsonl"),
        (["--output", "out.jsonl", "--failed-output", "./out.jsonl"], "--failed-output"),
        (["--output", pipeline, "--output-format", "jsonl"], "the pipeline"),
        (["--output", "state.db", "--output-format", "jsonl"], "--store"),
        (["--output", "-", "--json"], "--output - and --json would all write to stdout"),
    ]
    for extra, fragment in cases:
        one_error(pagent("run", pipeline, "--data", "in.jsonl", *extra), 2, fragment)
    assert not (tmp_path / "out.jsonl").exists()
    assert pagent.runs() == []


def test_a_symlinked_output_is_written_through_the_link(pagent: Pagent, tmp_path: Path) -> None:
    """Promise 13: `--output link` where link points at a file replaces the file's content and
    keeps the link (the rename used to put a regular file in the link's place)."""
    write_numbers(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "out.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to("real/out.jsonl")
    run = pagent("run", pagent.pipeline(), "--data", "in.jsonl", "--output", "link.jsonl", "-q")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "link.jsonl").is_symlink()
    expected = b"".join(b"%d\n" % n for n in range(6))
    assert (tmp_path / "real" / "out.jsonl").read_bytes() == expected


def make_socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    return server


def test_folders_sockets_and_block_devices_are_refused(pagent: Pagent, tmp_path: Path) -> None:
    """Promise 13: a folder, a socket or (as root, a node of the test's own) a block device as an
    output is refused with exit 2 before the run, and stays what it was."""
    write_numbers(tmp_path)
    pipeline = pagent.pipeline()
    (tmp_path / "folder").mkdir()
    server = make_socket(tmp_path / "sock")
    targets = {"folder": "a folder", "sock": "a socket"}
    if IS_ROOT:
        os.mknod(tmp_path / "block", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        targets["block"] = "a block device"
    try:
        for name, kind in targets.items():
            for option in ("--output", "--failed-output", "--events"):
                result = pagent(
                    "run", pipeline, "--data", "in.jsonl", option, name, "--output-format", "jsonl"
                )
                one_error(result, 2, f"{option} {name}: it is {kind}")
        assert stat.S_ISSOCK(os.stat(tmp_path / "sock").st_mode)
        assert (tmp_path / "folder").is_dir()
        if IS_ROOT:
            assert stat.S_ISBLK(os.stat(tmp_path / "block").st_mode)
    finally:
        server.close()
    assert pagent.runs() == []


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a character device needs root")
def test_a_character_device_is_written_in_place(process: Pagent, tmp_path: Path) -> None:
    """Promise 13: `--output` onto a character device (a null device and a full device of the
    test's own, made with mknod; never the system's) writes to the device and leaves it a
    device: the null one takes the output and events (exit 0), the full one says the disk is full
    (exit 5, one line)."""
    write_numbers(tmp_path)
    pipeline = process.pipeline()
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(tmp_path / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))
    fmt = ["--output-format", "jsonl"]
    run = process("run", pipeline, "--data", "in.jsonl", "--output", "null", *fmt, "--task-id", "t")
    assert run.returncode == 0, run.stderr
    assert process("results", "t", "--output", "null", *fmt).returncode == 0
    assert process("failures", "t", "--output", "null").returncode == 0
    events = process("run", pipeline, "--data", "in.jsonl", "--events", "null", "-q")
    assert events.returncode == 0, events.stderr
    full = process("results", "t", "--output", "full", *fmt)
    one_error(full, 5, "No space left on device")
    full_events = process("run", pipeline, "--data", "in.jsonl", "--events", "full", "-q")
    one_error(full_events, 5, "cannot write full: No space left on device")
    for name in ("null", "full"):
        assert stat.S_ISCHR(os.lstat(tmp_path / name).st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def read_fifo(path: Path, into: list[bytes]) -> threading.Thread:
    def drain() -> None:
        with open(path, "rb") as fifo:
            into.append(fifo.read())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return reader


def test_special_files_as_data_are_refused_with_what_to_do(process: Pagent, tmp_path: Path) -> None:
    """A FIFO, a device or a folder as `--data` is exit 2 naming it, never "no such file" for a
    path that exists, and nothing is read from it."""
    pipeline = process.pipeline()
    os.mkfifo(tmp_path / "in.fifo")
    for data in ("in.fifo", "/dev/zero", str(tmp_path)):
        run = process("run", pipeline, "--data", data, "--format", "jsonl", "-q")
        said = run.stderr.decode()
        assert run.returncode == 2, said
        assert f"--data: not a regular file: {data}" in said and "--data -" in said
        assert len(said.strip().splitlines()) == 1, said
    missing = process("run", pipeline, "--data", "gone.jsonl", "-q")
    assert missing.returncode == 2 and b"--data: no such file: gone.jsonl" in missing.stderr


def test_a_fifo_is_written_in_place(process: Pagent, tmp_path: Path) -> None:
    """Promise 13: a FIFO given as `--output` or `--events` gets the data and stays a FIFO."""
    write_numbers(tmp_path)
    pipeline = process.pipeline()
    os.mkfifo(tmp_path / "results.fifo")
    os.mkfifo(tmp_path / "events.fifo")
    results: list[bytes] = []
    events: list[bytes] = []
    readers = [
        read_fifo(tmp_path / "results.fifo", results),
        read_fifo(tmp_path / "events.fifo", events),
    ]
    run = process(
        "run",
        pipeline,
        "--data",
        "in.jsonl",
        "--output",
        "results.fifo",  # no extension: a FIFO's format defaults to JSON Lines, as stdout's
        "--events",
        "events.fifo",
        "-q",
    )
    for reader in readers:
        reader.join(60)
    assert run.returncode == 0, run.stderr
    assert results == [b"".join(b"%d\n" % number for number in range(6))]
    kinds = [json.loads(line)["kind"] for line in events[0].splitlines()]
    assert kinds[0] == "run_started"
    assert kinds[-1] == "run_finished"
    for name in ("results.fifo", "events.fifo"):
        assert stat.S_ISFIFO(os.lstat(tmp_path / name).st_mode)


def test_dev_stdout_appends_where_stdout_points(process: Pagent, tmp_path: Path) -> None:
    """Promise 13: `--output /dev/stdout` writes through our own stdout (here a file opened for
    appending, which keeps what it held); renaming a temp file over it would lose that."""
    write_numbers(tmp_path)
    pipeline = process.pipeline()
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'"before"\n')
    with open(log, "ab") as appending:
        run = process(
            "run", pipeline, "--data", "in.jsonl", "--output", "/dev/stdout", "-q", stdout=appending
        )
    assert run.returncode == 0, run.stderr
    assert log.read_bytes() == b'"before"\n' + b"".join(b"%d\n" % n for n in range(6))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("gzip") is None, reason="bash")
def test_process_substitution_output(process: Pagent, tmp_path: Path) -> None:
    """Promise 13: `--output >(gzip > out.gz)` (a pipe named /dev/fd/N) is written in place."""
    import gzip

    write_numbers(tmp_path)
    pipeline = process.pipeline()
    command = " ".join(
        [*PAGENT, "run", pipeline, "--data", "in.jsonl", "--output-format", "json", "-q"]
    )
    script = f"{command} --output >(gzip > out.json.gz); status=$?; wait $!; exit $status"
    run = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=process.env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(gzip.decompress((tmp_path / "out.json.gz").read_bytes())) == list(range(6))


KILLED_WRITER = """
import os, signal, sys
from parallel_agent.io import open_writer
writer = open_writer(sys.argv[1], "jsonl").__enter__()
writer.write(list(range(100_000)))
writer.stream.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_temp_file_is_removed_by_the_next_run(
    process: Pagent, tmp_path: Path
) -> None:
    """Promise 13: a writer SIGKILLed mid-write leaves its full-size temp file beside the output;
    the next run removes it. A temp file a live writer holds, and files that are not pagent's,
    are left alone."""
    write_numbers(tmp_path)
    pipeline = process.pipeline()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out.jsonl")],
        env=process.env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    assert (tmp_path / leftovers[0]).stat().st_size > 100_000
    foreign = tmp_path / ".out.jsonl.mine.tmp"
    foreign.write_text("not pagent's")
    live = tmp_path / ".out.jsonl.pagent-live0000.tmp"
    with open(live, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        run = process("run", pipeline, "--data", "in.jsonl", "--output", "out.jsonl", "-q")
        assert run.returncode == 0, run.stderr
        remaining = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert remaining == sorted([foreign.name, live.name])
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(b"%d\n" % n for n in range(6))


# ---- promise 14: values are exact ---------------------------------------------------------------


def big_input(folder: Path, fmt: str) -> str:
    records = [{"n": number, "i": index} for index, number in enumerate(BIG)]
    if fmt == "json":
        text = "[" + ", ".join(json.dumps(record) for record in records) + "]"
    else:
        text = "".join(json.dumps(record) + "\n" for record in records)
    (folder / f"in.{fmt}").write_text(text)
    return f"in.{fmt}"


def read_output(path: Path) -> list[Any]:
    """An output read exactly (Python's json keeps every integer; CSV cells as integers)."""
    text = path.read_text()
    if path.suffix == ".json":
        return list(json.loads(text))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = [line.split(",") for line in text.splitlines()]
    return [{key: int(value) for key, value in zip(rows[0], row, strict=True)} for row in rows[1:]]


@pytest.mark.parametrize("processes", [0, 1])
@pytest.mark.parametrize("out", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_integers_past_64_bits_come_out_exactly(
    pagent: Pagent, tmp_path: Path, fmt: str, out: str, processes: int
) -> None:
    """Promise 14: integers beyond 64 bits read from JSON or JSON Lines, kept in the store,
    passed through worker processes and a shell command, come out unchanged in JSON, JSON Lines
    and CSV (`results` rewrites them the same way from the store)."""
    data = big_input(tmp_path, fmt)
    module = '{use: map, expr: "item"}'
    pipeline = pagent.pipeline(
        f"""
name: exact
task: {{params: {{big: 123456789012345678901234567890}}}}
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 2}}]}}
  - name: work
    dependencies: [split]
    modules: [{module}]
    node_config: {{processes: {processes}}}
  - {{name: cmd, dependencies: [work], modules: [{{use: map, command: cat}}]}}
  - name: more
    dependencies: [cmd]
    modules: [{{use: map, expr: "dict(item, p=params['big'], m=item['n'] * 10**20)"}}]
  - {{name: collect, dependencies: [more], modules: [{{use: aggregate}}]}}
""",
    )
    run = pagent("run", pipeline, "--data", data, "--output", f"out.{out}", "--task-id", "t")
    assert run.returncode == 0, run.stderr
    expected = [
        {"n": number, "i": index, "p": 123456789012345678901234567890, "m": number * 10**20}
        for index, number in enumerate(BIG)
    ]
    assert read_output(tmp_path / f"out.{out}") == expected
    again = pagent("results", "t", "--output", f"again.{out}")
    assert again.returncode == 0, again.stderr
    assert read_output(tmp_path / f"again.{out}") == expected


@pytest.mark.redis
def test_integers_past_64_bits_through_redis(
    pagent: Pagent, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Promise 14: the Redis store keeps big integers (results, failures, an aggregate's sum)."""
    data = big_input(tmp_path, "jsonl")
    store = f"{redis_url}?prefix={redis_prefix.rstrip(':')}"
    pipeline = pagent.pipeline(
        pipeline_text(
            "{use: map, expr: \"item['n'] if item['i'] != 1 else item['x']\"}",
            aggregate=", reduce: sum",
        )
    )
    run = pagent("run", pipeline, "--data", data, "--store", store, "--output", "sum.json")
    assert run.returncode == 1, run.stderr  # record 2 has no 'x'
    assert json.loads((tmp_path / "sum.json").read_text()) == sum(BIG) - BIG[1]
    [task] = json.loads(pagent("list", "--store", store, "--json").stdout)
    failed = pagent("failures", task["task_id"], "--store", store)
    [failure] = [json.loads(line) for line in failed.stdout.splitlines()]
    assert failure["record"] == 2
    assert failure["input"] == {"n": BIG[1], "i": 1}


def test_integers_past_64_bits_through_the_memory_store(pagent: Pagent, tmp_path: Path) -> None:
    """Promise 14: the memory store (`memory://`) keeps big integers too, and `sum` adds them."""
    data = big_input(tmp_path, "jsonl")
    pipeline = pagent.pipeline(
        pipeline_text("{use: map, expr: \"item['n']\"}", aggregate=", reduce: sum")
    )
    run = pagent("run", pipeline, "--data", data, "--store", "memory://", "--output", "sum.json")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "sum.json").read_text()) == sum(BIG)


def test_csv_values_stay_strings(pagent: Pagent, tmp_path: Path) -> None:
    """Promise 14: a CSV's long digit strings stay strings, digit for digit."""
    (tmp_path / "in.csv").write_text("id,zip\n18446744073709551617,02134\n")
    run = pagent("run", pagent.pipeline(), "--data", "in.csv", "--output", "out.csv")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.csv").read_text() == "id,zip\n18446744073709551617,02134\n"


@pytest.mark.parametrize("processes", [0, 1])
@pytest.mark.parametrize(
    "module",
    [
        "{use: map, expr: \"float('nan') if item == 3 else (-float('inf') if item == 4 else item)\"}",
        "{use: map, function: 'steps_for_abuse_io:not_a_number_on_three'}",
    ],
)
def test_nan_and_infinity_from_user_code_are_item_errors(
    pagent: Pagent, tmp_path: Path, module: str, processes: int
) -> None:
    """Promise 14: a NaN or infinity made by an expression or a function fails its item, named by
    record number; it is never written as null."""
    write_numbers(tmp_path)
    pipeline = pagent.pipeline(pipeline_text(module, config=f", processes: {processes}"))
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json", "--json", "-q")
    assert run.returncode == 1, run.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == [0, 1, 2, 5]
    task_id = json.loads(run.stdout)["task_id"]
    failed = [json.loads(line) for line in pagent("failures", task_id).stdout.splitlines()]
    assert [(f["record"], f["input"]) for f in failed] == [(4, 3), (5, 4)]
    assert all("NaN or infinite" in f["error"] for f in failed)


def test_an_aggregate_that_makes_nan_is_an_error(pagent: Pagent, tmp_path: Path) -> None:
    """Promise 14: an aggregate expression that yields NaN is an error naming the node."""
    write_numbers(tmp_path)
    pipeline = pagent.pipeline(pipeline_text(aggregate=", expr: \"float('nan')\""))
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json")
    one_error(run, 2, "node 'collect'", "NaN or infinity")
    assert not (tmp_path / "out.json").exists()


# ---- promise 15: limits hold --------------------------------------------------------------------

LIMIT = 100


@pytest.mark.parametrize("processes", [0, 1])
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_record_one_byte_past_the_maximum_is_a_located_error(
    pagent: Pagent, tmp_path: Path, fmt: str, processes: int
) -> None:
    """Promise 15: with `max_record_size: 100`, a record of exactly 100 bytes is read and one of
    101 bytes is exit 3, naming its line and record (the default, 64 MiB, works the same way)."""
    fits = json.dumps("x" * (LIMIT - 2))
    past = json.dumps("y" * (LIMIT - 1))
    assert (len(fits), len(past)) == (LIMIT, LIMIT + 1)
    split = f", max_record_size: {LIMIT}"
    split_config = f", node_config: {{processes: {processes}}}"
    pipeline = pagent.pipeline(pipeline_text(split=split, split_config=split_config))
    if fmt == "jsonl":
        good, bad = f"1\n{fits}\n", f"1\n{fits}\n{past}\n"
        where = "line 3, record 3"
    else:
        good, bad = f"[1,{fits}]", f"[1,{fits},{past}]"
        where = "line 1, column 105, record 3"
    (tmp_path / f"good.{fmt}").write_text(good)
    (tmp_path / f"bad.{fmt}").write_text(bad)
    fine = pagent("run", pipeline, "--data", f"good.{fmt}", "--output", "out.jsonl")
    assert fine.returncode == 0, fine.stderr
    assert (tmp_path / "out.jsonl").read_text() == f"1\n{fits}\n"
    refused = pagent("run", pipeline, "--data", f"bad.{fmt}", "--output", "bad-out.jsonl")
    one_error(refused, 3, f"bad.{fmt}, {where}: record longer than the maximum record size (100")
    assert not (tmp_path / "bad-out.jsonl").exists()


@pytest.mark.parametrize("processes", [0, 2])
def test_json_lines_nested_too_deep_is_refused_at_read_time(
    pagent: Pagent, tmp_path: Path, processes: int
) -> None:
    """Promise 15: a JSON Lines record nested 300 deep (more than the 254 levels JSON output can
    hold) is exit 3 at read time with its line, as JSON input is; 254 levels are read."""
    (tmp_path / "deep.jsonl").write_text("1\n" + "[" * 300 + "]" * 300 + "\n2\n")
    (tmp_path / "ok.jsonl").write_text("1\n" + "[" * 254 + "]" * 254 + "\n")
    pipeline = pagent.pipeline(
        pipeline_text(split_config=f", node_config: {{processes: {processes}}}")
    )
    refused = pagent("run", pipeline, "--data", "deep.jsonl", "--output", "out.jsonl")
    one_error(refused, 3, "deep.jsonl, line 2, column 1, record 2: nested deeper than 254 levels")
    fine = pagent("run", pipeline, "--data", "ok.jsonl", "--output", "out.jsonl")
    assert fine.returncode == 0, fine.stderr
    (tmp_path / "deep.json").write_text("[1, " + "[" * 300 + "]" * 300 + ", 2]")
    as_json = pagent("run", pipeline, "--data", "deep.json", "--output", "out.jsonl")
    one_error(as_json, 3, "deep.json, record 2: nested deeper than 254 levels")


# ---- small rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_a_zero_byte_input_is_exit_3_in_every_format(
    pagent: Pagent, tmp_path: Path, fmt: str
) -> None:
    """Promise 13: an empty file (an upstream step that wrote nothing) is never a successful run
    over nothing: exit 3 in every format, from a file and from stdin."""
    (tmp_path / f"empty.{fmt}").write_bytes(b"")
    pipeline = pagent.pipeline()
    one_error(pagent("run", pipeline, "--data", f"empty.{fmt}"), 3, "empty input")
    piped = pagent("run", pipeline, "--data", "-", "--format", fmt, stdin=b"")
    one_error(piped, 3, "empty input")


@pytest.mark.parametrize(("name", "text"), [("empty.json", "[]"), ("header.csv", "id,name\n")])
def test_an_empty_array_and_a_header_only_csv_are_zero_records(
    pagent: Pagent, tmp_path: Path, name: str, text: str
) -> None:
    (tmp_path / name).write_text(text)
    run = pagent("run", pagent.pipeline(), "--data", name, "--output", "out.jsonl", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["items"]["total"] == 0
    assert (tmp_path / "out.jsonl").read_bytes() == b""


BAD_IDS = ["", "../x", "a\nb", ".hidden", "a/b", "x" * 129, "sp ace", "é"]


def test_task_ids_outside_the_allowed_characters_are_refused(
    pagent: Pagent, tmp_path: Path
) -> None:
    """Task ids match [A-Za-z0-9._-]{1,128} and do not start with '.': any other is exit 2, for
    `run --task-id` and every command that takes an id; 128 characters are fine."""
    write_numbers(tmp_path)
    pipeline = pagent.pipeline()
    for task_id in BAD_IDS:
        one_error(pagent("run", pipeline, "--data", "in.jsonl", "--task-id", task_id), 2, "task id")
        for command in ("status", "results", "failures", "resume", "cancel"):
            one_error(pagent(command, task_id), 2, "invalid task id")
    assert pagent.runs() == []
    longest = "a." + "x" * 126
    run = pagent("run", pipeline, "--data", "in.jsonl", "--task-id", longest, "-q")
    assert run.returncode == 0, run.stderr
    assert pagent("status", longest).returncode == 0


def test_a_string_where_a_number_belongs_is_a_located_error(pagent: Pagent, tmp_path: Path) -> None:
    """`chunk_size: "3"` is refused like `name: 5` (no string is taken for a number), by
    `validate` and by `run`, located in the file."""
    write_numbers(tmp_path)
    pipeline = pagent.pipeline(pipeline_text().replace("chunk_size: 2", 'chunk_size: "3"'))
    for result in (pagent("validate", pipeline), pagent("run", pipeline, "--data", "in.jsonl")):
        one_error(result, 2, "pipeline.yaml, line 4", "chunk_size: must be an integer")
