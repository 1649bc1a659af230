"""Benchmark: what an SNOpt curvature refresh costs, by curvature mode, against Adam.

A benchmark, not a test: it writes its numbers to files. Adam, SNOpt with the stage curvature
(``curvature="stages"``: factors from the adjoint solve's own evaluations) and SNOpt with the
grid curvature (``curvature="grid"``: the field re-evaluated on 101 grid times) train copies of
the same initial model on the same batches in ONE process, INTERLEAVED (one iteration of
each in turn, the order rotating), each on its own clock, 1 torch thread. SNOpt refreshes
every ``PERIOD``-th iteration, so one loop gives refresh and non-refresh iterations; each
is divided by the Adam iteration of the same round (a paired ratio, which a burst of machine
load hitting the round leaves intact), and the amortised cost at refresh period K is
((K - 1) * non-refresh + refresh) / K. NFE per iteration are recorded.

Configurations:

* ``image``: the SNOpt paper's image net on Fashion-MNIST (a conv stem to 64 channels, an ODE
  block of two 3x3 time-concatenated convolutions, dopri5 at rtol = atol = 1e-3, the
  adjoint), batch 128, stem and head preconditioned too (``full=True``).
* ``user-mlp``: a vector field as users write it, an MLP that takes a scalar ``t`` (no
  per-row time), on a 20-feature, 4-class problem, dopri5, batch 128.

Memory: the peak RSS growth of two iterations (one of them a refresh) after a warm-up, each
mode in a forked child (:func:`ocnode.training.memory.peak_rss_growth`), for the image net at
t1 = 1 and t1 = 2 (the stage curvature keeps only small factor rows per step: flat in t1).

    python experiments/bench_refresh.py              # both configurations (~15 min)
    python experiments/bench_refresh.py --quick      # smoke run

Outputs: ``experiments/results/bench_refresh.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ocnode.data import load_dataset
from ocnode.nn import ODEBlock
from ocnode.training import NFECounter, TaskSettings, build_optimizer, make_task, train_step
from ocnode.training.memory import peak_rss_growth
from ocnode.training.records import command_line, machine_info
from solvers import SolverSpec

OUT_DIR = Path(__file__).resolve().parent / "results"
SOLVER = SolverSpec(method="dopri5", rtol=1e-3, atol=1e-3)
PERIOD = 4  # SNOpt refreshes every PERIOD-th iteration
ROUNDS = {"image": 24, "user-mlp": 120}
QUICK_ROUNDS = {"image": 4, "user-mlp": 8}
AMORTISED_K = (10, 20, 50, 100)
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("adam", {"lr": 1e-3}),
    "snopt-stages": ("snopt", {"lr": 0.02, "full": True, "curvature": "stages"}),
    "snopt-grid": ("snopt", {"lr": 0.02, "full": True, "curvature": "grid"}),
}
Batch = tuple[torch.Tensor, torch.Tensor]


class UserField(nn.Module):
    """dx/dt = MLP([x, t]) with a scalar t broadcast to the rows, as users write it."""

    def __init__(self, dim: int = 20, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t * torch.ones_like(x[:, :1])], 1))


def user_problem(quick: bool) -> tuple[Callable[[], nn.Module], Callable[[int], Batch]]:
    """The user-mlp model factory and its batches (4 Gaussian classes in 20-D, 10 % noise)."""
    gen = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(4, 20, generator=gen)

    def batch(i: int) -> Batch:
        g = torch.Generator().manual_seed(1000 + i)
        y = torch.randint(0, 4, (128,), generator=g)
        x = centres[y] + torch.randn(128, 20, generator=g)
        flip = torch.rand(128, generator=g) < 0.1
        return x, torch.where(flip, torch.randint(0, 4, (128,), generator=g), y)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(ODEBlock(UserField(hidden=16 if quick else 64), solver=SOLVER),
                             nn.Linear(20, 4))
    return model, batch


def image_problem(quick: bool, t1: float = 1.0) -> tuple[Callable[[], nn.Module],
                                                         Callable[[int], Batch]]:
    """The image net's model factory and its Fashion-MNIST batches."""
    data = load_dataset("fashion-mnist" if not quick else "mnist5k", seed=0,
                        subset=2000 if not quick else 500)
    task = make_task(data, TaskSettings(model="conv", width=8 if quick else 64,
                                        batch_size=32 if quick else 128, solver=SOLVER, t1=t1,
                                        test_size=100))
    batches = task.batches(0)
    cache: list[Batch] = []

    def batch(i: int) -> Batch:
        while len(cache) <= i:
            cache.append(next(batches))
        return cache[i]

    def model() -> nn.Module:
        torch.manual_seed(0)
        return task.build_model(True)
    return model, batch


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def build(mode: str, model: nn.Module) -> torch.optim.Optimizer:
    name, hp = MODES[mode]
    return build_optimizer(name, model, {**hp, "update_freq": PERIOD} if name == "snopt" else hp)


