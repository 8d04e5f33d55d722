"""`pagent worker` scaling (issue 13), on a private redis-server on loopback.

    .venv/bin/python bench/workers_bench.py [--items 4800] [--cpu-items 400] [--repeat 3]

1. 4,800 items in chunks of 50 through an async function awaiting 50 ms, `concurrency: 8` per
   process: items/s with 1, 2 and 4 processes (a coordinator plus 0, 1, 3 `pagent worker`s, started
   before it and waiting for the task id), median of `--repeat`, against N x the one-process rate.
2. CPU-bound items (20 ms of CPU each) on a `--workers-only` coordinator with 2 workers of
   `processes: 1`, against `multiprocessing.Pool(2)` over the same function in this run.

For each run it also reports Redis's CPU time (INFO cpu) and commands per chunk (INFO stats
total_commands_processed: every store call is one round trip, a script or a pipeline counts its
commands, so this is an upper bound on round trips).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE / "pipelines"))

from bench_steps import burn_20ms  # noqa: E402
from helpers.redis_server import RedisServer  # noqa: E402

PAGENT = [sys.executable, "-m", "parallel_agent"]

ASYNC_PIPELINE = """
name: bench-fleet
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 50}]}
  - name: work
    dependencies: [split]
    modules: [{use: map, function: "bench_steps:wait_50ms"}]
    node_config: {concurrency: 8}
"""

CPU_PIPELINE = """
name: bench-cpu
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 10}]}
  - name: work
    dependencies: [split]
    modules: [{use: map, function: "bench_steps:burn_20ms"}]
    node_config: {processes: 1}
"""


def redis_figures(client: redis.Redis) -> tuple[float, int]:
    cpu = client.info("cpu")
    stats = client.info("stats")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), int(
        stats["total_commands_processed"]
    )


def wait_for_workers(store: str, count: int) -> None:
    """Until `count` workers beat in the store (they are up and looking for the run)."""
    client = redis.Redis.from_url(store)
    try:
        deadline = time.monotonic() + 60
        while True:
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            if client.zcount("pagent:workers", now_ms, "+inf") >= count:
                break
            if time.monotonic() > deadline:
                sys.exit("the workers did not start")
            time.sleep(0.05)
    finally:
        client.close()


def one_run(
    store: str, pipeline: Path, data: Path, workers: int, task_id: str, env: dict[str, str],
    *, workers_only: bool = False,
) -> float:  # fmt: skip
    """Seconds from the coordinator's start to its exit, with `workers` workers waiting."""
    helpers = [
        subprocess.Popen(
            [
                *PAGENT,
                "worker",
                "--store",
                store,
                "--pipeline",
                str(pipeline),
                "--task-id",
                task_id,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(workers)
    ]
    wait_for_workers(store, workers)  # their start-up is not the run's
    started = time.perf_counter()
    extra = ["--workers-only"] if workers_only else []
    done = subprocess.run(
        [*PAGENT, "run", str(pipeline), "--data", str(data), "--task-id", task_id, "--store",
         store, "-q", "--output", str(data.with_suffix(f".{task_id}.out.jsonl")), *extra],
        env=env, capture_output=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"run failed: {done.stderr.decode()}")
    for helper in helpers:
        _, err = helper.communicate(timeout=60)
        if helper.returncode != 0:
            sys.exit(f"worker failed: {err.decode()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=4800)
    parser.add_argument("--cpu-items", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        server = RedisServer(tmp / "redis", durable=False)
        server.start()
        client = redis.Redis(port=server.port)
        env = {**os.environ, "PYTHONPATH": str(HERE / "pipelines")}
        env.pop("PAGENT_STORE", None)
        try:
            async_pipeline = tmp / "async.yaml"
            async_pipeline.write_text(ASYNC_PIPELINE)
            data = tmp / "items.jsonl"
            data.write_text("".join(f"{i}\n" for i in range(args.items)))
            chunks = -(-args.items // 50)
            print(f"async 50 ms items: {args.items} items, {chunks} chunks of 50, concurrency 8 "
                  f"per process, median of {args.repeat}")  # fmt: skip
            print(f"{'processes':>9} {'items/s':>9} {'x 1 proc':>9} {'ideal':>6} {'of ideal':>9} "
                  f"{'redis cpu s':>11} {'cmds/chunk':>10}")  # fmt: skip
            base = None
            for processes in (1, 2, 4):
                rates, cpus, commands = [], [], []
                for attempt in range(args.repeat):
                    cpu0, cmd0 = redis_figures(client)
                    seconds = one_run(
                        server.url, async_pipeline, data, processes - 1,
                        f"a{processes}-{attempt}", env,
                    )  # fmt: skip
                    cpu1, cmd1 = redis_figures(client)
                    rates.append(args.items / seconds)
                    cpus.append(cpu1 - cpu0)
                    commands.append((cmd1 - cmd0) / chunks)
                rate = statistics.median(rates)
                base = base or rate
                print(f"{processes:>9} {rate:>9,.0f} {rate / base:>8.2f}x {processes:>5}x "
                      f"{rate / base / processes:>8.0%} {statistics.median(cpus):>11.2f} "
                      f"{statistics.median(commands):>10.1f}")  # fmt: skip

            cpu_pipeline = tmp / "cpu.yaml"
            cpu_pipeline.write_text(CPU_PIPELINE)
            cpu_data = tmp / "cpu.jsonl"
            cpu_data.write_text("".join(f"{i}\n" for i in range(args.cpu_items)))
            pool_rates, fleet_rates = [], []
            for attempt in range(args.repeat):
                started = time.perf_counter()
                with multiprocessing.Pool(2) as pool:
                    pool.map(burn_20ms, range(args.cpu_items), chunksize=10)
                pool_rates.append(args.cpu_items / (time.perf_counter() - started))
                seconds = one_run(
                    server.url, cpu_pipeline, cpu_data, 2, f"c-{attempt}", env, workers_only=True
                )
                fleet_rates.append(args.cpu_items / seconds)
            pool_rate, fleet_rate = statistics.median(pool_rates), statistics.median(fleet_rates)
            print(f"\nCPU-bound 20 ms items: {args.cpu_items} items, median of {args.repeat}")
            print(f"{'multiprocessing.Pool(2)':<44} {pool_rate:>8,.1f} items/s")
            print(f"{'--workers-only + 2 workers (processes: 1)':<44} {fleet_rate:>8,.1f} items/s "
                  f"{fleet_rate / pool_rate:>6.2f}x of Pool")  # fmt: skip
        finally:
            client.close()
            server.stop()


if __name__ == "__main__":
    main()
