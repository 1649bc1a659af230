"""Benchmark: SNOpt against Adam and SGD (speed, memory, time to accuracy).

A benchmark, not a test: it writes its numbers to files and is run on purpose. The machine it
was written on has 2 shared cores with slow bursts (3-25x for tens of seconds), so every
comparison runs its contenders in ONE process, INTERLEAVED (one iteration of A, one of B,
...), each with its own clock; reports give medians and paired ratios (the median of the
per-pair ratios, which a burst hitting both members of a pair leaves intact).

Parts (``--parts``, comma-separated):

timing
    Per-iteration wall time (zero_grad, forward, backward, step) of SNOpt and Adam on two
    copies of the same initial model, interleaved iteration by iteration (the order flips
    every pair), on the same batches: (a) the digits MLP-ODE classifier, (b) the conv ODE
    classifier on Fashion-MNIST, batch 128 both. Fixed-step rk4 (step 0.25) so that both take
    the same number of vector-field evaluations by construction; the NFE are recorded to show
    it. SNOpt runs with refresh period ``period`` (every period-th iteration refreshes), so
    one loop gives (i) non-refresh and (ii) refresh iterations, each paired with the Adam
    iteration next to it; (iii) the amortised cost at update_freq = 100 is
    (99 * non-refresh + refresh) / 100. One more refresh iteration runs under cProfile; the
    top entries and a per-phase summary go into the JSON.
memory
    Peak RSS growth of training iterations (fresh subprocess per configuration): set-up and
    two warm-up iterations at a short horizon (t1 = 0.25), then VmRSS is read, the
    high-water mark reset (``/proc/self/clear_refs`` <- 5), three iterations at t1 run
    (refresh, plain, refresh; SNOpt's update_freq = 2) and VmHWM read. Digits MLP-ODE, batch
    128, rk4 with step 0.05, so the solver takes 20 * t1 steps; t1 in {1, 2, 4, 8}. Modes:
    SNOpt with adjoint ODE blocks (curvature along the adjoint), K-FAC through the solver
    (adjoint=False + SNOpt: hooks on every solver evaluation), and Adam with the adjoint and
    with backprop through the solver as references. The workers run with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that freed buffers go back to the system and
    the high-water mark measures what the iterations need, not what malloc kept.
tta
    Time to accuracy: SNOpt, Adam and SGD with ALGORITHM.md's MNIST defaults, trained from
    the same initial model on the same batch sequence, interleaved step by step in one
    process per seed; each optimizer's clock counts its own training steps only (evaluation
    excluded) and stops at the wall-clock budget. Test accuracy every ``eval_every`` steps.
    Reported: the best test accuracy Adam reaches within the budget, the own-clock time SNOpt
    (and SGD) need to reach it, the ratio SNOpt/Adam, final accuracies; a plot of accuracy
    against own wall-clock.

Usage:
    python experiments/bench_snopt.py                        # everything (~40 min, 2 cores)
    python experiments/bench_snopt.py --quick                # smoke run (< 1 minute)
    python experiments/bench_snopt.py --parts timing --datasets digits
    python experiments/bench_snopt.py --parts tta --seeds 0,1,2 --budget-s 30,150
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ocnode.data import load_dataset
from ocnode.nn import ConvODEClassifier, MLPODEClassifier, ode_blocks
from ocnode.optim import SNOpt

from common import command_line, machine_info, read_status_kib

# ---- configuration (CLI flags override some of it) --------------------------------------
OUT_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("timing", "memory", "tta")
DATASETS = ("digits", "fashion-mnist")
THREADS = 1  # a shared 2-core machine: 2 threads fight the other users (several-fold slower)
BATCH = 128
METHOD, STEP_SIZE = "rk4", 0.25  # fixed step: equal NFE for every optimizer (16 fwd)
CHANNELS = 64  # conv ODE state channels
QUICK_CHANNELS = 16  # --quick only: a refresh of the 64-channel model alone takes ~35 s
FMNIST_TRAIN_SUBSET = 10_000  # stratified training subset (tta)
FMNIST_TEST_SUBSET = 1_500  # fixed random test subset evaluated during tta (10k takes ~1 min)
UPDATE_FREQ = 100  # SNOpt's refresh period K used for the amortised cost and in tta
# ALGORITHM.md section 1.6, MNIST row; full=True also preconditions stem and head (image
# classification, as the authors' scripts did).
SNOPT_KW: dict[str, Any] = dict(lr=0.02, eps=0.05, alpha=0.75, full=True)
ADAM_KW: dict[str, Any] = dict(lr=1e-3)
SGD_KW: dict[str, Any] = dict(lr=0.02, momentum=0.9)

# timing: SNOpt refreshes every `period` iterations; `refreshes` periods are timed after one
# untimed warm-up period; then one refresh runs under cProfile.
TIMING: dict[str, dict[str, Any]] = {
    "digits": dict(batch=BATCH, period=5, refreshes=40),
    "fashion-mnist": dict(batch=BATCH, period=5, refreshes=4, channels=CHANNELS)}
QUICK_TIMING: dict[str, dict[str, Any]] = {
    "digits": dict(batch=BATCH, period=3, refreshes=2),
    "fashion-mnist": dict(batch=16, period=2, refreshes=1, channels=QUICK_CHANNELS)}
PROFILE_TOP = 25

# memory
MEMORY_T1S = (1.0, 2.0, 4.0, 8.0)
MEMORY_STEP = 0.05  # rk4 step: 20 * t1 steps, 80 * t1 forward NFE
MEMORY_WARMUP_T1 = 0.25
MEMORY_MODES = ("snopt-adjoint", "kfac-through-solver", "adam-adjoint", "adam-backprop")
# --quick: one configuration per mode, both at once (worker start-up alone takes ~5-10 s)
QUICK_MEMORY_CONFIGS = ((1.0, "snopt-adjoint"), (2.0, "kfac-through-solver"))
MALLOC_MMAP_THRESHOLD = 65536
MEMORY_WORKERS = 2  # worker processes at a time

# tta: own-clock budget per optimizer (seconds), evaluation period (steps). The full run
# stays under ~40 minutes on 2 cores: 3 seeds x 3 optimizers x (20 s + 150 s) plus
# evaluations of the 1500-image Fashion-MNIST test subset (~8 s each, every 10 steps).
SEEDS = (0, 1, 2)
TTA: dict[str, dict[str, Any]] = {
    "digits": dict(batch=BATCH, budget_s=20.0, eval_every=10, train_subset=None,
                   test_subset=None),
    "fashion-mnist": dict(batch=BATCH, budget_s=150.0, eval_every=10,
                          train_subset=FMNIST_TRAIN_SUBSET, test_subset=FMNIST_TEST_SUBSET,
                          channels=CHANNELS)}
QUICK_TTA: dict[str, dict[str, Any]] = {
    "digits": dict(batch=BATCH, budget_s=1.0, eval_every=10, train_subset=None,
                   test_subset=None),
    "fashion-mnist": dict(batch=16, budget_s=2.0, eval_every=5, train_subset=2000,
                          test_subset=200, channels=QUICK_CHANNELS)}
OPTIMIZERS = ("snopt", "adam", "sgd")
EVAL_BATCH = 500


# ---- models, data, optimizers -----------------------------------------------------------
def make_model(dataset: str, method: str = METHOD, step_size: float = STEP_SIZE,
               adjoint: bool = True, t1: float = 1.0, channels: int = CHANNELS) -> nn.Module:
    """The classifier of ``dataset`` with a fixed-step ODE block."""
    block: dict[str, Any] = dict(method=method, options={"step_size": step_size},
                                 adjoint=adjoint, t1=t1)
    if dataset == "digits":
        return MLPODEClassifier(64, 10, hidden=64, **block)
    if dataset == "fashion-mnist":
        return ConvODEClassifier(in_channels=1, n_classes=10, channels=channels, **block)
    raise ValueError(f"unknown dataset {dataset!r}")


def load_data(dataset: str, train_subset: int | None = None, test_subset: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), images shaped (N, C, H, W) for the conv model."""
    train, test, info = load_dataset(dataset, seed=seed, subset=train_subset)
    (x_tr, y_tr), (x_te, y_te) = train.tensors, test.tensors
    if dataset != "digits":
        x_tr, x_te = x_tr.view(-1, *info["image_shape"]), x_te.view(-1, *info["image_shape"])
    if test_subset is not None and test_subset < len(y_te):
        keep = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(1234))
        x_te, y_te = x_te[keep[:test_subset]], y_te[keep[:test_subset]]
    return x_tr, y_tr, x_te, y_te


