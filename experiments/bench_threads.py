"""The main job's wall-clock time with 1, 2, ... torch threads: where the default of
``ocnode train --threads`` comes from, and the README's timing of the main job.

Runs ``ocnode.training.train(TrainConfig(threads=k))`` (the default digits job: MLP Neural
ODE, Adam, 15 epochs) for each thread count in turn, ``--repeats`` rounds, interleaved
(round r runs every thread count once, in rotating order), and records each run's training
clock (``wall_time`` of its last metrics row, evaluation excluded) and its whole time. The
test accuracy must be the same for every thread count (same seed).

    python experiments/bench_threads.py                    # threads 1,2; 3 rounds (~2 min)
    python experiments/bench_threads.py --threads 1,2,4 --repeats 5

Outputs: ``<out>/bench_threads.json`` and ``bench_threads.md`` (medians per thread count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ocnode.training import TrainConfig, train
from ocnode.training.records import command_line, machine_info


def run_once(threads: int) -> dict[str, float]:
    """One default main job with ``threads`` torch threads, in a temporary folder."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        row = train(TrainConfig(out=out, threads=threads, progress=False))
        return {"threads": threads, "training_s": row["wall_time"],
                "whole_s": time.perf_counter() - start, "test_acc": row["test_acc"]}


def markdown(result: dict[str, Any]) -> str:
    """The medians per thread count."""
    lines = ["# The main job's time by torch threads", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} cores, "
             f"torch {result['machine']['torch']}, load at start "
             f"{result['machine']['loadavg_at_start']}", "",
             "| threads | training s (median) | whole run s (median) | test_acc | runs |",
             "|---|---|---|---|---|"]
    for k, rows in result["by_threads"].items():
        lines.append(f"| {k} | {statistics.median(r['training_s'] for r in rows):.2f} "
                     f"| {statistics.median(r['whole_s'] for r in rows):.2f} "
                     f"| {rows[0]['test_acc']:.4f} | {len(rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", default="experiments/results", help="results folder")
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.threads.split(",")]
    by_threads: dict[int, list[dict[str, float]]] = {k: [] for k in counts}
    for r in range(args.repeats):
        for k in counts[r % len(counts):] + counts[:r % len(counts)]:
            by_threads[k].append(run_once(k))
            print(by_threads[k][-1], flush=True)
    result = {"by_threads": by_threads, "command": command_line(), "machine": machine_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_threads.json").write_text(json.dumps(result, indent=1))
    (out / "bench_threads.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
