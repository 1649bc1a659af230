"""The optimizer registry: one name, one optimizer, everywhere (CLI, comparisons, benchmarks).

=========== ============================================================ ===============
name        what it is                                                   ODE blocks
=========== ============================================================ ===============
adam        ``torch.optim.Adam``                                         adjoint
sgd         ``torch.optim.SGD`` (momentum 0.9 by default)                adjoint
snopt       :class:`ocnode.optim.SNOpt`: curvature from the adjoint's    adjoint
            backward solve (O(1) memory in the solver steps)
kfac        K-FAC through the solver: the same class and EKFAC update,   backprop
            curvature from hooks on every solver evaluation (memory
            grows with the number of steps)
newton-cg   :class:`ocnode.optim.NewtonCG`: exact Hessian-vector         backprop
            products through the solve (needs ``step(closure)``)
ddpnopt     :class:`ocnode.optim.DDPNOpt`: layer-wise DDP feedback       none: plain
            policies over a base (sgd, rmsprop, adam, ekfac); for        nn.Sequential
            ``nn.Sequential`` chains only (models fcn, cnn)              chains
dgnopt      :class:`ocnode.optim.DGNOpt`: DDPNOpt's policies extended    none: chains
            over skip states, layers as players of a game (mode fne or   and Residual
            gr); chains with ``ocnode.Residual`` blocks (models resmlp,  blocks
            resnet; also fcn, cnn)
emsa        :class:`ocnode.optim.EMSA`: the extended method of           none: chains
            successive approximations (Li et al. 2018), each stage's     (a Residual
            extended Hamiltonian minimised by L-BFGS (models fcn, cnn,   block is one
            resmlp, resnet)                                              stage)
=========== ============================================================ ===============

"SNOpt with alpha 1" (plain K-FAC with eigenvalue damping on adjoint blocks) is
``snopt`` with ``alpha=1``. Defaults are the SNOpt authors' (Liu, Chen, Theodorou 2021) for
MNIST; tasks override them (:attr:`ocnode.training.tasks.Task.hparams`), and explicit values
override both (:func:`resolve_hparams`).

Adding an optimizer: write its class, then add one :class:`OptimizerEntry` to
:data:`OPTIMIZERS` here (its builder, its hyperparameters with defaults, and whether the
model's ODE blocks must backpropagate through the solver). Nothing else needs to change: the
CLI, the training loop and the comparison harness read this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ocnode.optim import EMSA, DDPNOpt, DGNOpt, NewtonCG, SNOpt

Builder = Callable[[nn.Module, list[nn.Parameter], dict[str, Any]], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one registered optimizer.

    Attributes:
        build: ``build(model, params, hparams)`` returns the optimizer. It gets the model too,
            because curvature-based optimizers hook its layers.
        defaults: every hyperparameter the optimizer takes here, with its default.
        through_solver: the model's ODE blocks backpropagate through the solver
            (``adjoint=False``) instead of using the adjoint.
        needs_closure: ``step`` must be called with a closure that recomputes the loss.
        chains_only: the optimizer trains ``nn.Sequential`` chains of layers only (no ODE
            blocks): the task models fcn and cnn (and resmlp, resnet: chains with Residual
            blocks, which DDPNOpt refuses and DGNOpt trains).
        residual: the optimizer can train nets with ``ocnode.Residual`` blocks.
    """

    build: Builder
    defaults: Mapping[str, Any]
    through_solver: bool = False
    needs_closure: bool = False
    chains_only: bool = False
    residual: bool = True


_SNOPT_DEFAULTS: dict[str, Any] = {
    "lr": 0.02, "momentum": 0.0, "weight_decay": 0.0, "eps": 0.05, "alpha": 0.75,
    "update_freq": 20, "full": False, "damping_mode": "ekfac", "curvature": "stages",
    "observer_dt": None, "factor_cost": 0.25, "fisher": "empirical", "stats_batch": None}


def _snopt(model: nn.Module, params: list[nn.Parameter], hp: dict[str, Any]) -> SNOpt:
    return SNOpt(model, params=params, **hp)


_DDPNOPT_DEFAULTS: dict[str, Any] = {
    "lr": None, "base": "sgd", "momentum": 0.0, "weight_decay": 0.0, "betas": (0.9, 0.999),
    "eps": 1e-8, "alpha": None, "eps_ekfac": 0.05, "update_freq": 100, "eps_vxx": 0.0,
    "vxx_correction": False, "feedback": True, "second_order": False,
    "max_feedback_ratio": None, "project_bn": True}


