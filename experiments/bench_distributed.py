"""Data-parallel scaling: training throughput (samples/s) with 1 and 2 processes.

Runs ``torchrun --standalone --nproc_per_node N -m ocnode train`` for each process count
(``--processes``, default 1,2), optimizer (``--optimizers``, default adam,snopt) and job
(``--jobs``: the digits MLP Neural ODE, dopri5 with the adjoint, at a width and global batch:
``64x128``, the default model, and ``256x512``, 16 times the arithmetic per step), 1 torch
thread per process, ``--repeats`` rounds, interleaved (round r runs every setting once, in
rotating order). The training split is cut to 1024 examples, so every epoch is whole
batches for any process count. A run's throughput is (steps x global batch) / its training
clock (``wall_time`` of the last metrics row: evaluation and checkpoints excluded); the whole
run's time includes the start of the processes. With ``--threads-baseline`` a single
process with 2 threads runs too: the same 2 cores used by threads instead of processes.

    python experiments/bench_distributed.py --threads-baseline      # ~6 min on 2 cores
    python experiments/bench_distributed.py --processes 1,2,4 --jobs 128x256 --repeats 3

Outputs: ``<out>/bench_distributed.json`` and ``bench_distributed.md`` (medians per setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ocnode.training.records import command_line, machine_info

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SIZE = 1024


def _job(out: Path, optimizer: str, job: tuple[int, int], epochs: int,
         threads: int) -> list[str]:
    width, batch = job
    return ["train", "--out", str(out), "--dataset", "digits", "--optimizer", optimizer,
            "--width", str(width), "--batch-size", str(batch), "--train-size",
            str(TRAIN_SIZE), "--epochs", str(epochs), "--log-every", "1000", "--test-size",
            "500", "--threads", str(threads), "--device", "cpu", "--no-progress"]


def run_once(processes: int, optimizer: str, job: tuple[int, int], epochs: int,
             threads: int = 1) -> dict[str, Any]:
    """One run of ``job`` (width, global batch) on ``processes`` processes (torchrun), in a
    temporary folder."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "ocnode",
               *_job(out, optimizer, job, epochs, threads)]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        whole = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(out / "metrics.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
    steps, training = float(last["step"]), float(last["wall_time"])
    return {"processes": processes, "threads": threads, "optimizer": optimizer,
            "width": job[0], "batch": job[1], "steps": steps, "training_s": training,
            "whole_s": whole, "samples_per_s": steps * job[1] / training,
            "test_acc": float(last["test_acc"])}


def _key(r: dict[str, Any]) -> str:
    return (f"width {r['width']}, batch {r['batch']}: {r['optimizer']}, {r['processes']} proc "
            f"x {r['threads']} thread")


def _base(r: dict[str, Any]) -> str:
    return _key({**r, "processes": 1, "threads": 1})


def markdown(result: dict[str, Any]) -> str:
    """The medians per setting, with the speed-up over 1 process x 1 thread."""
    m = result["machine"]
    lines = ["# Data-parallel throughput by number of processes", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, load at start "
             f"{m['loadavg_at_start']}  ",
             f"Job: digits MLP Neural ODE (dopri5, adjoint), {TRAIN_SIZE} training examples, "
             f"{result['epochs']} epochs; samples/s = steps x global batch / training clock",
             "",
             "| setting | samples/s (median) | speed-up | training s | whole run s | "
             "test_acc | runs |", "|---|---|---|---|---|---|---|"]
    medians = {k: statistics.median(r["samples_per_s"] for r in rows)
               for k, rows in result["runs"].items()}
    for key, rows in result["runs"].items():
        base = medians.get(_base(rows[0]))
        speed = f"{medians[key] / base:.2f}x" if base else "-"
        lines.append(f"| {key} | {medians[key]:.0f} | {speed} "
                     f"| {statistics.median(r['training_s'] for r in rows):.2f} "
                     f"| {statistics.median(r['whole_s'] for r in rows):.1f} "
                     f"| {statistics.median(r['test_acc'] for r in rows):.3f} | {len(rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--optimizers", default="adam,snopt", help="comma-separated")
    parser.add_argument("--jobs", default="64x128,256x512",
                        help="comma-separated WIDTHxBATCH (global batch)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads-baseline", action="store_true",
                        help="also 1 process with 2 threads")
    parser.add_argument("--out", default="experiments/results", help="results folder")
    args = parser.parse_args(argv)
    jobs = [tuple(int(v) for v in j.split("x")) for j in args.jobs.split(",")]
    counts = [int(k) for k in args.processes.split(",")] + ([1] if args.threads_baseline else [])
    threads = [1] * (len(counts) - int(args.threads_baseline)) + [2] * args.threads_baseline
    settings = [(n, opt, (job[0], job[1]), t) for job in jobs
                for opt in args.optimizers.split(",") for n, t in zip(counts, threads)]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.repeats):
        for n, opt, job, t in settings[r % len(settings):] + settings[:r % len(settings)]:
            row = run_once(n, opt, job, args.epochs, t)
            runs.setdefault(_key(row), []).append(row)
            print(row, flush=True)
    ordered = {k: runs[k] for k in (_key({"optimizer": o, "processes": n, "threads": t,
                                          "width": j[0], "batch": j[1]})
                                    for n, o, j, t in settings)}
    result = {"runs": ordered, "epochs": args.epochs, "command": command_line(),
              "machine": machine_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(json.dumps(result, indent=1))
    (out / "bench_distributed.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
