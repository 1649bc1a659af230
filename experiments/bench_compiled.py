"""Benchmark: the compiled step attempt (``options={'compile': True}``) against the eager
engine, torchdiffeq and torchode (plain and under torch.compile).

A benchmark, not a test: it writes numbers to files and is run on purpose. Every contender
solves the same problem in one process, interleaved (one iteration of each, the order
rotating), 1 torch thread, each keeping its own clock; the report gives medians and the
median of the per-iteration ratios to torchdiffeq (a slow burst of the machine hits one
round alike). The compile time (the first call minus a timed call) is reported apart: it is
paid once per field and setting, and amortised over a training run.

Cases (ids for ``--cases``):
    mlp-bwd: the 2 -> 64 -> 2 tanh MLP field, batch 256, dopri5, rtol = atol = 1e-3,
        t in [0, 1], forward solve plus the backward of mean(y(1)^2): the adjoint for ours
        and torchdiffeq; torchode has no continuous adjoint of this kind that matches, so
        it backpropagates through its solver (``AutoDiffAdjoint``), and it controls the step
        of every batch row separately.
    mlp-fwd: the same, forward only (no graph).
    conv-bwd: two 3x3 time-concat convs, 64 channels, input 128 x 64 x 7 x 7, dopri5 1e-3,
        forward plus adjoint (the SNOpt image net's ODE block): the compiled path must not
        be slower there. torchode is left out (its states are (batch, features)).

torchode is optional (``pip install torchode``); without it its rows say so.

Usage:
    python experiments/bench_compiled.py                 # all cases
    python experiments/bench_compiled.py --quick         # 3 repeats (smoke run)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from torch import nn

import solvers
from ocnode.training.records import machine_info
from solvers.stats import SolverStats

OUT_DIR = Path(__file__).resolve().parent / "results"
REPEATS = {"mlp-bwd": 60, "mlp-fwd": 60, "conv-bwd": 6}
QUICK_REPEATS = 3
TOL = 1e-3
SEED = 0
#: reported for the same MLP case (fwd + adjoint) on a machine of this kind, not rerun here
#: (no JAX): diffrax (jit) and torchdiffeq
DIFFRAX_MS, TORCHDIFFEQ_REF_MS = 1.74, 11.8


class MLPField(nn.Module):
    """f(t, x) = W2 tanh(W1 x + b1) + b2, x of shape (batch, 2) (no counter: a changing
    attribute would make torch.compile recompile every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConcatConv(nn.Module):
    """A 3x3 convolution of [t, x] (t as one constant channel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([torch.ones_like(x[:, :1]) * t, x], dim=1))


class ConvField(nn.Module):
    """f(t, x) = conv2(t, relu(conv1(t, x))), x of shape (batch, 64, 7, 7)."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1, self.conv2 = ConcatConv(channels), ConcatConv(channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(t, torch.relu(self.conv1(t, x)))


class Counting(nn.Module):
    """Counts a field's evaluations for the contenders that do not report them."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func, self.nfe = func, 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.func(t, x)


def problem(case: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(SEED)
    if case.startswith("mlp"):
        return MLPField(), torch.randn(256, 2)
    return ConvField(), torch.randn(128, 64, 7, 7)


Run = Callable[[], int]  # one iteration; returns its NFE


def ours(func: nn.Module, y0: torch.Tensor, backward: bool, compile_: bool) -> Run:
    t, options = torch.tensor([0.0, 1.0]), {"compile": True} if compile_ else None

    def run() -> int:
        stats, adj = SolverStats(), SolverStats()
        if not backward:
            with torch.no_grad():
                solvers.odeint(func, y0, t, rtol=TOL, atol=TOL, options=options, stats=stats)
            return stats.nfe
        func.zero_grad(set_to_none=True)
        ys = solvers.odeint_adjoint(func, y0, t, rtol=TOL, atol=TOL, options=options,
                                    stats=stats, adjoint_stats=adj)
        ys[-1].pow(2).mean().backward()
        return stats.nfe + adj.nfe
    return run


def torchdiffeq_run(func: nn.Module, y0: torch.Tensor, backward: bool) -> Run:
    counted, t = Counting(func), torch.tensor([0.0, 1.0])

    def run() -> int:
        counted.nfe = 0
        if not backward:
            with torch.no_grad():
                torchdiffeq.odeint(counted, y0, t, rtol=TOL, atol=TOL, method="dopri5")
            return counted.nfe
        func.zero_grad(set_to_none=True)
        ys = torchdiffeq.odeint_adjoint(counted, y0, t, rtol=TOL, atol=TOL, method="dopri5",
                                        adjoint_params=tuple(func.parameters()))
        ys[-1].pow(2).mean().backward()
        return counted.nfe
    return run


def torchode_run(func: nn.Module, y0: torch.Tensor, backward: bool, compile_: bool) -> Run:
    import torchode

    term = torchode.ODETerm(lambda t, y: func(t, y))
    method = torchode.Dopri5(term=term)
    control = torchode.IntegralController(atol=TOL, rtol=TOL, term=term)
    solver = torchode.AutoDiffAdjoint(method, control)
    # torchode's own advice is torch.compile(solver), which compiles only forward (it has
    # none); its work is in solve
    solve: Any = torch.compile(solver.solve) if compile_ else solver.solve
    t_eval = torch.tensor([0.0, 1.0]).expand(y0.shape[0], 2)

    def run() -> int:
        func.zero_grad(set_to_none=True)
        problem_ = torchode.InitialValueProblem(y0=y0, t_eval=t_eval)
        with torch.set_grad_enabled(backward):
            sol = solve(problem_)
            if backward:
                sol.ys[:, -1].pow(2).mean().backward()
        return int(sol.stats["n_f_evals"].max())
    return run


def contenders(case: str) -> tuple[dict[str, Run], dict[str, str]]:
    """The runs of ``case`` and the contenders left out, with why."""
    backward = case.endswith("bwd")
    func, y0 = problem(case)
    runs = {"torchdiffeq": torchdiffeq_run(func, y0, backward),
            "ours": ours(func, y0, backward, False),
            "ours-compiled": ours(func, y0, backward, True)}
    left_out = {}
    if case.startswith("mlp") and importlib.util.find_spec("torchode") is None:
        left_out["torchode"] = "not installed (pip install torchode)"
    elif case.startswith("mlp"):
        runs["torchode"] = torchode_run(func, y0, backward, False)
        runs["torchode-compiled"] = torchode_run(func, y0, backward, True)
    return runs, left_out


def time_case(case: str, repeats: int) -> dict[str, Any]:
    """Interleaved timing of every contender on ``case``; a contender that fails is reported
    with its error and dropped."""
    (runs, failed), first = contenders(case), {}
    for name, run in list(runs.items()):
        start = time.perf_counter()
        try:
            run()
        except Exception as err:  # a contender that cannot run here is reported, not fatal
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            traceback.print_exc(file=sys.stderr)
            del runs[name]
            continue
        first[name] = (time.perf_counter() - start) * 1e3
    times: dict[str, list[float]] = {name: [] for name in runs}
    nfe: dict[str, int] = {}
    names = list(runs)
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            start = time.perf_counter()
            nfe[name] = runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return record(case, times, first, nfe, failed)


def record(case: str, times: dict[str, list[float]], first: dict[str, float],
           nfe: dict[str, int], failed: dict[str, str]) -> dict[str, Any]:
    ref = times["torchdiffeq"]
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rows[name] = {"median_ms": median,
                      "ratio_to_torchdiffeq": statistics.median(a / b for a, b in zip(ts, ref)),
                      "first_call_ms": first[name], "compile_s": (first[name] - median) / 1e3,
                      "nfe": nfe[name], "times_ms": ts}
    return {"case": case, "repeats": len(ref), "rows": rows, "failed": failed}


def markdown(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = ["# bench_compiled", "",
             f"Machine: {info.get('cpu', '?')}, torch {torch.__version__}, 1 thread; "
             "interleaved, medians; ratio = median of per-round ratios to torchdiffeq; "
             "compile = first call minus the median (once per field and setting).", "",
             "| case | contender | median ms | ratio to torchdiffeq | NFE | compile s |",
             "|---|---|---|---|---|---|"]
    for res in results:
        for name, row in res["rows"].items():
            compile_s = f"{row['compile_s']:.1f}" if "compiled" in name else "-"
            lines.append(f"| {res['case']} | {name} | {row['median_ms']:.2f} | "
                         f"{row['ratio_to_torchdiffeq']:.2f} | {row['nfe']} | {compile_s} |")
        for name, why in res["failed"].items():
            lines.append(f"| {res['case']} | {name} | failed: {why} | | | |")
    lines += ["", f"Reported for the mlp-bwd case on a machine of this kind, not rerun here (no "
              f"JAX): diffrax (jit) {DIFFRAX_MS} ms vs torchdiffeq {TORCHDIFFEQ_REF_MS} ms "
              f"({DIFFRAX_MS / TORCHDIFFEQ_REF_MS:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} repeats")
    parser.add_argument("--cases", default=",".join(REPEATS), help="comma-separated case ids")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(REPEATS))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(REPEATS)}")
    results = []
    for case in cases:
        results.append(time_case(case, QUICK_REPEATS if args.quick else REPEATS[case]))
        print(markdown(results[-1:], {}), flush=True)
    info = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_compiled.json").write_text(json.dumps(
        {"machine": info, "tol": TOL, "results": results}, indent=1))
    (args.out / "bench_compiled.md").write_text(markdown(results, info))
    print(f"wrote bench_compiled.json/.md to {args.out}")


if __name__ == "__main__":
    main()
