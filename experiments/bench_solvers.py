"""Benchmark: our engine (solvers.odeint / odeint_adjoint) against torchdiffeq.

A benchmark, not a test: it writes numbers to files and is run on purpose. Each timing case
builds one problem and times both engines in one process, interleaved (one iteration of
ours, one of torchdiffeq, alternating which goes first), with the same method and
tolerances. Every engine keeps its own list of times; the report gives medians, the ratio
ours / torchdiffeq, and the NFE of each (counted inside the vector field), so equal work can
be checked.

Cases (ids for ``--cases``, which takes comma-separated glob patterns):
    mlp-fwd-1e-3, mlp-fwd-1e-5, mlp-bwd-1e-3, mlp-bwd-1e-5:
        MLP vector field 2 -> 64 -> 2 (tanh), batch 256, dopri5, t in [0, 1]; "fwd" is the
        forward solve, "bwd" the forward solve plus the adjoint backward.
    conv-fwd-1e-3, conv-bwd-1e-3:
        two 3x3 convs, 64 channels, a t channel concatenated before each, ReLU between;
        input 128 x 64 x 7 x 7 (the size after the SNOpt MNIST stem); dopri5.
    memory:
        peak RSS of forward + backward for t1 in {1, 4, 16} on the MLP field plus a
        rotation (so that the number of steps grows with t1), batch 256, dopri5 at 1e-5: our
        adjoint, backprop through our solver (plain, and with step checkpoints), and
        torchdiffeq's adjoint, each in a fresh
        subprocess (VmHWM - VmRSS after set-up, the high-water mark reset in between).

Usage:
    python experiments/bench_solvers.py                     # everything, 20 repeats
    python experiments/bench_solvers.py --quick             # a few repeats (smoke run)
    python experiments/bench_solvers.py --cases 'mlp-*' --threads 1
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from torch import nn

import solvers
from ocnode.training.memory import read_status_kib
from ocnode.training.records import machine_info

# ---- configuration (CLI flags override the first three) ---------------------------------
REPEATS = 20
QUICK_REPEATS = 3
OUT_DIR = Path(__file__).resolve().parent / "results"
WARMUP = 1  # untimed iterations of each engine before timing
METHOD = "dopri5"
MLP_BATCH, MLP_HIDDEN = 256, 64
CONV_BATCH, CONV_CHANNELS, CONV_SIZE = 128, 64, 7
MEMORY_T1S = (1.0, 4.0, 16.0)
MEMORY_TOL = 1e-5
MEMORY_GAIN = 3.0  # scales the MLP's first layer so that the flow is not trivially smooth
MEMORY_OMEGA = math.pi  # half a turn per unit time: forward steps grow ~linearly with t1
MEMORY_MODES = ("ours-adjoint", "ours-backprop", "ours-checkpoint", "torchdiffeq-adjoint")
SEED = 0


# ---- vector fields ----------------------------------------------------------------------
class MLPField(nn.Module):
    """f(t, x) = W2 tanh(W1 x + b1) + b2 + omega J x, x of shape (batch, 2). Counts its calls.

    ``J`` is the 90-degree rotation: with ``omega > 0`` trajectories circle the origin
    ``omega / (2 pi)`` times per unit time, so the number of steps grows linearly with t1.
    ``gain`` scales ``W1`` at initialisation.
    """

    def __init__(self, hidden: int = MLP_HIDDEN, gain: float = 1.0, omega: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[0].weight.mul_(gain)
        self.register_buffer("rotation", omega * torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
        self.omega = omega
        self.nfe = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.net(x)
        return out + x @ self.rotation if self.omega else out


class ConcatConv(nn.Module):
    """A 3x3 convolution of [x, t] (t as one extra constant channel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([tt, x], dim=1))


class ConvField(nn.Module):
    """f(t, x) = conv2(t, relu(conv1(t, x))), x of shape (batch, C, H, W). Counts its calls."""

    def __init__(self, channels: int = CONV_CHANNELS) -> None:
        super().__init__()
        self.conv1, self.conv2 = ConcatConv(channels), ConcatConv(channels)
        self.nfe = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.conv2(t, torch.relu(self.conv1(t, x)))


# ---- cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One timing case: a problem, a tolerance, and forward-only or forward+backward."""

    id: str
    problem: str  # "mlp" or "conv"
    backward: bool
    tol: float


TIMING_CASES = (
    Case("mlp-fwd-1e-3", "mlp", False, 1e-3),
    Case("mlp-fwd-1e-5", "mlp", False, 1e-5),
    Case("mlp-bwd-1e-3", "mlp", True, 1e-3),
    Case("mlp-bwd-1e-5", "mlp", True, 1e-5),
    Case("conv-fwd-1e-3", "conv", False, 1e-3),
    Case("conv-bwd-1e-3", "conv", True, 1e-3),
)
ALL_IDS = tuple(c.id for c in TIMING_CASES) + ("memory",)


