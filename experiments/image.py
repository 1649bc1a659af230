"""Image classification with the conv ODE classifier: Adam, SGD, SNOpt, K-FAC through the
solver and Newton-CG, compared by :mod:`compare` (interleaved, own clocks, several seeds).

Datasets (offline, ../shared/DATASETS.md): Fashion-MNIST (the paper's MNIST stand-in; a
stratified training subset, a fixed test subset for the periodic evaluation), the real
5000-digit MNIST subset (``mnist5k``), and ``fmnist32``, Fashion-MNIST padded to 3x32x32,
a *stand-in* for CIFAR-10/SVHN (same shape, not the same difficulty).

Model: :class:`ocnode.ConvODEClassifier` (conv stem, one ODE block of ``CHANNELS`` channels
solved by dopri5 at rtol = atol = 1e-3 on [0, 1], pooled linear head). Adam, SGD and SNOpt
use the adjoint; K-FAC and Newton-CG backpropagate through the solver.

Hyperparameters: ALGORITHM.md section 3 (MNIST row) for SNOpt (lr 0.02, eps 0.05), Adam
(1e-3) and SGD (0.02, momentum 0.9); SNOpt and K-FAC refresh every 50 iterations with
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
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnode import ConvODEClassifier, load_dataset

import compare

DATASETS = ("fashion-mnist", "mnist5k", "fmnist32")
CHANNELS, QUICK_CHANNELS = 16, 8
BATCH = 64
TRAIN_SUBSET, QUICK_TRAIN_SUBSET = 10_000, 500  # stratified (mnist5k has 5000 in all)
TEST_SUBSET, QUICK_TEST_SUBSET = 1_000, 200  # fixed random draw, the same for every run
EVAL_BATCH = 500
BUDGET_S = 40.0  # training seconds per run, own clock (3 sets x 3 seeds x 5 runs: 44 min)
BLOCK: dict[str, Any] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "t1": 1.0}
HPARAMS: dict[str, dict[str, Any]] = {
    "snopt": {"stats_batch": 32},
    "kfac": {"stats_batch": 32},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}


def endless_batches(x: Tensor, y: Tensor, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches of ``(x, y)`` forever; the same seed, the same sequence."""
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch, len(y))
    while True:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def classification_metrics(model: nn.Module, x: Tensor, y: Tensor,
                           batch: int = EVAL_BATCH) -> dict[str, float]:
    """Test accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    correct, total_loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch])
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        total_loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
    return {"test_acc": correct / len(y), "test_loss": total_loss / len(y)}


def make_task(dataset: str, quick: bool) -> compare.Task:
    """The classification task of ``dataset`` (images shaped (N, C, H, W))."""
    train, test, info = load_dataset(dataset, seed=0,
                                     subset=QUICK_TRAIN_SUBSET if quick else TRAIN_SUBSET)
    shape = tuple(info["image_shape"])
    (x_tr, y_tr), (x_te, y_te) = train.tensors, test.tensors
    x_tr, x_te = x_tr.view(-1, *shape), x_te.view(-1, *shape)
    keep = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(1234))
    keep = keep[:QUICK_TEST_SUBSET if quick else TEST_SUBSET]
    x_te, y_te = x_te[keep], y_te[keep]
    channels = QUICK_CHANNELS if quick else CHANNELS

    def build(adjoint: bool) -> nn.Module:
        return ConvODEClassifier(shape[0], info["n_classes"], channels=channels,
                                 adjoint=adjoint, **BLOCK)

    return compare.Task(
        name=f"image-{dataset}", metric="test_acc", higher_is_better=True,
        build_model=build,
        batches=lambda seed: endless_batches(x_tr, y_tr, 32 if quick else BATCH, seed),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        evaluate=lambda model: classification_metrics(model, x_te, y_te),
        hparams=HPARAMS)


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
        compare.run(make_task(dataset, args.quick), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