class Batches:
    """Endless shuffled mini-batches; the same seed gives the same sequence."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, min(batch, len(y))
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(y), generator=self.gen), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.y), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]


def make_optimizer(name: str, model: nn.Module,
                   update_freq: int = UPDATE_FREQ) -> torch.optim.Optimizer:
    """SNOpt / Adam / SGD with the configured hyperparameters."""
    if name == "snopt":
        return SNOpt(model, update_freq=update_freq, **SNOPT_KW)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **ADAM_KW)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **SGD_KW)
    raise ValueError(f"unknown optimizer {name!r}")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> float:
    """One plain iteration: zero_grad, forward, backward, step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def timed_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[float, float]:
    """(milliseconds, loss) of one :func:`train_step`."""
    start = time.perf_counter()
    loss = train_step(model, opt, x, y)
    return (time.perf_counter() - start) * 1e3, loss


def nfe(model: nn.Module) -> tuple[int, int]:
    """(forward, backward) vector-field evaluations of the last call, over all ODE blocks."""
    blocks = ode_blocks(model)
    return sum(b.nfe_forward for b in blocks), sum(b.nfe_backward for b in blocks)


def refresh_due(opt: SNOpt) -> bool:
    return opt.iteration % opt.update_freq == 0


# ---- part 1: timing ---------------------------------------------------------------------
def paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def time_dataset(dataset: str, batch: int, period: int, refreshes: int,
                 channels: int = CHANNELS) -> dict[str, Any]:
    """Interleaved per-iteration times of SNOpt (refresh every `period`) and Adam."""
    x_tr, y_tr, _, _ = load_data(dataset, train_subset=FMNIST_TRAIN_SUBSET
                                 if dataset != "digits" else None)
    torch.manual_seed(0)
    base = make_model(dataset, channels=channels)
    models = {"snopt": base, "adam": copy.deepcopy(base)}
    opts: dict[str, Any] = {
        "snopt": make_optimizer("snopt", models["snopt"], update_freq=period),
        "adam": make_optimizer("adam", models["adam"])}
    data = Batches(x_tr, y_tr, batch, seed=0)
    rows: list[dict[str, Any]] = []
    for i in range(period * (refreshes + 1)):
        x, y = data.next()
        refresh = refresh_due(opts["snopt"])
        row: dict[str, Any] = {"refresh": refresh}
        for name in ("snopt", "adam") if i % 2 == 0 else ("adam", "snopt"):
            row[f"{name}_ms"], row[f"{name}_loss"] = timed_step(models[name], opts[name], x, y)
            row[f"{name}_nfe"] = nfe(models[name])
        if i >= period:  # the first period (one refresh, then plain steps) is the warm-up
            rows.append(row)
    assert refresh_due(opts["snopt"])
    profile = profile_refresh(models["snopt"], opts["snopt"], *data.next())
    return {**timing_record(dataset, batch, period, rows, profile),
            "channels": channels if dataset != "digits" else None}


