"""Numerics of the Runge-Kutta engine: orders, analytic solutions, torchdiffeq parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq

from solvers import METHODS, SolverStats, get_tableau, odeint
from solvers.integrate import StepControl, integrate_adaptive, integrate_fixed
from solvers.tableau import ButcherTableau

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)


def linear(t, y):
    return y @ A.T


def linear_exact(y0, t):
    return torch.stack([y0 @ torch.linalg.matrix_exp(A * float(ti)).T for ti in t])


def _solve_fixed(tab: ButcherTableau, h: float, t_end: float = 1.0) -> float:
    """Error at t_end of a fixed-step solve of y' = -y + sin(3t) (float64)."""
    def rhs(t, y):
        return -y + math.sin(3 * t)
    out = {}
    y0 = torch.tensor([1.0], dtype=torch.float64)
    integrate_fixed(rhs, y0, [0.0, t_end], lambda j, t, y: out.__setitem__(j, y), tab, h)
    # exact: y = C e^{-t} + (sin 3t - 3 cos 3t)/10, C = 1 + 3/10
    exact = 1.3 * math.exp(-t_end) + (math.sin(3 * t_end) - 3 * math.cos(3 * t_end)) / 10
    return abs(float(out[1]) - exact)


def _measured_order(tab: ButcherTableau) -> float:
    # asymptotic regime, above round-off (dopri8's error is at round-off by h = 0.1)
    base = 0.5 if tab.order >= 7 else 0.1 if tab.order >= 4 else 0.005
    hs = [base, base / 2, base / 4]
    errs = [_solve_fixed(tab, h) for h in hs]
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


@pytest.mark.parametrize("name", list(METHODS))
def test_each_tableau_converges_at_its_stated_order(name):
    tab = get_tableau(name)
    assert _measured_order(tab) == pytest.approx(tab.order, abs=0.7 if tab.order >= 7 else 0.3)


@pytest.mark.parametrize("name", ["bosh3", "dopri5", "tsit5"])
def test_embedded_solution_converges_one_order_lower(name):
    tab = get_tableau(name)
    b_hat = tab.b - tab.b_err
    embedded = ButcherTableau(f"{name}-hat", c=tab.c, a=tab.a, b=b_hat, order=tab.order - 1,
                              dense=np.outer(b_hat, [1.0]))
    assert _measured_order(embedded) == pytest.approx(tab.order - 1, abs=0.35)


@pytest.mark.parametrize("name,order", [("dopri5", 4), ("tsit5", 4), ("bosh3", 3)])
def test_dense_output_is_accurate_to_its_order_inside_a_step(name, order):
    # Local interpolation error at theta=0.4 over one step of size h scales as h^(order+1).
    tab = get_tableau(name)
    errs, hs = [], [0.2, 0.1, 0.05]
    for h in hs:
        out: dict[int, torch.Tensor] = {}
        y0 = torch.tensor([1.0], dtype=torch.float64)
        integrate_adaptive(lambda t, y: torch.cos(3 * t + y), y0, [0.0, 0.4 * h],
                           lambda j, t, y, out=out: out.__setitem__(j, y), tab,
                           StepControl(rtol=1.0, atol=1.0, first_step=h))
        ref = odeint(lambda t, y: torch.cos(3 * t + y), y0,
                     torch.tensor([0.0, 0.4 * h], dtype=torch.float64), rtol=1e-13, atol=1e-13)
        errs.append(abs(float(out[1] - ref[1])))
    slope = float(np.polyfit(np.log(hs), np.log(errs), 1)[0])
    assert slope >= order + 1 - 0.4


def test_tableau_validation_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="row sums"):
        ButcherTableau("bad", c=np.array([0.0, 0.5]), a=np.array([[0, 0], [0.4, 0]]),
                       b=np.array([0.0, 1.0]), order=2, dense=np.array([[0.0], [1.0]]))


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun"])
def test_adaptive_methods_match_the_analytic_solution_within_tolerance(method):
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    y = odeint(linear, y0, t, method=method, rtol=1e-7, atol=1e-9)
    assert torch.allclose(y, linear_exact(y0, t), atol=1e-5)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun", "euler", "midpoint",
                                    "rk4"])
