"""Continuous normalizing flows (FFJORD; Grathwohl et al. 2019, Chen et al. 2018).

A CNF moves data ``x`` along ``dz/dt = f(t, z)`` from ``t0`` to ``t1``; the log-density
changes by the instantaneous change of variables (Chen et al. 2018, Theorem 1)

    d log p(z(t)) / dt = -tr(df/dz),

so with the augmented state ``(z, delta)``, ``d delta/dt = -tr(df/dz)``, ``delta(t0) = 0``,

    log p(x) = log N(z(t1); 0, I) - delta(t1).

The trace is exact (one autograd pass per dimension, fine for small D) or Hutchinson's
estimate ``e^T (df/dz) e`` with one noise draw ``e`` held fixed for the whole solve
(Hutchinson 1989; FFJORD uses it for high dimensions).

The learnable maps are :class:`ocnode.nn.layers.ConcatSquashLinear` layers (real ``nn.Linear``
submodules), so SNOpt collects their Kronecker factors along the adjoint's backward solve.
Its curvature observer re-evaluates the vector field on detached clones holding the first
``stats_batch`` rows of the batch, possibly many grid times stacked along the rows with a
per-row time vector; the Hutchinson noise, a per-row context, follows those layouts (see
:meth:`CNFFunc.noise_for`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import solvers
from ocnode.nn.fields import MLPODEFunc
from ocnode.nn.layers import ConcatSquashLinear
from ocnode.nn.ode import ODEBlock
from solvers import SolverSpec

TRACES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
SMOOTH_ACTIVATIONS = ("tanh", "softplus")  # the trace differentiates the field once more


class CNFDrift(MLPODEFunc):
    """The velocity ``f(t, z)``: an :class:`~ocnode.nn.MLPODEFunc` of ConcatSquashLinear
    layers ``dim -> hidden ... -> dim`` (FFJORD's layer).

    Args:
        dim: data dimension D.
        hidden: width of the hidden layers.
        n_layers: number of ConcatSquashLinear layers (>= 1; 1 is a time-gated linear map).
        activation: ``"tanh"`` or ``"softplus"`` (smooth, as the trace's derivatives need).
    """

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 3,
                 activation: str = "tanh") -> None:
        _check_positive_int(dim=dim, hidden=hidden, n_layers=n_layers)
        if activation not in SMOOTH_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{list(SMOOTH_ACTIVATIONS)}")
        super().__init__(dim, hidden, n_layers, activation, layer=ConcatSquashLinear)


class CNFFunc(nn.Module):
    """The augmented vector field ``(z, delta) -> (f(t, z), -tr(df/dz))``.

    Called as ``func(t, (z, delta))`` with ``z`` of shape ``(B, D)`` and ``delta`` of shape
    ``(B, 1)``; returns the same structure. ``z`` may be a detached tensor (the solver's
    forward, the curvature observer): the trace is formed with autograd on a leaf that
    requires grad, and its graph is kept (``create_graph``) only when grad is enabled by
    the caller, so adjoint backward solves and double backward (Newton-CG) see the trace's
    dependence on ``z`` and the parameters; under ``torch.no_grad()`` both outputs are
    detached.

    Args:
        net: the velocity ``f(t, z)``.
        trace: ``"exact"`` (D autograd passes) or ``"hutchinson"`` (one pass).
        noise: Hutchinson noise, ``"rademacher"`` (+-1) or ``"gaussian"``.

    Attributes:
        supports_batched_time: ``t`` may be a ``(B,)`` per-row time vector.
        noise_vectors: the current Hutchinson draw ``(B, D)`` (None before the first).
    """

    supports_batched_time = True

    def __init__(self, net: nn.Module, trace: str = "exact", noise: str = "rademacher") -> None:
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.net, self.trace, self.noise = net, trace, noise
        self.noise_vectors: Tensor | None = None

    def reset_noise(self, z: Tensor) -> Tensor:
        """Draw a fresh Hutchinson noise shaped like ``z`` ``(B, D)`` and keep it."""
        if self.noise == "gaussian":
            e = torch.randn_like(z)
        else:
            e = torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1
        self.noise_vectors = e.detach()
        return self.noise_vectors

    def noise_for(self, z: Tensor, t: float | Tensor) -> Tensor:
        """The noise rows for a call with state ``z`` ``(R, D)``, from the draw ``(B, D)``.

        Row layouts (those of the curvature observer): ``R == B`` uses the draw;
        a per-row ``t`` made of ``U`` equal-time blocks of ``g`` rows (g < R) gives each
        block the rows ``0..g-1``; otherwise the draw is tiled cyclically, which covers
        ``R < B`` (the first rows) and ``R = k*B`` (k stacked copies).
        """
        e = self.noise_vectors
        if e is None or e.shape[1:] != z.shape[1:] or e.dtype != z.dtype:
            e = self.reset_noise(z)
        rows = z.shape[0]
        if rows == e.shape[0]:
            return e
        group = _time_group(t, rows)
        if group is not None:
            return _tile(e, group).repeat(rows // group, 1)
        return _tile(e, rows)

    def forward(self, t: float | Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(t, (z (B, D), delta (B, 1))) -> (f (B, D), -tr(df/dz) (B, 1))``."""
        if not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError("CNFFunc expects the tuple state (z, delta_logp); got "
                            f"{type(state).__name__}")
        z = state[0]
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            f = self.net(t, z)
            if self.trace == "exact":
                div = exact_trace(f, z, create_graph=keep_graph)
            else:
                div = hutchinson_trace(f, z, self.noise_for(z, t), create_graph=keep_graph)
        if not keep_graph:
            f, div = f.detach(), div.detach()
        return f, -div.unsqueeze(1)


def exact_trace(f: Tensor, z: Tensor, create_graph: bool = False) -> Tensor:
    """Per-row trace of ``df/dz`` by D autograd passes.

    Args:
        f: ``(B, D)``, computed from ``z`` row by row (row i depends on ``z[i]`` only).
        z: ``(B, D)``, requires grad.
        create_graph: keep the graph of the result (for differentiating through it).

    Returns:
        ``(B,)``: ``sum_i d f[:, i] / d z[:, i]``.
    """
    div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for i in range(f.shape[1]):
        (g,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph,
                                   retain_graph=True)
        div = div + g[:, i]
    return div


def hutchinson_trace(f: Tensor, z: Tensor, e: Tensor, create_graph: bool = False) -> Tensor:
    """Hutchinson's estimate ``e^T (df/dz) e`` per row (Hutchinson 1989), one autograd pass.

    Args:
        f: ``(B, D)``, computed from ``z`` row by row.
        z: ``(B, D)``, requires grad.
        e: ``(B, D)`` noise with ``E[e e^T] = I``.
        create_graph: keep the graph of the result.

    Returns:
        ``(B,)``: an unbiased estimate of ``tr(df/dz)`` for each row.
    """
    (e_jac,) = torch.autograd.grad(f, z, e, create_graph=create_graph, retain_graph=True)
    return (e_jac * e).sum(1)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per row: ``(B, D) -> (B,)``, in nats."""
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))


class CNF(nn.Module):
    """A continuous normalizing flow ``x = z(t0) -> z(t1)`` with a standard normal base.

    Args:
        dim: data dimension D.
        hidden: width of the velocity's hidden layers.
        n_layers: ConcatSquashLinear layers in the velocity (>= 1).
        trace: ``"exact"`` or ``"hutchinson"`` (one noise draw per solve).
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``.
        t1: integration end time (> 0; t0 = 0).
        solver: solver settings of the ODE block; its ``adjoint`` chooses gradients by the
            adjoint solve (O(1) memory; SNOpt collects curvature there) or by
            backpropagation through the solver (K-FAC and Newton-CG baselines). None:
            ``SolverSpec()`` (dopri5, rtol = atol = 1e-3, adjoint). For reported
            log-likelihoods, evaluate with a tighter spec, e.g. ``model.block.solver =
            model.block.solver.replace(rtol=1e-5, atol=1e-5)`` (FFJORD's tolerances,
            Grathwohl et al. 2019).
        activation: ``"tanh"`` or ``"softplus"``.

    Attributes:
        block: the :class:`ODEBlock` of the augmented state ``(z, delta_logp)``.
    """

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 3, trace: str = "exact",
                 noise: str = "rademacher", t1: float = 1.0, solver: SolverSpec | None = None,
                 activation: str = "tanh") -> None:
        super().__init__()
        _check_positive_int(dim=dim)
        if not t1 > 0:
            raise ValueError(f"t1 must be > 0 (the flow runs from t0 = 0), got {t1}")
        self.dim = dim
        func = CNFFunc(CNFDrift(dim, hidden, n_layers, activation), trace, noise)
        self.block = ODEBlock(func, t0=0.0, t1=t1, solver=solver, name="cnf")

    @property
    def func(self) -> CNFFunc:
        """The augmented vector field."""
        return self.block.func  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_prob`: ``(B, D) -> (B,)``."""
        return self.log_prob(x)

    def flow(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Integrate data to the base: ``x (B, D) -> (z(t1) (B, D), delta(t1) (B,))``.

        ``delta(t1) = -int tr(df/dz) dt``; a Hutchinson noise is drawn for this solve.
        """
        self._check_data(x)
        if self.func.trace == "hutchinson":
            self.func.reset_noise(x)
        z, delta = self.block((x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)))
        return z, delta[:, 0]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats: ``log N(z(t1); 0, I) - delta(t1)``; ``(B, D) -> (B,)``."""
        z, delta = self.flow(x)
        return standard_normal_logprob(z) - delta

    def nll(self, x: Tensor) -> Tensor:
        """Mean negative log-likelihood (nats) of ``x`` ``(B, D)``: a scalar."""
        return -self.log_prob(x).mean()

    def inverse(self, z: Tensor) -> Tensor:
        """Integrate base points back to data space: ``z(t1) (B, D) -> x (B, D)`` (no trace).

        Uses the block's solver settings, differentiated by backpropagation.
        """
        self._check_data(z)
        times = torch.stack([self.block.t1_tensor, self.block.t0_tensor])
        out = solvers.solve(self.func.net, z, times, self.block.solver.replace(adjoint=False))
        assert isinstance(out, Tensor)  # a tensor state gives a tensor trajectory
        return out[-1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``(n, D)``: base samples integrated from t1 back to t0."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be a positive int, got {n!r}")
        ref = self.block.t1_tensor
        param = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=param.dtype,
                        device=ref.device)
        return self.inverse(z)

    def _check_data(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a tensor of shape (B, {self.dim}), got "
                            f"{type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch of shape (B, {self.dim}), got "
                             f"{tuple(x.shape)}")
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model {dtype}: convert with "
                            f"x.to({dtype}) (or the model with .to(x.dtype))")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, trace={self.func.trace!r}, noise={self.func.noise!r}"


def _time_group(t: float | Tensor, rows: int) -> int | None:
    """Rows per time of a per-row ``t`` made of equal-time blocks (the observer's layout).

    Returns None unless ``t`` holds ``rows`` times forming ``rows // g`` blocks of ``g < rows``
    equal values.
    """
    if not isinstance(t, Tensor) or t.numel() != rows or rows < 2:
        return None
    flat = t.reshape(-1)
    changes = torch.nonzero(flat != flat[0])
    if changes.numel() == 0:
        return None
    group = int(changes[0, 0])
    if rows % group:
        return None
    blocks = flat.reshape(rows // group, group)
    return group if bool((blocks == blocks[:, :1]).all()) else None


def _tile(e: Tensor, rows: int) -> Tensor:
    """The first ``rows`` rows of ``e`` repeated cyclically: ``(B, D) -> (rows, D)``."""
    return e.repeat(-(-rows // e.shape[0]), 1)[:rows]


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
