"""Benchmark: the three ways to get gradients through a solve, per training iteration.

A benchmark, not a test: it writes numbers to files. ``backprop`` differentiates the
solver's operations (every stage's graph kept until the backward), ``checkpoint`` replays
each accepted step from its stored start state in the backward
(``SolverSpec(adjoint=False, checkpoint=True)``), ``adjoint`` solves the adjoint ODE
backward (O(1) memory, restarting at every output time). The three train copies of the same
initial model on the same batches in ONE process, INTERLEAVED (one iteration of each in
turn, the order rotating), each on its own clock, 1 torch thread; an iteration is the
forward solve, the loss, the backward and an Adam step. Reported: median ms per iteration,
the median of per-round ratios to backprop (a burst of machine load hitting a round leaves
its ratio intact), NFE forward / backward, and the peak RSS growth of two iterations (a
forked child per mode, :func:`ocnode.training.memory.peak_rss_growth`).

Cases:

* ``fit-dopri5``: trajectory fitting on ``spirals`` (``ocnode.nn.TrajectoryODE``, the
  fitting task's model and batches), dopri5 at rtol = atol = 1e-3: each batch is observed
  at 15-20 distinct times, where the adjoint restarts.
* ``fit-rk4``: the same with RK4 on the data's time grid (the fitting task's default).
* ``image``: the SNOpt paper's image net on MNIST-5k (conv stem to 64 channels, an ODE block
  of two 3x3 time-concatenated convolutions, dopri5 1e-3), batch 128: where memory matters.

    python experiments/bench_gradients.py                  # all cases, 30 rounds
    python experiments/bench_gradients.py --cases fit-dopri5 --rounds 50
    python experiments/bench_gradients.py --quick          # smoke run

Outputs: ``experiments/results/bench_gradients.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ocnode import load_dataset
from ocnode.training import TaskSettings, make_task
from ocnode.training.memory import peak_rss_growth
from ocnode.training.records import machine_info
from ocnode.training.step import NFECounter, train_step
from solvers import SolverSpec

OUT_DIR = Path(__file__).resolve().parent / "results"
MODES = ("backprop", "checkpoint", "adjoint")
CASES = ("fit-dopri5", "fit-rk4", "image")
ROUNDS, QUICK_ROUNDS = 30, 3
SEED = 0


def case_task(case: str, mode: str, quick: bool) -> Any:
    """The task of ``case`` with ``mode``'s solver settings; --quick: a tiny version."""
    checkpoint = mode == "checkpoint"
    if case.startswith("fit-"):
        data = load_dataset("spirals", seed=0, subset=16 if quick else None)
        changes: dict[str, Any] = {"checkpoint": checkpoint}
        if case == "fit-dopri5":
            changes.update(method="dopri5", rtol=1e-3, atol=1e-3)
        return make_task(data, TaskSettings(width=16 if quick else None, solver_changes=changes))
    if case == "image":
        data = load_dataset("mnist5k", seed=0, subset=256 if quick else None)
        spec = SolverSpec(method="dopri5", rtol=1e-3, atol=1e-3, adjoint=not checkpoint,
                          checkpoint=checkpoint)
        return make_task(data, TaskSettings(model="conv", width=8 if quick else 64,
                                            batch_size=32 if quick else 128, solver=spec))
    raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")


def build(case: str, mode: str, quick: bool) -> tuple[torch.nn.Module, Any]:
    """A freshly seeded model of ``case`` with ``mode``'s gradients, and its task."""
    task = case_task(case, mode, quick)
    torch.manual_seed(SEED)
    return task.build_model(mode == "adjoint"), task


def iteration(model: torch.nn.Module, opt: torch.optim.Optimizer, task: Any, batch: Any,
              counter: NFECounter | None = None) -> None:
    """One training iteration: forward, loss, backward, Adam step."""
    train_step(model, opt, task.loss, batch, counter=counter)


def time_case(case: str, rounds: int, quick: bool) -> dict[str, Any]:
    """Interleaved timing of the three modes on ``case``."""
    runs = {}
    for mode in MODES:
        model, task = build(case, mode, quick)
        runs[mode] = (model, torch.optim.Adam(model.parameters(), 1e-3), task,
                      task.batches(SEED), NFECounter(model))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    nfe: dict[str, tuple[int, int]] = {}
    for r in range(rounds + 1):  # round 0 is a warm-up
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            model, opt, task, batches, counter = runs[mode]
            batch = next(batches)
            start = time.perf_counter()
            iteration(model, opt, task, batch, counter)
            if r:
                times[mode].append((time.perf_counter() - start) * 1e3)
            nfe[mode] = counter.take()
    return {"case": case, "rounds": rounds,
            "ms": {m: statistics.median(v) for m, v in times.items()},
            "ratio_to_backprop": {m: statistics.median(a / b for a, b in
                                                       zip(times[m], times["backprop"]))
                                  for m in MODES},
            "nfe": nfe}


def memory_case(case: str, quick: bool) -> dict[str, float | None]:
    """Peak RSS growth (MiB) of two iterations of each mode, each in a forked child."""
    def prepare(mode: str):
        def make():
            model, task = build(case, mode, quick)
            opt, batches = torch.optim.Adam(model.parameters(), 1e-3), task.batches(SEED)
            return lambda: iteration(model, opt, task, next(batches))
        return make
    return {m: peak_rss_growth(prepare(m), what=f"{case} {m}") for m in MODES}


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| case | mode | ms / iteration | / backprop | NFE fwd / bwd | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    for rec in records:
        for m in MODES:
            f, b = rec["nfe"][m]
            mib = rec["memory"][m]
            lines.append(f"| {rec['case']} | {m} | {rec['ms'][m]:.1f} | "
                         f"{rec['ratio_to_backprop'][m]:.2f} | {f} / {b} | "
                         f"{'–' if mib is None else f'{mib:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    records = []
    for case in [c for c in args.cases.split(",") if c]:
        rec = time_case(case, rounds, args.quick)
        rec["memory"] = memory_case(case, args.quick)
        records.append(rec)
        print(markdown([rec]), end="", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "command": " ".join(sys.argv), "records": records}
    (args.out / "bench_gradients.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench_gradients.md").write_text(
        f"`{result['command']}`\n\n" + markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
