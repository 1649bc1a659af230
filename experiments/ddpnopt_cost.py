"""What a DDPNOpt iteration costs: milliseconds and peak memory against Adam and EKFAC, over
the batch size, on the DDPNOpt paper's FCN and CNN (Liu, Chen, Theodorou, "Differential
Dynamic Programming Neural Optimizer", ICLR 2021, its runtime and memory figures: DDPNOpt
about 2x Adam and 1x EKFAC per iteration, memory far below vanilla DDP's).

Nets and data, all through the training core (:func:`ocnode.training.make_task`):

- ``fcn``: the paper's FCN (5 Linear layers with tanh, width 32) on DIGITS (64 inputs);
- ``cnn``: the paper's CNN (4 Conv2d 3x3, 32 channels, 2 Linear) on MNIST-5k (1x28x28);
- ``resmlp``, ``resnet`` (``--nets resmlp,resnet``, not run by default): the DGNOpt rows'
  residual MLP on DIGITS and small ResNet on MNIST-5k.

Columns (``build_optimizer`` names and hyperparameters; EKFAC-based columns refresh every
``K`` = 20 iterations, so the mean includes two refreshes in 40):

============== =================================================================
Adam           ``adam``
EKFAC          ``ddpnopt``, ``base="ekfac", feedback=False`` (K-FAC factors, eigenbasis;
               on a residual net ``dgnopt`` with ``mode="chain"``: the same base step)
DDPNOpt-RMS    ``ddpnopt``, ``base="rmsprop"`` (the FCN rows' DDPNOpt)
DDPNOpt-EKFAC  ``ddpnopt``, ``base="ekfac"`` (the paper's curvature for CNNs)
vanilla DDP    :func:`ocnode.optim.vanilla_ddp_step` (dense per-sample Q matrices; FCN,
               batches up to ``VANILLA_MAX_BATCH`` only: its memory grows as (B n)^2)
DDPNOpt-chain  ``dgnopt``, ``base="rmsprop", mode="chain"`` (residual nets only, as the
               two below; the DDPNOpt columns above run on the chains only)
DGNOpt-FNE     ``dgnopt``, ``base="rmsprop", mode="fne"``
DGNOpt-GR      ``dgnopt``, ``base="rmsprop", mode="gr"``
============== =================================================================

Time: per (net, batch) every column is built from the same initial weights and sees the
same batches; after one warm-up iteration (a refresh) they run ``--rounds`` iterations
interleaved (one each in turn, the order rotating), each on its own clock, 1 torch thread;
the table quotes the median (a plain iteration) and the mean (with the refreshes).
Memory: the peak resident-set growth of ``K`` iterations after a warm-up one (so one
refresh is inside), each column in a forked child
(:func:`ocnode.training.memory.peak_rss_growth`).

Run (the full table takes ~15 min on one core)::

    OMP_NUM_THREADS=1 python experiments/ddpnopt_cost.py
    OMP_NUM_THREADS=1 python experiments/ddpnopt_cost.py --quick --out <dir>   # smoke run

Outputs under ``--out`` (default ``experiments/results/ddpnopt-cost``): ``summary.json``,
``results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ddpnopt_table import as_chain
from torch import nn

from ocnode import Residual
from ocnode.data import load_dataset
from ocnode.optim import vanilla_ddp_step
from ocnode.training import TaskSettings, build_optimizer, make_task, train_step
from ocnode.training.memory import peak_rss_growth
from ocnode.training.records import command_line, machine_info
from ocnode.training.tasks import Task

K = 20  # EKFAC refresh period of the EKFAC-based columns
#: column -> (registry name, hyperparameters); None: vanilla DDP (a function, not a class).
COLUMNS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "Adam": ("adam", {"lr": 1e-3}),
    "EKFAC": ("ddpnopt", {"lr": 0.03, "base": "ekfac", "feedback": False, "update_freq": K}),
    "DDPNOpt-RMS": ("ddpnopt", {"lr": 1e-4, "base": "rmsprop"}),
    "DDPNOpt-EKFAC": ("ddpnopt", {"lr": 0.01, "base": "ekfac", "update_freq": K}),
    "vanilla DDP": None,
    # residual nets only (DDPNOpt refuses a net with skips): DDPNOpt treating the net as a
    # chain, and the two DGNOpt policies, all on the RMSprop base as in the tables' rows
    "DDPNOpt-chain": ("dgnopt", {"lr": 1e-4, "base": "rmsprop", "mode": "chain"}),
    "DGNOpt-FNE": ("dgnopt", {"lr": 1e-4, "base": "rmsprop", "mode": "fne"}),
    "DGNOpt-GR": ("dgnopt", {"lr": 1e-4, "base": "rmsprop", "mode": "gr"}),
}
#: the columns that need a net with skips, and those that need a chain (DDPNOpt's own).
RESIDUAL_COLUMNS = ("DDPNOpt-chain", "DGNOpt-FNE", "DGNOpt-GR")
CHAIN_COLUMNS = ("DDPNOpt-RMS", "DDPNOpt-EKFAC")
NETS = {"fcn": ("digits", {"model": "fcn", "width": 32}),
        "cnn": ("mnist5k", {"model": "cnn"}),
        "resmlp": ("digits", {"model": "resmlp"}),
        "resnet": ("mnist5k", {"model": "resnet"})}
RESIDUAL_NETS = ("resmlp", "resnet")
#: what runs by default (the residual nets: ``--nets resmlp,resnet``).
DEFAULT_NETS = ["fcn", "cnn"]
BATCHES = [8, 32, 128, 256]
VANILLA_MAX_BATCH = 32
QUICK = {"batches": [8], "rounds": 3, "memory_iterations": 2}

Step = Callable[[], None]


def _per_sample_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none")


def make_step(task: Task, column: str, seed: int = 0) -> Step:
    """One column's training iteration on the task's batches (seed: weights and batches)."""
    torch.manual_seed(seed)
    model: nn.Module = task.build_model(False)
    batches: Iterator[Any] = task.batches(seed)
    spec = COLUMNS[column]
    if spec is None:
        def vanilla() -> None:
            x, y = next(batches)
            vanilla_ddp_step(model, x, y, _per_sample_ce, damping=1.0, lr=1.0)
        return vanilla
    name, hp = spec
    if any(isinstance(m, Residual) for m in model.modules()):
        name, hp = as_chain(name, hp)
    opt = build_optimizer(name, model, hp)

    def step() -> None:
        train_step(model, opt, task.loss, next(batches))
    return step


def columns_for(net: str, batch: int, columns: list[str]) -> list[str]:
    """The columns that run at this net and batch (vanilla DDP: FCN, small batches; the
    residual columns on the residual nets, DDPNOpt-RMS and -EKFAC on the chains)."""
    excluded = CHAIN_COLUMNS if net in RESIDUAL_NETS else RESIDUAL_COLUMNS
    return [c for c in columns if c not in excluded and (
        c != "vanilla DDP" or (net == "fcn" and batch <= VANILLA_MAX_BATCH))]


def time_columns(task: Task, columns: list[str], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of ``rounds`` interleaved iterations per column, after one warm-up."""
    steps = {c: make_step(task, c) for c in columns}
    for step in steps.values():
        step()
    ms: dict[str, list[float]] = {c: [] for c in columns}
    for r in range(rounds):
        k = r % len(columns)
        for c in columns[k:] + columns[:k]:
            start = time.perf_counter()
            steps[c]()
            ms[c].append((time.perf_counter() - start) * 1e3)
    return ms


