"""The stage observer: Kronecker factors from the adjoint solve's own evaluations.

On a refresh iteration the adjoint's backward solve already evaluates the vector field and its
vector-Jacobian product with the adjoint a(t) at every stage of every step. A
:class:`ODEStageObserver` (a :class:`solvers.StageObserver`) watches those evaluations: inside
each one, forward hooks on the covered layers record the layer input z and a tensor hook on the
layer output records g = d(a^T f)/dh as the VJP passes through it. When the solver accepts the
step, the step's evaluations enter the factors with their quadrature weights w_e (the step's
length shared among its stages, :func:`solvers.adjoint.stage_weights`); a rejected attempt's
evaluations are dropped. No extra evaluation of the field is made, unlike the grid observer
(:mod:`ocnode.curvature.observer`), which re-evaluates the field on a time grid.

Per evaluation e, with the layer's B samples (the loss's batch) and L rows per sample:

    A_e = mean over the rows of z z^T,   B_e = mean over the rows of (B w_e g)(B w_e g)^T,

the same per-sample scale as the grid's (Liu, Chen, Theodorou 2021, section 3), with w_e in
place of the grid spacing. The rows come from a window of the batch (batches are shuffled, and
the window moves on at every evaluation, so an iteration's evaluations cover the batch): A from
``ceil(factor_cost * B * d_out / d_in)`` samples and B from ``ceil(factor_cost * B * d_in /
d_out)`` (at least :data:`~ocnode.curvature.factors.MIN_SAMPLES`, at most B), so that each
factor product costs about ``factor_cost`` times the layer's own product
(:func:`~ocnode.curvature.factors.sample_counts`). The means stay unbiased.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ocnode.curvature.factors import (
    DEFAULT_FACTOR_COST,
    FactorAccumulator,
    Rows,
    sampled_rows,
)


class ODEStageObserver:
    """Accumulates the factors of a vector field's layers from the adjoint's own evaluations.

    Args:
        modules: covered layers inside the vector field.
        sink: where the factors go.
        factor_cost: the cost of each factor's product relative to the layer's own, per
            evaluation (sets the samples per factor, see the module docstring); > 0, or None
            for every sample.
        stats_batch: if set, only the first ``stats_batch`` samples of each batch are used
            (at the whole batch's per-sample scale).
        listening: whether evaluations are taken from the start (the true-Fisher mode opens
            it only for the sampled pass).
    """

    def __init__(self, modules: Sequence[nn.Module], sink: FactorAccumulator,
                 factor_cost: float | None = DEFAULT_FACTOR_COST,
                 stats_batch: int | None = None, listening: bool = True,
                 memory_budget: float = 32e6) -> None:
        if factor_cost is not None and not factor_cost > 0:
            raise ValueError(f"factor_cost must be > 0, got {factor_cost!r}")
        self.modules, self.sink = list(modules), sink
        self.factor_cost, self.stats_batch = factor_cost, stats_batch
        self.memory_budget = memory_budget
        self._listening = listening
        self._pending: list[list[Rows]] = []  # the current step attempt's evaluations
        self._accepted: dict[nn.Module, list[Rows]] = {}  # weighted, not yet in the sink
        self._accepted_bytes = 0
        self._current: list[Rows] | None = None
        self.evaluations = 0  # evaluations watched (moves the batch window)
        self._handles = [m.register_forward_hook(self._forward) for m in self.modules]

    def close(self) -> None:
        """Remove the layer hooks (the collector calls it when it disarms)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def listen(self, on: bool) -> None:
        """Take (True) or ignore (False) the following evaluations."""
        self._listening = on

    @contextlib.contextmanager
    def evaluation(self, t: float) -> Iterator[None]:
        """Record the covered layers' rows during one evaluation of the field at time t."""
        if not self._listening:
            yield
            return
        self._current = []
        try:
            yield
        finally:
            records, self._current = self._current, None
            self._pending.append(records)
            self.evaluations += 1

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._current is None or not output.requires_grad:
            return
        rows, fill = sampled_rows(module, inputs[0], self.evaluations, self.factor_cost,
                                  limit=self.stats_batch)
        output.register_hook(fill)
        self._current.append(rows)

    def accept_step(self, weights: list[float]) -> None:
        """Keep the pending evaluations with their quadrature weights; they enter the factors
        (one weighted product per factor and layer) at :meth:`finish`, or earlier when the
        kept rows pass ``memory_budget`` bytes."""
        evaluations, self._pending = self._pending, []
        for records, w in zip(evaluations, weights):
            if w <= 0:
                continue
            for rows in records:
                rows.weight = w
                self._accepted.setdefault(rows.module, []).append(rows)
                self._accepted_bytes += rows.nbytes
        if self._accepted_bytes > self.memory_budget:
            self._flush()

    def _flush(self) -> None:
        accepted, self._accepted, self._accepted_bytes = self._accepted, {}, 0
        for uses in accepted.values():
            self.sink.add_rows(uses)

    @property
    def pending(self) -> int:
        """Evaluations recorded and not yet in the factors (or dropped)."""
        return len(self._pending) + sum(len(v) for v in self._accepted.values())

    def reject_step(self) -> None:
        """Drop the pending evaluations (a rejected step attempt)."""
        self._pending = []

    def finish(self) -> None:
        """The backward solve is over: the accepted evaluations enter the factors; those not
        accepted are dropped."""
        self._pending = []
        self._flush()

    def discard(self) -> None:
        """Drop everything not yet in the factors (a backward solve that failed) and start
        the batch window afresh, as for a new iteration."""
        self._pending, self._accepted, self._accepted_bytes = [], {}, 0
        self.evaluations = 0