@pytest.mark.parametrize("tol", [1e-4, 1e-7])
def test_engine_agrees_with_torchdiffeq_on_the_same_problem(method, tol):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    net = net.double()
    y0 = torch.randn(8, 2, dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    opts = {"step_size": 0.01} if not get_tableau(method).adaptive else None
    with torch.no_grad():
        ours = odeint(lambda t, y: net(y), y0, t, method=method, rtol=tol, atol=tol,
                      options=opts)
        ref = torchdiffeq.odeint(lambda t, y: net(y), y0, t, method=method, rtol=tol,
                                 atol=tol, options=opts)
        truth = odeint(lambda t, y: net(y), y0, t, rtol=1e-12, atol=1e-12)
    # Agree within the tolerance plus torchdiffeq's own error (its bosh3 output is less
    # accurate than its tolerance; fixed grids differ only by rounding).
    allowed = 20 * tol + float((ref - truth).abs().max())
    assert float((ours - ref).abs().max()) <= allowed


def test_backend_torchdiffeq_runs_the_same_call_and_counts_evaluations():
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    stats = SolverStats()
    ours = odeint(linear, y0, t, rtol=1e-8, atol=1e-8)
    ref = odeint(linear, y0, t, rtol=1e-8, atol=1e-8, backend="torchdiffeq", stats=stats)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert stats.nfe > 0


def test_decreasing_times_integrate_backward():
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    exact = linear_exact(y0, t)
    back = odeint(linear, exact[-1], t.flip(0), rtol=1e-9, atol=1e-10)
    assert torch.allclose(back, exact.flip(0), atol=1e-7)


def test_tuple_state_is_integrated_componentwise():
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)

    def func(t, state):
        y, _ = state
        return linear(t, y), (y**2).sum(-1)

    y, integral = odeint(func, (y0, torch.zeros(1, dtype=torch.float64)), t,
                         rtol=1e-9, atol=1e-10)
    exact = linear_exact(y0, t)
    fine = torch.linspace(0, 1, 2001, dtype=torch.float64)
    quad = torch.trapezoid((linear_exact(y0, fine) ** 2).sum(-1)[:, 0], fine)
    assert torch.allclose(y, exact, atol=1e-7)
    assert float(integral[-1, 0]) == pytest.approx(float(quad), abs=1e-6)


def test_time_dependent_field_and_many_output_times_do_not_change_the_steps():
    y0 = torch.zeros(1, dtype=torch.float64)
    few, many = SolverStats(), SolverStats()
    odeint(lambda t, y: torch.cos(t) * torch.ones_like(y), y0,
           torch.tensor([0.0, 5.0], dtype=torch.float64), stats=few, rtol=1e-6, atol=1e-6)
    t = torch.linspace(0, 5, 101, dtype=torch.float64)
    y = odeint(lambda t, y: torch.cos(t) * torch.ones_like(y), y0, t, stats=many,
               rtol=1e-6, atol=1e-6)
    assert torch.allclose(y[:, 0], torch.sin(t), atol=1e-5)
    assert (few.nfe, few.n_accepted, few.n_rejected) == (many.nfe, many.n_accepted,
                                                         many.n_rejected)


def test_stats_count_evaluations_and_steps():
    calls = []
    stats = SolverStats()

    def func(t, y):
        calls.append(float(t))
        return linear(t, y)

    odeint(func, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 4.0]), stats=stats,
           rtol=1e-6, atol=1e-6)
    assert stats.nfe == len(calls)
    # dopri5 (FSAL): f0 + one initial-step probe + 6 evaluations per attempted step
    assert stats.nfe == 2 + 6 * (stats.n_accepted + stats.n_rejected)


def test_pi_controller_option_solves_accurately():
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    y = odeint(linear, y0, t, rtol=1e-8, atol=1e-9, options={"pcoeff": 0.4, "icoeff": 0.7})
    assert torch.allclose(y, linear_exact(y0, t), atol=1e-6)


def test_max_step_bounds_every_step():
    stats = SolverStats()
    odeint(linear, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0]), stats=stats,
           options={"max_step": 0.05})
    assert stats.n_accepted >= 20


def test_precision_contract_the_clock_is_float64_and_the_field_sees_the_states_dtype():
    # dy/dt = 1 from t = 1e7 over dt = 1e-3: a float32 clock could not resolve the steps;
    # the field gets t in the state's dtype, as torchdiffeq hands it.
    seen = []

    def func(t, y):
        seen.append(t.dtype)
        return torch.ones_like(y)

    y0 = torch.zeros(3, dtype=torch.float32)
    t = torch.tensor([1e7, 1e7 + 1e-3], dtype=torch.float64)
    y = odeint(func, y0, t, method="rk4", options={"step_size": 1e-4})
    assert y.dtype == torch.float32
    assert set(seen) == {torch.float32}
    assert float(y[-1, 0]) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun"])
def test_rejected_steps_restart_from_the_accepted_state_with_or_without_autograd(method):
    # Van der Pol (mu = 10) rejects many steps; the buffered (no-grad) path must take exactly
    # the steps of the graph path and reach the same answer.
    def vdp(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, 10.0 * (1 - x**2) * v - x], -1)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    plain, graph = SolverStats(), SolverStats()
    with torch.no_grad():
        y_plain = odeint(vdp, y0, t, method=method, rtol=1e-6, atol=1e-6, stats=plain)
    y_graph = odeint(vdp, y0.clone().requires_grad_(True), t, method=method, rtol=1e-6,
                     atol=1e-6, stats=graph)
    assert plain.n_rejected > 0
    assert (plain.nfe, plain.n_accepted, plain.n_rejected) == (graph.nfe, graph.n_accepted,
                                                               graph.n_rejected)
    assert torch.allclose(y_plain, y_graph.detach(), rtol=1e-10, atol=1e-12)
