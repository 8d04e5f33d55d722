"""What the live display costs: the same pipeline with the Rich live display drawing to a
pseudo-terminal, with plain progress lines, and with --quiet, interleaved, in one process.

    python bench/display_overhead.py [--records 100000] [--chunk-size 100] [--rounds 9]
                                     [--store memory://]

The live display writes to the slave side of a real pseudo-terminal whose master side is drained
by a separate `cat` process (as a terminal emulator would), so Rich does all its work: terminal
detection, rendering at its refresh rate on its own thread, cursor movement, the final report.
Each round runs every mode once, in a rotating order, so a slow spell of this shared machine hits
every mode alike. Three figures, because run-to-run noise on a shared VM is larger than the effect:

* best of the rounds per mode, as a ratio to quiet's best (the convention of `run_all.py`);
* the median of the per-round ratios to the quiet run of the same round (wall and CPU time);
* the display's own cost, measured directly: the CPU time of drawing every frame (thread time
  of the drawing thread, so waits for the GIL do not count), as a share of the live runs' time.
  Drawing holds the GIL, so this is the throughput the run loses to it, without the noise of
  comparing two runs.

Figures only: nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console

from parallel_agent.app import RunOptions, run_pipeline
from parallel_agent.display.live import LiveDisplay
from parallel_agent.display.plain import PlainLines
from parallel_agent.events import EventSink

PIPELINE = """
name: display-overhead
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: {chunk_size}}}]}}
  - name: double
    dependencies: [split]
    modules: [{{use: map, expr: "{{'id': item['id'], 'y': item['x'] * 2}}"}}]
    node_config: {{concurrency: 4}}
  - {{name: collect, dependencies: [double], modules: [{{use: aggregate}}]}}
"""


@contextlib.contextmanager
def pseudo_terminal(columns: int = 100) -> Iterator[tuple[TextIO, list[int]]]:
    """A text stream on a pty slave; `cat` drains the master. Yields the stream and a one-item
    list that holds the bytes `cat` read once the context ends."""
    master, slave = pty.openpty()
    drained: list[int] = [0]
    with tempfile.TemporaryFile() as sink:
        # cat ends with EIO once the slave closes; that is the end of the stream, not an error
        reader = subprocess.Popen(["cat"], stdin=master, stdout=sink, stderr=subprocess.DEVNULL)
        os.close(master)
        stream = open(slave, "w", encoding="utf-8", closefd=True)  # noqa: SIM115 - closed below
        try:
            yield stream, drained
        finally:
            stream.close()  # the last slave fd: cat sees end of file (EIO) and exits
            reader.wait(timeout=30)
            drained[0] = sink.seek(0, os.SEEK_END)


@dataclass
class Timing:
    """One run: items per wall-clock second, CPU seconds of this process, bytes drawn."""

    rate: float
    cpu_s: float
    elapsed_s: float
    drawn: int = 0
    frames: int = 0
    frame_s: float = 0.0


def run_once(options: RunOptions, sink: EventSink) -> Timing:
    """Time the whole library call, the sink's start-up and final report included."""
    cpu = time.process_time()
    started = time.perf_counter()
    try:
        summary = run_pipeline(options, sink)
    finally:
        sink.close()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if summary.status != "complete":
        raise SystemExit(f"run {options.task_id} ended {summary.status}: {summary.error}")
    return Timing(summary.items_done / elapsed, cpu, elapsed)


def quiet(options: RunOptions) -> Timing:
    return run_once(options, EventSink())


def live(options: RunOptions) -> Timing:
    with pseudo_terminal() as (stream, drained):
        console = Console(file=stream, force_terminal=True, width=100)
        assert console.is_terminal
        display = LiveDisplay(console)
        frames = [0, 0.0]
        draw = display.live.refresh

        def timed_draw() -> None:  # the refresh thread looks `refresh` up on the instance
            # CPU time of the drawing thread: waiting for the GIL is not drawing
            started = time.thread_time()
            draw()
            frames[0] += 1
            frames[1] += time.thread_time() - started

        display.live.refresh = timed_draw  # type: ignore[method-assign]
        timing = run_once(options, display)
    timing.drawn = drained[0]
    timing.frames, timing.frame_s = int(frames[0]), frames[1]
    return timing


