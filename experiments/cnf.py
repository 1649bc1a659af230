"""Density estimation with a continuous normalizing flow: Adam, SGD, SNOpt, K-FAC through the
solver and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Datasets (offline: shipped by PyPI or Debian packages), standardised with training statistics by
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
evaluation; :class:`ocnode.curvature.KFACHooks` ignore those inner derivatives (backward
passes with grad mode on), so K-FAC's factors hold only the loss's own gradients.

Outputs: ``<out>/cnf-<dataset>/`` with the harness's runs/*.csv, summary.json, results.md
and curves.png (see compare.py), plus, for 2-D sets, ``density.png``: the data, and per
optimizer the learned density exp(log p) on a grid and samples of the first seed's model.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ocnode import load_dataset
from ocnode.training import Task, TaskSettings, compare, make_task
from solvers import SolverSpec

DATASETS = ("circles", "8gaussians", "vowels-frames")
HIDDEN, QUICK_HIDDEN = 64, 8
BATCH, QUICK_BATCH = 256, 64
TRAIN_SUBSET, QUICK_TRAIN_SUBSET = None, 512  # None: the whole training split
TEST_SUBSET, QUICK_TEST_SUBSET = 1000, 100  # fixed random draw, the same for every run
SOLVER = SolverSpec(method="dopri5", rtol=1e-3, atol=1e-3)


def density_task(dataset: str, quick: bool) -> Task:
    """The density-estimation task of ``dataset`` (tuned hyperparameters
    ``ocnode.training.tasks.DENSITY_HPARAMS_2D`` / ``DENSITY_HPARAMS_TABLE``)."""
    data = load_dataset(dataset, seed=0, subset=QUICK_TRAIN_SUBSET if quick else TRAIN_SUBSET)
    if data.kind != "density":
        raise SystemExit(f"{dataset} is a {data.kind} dataset; pick a density set, e.g. "
                         + ", ".join(DATASETS))
    return make_task(data, TaskSettings(
        width=QUICK_HIDDEN if quick else HIDDEN, batch_size=QUICK_BATCH if quick else BATCH,
        solver=SOLVER, test_size=QUICK_TEST_SUBSET if quick else TEST_SUBSET,
        label=f"cnf-{dataset}"))


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
        compare.run(density_task(dataset, args.quick), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
