"""The rows of Table 3 of the DDPNOpt paper (Liu, Chen, Theodorou, "Differential Dynamic
Programming Neural Optimizer", ICLR 2021) that run offline: the paper's FCN (model ``fcn``:
5 Linear layers with tanh) on WINE, DIGITS, MNIST-5k (the paper's MNIST row is full MNIST;
ours is the 5000-digit subset) and Fashion-MNIST, and the paper's CNN (model ``cnn``: 4 Conv2d
3x3 with 32 channels and 2 Linear layers) on MNIST-5k (row ``cnn-mnist5k``) and on
``fmnist32``, Fashion-MNIST padded to 3x32x32 (row ``cnn-fmnist32``: a STAND-IN of the
paper's SVHN and CIFAR-10 shape, not their task), trained by SGD-m, RMSprop, Adam, EKFAC,
E-MSA and DDPNOpt. The same protocol runs the nets of the DGNOpt paper (Liu, Chen,
Theodorou, "Dynamic Game Theoretic Neural Optimizer", ICML 2021), whose tables we do not
have: a residual MLP (rows ``resmlp-digits``, ``resmlp-fashion-mnist``) and a small ResNet
(rows ``resnet-mnist5k``, ``resnet-fmnist32``), with the columns DGNOpt-FNE and DGNOpt-GR.

Every optimizer goes through the training core (:func:`ocnode.training.build_optimizer`):

=========== =========================================================================
column      registry name and hyperparameters
=========== =========================================================================
SGD-m       ``sgd`` (momentum 0.9)
RMSprop     ``ddpnopt`` with ``base="rmsprop", feedback=False`` (torch's RMSprop)
Adam        ``adam``
EKFAC       ``ddpnopt`` with ``base="ekfac", feedback=False``
E-MSA       ``emsa`` (Li et al. 2018; 10 L-BFGS iterations per stage; its grid is over
            ``rho``, not a learning rate)
DDPNOpt     ``ddpnopt`` with ``base="rmsprop"`` (feedback on): the adaptive-diagonal
            base the paper uses for FCNs, paired with the RMSprop column
DGNOpt-FNE  ``dgnopt`` with ``mode="fne"`` (every layer a player), the row's base
DGNOpt-GR   ``dgnopt`` with ``mode="gr"`` (a block's layers cooperate), the row's base
=========== =========================================================================

On the residual rows DDPNOpt refuses the net, so every ``ddpnopt`` column runs as
``dgnopt`` with ``mode="chain"``: the DDPNOpt column is the net treated as a chain (the
skips ignored: each layer's feedback from its own input only), and the base columns
(feedback off) are their base optimizer exactly. The residual MLP rows use the RMSprop base
(as the FCN rows), the ResNet rows the EKFAC base (as the CNN rows) and leave out E-MSA.

Two columns not in the paper's table: ``DDPNOpt-Adam`` (``base="adam"``) and
``DDPNOpt-bounded`` (``base="rmsprop", max_feedback_ratio=1``: each layer's feedback term
capped at the norm of its base step).

The CNN rows follow the paper's choice of curvature for CNNs: their DDPNOpt columns take
``base="ekfac"`` (paired with the EKFAC column, and EKFAC's learning-rate grid), they run
at the paper's batch 128, on 3 seeds, tuned on the middle three rates of each grid with half
the budget (E-MSA: rho's whole grid), without DDPNOpt-Adam (per-row settings in
:data:`DATASETS`).

Protocol: per dataset, a learning-rate grid on a tuning seed (``TUNE_SEED``, not one of the
reported seeds), each rate scored by the mean training loss over the last fifth of the run
(the test split is not looked at); then every seed with the chosen rates. Within a seed all
five optimizers start from the same initial weights and see the same batches, and advance
interleaved (one iteration each in turn, the order rotating), each timed on its own clock.
Runs last a fixed number of iterations; the test accuracy after the last one is the cell.

WINE is not in :func:`ocnode.load_dataset`; :func:`load_wine` builds it here from sklearn
(seeded stratified 80/20 split, standardised with the training statistics).

Outputs under ``--out`` (default ``experiments/results/ddpnopt-table``): ``summary.json``,
``results.md``, ``curves.png`` (mean test accuracy against iteration per dataset).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ocnode.data import load_dataset
from ocnode.data.types import Dataset
from ocnode.optim import vanilla_ddp_step
from ocnode.training import TaskSettings, build_optimizer, make_task, train_step
from ocnode.training.compare import build_model
from ocnode.training.records import command_line, machine_info
from ocnode.training.tasks import Task

VANILLA = "vanilla-ddp"  # not a registry optimizer: :class:`VanillaDDP` below
#: column -> (registry name, fixed hyperparameters); the learning rate comes from the grid.
COLUMNS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD-m": ("sgd", {"momentum": 0.9}),
    "RMSprop": ("ddpnopt", {"base": "rmsprop", "feedback": False}),
    "Adam": ("adam", {}),
    "EKFAC": ("ddpnopt", {"base": "ekfac", "feedback": False}),
    "E-MSA": ("emsa", {"inner_steps": 10}),
    "DDPNOpt": ("ddpnopt", {"base": "rmsprop"}),
    # not in the paper's table: the other adaptive-diagonal base, and the feedback bounded
    "DDPNOpt-Adam": ("ddpnopt", {"base": "adam"}),
    "DDPNOpt-bounded": ("ddpnopt", {"base": "rmsprop", "max_feedback_ratio": 1.0}),
    # the DGNOpt paper's rows (residual nets)
    "DGNOpt-FNE": ("dgnopt", {"base": "rmsprop", "mode": "fne"}),
    "DGNOpt-GR": ("dgnopt", {"base": "rmsprop", "mode": "gr"}),
    # dense per-sample Q matrices (ocnode.optim.vanilla_ddp_step): the FCN rows only, and
    # only when asked for (--columns): an iteration takes 0.4 s (DIGITS, batch 32) to
    # 0.7 s (MNIST-5k, batch 64)
    "vanilla DDP": (VANILLA, {"lr": 1.0}),
}
#: the DDPNOpt paper's columns (the default of a row without its own list).
PAPER_COLUMNS = ["SGD-m", "RMSprop", "Adam", "EKFAC", "E-MSA", "DDPNOpt", "DDPNOpt-Adam",
                 "DDPNOpt-bounded"]
#: the hyperparameter each column's grid sets (``lr`` where not named here).
GRID_KEY = {"E-MSA": "rho", "vanilla DDP": "damping"}
#: learning-rate grid per column (DDPNOpt: its base's grid; E-MSA: rho, larger = smaller step).
LR_GRID: dict[str, list[float]] = {
    "SGD-m": [0.003, 0.01, 0.03, 0.1, 0.3],
    "RMSprop": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "Adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "EKFAC": [0.003, 0.01, 0.03, 0.1, 0.3],
    # E-MSA: one point more at the top (Fashion-MNIST's FCN row picked 3.0, the old top)
    "E-MSA": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
    "DDPNOpt": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "DDPNOpt-Adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "DDPNOpt-bounded": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "DGNOpt-FNE": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "DGNOpt-GR": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "vanilla DDP": [0.1, 0.3, 1.0, 3.0, 10.0],  # damping of Q_uu (larger = smaller step)
}
#: the paper's Table 3 (mean of 10 seeds; its MNIST row is full MNIST).
PAPER = {
    "wine": {"SGD-m": 94.35, "RMSprop": 98.10, "Adam": 98.13, "EKFAC": 94.60, "E-MSA": 93.56,
             "DDPNOpt": 98.18},
    "digits": {"SGD-m": 95.36, "RMSprop": 94.33, "Adam": 94.98, "EKFAC": 95.24,
               "E-MSA": 94.87, "DDPNOpt": 95.13},
    "mnist5k": {"SGD-m": 92.65, "RMSprop": 91.89, "Adam": 92.54, "EKFAC": 92.73,
                "E-MSA": 90.24, "DDPNOpt": 93.30},
    "fashion-mnist": {"SGD-m": 82.49, "RMSprop": 83.87, "Adam": 84.36, "EKFAC": 84.12,
                      "E-MSA": 82.04, "DDPNOpt": 84.98},
    "cnn-mnist5k": {"SGD-m": 97.94, "RMSprop": 98.05, "Adam": 98.04, "EKFAC": 98.02,
                    "E-MSA": 96.48, "DDPNOpt": 98.09},
    "cnn-fmnist32": {"SGD-m": 89.00, "RMSprop": 88.41, "Adam": 87.76, "EKFAC": 90.63,
                     "E-MSA": 79.45, "DDPNOpt": 90.70},
}
#: the paper's row each of ours is set beside (the stand-in: its SVHN row; CIFAR-10's in
#: the docs).
PAPER_ROW = {"mnist5k": "MNIST", "cnn-mnist5k": "CNN MNIST", "cnn-fmnist32": "CNN SVHN"}
#: per row: iterations per run, batch size, evaluation interval, seeds; optional: the
#: ``model`` (default fcn), the ``dataset`` (default the row's name), the ``base`` of the
#: feedback columns (default as in :data:`COLUMNS`), the ``columns`` it runs (default
#: :data:`PAPER_COLUMNS`), ``tune_iterations`` (default ``iterations``), ``grid`` (a slice
#: of each grid) and ``residual`` (a net with skips: see :func:`column_specs`).
CNN_ROW: dict[str, Any] = {
    "model": "cnn", "iterations": 400, "batch": 128, "eval_every": 25, "seeds": [0, 1, 2],
    "base": "ekfac", "tune_iterations": 200, "grid": slice(1, 4),
    "columns": ["SGD-m", "RMSprop", "Adam", "EKFAC", "E-MSA", "DDPNOpt", "DDPNOpt-bounded"]}
RESIDUAL_ROW: dict[str, Any] = {
    "residual": True,
    "columns": ["SGD-m", "Adam", "EKFAC", "E-MSA", "DDPNOpt", "DGNOpt-FNE", "DGNOpt-GR"]}
DATASETS: dict[str, dict[str, Any]] = {
    "wine": {"iterations": 800, "batch": 32, "eval_every": 20, "seeds": list(range(10))},
    "digits": {"iterations": 1500, "batch": 32, "eval_every": 50, "seeds": list(range(10))},
    "mnist5k": {"iterations": 2000, "batch": 64, "eval_every": 50, "seeds": list(range(10))},
    "fashion-mnist": {"iterations": 3000, "batch": 64, "eval_every": 100,
                      "seeds": list(range(10))},
    "cnn-mnist5k": {**CNN_ROW, "dataset": "mnist5k"},
    "cnn-fmnist32": {**CNN_ROW, "dataset": "fmnist32"},
    # the DGNOpt paper's nets: a residual MLP (2 identity blocks, width 32, tanh) and a small
    # ResNet (3 basic blocks, 16-32-64 channels, BatchNorm); E-MSA is left out of the ResNet
    # rows (one iteration takes ~18 s there: L-BFGS over each block's weights); their grids
    # reach one point lower than the CNN rows' (the feedback columns picked 0.01, the CNN
    # grid's lowest, in a first run)
    "resmlp-digits": {**RESIDUAL_ROW, "model": "resmlp", "dataset": "digits",
                      "iterations": 1500, "batch": 32, "eval_every": 50,
                      "seeds": list(range(5)), "base": "rmsprop",
                      "columns": ["RMSprop", *RESIDUAL_ROW["columns"]]},
    "resmlp-fashion-mnist": {**RESIDUAL_ROW, "model": "resmlp", "dataset": "fashion-mnist",
                             "iterations": 3000, "batch": 64, "eval_every": 100,
                             "seeds": [0, 1, 2], "base": "rmsprop", "grid": slice(1, 4),
                             "tune_iterations": 1000,
                             "columns": ["RMSprop", *RESIDUAL_ROW["columns"]]},
    "resnet-mnist5k": {**CNN_ROW, **RESIDUAL_ROW, "grid": slice(0, 4),
                       "model": "resnet", "dataset": "mnist5k",
                       "columns": [c for c in RESIDUAL_ROW["columns"] if c != "E-MSA"]},
    "resnet-fmnist32": {**CNN_ROW, **RESIDUAL_ROW, "grid": slice(0, 4),
                        "model": "resnet", "dataset": "fmnist32",
                        "columns": [c for c in RESIDUAL_ROW["columns"] if c != "E-MSA"]},
}
#: the rows that may run the vanilla DDP column (the FCNs: its memory grows as
#: (batch x width)^2).
VANILLA_ROWS = ("wine", "digits", "mnist5k", "fashion-mnist")
#: the rows the script runs by default (fashion-mnist and cnn-fmnist32 read the system
#: package's files; the CNN rows take an hour or more each on one core).
DEFAULT_ROWS = ["wine", "digits", "mnist5k"]
#: a DDPNOpt base -> the column that is that base alone.
BASE_COLUMN = {"ekfac": "EKFAC", "rmsprop": "RMSprop", "adam": "Adam", "sgd": "SGD-m"}
#: the columns whose base a row's ``base`` replaces.
DDPNOPT_COLUMNS = ("DDPNOpt", "DDPNOpt-bounded", "DGNOpt-FNE", "DGNOpt-GR")
WIDTH = 32
TUNE_SEED = 100
QUICK = {"iterations": 12, "eval_every": 4, "seeds": [0]}


# ----------------------------------------------------------------------------- data

def load_wine(seed: int = 0) -> Dataset:
    """sklearn's WINE (178 x 13, 3 classes): stratified 80/20 split seeded by ``seed``,
    both splits standardised with the training mean and std."""
    from sklearn.datasets import load_wine as sk_wine
    from sklearn.model_selection import train_test_split

    x, y = sk_wine(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y,
                                              random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)

    def tensors(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(((a - mean) / std).astype(np.float32)),
                             torch.from_numpy(b.astype(np.int64)))

    return Dataset(kind="classification", n_classes=3, name="wine", train=tensors(x_tr, y_tr),
                   test=tensors(x_te, y_te), input_dim=x.shape[1], n_train=len(y_tr),
                   n_train_available=len(y_tr), n_test=len(y_te), mean=mean, std=std,
                   source="sklearn.datasets.load_wine",
                   split=f"stratified 80/20 split, seed {seed}")


def make(name: str, batch: int) -> Task:
    """The task of row ``name`` (a key of :data:`DATASETS`) at this batch size."""
    cfg = DATASETS[name]
    data = cfg.get("dataset", name)
    ds = load_wine(0) if data == "wine" else load_dataset(data, seed=0)
    model = cfg.get("model", "fcn")
    return make_task(ds, TaskSettings(model=model, width=WIDTH if model == "fcn" else None,
                                      batch_size=batch, label=f"{model}-{data}"))


def column_specs(cfg: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """:data:`COLUMNS` with the row's ``base`` (if any) in the feedback columns. On a
    residual row every ``ddpnopt`` column goes through DGNOpt with ``mode="chain"`` (DDPNOpt
    refuses skip connections): the DDPNOpt column is the net treated as a chain, the skips
    ignored, and the base columns (feedback off) are their base optimizer exactly."""
    specs = dict(COLUMNS)
    if "base" in cfg:
        for col in DDPNOPT_COLUMNS:
            specs[col] = (specs[col][0], {**specs[col][1], "base": cfg["base"]})
    if cfg.get("residual"):
        specs = {col: as_chain(*spec) for col, spec in specs.items()}
    return specs


def as_chain(name: str, hp: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``ddpnopt`` spec for a net with skip connections, which DDPNOpt refuses: DGNOpt
    with ``mode="chain"`` (the net as a chain, skips ignored). Other specs unchanged."""
    return ("dgnopt", {**hp, "mode": "chain"}) if name == "ddpnopt" else (name, hp)


