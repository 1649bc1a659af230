"""Ordinary K-FAC capture from the normal forward and backward (Martens, Grosse 2015).

For layers outside ODE blocks (scale B, no quadrature weight), and for every solver evaluation
of an ODE block that backpropagates through its solver (``adjoint=False``: "K-FAC through the
solver", memory linear in the number of steps). Each forward call of a layer with grad is one
use: a forward hook keeps its input and puts a hook on its output tensor, which receives the
output gradient when the loss's backward arrives.

With ``factor_cost`` set, each use forms its factors from a window of its batch's samples
(:func:`~ocnode.curvature.factors.sampled_rows`; the window moves on at every use), so that a
factor product costs about ``factor_cost`` times the layer's own product.

Only the loss's own backward feeds the factors: a backward that runs with grad mode on (one
with ``create_graph``, e.g. a CNF's Jacobian trace inside its vector field, or Newton-CG's
double backward) computes an inner derivative, not the loss's gradient, and is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ocnode.curvature.factors import FactorAccumulator, sampled_rows


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
        factor_cost: None (every sample of each use), or > 0: sample the rows (see the
            module docstring).
    """

    def __init__(self, modules: Iterable[nn.Module], sink: FactorAccumulator,
                 listening: bool = True, factor_cost: float | None = None) -> None:
        self.sink, self._listening, self._alive = sink, listening, True
        self.factor_cost, self.uses = factor_cost, 0
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._forward_hook) for m in modules]

    def listen(self, on: bool) -> None:
        """Take (True) or ignore (False) the following backward passes."""
        self._listening = on

    def restart(self) -> None:
        """Start the sample window afresh, as at construction (a new or repeated iteration)."""
        self.uses = 0

    def remove(self) -> None:
        """Remove the forward hooks; output hooks of earlier forwards stop adding."""
        for h in self._handles:
            h.remove()
        self._handles, self._alive = [], False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        if self.factor_cost is None:
            x = inputs[0].detach()
        else:
            rows, fill = sampled_rows(module, inputs[0], self.uses, self.factor_cost)
            self.uses += 1

        def backward_hook(g: torch.Tensor) -> None:
            # checked at backward time: a differentiable backward (grad mode on) computes an
            # inner derivative, not the loss's gradient
            if not (self._alive and self._listening and not torch.is_grad_enabled()):
                return
            if self.factor_cost is None:
                self.sink.add(module, x, g, 1, None)
            else:
                fill(g)
                self.sink.add_rows([rows])

        output.register_hook(backward_hook)

