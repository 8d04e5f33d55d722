"""Issue 12: group-by with named mergeable reducers, partials per chunk (in the worker processes
with `processes: N`), checked against a plain-Python computation of the same figures.

RELIABILITY promise: exit 0 means the output is right; every record counted exactly once, also
across SIGKILL and resume.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from parallel_agent.cli import app

TESTS = Path(__file__).resolve().parent
CITIES = ["Zürich", "東京", "São Paulo", "Kraków", "", "naïve 🐍"]

COMPUTE = """
        n: count
        amounts: {count: amount}
        total: {sum: amount}
        avg: {mean: amount}
        lo: {min: amount}
        hi: {max: amount}
        first_name: {first: name}
        last_name: {last: name}
        names: {count_distinct: name}
        big: {sum: big}
        heavy: {count_if: "item.get('amount') is not None and item['amount'] > 50"}
        some: {collect: name, limit: 3}
        doubled: {sum: {expr: "item['big'] * 2 if item.get('big') is not None else None"}}
        squares: {function: "steps_for_grouping:SquareSum"}
        middle: {function: "steps_for_grouping:median", field: amount}
"""


def pipeline_text(
    chunk_size: int, processes: int = 0, map_function: str = "", extra: str = ""
) -> str:
    work = f'function: "{map_function}"' if map_function else 'expr: "item"'
    return f"""
name: grouping
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk_size}}}]}}
  - name: work
    dependencies: [split]
    modules: [{{use: map, {work}}}]
    node_config: {{processes: {processes}, lease: 2, retry_delay: 0.05}}
  - name: by_city
    dependencies: [work]
    modules:
    - use: aggregate
      group_by: city
{extra}      compute:{COMPUTE}"""


def generate(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Unicode keys, missing fields, nulls, floats and ints whose sum passes 64 bits."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        row: dict[str, Any] = {"id": i, "name": rng.choice(["ann", "bo", "cy", "dé", "eve"])}
        if rng.random() < 0.9:
            row["city"] = rng.choice(CITIES)
        choice = rng.random()
        if choice < 0.1:
            row["amount"] = None
        elif choice < 0.2:
            pass  # missing
        elif choice < 0.6:
            row["amount"] = rng.randint(-100, 200)
        else:
            row["amount"] = rng.uniform(-100, 200)
        if rng.random() < 0.8:
            row["big"] = rng.randint(2**61, 2**62)
        rows.append(row)
    return rows


def expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same figures by hand, in plain Python: groups in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row.get("city"), ensure_ascii=False), []).append(row)
    out = []
    for key, members in groups.items():
        amounts = [r["amount"] for r in members if r.get("amount") is not None]
        names = [r["name"] for r in members]
        bigs = [r["big"] for r in members if r.get("big") is not None]
        exact = sum(Fraction(a) for a in amounts)
        has_float = any(isinstance(a, float) for a in amounts)
        ordered = sorted(amounts)
        mid = len(ordered) // 2
        out.append(
            {
                "city": json.loads(key),
                "n": len(members),
                "amounts": len(amounts),
                "total": (float(exact) if has_float else int(exact)) if amounts else None,
                "avg": float(exact / len(amounts)) if amounts else None,
                "lo": min(amounts) if amounts else None,
                "hi": max(amounts) if amounts else None,
                "first_name": names[0],
                "last_name": names[-1],
                "names": len(set(names)),
                "big": sum(bigs) if bigs else None,
                "heavy": sum(1 for a in amounts if a > 50),
                "some": names[:3],
                "doubled": sum(b * 2 for b in bigs) if bigs else None,
                "squares": {"squares": sum(round(a) ** 2 for a in amounts)},
                "middle": (
                    ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
                ),
            }
        )
    return out


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PAGENT_STORE", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.syspath_prepend(str(TESTS))
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def write_input(tmp_path: Path, rows: list[dict[str, Any]]) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_group_by_equals_plain_python_for_every_chunk_size(
    cli: Any, tmp_path: Path, chunk_size: int
) -> None:
    rows = generate(400)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(pipeline_text(chunk_size))
    out = tmp_path / "out.json"
    result = cli(
        "run", str(pipeline), "--data", write_input(tmp_path, rows), "--output", str(out), "--json"
    )
    assert result.exit_code == 0, result.stderr
    got = json.loads(out.read_text())
    assert got == expected(rows)
    assert max(row["big"] for row in got) > 2**64  # exact past 64 bits, not a float
    summary = json.loads(result.stdout)
    missing = sum(1 for r in rows if r.get("amount") is None)
    assert (
        f"compute 'total' (sum) skipped {missing} record(s) where 'amount' was missing or null"
        in " ".join(summary["notices"])
    )
    assert any("compute 'some' (collect) kept the first 3 values" in n for n in summary["notices"])


def test_group_by_in_worker_processes_with_a_filter(cli: Any, tmp_path: Path) -> None:
    """`processes: 2`: the partials are computed in the worker processes."""
    rows = generate(300, seed=3)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        pipeline_text(13, processes=2).replace(
            '{use: map, expr: "item"}', "{use: filter, expr: \"item['id'] % 3 != 0\"}"
        )
    )
    out = tmp_path / "out.jsonl"
    result = cli("run", str(pipeline), "--data", write_input(tmp_path, rows), "--output", str(out))
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == expected([r for r in rows if r["id"] % 3 != 0])


def test_several_keys_expressions_sort_and_top(cli: Any, tmp_path: Path) -> None:
    rows = generate(200, seed=5)
    text = """
