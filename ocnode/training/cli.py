"""The ``ocnode`` command: ``train``, ``compare`` and ``solvers``.

``ocnode train --out DIR`` trains the default model (an MLP Neural ODE classifier on the
sklearn digits, Adam); the dataset picks the task (classification, time-series
classification, trajectory fitting, density estimation) and every flag overrides one field of
:class:`ocnode.training.TrainConfig`. ``ocnode compare`` runs the optimizer comparison harness on
one dataset's task; ``ocnode solvers`` the solver work-precision study.

Examples::

    ocnode train --out runs/digits
    ocnode train --out runs/snopt --optimizer snopt --lr 0.02 --eps 0.05 --update-freq 100
    ocnode train --out runs/vowels --dataset JapaneseVowels          # an ODE-RNN
    ocnode train --out runs/spirals --dataset spirals --model sde    # a Neural SDE
    ocnode compare --dataset mnist5k --model conv --width 16 --optimizers adam,snopt
    ocnode solvers --quick
    torchrun --standalone --nproc_per_node 2 -m ocnode train --out runs/ddp   # 2 processes

Under torchrun, ``train`` trains data-parallel (:mod:`ocnode.training.distributed`): the flags
mean the same (``--batch-size`` is the global batch), rank 0 alone writes and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ocnode.data import DATASETS, DatasetError
from ocnode.training import compare, distributed
from ocnode.training.config import (
    ADAPTIVE_T1,
    CURVATURES,
    DAMPING_MODES,
    DDP_BASES,
    DGN_MODES,
    FISHERS,
    TrainConfig,
)
from ocnode.training.loop import train
from ocnode.training.optimizers import OPTIMIZERS
from ocnode.training.tasks import MODELS, TASKS, TaskSettings, make_task
from solvers import SolverError, SolverInputError

_DEFAULTS = TrainConfig()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (then the help text says what decides it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is argparse.SUPPRESS \
                or not action.option_strings or action.help == argparse.SUPPRESS:
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()
_TASK_DEFAULT = "the task's default"
_OPT_DEFAULT = "the task's or optimizer's default"


def _size_or_all(text: str) -> int | None:
    return None if text == "all" else int(text)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=d.dataset,
                   help="one of " + ", ".join(sorted(DATASETS)) + ", uea:<Name>, lasa:<Shape>")
    g.add_argument("--data-dir", default=d.data_dir,
                   help="folder with the dataset files (datasets read from disk)")
    g.add_argument("--train-size", type=int, default=d.train_size,
                   help="cap the training split (stratified, seeded); default: all")
    g.add_argument("--test-size", type=_size_or_all, default=d.test_size,
                   help="evaluate on a fixed random subset of the test split ('all': all of it)")
    g.add_argument("--task", default=d.task, choices=sorted(TASKS),
                   help="default: the dataset's kind decides")
    g.add_argument("--model", default=d.model,
                   help="; ".join(f"{t}: {', '.join(m)}" for t, m in MODELS.items())
                   + f" (default: {_TASK_DEFAULT}, the first)")
    g.add_argument("--width", type=int, default=d.width,
                   help=f"model width, hidden units or channels (default: {_TASK_DEFAULT})")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"training batch size (default: {_TASK_DEFAULT})")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="evaluation batch size")


def _add_solver_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("ODE solver")
    g.add_argument("--method", default=d.method,
                   help=f"solver method, e.g. dopri5, tsit5, rk4 (default: {_TASK_DEFAULT})")
    g.add_argument("--rtol", type=float, default=d.rtol, help=f"(default: {_TASK_DEFAULT})")
    g.add_argument("--atol", type=float, default=d.atol, help=f"(default: {_TASK_DEFAULT})")
    g.add_argument("--step-size", type=float, default=d.step_size,
                   help="step of fixed-step methods (euler, rk4, ...; required by them)")
    g.add_argument("--t1", type=float, default=d.t1, help="integration horizon")
    g.add_argument("--backprop", dest="adjoint", action="store_false", default=argparse.SUPPRESS,
                   help="backpropagate through the solver instead of the adjoint (kfac and "
                        "newton-cg always do)")
    g.add_argument("--checkpoint-steps", action="store_true", default=d.checkpoint_steps,
                   help="with --backprop: keep one state per solver step instead of the "
                        "whole graph, and replay each step in the backward (same gradient, "
                        "little memory; explicit Runge-Kutta methods)")


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("optimizer (unset values: the task's tuned value or the "
                             "optimizer's default)")
    g.add_argument("--optimizer", default=d.optimizer, choices=list(OPTIMIZERS),
                   help="kfac = K-FAC through the solver; snopt --alpha 1 = plain K-FAC on "
                        "adjoint blocks")
    g.add_argument("--lr", type=float, default=d.lr, help=f"learning rate ({_OPT_DEFAULT})")
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"({_OPT_DEFAULT})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"({_OPT_DEFAULT})")
    g.add_argument("--eps", type=float, default=d.eps,
                   help=f"SNOpt/K-FAC damping, 0.03-0.1 ({_OPT_DEFAULT})")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="EKFAC second-moment rate in [0, 1]; 1 freezes them (plain K-FAC) "
                        f"({_OPT_DEFAULT})")
    g.add_argument("--update-freq", type=int, default=d.update_freq,
                   help=f"iterations between curvature refreshes ({_OPT_DEFAULT})")
    g.add_argument("--full", action="store_const", const=True, default=argparse.SUPPRESS,
                   help="also precondition the layers outside the ODE blocks (stem, head)")
    g.add_argument("--damping-mode", default=d.damping_mode, choices=DAMPING_MODES,
                   help=f"how eps damps the curvature ({_OPT_DEFAULT}: ekfac)")
    g.add_argument("--curvature", default=d.curvature, choices=CURVATURES,
                   help="where SNOpt's ODE-block curvature comes from: stages (the adjoint "
                        "solve's own evaluations) or grid (re-evaluations on a time grid) "
                        f"({_OPT_DEFAULT}: stages)")
    g.add_argument("--observer-dt", type=float, default=d.observer_dt,
                   help="curvature grid spacing along the adjoint solve, --curvature grid "
                        "(default: 0.01 of the horizon)")
    g.add_argument("--factor-cost", type=float, default=d.factor_cost,
                   help="--curvature stages: cost of each factor product relative to the "
                        f"layer's own, per evaluation ({_OPT_DEFAULT}: 0.25)")
    g.add_argument("--fisher", default=d.fisher, choices=FISHERS,
                   help=f"empirical (the loss's gradient) or true (sampled labels) Fisher "
                        f"({_OPT_DEFAULT}: empirical)")
    g.add_argument("--stats-batch", type=int, default=d.stats_batch,
                   help="samples of each batch used for the ODE-block curvature")
    g.add_argument("--ddp-base", default=d.ddp_base, choices=DDP_BASES,
                   help="DDPNOpt's and DGNOpt's base optimizer (default: sgd); DDPNOpt trains "
                        "the plain chains --model fcn and cnn")
    g.add_argument("--dgn-mode", default=d.dgn_mode, choices=DGN_MODES,
                   help="DGNOpt's game: fne (every layer a player), gr (a residual block's "
                        "layers cooperate) or chain (the skips ignored: DDPNOpt's rule per "
                        "layer, a baseline) (default: fne); DGNOpt also trains --model resmlp "
                        "and resnet")
    g.add_argument("--rho", type=float, default=d.rho,
                   help="E-MSA's penalty weight: larger is a smaller step (default 0.5)")
    g.add_argument("--inner-steps", type=int, default=d.inner_steps,
                   help="E-MSA's L-BFGS iterations per stage and step (default 10)")


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


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model on a dataset",
                              formatter_class=_HelpFormatter)
    d = _DEFAULTS
    p.add_argument("--out", default=d.out, help="output folder (metrics, checkpoint, plots)")
    _add_data_flags(p)
    _add_solver_flags(p)
    _add_optimizer_flags(p)
    _add_horizon_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs of the run")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="learning rate factor per epoch (1: constant)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the weights, the data split and the shuffling")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between metrics rows (each with an evaluation)")
    g.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue the run saved in --out (same settings)")
    g.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="start over in an --out that holds a run")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   default=argparse.SUPPRESS, help="hide the progress bar")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per process (default: half the cores, 1 to 4, shared "
                        "among a run's processes on the machine)")
    _add_process_flags(p)
    _add_debug_flag(p)


def _add_process_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("multiple processes (torchrun --nproc_per_node N -m ocnode train; "
                             "--batch-size is then the global batch)")
    g.add_argument("--dist-backend", default=d.dist_backend, choices=distributed.BACKENDS,
                   help="process group backend (default: auto, NCCL on CUDA, gloo on CPU)")
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="seconds a process waits for the others before the run fails "
                        f"(default: {distributed.DEFAULT_TIMEOUT:g})")


def _add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")


def _add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="compare optimizers on one dataset's task "
                              "(interleaved, own clocks, several seeds)",
                              formatter_class=_HelpFormatter)
    _add_data_flags(p)
    _add_solver_flags(p)
    p.add_argument("--label", default=None, help="results subfolder (default <task>-<dataset>)")
    compare.add_arguments(p)
    _add_debug_flag(p)


def _add_solvers_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("solvers", help="work-precision study of every solver method, "
                              "ours against torchdiffeq", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="the study's flags (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ocnode`` command."""
    parser = argparse.ArgumentParser(prog="ocnode", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    _add_compare_parser(subparsers)
    _add_solvers_parser(subparsers)
    return parser


def _explicit_train_flags(argv: list[str]) -> dict[str, Any]:
    """The ``ocnode train`` flags given on the command line (not their defaults)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["train"]._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    given.pop("command", None)
    return given


def _train(args: dict[str, Any], argv: list[str]) -> int:
    if args.get("resume"):  # the saved settings, with the flags given now
        given = _explicit_train_flags(argv)
        config = TrainConfig.from_run(given.pop("out", args["out"]), **given)
    else:
        config = TrainConfig(**args)
    metrics = train(config)
    if not distributed.is_main():
        return 0
    metric = next(k for k in ("test_acc", "test_nll", "test_mse") if k in metrics)
    print(f"done: epoch {metrics['epoch']:g}, step {int(metrics['step'])}, "
          f"{metric} {metrics[metric]:.4f}, train_loss {metrics['train_loss']:.4f}, "
          f"wall_time {metrics['wall_time']:.1f}s (training only), out {config.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ocnode.data import load_dataset

    if distributed.launched():
        raise ValueError("ocnode compare runs in one process; start it without torchrun "
                         "(only ocnode train trains on several processes)")
    config = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, task=args.task,
                         model=args.model, width=args.width, batch_size=args.batch_size,
                         method=args.method, rtol=args.rtol, atol=args.atol,
                         step_size=args.step_size, t1=args.t1,
                         adjoint=getattr(args, "adjoint", True),
                         checkpoint_steps=args.checkpoint_steps,
                         train_size=args.train_size, test_size=args.test_size,
                         eval_batch_size=args.eval_batch_size)
    config.validate()
    settings: TaskSettings = config.task_settings()
    settings.label = args.label
    task = make_task(load_dataset(args.dataset, args.data_dir, 0, subset=args.train_size),
                     settings)
    compare.run(task, args)
    return 0


def _exit_now(status: int) -> None:
    """End the process at once: after a failed collective, tearing down the broken process
    group (or its threads at interpreter exit) can abort the process instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["solvers"]:  # the study parses its own flags (--help included)
        from ocnode import workprecision

        return workprecision.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    command, debug = values.pop("command"), values.pop("debug", False)
    try:
        return _compare(args) if command == "compare" else _train(values, argv)
    except SolverInputError as err:  # bad solver settings: a usage error
        if debug:
            raise
        parser.error(f"{err} (on the command line: --method, --step-size, --rtol, --atol)")
    except (SolverError, FloatingPointError) as err:  # the run failed: one line, exit 1
        if debug:
            raise
        print(f"ocnode {command}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except RuntimeError as err:  # another process died or timed out
        if debug or not (distributed.launched() and distributed.is_collective_failure(err)):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ocnode {command}: error: rank {distributed.rank()}: a collective operation "
              f"failed ({first}): another process of the run died, stalled past --dist-timeout "
              "or could not be reached; the last checkpoint is intact: continue with the same "
              "command and --resume (--debug shows the traceback)", file=sys.stderr)
        _exit_now(1)
    except (ValueError, DatasetError) as err:  # bad settings, data or run folder
        if debug:
            raise
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
