"""Kronecker factor sums of one layer and the per-layer accumulator.

Each call of a layer is one *use* (one evaluation of the vector field on a grid sample, one
solver evaluation, or one forward of a layer outside ODE blocks). Per use,

    A_u = E_rows[z z^T],   B_u = E_rows[(s g)(s g)^T],   rows = batch * locations,

with s the per-sample scale (the loss's batch size B, times the quadrature weight of an ODE
grid sample; Liu, Chen, Theodorou 2021, section 3). The accumulator keeps sum_u A_u, sum_u B_u
and the number of uses N, so that the layer's curvature is N * locations * mean(A) (x) mean(B)
(Martens, Grosse 2015; Grosse, Martens 2016 for the locations of a convolution).

The means can be formed from a subset of the samples of a use (:func:`sampled_rows`: a
window of the shuffled batch, sized by :func:`sample_counts` so that a factor product costs
a given fraction of the layer's own product); they stay unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

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


def weighted_gram(z: torch.Tensor, weight: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """sum_r w_r z_r z_r^T in one matrix product.

    Args:
        z: rows, (M, d); weight: (M,) their weights (>= 0).
        bias: append the constant input 1 of a bias (a last row and column).

    Returns:
        (d [+1], d [+1]).
    """
    zs = z * weight.sqrt().unsqueeze(1)
    gram = zs.t() @ zs
    if bias:
        col = (weight.unsqueeze(1) * z).sum(0, keepdim=True)
        corner = weight.sum().reshape(1, 1)
        gram = torch.cat([torch.cat([gram, col.t()], 1), torch.cat([col, corner], 1)], 0)
    return gram


def weighted_factor_sums(z: torch.Tensor, a_weight: torch.Tensor, g: torch.Tensor,
                         b_weight: torch.Tensor,
                         bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of row outer products, one matrix product per factor.

    Args:
        z: layer input rows, (M_a, d_in); a_weight: (M_a,) their weights (>= 0).
        g: output-gradient rows, (M_b, d_out); b_weight: (M_b,) their weights (>= 0).
        bias: append the constant input 1 of a bias (a last row and column of A).

    Returns:
        (sum_r a_r z_r z_r^T, sum_r b_r g_r g_r^T), shapes (d_in [+1], d_in [+1]) and
        (d_out, d_out).
    """
    return weighted_gram(z, a_weight, bias), weighted_gram(g, b_weight)


#: Fewest samples a sampled factor of one use is formed from.
MIN_SAMPLES = 4
#: Default cost of each factor product relative to the layer's own product, per use.
DEFAULT_FACTOR_COST = 0.25
#: A use's output-gradient rows are kept as their product g^T g (d_out, d_out) instead, once
#: they outnumber its d_out rows this many times: a conv layer of an ODE block sees
#: B * H' * W' rows per solver evaluation, and a refresh keeps every evaluation of a step
#: until the solver accepts it.
GRAM_RATIO = 4


def sample_counts(module: nn.Module, batch: int, factor_cost: float | None) -> tuple[int, int]:
    """How many of a use's ``batch`` samples form its A and its B.

    A (width d_in) from ``ceil(cost * batch * d_out / d_in)`` samples and B (width d_out) from
    ``ceil(cost * batch * d_in / d_out)``, each at least :data:`MIN_SAMPLES` and at most the
    batch, so that each factor product costs about ``cost`` times the layer's own product
    (batch * locations * d_in * d_out). ``factor_cost=None``: every sample.
    """
    if factor_cost is None:
        return batch, batch
    weight = cast(torch.Tensor, module.weight)
    d_out = int(weight.shape[0])
    d_in = weight.numel() // d_out
    def count(d_from: int, d_to: int) -> int:
        return min(batch, max(MIN_SAMPLES, math.ceil(factor_cost * batch * d_to / d_from)))
    return count(d_in, d_out), count(d_out, d_in)


