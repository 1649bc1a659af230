"""The ``ocnode`` command line.

``ocnode train --out DIR`` trains the default model (an MLP Neural ODE classifier on the
sklearn digits, Adam); every flag overrides one field of :class:`ocnode.training.TrainConfig`.
"""

from __future__ import annotations

import argparse
import sys

from ocnode.training import TrainConfig, train

_DEFAULTS = TrainConfig()


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a Neural ODE classifier",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = _DEFAULTS
    p.add_argument("--out", default=d.out, help="output folder (metrics, checkpoint, plot)")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with dataset files")
    p.add_argument("--model", default=d.model, help="mlp or conv")
    p.add_argument("--width", type=int, default=d.width, help="ODE state width/channels")
    p.add_argument("--optimizer", default=d.optimizer, help="adam or sgd")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
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
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a used --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")


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
    except ValueError as err:
        parser.error(str(err))
    print(f"done: epoch {metrics['epoch']:g}, step {int(metrics['step'])}, "
          f"test_acc {metrics['test_acc']:.4f}, train_loss {metrics['train_loss']:.4f}, "
          f"wall_time {metrics['wall_time']:.1f}s (training only), out {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