def memory_columns(task: Task, columns: list[str], iterations: int) -> dict[str, float | None]:
    """Peak RSS growth (MiB) of ``iterations`` iterations after a warm-up, per column."""
    return {c: peak_rss_growth(lambda c=c: make_step(task, c), warmup=1,
                               iterations=iterations, what=c) for c in columns}


def run_case(net: str, batch: int, columns: list[str], rounds: int,
             memory_iterations: int) -> dict[str, Any]:
    name, settings = NETS[net]
    task = make_task(load_dataset(name, seed=0), TaskSettings(batch_size=batch, **settings))
    cols = columns_for(net, batch, columns)
    ms = time_columns(task, cols, rounds)
    mib = memory_columns(task, cols, memory_iterations)
    return {"net": net, "dataset": name, "batch": batch, "columns": {
        c: {"ms_median": statistics.median(ms[c]), "ms_mean": statistics.fmean(ms[c]),
            "ms": ms[c], "peak_rss_growth_mib": mib[c]} for c in cols}}


# ----------------------------------------------------------------------------- report

def _ratio(case: dict[str, Any], col: str, ref: str, key: str) -> str:
    cols = case["columns"]
    if col not in cols:
        return "–"
    value = cols[col][key]
    if value is None:
        return "n/a"
    base = cols.get(ref, {}).get(key)
    return f"{value:.1f} ({value / base:.2f}x)" if base else f"{value:.1f}"