def plain(options: RunOptions) -> Timing:
    with open(os.devnull, "w") as devnull:
        return run_once(options, PlainLines(devnull, interval=10.0))


MODES: dict[str, Callable[[RunOptions], Timing]] = {
    "quiet": quiet,
    "live (pty)": live,
    "plain lines": plain,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--store", default="memory://")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pagent-display-bench-") as folder:
        data = Path(folder) / "records.jsonl"
        with data.open("w") as handle:
            handle.writelines(f'{{"id": {i}, "x": {i}}}\n' for i in range(args.records))
        pipeline = Path(folder) / "pipeline.yaml"
        pipeline.write_text(PIPELINE.format(chunk_size=args.chunk_size))
        store = args.store
        if store == "sqlite":
            store = f"sqlite:///{Path(folder) / 'state.db'}"
        counter = iter(range(1_000_000))

        def options() -> RunOptions:
            return RunOptions(
                pipeline=str(pipeline),
                data=str(data),
                store=store,
                task_id=f"display-bench-{os.getpid()}-{next(counter)}",
            )

        chunks = -(-args.records // args.chunk_size)
        print(
            f"display overhead: {args.records:,} records in {chunks:,} chunks, map expr, "
            f"store {args.store}, {args.rounds} rounds (+1 warm-up), modes interleaved"
        )
        quiet(options())  # warm-up: imports, caches
        runs: dict[str, list[Timing]] = {mode: [] for mode in MODES}
        names = list(MODES)
        for number in range(args.rounds):
            order = names[number % len(names) :] + names[: number % len(names)]
            for mode in order:
                runs[mode].append(MODES[mode](options()))
            print(
                f"  round {number + 1:>2}: "
                + "  ".join(f"{mode} {runs[mode][-1].rate:>8,.0f}/s" for mode in names),
                flush=True,
            )

    def overhead(mode: str, key: Callable[[Timing], float]) -> float:
        """Median over rounds of (mode / quiet - 1) in %, for a cost (`key` grows with cost)."""
        ratios = [key(m) / key(q) - 1 for m, q in zip(runs[mode], runs["quiet"], strict=True)]
        return statistics.median(ratios) * 100

    def seconds_per_item(timing: Timing) -> float:
        return 1 / timing.rate

    def cpu_per_item(timing: Timing) -> float:
        return timing.cpu_s

    def best(mode: str) -> float:
        return max(timing.rate for timing in runs[mode])

    print(
        f"\n{'mode':<12} {'best items/s':>13} {'median':>8} {'worst':>8} {'best vs':>8}"
        f" {'median of paired ratios':>24}"
    )
    print(f"{'':<12} {'':>13} {'':>8} {'':>8} {'quiet':>8} {'wall':>12} {'CPU':>11}")
    for mode in names:
        rates = [timing.rate for timing in runs[mode]]
        print(
            f"{mode:<12} {best(mode):>13,.0f} {statistics.median(rates):>8,.0f} "
            f"{min(rates):>8,.0f} {(best('quiet') / best(mode) - 1) * 100:>+7.1f}% "
            f"{overhead(mode, seconds_per_item):>+11.1f}% {overhead(mode, cpu_per_item):>+10.1f}%"
        )
    lives = runs["live (pty)"]
    frames = sum(timing.frames for timing in lives)
    frame_s = sum(timing.frame_s for timing in lives)
    share = frame_s / sum(timing.elapsed_s for timing in lives) * 100
    quiet_rates = [timing.rate for timing in runs["quiet"]]
    spread = (max(quiet_rates) - min(quiet_rates)) / statistics.median(quiet_rates) * 100
    print(
        f"\nlive display (target < 2% of throughput): drawing took {share:.2f}% of the live runs' "
        f"time ({frames / len(lives):.0f} frames per run, {frame_s / max(frames, 1) * 1000:.2f} ms "
        f"each, {statistics.median(t.drawn for t in lives):,.0f} bytes per run); best-of ratio "
        f"{(best('quiet') / best('live (pty)') - 1) * 100:+.1f}%, median paired ratio "
        f"{overhead('live (pty)', seconds_per_item):+.1f}% (quiet runs alone spread {spread:.0f}%)"
    )


if __name__ == "__main__":
    sys.exit(main())
