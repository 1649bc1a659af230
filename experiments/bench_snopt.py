"""Benchmark: SNOpt against Adam and SGD (speed, memory, time to accuracy).

A benchmark, not a test: it writes its numbers to files and is run on purpose. The machine it
was written on has 2 shared cores with slow bursts (3-25x for tens of seconds), so every
comparison runs its contenders in ONE process, INTERLEAVED (one iteration of A, one of B,
...), each with its own clock; reports give medians and paired ratios (the median of the
per-pair ratios, which a burst hitting both members of a pair leaves intact).

Everything trains through the package's training core: the classification task of
:func:`ocnode.training.make_task` (digits: the MLP-ODE classifier; Fashion-MNIST: the conv ODE
classifier), optimizers from the registry (:func:`ocnode.training.build_optimizer`; "kfac" is
K-FAC through the solver), iterations of :func:`ocnode.training.train_step`, NFE from
:class:`ocnode.training.NFECounter` (backward counts include SNOpt's curvature evaluations on
refresh iterations, one call per batched chunk of grid samples).

Parts (``--parts``, comma-separated):

timing
    Per-iteration wall time (zero_grad, forward, backward, step) of SNOpt and Adam on two
    copies of the same initial model, interleaved iteration by iteration (the order flips
    every pair), on the same batches: (a) the digits MLP-ODE classifier, (b) the conv ODE
    classifier on Fashion-MNIST, batch 128 both. Fixed-step rk4 (step 0.25) so that both take
    the same number of forward vector-field evaluations by construction; the NFE are recorded
    to show it. SNOpt runs with refresh period ``period`` (every period-th iteration
    refreshes), so one loop gives (i) non-refresh and (ii) refresh iterations, each paired
    with the Adam iteration next to it; (iii) the amortised cost at update_freq = 100 is
    (99 * non-refresh + refresh) / 100. One more refresh iteration runs under cProfile; the
    top entries and a per-phase summary go into the JSON.
memory
    Peak RSS growth of training iterations, each configuration in a forked child
    (:func:`ocnode.training.memory.peak_rss_growth`: large blocks mmapped at 64 KiB, freed heap
    trimmed, the high-water mark reset before the measured iterations): set-up and two
    warm-up iterations at a short horizon (t1 = 0.25), then three iterations at t1 (refresh,
    plain, refresh; SNOpt's update_freq = 2). Digits MLP-ODE, batch 128, rk4 with step 0.05,
    so the solver takes 20 * t1 steps; t1 in {1, 2, 4, 8}. Modes: SNOpt with adjoint ODE
    blocks (curvature along the adjoint), K-FAC through the solver (the registry's "kfac":
    backprop through the solver, hooks on every solver evaluation), and Adam with the adjoint
    and with backprop through the solver as references. Solver steps and NFE are counted in
    the parent, by the same iterations run again unmeasured.
tta
    Time to accuracy: SNOpt, Adam and SGD with the SNOpt authors' MNIST defaults (Liu, Chen,
    Theodorou 2021), trained by the comparison harness (:func:`ocnode.training.compare.train_seed`)
    from the same initial model on the same batch sequence, interleaved step by step in one
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
import cProfile
import json
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ocnode.data import load_dataset
from ocnode.nn import ode_blocks
from ocnode.optim import SNOpt
from ocnode.training import NFECounter, Task, TaskSettings, build_optimizer, compare, make_task
from ocnode.training import train_step as core_step
from ocnode.training.memory import peak_rss_growth
from ocnode.training.records import command_line, machine_info
from solvers import SolverSpec

# ---- configuration (CLI flags override some of it) --------------------------------------
OUT_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("timing", "memory", "tta")
DATASETS = ("digits", "fashion-mnist")
THREADS = 1  # a shared 2-core machine: 2 threads fight the other users (several-fold slower)
BATCH = 128
METHOD, STEP_SIZE = "rk4", 0.25  # fixed step: equal NFE for every optimizer (16 fwd)
CHANNELS = 64  # conv ODE state channels
QUICK_CHANNELS = 16  # --quick only: a refresh of the 64-channel model alone takes ~35 s
FMNIST_TRAIN_SUBSET = 10_000  # stratified training subset (timing, tta)
FMNIST_TEST_SUBSET = 1_500  # fixed random test subset evaluated during tta (10k takes ~1 min)
UPDATE_FREQ = 100  # SNOpt's refresh period K used for the amortised cost and in tta
# The SNOpt authors' MNIST row; full=True also preconditions stem and head (image
# classification, as the authors' scripts did).
SNOPT_KW: dict[str, Any] = dict(lr=0.02, eps=0.05, alpha=0.75, full=True)
ADAM_KW: dict[str, Any] = dict(lr=1e-3)
SGD_KW: dict[str, Any] = dict(lr=0.02, momentum=0.9)
#: Registry name -> hyperparameters (over the registry's defaults, the harness's and the task's).
HPARAMS: dict[str, dict[str, Any]] = {
    "snopt": {**SNOPT_KW, "update_freq": UPDATE_FREQ}, "adam": ADAM_KW, "sgd": SGD_KW,
    "kfac": {**SNOPT_KW, "update_freq": UPDATE_FREQ}}

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
MEMORY_ITERATIONS = 3  # refresh, plain, refresh (update_freq 2)
#: mode -> (registry optimizer, ODE blocks with the adjoint)
MEMORY_MODES: dict[str, tuple[str, bool]] = {
    "snopt-adjoint": ("snopt", True), "kfac-through-solver": ("kfac", False),
    "adam-adjoint": ("adam", True), "adam-backprop": ("adam", False)}
# --quick: one configuration of each curvature mode
QUICK_MEMORY_CONFIGS = ((1.0, "snopt-adjoint"), (2.0, "kfac-through-solver"))

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


# ---- tasks, optimizers, iterations --------------------------------------------------------
def bench_task(dataset: str, batch: int = BATCH, channels: int = CHANNELS,
               step_size: float = STEP_SIZE, t1: float = 1.0, train_subset: int | None = None,
               test_subset: int | None = None, seed: int = 0) -> Task:
    """The classification task of ``dataset`` with fixed-step rk4 ODE blocks.

    Digits: the MLP-ODE classifier (width 64); Fashion-MNIST: the conv ODE classifier with
    ``channels`` channels. ``test_subset`` evaluates a fixed random subset (seed 1234).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    digits = dataset == "digits"
    settings = TaskSettings(model="mlp" if digits else "conv", width=64 if digits else channels,
                            batch_size=batch, t1=t1, test_size=test_subset,
                            solver=SolverSpec(method=METHOD, options={"step_size": step_size}),
                            eval_batch_size=EVAL_BATCH)
    return make_task(load_dataset(dataset, seed=seed, subset=train_subset), settings)


