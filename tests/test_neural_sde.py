"""NeuralSDE: layouts, the diffusion, seeding, gradients, the integration, fitting and SNOpt."""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import pytest
import torch
from torch import Tensor, nn

from ocnode.nn.sde import DiagonalDiffusion, NeuralSDE, sde_mse, sde_nll
from ocnode.nn.trajectory import union_grid
from ocnode.optim import SNOpt


@pytest.fixture(autouse=True)
def _setup(one_thread: None) -> None:
    torch.manual_seed(0)


def _rotation_data(n: int = 16, length: int = 9, noise: float = 0.05,
                   seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy 2-D damped rotations ``x' = A x``, each series at its own times, padded.

    The layout of ``load_dataset("spirals")``'s training split: float32 ``values (N, L, 2)``
    (0 where unobserved), ``times (N, L)`` on a 0.25 grid of [0, 3] starting at 0 (padding
    holds the window's end), and a bool ``mask (N, L)`` with step 0 always set.
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64)
    grid = torch.arange(13, dtype=torch.float64) * 0.25
    radius = 0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    x0 = torch.cat([radius * phase.cos(), radius * phase.sin()], dim=1)
    exact = torch.stack([x0 @ torch.linalg.matrix_exp(a * t).T for t in grid], dim=1)
    exact += noise * torch.randn(exact.shape, generator=gen, dtype=torch.float64)
    values, times = torch.zeros(n, length, 2), torch.full((n, length), 3.0)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        count = int(torch.randint(3, length + 1, (1,), generator=gen))
        steps = torch.cat([torch.zeros(1, dtype=torch.long),
                           torch.randperm(12, generator=gen)[:count - 1].add(1).sort().values])
        values[i, :count], times[i, :count] = exact[i, steps].float(), grid[steps].float()
        mask[i, :count] = True
    return values, times, mask


def _small(**kwargs: Any) -> NeuralSDE:
    return NeuralSDE(2, hidden=16, **kwargs)


def _linear(net: nn.Module, index: int) -> nn.Linear:
    """Layer ``index`` of a TrajectoryField."""
    return cast(nn.Linear, cast(nn.ModuleList, net.layers)[index])


# ----------------------------------------------------------------------------- shapes

def test_forward_is_sample_major_and_starts_at_x0() -> None:
    model = _small()
    x0, t = torch.randn(5, 2), torch.linspace(0.0, 1.0, 4)
    out = model(x0, t, n_samples=3)
    assert out.shape == (4, 15, 2)
    assert torch.equal(out[0], x0.repeat(3, 1))
    # row s * B + b is path s of series b: the paths of one series differ across samples
    paths = out.view(4, 3, 5, 2)
    assert torch.equal(paths[0, 1], x0) and not torch.allclose(paths[-1, 0], paths[-1, 1])
    assert model.nfe_forward > 0
    assert model(x0, t[:1]).shape == (1, 5, 2)


def test_series_outputs_have_the_batch_layout() -> None:
    values, times, mask = _rotation_data(n=4)
    model = _small()
    assert model.sample_series(values, times, mask, n_samples=3).shape == (3, 4, 9, 2)
    assert model.predict_mean(values, times, mask, n_samples=2).shape == (4, 9, 2)
    for metric in (sde_mse, sde_nll):
        value = metric(model, values, times, mask, n_samples=2)
        assert value.dim() == 0 and math.isfinite(float(value)) and not value.requires_grad


def test_diffusion_is_positive_diagonal_and_starts_at_init_diffusion() -> None:
    diffusion = DiagonalDiffusion(3, hidden=8, min_diffusion=1e-3, init_diffusion=0.2)
    with torch.no_grad():
        for net in diffusion.nets:  # push the pre-activation far negative
            _linear(net, -1).bias.fill_(-50.0)
    x = 10 * torch.randn(64, 3)
    g = diffusion(x)
    assert g.shape == (64, 3) and bool((g >= 1e-3).all())
    # g_i depends on x_i only (torchsde's diagonal noise): the Jacobian is diagonal
    jac = torch.autograd.functional.jacobian(diffusion, torch.randn(1, 3))[0, :, 0]
    assert torch.equal(jac * (1 - torch.eye(3)), torch.zeros(3, 3))
    fresh = DiagonalDiffusion(2, hidden=8, init_diffusion=0.2)(torch.zeros(4, 2))
    assert torch.allclose(fresh, torch.full((4, 2), 0.2), atol=0.05)


# ----------------------------------------------------------------------------- randomness

def test_same_seed_or_restored_rng_state_gives_identical_paths() -> None:
    model, x0, t = _small(), torch.randn(4, 2), torch.linspace(0.0, 1.0, 5)
    torch.manual_seed(3)
    first = model(x0, t)
    torch.manual_seed(3)
    assert torch.equal(model(x0, t), first)
    state = torch.get_rng_state()
    second = model(x0, t)
    assert not torch.equal(second, first)  # the stream moved on: a different path
    torch.set_rng_state(state)
    assert torch.equal(model(x0, t), second)
    torch.manual_seed(4)
    assert not torch.allclose(model(x0, t)[-1], first[-1])


def test_a_generator_reproduces_paths_and_leaves_the_global_stream_alone() -> None:
    values, times, mask = _rotation_data(n=4)
    model = _small()
    state = torch.get_rng_state()
    a = sde_mse(model, values, times, mask, generator=torch.Generator().manual_seed(5))
    b = sde_mse(model, values, times, mask, generator=torch.Generator().manual_seed(5))
    c = sde_nll(model, values, times, mask, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and math.isfinite(float(c))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_resumed_training_run_continues_bit_identically() -> None:
    values, times, mask = _rotation_data(n=8)
    model = _small()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            model.loss(values, times, mask).backward()
            optimizer.step()

    train(2)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict(),
                                torch.get_rng_state()))
    train(2)
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(checkpoint[0])
    optimizer.load_state_dict(checkpoint[1])
    torch.set_rng_state(checkpoint[2])
    train(2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))


