"""Image classification with the conv ODE classifier: Adam, SGD, SNOpt, K-FAC through the
solver and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Datasets (offline: shipped by PyPI or Debian packages): Fashion-MNIST (the paper's MNIST stand-in; a
stratified training subset, a fixed test subset for the periodic evaluation), the real
5000-digit MNIST subset (``mnist5k``), and ``fmnist32``, Fashion-MNIST padded to 3x32x32,
a *stand-in* for CIFAR-10/SVHN (same shape, not the same difficulty).

Model: :class:`ocnode.ConvODEClassifier` (conv stem, one ODE block of ``CHANNELS`` channels
solved by dopri5 at rtol = atol = 1e-3 on [0, 1], pooled linear head). Adam, SGD and SNOpt
use the adjoint; K-FAC and Newton-CG backpropagate through the solver.

Hyperparameters: the SNOpt authors' MNIST settings for SNOpt (lr 0.02, eps 0.05), Adam
(1e-3) and SGD (0.02, momentum 0.9); SNOpt and K-FAC refresh every 20 iterations (50 in
the runs BENCHMARKS.md reports) with
``stats_batch = 32`` samples (the refresh of a conv block is FLOP-bound on a CPU, see
bench_snopt); Newton-CG: lr 1, damping 1, 5 CG iterations, steps clipped to norm 1 (without
the clip it blew up the ODE within 10 iterations on Fashion-MNIST).

    python experiments/image.py                          # 3 sets x 3 seeds x 5 optimizers
    python experiments/image.py --datasets fashion-mnist --seeds 0 --budget 60
    python experiments/image.py --quick                  # smoke run (numbers not to quote)

Outputs: ``<out>/image-<dataset>/`` with the harness's runs/*.csv, summary.json, results.md
and curves.png (see compare.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ocnode import load_dataset
from ocnode.training import Task, TaskSettings, compare, make_task
from solvers import SolverSpec

DATASETS = ("fashion-mnist", "mnist5k", "fmnist32")
CHANNELS, QUICK_CHANNELS = 16, 8
BATCH, QUICK_BATCH = 64, 32
TRAIN_SUBSET, QUICK_TRAIN_SUBSET = 10_000, 500  # stratified (mnist5k has 5000 in all)
TEST_SUBSET, QUICK_TEST_SUBSET = 1_000, 200  # fixed random draw, the same for every run
EVAL_BATCH = 500
BUDGET_S = 40.0  # training seconds per run, own clock (3 sets x 3 seeds x 5 runs: 44 min)
SOLVER = SolverSpec(method="dopri5", rtol=1e-3, atol=1e-3)
HPARAMS: dict[str, dict[str, Any]] = {
    "snopt": {"stats_batch": 32},
    "kfac": {"stats_batch": 32},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}


def image_task(dataset: str, quick: bool) -> Task:
    """The conv classification task of ``dataset`` with this experiment's settings."""
    data = load_dataset(dataset, seed=0, subset=QUICK_TRAIN_SUBSET if quick else TRAIN_SUBSET)
    task = make_task(data, TaskSettings(
        model="conv", width=QUICK_CHANNELS if quick else CHANNELS,
        batch_size=QUICK_BATCH if quick else BATCH, solver=SOLVER,
        test_size=QUICK_TEST_SUBSET if quick else TEST_SUBSET, eval_batch_size=EVAL_BATCH,
        label=f"image-{dataset}"))
    task.hparams = HPARAMS
    return task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated: " + ", ".join(DATASETS))
    compare.add_arguments(parser, budget=BUDGET_S, quick_budget=1.5, eval_every=10,
                          quick_eval_every=2)
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    if args.quick and args.datasets == ",".join(DATASETS):
        datasets = ["mnist5k"]  # the packaged set: no system dataset needed for a smoke run
    for dataset in datasets:
        compare.run(image_task(dataset, args.quick), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
