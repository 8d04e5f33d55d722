"""Group-by benchmark (issue 12): pagent's per-chunk partial aggregation against plain scripts.

    python bench/aggregate_bench.py [--records 1000000] [--keys 1000] [--repeat 1]

Side by side in one run, the commands taking turns for `--repeat` rounds (so that each round's
commands see the same machine speed), each command's fastest run:

- pagent `processes: 2`, split → aggregate `group_by` with count, sum and mean (the split's
  worker processes parse each chunk once, check it and reduce it to its partial), SQLite store in
  a temporary folder; also split → identity map (`expr: "item"`, and `function: "copy:copy"`) →
  aggregate, the form where every record passes through a map and is stored twice;
- a one-process script with `json` and a dict of accumulators; the same with `orjson`; the orjson
  script on `multiprocessing.Pool(2)` (the parent reads batches of lines, the workers parse and
  aggregate them, the parent merges);
- peak memory (GNU time, whole command with its workers) of pagent at 100,000 and at `--records`;
- where pagent's time goes: its nodes' own times, the rest (start-up, output, exit), and the same
  command on 10 records (its fixed cost); the records' time net of each command's fixed cost;
- the weather-style monthly summary (days, rain total, rainy days, mean max temperature per month)
  over 1,461 and 10,227 daily rows: the aggregate node's time against the map node's.

Every output is compared with the json script's, so a fast wrong answer is flagged. The data is
generated here (no downloads). pagent's bytecode is written first, as `pip install` does (see
run_all.py). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
PAGENT = str(Path(PYTHON).parent / "pagent")
TIME = ["/usr/bin/time", "-f", "peak_rss_kib=%M"]

DIRECT = """
name: group-by-bench
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 20000}],
     node_config: {processes: 2}}
  - name: by_key
    dependencies: [split]
    modules:
    - use: aggregate
      group_by: key
      compute: {n: count, total: {sum: v}, avg: {mean: v}}
"""

PIPELINE = """
name: group-by-bench
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 20000}],
     node_config: {processes: 2}}
  - {name: rows, dependencies: [split], modules: [{use: map, expr: "item"}],
     node_config: {processes: 2}}
  - name: by_key
    dependencies: [rows]
    modules:
    - use: aggregate
      group_by: key
      compute: {n: count, total: {sum: v}, avg: {mean: v}}
"""

WEATHER = """
name: weather
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 1000}]}
  - name: days
    dependencies: [split]
    modules: [{use: map, expr: "{'month': item['date'][:7], 'rain': item['precipitation'], 'tmax': item['temp_max']}"}]
  - name: monthly
    dependencies: [days]
    modules:
    - use: aggregate
      group_by: month
      compute:
        days: count
        rain: {sum: rain}
        wet_days: {count_if: "item['rain'] > 0"}
        tmax: {mean: tmax}
"""

SCRIPT = """
import sys
import {module} as json_module

totals = {{}}
with open(sys.argv[1], "rb") as handle:
    for line in handle:
        record = json_module.loads(line)
        entry = totals.get(record["key"])
        if entry is None:
            totals[record["key"]] = [1, record["v"]]
        else:
            entry[0] += 1
            entry[1] += record["v"]
rows = [{{"key": k, "n": n, "total": s, "avg": s / n}} for k, (n, s) in totals.items()]
with open(sys.argv[2], "w") as out:
    out.write(__import__("json").dumps(rows))
"""

POOL_SCRIPT = """
import json
import sys
from multiprocessing import Pool

import orjson

BATCH = 20000


def reduce(lines):
    totals = {}
    for line in lines:
        record = orjson.loads(line)
        entry = totals.get(record["key"])
        if entry is None:
            totals[record["key"]] = [1, record["v"]]
        else:
            entry[0] += 1
            entry[1] += record["v"]
    return totals


def batches(path):
    with open(path, "rb") as handle:
        batch = []
        for line in handle:
            batch.append(line)
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


if __name__ == "__main__":
    merged = {}
    with Pool(2) as pool:
        for totals in pool.imap(reduce, batches(sys.argv[1])):
            for key, (n, s) in totals.items():
                entry = merged.get(key)
                if entry is None:
                    merged[key] = [n, s]
                else:
                    entry[0] += n
                    entry[1] += s
    rows = [{"key": k, "n": n, "total": s, "avg": s / n} for k, (n, s) in merged.items()]
    with open(sys.argv[2], "w") as out:
        out.write(json.dumps(rows))