def row_grid(cfg: dict[str, Any], columns: list[str]) -> dict[str, list[float]]:
    """Each column's grid for this row (a DDPNOpt column with a base: that base's grid).
    A row's ``grid`` slice narrows the learning-rate grids only: E-MSA's rho and vanilla
    DDP's damping keep their whole grids (rho's best was at the grid's top on the FCN rows)."""
    pick = cfg.get("grid", slice(None))
    return {c: LR_GRID[BASE_COLUMN[cfg["base"]] if c in DDPNOPT_COLUMNS and "base" in cfg
                       else c][slice(None) if c in GRID_KEY else pick] for c in columns}


# ----------------------------------------------------------------------------- training

class VanillaDDP:
    """Vanilla DDP (:func:`ocnode.optim.vanilla_ddp_step`) as a column: one dense DDP
    iteration per batch, cross-entropy with its exact per-sample Hessians."""

    def __init__(self, model: torch.nn.Module, lr: float, damping: float) -> None:
        self.model, self.lr, self.damping = model, lr, damping

    def step_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One iteration on (x, y); the mean loss before it."""
        x, y = batch
        return vanilla_ddp_step(self.model, x, y, _per_sample_ce, self.damping, self.lr)


def _per_sample_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none")


def evaluate_accuracy(task: Task, model: torch.nn.Module, recalibrate: int = 0,
              batches: Iterator | None = None) -> float:
    """Test accuracy in eval mode; with ``recalibrate`` > 0, of a copy whose BatchNorm
    running statistics are recomputed on that many training ``batches`` first
    (``torch.optim.swa_utils.update_bn``; training is not disturbed)."""
    if recalibrate and batches is not None:
        model = copy.deepcopy(model)
        torch.optim.swa_utils.update_bn([next(batches) for _ in range(recalibrate)], model)
    model.eval()
    with torch.no_grad():
        acc = float(task.evaluate(model)["test_acc"])
    model.train()
    return acc


def train_seed(task: Task, seed: int, lrs: dict[str, float], iterations: int,
               eval_every: int, columns: list[str],
               specs: dict[str, tuple[str, dict[str, Any]]] | None = None,
               recalibrate: int = 0) -> dict[str, dict[str, Any]]:
    """Every column on one seed: the same initial weights and batches, interleaved
    (``specs``: the columns' registry names and hyperparameters, default :data:`COLUMNS`;
    ``recalibrate``: see :func:`evaluate_accuracy`, from a training stream of its own)."""
    specs = COLUMNS if specs is None else specs
    calib = task.batches(seed + 10_000) if recalibrate else None
    runs = {}
    for col in columns:
        name, hp = specs[col]
        hp = {**hp, GRID_KEY.get(col, "lr"): lrs[col]}
        # torch.manual_seed(seed), then the model (the chains have no ODE block: any
        # registry name builds the same one)
        model = build_model(task, "adam" if name == VANILLA else name, seed)
        opt = VanillaDDP(model, **hp) if name == VANILLA else build_optimizer(name, model, hp)
        runs[col] = {"model": model, "opt": opt, "batches": task.batches(seed), "ms": [],
                     "loss": [], "curve": [(0, evaluate_accuracy(task, model, recalibrate, calib))],
                     "diverged_at": None}
    for it in range(iterations):
        k = it % len(columns)
        for col in columns[k:] + columns[:k]:
            r = runs[col]
            if r["diverged_at"] is None:
                _advance(task, r, it)
            else:  # a diverged run stays where it stopped: its loss counts as infinite
                r["loss"].append(math.inf)
            if (it + 1) % eval_every == 0 or it + 1 == iterations:
                r["curve"].append((it + 1, evaluate_accuracy(task, r["model"], recalibrate, calib)))
    out = {}
    for col, r in runs.items():
        if hasattr(r["opt"], "close"):
            r["opt"].close()
        tail = r["loss"][-max(1, iterations // 5):]
        out[col] = {"test_acc": r["curve"][-1][1], "curve": r["curve"],
                    "tail_loss": statistics.fmean(tail), "diverged_at": r["diverged_at"],
                    "step_ms_median": statistics.median(r["ms"]) if r["ms"] else math.nan}
    return out


def _advance(task: Task, run: dict[str, Any], it: int) -> None:
    """One timed iteration of a column; a non-finite loss (the training core raises before
    any step) marks the run diverged at ``it`` and stops it, with its weights untouched."""
    batch = next(run["batches"])
    start = time.perf_counter()
    try:
        loss = (run["opt"].step_batch(batch) if isinstance(run["opt"], VanillaDDP)
                else train_step(run["model"], run["opt"], task.loss, batch))
    except FloatingPointError:
        loss = math.inf
    if math.isfinite(loss):
        run["ms"].append((time.perf_counter() - start) * 1e3)
        run["loss"].append(loss)
    else:
        run["diverged_at"] = it
        run["loss"].append(math.inf)


def tune(task: Task, cfg: dict[str, Any], columns: list[str],
         grid: dict[str, list[float]]) -> dict[str, Any]:
    """Each grid rate on ``TUNE_SEED`` (all columns interleaved per rate index); the rate
    with the lowest tail training loss per column."""
    scores: dict[str, dict[float, float]] = {c: {} for c in columns}
    for i in range(max(len(grid[c]) for c in columns)):
        lrs = {c: grid[c][min(i, len(grid[c]) - 1)] for c in columns}
        its = cfg.get("tune_iterations", cfg["iterations"])
        res = train_seed(task, TUNE_SEED, lrs, its, its, columns, column_specs(cfg))
        for c in columns:
            scores[c][lrs[c]] = res[c]["tail_loss"]
    chosen = {c: min(scores[c], key=lambda lr: scores[c][lr]) for c in columns}
    return {"chosen": chosen, "tail_loss": {c: {str(k): v for k, v in s.items()}
                                            for c, s in scores.items()}}


# ----------------------------------------------------------------------------- report

def _cell(values: list[float]) -> str:
    m = 100 * statistics.fmean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    cols = summary["columns"]
    lines = ["# The DDP family's tables (DDPNOpt paper Table 3, DGNOpt paper's nets): ours "
             "beside the papers'", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']['cpu']}, {summary['machine']['cpu_count']} cores, "
             f"torch {summary['machine']['torch']}, {summary['threads']} thread(s); "
             f"wall time {summary['wall_s']:.0f} s.", "",
             "Test accuracy (%) after a fixed number of iterations, mean ± sd over seeds; "
             "paper: mean of 10 seeds (its MNIST is full MNIST, ours the 5k subset).", "",
             "| dataset | seeds | iterations | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for name, d in summary["datasets"].items():
        lines.append(f"| {name} (ours) | {len(d['seeds'])} | {d['iterations']} | "
                     + " | ".join(_cell(d["results"][c]["test_acc"]) if c in d["results"]
                                  else "–" for c in cols) + " |")
        if name not in PAPER:  # the DGNOpt paper's tables were out of reach
            continue
        lines.append(f"| {name} (paper{': ' + PAPER_ROW[name] if name in PAPER_ROW else ''})"
                     " | 10 | – | " + " | ".join(f"{PAPER[name][c]:.2f}" if c in PAPER[name]
                                                 else "–" for c in cols) + " |")
    for name, d in summary["datasets"].items():
        for c, losses in d["tuning"].get("tail_loss", {}).items():
            if c in cols:
                lines.append(f"\n{name}, {c}: tuning-seed tail loss per rate: " + ", ".join(
                    f"{float(r):g}: {v:.4g}" for r, v in losses.items()) + ".")
    tuned = all("tail_loss" in d["tuning"] for d in summary["datasets"].values())
    given = all(d["tuning"].get("given") for d in summary["datasets"].values())
    how = (f"grid on seed {TUNE_SEED}, lowest mean training loss over the last fifth of the "
           "run" if tuned else "not tuned: given by --rates" if given
           else "not tuned: the middle rate of each grid")
    lines += ["", f"Chosen learning rates (E-MSA: rho; {how}):", "",
              "| dataset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, d in summary["datasets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{d['lr'][c]:g}" if c in d["lr"] else "–"
                                                  for c in cols) + " |")
    lines += ["", "Median ms per iteration (all seeds), and over the column of the row's "
              "DDPNOpt base (RMSprop or EKFAC):", "",
              "| dataset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, d in summary["datasets"].items():
        res = d["results"]
        ref = BASE_COLUMN[d["ddpnopt_base"]]
        base = res[ref]["step_ms_median"] if ref in res else None
        lines.append(f"| {name} | " + " | ".join(
            f"{res[c]['step_ms_median']:.2f}"
            + (f" ({res[c]['step_ms_median'] / base:.1f}x)" if base else "")
            if c in res else "–" for c in cols) + " |")
    lines += ["", "Grids per row: " + "; ".join(
        f"{name}: " + ", ".join(f"{c} {g}" for c, g in d["grid"].items())
        for name, d in summary["datasets"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = summary["datasets"][name]
        if not d["results"]:  # a --tune-only row
            ax.set(title=f"{name}: tuned only, no seeds run")
            continue
        for c in d["results"]:
            curves = d["results"][c]["curves"]
            steps = [s for s, _ in curves[0]]
            mean = [100 * statistics.fmean(cv[i][1] for cv in curves) for i in range(len(steps))]
            ax.plot(steps, mean, label=c, lw=1.4)
        ax.set(title=f"{name} ({len(d['seeds'])} seeds, mean)", xlabel="iteration",
               ylabel="test accuracy (%)")
        lo = min(100 * statistics.fmean(cv[-1][1] for cv in r["curves"])
                 for r in d["results"].values())
        ax.set_ylim(max(0.0, lo - 15), 100)
        ax.grid(alpha=0.3)
    if axes[0][0].lines:
        axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_row(name: str, cfg: dict[str, Any], columns: list[str], quick: bool,
            no_tune: bool, rates: dict[str, float] | None = None,
            grids: dict[str, list[float]] | None = None,
            tune_only: bool = False) -> dict[str, Any]:
    """One row: tune (unless ``no_tune``/``quick``, or ``rates`` gives every column's rate;
    ``grids`` replaces a column's grid), then every seed (none with ``tune_only``); its
    summary entry."""
    allowed = cfg.get("columns", PAPER_COLUMNS) + (["vanilla DDP"] if name in VANILLA_ROWS
                                                   else [])
    cols = [c for c in columns if c in allowed]
    if not cols:
        raise SystemExit(f"row {name} runs none of the columns {columns}: it runs {allowed}")
    grid = {**row_grid(cfg, cols), **{c: g for c, g in (grids or {}).items() if c in cols}}
    specs = column_specs(cfg)
    task = make(name, cfg["batch"])
    t0 = time.perf_counter()
    if rates:
        missing = sorted(set(cols) - set(rates))
        if missing:
            raise SystemExit(f"--rates gives no rate for {missing} (row {name})")
        tuning: dict[str, Any] = {"chosen": {c: rates[c] for c in cols}, "given": True}
    elif no_tune or quick:
        tuning = {"chosen": {c: grid[c][len(grid[c]) // 2] for c in cols}}
    else:
        tuning = tune(task, cfg, cols, grid)
    print(f"[{name}] lrs {tuning['chosen']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    per_seed = []
    if tune_only:
        cfg = {**cfg, "seeds": []}
    for seed in cfg["seeds"]:
        per_seed.append(train_seed(task, seed, tuning["chosen"], cfg["iterations"],
                                   cfg["eval_every"], cols, specs, cfg.get("bn_recalibrate", 0)))
        print(f"[{name}] seed {seed}: " + ", ".join(
            f"{c} {100 * per_seed[-1][c]['test_acc']:.1f}" for c in cols), flush=True)
    return {
        **{k: cfg[k] for k in ("iterations", "batch", "eval_every", "seeds")},
        "bn_recalibrate": cfg.get("bn_recalibrate", 0),
        "model": cfg.get("model", "fcn"), "dataset": cfg.get("dataset", name),
        "ddpnopt_base": specs["DDPNOpt"][1]["base"], "grid": grid,
        "n_train": task.dataset.n_train, "n_test": task.dataset.n_test,
        "lr": tuning["chosen"], "tuning": tuning, "wall_s": time.perf_counter() - t0,
        "results": {c: {"test_acc": [r[c]["test_acc"] for r in per_seed],
                        "diverged_at": [r[c]["diverged_at"] for r in per_seed],
                        "mean": statistics.fmean(r[c]["test_acc"] for r in per_seed),
                        "sd": statistics.stdev([r[c]["test_acc"] for r in per_seed])
                        if len(per_seed) > 1 else 0.0,
                        "step_ms_median": statistics.median(
                            r[c]["step_ms_median"] for r in per_seed),
                        "curves": [r[c]["curve"] for r in per_seed]}
                    for c in cols} if per_seed else {}}


def parse_values(text: str | None, flag: str) -> dict[str, list[float]] | None:
    """``COL=V[:V...],...`` (e.g. 'E-MSA=10:30,Adam=3e-3') as {column: [values]}; None when
    not given. Values must be positive."""
    if not text:
        return None
    values = {}
    for item in text.split(","):
        column, sep, rest = item.partition("=")
        try:
            parsed = [float(v) for v in rest.split(":")]
        except ValueError:
            parsed = []
        if not sep or not parsed or not all(v > 0 for v in parsed):
            raise SystemExit(f"{flag}: {item!r} is not COLUMN=RATE[:RATE...] with positive "
                             "rates")
        values[column.strip()] = parsed
    return values


def parse_rates(text: str | None) -> dict[str, float] | None:
    """``--rates`` ('E-MSA=0.3,Adam=0.003') as {column: rate}; None when not given."""
    values = parse_values(text, "--rates")
    if values is None:
        return None
    several = sorted(c for c, v in values.items() if len(v) != 1)
    if several:
        raise SystemExit(f"--rates: one COLUMN=RATE per column ({several} have several: "
                         "use --grid to tune over them)")
    return {c: v[0] for c, v in values.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, tiny budget")
    p.add_argument("--datasets", default=",".join(DEFAULT_ROWS),
                   help="comma-separated rows of " + ",".join(DATASETS))
    p.add_argument("--columns", default=",".join(c for c in COLUMNS if c != "vanilla DDP"),
                   help="comma-separated subset of " + ",".join(COLUMNS) + " (default: all "
                        "but vanilla DDP; each row runs those of its own list)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (all datasets)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per run")
    p.add_argument("--no-tune", action="store_true",
                   help="skip the grid; use the middle rate of each grid")
    p.add_argument("--rates", default=None, metavar="COL=RATE,...",
                   help="skip the grid; these rates (E-MSA: rho), one per column run, e.g. "
                        "'E-MSA=0.3' (a row tuned earlier)")
    p.add_argument("--grid", default=None, metavar="COL=RATE:RATE...,...",
                   help="tune these columns over these rates instead of their own grid "
                        "(E-MSA: rho), e.g. 'E-MSA=10:30:100'")
    p.add_argument("--tune-only", action="store_true",
                   help="run the grid and report its tail losses and choices, no seeds (a "
                        "long row's seeds can follow later with --rates)")
    p.add_argument("--out", default="experiments/results/ddpnopt-table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                   help="recompute BatchNorm's running statistics on N training batches "
                        "before every evaluation (of a copy), for every column (default 0: "
                        "evaluate with the statistics training left)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    columns = [c for c in args.columns.split(",") if c]
    rows = [r for r in args.datasets.split(",") if r]
    rates, grids = parse_rates(args.rates), parse_values(args.grid, "--grid")
    if args.tune_only and (rates or args.no_tune or args.quick):
        raise SystemExit("--tune-only runs the grid: it excludes --rates, --no-tune and --quick")
    both = sorted(set(rates or ()) & set(grids or ()))
    if both:
        raise SystemExit(f"--rates and --grid both name {both}: give a column one or the other")
    for what, asked, known in [("column", columns, COLUMNS), ("row", rows, DATASETS),
                               ("--rates column", list(rates or ()), COLUMNS),
                               ("--grid column", list(grids or ()), COLUMNS)]:
        unknown = sorted(set(asked) - set(known))
        if unknown:
            raise SystemExit(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}")
    start = time.perf_counter()
    summary: dict[str, Any] = {"columns": columns, "datasets": {}, "width": WIDTH,
                               "tune_seed": TUNE_SEED, "threads": args.threads,
                               "quick": args.quick}
    for name in rows:
        cfg = dict(DATASETS[name])
        if args.quick:
            cfg.update(QUICK, grid=slice(2, 3))
        if args.seeds:
            cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
        if args.iterations:
            cfg["iterations"] = args.iterations
        cfg["bn_recalibrate"] = args.bn_recalibrate
        summary["datasets"][name] = run_row(name, cfg, columns, args.quick, args.no_tune,
                                            rates, grids, args.tune_only)
        write(summary, Path(args.out), start)  # after each row: a long run keeps its rows
    print(markdown(summary), flush=True)
    return summary


def write(summary: dict[str, Any], out: Path, start: float) -> None:
    """summary.json, results.md and curves.png of the datasets done so far."""
    summary.update(wall_s=time.perf_counter() - start, command=command_line(),
                   machine=machine_info())
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "curves.png")


if __name__ == "__main__":
    main(sys.argv[1:])