def time_config(config: str, quick: bool) -> dict[str, Any]:
    """Interleaved per-iteration times of every mode on one configuration."""
    make_model, batch = (image_problem if config == "image" else user_problem)(quick)
    models = {m: make_model() for m in MODES}
    opts = {m: build(m, models[m]) for m in MODES}
    counters = {m: NFECounter(models[m]) for m in MODES}
    order = list(MODES)
    rounds = (QUICK_ROUNDS if quick else ROUNDS)[config]
    rows = []
    for i in range(rounds + PERIOD):  # the first PERIOD rounds warm up
        row: dict[str, Any] = {"refresh": i % PERIOD == 0}
        for m in order[i % len(order):] + order[:i % len(order)]:
            start = time.perf_counter()
            train_step(models[m], opts[m], loss_fn, batch(i), counter=counters[m])
            row[f"{m}_ms"] = (time.perf_counter() - start) * 1e3
            row[f"{m}_nfe"] = counters[m].take()
        if i >= PERIOD:
            rows.append(row)
    return summarise(config, rows)


def summarise(config: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, paired ratios to Adam and the amortised ratios of each SNOpt mode."""
    out: dict[str, Any] = {"config": config, "period": PERIOD, "rounds": len(rows),
                           "adam_ms": statistics.median(r["adam_ms"] for r in rows)}
    for m in MODES:
        if m == "adam":
            continue
        plain = [r for r in rows if not r["refresh"]]
        fresh = [r for r in rows if r["refresh"]]
        r_plain = statistics.median(r[f"{m}_ms"] / r["adam_ms"] for r in plain)
        r_fresh = statistics.median(r[f"{m}_ms"] / r["adam_ms"] for r in fresh)
        out[m] = {
            "nonrefresh_ms": statistics.median(r[f"{m}_ms"] for r in plain),
            "refresh_ms": statistics.median(r[f"{m}_ms"] for r in fresh),
            "ratio_nonrefresh": r_plain, "ratio_refresh": r_fresh,
            "ratio_amortised": {k: ((k - 1) * r_plain + r_fresh) / k for k in AMORTISED_K},
            "nfe_refresh": sorted({tuple(r[f"{m}_nfe"]) for r in fresh}),
            "nfe_nonrefresh": sorted({tuple(r[f"{m}_nfe"]) for r in plain})}
    out["nfe_adam"] = sorted({tuple(r["adam_nfe"]) for r in rows})
    out["rows"] = rows
    return out


def memory(quick: bool) -> list[dict[str, Any]]:
    """Peak RSS growth of a refresh and a plain iteration, per mode, at t1 = 1 and 2."""
    out = []
    for t1 in (1.0, 2.0) if not quick else (1.0,):
        for mode in MODES:
            def prepare(mode: str = mode, t1: float = t1) -> Callable[[], None]:
                make_model, batch = image_problem(quick, t1)
                model = make_model()
                opt = build(mode, model)
                if hasattr(opt, "update_freq"):
                    opt.update_freq = 2  # warm-up refreshes, then plain, refresh
                steps = iter(range(10**6))

                def step() -> None:
                    train_step(model, opt, loss_fn, batch(next(steps)))
                return step
            mib = peak_rss_growth(prepare, warmup=1, iterations=2, what=f"{mode} t1={t1}")
            out.append({"t1": t1, "mode": mode, "peak_rss_growth_mib": mib})
            print(f"  memory t1={t1} {mode}: {mib} MiB", flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# bench_refresh", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}", "",
             "Per-iteration times, interleaved; ratios are medians of per-round ratios to the "
             f"Adam iteration of the same round; SNOpt refreshes every {PERIOD}th iteration.",
             "", "| config | mode | Adam ms | non-refresh ms (x Adam) | refresh ms (x Adam) | "
             "amortised x Adam at K = " + " / ".join(map(str, AMORTISED_K))
             + " | NFE refresh (fwd, bwd) | NFE Adam |", "|---|---|---|---|---|---|---|---|"]
    for rec in result["timing"]:
        for m in MODES:
            if m == "adam":
                continue
            r = rec[m]
            am = " / ".join(f"{r['ratio_amortised'][k]:.3f}" for k in AMORTISED_K)
            lines.append(f"| {rec['config']} | {m} | {rec['adam_ms']:.0f} | "
                         f"{r['nonrefresh_ms']:.0f} ({r['ratio_nonrefresh']:.2f}) | "
                         f"{r['refresh_ms']:.0f} ({r['ratio_refresh']:.2f}) | {am} | "
                         f"{r['nfe_refresh']} | {rec['nfe_adam']} |")
    lines += ["", "Peak RSS growth of two iterations (one a refresh), image net, forked child:",
              "", "| t1 | mode | MiB |", "|---|---|---|"]
    for rec in result["memory"]:
        mib = rec["peak_rss_growth_mib"]
        lines.append(f"| {rec['t1']:g} | {rec['mode']} | "
                     f"{'-' if mib is None else f'{mib:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (numbers not to quote)")
    parser.add_argument("--configs", default="image,user-mlp")
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    timing = []
    for config in args.configs.split(","):
        rec = time_config(config, args.quick)
        timing.append(rec)
        print(f"  {config}: Adam {rec['adam_ms']:.0f} ms; " + "; ".join(
            f"{m} refresh x{rec[m]['ratio_refresh']:.2f}, plain x{rec[m]['ratio_nonrefresh']:.2f}"
            for m in MODES if m != "adam"), flush=True)
    result = {"command": command_line(), "machine": machine_info(), "timing": timing,
              "memory": memory(args.quick), "total_s": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_refresh.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench_refresh.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
