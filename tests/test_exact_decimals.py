"""Numbers a double cannot hold as written (`3.141592653589793238462643`, `1e400`, `1e-400`,
`123456789012345678.5`), each run end to end through the `pagent` command: read from JSON and
JSON Lines as Decimals, kept in the store (SQLite, memory, Redis), passed through worker
processes, computed on exactly in expressions and reducers, and written back with the value they
came in with (JSON, JSON Lines, CSV). A computation that cannot stay exact (a float mixed in, a
quotient that does not end) is an error naming the record, never a rounded number.
RELIABILITY.md promise 14: values are exact.
"""

from __future__ import annotations

import decimal
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_abuse_io import Pagent, one_error

#: Texts a double changes (rounds, makes 0 or refuses) next to ones it keeps (shortest forms).
NUMBERS = [
    "3.141592653589793238462643",
    "0.10000000000000000000001",
    "1e400",
    "-1e-400",
    "123456789012345678.5",
    "4.9e-324",
    "0.30000000000000004",
    "2.5",
]


@pytest.fixture(autouse=True)
def exact_arithmetic() -> Iterator[None]:
    """The test's own Decimal arithmetic (expected values) without rounding."""
    with decimal.localcontext() as context:
        context.prec = 10_000
        yield


@pytest.fixture
def pagent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pagent:
    return Pagent(tmp_path, monkeypatch)


def write_input(folder: Path, fmt: str, texts: list[str] = NUMBERS) -> str:
    """Records {"i": index, "x": number} with each number exactly as written in `texts`."""
    records = [f'{{"i": {index}, "x": {text}}}' for index, text in enumerate(texts)]
    body = "[" + ",\n".join(records) + "]" if fmt == "json" else "\n".join(records) + "\n"
    (folder / f"in.{fmt}").write_text(body)
    return f"in.{fmt}"


def read_exactly(path: Path) -> list[dict[str, Any]]:
    """An output with every number as a Decimal of its text (CSV cells as written)."""
    text = path.read_text()
    if path.suffix == ".csv":
        rows = [line.split(",") for line in text.splitlines()]
        return [
            {key: Decimal(value) for key, value in zip(rows[0], row, strict=True)}
            for row in rows[1:]
        ]
    exact = {"parse_float": Decimal, "parse_int": Decimal}
    if path.suffix == ".json":
        return list(json.loads(text, **exact))
    return [json.loads(line, **exact) for line in text.splitlines()]


#: The numbers of NUMBERS that a double holds as written: they stay floats, float arithmetic.
DOUBLES = {"0.30000000000000004", "2.5"}


def expected(texts: list[str] = NUMBERS) -> list[dict[str, Decimal]]:
    """What the pipeline below makes of each record: exact decimal arithmetic on the numbers a
    double cannot hold, float arithmetic on the others (as Python computes either)."""
    rows = []
    for index, text in enumerate(texts):
        if text in DOUBLES:
            number = float(text)
            twice, after = Decimal(repr(number * 2)), Decimal(repr(number + 1))
        else:
            twice, after = Decimal(text) * 2, Decimal(text) + 1
        rows.append({"i": Decimal(index), "x": Decimal(text), "twice": twice, "next": after})
    return rows


PIPELINE = """
name: exact
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 3}}]}}
  - name: same
    dependencies: [split]
    modules: [{{use: map, expr: "item"}}]
    node_config: {{processes: {processes}}}
  - name: sums
    dependencies: [same]
    modules: [{{use: map, expr: "dict(item, twice=item['x'] * 2, next=item['x'] + 1)"}}]
    node_config: {{processes: {processes}}}
  - {{name: collect, dependencies: [sums], modules: [{{use: aggregate}}]}}
"""


def run_exact(
    pagent: Pagent, fmt: str, out: str, processes: int, *store: str
) -> list[dict[str, Any]]:
    data = write_input(pagent.folder, fmt)
    pipeline = pagent.pipeline(PIPELINE.format(processes=processes))
    run = pagent(
        "run", pipeline, "--data", data, "--output", f"out.{out}", "--task-id", "t", *store
    )
    assert run.returncode == 0, run.stderr
    again = pagent("results", "t", "--output", f"again.{out}", *store)
    assert again.returncode == 0, again.stderr
    assert read_exactly(pagent.folder / f"again.{out}") == read_exactly(
        pagent.folder / f"out.{out}"
    )
    return read_exactly(pagent.folder / f"out.{out}")