def timing_record(dataset: str, batch: int, period: int, rows: list[dict[str, Any]],
                  profile: dict[str, Any]) -> dict[str, Any]:
    """Medians, paired ratios and the amortised cost from the interleaved rows."""
    plain = [r for r in rows if not r["refresh"]]
    fresh = [r for r in rows if r["refresh"]]
    s_plain, a_plain = [r["snopt_ms"] for r in plain], [r["adam_ms"] for r in plain]
    s_fresh, a_fresh = [r["snopt_ms"] for r in fresh], [r["adam_ms"] for r in fresh]
    adam_all = [r["adam_ms"] for r in rows]
    med_plain, med_fresh = statistics.median(s_plain), statistics.median(s_fresh)
    med_adam = statistics.median(adam_all)
    r_plain, r_fresh = paired_median(s_plain, a_plain), paired_median(s_fresh, a_fresh)
    k = UPDATE_FREQ
    amortised = ((k - 1) * med_plain + med_fresh) / k
    return {
        "dataset": dataset,
        "model": "MLPODEClassifier" if dataset == "digits" else "ConvODEClassifier",
        "batch": batch, "method": METHOD, "step_size": STEP_SIZE, "refresh_period": period,
        "n_nonrefresh": len(plain), "n_refresh": len(fresh),
        "snopt_nonrefresh_median_ms": med_plain, "snopt_refresh_median_ms": med_fresh,
        "adam_median_ms": med_adam,
        "ratio_nonrefresh": r_plain, "ratio_refresh": r_fresh,
        "update_freq": k, "snopt_amortised_ms": amortised,
        "ratio_amortised": ((k - 1) * r_plain + r_fresh) / k,
        "ratio_amortised_of_medians": amortised / med_adam,
        "nfe_snopt": sorted({tuple(r["snopt_nfe"]) for r in rows}),
        "nfe_adam": sorted({tuple(r["adam_nfe"]) for r in rows}),
        "targets": {"amortised_max": 1.0, "refresh_max": 3.0},
        "rows": rows, "refresh_profile": profile,
    }


