"""Tests of solvers.sde, the front over torchsde: moments, adjoint gradients, stats, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchsde
from torch import nn

from solvers.errors import NonFiniteStateError, SolverInputError
from solvers.sde import sdeint, sdeint_adjoint
from solvers.stats import SolverStats

# Moment tests: n paths give a standard error (SE) of sd / sqrt(n) for a sample mean and of
# var * sqrt(2 / (n - 1)) for a sample variance of normal data. With n = 20000 a 5-SE band
# fails by chance with probability ~6e-7, and the seeds are fixed anyway; the methods' weak
# discretisation bias at dt = 0.01 is far below one SE (checked with 400000 paths: every
# deviation < 0.3 SE of the 20000-path estimate, i.e. within that run's own sampling noise).
N_PATHS = 20_000
N_SE = 5.0


def brownian(
    batch: int, size: int, entropy: int, levy: str = "space-time"
) -> torchsde.BrownianInterval:
    """A reproducible float64 Brownian motion on [0, 1]."""
    return torchsde.BrownianInterval(
        t0=0.0, t1=1.0, size=(batch, size), dtype=torch.float64, entropy=entropy,
        levy_area_approximation=levy,
    )


class OrnsteinUhlenbeck(nn.Module):
    """dX = theta (mu - X) dt + sigma dW (additive noise, Ito)."""

    noise_type = "additive"
    sde_type = "ito"

    def __init__(self, theta: float, mu: float, sigma: float) -> None:
        super().__init__()
        self.theta, self.mu, self.sigma = theta, mu, sigma

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.theta * (self.mu - y)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.sigma).unsqueeze(-1)  # (batch, state, noise=1)


class GeometricBrownianMotion(nn.Module):
    """The Ito GBM dX = mu X dt + sigma X dW, written in either calculus (diagonal noise)."""

    noise_type = "diagonal"

    def __init__(self, mu: float, sigma: float, sde_type: str) -> None:
        super().__init__()
        self.sde_type = sde_type
        # The Stratonovich form of the same process drops the Ito correction sigma^2 / 2.
        self.drift = mu if sde_type == "ito" else mu - sigma**2 / 2
        self.sigma = sigma

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift * y

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.sigma * y


class NeuralSDE(nn.Module):
    """A small Stratonovich diagonal-noise SDE with trainable drift and diffusion."""

    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.drift_net = nn.Linear(dim, dim).double()
        self.diffusion_net = nn.Linear(dim, dim).double()

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.drift_net(y))

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sigmoid(self.diffusion_net(y))


def assert_within_se(samples: torch.Tensor, mean: float, var: float) -> None:
    """Sample mean and variance of ``samples`` (shape (n,)) lie within N_SE standard errors."""
    n = samples.numel()
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2.0 / (n - 1))
    assert abs(samples.mean().item() - mean) < N_SE * se_mean
    assert abs(samples.var().item() - var) < N_SE * se_var


def test_ornstein_uhlenbeck_matches_its_known_mean_and_variance() -> None:
    theta, mu, sigma, x0, t1 = 1.5, 0.5, 0.8, 2.0, 1.0
    y0 = torch.full((N_PATHS, 1), x0, dtype=torch.float64)
    ts = torch.tensor([0.0, t1], dtype=torch.float64)
    ys = sdeint(OrnsteinUhlenbeck(theta, mu, sigma), y0, ts, dt=0.01, bm=brownian(N_PATHS, 1, 11))
    mean = mu + (x0 - mu) * math.exp(-theta * t1)
    var = sigma**2 / (2 * theta) * (1 - math.exp(-2 * theta * t1))
    assert_within_se(ys[-1, :, 0], mean, var)


@pytest.mark.parametrize(("sde_type", "method"), [("ito", "srk"), ("stratonovich", "midpoint")])
def test_geometric_brownian_motion_log_is_normal_with_known_moments(
    sde_type: str, method: str
) -> None:
    mu, sigma, t1 = 0.3, 0.4, 1.0
    y0 = torch.ones(N_PATHS, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, t1], dtype=torch.float64)
    levy = "space-time" if method == "srk" else "none"
    ys = sdeint(
        GeometricBrownianMotion(mu, sigma, sde_type), y0, ts, method=method, dt=0.01,
        bm=brownian(N_PATHS, 1, 12, levy),
    )
    # log X(t) ~ Normal((mu - sigma^2 / 2) t, sigma^2 t) for the Ito GBM.
    assert_within_se(torch.log(ys[-1, :, 0]), (mu - sigma**2 / 2) * t1, sigma**2 * t1)


def gradients(adjoint: bool, method: str, dt: float) -> list[torch.Tensor]:
    """d loss / d (y0, parameters) of a fixed NeuralSDE on a fixed Brownian motion."""
    torch.manual_seed(0)
    sde = NeuralSDE(3)
    y0 = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    bm = brownian(16, 3, 7, levy="none")
    solve = sdeint_adjoint if adjoint else sdeint
    reversible = adjoint and method == "reversible_heun"
    extra = {"adjoint_method": "adjoint_reversible_heun"} if reversible else {}
    ys = solve(sde, y0, ts, method=method, dt=dt, bm=bm, **extra)
    loss = (ys[1:] ** 2).sum()
    return list(torch.autograd.grad(loss, [y0, *sde.parameters()]))


@pytest.mark.parametrize(
    ("method", "dt", "rtol"),
    [
        # Reversible Heun's adjoint retraces the forward steps exactly: round-off only.
        ("reversible_heun", 0.05, 1e-6),
        # Midpoint's adjoint is a different discretisation of the same backward SDE: O(dt).
        ("midpoint", 0.005, 1e-3),
    ],
)
def test_adjoint_gradients_agree_with_backprop_on_the_same_brownian_motion(
    method: str, dt: float, rtol: float
) -> None:
    by_adjoint = gradients(True, method, dt)
    by_backprop = gradients(False, method, dt)
    for a, b in zip(by_adjoint, by_backprop, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def small_problem() -> tuple[OrnsteinUhlenbeck, torch.Tensor, torch.Tensor]:
    """A cheap OU problem (batch 4, state 2) for tests of bookkeeping and errors."""
    return OrnsteinUhlenbeck(1.0, 0.0, 0.5), torch.zeros(4, 2), torch.linspace(0.0, 1.0, 5)


def test_sdeint_counts_drift_and_diffusion_evaluations() -> None:
    sde, y0, ts = small_problem()
    stats = SolverStats()
    sdeint(sde, y0, ts, method="euler", dt=0.1, stats=stats)
    # Euler takes 10 steps of one f and one g each, plus torchsde's shape checks.
    assert stats.nfe >= 20


def test_sdeint_adjoint_counts_forward_and_backward_separately() -> None:
    sde = NeuralSDE(2)
    y0 = torch.zeros(4, 2, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    stats, adjoint_stats = SolverStats(), SolverStats()
    ys = sdeint_adjoint(sde, y0, ts, dt=0.1, stats=stats, adjoint_stats=adjoint_stats)
    forward_nfe = stats.nfe
    assert forward_nfe > 0 and adjoint_stats.nfe == 0
    ys.sum().backward()
    assert adjoint_stats.nfe > 0 and stats.nfe == forward_nfe


def test_sdeint_adjoint_without_adjoint_stats_adds_backward_calls_to_stats() -> None:
    sde = NeuralSDE(2)
    y0 = torch.zeros(4, 2, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    stats = SolverStats()
    ys = sdeint_adjoint(sde, y0, ts, dt=0.1, stats=stats)
    forward_nfe = stats.nfe
    ys.sum().backward()
    assert stats.nfe > forward_nfe
    assert all(p.grad is not None for p in sde.parameters())


def test_renamed_methods_are_used_and_counted() -> None:
    class Renamed:
        noise_type, sde_type = "diagonal", "ito"

        def drift(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -y

        def noise(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(y)

    stats = SolverStats()
    y0 = torch.ones(3, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = sdeint(
        Renamed(), y0, ts, method="euler", dt=1e-3, names={"drift": "drift", "diffusion": "noise"},
        stats=stats,
    )
    torch.testing.assert_close(ys[-1], y0 * math.exp(-1.0), rtol=1e-3, atol=0.0)
    assert stats.nfe > 0


@pytest.mark.parametrize(
    "sde",
    [
        OrnsteinUhlenbeck(1.0, 0.0, 0.5),
        GeometricBrownianMotion(0.3, 0.4, "ito"),
        GeometricBrownianMotion(0.3, 0.4, "stratonovich"),
    ],
    ids=["additive", "diagonal-ito", "diagonal-stratonovich"],
)
def test_default_brownian_motion_follows_torch_manual_seed(sde: nn.Module) -> None:
    y0 = torch.ones(8, 2)
    ts = torch.linspace(0.0, 1.0, 3)

    def solve(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return sdeint(sde, y0, ts, dt=0.05)

    torch.testing.assert_close(solve(0), solve(0), rtol=0.0, atol=0.0)
    assert not torch.equal(solve(0), solve(1))


def test_logqp_returns_zero_log_ratio_when_prior_equals_posterior() -> None:
    class Latent(GeometricBrownianMotion):
        def h(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.f(t, y)

    y0 = torch.ones(8, 2, dtype=torch.float64)
    ts = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    ys, log_ratio = sdeint(Latent(0.3, 0.4, "ito"), y0, ts, dt=0.05, logqp=True)
    assert ys.shape == (4, 8, 2) and log_ratio.shape == (3, 8)
    torch.testing.assert_close(log_ratio, torch.zeros_like(log_ratio))


def test_a_blown_up_drift_raises_non_finite_state_at_the_first_bad_time() -> None:
    class BlowsUp(OrnsteinUhlenbeck):
        def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.full_like(y, math.inf) if t > 0.42 else torch.zeros_like(y)

    y0 = torch.zeros(2, 1, dtype=torch.float64)
    ts = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    with pytest.raises(NonFiniteStateError, match="SDE state") as info:
        sdeint(BlowsUp(1.0, 0.0, 0.1), y0, ts, method="euler", dt=0.05)
    assert info.value.t == pytest.approx(0.5)


class NoNoiseType:
    sde_type = "ito"


class BadNoiseType:
    noise_type, sde_type = "pink", "ito"


class NoSdeType:
    noise_type = "diagonal"


class BadSdeType:
    noise_type, sde_type = "diagonal", "levy"


def _bad_inputs() -> list[tuple[str, dict, str]]:
    """(id, overrides of (sde, y0, ts, kwargs), expected message pattern)."""
    f32 = torch.linspace(0.0, 1.0, 3)
    return [
        ("y0 1-D", {"y0": torch.zeros(4)}, r"y0 must be 2-D \(batch, state\)"),
        ("y0 3-D", {"y0": torch.zeros(4, 2, 1)}, r"y0 must be 2-D"),
        ("y0 not a tensor", {"y0": [[0.0, 0.0]]}, r"y0 must be a torch.Tensor"),
        ("y0 integer", {"y0": torch.zeros(4, 2, dtype=torch.long)}, r"floating dtype"),
        ("y0 NaN", {"y0": torch.full((4, 2), math.nan)}, r"y0 contains NaN or inf"),
        ("ts 2-D", {"ts": f32.reshape(3, 1)}, r"ts must be a non-empty 1-D"),
        ("ts decreasing", {"ts": f32.flip(0)}, r"ts must be strictly increasing"),
        ("ts repeated", {"ts": torch.tensor([0.0, 0.5, 0.5])}, r"ts must be strictly increasing"),
        ("ts float64", {"ts": f32.double()}, r"ts is torch.float64 .* y0 is torch.float32"),
        ("ts on another device", {"ts": f32.to("meta")}, r"on meta but y0 .* on cpu"),
        ("ts requires grad", {"ts": f32.clone().requires_grad_()}, r"ts must not require grad"),
        ("no noise_type", {"sde": NoNoiseType()}, r"no attribute 'noise_type'.*'diagonal'"),
        ("bad noise_type", {"sde": BadNoiseType()}, r"noise_type='pink' is invalid.*'general'"),
        ("no sde_type", {"sde": NoSdeType()}, r"no attribute 'sde_type'.*'stratonovich'"),
        ("bad sde_type", {"sde": BadSdeType()}, r"sde_type='levy' is invalid.*'ito'"),
        ("unknown method", {"method": "rk45"}, r"unknown SDE method 'rk45'"),
        ("unknown names key", {"names": {"drfit": "f"}}, r"unknown key\(s\) \['drfit'\]"),
        ("dt zero", {"dt": 0.0}, r"dt must be a positive float"),
    ]


@pytest.mark.parametrize("solve", [sdeint, sdeint_adjoint], ids=["sdeint", "sdeint_adjoint"])
@pytest.mark.parametrize(
    ("overrides", "message"),
    [case[1:] for case in _bad_inputs()],
    ids=[case[0] for case in _bad_inputs()],
)
def test_bad_input_raises_solver_input_error_saying_what_is_wrong(
    solve, overrides: dict, message: str
) -> None:
    sde, y0, ts = small_problem()
    args = {"sde": sde, "y0": y0, "ts": ts, **overrides}
    kwargs = {k: v for k, v in args.items() if k not in ("sde", "y0", "ts")}
    with pytest.raises(SolverInputError, match=message):
        solve(args["sde"], args["y0"], args["ts"], **kwargs)


def test_adjoint_of_a_plain_object_needs_adjoint_params() -> None:
    class Plain:
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -y

        def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(y)

    _, y0, ts = small_problem()
    with pytest.raises(SolverInputError, match="adjoint_params"):
        sdeint_adjoint(Plain(), y0, ts)
    assert sdeint_adjoint(Plain(), y0, ts, dt=0.1, adjoint_params=()).shape == (5, 4, 2)


def test_solver_input_error_is_a_value_error() -> None:
    _, y0, ts = small_problem()
    with pytest.raises(ValueError):
        sdeint(NoSdeType(), y0, ts)