@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize("out", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_numbers_a_double_cannot_hold_come_out_exactly(
    pagent: Pagent, fmt: str, out: str, processes: int
) -> None:
    """Promise 14: each number comes out with the value it was written with, passed unchanged
    by one map and doubled and incremented exactly by another, in-process and in worker
    processes, from the SQLite store (the run and `results` alike)."""
    assert run_exact(pagent, fmt, out, processes) == expected()


@pytest.mark.parametrize("processes", [0, 2])
def test_numbers_a_double_cannot_hold_through_the_memory_store(
    pagent: Pagent, processes: int
) -> None:
    """Promise 14: the memory store keeps Decimals exactly too."""
    data = write_input(pagent.folder, "jsonl")
    pipeline = pagent.pipeline(PIPELINE.format(processes=processes))
    run = pagent("run", pipeline, "--data", data, "--output", "out.jsonl", "--store", "memory://")
    assert run.returncode == 0, run.stderr
    assert read_exactly(pagent.folder / "out.jsonl") == expected()


@pytest.mark.redis
@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_numbers_a_double_cannot_hold_through_redis(
    pagent: Pagent, redis_url: str, redis_prefix: str, fmt: str, processes: int
) -> None:
    """Promise 14: the Redis store keeps Decimals exactly (the run and `results`)."""
    store = f"{redis_url}?prefix={redis_prefix.rstrip(':')}"
    assert run_exact(pagent, fmt, "jsonl", processes, "--store", store) == expected()


def test_the_ordinary_doubles_stay_floats(pagent: Pagent) -> None:
    """Promise 14: a number a double holds as written stays a float (user code sees a float),
    one it cannot hold is a Decimal; `type` is what an expression sees."""
    write_input(pagent.folder, "jsonl")
    pipeline = pagent.pipeline(
        PIPELINE.format(processes=0).replace(
            "dict(item, twice=item['x'] * 2, next=item['x'] + 1)",
            "isinstance(item['x'], float)",
        )
    )
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json")
    assert run.returncode == 0, run.stderr
    floats = json.loads((pagent.folder / "out.json").read_text())
    assert floats == [False, False, False, False, False, False, True, True]


@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize(
    ("expr", "message", "floats"),
    [
        (
            "item['x'] * 1.5",
            "unsupported operand type(s) for *: 'decimal.Decimal' and 'float'",
            [0.5 * 1.5, 1.5 * 1.5],
        ),
        ("item['x'] / 3", "the Decimal result would be rounded", [0.5 / 3, 1.5 / 3]),
        (
            "item['x'] ** 0.5",
            "a Decimal to a power that is not an integer cannot be exact",
            [0.5**0.5, 1.5**0.5],
        ),
    ],
)
def test_arithmetic_that_cannot_stay_exact_is_an_item_error(
    pagent: Pagent, expr: str, message: str, floats: list[float], processes: int
) -> None:
    """Promise 14: mixing a Decimal with a float, or a Decimal quotient that does not end, fails
    that record by number, never rounding silently; the floats around it are computed as ever,
    and float() is the explicit way to compute approximately."""
    write_input(pagent.folder, "jsonl", ["0.5", "3.141592653589793238462643", "1.5"])
    module = f'{{use: map, expr: "{expr}"}}'
    text = f"""
name: mixed
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 2}}]}}
  - name: work
    dependencies: [split]
    modules: [{module}]
    node_config: {{max_retries: 0, processes: {processes}}}
  - {{name: collect, dependencies: [work], modules: [{{use: aggregate}}]}}
"""
    pipeline = pagent.pipeline(text)
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json", "--json", "-q")
    assert run.returncode == 1, run.stderr
    task_id = json.loads(run.stdout)["task_id"]
    listed = pagent("failures", task_id).stdout.splitlines()
    failed = [json.loads(line, parse_float=Decimal) for line in listed]
    assert [failure["record"] for failure in failed] == [2]
    assert message in failed[0]["error"], failed[0]["error"]
    assert failed[0]["input"] == {"i": 1, "x": Decimal("3.141592653589793238462643")}
    assert json.loads((pagent.folder / "out.json").read_text()) == floats


def test_float_is_the_explicit_way_to_round(pagent: Pagent) -> None:
    """Promise 14: `float(...)` and `round(...)` round because they are asked to; nothing else
    does."""
    write_input(pagent.folder, "jsonl", ["3.141592653589793238462643"])
    pipeline = pagent.pipeline(
        PIPELINE.format(processes=0).replace(
            "dict(item, twice=item['x'] * 2, next=item['x'] + 1)",
            "[float(item['x']) * 1.5, round(item['x'], 3), item['x'] * 1]",
        )
    )
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json")
    assert run.returncode == 0, run.stderr
    assert (pagent.folder / "out.json").read_text().replace(" ", "").replace("\n", "") == (
        "[[4.71238898038469,3.142,3.141592653589793238462643]]"
    )


GROUPED = """
name: grouped
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk}}}]}}
  - name: work
    dependencies: [split]
    modules: [{{use: map, expr: "item"}}]
    node_config: {{processes: {processes}, max_retries: 0}}
  - name: agg
    dependencies: [work]
    modules:
      - use: aggregate
        group_by: g
        compute: {{n: count, total: {{sum: x}}, avg: {{mean: x}}, low: {{min: x}}, high: {{max: x}}}}
"""


@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize("chunk", [1, 2, 10])
def test_reducers_add_decimals_exactly(pagent: Pagent, chunk: int, processes: int) -> None:
    """Promise 14: sum and mean of Decimals and integers are exact whatever the chunking (a mean
    that does not end is rounded to 34 digits at least); min and max return the value itself."""
    texts = ["3.141592653589793238462643", "1", "0.10000000000000000000001", "1e400", "2"]
    groups = ["a", "a", "a", "b", "b"]
    lines = [f'{{"g": "{g}", "x": {x}}}' for g, x in zip(groups, texts, strict=True)]
    (pagent.folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    pipeline = pagent.pipeline(GROUPED.format(chunk=chunk, processes=processes))
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json")
    assert run.returncode == 0, run.stderr
    rows = read_exactly(pagent.folder / "out.json")
    a_total = Decimal("4.241592653589793238462653")
    b_total = Decimal("1e400") + 2
    assert rows == [
        {
            "g": "a",
            "n": 3,
            "total": a_total,
            "avg": Decimal("1.41386421786326441282088433333333333333333333"),  # 45 digits
            "low": Decimal("0.10000000000000000000001"),
            "high": Decimal("3.141592653589793238462643"),
        },
        {
            "g": "b",
            "n": 2,
            "total": b_total,
            "avg": b_total / 2,
            "low": 2,
            "high": Decimal("1e400"),
        },
    ]


@pytest.mark.parametrize("chunk", [1, 10])
def test_a_sum_of_floats_and_decimals_is_an_error(pagent: Pagent, chunk: int) -> None:
    """Promise 14: a group that mixes floats and Decimals has no exact sum: pagent says so
    (exit 1), when merging chunks' sums and within one chunk alike, instead of rounding one
    kind to the other."""
    lines = ['{"g": "a", "x": 0.5}', '{"g": "a", "x": 3.141592653589793238462643}']
    (pagent.folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    pipeline = pagent.pipeline(GROUPED.format(chunk=chunk, processes=0))
    run = pagent("run", pipeline, "--data", "in.jsonl", "--output", "out.json")
    assert run.returncode == 1, run.stderr
    assert "cannot add floats and Decimals without rounding" in run.stderr.decode()
    out = pagent.folder / "out.json"  # no row with a rounded total, if any output at all
    assert not out.exists() or json.loads(out.read_text()) == []


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_an_exponent_past_what_a_decimal_holds_is_a_located_error(pagent: Pagent, fmt: str) -> None:
    """Promise 14: a number no Decimal holds is refused where it is, never read as 0 or inf."""
    write_input(pagent.folder, fmt, ["1.5", "1e999999999999999999999"])
    run = pagent("run", pagent.pipeline(PIPELINE.format(processes=0)), "--data", f"in.{fmt}")
    one_error(run, 3, f"in.{fmt}", "line 2", "record 2", "exponent out of range")


SPLIT_FED = """
name: split-fed
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk}}}]}}
  - name: agg
    dependencies: [split]
    modules:
      - use: aggregate
        group_by: g
        compute: {{total: {{sum: x}}, high: {{max: x}}, seen: {{collect: x}}}}
"""


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("chunk", [1, 10])
def test_an_aggregate_fed_by_the_split_reads_decimals_exactly(
    pagent: Pagent, fmt: str, chunk: int
) -> None:
    """Promise 14: a compute aggregate reading the split directly (its partials computed where
    the split checks each chunk) sums, compares and collects the exact values."""
    texts = ["3.141592653589793238462643", "1e400", "-1e-400", "2"]
    records = [f'{{"g": "a", "x": {text}}}' for text in texts]
    body = "[" + ",".join(records) + "]" if fmt == "json" else "\n".join(records) + "\n"
    (pagent.folder / f"in.{fmt}").write_text(body)
    pipeline = pagent.pipeline(SPLIT_FED.format(chunk=chunk))
    run = pagent("run", pipeline, "--data", f"in.{fmt}", "--output", "out.json")
    assert run.returncode == 0, run.stderr
    values = [Decimal(text) for text in texts]
    assert read_exactly(pagent.folder / "out.json") == [
        {"g": "a", "total": sum(values), "high": Decimal("1e400"), "seen": values}
    ]
