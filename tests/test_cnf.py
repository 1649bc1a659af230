"""Continuous normalizing flow: traces, log-density, sampling, gradients, SNOpt."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from ocnode.nn.cnf import CNF, CNFDrift, CNFFunc, exact_trace, hutchinson_trace
from ocnode.nn.layers import ConcatSquashLinear
from ocnode.optim import SNOpt
from solvers import SolverSpec

TIGHT = SolverSpec(rtol=1e-9, atol=1e-9)


@pytest.fixture(autouse=True)
def _seed(one_thread: None) -> Iterator[None]:
    torch.manual_seed(0)
    yield


def _linear_cnf(a: Tensor, adjoint: bool = True, **kwargs: object) -> CNF:
    """A one-layer CNF whose velocity is exactly f(t, z) = A z."""
    model = CNF(a.shape[0], n_layers=1, solver=TIGHT.replace(adjoint=adjoint),
                **kwargs).double()  # type: ignore[arg-type]
    layer = model.func.net.layers[0]
    assert isinstance(layer, ConcatSquashLinear)
    with torch.no_grad():
        layer._layer.weight.copy_(2 * a)  # the gate is sigmoid(0) = 1/2
        layer._layer.bias.zero_()
        layer._hyper_gate.weight.zero_()
        layer._hyper_gate.bias.zero_()
        layer._hyper_bias.weight.zero_()
    return model


def _analytic_log_prob(a: Tensor, x: Tensor, t1: float) -> Tensor:
    """z(t1) = expm(A t1) x, so log p(x) = log N(z(t1)) + t1 tr(A)."""
    z = x @ torch.linalg.matrix_exp(a * t1).T
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi)) + t1 * torch.trace(a)


@pytest.mark.parametrize("adjoint", [True, False])
def test_linear_velocity_gives_the_analytic_log_density(adjoint: bool) -> None:
    a = torch.tensor([[0.3, -0.8], [0.5, 0.4]], dtype=torch.float64)  # tr(A) = 0.7 != 0
    model = _linear_cnf(a, t1=1.5, adjoint=adjoint)
    x = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(x), _analytic_log_prob(a, x, 1.5),
                               rtol=1e-7, atol=1e-8)


def test_rademacher_hutchinson_is_exact_for_a_diagonal_linear_velocity() -> None:
    a = torch.diag(torch.tensor([0.4, -0.3, 0.9], dtype=torch.float64))
    model = _linear_cnf(a, trace="hutchinson", noise="rademacher")
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(x), _analytic_log_prob(a, x, 1.0),
                               rtol=1e-7, atol=1e-8)


def _brute_force_trace(net: nn.Module, t: float, z: Tensor) -> Tensor:
    rows = [torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], zi) for zi in z]
    return torch.stack([torch.trace(j) for j in rows])


def test_exact_trace_equals_the_trace_of_the_brute_force_jacobian() -> None:
    net = CNFDrift(4, hidden=16, n_layers=3, activation="softplus").double()
    z = torch.randn(5, 4, dtype=torch.float64)
    func = CNFFunc(net, trace="exact")
    f, minus_div = func(0.3, (z, torch.zeros(5, 1, dtype=torch.float64)))
    expected = _brute_force_trace(net, 0.3, z)
    torch.testing.assert_close(minus_div[:, 0], -expected)
    torch.testing.assert_close(f, net(0.3, z))
    zz = z.clone().requires_grad_(True)
    torch.testing.assert_close(exact_trace(net(0.3, zz), zz), expected)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(noise: str) -> None:
    net = CNFDrift(3, hidden=16).double()
    point = torch.randn(1, 3, dtype=torch.float64)
    exact = _brute_force_trace(net, 0.5, point)[0]
    n = 20000
    z = point.expand(n, 3).clone().requires_grad_(True)  # one noise draw per row
    func = CNFFunc(net, trace="hutchinson", noise=noise)
    e = func.reset_noise(z)
    if noise == "rademacher":
        assert set(e.unique().tolist()) == {-1.0, 1.0}
    estimates = hutchinson_trace(net(0.5, z), z, e)
    assert estimates.std() > 1e-3  # a real estimator, not the exact trace in disguise
    tolerance = 4 * estimates.std() / math.sqrt(n)
    assert abs(estimates.mean() - exact) < tolerance


def test_hutchinson_log_prob_averages_to_the_exact_log_prob() -> None:
    exact_model = CNF(3, hidden=16, trace="exact", solver=TIGHT).double()
    hutch = CNF(3, hidden=16, trace="hutchinson", solver=TIGHT).double()
    hutch.load_state_dict(exact_model.state_dict())
    x = torch.randn(1, 3, dtype=torch.float64)
    with torch.no_grad():
        exact = exact_model.log_prob(x)[0]
        estimates = hutch.log_prob(x.expand(4000, 3).clone())
    assert estimates.std() > 1e-3
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / math.sqrt(4000)


def test_hutchinson_uses_one_noise_draw_per_solve_forward_and_backward() -> None:
    model = CNF(2, hidden=8, trace="hutchinson", solver=SolverSpec(rtol=1e-4, atol=1e-4))
    seen: list[Tensor] = []
    model.func.register_forward_hook(
        lambda mod, args, out: seen.append(mod.noise_vectors.clone()))
    x = torch.randn(10, 2)
    model.nll(x).backward()
    first_solve = list(seen)
    assert model.block.nfe_forward > 1 and model.block.nfe_backward > 1
    assert len(first_solve) == model.block.nfe_forward + model.block.nfe_backward
    assert all(torch.equal(e, first_solve[0]) for e in first_solve)
    seen.clear()
    model.log_prob(x)
    assert not torch.equal(seen[0], first_solve[0])  # a new solve draws a new noise


def test_noise_follows_the_observers_row_layouts() -> None:
    """Fewer rows use the first rows; stacked grid samples repeat them per time block."""
    func = CNFFunc(CNFDrift(3, hidden=8).double(), trace="hutchinson")
    batch = torch.randn(7, 3, dtype=torch.float64)
    e = func.reset_noise(batch)
    sub = batch[:2]
    times = [0.2, 0.5, 0.9]
    stacked_t = torch.tensor(times, dtype=torch.float64).repeat_interleave(2)
    stacked = func(stacked_t, (sub.repeat(3, 1), torch.zeros(6, 1, dtype=torch.float64)))
    one_by_one = [func(t, (sub, torch.zeros(2, 1, dtype=torch.float64))) for t in times]
    torch.testing.assert_close(stacked[1], torch.cat([o[1] for o in one_by_one]))
    torch.testing.assert_close(func.noise_for(batch[:2], 0.2), e[:2])
    torch.testing.assert_close(func.noise_for(batch.repeat(2, 1), 0.2), e.repeat(2, 1))
    assert torch.equal(func.noise_vectors, e)  # none of these calls redrew the noise


def test_density_of_a_random_2d_flow_integrates_to_one() -> None:
    model = CNF(2, hidden=16, solver=SolverSpec(rtol=1e-5, atol=1e-5))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # a clearly non-Gaussian flow
        side = torch.linspace(-7, 7, 141)
        grid = torch.cartesian_prod(side, side)
        density = model.log_prob(grid).exp()
        base = torch.distributions.Normal(0.0, 1.0).log_prob(grid).sum(1).exp()
    cell = (side[1] - side[0]) ** 2
    assert abs(float(density.sum() * cell) - 1.0) < 0.02
    assert float((density - base).abs().max()) > 0.05  # the test is not about the base


def test_sample_integrated_back_returns_the_base_point() -> None:
    model = CNF(2, hidden=16, solver=TIGHT).double()
    z0 = torch.randn(6, 2, dtype=torch.float64)
    with torch.no_grad():
        x = model.inverse(z0)
        z1, _ = model.flow(x)
        samples = model.sample(4, generator=torch.Generator().manual_seed(1))
    assert (x - z0).abs().max() > 1e-2
    torch.testing.assert_close(z1, z0, rtol=1e-6, atol=1e-7)
    assert samples.shape == (4, 2) and samples.dtype == torch.float64


def _grads(model: CNF, x: Tensor) -> list[Tensor]:
    torch.manual_seed(3)  # the same Hutchinson draw for every model
    model.zero_grad()
    model.nll(x).backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_and_backprop_through_the_solver_give_the_same_gradients(trace: str) -> None:
    adj = CNF(2, hidden=8, trace=trace, solver=TIGHT).double()
    direct = CNF(2, hidden=8, trace=trace, solver=TIGHT.replace(adjoint=False)).double()
    direct.load_state_dict(adj.state_dict())
    x = torch.randn(8, 2, dtype=torch.float64)
    for g_adj, g_direct in zip(_grads(adj, x), _grads(direct, x)):
        torch.testing.assert_close(g_adj, g_direct, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_double_backward_through_the_solver_matches_finite_differences(trace: str) -> None:
    """Newton-CG's Hessian-vector products need the trace's graph through the solve."""
    model = CNF(2, hidden=6, trace=trace, solver=SolverSpec(
        method="rk4", options={"step_size": 0.25}, adjoint=False)).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def loss_and_grad(create_graph: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
        torch.manual_seed(5)
        loss = model.nll(x)
        return loss, torch.autograd.grad(loss, params, create_graph=create_graph)

    _, g = loss_and_grad(create_graph=True)
    g_v = sum((gi * vi).sum() for gi, vi in zip(g, v))
    hv = torch.autograd.grad(g_v, params)
    h = 1e-5
    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=h)
    loss_plus, plus = loss_and_grad()
    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=-2 * h)
    loss_minus, minus = loss_and_grad()
    # the gradient itself, trace term included, then its derivative
    torch.testing.assert_close(g_v.detach(), (loss_plus - loss_minus) / (2 * h), rtol=1e-6,
                               atol=1e-8)
    for hvi, p, m in zip(hv, plus, minus):
        torch.testing.assert_close(hvi, (p - m) / (2 * h), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("trace,stats_batch", [("exact", None), ("hutchinson", 5)])
def test_one_snopt_refresh_step_builds_factors_for_every_field_layer(
        trace: str, stats_batch: int | None) -> None:
    model = CNF(2, hidden=8, trace=trace, solver=SolverSpec(rtol=1e-4, atol=1e-4))
    opt = SNOpt(model, lr=0.01, update_freq=1, stats_batch=stats_batch)
    linears = [m for m in model.func.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 9 and set(opt.preconditioned_layers) == set(linears)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(12, 2)
    opt.zero_grad()
    model.nll(x).backward()
    opt.step()
    for layer in linears:
        st = opt.state[layer.weight]
        assert {"basis_a", "basis_b", "m2"} <= set(st), layer
        d_in = layer.in_features + (layer.bias is not None)
        assert st["a_factor"].shape == (d_in, d_in)
        assert st["b_factor"].shape == (layer.out_features, layer.out_features)
        assert torch.isfinite(st["a_factor"]).all() and torch.isfinite(st["b_factor"]).all()
        assert float(st["b_factor"].trace()) > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 0}, "dim must be a positive int"),
    ({"dim": 2, "trace": "jvp"}, "trace must be one of"),
    ({"dim": 2, "noise": "uniform"}, "noise must be one of"),
    ({"dim": 2, "t1": 0.0}, "t1 must be > 0"),
    ({"dim": 2, "n_layers": 0}, "n_layers must be a positive int"),
    ({"dim": 2, "activation": "relu"}, "unknown activation"),
])
def test_bad_settings_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CNF(**kwargs)


def test_bad_inputs_raise_clear_errors() -> None:
    model = CNF(2, hidden=4)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        model.log_prob(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        model.log_prob(torch.randn(5))
    with pytest.raises(TypeError, match="dtype"):
        model.log_prob(torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="tensor"):
        model.log_prob([[0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive int"):
        model.sample(0)
    with pytest.raises(TypeError, match="tuple state"):
        model.func(0.0, torch.randn(3, 2))  # type: ignore[arg-type]