def profile_refresh(model: nn.Module, opt: SNOpt, x: torch.Tensor,
                    y: torch.Tensor) -> dict[str, Any]:
    """One refresh iteration under cProfile: top entries and a per-phase summary."""
    prof = cProfile.Profile()
    clock = [time.perf_counter()]
    prof.enable()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    clock.append(time.perf_counter())
    loss.backward()
    clock.append(time.perf_counter())
    opt.step()
    clock.append(time.perf_counter())
    prof.disable()
    wall = clock[3] - clock[0]
    split = {"forward_s": clock[1] - clock[0], "backward_s": clock[2] - clock[1],
             "optimizer_step_s": clock[3] - clock[2]}
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    entries = [{"function": _label(key), "ncalls": nc, "tottime_s": tt, "cumtime_s": ct}
               for key, (_cc, nc, tt, ct, _callers) in stats.items()]
    by_cum = sorted(entries, key=lambda e: -e["cumtime_s"])[:PROFILE_TOP]
    by_tot = sorted(entries, key=lambda e: -e["tottime_s"])[:PROFILE_TOP]
    return {"wall_s": wall, "phases": {**split, **_phases(entries, wall)},
            "top_cumulative": by_cum,
            "top_tottime": by_tot}


def _label(key: tuple[str, int, str]) -> str:
    """'pkg/file.py:line(func)' without machine paths."""
    filename, line, func = key
    for root in ("ocnode/", "solvers/", "torch/", "experiments/"):
        pos = filename.rfind("/" + root)
        if pos >= 0:
            return f"{filename[pos + 1:]}:{line}({func})"
    return f"{os.path.basename(filename)}:{line}({func})" if filename != "~" else func


def _cum(entries: list[dict[str, Any]], file_part: str, func: str) -> float:
    return sum(e["cumtime_s"] for e in entries
               if file_part in e["function"] and e["function"].endswith(f"({func})"))


def _phases(entries: list[dict[str, Any]], wall: float) -> dict[str, float]:
    """Seconds in the parts of a refresh iteration (cProfile cumulative times)."""
    evaluate = _cum(entries, "ocnode/curvature.py", "_evaluate")
    add = _cum(entries, "ocnode/curvature.py", "add")
    factor = _cum(entries, "ocnode/curvature.py", "factor_sums")
    rows = (_cum(entries, "ocnode/curvature.py", "input_rows")
            + _cum(entries, "ocnode/curvature.py", "output_rows"))
    return {
        "total_iteration_s": wall,
        "curvature_observer_total_s": evaluate,
        "curvature_F_and_VJP_on_grid_s": evaluate - add,
        "curvature_factor_matmuls_s": factor,
        "curvature_rows_unfold_s": rows,
        "curvature_other_in_add_s": add - factor - rows,
        "eigendecomposition_s": _cum(entries, "ocnode/optim/functional.py", "eigenbasis"),
        "precondition_s": _cum(entries, "ocnode/optim/snopt.py", "_precondition"),
        "adjoint_backward_total_s": _cum(entries, "solvers/adjoint.py", "backward"),
    }


def run_timing(datasets: list[str], quick: bool) -> list[dict[str, Any]]:
    records = []
    for dataset in datasets:
        cfg = (QUICK_TIMING if quick else TIMING)[dataset]
        rec = time_dataset(dataset, **cfg)
        records.append(rec)
        print(f"  timing {dataset}: Adam {rec['adam_median_ms']:.1f} ms, SNOpt non-refresh "
              f"{rec['snopt_nonrefresh_median_ms']:.1f} ms (x{rec['ratio_nonrefresh']:.2f}), "
              f"refresh {rec['snopt_refresh_median_ms']:.1f} ms (x{rec['ratio_refresh']:.2f}),"
              f" amortised x{rec['ratio_amortised']:.3f}; NFE {rec['nfe_snopt']} vs "
              f"{rec['nfe_adam']}", flush=True)
    return records


