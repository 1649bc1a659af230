"""Density estimation with a continuous normalizing flow: Adam, SGD, SNOpt, K-FAC through the
solver and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Datasets (offline, ../shared/DATASETS.md), standardised with training statistics by
:func:`ocnode.load_dataset`: ``circles`` (the SNOpt paper's Circle set, sklearn's
make_circles), ``8gaussians`` (other 2-D toys: ``moons``, ``pinwheel``), and
``vowels-frames``, every frame of JapaneseVowels as a real 12-D row, our stand-in for the
paper's Gas/MiniBooNE tables.

Model: :class:`ocnode.nn.cnf.CNF` (FFJORD; Grathwohl et al. 2019): ``N_LAYERS``
ConcatSquashLinear layers with tanh, dopri5 at rtol = atol = 1e-3 on [0, 1]; the exact trace
on the 2-D sets, Hutchinson's estimator (Rademacher, one draw per solve) on the 12-D set.
Adam, SGD and SNOpt use the adjoint; K-FAC and Newton-CG backpropagate through the solver.
Metric: ``test_nll`` in nats (lower is better) on a fixed random subset of ``TEST_SUBSET``
test rows, always with the exact trace, so the number carries no Hutchinson noise;
``test_loss`` is the same number.

Hyperparameters: one seed, 10 s trials on one thread (a shared, loaded machine), final test
NLL compared; circles for the 2-D settings (:data:`HPARAMS_2D`), vowels-frames for the table
(:data:`HPARAMS_TABLE`). Grids: Adam lr {3e-3, 1e-2, 3e-2, 0.1}; SGD and SNOpt lr
{0.01 or 0.03, 0.1, 0.3}, momentum 0.9; K-FAC lr {0.03 (table), 0.1, 0.3 (2-D)}; Newton-CG
damping {0.1, 1}. With a budget of seconds (tens of iterations) the largest stable step
wins, so the chosen rates sit above the paper's (Adam 2e-3-3e-3, SNOpt 5e-3-1e-2 over hours):

* 2-D: Adam 0.1, SGD 0.1 (0.1 and 0.3 tied on circles; 0.3 oscillated on 8gaussians),
  SNOpt 0.3, K-FAC 0.3, Newton-CG damping 0.1.
* 12-D: Adam 0.03, SGD 0.3, SNOpt 0.03 (0.3 diverged), K-FAC 0.03, Newton-CG damping 1.
* Always: momentum 0.9 for SGD, SNOpt and K-FAC; SNOpt and K-FAC eps 0.05, alpha 0.75,
  refresh every 20 iterations (a run has ~50-150), SNOpt's statistics
  on ``stats_batch = 64`` rows; Newton-CG lr 1, 5 CG iterations, steps clipped to norm 1.

    python experiments/cnf.py                          # 3 sets x 3 seeds x 5 optimizers,
                                                       # 30 s per run: about 30 min
    python experiments/cnf.py --datasets moons,pinwheel --seeds 0 --budget 30
    python experiments/cnf.py --quick                  # smoke run on circles (numbers not
                                                       # to quote); add --datasets
                                                       # circles,vowels-frames for both traces

K-FAC through the solver: both traces differentiate the vector field inside every
evaluation; :func:`ocnode.curvature.hook_layers` ignores those inner derivatives (backward
passes with grad mode on), so K-FAC's factors hold only the loss's own gradients.

Outputs: ``<out>/cnf-<dataset>/`` with the harness's runs/*.csv, summary.json, results.md
and curves.png (see compare.py), plus, for 2-D sets, ``density.png``: the data, and per
optimizer the learned density exp(log p) on a grid and samples of the first seed's model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ocnode import load_dataset
from ocnode.nn.cnf import CNF

import compare

DATASETS = ("circles", "8gaussians", "vowels-frames")
HIDDEN, QUICK_HIDDEN = 64, 8
N_LAYERS = 3
BATCH, QUICK_BATCH = 256, 64
TRAIN_SUBSET, QUICK_TRAIN_SUBSET = None, 512  # None: the whole training split
TEST_SUBSET, QUICK_TEST_SUBSET = 1000, 100  # fixed random draw, the same for every run
BLOCK: dict[str, Any] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "t1": 1.0}
#: Tuned separately for the 2-D toys (exact trace) and the 12-D table (Hutchinson).
HPARAMS_2D: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.1},
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "snopt": {"lr": 0.3, "momentum": 0.9, "eps": 0.05, "alpha": 0.75, "update_freq": 20,
              "stats_batch": 64},
    "kfac": {"lr": 0.3, "momentum": 0.9, "eps": 0.05, "update_freq": 20},
    "newton-cg": {"lr": 1.0, "damping": 0.1, "cg_iters": 5, "max_step_norm": 1.0},
}
HPARAMS_TABLE: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.03},
    "sgd": {"lr": 0.3, "momentum": 0.9},
    "snopt": {"lr": 0.03, "momentum": 0.9, "eps": 0.05, "alpha": 0.75, "update_freq": 20,
              "stats_batch": 64},
    "kfac": {"lr": 0.03, "momentum": 0.9, "eps": 0.05, "update_freq": 20},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}
GRID_LIMIT = 3.5  # density plot: [-L, L]^2 in standardised units
GRID_POINTS, QUICK_GRID_POINTS = 100, 40
N_SAMPLES, QUICK_N_SAMPLES = 1500, 300


def endless_batches(x: Tensor, batch: int, seed: int) -> Iterator[Tensor]:
    """Shuffled mini-batches of the rows of ``x`` forever; the same seed, the same sequence."""
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch, len(x))
    while True:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            yield x[order[i:i + batch]]


def nll_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The training loss: mean NLL of a batch ``(B, D)`` with the model's own trace."""
    assert isinstance(model, CNF)
    return model.nll(batch)