# ----------------------------------------------------------------------------- loss and gradients

def test_loss_is_finite_and_its_gradient_reaches_every_parameter() -> None:
    values, times, mask = _rotation_data(n=6)
    model = _small()
    loss = model.loss(values, times, mask)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_loss_is_the_gaussian_nll_per_observed_coordinate() -> None:
    # with a tiny diffusion and a zero drift every path stays at x0: the NLL is closed-form
    model = NeuralSDE(2, n_layers=1, obs_std=0.5, min_diffusion=1e-12, init_diffusion=1e-10)
    with torch.no_grad():
        _linear(model.drift, 0).weight.zero_()
        _linear(model.drift, 0).bias.zero_()
    values, times, mask = _rotation_data(n=5)
    values[~mask] = float("nan")  # unobserved entries must not leak into the loss
    resid = (values - values[:, :1])[mask]
    expected = (0.5 * (resid / 0.5) ** 2 + math.log(0.5) + 0.5 * math.log(2 * math.pi)).mean()
    assert torch.allclose(model.loss(values, times, mask), expected, atol=1e-5)


def test_tiny_diffusion_mean_path_is_the_euler_solution_of_the_drift() -> None:
    model = NeuralSDE(2, hidden=16, dt=0.05, min_diffusion=1e-12, init_diffusion=1e-9).double()
    x0 = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        mean = model(x0, t, n_samples=4).view(4, 4, 6, 2).mean(1)
        x, expected = x0, [x0]
        for k in range(1, 21):  # Euler on the 0.05 grid
            x = x + 0.05 * model.drift(0.0, x)
            if k in (5, 10, 20):
                expected.append(x)
    assert torch.allclose(mean, torch.stack(expected), rtol=1e-7, atol=1e-7)
    assert not torch.allclose(mean[-1], x0, atol=1e-2)  # the drift really moved the state