# ---- part 2: memory (one fresh subprocess per configuration) ----------------------------
def memory_worker(t1: float, mode: str) -> dict[str, Any]:
    """Peak RSS growth of three training iterations at horizon t1; run in a fresh process."""
    opt_name, how = mode.split("-", 1)
    adjoint = how in ("adjoint",)
    x_tr, y_tr, _, _ = load_data("digits")
    torch.manual_seed(0)
    model = make_model("digits", step_size=MEMORY_STEP, adjoint=adjoint, t1=MEMORY_WARMUP_T1)
    opt = make_optimizer("adam" if opt_name == "adam" else "snopt", model, update_freq=2)
    data = Batches(x_tr, y_tr, BATCH, seed=0)
    block = ode_blocks(model)[0]
    for _ in range(2):  # warm-up: a refresh and a plain step at a short horizon
        train_step(model, opt, *data.next())
    block.set_t1(t1)
    batches = [data.next() for _ in range(3)]
    gc.collect()
    rss_before = read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    refreshes = 0
    for x, y in batches:
        refreshes += int(isinstance(opt, SNOpt) and refresh_due(opt))
        train_step(model, opt, x, y)
    peak = read_status_kib("VmHWM")
    return {"t1": t1, "mode": mode, "peak_rss_delta_mib": (peak - rss_before) / 1024,
            "rss_before_mib": rss_before / 1024, "solver_steps": block.stats.n_accepted,
            "nfe_forward": block.nfe_forward, "nfe_backward": block.nfe_backward,
            "iterations": len(batches), "refresh_iterations": refreshes}


def run_memory(quick: bool, threads: int) -> dict[str, Any]:
    configs = (list(QUICK_MEMORY_CONFIGS) if quick else
               [(t1, mode) for t1 in MEMORY_T1S for mode in MEMORY_MODES])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD))

    def worker(spec: tuple[float, str]) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
               "--memory-worker", json.dumps({"t1": spec[0], "mode": spec[1]})]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    # Peak RSS is per process, so two workers may run at once (start-up dominates).
    with ThreadPoolExecutor(MEMORY_WORKERS) as pool:
        records = list(pool.map(worker, configs))
    for rec in records:
        print(f"  memory t1={rec['t1']:g} {rec['mode']}: {rec['peak_rss_delta_mib']:.1f} MiB, "
              f"{rec['solver_steps']} steps, NFE {rec['nfe_forward']}+{rec['nfe_backward']}",
              flush=True)
    growth = {}
    t1s = sorted({t1 for t1, _ in configs})
    for mode in dict.fromkeys(mode for _, mode in configs):
        peaks = [r["peak_rss_delta_mib"] for r in records if r["mode"] == mode]
        if len(peaks) > 1:  # peak at the last t1 over peak at the first
            growth[mode] = peaks[-1] / peaks[0] if peaks[0] > 0 else float("nan")
    return {"records": records, "growth_first_to_last": growth,
            "t1s": t1s, "target_snopt_growth_max": 1.1}