"""


def make_input(path: Path, count: int, keys: int) -> None:
    """`{"id", "key", "v"}`; v is a multiple of 0.5 so every summation order gives the same sum."""
    rng = random.Random(12)
    with path.open("w") as handle:
        for i in range(count):
            key = f"k{rng.randrange(keys):05d}"
            handle.write(f'{{"id": {i}, "key": "{key}", "v": {rng.randrange(2000) / 2}}}\n')


def make_weather(path: Path, days: int) -> None:
    rng = random.Random(5)
    start = time.mktime((1996, 1, 1, 12, 0, 0, 0, 0, -1))
    with path.open("w") as handle:
        handle.write("[\n")
        for day in range(days):
            date = time.strftime("%Y-%m-%d", time.localtime(start + day * 86400))
            rain = round(max(0.0, rng.gauss(1, 4)), 1)
            tmax = round(rng.gauss(15, 8), 1)
            sep = "," if day < days - 1 else ""
            handle.write(
                f'{{"date": "{date}", "precipitation": {rain}, "temp_max": {tmax}}}{sep}\n'
            )
        handle.write("]\n")


def run_once(command: list[str]) -> tuple[float, str, int]:
    """Wall time of one run, its stdout, and its peak RSS (KiB)."""
    started = time.perf_counter()
    done = subprocess.run([*TIME, *command], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    found = re.findall(r"peak_rss_kib=(\d+)", done.stderr)
    return elapsed, done.stdout, int(found[-1]) if found else 0


def timed(command: list[str], repeat: int) -> tuple[float, str, int]:
    """Fastest wall time of `repeat` runs, that run's stdout, and the largest peak RSS (KiB)."""
    results = interleaved({"command": command}, repeat)["command"]
    return min(results.seconds), results.stdout, results.peak


class Runs:
    """Every run of one command: wall times, the fastest run's stdout (its own report of where
    its time went), the largest peak RSS (KiB)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.stdout = ""
        self.peak = 0


def interleaved(commands: dict[str, list[str]], repeat: int) -> dict[str, Runs]:
    """Run the commands in turn, `repeat` rounds: this machine's speed drifts from one minute to
    the next, and commands compared within each round see the same drift (best against best,
    median against median)."""
    runs = {name: Runs() for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            seconds, stdout, peak = run_once(command)
            if seconds < min(runs[name].seconds, default=math.inf):
                runs[name].stdout = stdout
            runs[name].seconds.append(seconds)
            runs[name].peak = max(runs[name].peak, peak)
    return runs


def rows_of(path: Path) -> dict[str, tuple[int, float, float]]:
    return {
        row["key"]: (row["n"], row["total"], row["avg"]) for row in json.loads(path.read_text())
    }


def close(a: dict[str, tuple[int, float, float]], b: dict[str, tuple[int, float, float]]) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and a[k][1] == b[k][1] and math.isclose(a[k][2], b[k][2], rel_tol=1e-12)
        for k in a
    )


def pagent_command(pipeline: Path, data: Path, out: Path, folder: Path) -> list[str]:
    return [
        PAGENT, "run", str(pipeline), "--data", str(data), "--output", str(out), "--json",
        "--quiet", "--store", f"sqlite:///{folder / 'state.db'}",
    ]  # fmt: skip


def pagent(
    pipeline: Path, data: Path, out: Path, folder: Path, repeat: int
) -> tuple[float, dict, int]:
    seconds, stdout, peak = timed(pagent_command(pipeline, data, out, folder), repeat)
    return seconds, json.loads(stdout), peak


def write_bytecode() -> None:
    """As `run_all.py` does: pagent's modules load from bytecode, as after `pip install`."""
    import compileall

    import parallel_agent

    compileall.compile_dir(Path(parallel_agent.__file__).parent, quiet=1)