#: DDPNOpt's learning rate when none is given: its base optimizer's usual one.
DDPNOPT_BASE_LR = {"sgd": 0.02, "rmsprop": 1e-3, "adam": 1e-3, "ekfac": 0.02}


def _ddpnopt(model: nn.Module, params: list[nn.Parameter], hp: dict[str, Any]) -> DDPNOpt:
    lr = hp.pop("lr")
    return DDPNOpt(model, params=params, lr=DDPNOPT_BASE_LR.get(hp["base"], 0.02)
                   if lr is None else lr, **hp)


_DGNOPT_DEFAULTS: dict[str, Any] = {**_DDPNOPT_DEFAULTS, "mode": "fne"}


def _dgnopt(model: nn.Module, params: list[nn.Parameter], hp: dict[str, Any]) -> DGNOpt:
    lr = hp.pop("lr")
    return DGNOpt(model, params=params, lr=DDPNOPT_BASE_LR.get(hp["base"], 0.02)
                  if lr is None else lr, **hp)


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adam": OptimizerEntry(lambda m, p, hp: torch.optim.Adam(p, **hp),
                           {"lr": 1e-3, "weight_decay": 0.0}),
    "sgd": OptimizerEntry(lambda m, p, hp: torch.optim.SGD(p, **hp),
                          {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.0}),
    "snopt": OptimizerEntry(_snopt, _SNOPT_DEFAULTS),
    "kfac": OptimizerEntry(_snopt, _SNOPT_DEFAULTS, through_solver=True),
    "newton-cg": OptimizerEntry(lambda m, p, hp: NewtonCG(p, **hp),
                                {"lr": 1.0, "damping": 0.3, "cg_iters": 5,
                                 "cg_tol": 1e-4, "max_step_norm": None, "adapt_damping": False},
                                through_solver=True, needs_closure=True),
    "ddpnopt": OptimizerEntry(_ddpnopt, _DDPNOPT_DEFAULTS, chains_only=True, residual=False),
    "dgnopt": OptimizerEntry(_dgnopt, _DGNOPT_DEFAULTS, chains_only=True),
    "emsa": OptimizerEntry(lambda m, p, hp: EMSA(m, params=p, **hp),
                           {"rho": 0.5, "inner_steps": 10, "lr": 1.0, "weight_decay": 0.0,
                            "inner_tol": 1e-7}, chains_only=True),
}


def compatible(chain: bool, residual: bool = False) -> list[str]:
    """The registered optimizers that can train a model: for a chain of layers without ODE
    blocks (``chain``) all of them, else all but the chains-only ones; and for a net with
    Residual blocks (``residual``) only those that handle skips."""
    return [n for n, e in OPTIMIZERS.items()
            if (chain or not e.chains_only) and (e.residual or not residual)]


def check_fits(name: str, chain: bool, model: str, residual: bool = False) -> None:
    """Raise ValueError if optimizer ``name`` cannot train a ``model`` (``chain``: a chain of
    layers without ODE blocks; ``residual``: with Residual blocks)."""
    if residual and not OPTIMIZERS[name].residual:
        raise ValueError(f"{name} trains plain chains; the {model!r} model has skip "
                         "connections (Residual blocks): use dgnopt")
    if OPTIMIZERS[name].chains_only and not chain:
        raise ValueError(f"{name} trains chains of layers without ODE blocks (--model fcn, or "
                         "cnn for images; dgnopt also resmlp and resnet), not the "
                         f"{model!r} model; or pick another optimizer")


def check_name(name: str) -> OptimizerEntry:
    """The registry entry of ``name``; ValueError listing the names otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def resolve_hparams(name: str, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The registry defaults of ``name`` overridden by each mapping of ``layers`` in turn.

    A value of None in a layer means "not set here" and keeps the value below it.

    Raises:
        ValueError: a key the optimizer does not take.
    """
    entry = check_name(name)
    out = dict(entry.defaults)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in out:
                raise ValueError(f"optimizer {name!r} takes no hyperparameter {key!r}; it "
                                 f"takes {', '.join(sorted(out))}")
            if value is not None:
                out[key] = value
    return out


def build_optimizer(name: str, model: nn.Module, hparams: Mapping[str, Any] | None = None,
                    params: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model``.

    Args:
        name: a key of :data:`OPTIMIZERS`.
        model: the network (built with ``adjoint=not OPTIMIZERS[name].through_solver``).
        hparams: overrides of the registry defaults (None values keep the default).
        params: the parameters to train (default: all of the model's).
    """
    hp = resolve_hparams(name, hparams)
    params = list(model.parameters()) if params is None else params
    return OPTIMIZERS[name].build(model, params, hp)