def test_constant_diffusion_gives_brownian_variance() -> None:
    # zero drift and g = c: X(1) - x0 ~ N(0, c^2 I), checked within 5 standard errors
    model = NeuralSDE(2, hidden=4, n_layers=1, dt=0.1, init_diffusion=0.3).double()
    with torch.no_grad():
        _linear(model.drift, 0).weight.zero_()
        _linear(model.drift, 0).bias.zero_()
        for net in model.diffusion.nets:
            _linear(net, 0).weight.zero_()
    n = 4000
    x0 = torch.zeros(n, 2, dtype=torch.float64)
    with torch.no_grad():
        end = model(x0, torch.tensor([0.0, 1.0], dtype=torch.float64))[-1]
    var = 0.3**2
    assert abs(float(end.mean())) < 5 * math.sqrt(var / (2 * n))
    assert abs(float(end.var()) - var) < 5 * var * math.sqrt(2 / (2 * n - 1))


def test_adjoint_gradients_match_backprop_through_the_solver() -> None:
    # Ito diagonal noise: euler forward, torchsde's default Milstein adjoint, same Brownian
    # motion (same seed). The adjoint discretises the backward SDE separately: O(dt) apart.
    values, times, mask = _rotation_data(n=4)
    values, times = values.double(), times.double() / 3  # window [0, 1]
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        model = NeuralSDE(2, hidden=8, dt=2e-3, adjoint=adjoint).double()
        model.loss(values, times, mask).backward()
        grads.append(torch.cat([cast(Tensor, p.grad).flatten() for p in model.sde_parameters()]))
        assert adjoint == (model.nfe_backward > 0)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 0.01


# ----------------------------------------------------------------------------- training

def test_a_few_dozen_adam_steps_lower_the_nll_clearly() -> None:
    values, times, mask = _rotation_data()
    model = _small(dt=0.1)
    evaluate = lambda: float(sde_nll(  # noqa: E731
        model, values, times, mask, n_samples=8, generator=torch.Generator().manual_seed(0)))
    before = evaluate()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model.loss(values, times, mask).backward()
        optimizer.step()
    after = evaluate()
    assert after < before / 4, (before, after)  # about 47 -> 0.3 nats


def test_snopt_preconditions_the_drift_and_diffusion_through_the_solver() -> None:
    values, times, mask = _rotation_data(n=8)
    model = _small(dt=0.1)
    optimizer = SNOpt(model, lr=0.05, full=True, update_freq=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert set(model.drift.layers) <= set(optimizer.preconditioned_layers)
    assert set(optimizer.preconditioned_layers) == set(linears)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        optimizer.zero_grad()
        loss = model.loss(values, times, mask)
        assert math.isfinite(float(loss.detach()))
        loss.backward()
        optimizer.step()
    assert optimizer.iteration == 4
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
    assert "basis_a" in optimizer.state[_linear(model.drift, 0).weight]
    optimizer.close()


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "heun"}, "unknown method"),
    ({"adjoint_method": "rk4"}, "unknown adjoint_method"),
    ({"activation": "gelu"}, "unknown activation"),
    ({"dt": 0.0}, "dt must be a positive"),
    ({"dt": -0.1}, "dt must be a positive"),
    ({"obs_std": 0.0}, "obs_std must be a positive"),
    ({"min_diffusion": 0.0}, "min_diffusion must be a positive"),
    ({"init_diffusion": 1e-4}, "must exceed min_diffusion"),
    ({"hidden": 0}, "hidden must be an int"),
])
def test_bad_settings_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NeuralSDE(2, **kwargs)


def test_bad_inputs_raise_clear_errors() -> None:
    model = _small()
    t = torch.linspace(0.0, 1.0, 3)
    with pytest.raises(ValueError, match=r"x0 must be a \(B, 2\)"):
        model(torch.randn(4, 3), t)
    with pytest.raises(ValueError, match=r"x0 must be a \(B, 2\)"):
        model(torch.randn(4), t)
    with pytest.raises(ValueError, match="t must be a non-empty 1-D"):
        model(torch.randn(4, 2), t.view(1, 3))
    with pytest.raises(ValueError, match="n_samples must be an int"):
        model(torch.randn(4, 2), t, n_samples=0)
    values, times, mask = _rotation_data(n=3)
    with pytest.raises(ValueError, match="values must be"):
        model.loss(values[..., :1], times, mask)
    with pytest.raises(ValueError, match="mask selects no observation"):
        model.loss(values, times, torch.zeros_like(mask))
    assert union_grid(times, mask)[0][0] == 0  # the data helper itself is sound