def markdown(summary: dict[str, Any]) -> str:
    cols = summary["columns"]
    head = "| net | batch | " + " | ".join(cols) + " |"
    rule = "|---|---|" + "---|" * len(cols)
    lines = ["# DDPNOpt's cost per iteration and peak memory, against Adam and EKFAC", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']['cpu']}, {summary['machine']['cpu_count']} cores, "
             f"torch {summary['machine']['torch']}, 1 thread; wall time "
             f"{summary['wall_s']:.0f} s; {summary['rounds']} interleaved rounds per case; "
             f"EKFAC refresh every {K} iterations.", ""]
    for key, title in [("ms_median", "Median ms per iteration (a plain iteration), and over "
                                      "Adam"),
                       ("ms_mean", f"Mean ms per iteration (refreshes every {K} included), "
                                   "and over Adam"),
                       ("peak_rss_growth_mib", f"Peak RSS growth (MiB) over "
                                               f"{summary['memory_iterations']} iterations "
                                               "after a refresh, and over Adam")]:
        lines += [title + ":", "", head, rule]
        for case in summary["cases"]:
            lines.append(f"| {case['net']} ({case['dataset']}) | {case['batch']} | "
                         + " | ".join(_ratio(case, c, "Adam", key) for c in cols) + " |")
        lines.append("")
    lines.append(f"vanilla DDP runs on the FCN up to batch {VANILLA_MAX_BATCH} only; the "
                 "DDPNOpt-chain and DGNOpt columns on the residual nets only (–).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 3 rounds")
    p.add_argument("--nets", default=",".join(DEFAULT_NETS), help="comma-separated subset of "
                   + ",".join(NETS))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--columns", default=",".join(COLUMNS))
    p.add_argument("--rounds", type=int, default=2 * K)
    p.add_argument("--out", default="experiments/results/ddpnopt-cost")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    columns = [c for c in args.columns.split(",") if c]
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise SystemExit(f"unknown column(s) {unknown}; choose from {', '.join(COLUMNS)}")
    nets = [n for n in args.nets.split(",") if n]
    if sorted(set(nets) - set(NETS)):
        raise SystemExit(f"unknown net(s) {sorted(set(nets) - set(NETS))}; choose from "
                         f"{', '.join(NETS)}")
    batches = [int(b) for b in args.batches.split(",")]
    rounds, mem_its = args.rounds, K
    if args.quick:
        batches, rounds, mem_its = QUICK["batches"], QUICK["rounds"], QUICK["memory_iterations"]
    start = time.perf_counter()
    cases = []
    for net in nets:
        for batch in batches:
            cases.append(run_case(net, batch, columns, rounds, mem_its))
            medians = {c: round(v["ms_median"], 2) for c, v in cases[-1]["columns"].items()}
            print(f"[{net} b={batch}] median ms {medians}", flush=True)
    summary = {"command": command_line(), "machine": machine_info(), "columns": columns,
               "rounds": rounds, "memory_iterations": mem_its, "update_freq": K,
               "quick": args.quick, "cases": cases, "wall_s": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    print((out / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
