"""``TrainConfig``: everything a run of ``ocnode train`` depends on, validated in one place.

Fields left at None take the default of the task (model, width, batch size, solver) or of
the optimizer (its hyperparameters, :mod:`ocnode.training.optimizers`), so one command line
trains any dataset sensibly; a set field always wins.

Under torchrun (:mod:`ocnode.training.distributed`) ``batch_size`` is the global batch, which
the processes share equally; ``dist_backend`` and ``dist_timeout`` apply there only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ocnode.data import DATASETS
from ocnode.training.distributed import (
    BACKENDS,
    active,
    launched,
    process_device,
)
from ocnode.training.optimizers import OPTIMIZERS
from ocnode.training.records import load_checkpoint, resolve_device
from ocnode.training.tasks import MODELS, TASKS, TaskSettings

#: Choices of ``TrainConfig.damping_mode``, ``.fisher`` and ``.adaptive_t1``.
DAMPING_MODES = ("ekfac", "tikhonov")
FISHERS = ("empirical", "true")
CURVATURES = ("stages", "grid")
ADAPTIVE_T1 = ("off", "baseline", "feedback")
DDP_BASES = ("sgd", "rmsprop", "adam", "ekfac")
DGN_MODES = ("fne", "gr", "chain")
#: Optimizer hyperparameters a config can set (each optimizer takes the ones it knows).
#: Fields that may change when a run is resumed; any other change would break bit-identity.
RESUMABLE_FIELDS = frozenset({"epochs", "out", "resume", "overwrite", "device", "progress",
                              "log_every", "eval_batch_size", "threads", "dist_backend",
                              "dist_timeout"})
#: Fields that only a multi-process run (torchrun) takes.
DIST_FIELDS = ("dist_backend", "dist_timeout")
HPARAM_FIELDS = ("lr", "momentum", "weight_decay", "eps", "alpha", "update_freq", "full",
                 "damping_mode", "curvature", "observer_dt", "factor_cost", "fisher",
                 "stats_batch", "ddp_base", "dgn_mode", "rho", "inner_steps")
#: Config fields whose optimizer keyword has another name.
HPARAM_NAMES = {"ddp_base": "base", "dgn_mode": "mode"}


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on.

    Attributes:
        dataset: a key of ``ocnode.data.DATASETS`` (or ``uea:<Name>``, ``lasa:<Shape>``).
        data_dir: folder with the dataset files, for datasets read from disk.
        train_size: cap the training split at this many examples (stratified, seeded).
        test_size: evaluate on a fixed random subset of this many test examples (the same
            subset all along; None: the whole test split). The default keeps evaluations of
            large test splits (Fashion-MNIST: 10,000 images) from dominating a run.
        task: a key of :data:`ocnode.training.tasks.TASKS`; None: the dataset's kind decides.
        model: one of the task's models (:data:`ocnode.training.tasks.MODELS`); None: its first.
        width: the model's width (hidden units or channels); None: the task's default.
        optimizer: a key of :data:`ocnode.training.optimizers.OPTIMIZERS`.
        lr, momentum, weight_decay, eps, alpha, update_freq, full, damping_mode, curvature,
            observer_dt, factor_cost, fisher, stats_batch: optimizer hyperparameters; None
            takes the task's tuned value or the optimizer's default; an optimizer ignores
            the ones it does not take.
        ddp_base: DDPNOpt's and DGNOpt's base optimizer (``"sgd"``, ``"rmsprop"``,
            ``"adam"``, ``"ekfac"``); None: sgd.
        dgn_mode: DGNOpt's game (``"fne"``: every layer a player; ``"gr"``: a residual
            block's layers cooperate; ``"chain"``: the skips ignored, a baseline); None: fne.
        rho, inner_steps: E-MSA's penalty weight and L-BFGS iterations per stage (``lr`` is
            its L-BFGS step length); None: 0.5 and 10.
        lr_decay: the learning rate of epoch e (from 0) is ``lr * lr_decay**e``.
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: training batch size; None: the task's default. Under torchrun the global
            batch: each of N processes takes batch_size / N rows of it.
        seed: seeds torch, numpy, python and the data split and shuffling.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        out: output folder; resume: continue the run saved there; overwrite: start over.
        method, rtol, atol, step_size: the ODE solver; None keeps the task's default
            (``step_size`` is required by fixed-step methods such as rk4).
        adjoint: gradients by the adjoint (True) or by backpropagation through the solver;
            optimizers that need the latter (kfac, newton-cg) always get it.
        checkpoint_steps: backpropagate through the solver with step checkpoints (each step
            replayed in the backward from its stored start state: backpropagation's gradient
            at memory of one state per step); needs ``adjoint=False`` and an explicit
            Runge-Kutta method, and excludes newton-cg (it differentiates twice).
        t1: the (initial) integration horizon.
        adaptive_t1: ``"off"``, ``"baseline"`` (first-order open loop) or ``"feedback"``
            (SNOpt's second-order policy) optimisation of the horizon t1.
        t1_lr, t1_reg, t1_update_freq, t1_min: the horizon optimizer's step size, T^2
            regularisation, iterations between T updates and lower bound of T.
        log_every: a metrics row (with an evaluation) every this many steps and per epoch.
        eval_batch_size: batch size of the evaluation.
        progress: show a progress bar.
        threads: torch's intra-op threads during the run (per process); None:
            :func:`default_threads`.
        dist_backend: torchrun only: the process group's backend, ``"auto"`` (NCCL on CUDA,
            gloo on the CPU), ``"gloo"`` or ``"nccl"``; None: auto.
        dist_timeout: torchrun only: seconds a collective waits for the other processes
            before the run fails; None: 1800.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    train_size: int | None = None
    test_size: int | None = 2000
    task: str | None = None
    model: str | None = None
    width: int | None = None
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    eps: float | None = None
    alpha: float | None = None
    update_freq: int | None = None
    full: bool | None = None
    damping_mode: str | None = None
    curvature: str | None = None
    observer_dt: float | None = None
    factor_cost: float | None = None
    fisher: str | None = None
    stats_batch: int | None = None
    ddp_base: str | None = None
    dgn_mode: str | None = None
    rho: float | None = None
    inner_steps: int | None = None
    lr_decay: float = 0.8
    epochs: int = 15
    batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    out: str = "runs/ocnode"
    resume: bool = False
    overwrite: bool = False
    method: str | None = None
    rtol: float | None = None
    atol: float | None = None
    step_size: float | None = None
    adjoint: bool = True
    checkpoint_steps: bool = False
    t1: float = 1.0
    adaptive_t1: str = "off"
    t1_lr: float = 0.1
    t1_reg: float = 1e-4
    t1_update_freq: int = 50
    t1_min: float = 0.1
    log_every: int = 10
    eval_batch_size: int = 1024
    progress: bool = True
    threads: int | None = None
    dist_backend: str | None = None
    dist_timeout: float | None = None

    @classmethod
    def from_run(cls, out: str | Path, **changes: Any) -> TrainConfig:
        """The settings of the run saved in ``out`` (its ``config.json``), set to resume it.

        Args:
            out: the run's folder.
            **changes: fields to change; only :data:`RESUMABLE_FIELDS` may differ from the
                saved values (e.g. ``epochs`` to train longer). Outside torchrun the saved
                :data:`DIST_FIELDS` are dropped (a multi-process run resumes in one process).

        Raises:
            ValueError: no saved run in ``out``, or a change that would alter the run.
        """
        saved = _saved_settings(Path(out))
        known = {f.name for f in dataclasses.fields(cls)}
        fixed = sorted(k for k, v in changes.items() if k in known and k not in RESUMABLE_FIELDS
                       and saved.get(k) != v)
        if fixed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {changes[k]!r}" for k in fixed)
            raise ValueError(f"cannot resume {out} with other settings ({diffs}); only "
                             f"{', '.join(sorted(RESUMABLE_FIELDS))} may change. Start a new "
                             "run in another out folder to change them")
        values = {**{k: v for k, v in saved.items() if k in known}, **changes}
        if not (launched() or active()):  # a multi-process run resumed in one process
            values.update({k: None for k in DIST_FIELDS if k not in changes})
        return cls(**{**values, "out": str(out), "resume": True, "overwrite": False})

    def validate(self) -> None:
        """Raise ValueError, saying what to change, if the configuration cannot run."""
        if self.dataset not in DATASETS and ":" not in self.dataset:
            _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name, registry in (("task", TASKS), ("damping_mode", DAMPING_MODES),
                               ("fisher", FISHERS), ("curvature", CURVATURES),
                               ("ddp_base", DDP_BASES), ("dgn_mode", DGN_MODES)):
            if getattr(self, name) is not None:
                _check_choice(name, getattr(self, name), registry)
        _check_choice("adaptive_t1", self.adaptive_t1, ADAPTIVE_T1)
        if self.model is not None:
            _check_choice("model", self.model, {m for ms in MODELS.values() for m in ms})
        self._validate_numbers()
        self._validate_rates()
        self._validate_checkpoint()
        if self._validate_processes():
            process_device(self.device)
        else:
            resolve_device(self.device)

    def _validate_checkpoint(self) -> None:
        if not self.checkpoint_steps:
            return
        if self.adjoint:
            raise ValueError("checkpoint_steps backpropagates through the solver: pass "
                             "adjoint=False too (--backprop on the command line)")
        if self.optimizer == "newton-cg":
            raise ValueError("newton-cg differentiates twice through the solver, which "
                             "replayed steps cannot: drop checkpoint_steps (--checkpoint-steps)")

    def _validate_processes(self) -> bool:
        """Settings that only torchrun runs take, and what such runs cannot do; returns
        whether this is such a run."""
        if not (launched() or active()):
            given = [f"--{f.replace('_', '-')}" for f in DIST_FIELDS
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to multi-process runs; launch "
                                 "with torchrun --nproc_per_node N -m ocnode train ..., or "
                                 "drop them")
            return False
        if self.dist_backend is not None:
            _check_choice("dist_backend", self.dist_backend, BACKENDS)
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        return True

    def _validate_numbers(self) -> None:
        positive = {"lr": self.lr, "rtol": self.rtol, "atol": self.atol, "t1": self.t1,
                    "eps": self.eps, "t1_lr": self.t1_lr, "t1_min": self.t1_min,
                    "step_size": self.step_size, "observer_dt": self.observer_dt,
                    "factor_cost": self.factor_cost, "rho": self.rho}
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        counts = {"epochs": self.epochs, "log_every": self.log_every,
                  "eval_batch_size": self.eval_batch_size, "t1_update_freq": self.t1_update_freq,
                  "batch_size": self.batch_size, "width": self.width,
                  "update_freq": self.update_freq, "stats_batch": self.stats_batch,
                  "inner_steps": self.inner_steps,
                  "train_size": self.train_size, "test_size": self.test_size,
                  "threads": self.threads}
        for name, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def _validate_rates(self) -> None:
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        momentum = self.momentum if self.momentum is not None else 0.0
        weight_decay = self.weight_decay if self.weight_decay is not None else 0.0
        if not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("momentum must be in [0, 1) and weight_decay >= 0, got "
                             f"{self.momentum} and {self.weight_decay}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (EKFAC second-moment rate) must be in [0, 1], got "
                             f"{self.alpha}; 1 freezes the second moments (plain K-FAC)")
        if self.t1_reg < 0:
            raise ValueError(f"t1_reg must be >= 0, got {self.t1_reg}")
        if self.adaptive_t1 != "off" and self.t1_min > self.t1:
            raise ValueError(f"t1_min ({self.t1_min}) must not exceed the initial horizon t1 "
                             f"({self.t1}); lower t1_min or raise t1")

    def solver_changes(self) -> dict[str, Any]:
        """The solver settings this config sets (the rest keeps the task's default solver)."""
        values = {"method": self.method, "rtol": self.rtol, "atol": self.atol,
                  "step_size": self.step_size, "checkpoint": self.checkpoint_steps or None}
        return {k: v for k, v in values.items() if v is not None}

    def task_settings(self) -> TaskSettings:
        """The choices this config makes for :func:`ocnode.training.tasks.make_task`."""
        return TaskSettings(task=self.task, model=self.model, width=self.width,
                            batch_size=self.batch_size, solver_changes=self.solver_changes(),
                            t1=self.t1,
                            trainable_t1=self.adaptive_t1 != "off", test_size=self.test_size,
                            eval_batch_size=self.eval_batch_size)

    def hparams(self, accepted: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters this config sets (not None) that an optimizer ``accepted``."""
        values = {HPARAM_NAMES.get(k, k): getattr(self, k) for k in HPARAM_FIELDS}
        return {k: v for k, v in values.items() if k in accepted and v is not None}


def _saved_settings(out: Path) -> dict[str, Any]:
    """A run's settings: its ``config.json``, or (older runs) its checkpoint's copy."""
    path = out / "config.json"
    try:
        return dict(json.loads(path.read_text()))
    except OSError:
        pass
    except ValueError as err:
        raise ValueError(f"resume: {path} is not valid JSON ({err}); restore it, or give every "
                         "setting of the run again without relying on it") from None
    if not (out / "checkpoint.pt").exists():
        raise ValueError(f"resume: there is no run in {out} (no config.json, no checkpoint.pt)")
    return dict(load_checkpoint(out / "checkpoint.pt")["config"])


def default_threads(processes: int = 1) -> int:
    """Half the machine's cores, at least 1 and at most 4: small Neural ODEs gain little from
    more threads, and a shared machine is not oversubscribed (on a 2-core machine shared with
    another job, the default digits run took 84-122 s with 2 threads and 8 s with 1). With
    ``processes`` processes of a run on the machine, half the cores are shared among them."""
    return max(1, min(4, (os.cpu_count() or 1) // 2 // processes))


def _check_choice(field: str, value: str, registry: Collection[str]) -> None:
    if value not in registry:
        raise ValueError(f"unknown {field} {value!r}; choose one of {', '.join(sorted(registry))}")
