"""SNOpt against Adam, SGD and K-FAC through the solver on realistic budgets (minutes per run).

The comparison harness (:mod:`ocnode.training.compare`: interleaved, one iteration of each
optimizer in turn, each on its own clock, evaluation excluded, the same initial weights and
batches within a seed) on budgets long enough for the baselines' curves to flatten, where the
short runs of ``image.py`` and friends stop while Adam is still climbing.

Tasks (offline data):

* ``fashion-mnist``: the SNOpt paper's image net (Liu, Chen, Theodorou 2021): a conv stem to
  64 channels, an ODE block of two 3x3 time-concatenated convolutions, dopri5 at
  rtol = atol = 1e-3 with the adjoint, batch 128, on the **whole** 60,000-image training set;
  420 s per optimizer and seed (the budget of our reference run of the authors' code);
  evaluation on a fixed 2,000-image test subset.
* ``mnist5k``: the same net on the real 5,000-digit MNIST subset (a stratified 4,000 /
  1,000 split), 420 s (the test-accuracy curves flatten after about 250 s).
* ``JapaneseVowels``: the ODE-RNN series classifier (the series task's defaults), 300 s.
* ``vowels-frames``: the 12-D CNF (the density task's defaults), 420 s.

Hyperparameters: the registry's (SNOpt and K-FAC refresh every 20 iterations), the
harness's (they precondition stem and head too), then the task's tuned ones (the series task
refreshes every 20 from the grid curvature). ``--variants`` adds SNOpt variants, e.g.
``--variants snopt-grid`` (the grid curvature) or ``snopt-k50`` (the harness's former
period).

    python experiments/snopt_budget.py --datasets fashion-mnist           # 3 seeds, ~95 min
    python experiments/snopt_budget.py --datasets mnist5k --seeds 0 --budget 60
    python experiments/snopt_budget.py --quick                            # smoke run

Outputs: ``<out>/budget-<dataset>/`` with the harness's runs/*.csv, summary.json, results.md
(final metric, time to the baselines' best, SNOpt's time to each baseline's final metric over
the baseline's own) and curves.png.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ocnode import load_dataset
from ocnode.training import Task, TaskSettings, compare, make_task
from ocnode.training.tasks import SERIES_SOLVER
from solvers import SolverSpec

DATASETS = ("fashion-mnist", "mnist5k", "JapaneseVowels", "vowels-frames")
#: Own-clock training seconds per optimizer and seed.
BUDGETS = {"fashion-mnist": 420.0, "mnist5k": 420.0, "JapaneseVowels": 300.0,
           "vowels-frames": 420.0}
#: Iterations between evaluations (every task).
EVAL_EVERY = 50
IMAGE_SOLVER = SolverSpec(method="dopri5", rtol=1e-3, atol=1e-3)
#: SNOpt variants that --variants can add (label -> registry optimizer, hyperparameters).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "snopt-grid": ("snopt", {"curvature": "grid"}),
    "snopt-stages": ("snopt", {"curvature": "stages", "observer_dt": None}),
    "snopt-k10": ("snopt", {"update_freq": 10}),
    "snopt-k20": ("snopt", {"update_freq": 20}),
    "snopt-k50": ("snopt", {"update_freq": 50}),
    "snopt-k100": ("snopt", {"update_freq": 100}),
    "snopt-allrows": ("snopt", {"factor_cost": None}),
}


def budget_task(dataset: str, quick: bool) -> Task:
    """The task of ``dataset`` with this benchmark's settings (--quick: a tiny version)."""
    if dataset in ("fashion-mnist", "mnist5k"):
        data = load_dataset(dataset, seed=0, subset=500 if quick else None)
        return make_task(data, TaskSettings(
            model="conv", width=8 if quick else 64, batch_size=32 if quick else 128,
            solver=IMAGE_SOLVER, test_size=200 if quick else 2000, eval_batch_size=500,
            label=f"budget-{dataset}"))
    if dataset == "JapaneseVowels":
        data = load_dataset(dataset, seed=0, subset=64 if quick else None)
        return make_task(data, TaskSettings(
            width=8 if quick else None, batch_size=32, solver=SERIES_SOLVER,
            test_size=64 if quick else None, label=f"budget-{dataset}"))
    if dataset == "vowels-frames":
        data = load_dataset(dataset, seed=0, subset=512 if quick else None)
        return make_task(data, TaskSettings(
            width=8 if quick else None, batch_size=64 if quick else 256,
            test_size=256 if quick else 2000, label=f"budget-{dataset}"))
    raise SystemExit(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--variants", default="",
                        help="comma-separated SNOpt variants to add: " + ", ".join(VARIANTS))
    compare.add_arguments(parser, budget=420.0, quick_budget=1.5, eval_every=100,
                          quick_eval_every=2)
    args = parser.parse_args(argv)
    extra = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(extra) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    args.variants = {v: VARIANTS[v] for v in extra}
    datasets = [d for d in args.datasets.split(",") if d]
    if args.quick and args.datasets == ",".join(DATASETS):
        datasets = ["mnist5k"]  # packaged data: no system dataset needed for a smoke run
    base_optimizers = args.optimizers or "adam,sgd,kfac,snopt"
    budget, eval_every = args.budget, args.eval_every
    for dataset in datasets:
        args.optimizers = ",".join([base_optimizers, *extra])
        args.budget = budget if budget is not None or args.quick else BUDGETS[dataset]
        args.eval_every = eval_every if eval_every is not None or args.quick else EVAL_EVERY
        compare.run(budget_task(dataset, args.quick), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