# ---- part 3: time to accuracy -----------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(y), EVAL_BATCH):
        correct += int((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum())
    return correct / len(y)


def tta_seed(dataset: str, seed: int, batch: int, budget_s: float, eval_every: int,
             train_subset: int | None, test_subset: int | None,
             channels: int = CHANNELS) -> dict[str, Any]:
    """Train SNOpt, Adam and SGD interleaved from one initial model; curves per optimizer."""
    x_tr, y_tr, x_te, y_te = load_data(dataset, train_subset, test_subset, seed=seed)
    torch.manual_seed(seed)
    base = make_model(dataset, channels=channels)
    models = {n: copy.deepcopy(base) for n in OPTIMIZERS}
    opts: dict[str, Any] = {n: make_optimizer(n, models[n]) for n in OPTIMIZERS}
    data = {n: Batches(x_tr, y_tr, batch, seed=seed) for n in OPTIMIZERS}
    acc0 = accuracy(base, x_te, y_te)
    runs: dict[str, dict[str, Any]] = {
        n: {"clock_s": 0.0, "steps": 0, "losses": [], "done": False, "refreshes": 0,
            "curve": [{"step": 0, "time_s": 0.0, "test_acc": acc0, "train_loss": None}]}
        for n in OPTIMIZERS}
    turn = 0
    while not all(r["done"] for r in runs.values()):
        order = OPTIMIZERS[turn % 3:] + OPTIMIZERS[:turn % 3]  # rotate who goes first
        turn += 1
        for name in order:
            run = runs[name]
            if run["done"]:
                continue
            if name == "snopt":
                run["refreshes"] += int(refresh_due(opts[name]))
            ms, loss = timed_step(models[name], opts[name], *data[name].next())
            run["clock_s"] += ms / 1e3
            run["steps"] += 1
            run["losses"].append(loss)
            run["done"] = run["clock_s"] >= budget_s or not math.isfinite(loss)
            if run["steps"] % eval_every == 0 or run["done"]:
                run["curve"].append({"step": run["steps"], "time_s": run["clock_s"],
                                     "test_acc": accuracy(models[name], x_te, y_te),
                                     "train_loss": statistics.fmean(run["losses"])})
                run["losses"] = []
    for run in runs.values():
        del run["losses"], run["done"]
    return {"dataset": dataset, "seed": seed, "runs": runs}


def first_time_reaching(curve: list[dict[str, Any]], level: float) -> float | None:
    return next((p["time_s"] for p in curve if p["test_acc"] >= level - 1e-12), None)


def tta_summary(seed_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed: Adam's best accuracy and everyone's own-clock time to reach it."""
    per_seed = []
    for sr in seed_runs:
        runs = sr["runs"]
        target = max(p["test_acc"] for p in runs["adam"]["curve"])
        entry: dict[str, Any] = {"seed": sr["seed"], "adam_best_acc": target}
        for name in OPTIMIZERS:
            curve = runs[name]["curve"]
            entry[f"{name}_time_to_adam_best_s"] = first_time_reaching(curve, target)
            entry[f"{name}_final_acc"] = curve[-1]["test_acc"]
            entry[f"{name}_best_acc"] = max(p["test_acc"] for p in curve)
            entry[f"{name}_steps"] = runs[name]["steps"]
            entry[f"{name}_clock_s"] = runs[name]["clock_s"]
        entry["snopt_refreshes"] = runs["snopt"]["refreshes"]
        t_adam = entry["adam_time_to_adam_best_s"]
        for name in ("snopt", "sgd"):
            t = entry[f"{name}_time_to_adam_best_s"]
            # None: not reached, or Adam never beat the initial model (t_adam = 0)
            entry[f"ratio_{name}_over_adam"] = None if t is None or not t_adam else t / t_adam
        per_seed.append(entry)
    ratios = [e["ratio_snopt_over_adam"] for e in per_seed]
    reached = [r for r in ratios if r is not None]
    return {
        "per_seed": per_seed,
        "snopt_reached_adam_best": f"{len(reached)}/{len(ratios)}",
        "ratio_snopt_over_adam_median": (statistics.median(reached)
                                         if len(reached) == len(ratios) else None),
        "mean_final_acc": {n: statistics.fmean(e[f"{n}_final_acc"] for e in per_seed)
                           for n in OPTIMIZERS},
        "mean_adam_best_acc": statistics.fmean(e["adam_best_acc"] for e in per_seed),
        "target_ratio_max": 0.5,
    }


def run_tta(datasets: list[str], seeds: list[int], quick: bool,
            budgets: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in datasets:
        cfg: dict[str, Any] = dict((QUICK_TTA if quick else TTA)[dataset])
        if dataset in budgets:
            cfg["budget_s"] = budgets[dataset]
        seed_runs = []
        for seed in seeds:
            start = time.perf_counter()
            seed_runs.append(tta_seed(dataset, seed, **cfg))
            runs = seed_runs[-1]["runs"]
            print(f"  tta {dataset} seed {seed} ({time.perf_counter() - start:.0f} s): "
                  + ", ".join(f"{n} {runs[n]['curve'][-1]['test_acc']:.3f} after "
                              f"{runs[n]['steps']} steps" for n in OPTIMIZERS), flush=True)
        out[dataset] = {"config": cfg, "seeds": seed_runs, "summary": tta_summary(seed_runs)}
    return out


def plot_tta(tta: dict[str, Any], path: Path) -> None:
    """Test accuracy against own wall-clock, one line per optimizer and seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"snopt": "tab:red", "adam": "tab:blue", "sgd": "tab:green"}
    fig, axes = plt.subplots(1, len(tta), figsize=(6 * len(tta), 4.2), squeeze=False)
    for ax, (dataset, res) in zip(axes[0], tta.items()):
        for sr in res["seeds"]:
            for name in OPTIMIZERS:
                curve = sr["runs"][name]["curve"]
                ax.plot([p["time_s"] for p in curve], [p["test_acc"] for p in curve],
                        color=colors[name], alpha=0.8, lw=1.2,
                        label=name if sr is res["seeds"][0] else None)
        ax.axhline(res["summary"]["mean_adam_best_acc"], color="gray", ls=":", lw=1,
                   label="Adam best (mean)")
        ax.set(title=f"{dataset} (one line per seed)", xlabel="own training wall-clock (s)",
               ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- reporting --------------------------------------------------------------------------
def _load(load: list[float] | None) -> str:
    return "unknown" if load is None else ", ".join(f"{v:.2f}" for v in load)


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# bench_snopt", "",
             f"Command: `{result['command']}`  ", f"Total runtime: {result['runtime_s']:.0f} s  ",
             f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, shared), torch {m['torch']} with "
             f"{m['torch_threads']} thread(s), Python {m['python']}. Load average at start: "
             f"{_load(m['loadavg_at_start'])}.", "",
             f"SNOpt: {SNOPT_KW}, K = {UPDATE_FREQ}; Adam: {ADAM_KW}; SGD: {SGD_KW}. ODE blocks: "
             f"{METHOD}, step {STEP_SIZE} (16 forward NFE), adjoint. Digits: MLPODEClassifier "
             "(64 -> ODE of width 64 -> 10); Fashion-MNIST: ConvODEClassifier.", ""]
    if result["settings"]["quick"]:
        lines += ["**--quick: smoke-run settings (tiny budgets; Fashion-MNIST with batch 16 and "
                  f"{QUICK_CHANNELS} channels). Do not quote these numbers.**", ""]
    lines += timing_markdown(result.get("timing"))
    lines += memory_markdown(result.get("memory"))
    lines += tta_markdown(result.get("tta"))
    return "\n".join(lines) + "\n"