def window(x: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows start, start + 1, ... (``count`` of them, wrapping around) of x's first dim."""
    n = x.shape[0]
    if count >= n:
        return x
    start %= n
    if start + count <= n:  # a view: no copy, one op
        return x[start:start + count]
    return torch.cat([x[start:], x[:start + count - n]])


@dataclass
class Rows:
    """One use of a layer as factor rows: its inputs z and output gradients g, from a window
    of the batch's samples (batches are shuffled: a window is a random subset).

    Attributes:
        module: the layer.
        z: input rows, (k_a * locations, d_in), without the bias's 1.
        batch: B, the samples of the use (the loss's batch as the layer sees it).
        locations: rows per sample (conv: output positions).
        g: output-gradient rows (k_b * locations, d_out), once the backward has passed;
            None while it has not, or when they are kept as ``g_gram``.
        weight: quadrature weight of the use (1 outside ODE blocks).
        g_gram: sum of g_r g_r^T over the ``g_count`` output-gradient rows, (d_out, d_out),
            in place of g when that is smaller (:data:`GRAM_RATIO`).
        g_count: the rows behind ``g_gram``.
    """

    module: nn.Module
    z: torch.Tensor
    batch: int
    locations: int
    g: torch.Tensor | None = None
    weight: float = 1.0
    g_gram: torch.Tensor | None = None
    g_count: int = 0

    @property
    def filled(self) -> bool:
        """Whether the backward has passed (g or g_gram is set)."""
        return self.g is not None or self.g_gram is not None

    @property
    def nbytes(self) -> int:
        """Bytes held: z and g (or g_gram)."""
        g = self.g if self.g is not None else self.g_gram
        return sum(t.numel() * t.element_size() for t in (self.z, g) if t is not None)

    def fill(self, g_rows: torch.Tensor) -> None:
        """Set the output-gradient rows (M_b, d_out): as they are, or as their product."""
        if g_rows.shape[0] >= GRAM_RATIO * g_rows.shape[1]:
            g = _full_precision(g_rows)
            self.g_gram, self.g_count = g.t() @ g, g_rows.shape[0]
        else:
            self.g = g_rows


def sampled_rows(module: nn.Module, x: torch.Tensor, start: int, factor_cost: float | None,
                 limit: int | None = None) -> tuple[Rows, Callable[[torch.Tensor], None]]:
    """The :class:`Rows` of one use from its input x (batch first), and the function that
    fills in their g from the output gradient (the same window start).

    The window is taken from the first ``limit`` samples (None: all); the per-sample scale
    and the recorded batch stay x's whole batch (the loss's)."""
    batch = x.shape[0]
    pool = batch if limit is None else min(limit, batch)
    k_a, k_b = sample_counts(module, pool, factor_cost)
    xa = window(x[:pool].detach(), start * k_a, k_a)
    z = input_rows(module, xa)
    rows = Rows(module, z, batch, max(1, z.shape[0] // max(1, xa.shape[0])))

    def fill(g: torch.Tensor) -> None:
        rows.fill(output_rows(module, window(g[:pool].detach(), start * k_b, k_b)))
    return rows, fill


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


def _b_sum(uses: Sequence[Rows]) -> torch.Tensor:
    """sum over the uses of (B_u w_u)^2 / rows_u * sum_r g_r g_r^T, the uses holding rows in
    one weighted product, those holding products added (all filled)."""
    total: torch.Tensor | None = None
    with_rows = [u for u in uses if u.g is not None]
    if with_rows:
        gs = [_full_precision(cast(torch.Tensor, u.g)) for u in with_rows]
        b_w = torch.cat([g.new_full((g.shape[0],), (u.batch * u.weight) ** 2 / g.shape[0])
                         for g, u in zip(gs, with_rows)])
        total = weighted_gram(torch.cat(gs), b_w)
    for u in uses:
        if u.g_gram is not None:
            term = u.g_gram * ((u.batch * u.weight) ** 2 / u.g_count)
            total = term if total is None else total + term
    return cast(torch.Tensor, total)


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
            weight: float | Sequence[float] | None, loss_batch: int | None = None) -> None:
        """Add ``uses`` stacked uses of a layer: its input x and output gradient g.

        The per-sample scale is B * weight (weight None: 1; a sequence: one weight per use,
        in the stacking order), with B the loss's batch size: by
        default the rows of x's batch dimension per use; ``loss_batch`` gives it when x holds
        only a subset of the batch. A layer whose batch dimension holds the whole batch in one
        row (a t-layer seeing a batch of one) is scaled by the weight alone, since its
        gradient already sums over the samples.

        Args:
            module: a covered layer (see :mod:`ocnode.curvature.layers`).
            x: its input, (uses * rows_batch, ...) in the layer's input layout.
            g: the gradient at its output, in the layer's output layout.
            uses: how many uses are stacked along the batch dimension.
            weight: quadrature weight of the samples (ODE grid; one, or one per use), or
                None.
            loss_batch: the loss's batch size when x holds a subset of it.
        """
        z, gr = input_rows(module, x.detach()), output_rows(module, g.detach())
        rows_batch = max(1, x.shape[0] // uses)
        batch = loss_batch if loss_batch is not None and rows_batch > 1 else rows_batch
        rows = z.shape[0] // uses
        z, gr = _full_precision(z), _full_precision(gr)
        if weight is None or isinstance(weight, (int, float)):
            scale = batch * (1.0 if weight is None else weight)
            a_sum, b_sum = factor_sums(z, gr, rows, scale, bias=has_bias(module))
        else:
            if len(weight) != uses:
                raise ValueError(f"{len(weight)} weights for {uses} uses")
            per_use = torch.tensor([(batch * w) ** 2 / rows for w in weight], dtype=gr.dtype,
                                   device=gr.device)
            a_sum, b_sum = weighted_factor_sums(
                z, z.new_full((z.shape[0],), 1.0 / rows), gr,
                per_use.repeat_interleave(gr.shape[0] // uses), bias=has_bias(module))
        self.add_sums(module, a_sum, b_sum, uses, rows / rows_batch, batch)

    def add_rows(self, uses: Sequence[Rows]) -> None:
        """Add uses of one layer given as :class:`Rows`: one weighted product per factor.

        A row of use u weighs 1 / rows_u in A and (B_u w_u)^2 / rows_u in B, so each use adds
        the mean over its rows, B with the per-sample scale B * weight (as :meth:`add`); a
        use whose g is kept as its product adds that product with the same weight.
        """
        uses = [u for u in uses if u.filled]
        if not uses:
            return
        zs = [_full_precision(u.z) for u in uses]
        a_w = torch.cat([z.new_full((z.shape[0],), 1.0 / z.shape[0]) for z in zs])
        module = uses[0].module
        a_sum = weighted_gram(torch.cat(zs), a_w, bias=has_bias(module))
        self.add_sums(module, a_sum, _b_sum(uses), len(uses), uses[0].locations,
                      uses[0].batch)

    def add_sums(self, module: nn.Module, a_sum: torch.Tensor, b_sum: torch.Tensor,
                 uses: float, locations: float, batch: int) -> None:
        """Add factor sums over ``uses`` uses of a layer (see :class:`LayerStats`)."""
        old = self.stats.get(module)
        if old is None:
            self.stats[module] = LayerStats(a_sum, b_sum, float(uses), locations, batch)
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
