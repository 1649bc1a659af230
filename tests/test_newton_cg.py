"""Newton-CG: conjugate gradients, exact Hessian-vector products, and the optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ocnode.nn import MLPODEFunc, ODEBlock
from ocnode.optim import NewtonCG, cg
from solvers import SolverSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g,
                                       dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.t()


def _flat_matvec(a: torch.Tensor, shapes: list[torch.Size]):
    """matvec over a tensor list whose flattened concatenation is the vector of A."""
    def matvec(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = a @ torch.cat([t.reshape(-1) for t in v])
        return [t.reshape(s) for t, s in zip(out.split([s.numel() for s in shapes]), shapes)]
    return matvec


# ---- conjugate gradients ---------------------------------------------------------------


def test_cg_solves_a_random_spd_system_given_as_a_tensor_list_to_tolerance():
    a = _spd([0.5 + k for k in range(12)])
    b = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shapes = [torch.Size([3, 2]), torch.Size([6])]
    x, info = cg.conjugate_gradient(_flat_matvec(a, shapes), [b[:6].reshape(3, 2), b[6:]],
                                    iters=100, tol=1e-9)
    exact = torch.linalg.solve(a, b)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in x]), exact, atol=1e-8)
    assert info.residual <= 1e-9 and not info.negative_curvature
    assert info.iterations <= 12


@pytest.mark.parametrize("eigenvalues, expected", [
    ([1.0, 2.0, 3.0, 5.0, 7.0, 11.0], 6),      # n distinct eigenvalues: n iterations
    ([1.0, 1.0, 4.0, 4.0, 9.0, 9.0, 9.0], 3),  # 3 distinct eigenvalues: 3 iterations
])
def test_cg_converges_in_as_many_iterations_as_distinct_eigenvalues(eigenvalues, expected):
    a = _spd(eigenvalues, seed=2)
    b = torch.randn(len(eigenvalues), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    x, info = cg.conjugate_gradient(lambda v: [a @ v[0]], [b], iters=50, tol=1e-10)
    assert info.iterations == expected
    assert torch.allclose(x[0], torch.linalg.solve(a, b), atol=1e-10)


def test_cg_stops_after_iters_and_reports_the_true_residual():
    a = _spd([1.0 + k for k in range(10)])
    b = [torch.ones(10, dtype=torch.float64)]
    x, info = cg.conjugate_gradient(lambda v: [a @ v[0]], b, iters=3, tol=0.0)
    assert info.iterations == 3
    assert math.isclose(info.residual, float((b[0] - a @ x[0]).norm() / b[0].norm()),
                        rel_tol=1e-9)


def test_cg_on_negative_curvature_at_the_first_iteration_returns_the_right_hand_side():
    a = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = [torch.tensor([1.0, 1.0], dtype=torch.float64)]  # b^T A b = -1
    x, info = cg.conjugate_gradient(lambda v: [a @ v[0]], b, iters=5, tol=1e-12)
    assert info.negative_curvature and info.iterations == 0
    assert torch.equal(x[0], b[0])


def test_cg_on_negative_curvature_later_returns_the_current_iterate():
    a = torch.diag(torch.tensor([4.0, 1.0, -3.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    x, info = cg.conjugate_gradient(lambda v: [a @ v[0]], [b], iters=5, tol=1e-12)
    first_iterate = (b @ b) / (b @ a @ b) * b  # x_1 of CG from x_0 = 0
    assert info.negative_curvature and info.iterations == 1
    assert torch.allclose(x[0], first_iterate)
    assert math.isclose(info.curvature, float(first_iterate @ a @ first_iterate), rel_tol=1e-12)


def test_cg_with_a_zero_right_hand_side_returns_zero_without_matvecs():
    def matvec(v):
        raise AssertionError("no product needed")
    x, info = cg.conjugate_gradient(matvec, [torch.zeros(3)], iters=5, tol=1e-6)
    assert torch.equal(x[0], torch.zeros(3)) and info == cg.CGInfo(0, 0.0, False, 0.0)


@pytest.mark.parametrize("iters, tol", [(0, 1e-4), (2.5, 1e-4), (3, -1.0)])
def test_cg_rejects_bad_iteration_counts_and_tolerances(iters, tol):
    with pytest.raises(ValueError, match="iters"):
        cg.conjugate_gradient(lambda v: v, [torch.ones(2)], iters=iters, tol=tol)


# ---- Hessian-vector products -----------------------------------------------------------


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_hvp_equals_the_dense_autograd_hessian_times_v():
    net = _small_net()
    x = torch.randn(5, 3, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    sizes = [p.numel() for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split(sizes)
        weights = {n: c.reshape(p.shape) for n, c, p in zip(names, chunks, params)}
        return functional_call(net, weights, (x,)).square().mean()

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dense = torch.autograd.functional.hessian(loss_of, flat)
    v = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(net(x).square().mean(), params, create_graph=True)
    hv = cg.hessian_vector_product(grads, params, v)
    expected = dense @ torch.cat([t.reshape(-1) for t in v])
    assert torch.allclose(torch.cat([t.reshape(-1) for t in hv]), expected, atol=1e-12)


def test_hvp_is_zero_for_a_parameter_the_loss_is_linear_in():
    w = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = (w ** 3).sum() + c.sum()
    grads = torch.autograd.grad(loss, [w, c], create_graph=True)
    hv = cg.hessian_vector_product(grads, [w, c], [torch.ones(2, dtype=torch.float64)] * 2)
    assert torch.allclose(hv[0], 6 * w.detach()) and torch.equal(hv[1], torch.zeros(2).double())


def _ode_model(adjoint: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return ODEBlock(MLPODEFunc(3, 8), solver=SolverSpec(
        method="rk4", options={"step_size": 0.25}, adjoint=adjoint)).double()


def _ode_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 0.5 * x.flip(-1)).square().mean()


def test_hvp_through_the_ode_solve_matches_finite_differences_of_gradients():
    model = _ode_model()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(_ode_loss(model, x), params, create_graph=True)
    hv = cg.hessian_vector_product(grads, params, v)

    def gradient_at(shift: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(shift * d)
        g = torch.autograd.grad(_ode_loss(model, x), params)
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(shift * d)
        return list(g)

    h = 1e-5
    fd = [(gp - gm) / (2 * h) for gp, gm in zip(gradient_at(h), gradient_at(-h))]
    assert max(float((a - b).abs().max()) for a, b in zip(hv, fd)) < 1e-7
    assert max(float(a.abs().max()) for a in hv) > 1e-3  # a real, non-trivial curvature


# ---- the optimizer ---------------------------------------------------------------------


def _quadratic(dim: int = 6, seed: int = 5):
    a = _spd([0.3 + 0.7 * k for k in range(dim)], seed=seed)
    b = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a, b


def test_one_full_newton_step_lands_on_the_minimiser_of_a_quadratic():
    a, b = _quadratic()
    x = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = NewtonCG([x], lr=1.0, damping=0.0, cg_iters=6, cg_tol=1e-12)
    loss = opt.step(lambda: 0.5 * x @ a @ x - b @ x)
    assert torch.allclose(x.detach(), torch.linalg.solve(a, b), atol=1e-10)
    assert loss.grad_fn is None and opt.counters["step"] == 1
    assert opt.counters["cg_iterations"] <= 6 and not opt.counters["negative_curvature"]


def test_levenberg_marquardt_rates_a_good_step_and_lowers_the_damping():
    a, b = _quadratic()
    x = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return 0.5 * x @ a @ x - b @ x

    opt = NewtonCG([x], lr=1.0, damping=1e-3, cg_iters=6, cg_tol=1e-12, adapt_damping=True)
    opt.step(closure)
    assert calls == [True, False]  # the loss, then its value at the new point without grad
    # on a quadratic the damped model is almost exact: rho ~ 1, damping * 2/3
    assert opt.counters["rho"] == pytest.approx(1.0, abs=1e-3)
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-3 * 2 / 3)
    assert opt.counters["rejected"] == 0
    damped = torch.linalg.solve(a + 1e-3 * torch.eye(6, dtype=torch.float64), b)
    assert torch.allclose(x.detach(), damped, atol=1e-9)


def test_levenberg_marquardt_undoes_a_step_that_raises_the_loss_and_raises_the_damping():
    a, b = _quadratic()
    x = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = NewtonCG([x], lr=3.0, damping=1e-3, cg_iters=6, cg_tol=1e-12, adapt_damping=True)
    opt.step(lambda: 0.5 * x @ a @ x - b @ x)  # three times the Newton step overshoots
    assert torch.equal(x.detach(), torch.zeros(6, dtype=torch.float64))
    assert opt.counters["rejected"] == 1 and opt.counters["rho"] < 0
    assert opt.param_groups[0]["damping"] == pytest.approx(1.5e-3)
    assert opt.counters["step"] == 1


def test_without_adaptation_the_damping_stays_put():
    a, b = _quadratic()
    x = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = NewtonCG([x], lr=3.0, damping=0.5, cg_iters=6)
    opt.step(lambda: 0.5 * x @ a @ x - b @ x)
    assert opt.param_groups[0]["damping"] == 0.5 and opt.counters["rejected"] == 0


def test_groups_use_their_own_learning_rate_and_damping():
    a, b = _quadratic(4)
    a[:2, 2:] = a[2:, :2] = 0.0  # block diagonal: the two parameters decouple
    x = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    y = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = NewtonCG([{"params": [x]}, {"params": [y], "lr": 0.5, "damping": 1.0}],
                   damping=0.0, cg_iters=4, cg_tol=1e-12)

    def closure():
        z = torch.cat([x, y])
        return 0.5 * z @ a @ z - b @ z

    opt.step(closure)
    eye = torch.eye(2, dtype=torch.float64)
    assert torch.allclose(x.detach(), torch.linalg.solve(a[:2, :2], b[:2]), atol=1e-10)
    assert torch.allclose(y.detach(), 0.5 * torch.linalg.solve(a[2:, 2:] + eye, b[2:]),
                          atol=1e-10)


def test_negative_curvature_at_once_takes_a_gradient_step():
    x = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = NewtonCG([x], lr=0.1, damping=0.0)
    opt.step(lambda: -0.5 * x.square().sum() + x.sum())  # concave; gradient 1 - x
    assert torch.allclose(x.detach(), torch.tensor([1.0, 2.1], dtype=torch.float64))
    assert opt.counters["negative_curvature"] and opt.counters["cg_iterations"] == 0


def test_max_step_norm_clips_the_whole_step():
    a, b = _quadratic()
    x = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    y = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = NewtonCG([x, y], damping=0.0, cg_iters=9, cg_tol=1e-12, max_step_norm=0.1)
    opt.step(lambda: 0.5 * x @ a @ x - b @ x + y.square().sum())
    step = torch.cat([x.detach(), y.detach() - 1.0])
    assert math.isclose(float(step.norm()), 0.1, rel_tol=1e-9)
    assert math.isclose(opt.counters["step_norm"], 0.1)
    newton = torch.cat([torch.linalg.solve(a, b), -torch.ones(3, dtype=torch.float64)])
    assert torch.allclose(step, 0.1 * newton / newton.norm(), atol=1e-10)


def test_gradients_land_in_grad_and_unused_or_frozen_parameters_stay_put():
    used = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    unused = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    frozen = nn.Parameter(torch.tensor([2.0], dtype=torch.float64), requires_grad=False)
    opt = NewtonCG([used, unused, frozen], lr=0.5, damping=0.0, cg_iters=2)
    opt.step(lambda: (used.square() * frozen).sum())
    assert torch.equal(used.grad, torch.tensor([4.0, -4.0], dtype=torch.float64))
    assert used.grad.grad_fn is None
    assert torch.allclose(used.detach(), torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert unused.grad is None and unused.item() == 3.0 and frozen.item() == 2.0


def test_loss_falls_fast_on_a_small_neural_ode():
    model = _ode_model()
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    opt = NewtonCG(model.parameters(), damping=0.3, cg_iters=10)
    losses = [float(opt.step(lambda: _ode_loss(model, x))) for _ in range(4)]
    assert losses[-1] < 0.15 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))


def _trained_pair():
    a, b = _quadratic()
    x = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = NewtonCG([x], lr=0.5, damping=0.1, cg_iters=2)
    closure = lambda: 0.5 * x @ a @ x - b @ x + 0.1 * x.pow(4).sum()  # noqa: E731
    for _ in range(2):
        opt.step(closure)
    return x, opt, closure


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_skips_and_changes_nothing(poison):
    x, opt, closure = _trained_pair()
    before, state = x.detach().clone(), copy.deepcopy(opt.state_dict())

    def bad():
        if poison == "loss":
            return closure() * float("nan")
        return closure() + torch.sqrt(x - x.detach()).sum()  # value finite, gradient inf

    with pytest.warns(RuntimeWarning, match=f"non-finite {poison}"):
        opt.step(bad)
    assert torch.equal(x.detach(), before)
    assert opt.state_dict()["state"] == state["state"]


def test_state_dict_round_trip_resumes_bit_identically():
    x, opt, closure = _trained_pair()
    a, b = _quadratic()
    y = nn.Parameter(x.detach().clone())
    fresh = NewtonCG([y], lr=1.0, damping=1.0, cg_iters=2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.counters == opt.counters and fresh.counters is not opt.counters
    assert fresh.param_groups[0]["lr"] == 0.5 and fresh.param_groups[0]["damping"] == 0.1
    for _ in range(2):
        opt.step(closure)
        fresh.step(lambda: 0.5 * y @ a @ y - b @ y + 0.1 * y.pow(4).sum())
    assert torch.equal(x, y) and fresh.counters == opt.counters
    assert opt.counters["step"] == 4


def test_step_without_a_closure_says_how_to_call_it():
    opt = NewtonCG([nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=r"NewtonCG needs step\(closure\); the closure returns "
                                        "the loss without calling backward"):
        opt.step()


def test_a_loss_without_a_graph_is_rejected():
    x = nn.Parameter(torch.ones(2))
    opt = NewtonCG([x])
    with pytest.raises(ValueError, match="no autograd graph"):
        opt.step(lambda: x.detach().sum())


def test_an_adjoint_ode_block_without_double_backward_is_refused():
    model = _ode_model(adjoint=True)
    opt = NewtonCG(model.parameters())
    with pytest.raises(ValueError, match="adjoint=False"):
        opt.step(lambda: _ode_loss(model, torch.ones(4, 3, dtype=torch.float64)))


def test_a_parameter_the_loss_is_linear_in_warns_and_gets_a_damped_gradient_step():
    x = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    c = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = NewtonCG([x, c], damping=0.5, cg_iters=4, cg_tol=1e-12)
    with pytest.warns(RuntimeWarning, match="1 parameter tensor"):
        opt.step(lambda: x.square().sum() + 3.0 * c.sum())
    # (diag(2, 2, 0) + 0.5 I) d = (2 x, 3)
    assert torch.allclose(x.detach(), torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert torch.allclose(c.detach(), torch.tensor([-6.0], dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"damping": -1e-3}, "damping"),
    ({"cg_iters": 0}, "cg_iters"), ({"cg_iters": 2.0}, "cg_iters"),
    ({"cg_tol": -1.0}, "cg_tol"), ({"max_step_norm": 0.0}, "max_step_norm"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NewtonCG([nn.Parameter(torch.ones(2))], **kwargs)


def test_a_param_group_with_a_bad_learning_rate_raises():
    with pytest.raises(ValueError, match="lr"):
        NewtonCG([{"params": [nn.Parameter(torch.ones(2))], "lr": -0.1}])