def timing_markdown(records: list[dict[str, Any]] | None) -> list[str]:
    if not records:
        return ["## Timing", "", "Not run.", ""]
    lines = ["## Timing (per iteration, interleaved SNOpt/Adam pairs)", "",
             "Ratios are medians of per-pair ratios SNOpt/Adam. Amortised = (99 non-refresh + "
             "1 refresh) / 100. Targets: amortised <= 1.0x, refresh <= 3x.", "",
             "| dataset | batch | channels | Adam ms | SNOpt non-refresh ms | ratio | SNOpt "
             "refresh ms | ratio | amortised ms | amortised ratio | pairs (plain/refresh) "
             "| NFE fwd,bwd SNOpt / Adam |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['dataset']} | {r['batch']} | {r['channels'] or '-'} "
            f"| {r['adam_median_ms']:.1f} "
            f"| {r['snopt_nonrefresh_median_ms']:.1f} | {r['ratio_nonrefresh']:.2f} "
            f"| {r['snopt_refresh_median_ms']:.1f} | {r['ratio_refresh']:.2f} "
            f"| {r['snopt_amortised_ms']:.1f} | {r['ratio_amortised']:.3f} "
            f"| {r['n_nonrefresh']}/{r['n_refresh']} | {r['nfe_snopt']} / {r['nfe_adam']} |")
    lines += ["", "NFE: the refresh iterations take one more backward evaluation (the "
              "vector field at the end of the last step, for the dense output at the "
              "curvature grid times).", "",
              "Where a refresh iteration spends its time (one refresh under cProfile, seconds; "
              "curvature_* are parts of the observer, which runs inside backward and, for the "
              "last buffered chunk, inside the optimizer step):", "",
              "| phase | " + " | ".join(r["dataset"] for r in records) + " |",
              "|---|" + "---|" * len(records)]
    for key in records[0]["refresh_profile"]["phases"]:
        lines.append(f"| {key} | " + " | ".join(
            f"{r['refresh_profile']['phases'][key]:.3f}" for r in records) + " |")
    return lines + [""]


def memory_markdown(mem: dict[str, Any] | None) -> list[str]:
    if not mem:
        return ["## Memory", "", "Not run.", ""]
    lines = ["## Memory (peak RSS growth over 3 iterations incl. 2 refreshes)", "",
             f"Digits MLP-ODE, batch {BATCH}, rk4 step {MEMORY_STEP} (20 t1 steps), fresh "
             "process per row, MALLOC_MMAP_THRESHOLD_=65536.", "",
             "| t1 | mode | peak RSS delta MiB | solver steps | NFE fwd | NFE bwd |",
             "|---|---|---|---|---|---|"]
    for r in mem["records"]:
        lines.append(f"| {r['t1']:g} | {r['mode']} | {r['peak_rss_delta_mib']:.1f} "
                     f"| {r['solver_steps']} | {r['nfe_forward']} | {r['nfe_backward']} |")
    lines += ["", f"Growth from t1 = {mem['t1s'][0]:g} to {mem['t1s'][-1]:g} (target for "
              f"snopt-adjoint <= {mem['target_snopt_growth_max']}x): "
              + (", ".join(f"{k} {v:.2f}x" for k, v in mem["growth_first_to_last"].items())
                 or "n/a (one t1 per mode)"), ""]
    return lines


