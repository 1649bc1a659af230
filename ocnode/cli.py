"""The ``ocnode`` command line.

``ocnode train --out DIR`` trains the default model (an MLP Neural ODE classifier on the
sklearn digits, Adam); every flag overrides one field of :class:`ocnode.training.TrainConfig`.

Examples::

    ocnode train --out runs/snopt --optimizer snopt --lr 0.02 --eps 0.05 --update-freq 100
    ocnode train --out runs/fmnist --dataset fashion-mnist --model conv --train-size 10000
    ocnode train --out runs/t1 --optimizer snopt --adaptive-t1 feedback --t1-reg 1e-4
"""

from __future__ import annotations

import argparse
import sys

from ocnode.data import DATASETS, DatasetError
from ocnode.training import (
    ADAPTIVE_T1,
    DAMPINGS,
    FISHERS,
    MODELS,
    OPTIMIZERS,
    TrainConfig,
    train,
)

_DEFAULTS = TrainConfig()


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a Neural ODE classifier",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = _DEFAULTS
    p.add_argument("--out", default=d.out, help="output folder (metrics, checkpoint, plot)")
    p.add_argument("--dataset", default=d.dataset, help=", ".join(sorted(DATASETS)))
    p.add_argument("--data-dir", default=d.data_dir,
                   help="folder with the dataset files (fashion-mnist: the Debian package's "
                        "folder by default; mnist: required)")
    p.add_argument("--train-size", type=int, default=d.train_size,
                   help="cap the training split (stratified, seeded); default: all")
    p.add_argument("--model", default=d.model, help=" or ".join(sorted(MODELS)))
    p.add_argument("--width", type=int, default=d.width, help="ODE state width/channels")
    p.add_argument("--optimizer", default=d.optimizer, help=", ".join(sorted(OPTIMIZERS)) +
                   " (kfac = snopt with alpha 1)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum,
                   help="None: 0.9 for sgd, 0 for snopt/kfac; adam ignores it")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    _add_snopt_flags(p)
    p.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="learning rate factor per epoch (1: constant)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--method", default=d.method, help="ODE solver method")
    p.add_argument("--rtol", type=float, default=d.rtol)
    p.add_argument("--atol", type=float, default=d.atol)
    p.add_argument("--step-size", type=float, default=d.step_size,
                   help="step size of fixed-step methods (euler, rk4, ...)")
    p.add_argument("--t1", type=float, default=d.t1, help="integration horizon")
    p.add_argument("--no-adjoint", dest="adjoint", action="store_false",
                   help="backpropagate through the solver instead of the adjoint")
    _add_horizon_flags(p)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a used --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_snopt_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("SNOpt / K-FAC (--optimizer snopt or kfac)")
    g.add_argument("--eps", type=float, default=d.eps, help="damping epsilon (0.03-0.1)")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="EKFAC second-moment rate in [0, 1]; kfac fixes it to 1")
    g.add_argument("--update-freq", type=int, default=d.update_freq,
                   help="iterations between curvature refreshes")
    g.add_argument("--full", action="store_true",
                   help="also precondition the layers outside the ODE blocks (stem, head)")
    g.add_argument("--damping", default=d.damping, choices=DAMPINGS)
    g.add_argument("--observer-dt", type=float, default=d.observer_dt,
                   help="curvature grid spacing along the adjoint solve; None: 0.01 of the "
                        "horizon")
    g.add_argument("--fisher", default=d.fisher, choices=FISHERS)
    g.add_argument("--stats-batch", type=int, default=d.stats_batch,
                   help="samples of each batch used for the ODE-block curvature (None: all)")


def _add_horizon_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("adaptive horizon T = t1")
    g.add_argument("--adaptive-t1", default=d.adaptive_t1, choices=ADAPTIVE_T1,
                   help="optimise t1: baseline = first order, feedback = SNOpt's policy")
    g.add_argument("--t1-lr", type=float, default=d.t1_lr, help="step size eta_T")
    g.add_argument("--t1-reg", type=float, default=d.t1_reg,
                   help="regularisation c of (c/2) T^2")
    g.add_argument("--t1-update-freq", type=int, default=d.t1_update_freq,
                   help="iterations between T updates")
    g.add_argument("--t1-min", type=float, default=d.t1_min, help="lower bound of T")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ocnode`` command."""
    parser = argparse.ArgumentParser(prog="ocnode", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("command")
    config = TrainConfig(**args)
    try:
        metrics = train(config)
    except (ValueError, DatasetError) as err:
        parser.error(str(err))
    print(f"done: epoch {metrics['epoch']:g}, step {int(metrics['step'])}, "
          f"test_acc {metrics['test_acc']:.4f}, train_loss {metrics['train_loss']:.4f}, "
          f"wall_time {metrics['wall_time']:.1f}s (training only), out {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
