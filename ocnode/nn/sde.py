"""A Neural SDE fitted to irregularly observed trajectories by a Gaussian likelihood.

:class:`NeuralSDE` is the stochastic counterpart of :class:`ocnode.nn.trajectory.TrajectoryODE`:
the observed state follows the Ito SDE

    dX = f(X) dt + diag(g(X)) dW,    X(t0) = x0,

with an autonomous MLP drift ``f`` and a positive diagonal diffusion ``g`` (Tzen & Raginsky
2019, "Neural Stochastic Differential Equations: Deep Latent Gaussian Models in the Diffusion
Limit"; Liu, Si, Cao, Kumar, Hsieh 2019, "Neural SDE: Stabilizing Neural ODE Networks with
Stochastic Noise"). Paths are sampled with :func:`solvers.sdeint`, or with
:func:`solvers.sdeint_adjoint`, whose gradients come from the stochastic adjoint in O(1)
memory (Li, Wong, Chen, Duvenaud 2020, "Scalable Gradients for Stochastic Differential
Equations"). Observations are the path plus Gaussian noise of a learnable std ``sigma`` (one
per coordinate).

Like the ODE version, one solve serves a batch of series observed at different times: the
path is sampled on :func:`union_grid` of the batch and each series' own times are picked back
out with :func:`gather_series`.

Randomness: the only random draw is the Brownian motion, a ``torchsde.BrownianInterval``
whose entropy is one integer drawn from torch's global generator, or from the ``generator``
passed in. Re-seeding torch (or restoring ``torch.get_rng_state()``) therefore reproduces the
paths bit for bit, and evaluation with its own ``generator`` leaves the training stream alone.

Typical use::

    model = NeuralSDE(dim=2)
    values, times, mask = batch                           # (B, L, D), (B, L), (B, L)
    loss = model.loss(values, times, mask)                # NLL, nats per coordinate
    mse = sde_mse(model, values, times, test_mask, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torchsde
from torch import Tensor, nn

import solvers
from ocnode.nn.fields import ACTIVATIONS
from ocnode.nn.trajectory import TrajectoryField, gather_series, masked_mse, union_grid

__all__ = ["ITO_METHODS", "DiagonalDiffusion", "NeuralSDE", "sde_mse", "sde_nll"]

#: torchsde's methods for Ito SDEs with diagonal noise (strong orders 0.5, 1.0, 1.5).
ITO_METHODS = ("euler", "milstein", "srk")
# Methods that need more of the Brownian path than its increments.
_LEVY_AREA = {"srk": "space-time"}
# Default step: this fraction of the solve's time span.
_DT_FRACTION = 0.01


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")


def _inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (y > 0)."""
    return y + math.log(-math.expm1(-y))