def tta_markdown(tta: dict[str, Any] | None) -> list[str]:
    if not tta:
        return ["## Time to accuracy", "", "Not run.", ""]
    lines = ["## Time to accuracy (own training clock, evaluation excluded)", "",
             "Target: SNOpt reaches Adam's best accuracy in <= 0.5x Adam's time. Times are "
             "those of the first evaluation at or above the level. "
             "Plot: bench_snopt_tta.png.", ""]
    for dataset, res in tta.items():
        c, s = res["config"], res["summary"]
        lines += [f"### {dataset}", "",
                  f"Budget {c['budget_s']:g} s per optimizer, batch {c['batch']}, eval every "
                  f"{c['eval_every']} steps, train subset {c['train_subset'] or 'all'}, test "
                  f"subset {c['test_subset'] or 'all'}"
                  + (f", {c['channels']} channels" if 'channels' in c else "") + ".", "",
                  "| seed | Adam best acc | Adam t (s) | SNOpt t (s) | SGD t (s) | SNOpt/Adam "
                  "| SGD/Adam | final acc SNOpt / Adam / SGD | steps SNOpt / Adam / SGD "
                  "| SNOpt refreshes |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in s["per_seed"]:
            lines.append(
                f"| {e['seed']} | {e['adam_best_acc']:.4f} | {_f(e['adam_time_to_adam_best_s'])}"
                f" | {_f(e['snopt_time_to_adam_best_s'])} | {_f(e['sgd_time_to_adam_best_s'])}"
                f" | {_f(e['ratio_snopt_over_adam'])} | {_f(e['ratio_sgd_over_adam'])} "
                f"| {e['snopt_final_acc']:.4f} / {e['adam_final_acc']:.4f} / "
                f"{e['sgd_final_acc']:.4f} | {e['snopt_steps']} / {e['adam_steps']} / "
                f"{e['sgd_steps']} | {e['snopt_refreshes']} |")
        lines += ["", f"SNOpt reached Adam's best in {s['snopt_reached_adam_best']} seeds; "
                  f"median ratio SNOpt/Adam: {_f(s['ratio_snopt_over_adam_median'])}; mean "
                  "final accuracy " + ", ".join(f"{k} {v:.4f}"
                                                for k, v in s["mean_final_acc"].items()), ""]
    return lines


# ---- command line -----------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (CI smoke run)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated, for timing and tta: {DATASETS}")
    p.add_argument("--seeds", default=None, help="tta seeds, comma-separated (default "
                   f"{','.join(map(str, SEEDS))}; --quick: 0)")
    p.add_argument("--budget-s", default=None, help="tta own-clock budget per optimizer in "
                   "seconds: one value for all datasets, or one per dataset (comma-separated, "
                   "in --datasets order)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the result files")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts, args.datasets = _csv(args.parts), _csv(args.datasets)
    for bad, allowed, what in ((set(args.parts) - set(PARTS), PARTS, "--parts"),
                               (set(args.datasets) - set(DATASETS), DATASETS, "--datasets")):
        if bad:
            p.error(f"{what}: unknown {sorted(bad)}; choose from {allowed}")
    args.seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else (
        [0] if args.quick else list(SEEDS))
    budgets: dict[str, float] = {}
    if args.budget_s:
        values = [float(v) for v in _csv(args.budget_s)]
        if len(values) not in (1, len(args.datasets)):
            p.error("--budget-s takes one value or one per dataset")
        budgets = {d: values[0] if len(values) == 1 else values[i]
                   for i, d in enumerate(args.datasets)}
    args.budgets = budgets
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        spec = json.loads(args.memory_worker)
        print(json.dumps(memory_worker(float(spec["t1"]), spec["mode"])))
        return 0
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": command_line(), "machine": machine_info(),
        "settings": {"quick": args.quick, "parts": args.parts, "datasets": args.datasets,
                     "seeds": args.seeds, "batch": BATCH, "method": METHOD,
                     "step_size": STEP_SIZE, "channels": CHANNELS, "update_freq": UPDATE_FREQ,
                     "snopt": SNOPT_KW, "adam": ADAM_KW, "sgd": SGD_KW},
    }
    print("command:", result["command"])
    print("machine:", json.dumps(result["machine"]), flush=True)
    runners = {"timing": lambda: run_timing(args.datasets, args.quick),
               "memory": lambda: run_memory(args.quick, args.threads),
               "tta": lambda: run_tta(args.datasets, args.seeds, args.quick, args.budgets)}
    result["part_runtime_s"] = {}
    for part in PARTS:
        if part in args.parts:
            part_start = time.perf_counter()
            result[part] = runners[part]()
            result["part_runtime_s"][part] = time.perf_counter() - part_start
    result["runtime_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_snopt.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "bench_snopt.md").write_text(markdown(result))
    if "tta" in result:
        plot_tta(result["tta"], args.out / "bench_snopt_tta.png")
    print(f"wrote {args.out}/bench_snopt.json, bench_snopt.md"
          + (", bench_snopt_tta.png" if "tta" in result else "")
          + f" in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
