"""One training iteration, the same for every task and optimizer, and its NFE counter.

``train_step`` is the standard PyTorch iteration (zero_grad, loss, backward, step; a closure
for optimizers that need one), plus the horizon optimizers of adaptive ``t1`` runs::

    loss.backward(); horizon.observe(); optimizer.step(); horizon.step()

NFE columns (the same meaning in ``metrics.csv`` and in the comparison CSVs): per iteration,
``nfe_forward`` counts the vector-field calls of every ODE block while the loss is evaluated,
and ``nfe_backward`` the calls after it (the adjoint's backward solve, and on SNOpt's refresh
iterations its curvature evaluations: one call per batched chunk of grid samples). Blocks
that backpropagate through the solver make no calls in the backward. For a Neural SDE they
count the drift's evaluations.

Data-parallel runs (``parallel=True``, :mod:`ocnode.training.distributed`): ``loss_fn`` is the
DDP-wrapped loss, whose backward averages the gradients over the processes before the
horizons read dL/dT and before the optimizer's step; every trainable parameter must then get a
gradient, else the step raises on every process before any state changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ocnode.nn import NeuralSDE, ode_blocks
from ocnode.optim import HorizonOptimizer, NewtonCG
from ocnode.training import distributed

LossFn = Callable[[nn.Module, Any], Tensor]


class NFECounter:
    """Counts the vector-field calls of every ODE block (and Neural SDE drift) of a model,
    split by phase.

    ``phase`` is "forward" while the loss is evaluated, "backward" for the rest of an
    iteration and "idle" otherwise (evaluation), when nothing is counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.phase, self.counts = "idle", {"forward": 0, "backward": 0}
        fields = [b.func for b in ode_blocks(model)]
        fields += [m.drift for m in model.modules() if isinstance(m, NeuralSDE)]
        self._handles = [f.register_forward_pre_hook(self._hook) for f in fields]

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        if self.phase != "idle":
            self.counts[self.phase] += 1

    def take(self) -> tuple[int, int]:
        """(forward, backward) calls since the last ``take``; resets both."""
        out = self.counts["forward"], self.counts["backward"]
        self.counts = {"forward": 0, "backward": 0}
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any,
               horizons: Sequence[HorizonOptimizer] = (),
               counter: NFECounter | None = None, *, parallel: bool = False) -> float:
    """One iteration of any registered optimizer on one batch; returns the training loss.

    Args:
        model: the network being trained.
        optimizer: its optimizer; :class:`ocnode.optim.NewtonCG` is stepped with a closure.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss with its graph.
        batch: whatever ``loss_fn`` takes.
        horizons: horizon optimizers of the model's trainable ``t1`` (observed after the
            backward, stepped after the parameter step).
        counter: counts NFE by phase, if given.
        parallel: a data-parallel step (``loss_fn`` averages the gradients over processes).

    Raises:
        FloatingPointError: the loss is NaN or infinite; raised before any backward or step,
            so the model and the optimizer are untouched.
        ValueError: ``parallel`` and a trainable parameter got no gradient (before the step).
    """
    def closure() -> Tensor:
        _set_phase(counter, "forward")
        try:
            return loss_fn(model, batch)
        finally:
            _set_phase(counter, "backward")

    try:
        if isinstance(optimizer, NewtonCG):
            return _checked(float(optimizer.step(closure)))
        optimizer.zero_grad(set_to_none=True)
        loss = closure()
        value = _checked(loss.item())
        loss.backward()
        if parallel:
            distributed.check_used(model)
        for horizon in horizons:
            horizon.observe()  # reads dL/dT and clears t1's gradient
        optimizer.step()
        for horizon in horizons:
            horizon.step()
        return value
    finally:
        _set_phase(counter, "idle")


def _set_phase(counter: NFECounter | None, phase: str) -> None:
    if counter is not None:
        counter.phase = phase


def _checked(value: float) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value}")
    return value
