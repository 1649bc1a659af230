"""E-MSA: the extended method of successive approximations, the optimal-control baseline.

Li, Chen, Tai, E, "Maximum Principle Based Algorithms for Deep Learning", JMLR 18 (2018),
Algorithm 2, in discrete time. A net is a chain of stages x_{t+1} = f_t(x_t, theta_t); one
forward and backward give the states x_t and the per-sample costates z_t = dphi/dx_t (the
negated costates p_t of Pontryagin's principle). Then every stage's parameters minimise its
extended Hamiltonian, with the states and costates of that forward held fixed,

    J_t(theta) = mean_i [ <z_{t+1}, f_t(x_t, theta)> + rho/2 |f_t(x_t, theta) - x_{t+1}|^2
                          + rho/2 |f_x(x_t, theta)^T z_{t+1} - z_t|^2 ] + wd/2 |theta|^2,

by a few L-BFGS iterations (a fresh solver each step, so E-MSA keeps no state). The first
term is the linearised loss (its gradient at the old parameters is the ordinary gradient);
the two penalties keep the new stage close to the old forward and backward dynamics, so
rho plays the role of an inverse step size. The maths are :func:`extended_hamiltonian` and
:func:`costate_in`; the class keeps the records. docs/emsa.md explains the method and the
choices made here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ocnode.optim import kfac_math
from ocnode.optim.ddpnopt import (
    _STOCHASTIC,
    Stage,
    _has_params,
    _Record,
    _Recorder,
    _replayed_rng,
    flatten_chain,
    quiet,
)

StageFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- the maths


def costate_in(stage_fn: StageFn, x: Tensor, z_out: Tensor,
               create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """The stage's output and the costate at its input, f_x(x)^T z_out, per sample.

    Args:
        stage_fn: x -> f(x) with the current parameters. x: (B, ...) the stage's inputs.
        z_out: the costate at the stage's output, shaped like f(x).
        create_graph: keep the graph (to differentiate the result by the parameters).

    Returns:
        (f(x), f_x^T z_out), shaped like the output and like x; the second is zero where
        the output does not depend on x.
    """
    xr = x.detach().requires_grad_(True)
    out = stage_fn(xr)
    if out.shape != z_out.shape:
        raise ValueError(f"the costate at the stage's output has shape {tuple(z_out.shape)}, "
                         f"the stage's output {tuple(out.shape)}")
    (z_in,) = torch.autograd.grad(out, xr, z_out, create_graph=create_graph,
                                  allow_unused=True)
    return out, torch.zeros_like(x) if z_in is None else z_in


def extended_hamiltonian(stage_fn: StageFn, x: Tensor, y: Tensor, z_out: Tensor,
                         z_in: Tensor, rho: float) -> Tensor:
    """One stage's E-MSA objective (to minimise over the parameters inside ``stage_fn``).

    Li et al. 2018, Algorithm 2 (the extended Hamiltonian, maximised there with p = -z).

    Args:
        stage_fn: x -> f(x; theta). x: (B, ...) the stage's inputs in the forward.
        y: f(x; theta_old), the outputs of the forward. z_out: (like y) the per-sample
            costates at the output, B times the gradient of the batch-mean loss.
        z_in: (like x) the costates at the input, f_x(x; theta_old)^T z_out.
        rho: the weight of the two penalties (> 0).

    Returns:
        The scalar mean_i [<z_out, f> + rho/2 |f - y|^2 + rho/2 |f_x^T z_out - z_in|^2].
    """
    out, back = costate_in(stage_fn, x, z_out, create_graph=True)
    batch = x.shape[0]
    hamiltonian = (z_out * out).sum()
    forward_gap = (out - y).pow(2).sum()
    backward_gap = (back - z_in).pow(2).sum()
    return (hamiltonian + 0.5 * rho * (forward_gap + backward_gap)) / batch


# ----------------------------------------------------------------------------- the chain


def emsa_stages(model: nn.Module) -> tuple[list[Stage], list[str]]:
    """A chain's stages for E-MSA: every module with parameters starts one (a Linear, a
    Conv2d, a BatchNorm, a whole ``ocnode.Residual`` block, ...), the parameter-free modules
    after it belong to it.

    Returns:
        The stages, and their names.

    Raises:
        ValueError: the model is not an ``nn.Sequential`` (nested ones are flattened), or a
            module with parameters appears twice.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ValueError("EMSA needs the model as a chain of stages: an nn.Sequential (nested "
                         f"nn.Sequentials are flattened), got a {type(model).__name__}; write "
                         "it out as one (residual blocks as ocnode.Residual entries)")
    prefix: list[nn.Module] = []
    groups: list[tuple[str, list[nn.Module]]] = []
    seen: set[int] = set()
    for name, m in flatten_chain(model):
        if not _has_params(m):
            (groups[-1][1] if groups else prefix).append(m)
            continue
        if id(m) in seen:
            raise ValueError(f"EMSA: entry {name} ({type(m).__name__}) is used twice (shared "
                             "weights); a stage's parameters must belong to that stage alone")
        seen.add(id(m))
        groups.append((name, [m]))
    stages = [Stage(tuple(mods), name, None,
                    any(isinstance(s, _STOCHASTIC) for mod in mods for s in mod.modules()))
              for name, mods in groups]
    return stages, [s.name for s in stages]