name: top
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 9}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item"}]}
  - name: top_pairs
    dependencies: [work]
    modules:
    - use: aggregate
      group_by: {name: "item['name']", odd: "record % 2 == 1"}
      compute: {n: count, total: {sum: id}}
      sort_by: [n, total]
      descending: true
      top: 4
"""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text)
    out = tmp_path / "out.csv"
    result = cli("run", str(pipeline), "--data", write_input(tmp_path, rows), "--output", str(out))
    assert result.exit_code == 0, result.stderr
    groups: dict[tuple[str, bool], list[int]] = {}
    for number, row in enumerate(rows, start=1):
        groups.setdefault((row["name"], number % 2 == 1), []).append(row["id"])
    want = sorted(
        ({"name": k[0], "odd": k[1], "n": len(v), "total": sum(v)} for k, v in groups.items()),
        key=lambda r: (r["n"], r["total"]),
        reverse=True,
    )[:4]
    with out.open(newline="", encoding="utf-8") as handle:
        got = list(csv.DictReader(handle))
    assert [list(row) for row in got][0] == ["name", "odd", "n", "total"]
    assert got == [
        {
            "name": r["name"],
            "odd": str(r["odd"]).lower(),
            "n": str(r["n"]),
            "total": str(r["total"]),
        }
        for r in want
    ]


def test_global_compute_without_group_by(cli: Any, tmp_path: Path) -> None:
    rows = generate(50)
    text = pipeline_text(4).replace("      group_by: city\n", "")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text)
    out = tmp_path / "out.json"
    result = cli("run", str(pipeline), "--data", write_input(tmp_path, rows), "--output", str(out))
    assert result.exit_code == 0, result.stderr
    want = expected([{**r, "city": None} for r in rows])[0]
    del want["city"]
    assert json.loads(out.read_text()) == [want]


def test_a_reducer_error_names_the_record(cli: Any, tmp_path: Path) -> None:
    rows = [{"city": "a", "amount": 1}, {"city": "a", "amount": "x"}]
    text = """
name: bad
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 1}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item"}], node_config: {max_retries: 0}}
  - name: agg
    dependencies: [work]
    modules: [{use: aggregate, group_by: city, compute: {total: {sum: amount}}}]
"""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text)
    result = cli("run", str(pipeline), "--data", write_input(tmp_path, rows), "--json")
    assert result.exit_code == 1
    assert (
        "compute 'total' (sum) on records 2-2: TypeError: needs numbers, got str" in result.stderr
    )


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ("{n: {median: x}}", "compute 'n': name exactly one reducer of count"),
        ("{n: {sum: x, limit: 3}}", "compute 'n': unknown key 'limit'"),
        ("{n: {count_if: 'item +'}}", "compute 'n' (count_if)"),
        ("{n: {function: 'steps_for_grouping:nothing_here'}}", "nothing_here"),
    ],
)
def test_bad_reducers_are_refused_before_running(
    cli: Any, tmp_path: Path, compute: str, message: str
) -> None:
    text = f"""
