"""Fitting irregularly observed trajectories with a Neural ODE on the observed state.

A batch of ``B`` series is observed at different times (padded arrays with a mask, as
:func:`ocnode.data.load_dataset` returns for the kind ``"trajectories"``). One solve serves
the whole batch: :func:`union_grid` sorts the union of the batch's observation times, the
model integrates every series from its initial state over that grid, and
:func:`gather_series` / :func:`masked_mse` pick each series' own times back out (the
"union of time points" trick of Chen et al. 2018, "Neural Ordinary Differential Equations",
and Rubanova et al. 2019, "Latent ODEs for Irregularly-Sampled Time Series").

:class:`TrajectoryODE` integrates ``dz/dt = F(z)`` on the observed state, optionally augmented
with zero-initialised extra dimensions (Dupont, Doucet, Teh 2019, "Augmented Neural ODEs").
Its vector field keeps its learnable maps in ``nn.Linear`` layers (``ConcatLinear`` when it
is time dependent), so SNOpt's curvature observer sees them.

Typical use::

    values, times, mask = batch              # (B, L, D), (B, L), (B, L)
    grid, _ = union_grid(times, mask)        # (G,), starting at the series' common t0
    pred = model(values[:, 0], grid)         # (G, B, D); step 0 holds each initial state
    loss = masked_mse(pred, values, times, mask)
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
from torch import Tensor, nn

from ocnode.nn.fields import ACTIVATIONS
from ocnode.nn.layers import ConcatLinear
from ocnode.nn.ode import ODEBlock
from solvers import SolverSpec


def _check_series(times: Tensor, mask: Tensor) -> None:
    if not isinstance(times, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("times and mask must be tensors, shapes (B, L)")
    if times.dim() != 2 or mask.shape != times.shape or times.shape[1] < 1:
        raise ValueError(f"times and mask must both be (B, L) with L >= 1, got "
                         f"{tuple(times.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}; use mask.bool()")


def union_grid(times: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The sorted union of a batch's observation times, and where each observation lies on it.

    Step 0 of every series is its start: ``times[:, 0]`` must be one common time ``t0``,
    which always begins the grid (whether or not ``mask[:, 0]`` is set), so that the grid can
    be passed to :meth:`TrajectoryODE.forward` with the batch's initial states.

    Args:
        times: ``(B, L)`` observation times.
        mask: ``(B, L)`` bool, True at the observations to put on the grid.

    Returns:
        ``(grid, index)``: ``grid`` ``(G,)`` strictly increasing times, ``grid[0] = t0``;
        ``index`` ``(B, L)`` int64 with ``grid[index[b, l]] == times[b, l]`` where ``mask``
        is True (0 elsewhere).

    Raises:
        ValueError: bad shapes, start times that differ, or an observation before ``t0``.
    """
    _check_series(times, mask)
    t0 = times[:, 0]
    if not bool((t0 == t0[0]).all()):
        raise ValueError("every series must start at the same time times[:, 0] (the time of "
                         f"the initial states), got {sorted(set(t0.tolist()))[:5]}")
    observed = times[mask]
    if bool((observed < t0[0]).any()):
        raise ValueError(f"observations before the start time {float(t0[0])}: put the "
                         "initial state first in each series")
    grid, inverse = torch.unique(torch.cat([t0[:1], observed]), sorted=True, return_inverse=True)
    index = torch.zeros(times.shape, dtype=torch.long, device=times.device)
    index[mask] = inverse[1:]
    return grid, index


def gather_series(pred: Tensor, index: Tensor) -> Tensor:
    """Each series' states at its own times, from states on the union grid.

    Args:
        pred: ``(G, B, D)`` states on the grid of :func:`union_grid`.
        index: ``(B, L)`` grid positions from :func:`union_grid`.

    Returns:
        ``(B, L, D)``: ``out[b, l] = pred[index[b, l], b]``.
    """
    if pred.dim() != 3 or index.dim() != 2 or pred.shape[1] != index.shape[0]:
        raise ValueError(f"pred must be (G, B, D) and index (B, L) with the same B, got "
                         f"{tuple(pred.shape)} and {tuple(index.shape)}")
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    return pred[index, rows]