def main() -> None:
    write_bytecode()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pagent-agg-bench-") as tmp:
        folder = Path(tmp)
        data, small = folder / "big.jsonl", folder / "small.jsonl"
        make_input(data, args.records, args.keys)
        make_input(small, min(100_000, args.records), args.keys)
        pipeline = folder / "group.yaml"
        pipeline.write_text(DIRECT)
        mapped = folder / "group_map.yaml"
        mapped.write_text(PIPELINE)
        scripts = {}
        for name, text in (
            ("json", SCRIPT.format(module="json")),
            ("orjson", SCRIPT.format(module="orjson")),
            ("orjson_pool2", POOL_SCRIPT),
        ):
            scripts[name] = folder / f"baseline_{name}.py"
            scripts[name].write_text(text)
        outputs = {name: folder / f"{name}.json" for name in scripts}
        commands = {
            name: [PYTHON, str(script), str(data), str(outputs[name])]
            for name, script in scripts.items()
        }
        copying = folder / "group_function.yaml"
        copying.write_text(PIPELINE.replace('expr: "item"', 'function: "copy:copy"'))
        for name, pipeline_file in (
            ("pagent", pipeline),
            ("pagent_map", mapped),
            ("pagent_function", copying),
        ):
            outputs[name] = folder / f"{name}.json"
            commands[name] = pagent_command(pipeline_file, data, outputs[name], folder)
        runs = interleaved(commands, args.repeat)
        labels = {
            "pagent": "pagent processes: 2",
            "pagent_map": "pagent map expr item",
            "pagent_function": "pagent map function",
        }
        measured = {*scripts, "pagent"}  # peak memory is shown for these
        figures = {
            labels.get(name, name): (min(run.seconds), run.peak if name in measured else 0)
            for name, run in runs.items()
        }
        summary = json.loads(runs["pagent"].stdout)
        map_summary = json.loads(runs["pagent_map"].stdout)
        function_summary = json.loads(runs["pagent_function"].stdout)
        peak = runs["pagent"].peak
        _, _, small_peak = pagent(pipeline, small, folder / "small.json", folder, 1)
        tiny = folder / "tiny.jsonl"
        make_input(tiny, 10, args.keys)
        tiny_runs = interleaved(
            {
                "pagent": pagent_command(pipeline, tiny, folder / "tiny.json", folder),
                "orjson": [PYTHON, str(scripts["orjson"]), str(tiny), str(folder / "tiny_o.json")],
            },
            max(args.repeat, 3),
        )
        fixed, script_fixed = (min(tiny_runs[name].seconds) for name in ("pagent", "orjson"))
        reference = rows_of(outputs["json"])
        json_s, orjson_s = figures["json"][0], figures["orjson"][0]
        print(
            f"group-by: {args.records:,} JSON Lines records, {len(reference):,} keys, count+sum+mean"
        )
        print(
            f"{'command':<22} {'seconds':>8} {'records/s':>12} {'vs json':>8} {'vs orjson':>9} {'peak MiB':>9}  output"
        )
        keys = {label: name for name, label in labels.items()}
        for name, (secs, rss) in figures.items():
            key = keys.get(name, name)
            ok = "ok" if close(rows_of(outputs[key]), reference) else "WRONG OUTPUT"
            print(
                f"{name:<22} {secs:8.2f} {args.records / secs:12,.0f} {json_s / secs:7.2f}x "
                f"{orjson_s / secs:8.2f}x {rss / 1024 if rss else math.nan:9.0f}  {ok}"
            )
        if args.repeat > 1:
            medians = {name: statistics.median(runs[name].seconds) for name in ("orjson", "pagent")}
            print(
                f"medians of the {args.repeat} rounds: orjson script {medians['orjson']:.2f} s, "
                f"pagent processes: 2 {medians['pagent']:.2f} s "
                f"({medians['orjson'] / medians['pagent']:.2f}x; information)"
            )
        pool_ratio = orjson_s / figures["orjson_pool2"][0]
        if pool_ratio < 1.0:
            print(
                f"the orjson script on Pool(2) ran at {pool_ratio:.2f}x the one-process one: this "
                "machine's second core was busy elsewhere during this run, so every 2-process "
                "figure here understates (information; run again)"
            )
        for label, run in (
            ("split → aggregate", summary),
            ("expr map", map_summary),
            ("function map", function_summary),
        ):
            node_s = {node: values.get("duration_s", 0.0) for node, values in run["nodes"].items()}
            times = ", ".join(f"{n} {s:.2f} s" for n, s in node_s.items())
            print(f"pagent node times ({label}): {times}")
        wall = figures["pagent processes: 2"][0]
        nodes = {node: values.get("duration_s", 0.0) for node, values in summary["nodes"].items()}
        outside = wall - sum(nodes.values())
        print(
            f"where pagent processes: 2 spends {wall:.2f} s: split {nodes.get('split', 0):.2f} s, "
            f"aggregate {nodes.get('by_key', 0):.2f} s, the rest {outside:.2f} s (start-up, "
            f"output, exit); the same command on 10 records takes {fixed:.2f} s, "
            f"{fixed / orjson_s:.2f}x the orjson script's whole time"
        )
        net, script_net = wall - fixed, orjson_s - script_fixed
        print(
            f"net of each command's time on 10 records (pagent {fixed:.2f} s, the orjson script "
            f"{script_fixed:.2f} s), the records take pagent {net:.2f} s and the orjson script "
            f"{script_net:.2f} s: {script_net / net:.2f}x (information; the target is on whole "
            "times)"
        )
        print(
            f"pagent peak memory: {small_peak / 1024:.0f} MiB at {min(100_000, args.records):,} "
            f"records, {peak / 1024:.0f} MiB at {args.records:,} ({peak / max(small_peak, 1):.2f}x;"
            " target <= 1.5x)"
        )
        weather = folder / "weather.yaml"
        weather.write_text(WEATHER)
        for days in (1461, 10227):
            source = folder / f"weather-{days}.json"
            make_weather(source, days)
            _, report, _ = pagent(weather, source, folder / f"monthly-{days}.json", folder, 1)
            nodes = report["nodes"]
            map_s = nodes["days"]["duration_s"]
            aggregate_s = nodes.get("monthly", {}).get("duration_s", 0.0)
            months = len(json.loads((folder / f"monthly-{days}.json").read_text()))
            print(
                f"weather summary, {days:,} rows, {months} months: map {map_s * 1000:.1f} ms, "
                f"aggregate {aggregate_s * 1000:.1f} ms ({aggregate_s / max(map_s, 1e-9):.2f}x the "
                "map; target <= 1x)"
            )


if __name__ == "__main__":
    main()