def optimizer(name: str, model: nn.Module, **changes: Any) -> torch.optim.Optimizer:
    """The registry optimizer ``name`` with this benchmark's hyperparameters and ``changes``."""
    return build_optimizer(name, model, {**HPARAMS[name], **changes})


def timed_step(task: Task, model: nn.Module, opt: torch.optim.Optimizer, batch: Any,
               counter: NFECounter) -> tuple[float, float]:
    """(milliseconds, loss) of one :func:`ocnode.training.train_step`."""
    start = time.perf_counter()
    loss = core_step(model, opt, task.loss, batch, counter=counter)
    return (time.perf_counter() - start) * 1e3, loss


def refresh_due(opt: SNOpt) -> bool:
    """Whether SNOpt's coming iteration refreshes its curvature."""
    return opt.iteration % opt.update_freq == 0


# ---- part 1: timing ---------------------------------------------------------------------
def paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def time_dataset(dataset: str, batch: int, period: int, refreshes: int,
                 channels: int = CHANNELS) -> dict[str, Any]:
    """Interleaved per-iteration times of SNOpt (refresh every `period`) and Adam."""
    task = bench_task(dataset, batch, channels,
                      train_subset=FMNIST_TRAIN_SUBSET if dataset != "digits" else None)
    models = {n: compare.build_model(task, n, seed=0) for n in ("snopt", "adam")}
    opts: dict[str, Any] = {"snopt": optimizer("snopt", models["snopt"], update_freq=period),
                            "adam": optimizer("adam", models["adam"])}
    counters = {n: NFECounter(m) for n, m in models.items()}
    batches = task.batches(0)
    rows: list[dict[str, Any]] = []
    for i in range(period * (refreshes + 1)):
        batch_ = next(batches)
        row: dict[str, Any] = {"refresh": refresh_due(opts["snopt"])}
        for name in ("snopt", "adam") if i % 2 == 0 else ("adam", "snopt"):
            row[f"{name}_ms"], row[f"{name}_loss"] = timed_step(
                task, models[name], opts[name], batch_, counters[name])
            row[f"{name}_nfe"] = counters[name].take()
        if i >= period:  # the first period (one refresh, then plain steps) is the warm-up
            rows.append(row)
    assert refresh_due(opts["snopt"])
    profile = profile_refresh(task, models["snopt"], opts["snopt"], next(batches))
    for counter in counters.values():
        counter.remove()
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