name: bad
nodes:
  - {{name: split, type: planner, modules: [{{use: split}}]}}
  - {{name: work, dependencies: [split], modules: [{{use: map, expr: "item"}}]}}
  - {{name: agg, dependencies: [work], modules: [{{use: aggregate, group_by: a, compute: {compute}}}]}}
"""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text)
    result = cli("validate", str(pipeline))
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr


def test_partials_are_committed_with_their_chunks(tmp_path: Path) -> None:
    """The aggregate merges the partials stored with each chunk: none is recomputed from results."""
    import asyncio

    from parallel_agent.store import open_store

    rows = generate(60)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(pipeline_text(10))
    env = {**os.environ, "PAGENT_STORE": f"sqlite:///{tmp_path / 's.db'}", "PYTHONPATH": str(TESTS)}
    subprocess.run(
        [sys.executable, "-m", "parallel_agent", "run", str(pipeline), "--data",
         write_input(tmp_path, rows), "--task-id", "t", "--quiet"],
        env=env, check=True, timeout=60,
    )  # fmt: skip

    async def partials() -> list[dict[str, Any]]:
        store = open_store(env["PAGENT_STORE"])
        await store.open()
        try:
            return [json.loads(r.partial) async for r in store.results("t", "work")]
        finally:
            await store.close()

    found = asyncio.run(partials())
    assert len(found) == 6
    assert all(set(p) == {"by_city"} for p in found)
    assert sum(n for p in found for _, states in p["by_city"]["groups"] for n in states[:1]) == 60


# -- crashes ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    redis_url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    return f"{redis_url}?prefix={prefix}"


@pytest.mark.fault
@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize("seed", range(2))
def test_sigkill_then_resume_counts_no_partial_twice(
    tmp_path: Path, store_url: str, processes: int, seed: int
) -> None:
    rows = generate(300, seed=seed)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        pipeline_text(10, processes, map_function="steps_for_tests:ledger_identity")
    )
    ledger = tmp_path / "ledger.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PAGENT_LEDGER": str(ledger),
        "PAGENT_LEDGER_SLEEP": "0.004",
        "PAGENT_STORE": store_url,
    }
    out = tmp_path / "out.json"
    data = write_input(tmp_path, rows)
    command = [sys.executable, "-m", "parallel_agent"]
    proc = subprocess.Popen(
        [*command, "run", str(pipeline), "--data", data, "--output", str(out), "--task-id", "k", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ledger.exists() or len(ledger.read_text().split()) < 60 + seed * 80:
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended before the kill"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert not out.exists()
    resumed = subprocess.run(
        [*command, "resume", "k", "--quiet"], env=env, capture_output=True, timeout=120, check=False
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    executions = len(ledger.read_text().split())
    print(f"records executed {executions} times for {len(rows)} records")  # > : chunks re-ran
    assert json.loads(out.read_text()) == expected(rows)


def test_partials_are_computed_in_the_worker_processes(cli: Any, tmp_path: Path) -> None:
    """With `processes: 2` each chunk's partial is computed where the chunk is processed, not in
    the coordinating process (which only merges)."""
    rows = [{"city": "a", "id": i} for i in range(40)]
    text = """
name: where
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 5}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item"}], node_config: {processes: 2}}
  - name: agg
    dependencies: [work]
    modules: [{use: aggregate, group_by: city, compute: {pids: {function: "steps_for_grouping:Pids"}}}]
"""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text)
    out = tmp_path / "out.json"
    result = cli("run", str(pipeline), "--data", write_input(tmp_path, rows), "--output", str(out))
    assert result.exit_code == 0, result.stderr
    [row] = json.loads(out.read_text())
    assert row["pids"] and os.getpid() not in row["pids"]
