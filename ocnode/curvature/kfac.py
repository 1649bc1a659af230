"""Ordinary K-FAC capture from the normal forward and backward (Martens, Grosse 2015).

For layers outside ODE blocks (scale B, no quadrature weight), and for every solver evaluation
of an ODE block that backpropagates through its solver (``adjoint=False``: "K-FAC through the
solver", memory linear in the number of steps). Each forward call of a layer with grad is one
use: a forward hook keeps its input and puts a hook on its output tensor, which receives the
output gradient when the loss's backward arrives.

Only the loss's own backward feeds the factors: a backward that runs with grad mode on (one
with ``create_graph``, e.g. a CNF's Jacobian trace inside its vector field, or Newton-CG's
double backward) computes an inner derivative, not the loss's gradient, and is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ocnode.curvature.factors import FactorAccumulator


class KFACHooks:
    """Forward/backward hooks on layers that add their K-FAC factors to a sink.

    The hooks are registered at construction and live until :meth:`remove`; output hooks
    already placed on tensors of an earlier forward do nothing after it. While not
    *listening* (``listening=False``, or :meth:`listen` ``(False)``) backward passes are
    ignored (the true-Fisher mode listens only to the sampled pass).

    Args:
        modules: covered layers (see :mod:`ocnode.curvature.layers`).
        sink: where the factors go.
        listening: whether backward passes are taken from the start.
    """

    def __init__(self, modules: Iterable[nn.Module], sink: FactorAccumulator,
                 listening: bool = True) -> None:
        self.sink, self._listening, self._alive = sink, listening, True
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._forward_hook) for m in modules]

    def listen(self, on: bool) -> None:
        """Take (True) or ignore (False) the following backward passes."""
        self._listening = on

    def remove(self) -> None:
        """Remove the forward hooks; output hooks of earlier forwards stop adding."""
        for h in self._handles:
            h.remove()
        self._handles, self._alive = [], False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()

        def backward_hook(g: torch.Tensor) -> None:
            # checked at backward time: a differentiable backward (grad mode on) computes an
            # inner derivative, not the loss's gradient
            if self._alive and self._listening and not torch.is_grad_enabled():
                self.sink.add(module, x, g, 1, None)

        output.register_hook(backward_hook)

