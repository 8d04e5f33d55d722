"""What exact numbers cost on ordinary data, and how reading scales with a record's length.

    .venv/bin/python bench/exact_values.py [--records 200000] [--rounds 5] [--max-mb 64]

1. Ordinary data, in three kinds: short numbers (prices, counts: nothing to check beyond the
   scan), machine floats (17-digit shortest forms and 16-digit integers: the scan flags them,
   orjson writes them back to compare) and, for reference, data holding numbers a double
   cannot hold (read exactly, as Decimals). Each step of the exact codec next to the same step
   done the way it was before (orjson alone, which rounds big integers and long decimals),
   measured in the same run, rounds interleaved, best round counts.
2. One record of 8 to `--max-mb` MiB (JSON Lines and JSON): the reader's time next to a plain
   `orjson.loads` of the same bytes (linear by construction); a flat ratio means the reader is
   linear in the record's length.

Nothing asserts on time; the figures are for reading.
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from parallel_agent import jsonl
from parallel_agent.io import read_chunks
from parallel_agent.io import readers as readers_module


def before_decode(data: bytes) -> list[Any]:
    """`decode_lines` before exact integers: one orjson parse of the lines as an array."""
    body = data[:-1] if data.endswith(b"\n") else data
    return list(orjson.loads(b"[" + body.replace(b"\n", b",") + b"]"))


def before_encode(values: list[Any]) -> bytes:
    """`encode_lines` before exact integers and the NaN check."""
    return b"".join([orjson.dumps(value) + b"\n" for value in values])


def before_check(payload: bytes) -> int | None:
    """`check_jsonl` before the nesting check: every line parsed by orjson, values dropped."""
    lines = (payload[:-1] if payload.endswith(b"\n") else payload).split(b"\n")
    try:
        collections.deque(map(orjson.loads, lines), maxlen=0)
    except orjson.JSONDecodeError:
        return 0
    return None


def short_numbers(count: int) -> bytes:
    """Prices with two decimals, counts and ids: no run of 16 digits, no long exponent."""
    pick = random.Random(7)
    return before_encode(
        [
            {
                "id": index,
                "price": pick.randint(0, 10**6) / 100,
                "qty": pick.randint(1, 50),
                "name": f"item-{index}",
                "tags": ["a", "b"],
                "nested": {"n": pick.randint(-(10**9), 10**9), "ok": index % 2 == 0},
            }
            for index in range(count)
        ]
    )


def with_decimals(count: int) -> bytes:
    """Machine floats plus, in every record, a 25-digit decimal no double holds."""
    lines = machine_floats(count).split(b"\n")[:-1]
    return b"".join(
        line[:-1] + b',"exact":3.14159265358979323846%05d}\n' % index
        for index, line in enumerate(lines)
    )


def machine_floats(count: int) -> bytes:
    return before_encode(ordinary(count))


def ordinary(count: int) -> list[dict[str, Any]]:
    pick = random.Random(7)
    return [
        {
            "id": index,
            "ts": 1_733_450_000_000 + index,  # 13 digits: a millisecond timestamp
            "score": pick.random() * 1000,
            "name": f"user-{index}",
            "tags": ["a", "b"],
            "nested": {"n": pick.randint(-(10**15), 10**15), "ok": index % 2 == 0},
        }
        for index in range(count)
    ]


def best(step: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def read_all(data: bytes, fmt: str) -> int:
    reader = read_chunks(io.BytesIO(data), fmt, 1000)
    return sum(chunk.count for chunk in reader.payload_chunks())


def codec_table(records: int, rounds: int, kind: str, make: Callable[[int], bytes]) -> None:
    lines = make(records)
    values = jsonl.decode_lines(lines)
    array = b"[" + lines[:-1].replace(b"\n", b",") + b"]"
    exact = kind == "decimals"  # orjson alone rounds these: nothing to compare with
    assert exact or jsonl.decode_lines(lines) == before_decode(lines) == values
    assert exact or jsonl.encode_lines(values) == (lines, [])

    def json_reader_before() -> int:
        saved = readers_module.loads
        readers_module.loads = orjson.loads  # the exact-integer detour off: the reader as before
        try:
            return read_all(array, "json")
        finally:
            readers_module.loads = saved

    # What the store holds: chunks of 1,000 records.
    parts = [values[start : start + 1000] for start in range(0, len(values), 1000)]
    chunks = [jsonl.encode_lines(part)[0] for part in parts]
    floats = [
        [orjson.loads(orjson.dumps(value, default=float)) for value in part] for part in parts
    ]
    steps = [
        (
            "check JSON Lines input (split)",
            lambda: [before_check(chunk) for chunk in chunks],
            lambda: [jsonl.check_jsonl(chunk) for chunk in chunks],
        ),
        (
            "decode stored chunks",
            lambda: [before_decode(chunk) for chunk in chunks],
            lambda: [jsonl.decode_lines(chunk) for chunk in chunks],
        ),
        (
            "encode chunk results",
            lambda: [before_encode(part) for part in floats],
            lambda: [jsonl.encode_lines(part) for part in parts],
        ),
        ("read a JSON array", json_reader_before, lambda: read_all(array, "json")),
        (
            "whole run (JSON Lines, map expr)",
            lambda: whole_run(lines, exact=False),
            lambda: whole_run(lines, exact=True),
        ),
    ]
    print()
    print(f"## {kind}: {records:,} records, {len(lines) / 1e6:.1f} MB")
    print("| step | before (orjson alone) | now (exact) | now / before |")
    print("|---|---:|---:|---:|")
    for name, old, new in steps:
        timings = {"old": [], "new": []}  # interleaved rounds: the machine's noise hits both
        for _ in range(rounds):
            timings["old"].append(best(old, 1))
            timings["new"].append(best(new, 1))
        before, now = min(timings["old"]), min(timings["new"])
        print(f"| {name} | {before * 1000:.1f} ms | {now * 1000:.1f} ms | {now / before:.2f} |")


def whole_run(lines: bytes, *, exact: bool) -> None:
    """`pagent run` in this process (memory store, no display) over `lines`; `exact=False` runs
    it with every detour of exact numbers and the NaN and nesting checks switched off."""
    import tempfile

    from parallel_agent.app import RunOptions, run_pipeline
    from parallel_agent.modules import chunks as chunks_module

    patches = [
        (jsonl, "round_trips", lambda data, value: True),
        (jsonl, "lines_round_trip", lambda joined, lines, values: True),
        (readers_module, "lines_round_trip", lambda joined, lines, values: True),
        (readers_module, "check_jsonl", before_check),
        (chunks_module, "encode_lines", lambda values: (before_encode(values), [])),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    if not exact:
        for module, name, replacement in patches:
            setattr(module, name, replacement)
    try:
        with tempfile.TemporaryDirectory() as folder:
            data, pipeline = Path(folder) / "in.jsonl", Path(folder) / "p.yaml"
            data.write_bytes(lines)
            pipeline.write_text(PIPELINE)
            options = RunOptions(
                pipeline=str(pipeline),
                data=str(data),
                output=str(Path(folder) / "out.jsonl"),
                store="memory://",
            )
            summary = run_pipeline(options)
            assert summary.status == "complete", summary.error
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


PIPELINE = """
name: bench
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 1000}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item['id'] * 2"}]}
  - {name: collect, dependencies: [work], modules: [{use: aggregate}]}
"""


def long_record_table(max_mb: int, rounds: int) -> None:
    print()
    print("## One long record: the reader against orjson.loads of the same bytes")
    print("| size | format | reader | orjson.loads | reader / loads | reader s per MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    size = 8
    while size <= max_mb:
        text = orjson.dumps({"k": "x" * ((size << 20) - 16)})
        for fmt, data in (("jsonl", text + b"\n1\n"), ("json", b"[" + text + b",1]")):
            reader = best(lambda data=data, fmt=fmt: read_all(data, fmt), rounds)
            baseline = best(lambda text=text: orjson.loads(text), rounds)
            print(
                f"| {size} MiB | {fmt} | {reader:.3f} s | {baseline:.3f} s | "
                f"{reader / baseline:.1f} | {reader / size:.4f} |"
            )
        size *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-mb", type=int, default=32)
    args = parser.parse_args()
    for kind, make in (
        ("short numbers", short_numbers),
        ("machine floats", machine_floats),
        ("decimals", with_decimals),
    ):
        codec_table(args.records, args.rounds, kind, make)
    long_record_table(args.max_mb, max(1, args.rounds // 2))


if __name__ == "__main__":
    main()