def make_problem(
    problem: str, gain: float = 1.0, omega: float = 0.0
) -> tuple[nn.Module, torch.Tensor]:
    """A freshly seeded vector field and initial state for ``problem``."""
    torch.manual_seed(SEED)
    if problem == "mlp":
        return MLPField(gain=gain, omega=omega), torch.randn(MLP_BATCH, 2)
    if problem == "conv":
        return ConvField(), torch.randn(CONV_BATCH, CONV_CHANNELS, CONV_SIZE, CONV_SIZE)
    raise ValueError(f"unknown problem {problem!r}")


def solve_fn(engine: str, adjoint: bool) -> Callable[..., torch.Tensor]:
    """The odeint of ``engine`` ('ours' or 'torchdiffeq'), with or without adjoint."""
    if engine == "ours":
        return solvers.odeint_adjoint if adjoint else solvers.odeint
    return torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint


def run_once(
    engine: str, func: nn.Module, y0: torch.Tensor, t: torch.Tensor, tol: float,
    backward: bool, adjoint: bool = True,
) -> int:
    """One solve (and backward, if asked) with ``engine``; returns the NFE it took."""
    func.zero_grad(set_to_none=True)
    func.nfe = 0
    solve = solve_fn(engine, adjoint)
    if backward:
        ys = solve(func, y0, t, rtol=tol, atol=tol, method=METHOD)
        ys[-1].pow(2).mean().backward()
    else:
        with torch.no_grad():
            solve(func, y0, t, rtol=tol, atol=tol, method=METHOD)
    return func.nfe


def time_case(case: Case, repeats: int) -> dict[str, Any]:
    """Interleaved timing of both engines on ``case``; returns its result record."""
    func, y0 = make_problem(case.problem)
    t = torch.tensor([0.0, 1.0])
    engines = ("ours", "torchdiffeq")
    times: dict[str, list[float]] = {e: [] for e in engines}
    nfe: dict[str, int] = {}
    for _ in range(WARMUP):
        for engine in engines:
            run_once(engine, func, y0, t, case.tol, case.backward)
    for i in range(repeats):
        for engine in engines if i % 2 == 0 else engines[::-1]:
            start = time.perf_counter()
            nfe[engine] = run_once(engine, func, y0, t, case.tol, case.backward)
            times[engine].append((time.perf_counter() - start) * 1e3)
    return timing_record(case, times, nfe)


def timing_record(case: Case, times: dict[str, list[float]], nfe: dict[str, int]) -> dict:
    """The JSON record of one timing case."""
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["torchdiffeq"])
    # The ratio is the median of per-repeat ratios: a slow burst of the machine hits both
    # engines of one repeat alike, so paired ratios survive bursts that shift the medians.
    paired = statistics.median(a / b for a, b in zip(times["ours"], times["torchdiffeq"]))
    return {
        "case": case.id, "problem": case.problem,
        "mode": "fwd+adjoint bwd" if case.backward else "fwd",
        "method": METHOD, "tol": case.tol,
        "ours_median_ms": ours, "torchdiffeq_median_ms": theirs, "ratio": paired,
        "ratio_of_medians": ours / theirs,
        "nfe_ours": nfe["ours"], "nfe_torchdiffeq": nfe["torchdiffeq"],
        "ours_ms": times["ours"], "torchdiffeq_ms": times["torchdiffeq"],
    }


# ---- memory (one fresh subprocess per configuration) ------------------------------------
def memory_worker(t1: float, mode: str) -> dict[str, Any]:
    """Peak RSS growth of one forward + backward; run in a fresh process."""
    engine, how = mode.split("-")
    func, y0 = make_problem("mlp", gain=MEMORY_GAIN, omega=MEMORY_OMEGA)
    stats = solvers.SolverStats()

    def run(horizon: float) -> int:
        func.zero_grad(set_to_none=True)
        func.nfe = 0
        t = torch.tensor([0.0, horizon])
        if how == "checkpoint":  # backprop through replayed steps (SolverSpec.checkpoint)
            spec = solvers.SolverSpec(METHOD, MEMORY_TOL, MEMORY_TOL, adjoint=False,
                                      checkpoint=True)
            ys = solvers.solve(func, y0, t, spec, stats=stats)
        else:
            solve = solve_fn(engine, how == "adjoint")
            kwargs = {"stats": stats} if engine == "ours" else {}
            ys = solve(func, y0, t, rtol=MEMORY_TOL, atol=MEMORY_TOL, method=METHOD, **kwargs)
        ys[-1].pow(2).mean().backward()
        return func.nfe

    run(0.05)  # warm-up: one-time allocations (kernels, thread pools) stay out of the delta
    stats.reset()
    gc.collect()
    rss_before = read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    nfe = run(t1)
    peak = read_status_kib("VmHWM")
    steps = stats.n_accepted + stats.n_rejected if engine == "ours" else None
    return {"t1": t1, "mode": mode, "peak_rss_delta_mib": (peak - rss_before) / 1024,
            "forward_steps": steps, "nfe": nfe}