def profile_refresh(task: Task, model: nn.Module, opt: SNOpt, batch: Any) -> dict[str, Any]:
    """One refresh iteration (:func:`ocnode.training.train_step`) under cProfile: top entries and
    a per-phase summary (clock marks at the end of the loss and before the optimizer step)."""
    marks: dict[str, float] = {}

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        loss = task.loss(m, b)
        marks["forward"] = time.perf_counter()
        return loss

    handle = opt.register_step_pre_hook(
        lambda *_: marks.__setitem__("backward", time.perf_counter()))
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    core_step(model, opt, loss_fn, batch)
    prof.disable()
    end = time.perf_counter()
    handle.remove()
    wall = end - start
    split = {"forward_s": marks["forward"] - start,
             "backward_s": marks["backward"] - marks["forward"],
             "optimizer_step_s": end - marks["backward"]}
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
               if e["function"].startswith(file_part) and e["function"].endswith(f"({func})"))


def _phases(entries: list[dict[str, Any]], wall: float) -> dict[str, float]:
    """Seconds in the parts of a refresh iteration (cProfile cumulative times)."""
    curvature = "ocnode/curvature"  # the module or the package, whichever is installed
    evaluate = _cum(entries, curvature, "_evaluate")
    add = _cum(entries, curvature, "add")
    factor = _cum(entries, curvature, "factor_sums")
    rows = _cum(entries, curvature, "input_rows") + _cum(entries, curvature, "output_rows")
    return {
        "total_iteration_s": wall,
        "curvature_observer_total_s": evaluate,
        "curvature_F_and_VJP_on_grid_s": evaluate - add,
        "curvature_factor_matmuls_s": factor,
        "curvature_rows_unfold_s": rows,
        "curvature_other_in_add_s": add - factor - rows,
        "eigendecomposition_s": _cum(entries, "ocnode/optim/", "eigenbasis"),
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


# ---- part 2: memory (one forked child per configuration) ----------------------------------
def memory_setup(t1: float, mode: str) -> tuple[Task, nn.Module, torch.optim.Optimizer,
                                                list[Any]]:
    """(task, model, optimizer, the measured batches) of one memory configuration: built,
    warmed up by two iterations at MEMORY_WARMUP_T1, then set to the horizon ``t1``."""
    name, adjoint = MEMORY_MODES[mode]
    task = bench_task("digits", step_size=MEMORY_STEP, t1=MEMORY_WARMUP_T1)
    torch.manual_seed(0)
    model = task.build_model(adjoint)
    opt = optimizer(name, model, **({"update_freq": 2} if name != "adam" else {}))
    batches = task.batches(0)
    for _ in range(2):  # warm-up: a refresh and a plain step at a short horizon
        core_step(model, opt, task.loss, next(batches))
    ode_blocks(model)[0].set_t1(t1)
    return task, model, opt, [next(batches) for _ in range(MEMORY_ITERATIONS)]


def memory_peak(t1: float, mode: str) -> float | None:
    """Peak RSS growth (MiB) of the measured iterations, in a forked child (None: no probe)."""
    def prepare() -> Any:
        task, model, opt, batches = memory_setup(t1, mode)
        todo = iter(batches)

        def step() -> None:
            core_step(model, opt, task.loss, next(todo))
        return step

    return peak_rss_growth(prepare, warmup=0, iterations=MEMORY_ITERATIONS,
                           what=f"{mode} at t1={t1:g}")


def memory_facts(t1: float, mode: str) -> dict[str, Any]:
    """Solver steps and NFE of the last measured iteration, and the refresh count, from the
    same iterations run in this process (unmeasured)."""
    task, model, opt, batches = memory_setup(t1, mode)
    counter, refreshes = NFECounter(model), 0
    for batch_ in batches:
        refreshes += int(isinstance(opt, SNOpt) and refresh_due(opt))
        core_step(model, opt, task.loss, batch_, counter=counter)
        nfe_forward, nfe_backward = counter.take()
    counter.remove()
    if isinstance(opt, SNOpt):
        opt.close()
    return {"solver_steps": ode_blocks(model)[0].stats.n_accepted, "nfe_forward": nfe_forward,
            "nfe_backward": nfe_backward, "iterations": len(batches),
            "refresh_iterations": refreshes}


def run_memory(quick: bool) -> dict[str, Any]:
    configs = (list(QUICK_MEMORY_CONFIGS) if quick else
               [(t1, mode) for t1 in MEMORY_T1S for mode in MEMORY_MODES])
    records = []
    for t1, mode in configs:
        rec = {"t1": t1, "mode": mode, "peak_rss_delta_mib": memory_peak(t1, mode),
               **memory_facts(t1, mode)}
        records.append(rec)
        print(f"  memory t1={t1:g} {mode}: {_f(rec['peak_rss_delta_mib'], '.1f')} MiB, "
              f"{rec['solver_steps']} steps, NFE {rec['nfe_forward']}+{rec['nfe_backward']}",
              flush=True)
    growth = {}
    t1s = sorted({t1 for t1, _ in configs})
    for mode in dict.fromkeys(mode for _, mode in configs):
        peaks = [r["peak_rss_delta_mib"] for r in records if r["mode"] == mode]
        if len(peaks) > 1 and None not in peaks:  # peak at the last t1 over peak at the first
            growth[mode] = peaks[-1] / peaks[0] if peaks[0] > 0 else float("nan")
    return {"records": records, "growth_first_to_last": growth,
            "t1s": t1s, "target_snopt_growth_max": 1.1}


# ---- part 3: time to accuracy -----------------------------------------------------------
def tta_seed(dataset: str, seed: int, batch: int, budget_s: float, eval_every: int,
             train_subset: int | None, test_subset: int | None,
             channels: int = CHANNELS) -> dict[str, Any]:
    """SNOpt, Adam and SGD from one initial model, interleaved by the comparison harness
    (:func:`ocnode.training.compare.train_seed`); a curve per optimizer."""
    task = bench_task(dataset, batch, channels, train_subset=train_subset,
                      test_subset=test_subset, seed=seed)
    settings = {"optimizers": list(OPTIMIZERS), "seeds": [seed], "budget_s": budget_s,
                "eval_every": eval_every, "max_steps": None,
                "threads": torch.get_num_threads(), "hparams": HPARAMS}
    runs = compare.train_seed(task, seed, settings)
    return {"dataset": dataset, "seed": seed,
            "runs": {name: _tta_run(run) for name, run in runs.items()}}


def _tta_run(run: Any) -> dict[str, Any]:
    """One harness run as this benchmark records it: clock, steps, refreshes, curve."""
    opt = run.opt
    refreshes = -(-opt.iteration // opt.update_freq) if isinstance(opt, SNOpt) else 0
    curve = [{"step": int(r["step"]), "time_s": r["time_s"], "test_acc": r["test_acc"],
              "train_loss": r["train_loss"] if math.isfinite(r["train_loss"]) else None}
             for r in run.rows]
    return {"clock_s": run.clock, "steps": run.steps, "status": run.status,
            "refreshes": refreshes, "curve": curve}


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
    lines += ["", "NFE (forward, backward per iteration; ocnode.training.NFECounter): on refresh "
              "iterations the backward count includes SNOpt's curvature evaluations on the "
              "adjoint's grid (one call per batched chunk of grid samples).", "",
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
             f"Digits MLP-ODE, batch {BATCH}, rk4 step {MEMORY_STEP} (20 t1 steps), a forked "
             "child per row (ocnode.training.memory.peak_rss_growth, mmap threshold 64 KiB). "
             "NFE: the last iteration (a refresh).", "",
             "| t1 | mode | peak RSS delta MiB | solver steps | NFE fwd | NFE bwd |",
             "|---|---|---|---|---|---|"]
    for r in mem["records"]:
        lines.append(f"| {r['t1']:g} | {r['mode']} | {_f(r['peak_rss_delta_mib'], '.1f')} "
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
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": command_line(), "machine": machine_info(),
        "settings": {"quick": args.quick, "parts": args.parts, "datasets": args.datasets,
                     "seeds": args.seeds, "batch": BATCH, "method": METHOD,
                     "step_size": STEP_SIZE, "channels": CHANNELS, "update_freq": UPDATE_FREQ,
                     "snopt": SNOPT_KW, "adam": ADAM_KW, "sgd": SGD_KW, "hparams": HPARAMS},
    }
    print("command:", result["command"])
    print("machine:", json.dumps(result["machine"]), flush=True)
    runners = {"timing": lambda: run_timing(args.datasets, args.quick),
               "memory": lambda: run_memory(args.quick),
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