def exact_nll(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Mean test NLL (nats) with the exact trace, whatever the model trains with."""
    assert isinstance(model, CNF)
    trace = model.func.trace
    model.func.trace = "exact"
    try:
        nll = float(model.nll(x))
    finally:
        model.func.trace = trace
    return {"test_nll": nll, "test_loss": nll}


def make_task(dataset: str, quick: bool) -> tuple[compare.Task, Tensor]:
    """The density-estimation task of ``dataset`` and its (plotting) test subset."""
    train, test, info = load_dataset(dataset, seed=0,
                                     subset=QUICK_TRAIN_SUBSET if quick else TRAIN_SUBSET)
    if info["kind"] != "density":
        raise SystemExit(f"{dataset} is a {info['kind']} dataset; pick a density set, e.g. "
                         + ", ".join(DATASETS))
    x_tr, x_te = train.tensors[0], test.tensors[0]
    keep = torch.randperm(len(x_te), generator=torch.Generator().manual_seed(1234))
    x_te = x_te[keep[:QUICK_TEST_SUBSET if quick else TEST_SUBSET]]
    dim = x_tr.shape[1]
    hidden = QUICK_HIDDEN if quick else HIDDEN
    trace = "exact" if dim <= 2 else "hutchinson"

    def build(adjoint: bool) -> nn.Module:
        return CNF(dim, hidden=hidden, n_layers=N_LAYERS, trace=trace, adjoint=adjoint,
                   **BLOCK)

    task = compare.Task(
        name=f"cnf-{dataset}", metric="test_nll", higher_is_better=False,
        build_model=build,
        batches=lambda seed: endless_batches(x_tr, QUICK_BATCH if quick else BATCH, seed),
        loss=nll_loss,
        evaluate=lambda model: exact_nll(model, x_te),
        hparams=HPARAMS_2D if dim <= 2 else HPARAMS_TABLE)
    return task, x_te


def plot_density(models: dict[str, nn.Module], data: Tensor, path: Path, title: str,
                 points: int = GRID_POINTS, n_samples: int = N_SAMPLES) -> None:
    """Top row: data histogram and each model's exp(log p) on a grid; bottom: data, samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = torch.linspace(-GRID_LIMIT, GRID_LIMIT, points)
    grid = torch.cartesian_prod(side, side)  # rows (x_i, y_j), x slowest
    extent = (-GRID_LIMIT, GRID_LIMIT, -GRID_LIMIT, GRID_LIMIT)
    fig, axes = plt.subplots(2, len(models) + 1, figsize=(2.6 * (len(models) + 1), 5.4),
                             squeeze=False)
    axes[0, 0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=60,
                      range=[extent[:2], extent[2:]], cmap="viridis")
    axes[1, 0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.5, color="k")
    axes[0, 0].set_title("test data")
    for col, (name, model) in enumerate(models.items(), start=1):
        assert isinstance(model, CNF)
        with torch.no_grad():
            density = model.log_prob(grid).exp().reshape(points, points)
            samples = model.sample(n_samples, generator=torch.Generator().manual_seed(0))
        axes[0, col].imshow(density.T.numpy(), origin="lower", extent=extent, cmap="viridis")
        axes[1, col].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5,
                             color=compare.COLORS.get(name, "k"))
        axes[0, col].set_title(name)
    for ax in axes.flat:
        ax.set(xlim=extent[:2], ylim=extent[2:], xticks=[], yticks=[], aspect="equal")
    axes[0, 0].set_ylabel("density")
    axes[1, 0].set_ylabel("samples")
    fig.suptitle(f"{title}: learned densities and samples (first seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated density sets: " + ", ".join(DATASETS)
                             + " (or moons, pinwheel)")
    compare.add_arguments(parser, budget=30.0, quick_budget=0.3, eval_every=10,
                          quick_eval_every=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets = [d for d in args.datasets.split(",") if d]
    if args.quick and args.datasets == ",".join(DATASETS):
        datasets = ["circles"]  # fixed costs (imports, memory probes) dominate a smoke run
    for dataset in datasets:
        task, x_te = make_task(dataset, args.quick)
        summary = compare.run(task, args)
        if x_te.shape[1] == 2 and summary["models"]:  # no models after --refresh-report
            plot_density(summary["models"], x_te, Path(args.out) / task.name / "density.png",
                         task.name, *((QUICK_GRID_POINTS, QUICK_N_SAMPLES) if args.quick
                                      else (GRID_POINTS, N_SAMPLES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