def measure_memory(threads: int | None) -> list[dict[str, Any]]:
    """Run :func:`memory_worker` in a fresh subprocess for every (t1, mode)."""
    records = []
    for t1 in MEMORY_T1S:
        for mode in MEMORY_MODES:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker",
                   json.dumps({"t1": t1, "mode": mode})]
            if threads is not None:
                cmd += ["--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            records.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  memory t1={t1:g} {mode}: {records[-1]['peak_rss_delta_mib']:.1f} MiB")
    return records


# ---- reporting --------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: machine line, timing table, memory table."""
    m = result["machine"]
    lines = [
        "# bench_solvers",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs), torch {m['torch']} with "
        f"{m['torch_threads']} threads, torchdiffeq {m['torchdiffeq']}, Python {m['python']}. "
        f"Repeats: {result['settings']['repeats']} (interleaved; medians; ratio = median of "
        "the per-repeat ratios ours/torchdiffeq).",
        "",
        "| case | method | tol | ours median ms | torchdiffeq median ms | ratio | NFE ours "
        "| NFE torchdiffeq |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["timing"]:
        lines.append(
            f"| {r['problem']} {r['mode']} | {r['method']} | {r['tol']:g} "
            f"| {r['ours_median_ms']:.2f} | {r['torchdiffeq_median_ms']:.2f} "
            f"| {r['ratio']:.2f} | {r['nfe_ours']} | {r['nfe_torchdiffeq']} |"
        )
    lines += ["", *memory_markdown(result["memory"])]
    return "\n".join(lines) + "\n"


def memory_markdown(records: list[dict[str, Any]]) -> list[str]:
    """The memory table (peak RSS growth of forward + backward) as markdown lines."""
    if not records:
        return ["Memory: not run (select it with `--cases memory`)."]
    lines = [
        f"Peak RSS growth of forward + backward, MLP field plus a rotation (omega = "
        f"{MEMORY_OMEGA:.3g}), batch {MLP_BATCH}, {METHOD} at {MEMORY_TOL:g}, fresh process per "
        "row:",
        "",
        "| t1 | mode | peak RSS delta MiB | forward steps | NFE (fwd+bwd) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        steps = "-" if r["forward_steps"] is None else r["forward_steps"]
        lines.append(f"| {r['t1']:g} | {r['mode']} | {r['peak_rss_delta_mib']:.1f} "
                     f"| {steps} | {r['nfe']} |")
    return lines


def write_results(result: dict[str, Any], out: Path) -> None:
    """Write bench_solvers.json and bench_solvers.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_solvers.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_solvers.md").write_text(markdown(result))


# ---- command line -----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help=f"timed iterations (default "
                   f"{REPEATS}, {QUICK_REPEATS} with --quick)")
    p.add_argument("--quick", action="store_true", help="a few repeats (CI smoke run)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the result files")
    p.add_argument("--cases", default="*", help="comma-separated glob patterns over case ids: "
                   + ", ".join(ALL_IDS))
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own default)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else REPEATS
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def selected(patterns: str) -> list[str]:
    """Case ids matching any of the comma-separated glob ``patterns``."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [i for i in ALL_IDS if any(fnmatch.fnmatchcase(i, p) for p in pats)]
    if not chosen:
        raise SystemExit(f"--cases {patterns!r} matches none of {', '.join(ALL_IDS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases, print a summary, write the result files."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        spec = json.loads(args.memory_worker)
        print(json.dumps(memory_worker(float(spec["t1"]), spec["mode"])))
        return 0
    ids = selected(args.cases)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"repeats": args.repeats, "quick": args.quick, "threads": args.threads,
                     "warmup": WARMUP, "cases": ids},
        "cases": [asdict(c) for c in TIMING_CASES if c.id in ids],
        "timing": [], "memory": [],
    }
    print("machine:", json.dumps(result["machine"]))
    for case in TIMING_CASES:
        if case.id in ids:
            record = time_case(case, args.repeats)
            result["timing"].append(record)
            print(f"  {case.id}: ours {record['ours_median_ms']:.2f} ms, torchdiffeq "
                  f"{record['torchdiffeq_median_ms']:.2f} ms, ratio {record['ratio']:.2f}, "
                  f"NFE {record['nfe_ours']} vs {record['nfe_torchdiffeq']}")
    if "memory" in ids:
        result["memory"] = measure_memory(args.threads)
    assert all(math.isfinite(r["ratio"]) for r in result["timing"])
    write_results(result, args.out)
    print(f"wrote {args.out / 'bench_solvers.json'} and bench_solvers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