# ----------------------------------------------------------------------------- the optimizer


class EMSA(torch.optim.Optimizer):
    """The extended method of successive approximations (Li et al. 2018) for chains.

    Call ``step()`` after exactly one forward and backward of the batch; the loss must be a
    mean over the batch (dimension 0). Each stage's parameters minimise
    :func:`extended_hamiltonian` (plus weight decay) by at most ``inner_steps`` L-BFGS
    iterations with a strong-Wolfe line search (``torch.optim.LBFGS``), all stages against
    the same recorded forward and backward. About ``inner_steps`` times the cost of a
    double-backward per stage: many times an Adam step.

    Args:
        model: an ``nn.Sequential`` chain (see :func:`emsa_stages`), not its parameters.
        rho: the penalty weight (> 0): larger is a smaller step; tune it per task (the
            DDPNOpt table's grid picked 0.1 and 1 for its FCNs).
        inner_steps: L-BFGS iterations per stage and step (>= 1).
        lr: L-BFGS's step length (1 with the line search).
        weight_decay: L2 coefficient wd (adds wd/2 |theta|^2 to every stage's objective).
        inner_tol: L-BFGS's tolerance on the gradient's largest entry (its tolerance on
            changes is 1e-2 of it).
        params: parameters or parameter groups (default ``model.parameters()``); a stage
            uses the hyperparameters of the group of its first trained parameter.

    Data-parallel runs set :attr:`sync` (``ocnode.training.distributed`` does): each rank's
    costates come from its own rows, and every evaluation of a stage's objective averages
    the objective and its gradient over the ranks (one all-reduce), so every rank's L-BFGS
    takes the same iterations on the global batch's objective.

    Attributes:
        stages: the model's stages. stage_names: their names in the model.
        sync: an object with ``mean(tensor)`` (the mean over the ranks), or None (one process).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad hyperparameter, or a model that is not a chain.
    """

    def __init__(self, model: nn.Module, rho: float = 0.5, inner_steps: int = 10,
                 lr: float = 1.0, weight_decay: float = 0.0, inner_tol: float = 1e-7,
                 params: Iterable | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMSA takes the model (an nn.Module), got {type(model).__name__}: "
                            "write EMSA(model, rho=...), and pass params=... to choose the "
                            "parameters or parameter groups")
        _validate(rho, inner_steps, lr, weight_decay, inner_tol)
        defaults = dict(rho=rho, inner_steps=int(inner_steps), lr=lr,
                        weight_decay=weight_decay, inner_tol=inner_tol)
        super().__init__(model.parameters() if params is None else params, defaults)
        for group in self.param_groups:
            _validate(group["rho"], group["inner_steps"], group["lr"], group["weight_decay"],
                      group["inner_tol"])
        self.model = model
        self.stages, self.stage_names = emsa_stages(model)
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        self._trained = [[p for m in s.modules for p in m.parameters() if id(p) in owned]
                         for s in self.stages]
        self._recorder = _Recorder(model, self.stages, set(range(1, len(self.stages))),
                                   True, lambda: True)
        self.sync: Any = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """Minimise every stage's extended Hamiltonian against the last forward/backward.

        A non-finite gradient skips the step with a warning and changes nothing; a stage
        whose inner solve ends non-finite keeps its old parameters (with a warning).

        Raises:
            RuntimeError: no (or more than one) recorded forward with a backward since the
                last step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records, forwards = self._recorder.take()
        costates = self._costates(records, forwards)
        finite = kfac_math.all_finite([z for z in costates if z is not None])
        if self.sync is not None:  # every rank skips, or none
            finite = bool(self.sync.mean(torch.tensor([float(finite)])) == 1.0)
        if not finite:
            warnings.warn("EMSA: non-finite gradient, step skipped (parameters unchanged); "
                          "raise rho or check the loss", RuntimeWarning, stacklevel=2)
            return loss
        assert records is not None
        grads = {p: p.grad for ps in self._trained for p in ps}
        try:
            with quiet(self.model, self._recorder):
                for t, stage in enumerate(self.stages):
                    if self._trained[t]:
                        self._solve_stage(stage, records[t], cast(Tensor, costates[t]),
                                          self._trained[t])
        finally:
            for p, g in grads.items():
                p.grad = g
        return loss

    def _costates(self, records: list[_Record] | None, forwards: int) -> list[Tensor | None]:
        """The per-sample costate at every stage's output (B times the recorded gradient;
        None for a stage with no trained parameters whose output had no gradient)."""
        n = len(self.stages)
        outs = [] if records is None else \
            [records[t + 1].gx if t + 1 < n else records[n - 1].gy for t in range(n)]
        if forwards != 1 or records is None or records[0].x is None \
                or any(z is None for z, ps in zip(outs, self._trained) if ps):
            raise RuntimeError(
                f"EMSA.step() needs exactly one forward of the model with grad and its "
                f"backward since the last step (saw {forwards} forwards, and "
                f"{'no' if records is None else 'incomplete'} gradients); call loss.backward()"
                " before step(), and run extra forwards under torch.no_grad()")
        batch = records[0].x.shape[0]
        return [None if z is None else batch * z for z in outs]

    def _solve_stage(self, stage: Stage, rec: _Record, z_out: Tensor,
                     params: Sequence[Tensor]) -> None:
        """At most ``inner_steps`` L-BFGS iterations on one stage's objective, in place."""
        group = next(g for g in self.param_groups if any(p is params[0] for p in g["params"]))
        x = rec.x
        assert x is not None

        def run(inp: Tensor) -> Tensor:
            with _replayed_rng(rec.rng):
                for m in stage.modules:
                    inp = m(inp)
            return inp

        with torch.enable_grad():
            y, z_in = costate_in(run, x, z_out)
        y, z_in = y.detach(), z_in.detach()
        old = [p.detach().clone() for p in params]
        inner = torch.optim.LBFGS(params, lr=group["lr"], max_iter=group["inner_steps"],
                                  history_size=min(group["inner_steps"], 100),
                                  tolerance_grad=group["inner_tol"],
                                  tolerance_change=1e-2 * group["inner_tol"],
                                  line_search_fn="strong_wolfe")

        def objective() -> Tensor:
            for p in params:
                p.grad = None
            value = extended_hamiltonian(run, x, y, z_out, z_in, group["rho"])
            if group["weight_decay"]:
                value = value + 0.5 * group["weight_decay"] * sum(p.pow(2).sum()
                                                                  for p in params)
            value.backward()
            if self.sync is None:
                return value
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = self.sync.mean(torch.cat([value.detach().reshape(1),
                                             *(g.reshape(-1) for g in grads)]))
            for p, g in zip(params, flat[1:].split([p.numel() for p in params])):
                p.grad = g.view_as(p)
            return flat[0]

        inner.step(objective)  # type: ignore[arg-type]
        if not kfac_math.all_finite(params):
            for p, v in zip(params, old):
                p.copy_(v)
            warnings.warn(f"EMSA: stage {stage.name}'s inner solve ended non-finite; its "
                          "parameters were left as they were (raise rho)", RuntimeWarning,
                          stacklevel=4)

    def close(self) -> None:
        """Remove every hook from the model (to build another optimizer on it)."""
        self._recorder.remove()


def _validate(rho: float, inner_steps: int, lr: float, weight_decay: float,
              inner_tol: float) -> None:
    """Raise ValueError naming the first bad hyperparameter."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (the penalties' weight; 0.03-1 is usual), got {rho}")
    if int(inner_steps) != inner_steps or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1 (L-BFGS iterations per stage; "
                         f"10 is usual), got {inner_steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (L-BFGS's step length; 1 is usual), got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not inner_tol > 0:
        raise ValueError(f"inner_tol must be > 0, got {inner_tol}")
