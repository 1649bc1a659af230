"""Kronecker factor sums of one layer and the per-layer accumulator.

Each call of a layer is one *use* (one evaluation of the vector field on a grid sample, one
solver evaluation, or one forward of a layer outside ODE blocks). Per use,

    A_u = E_rows[z z^T],   B_u = E_rows[(s g)(s g)^T],   rows = batch * locations,

with s the per-sample scale (the loss's batch size B, times the quadrature weight of an ODE
grid sample; Liu, Chen, Theodorou 2021, section 3). The accumulator keeps sum_u A_u, sum_u B_u
and the number of uses N, so that the layer's curvature is N * locations * mean(A) (x) mean(B)
(Martens, Grosse 2015; Grosse, Martens 2016 for the locations of a convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ocnode.curvature.layers import has_bias, input_rows, output_rows


def factor_sums(z: torch.Tensor, g: torch.Tensor, rows_per_use: int, scale: float,
                bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over uses of the per-use factors E_rows[z z^T] and E_rows[(s g)(s g)^T].

    Args:
        z: layer inputs, (M, d_in) rows (Linear rows or conv patches), M = uses * rows.
        g: output gradients, (M, d_out).
        rows_per_use: rows contributed by one use (batch * locations).
        scale: s, the factor that turns g into per-sample scale (batch size, times the
            quadrature weight for samples along an ODE trajectory).
        bias: append the constant input 1 of a bias (a last row and column of A).

    Returns:
        (sum_u A_u, sum_u B_u), shapes (d_in [+1], d_in [+1]) and (d_out, d_out).
    """
    a_sum = z.t() @ z
    if bias:
        col = z.sum(0, keepdim=True)
        corner = torch.full((1, 1), float(z.shape[0]), dtype=z.dtype, device=z.device)
        a_sum = torch.cat([torch.cat([a_sum, col.t()], 1), torch.cat([col, corner], 1)], 0)
    a_sum = a_sum / rows_per_use
    gs = g * scale
    return a_sum, gs.t() @ gs / rows_per_use


@dataclass
class LayerStats:
    """Accumulated factors of one layer.

    Attributes:
        a_sum: sum over uses of A_u, (d_in [+1], d_in [+1]).
        b_sum: sum over uses of B_u, (d_out, d_out).
        uses: number of uses N.
        locations: rows per sample of one use (conv H'*W', 1 for a Linear on (B, d)).
        batch: the loss's batch size B (for EKFAC's B * G~^2 term).
    """

    a_sum: torch.Tensor
    b_sum: torch.Tensor
    uses: float
    locations: float
    batch: int

    @property
    def a_factor(self) -> torch.Tensor:
        """mean(A) over the uses, (d_in [+1], d_in [+1])."""
        return self.a_sum / self.uses

    @property
    def b_factor(self) -> torch.Tensor:
        """mean(B) over the uses, (d_out, d_out)."""
        return self.b_sum / self.uses

    @property
    def num_locations(self) -> float:
        """N * locations: the multiplier of mean(A) (x) mean(B) in the curvature."""
        return self.uses * self.locations


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.half else x


class FactorAccumulator:
    """Accumulates Kronecker factor sums per layer until :meth:`pop`.

    Attributes:
        stats: layer -> :class:`LayerStats` gathered so far.
    """

    def __init__(self) -> None:
        self.stats: dict[nn.Module, LayerStats] = {}

    def add(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor, uses: int,
            weight: float | None, loss_batch: int | None = None) -> None:
        """Add ``uses`` stacked uses of a layer: its input x and output gradient g.

        The per-sample scale is B * weight (weight None: 1), with B the loss's batch size: by
        default the rows of x's batch dimension per use; ``loss_batch`` gives it when x holds
        only a subset of the batch. A layer whose batch dimension holds the whole batch in one
        row (a t-layer seeing a batch of one) is scaled by the weight alone, since its
        gradient already sums over the samples.

        Args:
            module: a covered layer (see :mod:`ocnode.curvature.layers`).
            x: its input, (uses * rows_batch, ...) in the layer's input layout.
            g: the gradient at its output, in the layer's output layout.
            uses: how many uses are stacked along the batch dimension.
            weight: quadrature weight of the samples (ODE grid), or None.
            loss_batch: the loss's batch size when x holds a subset of it.
        """
        z, gr = input_rows(module, x.detach()), output_rows(module, g.detach())
        rows_batch = max(1, x.shape[0] // uses)
        batch = loss_batch if loss_batch is not None and rows_batch > 1 else rows_batch
        rows = z.shape[0] // uses
        scale = batch * (1.0 if weight is None else weight)
        a_sum, b_sum = factor_sums(_full_precision(z), _full_precision(gr), rows, scale,
                                   bias=has_bias(module))
        old = self.stats.get(module)
        if old is None:
            self.stats[module] = LayerStats(a_sum, b_sum, float(uses), rows / rows_batch,
                                            batch)
        else:
            old.a_sum += a_sum
            old.b_sum += b_sum
            old.uses += uses

    def pop(self) -> dict[nn.Module, LayerStats]:
        """Return the accumulated statistics and start afresh."""
        stats, self.stats = self.stats, {}
        return stats

    def discard(self) -> None:
        """Drop everything accumulated (a failed iteration)."""
        self.stats = {}
