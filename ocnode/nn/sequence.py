"""ODE-RNN for irregularly sampled, variable-length time series (Rubanova et al. 2019).

"Latent ODEs for Irregularly-Sampled Time Series" (Rubanova, Chen, Duvenaud, NeurIPS 2019)
introduced the ODE-RNN: between two observations the hidden state h follows an ODE
``dh/dt = f(h)``; at each observation a GRU (Cho et al. 2014) folds the new values in.

One :class:`~ocnode.nn.ODEBlock` with the fixed horizon ``s in [0, 1]`` serves every gap:
the state is the pair ``(h, dt)`` and the vector field is

    dh/ds = dt * f(h),    d(dt)/ds = 0,

so that ``h(s = 1)`` equals the solution of ``dh/dt = f(h)`` over ``[t_k, t_k + dt]`` for
each row's own gap ``dt`` (time rescaling; one solve per gap for the whole batch, whatever
the per-row gaps). The gap travels *in the state*, not in an attribute of the field, so it
stays attached to its row wherever the field is re-evaluated: in the adjoint's backward solve
(long after the forward set any attribute) and in SNOpt's curvature observer, which evaluates
clones of a subset of rows stacked for many grid times.

All learnable maps are ``nn.Linear`` (the GRU too, rather than ``nn.GRUCell``), so SNOpt
collects Kronecker factors for the field along the adjoint (accumulated over every gap of an
iteration) and, with ``full=True``, ordinary K-FAC factors for the GRU and the head.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
from torch import Tensor, nn

from ocnode.nn.ode import ODEBlock
from solvers import SolverSpec


class GRUUpdate(nn.Module):
    """A GRU cell made of two ``nn.Linear`` maps; the same function as ``nn.GRUCell``.

    With ``W_i = input_map`` (rows ordered reset, update, new like ``GRUCell.weight_ih``) and
    ``W_h = hidden_map`` (like ``GRUCell.weight_hh``), Cho et al. (2014):

        r = sigmoid(W_ir x + W_hr h),  z = sigmoid(W_iz x + W_hz h)
        n = tanh(W_in x + r * (W_hn h)),  h' = (1 - z) * n + z * h     (biases included)

    Args:
        input_size: features of x.
        hidden_size: features of h.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        _check_positive(input_size=input_size, hidden_size=hidden_size)
        self.hidden_size = hidden_size
        self.input_map = nn.Linear(input_size, 3 * hidden_size)
        self.hidden_map = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """``x (B, input_size)``, ``h (B, hidden_size) -> h' (B, hidden_size)``."""
        xr, xz, xn = self.input_map(x).chunk(3, dim=-1)
        hr, hz, hn = self.hidden_map(h).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class ODERNNFunc(nn.Module):
    """The time-rescaled ODE-RNN field on the state ``(h, dt)``: ``(dt * f(h), 0)``.

    ``f`` is an autonomous MLP ``hidden -> ode_hidden ... -> hidden`` of ``nn.Linear`` layers
    with tanh between them (Rubanova et al. 2019). The field ignores ``t``, so it accepts any
    time, including the ``(rows,)`` per-row times of batched grid evaluations.

    Args:
        hidden: features of h.
        ode_hidden: width of the MLP's hidden layers.
        n_layers: number of Linear layers (>= 1).

    Attributes:
        supports_batched_time: True (the field does not depend on t).
    """

    supports_batched_time = True

    def __init__(self, hidden: int, ode_hidden: int, n_layers: int = 2) -> None:
        super().__init__()
        _check_positive(hidden=hidden, ode_hidden=ode_hidden, n_layers=n_layers)
        widths = [hidden] + [ode_hidden] * (n_layers - 1) + [hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def field(self, h: Tensor) -> Tensor:
        """The unscaled field ``f(h)``: ``(rows, hidden) -> (rows, hidden)``."""
        for i, layer in enumerate(self.layers):
            h = layer(torch.tanh(h) if i > 0 else h)
        return h

    def forward(self, t: float | Tensor,
                state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(h (rows, hidden), dt (rows, 1)) -> (dt * f(h), zeros (rows, 1))``.

        The gap is data: the field does not differentiate through it (times take no
        gradient), so the adjoint of the ``dt`` component stays zero.
        """
        if not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError("ODERNNFunc integrates the pair (h (rows, hidden), dt (rows, 1)); "
                            f"got {type(state).__name__}")
        h, dt = state
        return dt.detach() * self.field(h), torch.zeros_like(dt)


class ODERNNClassifier(nn.Module):
    """ODE-RNN classifier: ODE between observations, GRU update at each, linear head.

    For each series, ``h = 0`` before its first observation; at every observed step k the
    state is evolved over the gap since the series' previous observation and then updated,
    ``h <- GRU(x_k, ODE(h, t_k - t_prev))``. At unobserved steps (``mask`` False: padding, or
    a missing step) neither the ODE nor the GRU changes h (the gap of such rows is 0 and
    ``h = where(mask, new, old)``), and their values and times are never read, so the final
    state is the state at each series' last observation, whatever the padding. Logits are
    ``head(h_final)``.

    The single ODE block is called once per step after the first that some series of the
    batch observes (at most T - 1 calls per forward); time-rescaled per-row gaps cost no
    separate solves (see the module docstring).

    Args:
        n_channels: channels C of the series.
        n_classes: number of classes (logits returned).
        hidden: size of the hidden state h.
        ode_hidden: width of the ODE field's hidden layers.
        solver: the ODE block's solver settings, in the rescaled time s where every gap spans
            [0, 1] (so a fixed ``step_size`` is a fraction of each gap, e.g.
            ``SolverSpec(method="rk4", options={"step_size": 0.5})``); the adjoint is what
            SNOpt's curvature observer needs. None: :attr:`default_solver`, which differs
            from ``SolverSpec()`` in two settings: ``first_step=1.0`` (try each whole gap in
            one step; error control shrinks it when needed), which halves the cost against
            the initial-step heuristic, and the seminorm in the adjoint solve (Kidger, Chen,
            Lyons 2021), the time-series setting of SNOpt (Liu, Chen, Theodorou 2021). A
            spec of your own is used as given: start from ``default_solver.replace(...)`` to
            keep these two.
        time_scale: gaps are divided by it (> 0); choose about the typical gap.
        n_layers: Linear layers of the ODE field.

    Attributes:
        default_solver: ``SolverSpec(options={"first_step": 1.0}, seminorm=True)``.
    """

    default_solver: ClassVar[SolverSpec] = SolverSpec(options={"first_step": 1.0},
                                                      seminorm=True)

    def __init__(self, n_channels: int, n_classes: int, hidden: int = 32, ode_hidden: int = 64,
                 solver: SolverSpec | None = None, time_scale: float = 1.0,
                 n_layers: int = 2) -> None:
        super().__init__()
        _check_positive(n_channels=n_channels, n_classes=n_classes, hidden=hidden)
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.n_channels, self.hidden, self.time_scale = n_channels, hidden, float(time_scale)
        self.gru = GRUUpdate(n_channels, hidden)
        self.ode = ODEBlock(ODERNNFunc(hidden, ode_hidden, n_layers), t0=0.0, t1=1.0,
                            solver=self.default_solver if solver is None else solver,
                            name="ode_rnn")
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, values: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        """Classify a batch of series.

        Args:
            values: ``(B, T, C)`` floating values (anything at unobserved steps).
            times: ``(B, T)`` observation times, non-decreasing over each series' observed
                steps (anything at unobserved steps).
            mask: ``(B, T)`` bool, True at observed steps.

        Returns:
            ``(B, n_classes)`` logits.
        """
        return self.head(self.encode(values, times, mask))

    def encode(self, values: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        """The hidden state at each series' last observation, ``(B, hidden)``.

        Arguments as :meth:`forward`. A series with no observation keeps ``h = 0``.
        """
        self._check_inputs(values, times, mask)
        x = values.masked_fill(~mask.unsqueeze(-1), 0.0)
        t = times.to(torch.float64).masked_fill(~mask, 0.0)
        batch = values.shape[0]
        h = values.new_zeros(batch, self.hidden)
        t_prev = t.new_zeros(batch)
        seen = torch.zeros(batch, dtype=torch.bool, device=mask.device)
        for k, any_observed in enumerate(mask.any(0).tolist()):
            if not any_observed:
                continue
            step = mask[:, k]
            h_ode = self.evolve(h, torch.where(step & seen, t[:, k] - t_prev, 0.0)) if k else h
            h = torch.where(step.unsqueeze(-1), self.gru(x[:, k], h_ode), h)
            t_prev = torch.where(step, t[:, k], t_prev)
            seen = seen | step
        return h

    def evolve(self, h: Tensor, gap: Tensor) -> Tensor:
        """Solve ``dh/dt = f(h)`` over each row's own gap, in one call of the ODE block.

        Args:
            h: ``(B, hidden)`` states.
            gap: ``(B,)`` gaps ``t_{k+1} - t_k`` (>= 0; 0 leaves the row unchanged), in the
                units of ``times``; divided by ``time_scale`` here.

        Returns:
            ``(B, hidden)``: the states after the gaps.
        """
        dt = (gap / self.time_scale).to(h.dtype).unsqueeze(-1)
        h_next, _ = self.ode((h, dt))
        return h_next

    def _check_inputs(self, values: Tensor, times: Tensor, mask: Tensor) -> None:
        for name, v in (("values", values), ("times", times), ("mask", mask)):
            if not isinstance(v, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if values.dim() != 3 or values.shape[-1] != self.n_channels:
            raise ValueError(f"values must be (B, T, C={self.n_channels}), got shape "
                             f"{tuple(values.shape)}")
        if times.shape != values.shape[:2] or mask.shape != values.shape[:2]:
            raise ValueError(f"times and mask must be (B, T) = {tuple(values.shape[:2])} like "
                             f"values, got {tuple(times.shape)} and {tuple(mask.shape)}")
        if not (values.is_floating_point() and times.is_floating_point()):
            raise TypeError(f"values and times must be floating, got {values.dtype} and "
                            f"{times.dtype}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool (True = observed), got {mask.dtype}; "
                            "pass mask.bool()")
        _check_times(times, mask)


def _check_times(times: Tensor, mask: Tensor) -> None:
    """Observed times must be finite and non-decreasing within each series."""
    observed = times.to(torch.float64).masked_fill(~mask, float("-inf"))
    if not bool(torch.isfinite(observed[mask]).all()):
        raise ValueError("times must be finite at observed steps (mask True)")
    before = torch.cat([torch.full_like(observed[:, :1], float("-inf")),
                        observed.cummax(dim=1).values[:, :-1]], dim=1)
    if bool((mask & (observed < before)).any()):
        raise ValueError("times must be non-decreasing over each series' observed steps; "
                         "sort every series by time")


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