def masked_mse(pred: Tensor, values: Tensor, times: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked observations, predictions given on the union grid.

    The grid is rebuilt from ``(times, mask)`` with :func:`union_grid`, so ``pred`` must be
    the model's output on exactly that grid. Masked-out entries (padding, held-out points)
    contribute nothing, whatever ``values`` holds there.

    Args:
        pred: ``(G, B, D)`` predicted states on ``union_grid(times, mask)[0]``.
        values: ``(B, L, D)`` observed values.
        times: ``(B, L)`` observation times.
        mask: ``(B, L)`` bool, the observations to score.

    Returns:
        A scalar: ``sum_{b,l masked, d} (pred - values)^2 / (D * number masked)``.

    Raises:
        ValueError: bad shapes, a ``pred`` not on the union grid, or an empty mask.
    """
    grid, index = union_grid(times, mask)
    if values.dim() != 3 or values.shape[:2] != times.shape:
        raise ValueError(f"values must be (B, L, D) matching times {tuple(times.shape)}, got "
                         f"{tuple(values.shape)}")
    if pred.shape != (grid.numel(), values.shape[0], values.shape[2]):
        raise ValueError(f"pred must be (G, B, D) = {(grid.numel(), *values.shape[::2])} on the "
                         f"union grid of (times, mask), got {tuple(pred.shape)}")
    count = int(mask.sum())
    if count == 0:
        raise ValueError("mask selects no observation to score")
    # where, not a product with the mask: NaN or inf at masked-out entries stays out of the
    # loss and its gradient
    diff = torch.where(mask.unsqueeze(-1), gather_series(pred, index) - values, 0.0)
    return diff.square().sum() / (count * values.shape[2])


class TrajectoryField(nn.Module):
    """An MLP vector field ``F(t, z)``: ``dim -> hidden ... -> dim``.

    Autonomous by default (``F(z)``: plain ``nn.Linear`` layers, ``t`` ignored), which is what
    extrapolating beyond the training window needs; ``time_dependent=True`` uses
    :class:`ConcatLinear` layers that also see ``t``.

    Args:
        dim: state features.
        hidden: width of the hidden layers.
        n_layers: number of linear layers (>= 1).
        activation: ``"tanh"``, ``"relu"``, ``"softplus"``, ``"elu"`` or ``"silu"``.
        time_dependent: feed ``t`` to every layer.

    Attributes:
        supports_batched_time: ``t`` may be a per-row ``(B,)`` time vector.
    """

    supports_batched_time = True

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 2, activation: str = "tanh",
                 time_dependent: bool = False) -> None:
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("n_layers", n_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        widths = [dim] + [hidden] * (n_layers - 1) + [dim]
        layer = ConcatLinear if time_dependent else nn.Linear
        self.layers = nn.ModuleList(layer(a, b) for a, b in itertools.pairwise(widths))
        self.activation = ACTIVATIONS[activation]()
        self.time_dependent = time_dependent

    def forward(self, t: float | Tensor, z: Tensor) -> Tensor:
        """``(..., dim) -> (..., dim)``; ``t`` a scalar or ``(B,)`` per-row times."""
        for i, layer in enumerate(self.layers):
            if i > 0:
                z = self.activation(z)
            z = layer(t, z) if self.time_dependent else layer(z)
        return z


class TrajectoryODE(nn.Module):
    """A Neural ODE on the observed state: ``x(t) = first dim of z(t)``, ``z(t0) = [x0, 0]``.

    Args:
        dim: observed features ``D``.
        hidden: width of the vector field's hidden layers.
        n_layers: linear layers in the vector field.
        augment: extra zero-initialised state dimensions (Dupont et al. 2019); 0 for none.
        solver: the :class:`ODEBlock`'s solver settings. None: :attr:`default_solver`,
            ``SolverSpec()`` with the seminorm in the adjoint solve (Kidger, Chen, Lyons
            2021, "'Hey, that's not an ODE'"; the time-series setting of SNOpt, Liu, Chen,
            Theodorou 2021): leaving the parameter adjoint out of the backward error control
            can save backward steps of adaptive methods, and the gradients stay within the
            tolerance. A spec of your own is used as given.
        activation: activation of the vector field.
        time_dependent: whether the field sees ``t`` (default autonomous).

    Attributes:
        default_solver: ``SolverSpec(seminorm=True)``.

    Raises:
        ValueError: bad sizes.
    """

    default_solver: ClassVar[SolverSpec] = SolverSpec(seminorm=True)

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 2, augment: int = 0,
                 solver: SolverSpec | None = None, activation: str = "tanh",
                 time_dependent: bool = False) -> None:
        super().__init__()
        if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
            raise ValueError(f"augment must be an int >= 0, got {augment!r}")
        self.dim, self.augment = dim, augment
        field = TrajectoryField(dim + augment, hidden, n_layers, activation, time_dependent)
        self.ode = ODEBlock(field, solver=self.default_solver if solver is None else solver,
                            name="trajectory")

    def forward(self, x0: Tensor, t: Tensor) -> Tensor:
        """Integrate every series from its initial state and return the states at ``t``.

        Args:
            x0: ``(B, D)`` initial states at ``t[0]``.
            t: ``(N,)`` strictly increasing times, e.g. the grid of :func:`union_grid`.

        Returns:
            ``(N, B, D)``: the observed part of the state at each time.
        """
        if x0.dim() != 2 or x0.shape[1] != self.dim:
            raise ValueError(f"x0 must be (B, {self.dim}), got {tuple(x0.shape)}")
        if t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"t must be a 1-D tensor of times, got shape {tuple(t.shape)}")
        z0 = torch.cat([x0, x0.new_zeros(x0.shape[0], self.augment)], dim=1) if self.augment \
            else x0
        states = self.ode.trajectory(z0, t.to(x0.dtype))
        assert isinstance(states, Tensor)  # a tensor state gives a tensor trajectory
        return states[..., :self.dim]

    def predict(self, x0: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        """Each series' predicted states at its own masked times.

        Args:
            x0: ``(B, D)`` initial states at the common start ``times[:, 0]``.
            times: ``(B, L)`` times; mask: ``(B, L)`` bool.

        Returns:
            ``(B, L, D)`` predictions (entries outside ``mask`` hold the state at ``t0``).
        """
        grid, index = union_grid(times, mask)
        return gather_series(self(x0, grid), index)


def trajectory_mse(model: nn.Module, values: Tensor, times: Tensor, mask: Tensor) -> Tensor:
    """:func:`masked_mse` of ``model`` started from each series' step 0, ``values[:, 0]``.

    Args:
        model: called as ``model(x0 (B, D), t (G,)) -> (G, B, D)``, e.g. a
            :class:`TrajectoryODE`.
        values: ``(B, L, D)``; ``values[:, 0]`` are the initial states at ``times[:, 0]``.
        times: ``(B, L)``; mask: ``(B, L)`` bool, the observations to score.

    Returns:
        The scalar masked MSE.
    """
    grid, _ = union_grid(times, mask)
    return masked_mse(model(values[:, 0], grid), values, times, mask)