class DiagonalDiffusion(nn.Module):
    """A positive diagonal diffusion ``g_i(x) = min_diffusion + softplus(h_i(x_i))``.

    Each coordinate has its own small MLP ``h_i: R -> R`` of ``nn.Linear`` layers, so
    ``g_i`` depends on ``x_i`` alone: torchsde's "diagonal" noise assumes it (the Milstein
    and SRK schemes and the Ito adjoint's correction terms use ``g_i dg_i/dx_i`` only; Li et
    al. 2020 make the same choice).

    Args:
        dim: state features ``D``.
        hidden: width of each coordinate's hidden layers.
        n_layers: linear layers per coordinate (>= 1).
        activation: a key of :data:`ocnode.nn.fields.ACTIVATIONS`.
        min_diffusion: floor added to the softplus (> 0).
        init_diffusion: initial value of ``g`` (> ``min_diffusion``): the last layer's bias
            starts at the matching softplus preimage and its weight is scaled by 0.1.
    """

    def __init__(self, dim: int, hidden: int, n_layers: int = 2, activation: str = "tanh",
                 min_diffusion: float = 1e-3, init_diffusion: float = 0.1) -> None:
        super().__init__()
        _check_positive("min_diffusion", min_diffusion)
        _check_positive("init_diffusion", init_diffusion)
        if init_diffusion <= min_diffusion:
            raise ValueError(f"init_diffusion ({init_diffusion}) must exceed min_diffusion "
                             f"({min_diffusion})")
        nets = [TrajectoryField(1, hidden, n_layers, activation) for _ in range(dim)]
        bias = _inverse_softplus(init_diffusion - min_diffusion)
        with torch.no_grad():
            for net in nets:
                last = cast(nn.Linear, net.layers[-1])
                last.weight.mul_(0.1)
                last.bias.fill_(bias)
        self.nets = nn.ModuleList(nets)
        self.min_diffusion = float(min_diffusion)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D) -> (B, D)``, every entry >= ``min_diffusion``."""
        pre = torch.cat([net(0.0, x[:, i:i + 1]) for i, net in enumerate(self.nets)], dim=1)
        return nn.functional.softplus(pre) + self.min_diffusion


class NeuralSDE(nn.Module):
    """An Ito SDE ``dX = f(X) dt + diag(g(X)) dW`` on the observed state, with Gaussian noise.

    The drift ``f`` is a :class:`TrajectoryField` (autonomous, ``nn.Linear`` layers, so it
    extrapolates beyond the training window, and SNOpt's K-FAC hooks see it); the diffusion
    is a :class:`DiagonalDiffusion`; ``log_obs_std`` ``(D,)`` is the learnable log std of the
    observation noise. The model is itself the torchsde SDE (``noise_type="diagonal"``,
    ``sde_type="ito"``, methods ``f`` and ``g``).

    Args:
        dim: observed features ``D``.
        hidden: width of the drift's hidden layers.
        n_layers: linear layers of the drift and of each diffusion MLP.
        activation: a key of :data:`ocnode.nn.fields.ACTIVATIONS`.
        diffusion_hidden: width of the diffusion's hidden layers (``None``: ``hidden``).
        method: ``"euler"``, ``"milstein"`` or ``"srk"`` (:data:`ITO_METHODS`).
        dt: fixed step size (> 0); ``None``: 0.01 of each solve's time span.
        adjoint: gradients from the stochastic adjoint (:func:`solvers.sdeint_adjoint`)
            instead of backpropagation through the solver.
        obs_std: initial observation noise std (> 0).
        min_diffusion: floor of the diffusion (> 0).
        init_diffusion: initial diffusion (> ``min_diffusion``).
        adjoint_method: method of the adjoint's backward solve (``None``: torchsde's default,
            Milstein).

    Attributes:
        drift: the drift network ``f``.
        diffusion: the diffusion network ``g``.
        log_obs_std: ``(D,)`` parameter, log std of the observation noise.
        stats: :class:`solvers.SolverStats` of the last forward solve.
        adjoint_stats: stats of the last adjoint solve (filled by backward).

    Raises:
        ValueError: bad sizes, an unknown activation or method, or a non-positive dt, std or
            diffusion.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 2, activation: str = "tanh",
                 diffusion_hidden: int | None = None, method: str = "euler",
                 dt: float | None = None, adjoint: bool = False, obs_std: float = 0.1,
                 min_diffusion: float = 1e-3, init_diffusion: float = 0.1,
                 adjoint_method: str | None = None) -> None:
        super().__init__()
        _check_settings(activation, method, dt, obs_std, adjoint_method)
        self.dim, self.method, self.adjoint = dim, method, adjoint
        self.dt = None if dt is None else float(dt)
        self.adjoint_method = adjoint_method
        self.drift = TrajectoryField(dim, hidden, n_layers, activation)
        self.diffusion = DiagonalDiffusion(
            dim, hidden if diffusion_hidden is None else diffusion_hidden, n_layers, activation,
            min_diffusion, init_diffusion)
        self.log_obs_std = nn.Parameter(torch.full((dim,), math.log(obs_std)))
        self.stats, self.adjoint_stats = solvers.SolverStats(), solvers.SolverStats()

    # ---- the SDE, as torchsde calls it -----------------------------------------------------

    def f(self, t: Tensor, x: Tensor) -> Tensor:
        """Drift, ``(B, D) -> (B, D)``; ``t`` is ignored (autonomous)."""
        return self.drift(t, x)

    def g(self, t: Tensor, x: Tensor) -> Tensor:
        """Diagonal diffusion, ``(B, D) -> (B, D)``, positive; ``t`` is ignored."""
        return self.diffusion(x)

    @property
    def obs_std(self) -> Tensor:
        """``(D,)`` observation noise std."""
        return self.log_obs_std.exp()

    @property
    def nfe_forward(self) -> int:
        """Drift and diffusion evaluations of the last forward solve."""
        return self.stats.nfe

    @property
    def nfe_backward(self) -> int:
        """Evaluations of the last adjoint solve (0 before backward, or without adjoint)."""
        return self.adjoint_stats.nfe

    def sde_parameters(self) -> list[Tensor]:
        """The parameters of the drift and the diffusion (what the solver differentiates)."""
        return [*self.drift.parameters(), *self.diffusion.parameters()]

    # ---- sampling ----------------------------------------------------------------------------

    def forward(self, x0: Tensor, t: Tensor, n_samples: int = 1,
                generator: torch.Generator | None = None) -> Tensor:
        """Sample ``n_samples`` paths per initial state at the times ``t``.

        Args:
            x0: ``(B, D)`` initial states at ``t[0]``.
            t: ``(N,)`` strictly increasing times, e.g. the grid of :func:`union_grid`.
            n_samples: paths per initial state ``S``.
            generator: source of the Brownian motion's entropy (``None``: torch's global
                generator).

        Returns:
            ``(N, S * B, D)``, sample-major: row ``s * B + b`` is path ``s`` of series ``b``
            (``out.view(N, S, B, D)`` separates them). ``out[0]`` repeats ``x0``. Between
            solver steps torchsde interpolates linearly to an output time.

        Raises:
            ValueError: bad shapes or ``n_samples``.
        """
        self._check_inputs(x0, t)
        _check_int("n_samples", n_samples)
        x0 = x0.repeat(n_samples, 1)
        t = t.detach().to(x0)
        if t.numel() == 1:
            return x0.unsqueeze(0)
        dt = self.dt if self.dt is not None else _DT_FRACTION * float(t[-1] - t[0])
        bm = _brownian(x0, t, dt, self.method, generator)
        self.stats, self.adjoint_stats = solvers.SolverStats(), solvers.SolverStats()
        if not self.adjoint:
            return solvers.sdeint(self, x0, t, method=self.method, dt=dt, bm=bm,
                                  stats=self.stats)
        return solvers.sdeint_adjoint(
            self, x0, t, method=self.method, adjoint_method=self.adjoint_method, dt=dt, bm=bm,
            adjoint_params=tuple(self.sde_parameters()), stats=self.stats,
            adjoint_stats=self.adjoint_stats)

    def _check_inputs(self, x0: Tensor, t: Tensor) -> None:
        if not isinstance(x0, Tensor) or x0.dim() != 2 or x0.shape[1] != self.dim:
            raise ValueError(f"x0 must be a (B, {self.dim}) tensor, got "
                             f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0)}")
        if not x0.is_floating_point():
            raise ValueError(f"x0 must be floating point, got {x0.dtype}")
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() < 1:
            raise ValueError("t must be a non-empty 1-D tensor of times, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t)}")

    def sample_series(self, values: Tensor, times: Tensor, mask: Tensor, n_samples: int = 1,
                      generator: torch.Generator | None = None) -> Tensor:
        """Paths started from ``values[:, 0]``, at each series' own times.

        Args:
            values: ``(B, L, D)``; ``values[:, 0]`` are the initial states at ``times[:, 0]``.
            times: ``(B, L)`` times; mask: ``(B, L)`` bool, the times to sample at.
            n_samples: paths per series ``S``.
            generator: as in :meth:`forward`.

        Returns:
            ``(S, B, L, D)``; entries outside ``mask`` hold the initial state.
        """
        grid, index = union_grid(times, mask)
        _check_values(values, times, self.dim)
        paths = self(values[:, 0], grid, n_samples, generator)
        b = values.shape[0]
        return torch.stack([gather_series(paths[:, s * b:(s + 1) * b], index)
                            for s in range(n_samples)])

    def predict_mean(self, values: Tensor, times: Tensor, mask: Tensor, n_samples: int = 16,
                     generator: torch.Generator | None = None) -> Tensor:
        """Monte-Carlo mean of ``n_samples`` paths at each series' masked times, ``(B, L, D)``.

        Args and entries outside ``mask``: as in :meth:`sample_series`.
        """
        return self.sample_series(values, times, mask, n_samples, generator).mean(0)

    # ---- likelihood --------------------------------------------------------------------------

    def log_likelihood(self, pred: Tensor, values: Tensor) -> Tensor:
        """Gaussian log-density of each observed coordinate given the path, ``(..., D)``.

        ``log N(values; pred, obs_std^2)`` elementwise; ``pred`` and ``values`` broadcast.
        """
        z = (values - pred) / self.obs_std
        return -0.5 * z.square() - self.log_obs_std - 0.5 * math.log(2 * math.pi)

    def loss(self, values: Tensor, times: Tensor, mask: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """Mean Gaussian negative log-likelihood of the masked observations, one path per series.

        The path is sampled on the union grid of the batch (as :func:`trajectory_mse` does
        for the ODE) from ``values[:, 0]``; the loss is a one-sample Monte-Carlo estimate of
        the expected NLL ``E_path[-log p(y | path)]``, an upper bound of the marginal NLL.
        Step 0 is scored when ``mask[:, 0]`` is set (its residual is 0 on every path).

        Args:
            values: ``(B, L, D)`` observed values.
            times: ``(B, L)`` times, ``times[:, 0]`` common to the batch.
            mask: ``(B, L)`` bool, the observations to score.
            generator: as in :meth:`forward`.

        Returns:
            A scalar, nats per observed coordinate:
            ``-sum_{b,l masked, d} log N(y_bld; x_bld, sigma_d^2) / (D * number masked)``.

        Raises:
            ValueError: bad shapes or an empty mask.
        """
        pred = self.sample_series(values, times, mask, 1, generator)[0]
        log_p = self.log_likelihood(pred, values)
        return -_masked_mean(log_p, mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, method={self.method!r}, dt={self.dt}, adjoint={self.adjoint}"


def _check_settings(activation: str, method: str, dt: float | None, obs_std: float,
                    adjoint_method: str | None) -> None:
    """Raise ValueError on an unknown activation/method or a non-positive dt or std."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if method not in ITO_METHODS:
        raise ValueError(f"unknown method {method!r} for an Ito SDE with diagonal noise; choose "
                         f"one of {list(ITO_METHODS)}")
    if adjoint_method is not None and adjoint_method not in ITO_METHODS:
        raise ValueError(f"unknown adjoint_method {adjoint_method!r}; choose one of "
                         f"{list(ITO_METHODS)} or None")
    if dt is not None:
        _check_positive("dt", dt)
    _check_positive("obs_std", obs_std)


def _check_values(values: Tensor, times: Tensor, dim: int) -> None:
    if not isinstance(values, Tensor) or values.dim() != 3 or values.shape[:2] != times.shape \
            or values.shape[2] != dim:
        raise ValueError(f"values must be (B, L, {dim}) matching times {tuple(times.shape)}, "
                         f"got {tuple(values.shape) if isinstance(values, Tensor) else values}")


def _masked_mean(per_coordinate: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``(B, L, D)`` entries over the masked ``(B, L)`` rows and the D coordinates."""
    count = int(mask.sum())
    if count == 0:
        raise ValueError("mask selects no observation to score")
    # where, not a product: NaN or inf at masked-out entries stays out of the value and grad
    kept = torch.where(mask.unsqueeze(-1), per_coordinate, 0.0)
    return kept.sum() / (count * per_coordinate.shape[-1])


def _brownian(x0: Tensor, t: Tensor, dt: float, method: str,
              generator: torch.Generator | None) -> torchsde.BrownianInterval:
    """A Brownian motion on ``[t[0], t[-1]]`` of size ``x0.shape``, seeded from ``generator``.

    Its one random draw is the entropy, an integer from ``generator`` (``None``: torch's
    global generator); the path is a deterministic function of it.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    entropy = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=device))
    return torchsde.BrownianInterval(
        t0=t[0], t1=t[-1], size=tuple(x0.shape), dtype=x0.dtype, device=x0.device,
        entropy=entropy, dt=dt, levy_area_approximation=_LEVY_AREA.get(method, "none"))


@torch.no_grad()
def sde_mse(model: NeuralSDE, values: Tensor, times: Tensor, mask: Tensor, n_samples: int = 16,
            generator: torch.Generator | None = None) -> Tensor:
    """MSE of the Monte-Carlo mean path at the masked observations (no gradient).

    The held-out metric of the interpolation/extrapolation tests: ``n_samples`` paths per
    series from ``values[:, 0]``, averaged on the union grid, scored by :func:`masked_mse`.

    Args:
        model: the :class:`NeuralSDE`.
        values: ``(B, L, D)``; times: ``(B, L)``; mask: ``(B, L)`` bool, the points to score.
        n_samples: paths per series.
        generator: source of the Brownian motions (pass one so that evaluation does not
            consume the training stream of torch's global generator).

    Returns:
        A scalar: ``sum_{b,l masked, d} (mean_s x_sbld - y_bld)^2 / (D * number masked)``.
    """
    grid, _ = union_grid(times, mask)
    _check_values(values, times, model.dim)
    paths = model(values[:, 0], grid, n_samples, generator)
    mean = paths.view(grid.numel(), n_samples, *values.shape[::2]).mean(1)
    return masked_mse(mean, values, times, mask)


@torch.no_grad()
def sde_nll(model: NeuralSDE, values: Tensor, times: Tensor, mask: Tensor, n_samples: int = 16,
            generator: torch.Generator | None = None) -> Tensor:
    """Monte-Carlo predictive NLL of each masked observation, nats per coordinate (no gradient).

    Each observed point ``y_bl`` (all D coordinates together) is scored by the mixture of
    its ``S`` sampled paths, ``p(y_bl) ~= (1/S) sum_s N(y_bl; x_sbl, diag(sigma^2))``: the
    marginal predictive density at that time (not the joint over a series' times). The
    estimate of ``-log p`` is biased upward by Jensen's inequality, less so as ``S`` grows.

    Args:
        model, values, times, mask, n_samples, generator: as in :func:`sde_mse`.

    Returns:
        A scalar: ``-sum_{b,l masked} log p(y_bl) / (D * number masked)``.
    """
    samples = model.sample_series(values, times, mask, n_samples, generator)  # (S, B, L, D)
    log_p = model.log_likelihood(samples, values).sum(-1)  # (S, B, L)
    mixture = torch.logsumexp(log_p, dim=0) - math.log(n_samples)  # (B, L)
    return -_masked_mean(mixture.unsqueeze(-1), mask) / values.shape[-1]
