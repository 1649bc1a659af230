"""Terminal events (``event_fn``, ``odeint_event``), torchdiffeq's Adams methods and
``scipy_solver`` on our engine: exact answers, parity with torchdiffeq and scipy, orders,
gradients (implicit function theorem, backprop, finite differences) and the errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchdiffeq
from scipy.integrate import solve_ivp

import solvers.events
from solvers import (
    MaxStepsExceededError,
    SolverError,
    SolverInputError,
    SolverStats,
    odeint,
    odeint_adjoint,
    odeint_event,
)
from solvers.adams import MAX_ORDER, bashforth

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
ONE = torch.ones(1, dtype=F64)
G = 9.81
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
#: Our event methods, with torchdiffeq's options giving the same interpolant: its fixed-step
#: solvers bisect on a linear interpolant unless interp='cubic' (ours: cubic Hermite).
EVENT_METHODS = {"dopri5": ({}, {}),
                 "rk4": ({"step_size": 0.05}, {"step_size": 0.05, "interp": "cubic"}),
                 "implicit_adams": ({"step_size": 0.05}, {"step_size": 0.05, "interp": "cubic"})}
#: Methods whose steps are torchdiffeq's (fixed grids), so that results agree to rounding.
SAME_STEPS = ("rk4", "implicit_adams")
ADAMS = ["explicit_adams", "implicit_adams", "fixed_adams"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _decay(t, y):
    return -y


def _half(t, y):
    return y - 0.5


class _Field(torch.nn.Module):
    """A rotation, damped and bent by a small tanh layer: smooth, with parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 2).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.3)

    def forward(self, t, y):
        return torch.stack([y[..., 1], -y[..., 0]], -1) + torch.tanh(self.lin(y))


class _Recording(torch.nn.Module):
    """A field (``forward`` in subclasses) that records the start of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[float] = []

    def callback_step(self, t0, y0, dt):
        self.starts.append(float(t0))


def _field_error(method: str, h: float, **options) -> float:
    """Max error on [0, 2] of y' = A y + sin(3t) with fixed step h (float64)."""
    f = lambda t, y: y @ A.T + torch.sin(3 * t)  # noqa: E731
    y0, t = torch.tensor([1.0, 0.5], dtype=F64), torch.linspace(0, 2, 5, dtype=F64)
    truth = odeint(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
    y = odeint(f, y0, t, method=method, options={"step_size": h, **options})
    return float((y - truth).abs().max())


# ---- events: exact answers ------------------------------------------------------------------

@pytest.mark.parametrize("method", list(EVENT_METHODS))
def test_decay_to_one_half_takes_ln2(method):
    event_t, ys = odeint(_decay, ONE, T01, event_fn=_half, method=method,
                         options=EVENT_METHODS[method][0] or None)
    assert event_t.shape == () and ys.shape == (2, 1)
    assert float(event_t) == pytest.approx(math.log(2), abs=1e-7)
    assert float(ys[0]) == 1.0 and float(ys[1]) == pytest.approx(0.5, abs=1e-7)


def test_a_falling_ball_with_a_tuple_state_lands_at_sqrt_2h_over_g():
    # (height, velocity) as a tuple; d(landing time)/d(height) = 1/sqrt(2 g h)
    h0 = torch.tensor([10.0], dtype=F64, requires_grad=True)
    event_t, (x, v) = odeint_event(lambda t, y: (y[1], -G * torch.ones_like(y[1])),
                                   (h0, torch.zeros(1, dtype=F64)), torch.tensor(0.0, dtype=F64),
                                   event_fn=lambda t, y: y[0].sum())
    landing = math.sqrt(2 * 10.0 / G)
    assert float(event_t.detach()) == pytest.approx(landing, abs=1e-8)
    assert x.shape == v.shape == (2, 1) and abs(float(x[1].detach())) < 1e-7
    assert float(v[1].detach()) == pytest.approx(-G * landing, abs=1e-6)
    (grad,) = torch.autograd.grad(event_t, h0)
    assert float(grad) == pytest.approx(1 / math.sqrt(2 * G * 10.0), rel=1e-6)


def test_the_first_entry_of_a_multivariate_event_to_cross_ends_the_solve():
    # y = (e^-t, e^-3t): 0.2 is reached by the second entry at ln(5)/3, before ln 2 and 5
    def g(t, y):
        return torch.stack([y[0] - 0.5, 0.2 - y[1], t - 5.0])  # of both signs at t0

    f = lambda t, y: y * torch.tensor([-1.0, -3.0], dtype=F64)  # noqa: E731
    y0 = torch.ones(2, dtype=F64)
    event_t, ys = odeint(f, y0, T01, event_fn=g, rtol=1e-10, atol=1e-10)
    ref_t, ref = torchdiffeq.odeint(f, y0, T01, event_fn=g, rtol=1e-10, atol=1e-10)
    assert float(event_t) == pytest.approx(math.log(5) / 3, abs=1e-9)
    assert float(ys[1, 1]) == pytest.approx(0.2, abs=1e-9)
    assert abs(float(event_t - ref_t)) < 1e-9 and float((ys - ref).abs().max()) < 1e-9


@pytest.mark.parametrize("method", list(EVENT_METHODS))
def test_reverse_time_finds_the_event_in_the_past(method):
    # y' = y from y(0) = 1 backward: y = 0.5 at t = -ln 2
    ours, theirs = EVENT_METHODS[method]
    kw = {"event_fn": _half, "reverse_time": True, "method": method}
    event_t, ys = odeint_event(lambda t, y: y, ONE, torch.tensor(0.0, dtype=F64), **kw,
                               options=ours or None)
    ref_t, ref = torchdiffeq.odeint_event(lambda t, y: y, ONE, torch.tensor(0.0, dtype=F64),
                                          **kw, options=theirs or None)
    assert float(event_t) == pytest.approx(-math.log(2), abs=1e-7)
    assert abs(float(event_t - ref_t)) < 1e-7 and float((ys - ref).abs().max()) < 1e-7


@pytest.mark.parametrize("method", list(EVENT_METHODS))
def test_an_event_zero_at_the_start_ends_the_solve_there(method):
    # (torchdiffeq's fixed-step solvers never stop here: its combined event stays 0)
    event_t, ys = odeint(_decay, ONE, T01, event_fn=lambda t, y: y - 1.0, method=method,
                         options=EVENT_METHODS[method][0] or None)
    assert float(event_t) == 0.0 and torch.equal(ys, torch.ones(2, 1, dtype=F64))


def test_jump_t_in_event_mode_steps_onto_the_jump_as_torchdiffeq():
    # y' = 1 before t = 0.5, 3 after: y = 1 at t = 0.5 + 0.5 / 3
    class Jump(_Recording):
        def forward(self, t, y):
            return torch.where(t < 0.5, 1.0, 3.0) * torch.ones_like(y)

    kw = {"event_fn": lambda t, y: y - 1.0, "options": {"jump_t": torch.tensor([0.5])}}
    ours, theirs = Jump(), Jump()
    event_t, _ = odeint(ours, torch.zeros(1, dtype=F64), T01, **kw)
    ref_t, _ = torchdiffeq.odeint(theirs, torch.zeros(1, dtype=F64), T01, **kw)
    assert float(event_t) == pytest.approx(0.5 + 0.5 / 3, abs=1e-8)
    assert 0.5 in ours.starts and ours.starts == pytest.approx(theirs.starts, abs=1e-12)
    assert abs(float(event_t - ref_t)) < 1e-12


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_the_event_time_of_an_autonomous_field_moves_with_t0(interface):
    t0 = torch.tensor(0.3, dtype=F64, requires_grad=True)
    event_t, _ = odeint_event(_Field(), torch.tensor([1.0, 0.2], dtype=F64), t0,
                              event_fn=lambda t, y: y[0] + 0.3, odeint_interface=interface,
                              rtol=1e-10, atol=1e-10)
    assert float(torch.autograd.grad(event_t, t0)[0]) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("method", list(EVENT_METHODS))
def test_a_float32_state_keeps_its_dtype_in_event_mode(method):
    event_t, ys = odeint_event(_decay, torch.ones(1), torch.tensor(0.0), event_fn=_half,
                               method=method, options=EVENT_METHODS[method][0] or None)
    assert event_t.dtype == ys.dtype == torch.float32
    assert float(event_t) == pytest.approx(math.log(2), abs=1e-6)


# ---- events: parity with torchdiffeq -------------------------------------------------------

@pytest.mark.parametrize("method,tol,agree", [("dopri5", 1e-10, 1e-10), ("rk4", 1e-9, 1e-13)])
def test_odeint_event_matches_torchdiffeq(method, tol, agree):
    # dopri5: torchdiffeq's embedded error estimate (Shampine's) is not ours, so the steps
    # differ and the times agree to the tolerance; rk4: the same steps and interpolant
    ours, theirs = EVENT_METHODS[method]
    y0, t0 = torch.tensor([1.0, 0.2], dtype=F64), torch.tensor(0.0, dtype=F64)
    g = lambda t, y: y[0] + 0.3  # noqa: E731
    with torch.no_grad():
        event_t, ys = odeint_event(_Field(), y0, t0, event_fn=g, method=method, rtol=tol,
                                   atol=tol, options=ours or None)
        ref_t, ref = torchdiffeq.odeint_event(_Field(), y0, t0, event_fn=g, method=method,
                                              rtol=tol, atol=tol, options=theirs or None)
    assert 1.5 < float(event_t) < 2.5 and event_t.dtype == ref_t.dtype == F64
    assert abs(float(event_t - ref_t)) < agree and float((ys - ref).abs().max()) < agree


def test_fixed_step_events_bisect_a_cubic_not_torchdiffeqs_linear_interpolant():
    exact = math.log(2)
    ours, _ = odeint(_decay, ONE, T01, event_fn=_half, method="rk4",
                     options={"step_size": 0.1})
    linear, _ = torchdiffeq.odeint(_decay, ONE, T01, event_fn=_half, method="rk4",
                                   options={"step_size": 0.1})
    assert abs(float(ours) - exact) < 1e-6 < 1e-4 < abs(float(linear) - exact)


def test_a_fixed_step_event_solve_steps_on_the_grid_and_calls_callback_step():
    class Decay(_Recording):
        def forward(self, t, y):
            return -y

    f, stats = Decay(), SolverStats()
    odeint(f, ONE, T01, event_fn=_half, method="rk4", options={"step_size": 0.05}, stats=stats)
    steps = math.ceil(math.log(2) / 0.05)  # the event is in the last of them
    assert f.starts == pytest.approx([0.05 * k for k in range(steps)])
    assert stats.n_accepted == steps and stats.nfe == 1 + 4 * steps  # f0, 3 stages, f1


@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("method", ADAMS)
def test_adams_events_match_torchdiffeqs(method, interp):
    # the same grid, the same Adams steps and the same interpolant: equal to rounding
    y0, t0 = torch.tensor([1.0, 0.2], dtype=F64), torch.tensor(0.0, dtype=F64)
    g = lambda t, y: y[0] + 0.3  # noqa: E731
    options = {"step_size": 0.05, "interp": interp}
    with torch.no_grad():
        event_t, ys = odeint_event(_Field(), y0, t0, event_fn=g, method=method,
                                   options=options)
        ref_t, ref = torchdiffeq.odeint_event(_Field(), y0, t0, event_fn=g, method=method,
                                              options=options)
    # explicit_adams' order-11 Bashforth steps are unstable here and amplify rounding
    agree = 1e-10 if method == "explicit_adams" else 1e-12
    assert 1.5 < float(event_t) < 2.5
    assert abs(float(event_t - ref_t)) < agree and float((ys - ref).abs().max()) < agree


def _ln2_error(method: str, h: float) -> float:
    event_t, _ = odeint(_decay, ONE, T01, event_fn=_half, method=method,
                        options={"step_size": h}, atol=1e-14)
    return abs(float(event_t) - math.log(2))


@pytest.mark.parametrize("method,order", [("implicit_euler", 1), ("implicit_midpoint", 2),
                                          ("sdirk2", 2)])
def test_implicit_method_events_converge_to_ln2_at_the_methods_order(method, order):
    # torchdiffeq 0.2.5 has no implicit methods: the exact answer is the reference
    ratio = _ln2_error(method, 0.1) / _ln2_error(method, 0.05)
    assert math.log2(ratio) == pytest.approx(order, abs=0.1)


@pytest.mark.parametrize("method", ["gl4", "gl6", "radauIIA5"])
def test_high_order_implicit_events_are_as_accurate_as_the_cubic_interpolant(method):
    # the cubic Hermite between grid points bounds the event time's error (h^4 / 384 times
    # the fourth derivative: 1.3e-7 at h = 0.1), not the method's order
    assert _ln2_error(method, 0.05) < _ln2_error(method, 0.1) < 1e-7


# ---- events: gradients ----------------------------------------------------------------------

def _event_loss(y0: torch.Tensor, net: torch.nn.Module, interface, backend, method: str,
                tol: float, reverse: bool = False) -> torch.Tensor:
    options = EVENT_METHODS[method][0 if backend is not torchdiffeq else 1] or None
    event_t, ys = backend.odeint_event(net, y0, torch.tensor(0.0, dtype=F64),
                                       event_fn=lambda t, y: y[0] + 0.3 - 0.02 * t,
                                       reverse_time=reverse, odeint_interface=interface,
                                       method=method, rtol=tol, atol=tol, options=options)
    return event_t + (ys[-1] ** 2).sum()


@pytest.mark.parametrize("method,adjoint,reverse", [
    ("dopri5", False, False), ("dopri5", True, False), ("rk4", False, False),
    ("rk4", True, False), ("dopri5", False, True), ("implicit_adams", False, False),
    ("implicit_adams", True, False)])
def test_event_time_gradients_match_finite_differences_and_torchdiffeq(method, adjoint,
                                                                       reverse):
    net, y0 = _Field(), torch.tensor([1.0, 0.2], dtype=F64)
    if reverse:
        y0 = torch.tensor([-0.2, 1.0], dtype=F64)  # y[0] reaches -0.3 going backward
    params = list(net.parameters())

    def grads(backend, interface) -> list[torch.Tensor]:
        y = y0.clone().requires_grad_(True)
        loss = _event_loss(y, net, interface, backend, method, 1e-10, reverse)
        return list(torch.autograd.grad(loss, (y, *params)))

    ours = grads(solvers, odeint_adjoint if adjoint else odeint)
    theirs = grads(torchdiffeq, torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint)
    # the adjoint's backward Adams solve from the event time ends in a shorter step, which
    # torchdiffeq takes with its equal-step weights (ours restarts there): off by 1e-4
    uneven = adjoint and method == "implicit_adams"
    tight = method in SAME_STEPS and not uneven
    for g, r in zip(ours, theirs):
        assert torch.allclose(g, r, rtol=1e-9 if tight else 0 if uneven else 1e-6,
                              atol=1e-10 if tight else 1e-3 if uneven else 1e-7)

    def loss_at(y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(_event_loss(y, net, odeint, solvers, method, 1e-12, reverse))

    eps = 1e-5
    for i in range(2):
        e = eps * torch.eye(2, dtype=F64)[i]
        fd = (loss_at(y0 + e) - loss_at(y0 - e)) / (2 * eps)
        assert float(ours[0][i]) == pytest.approx(fd, rel=1e-5, abs=1e-6)
    bias = params[1]
    with torch.no_grad():
        bias[0] += eps
        up = loss_at(y0)
        bias[0] -= 2 * eps
        down = loss_at(y0)
        bias[0] += eps
    assert float(ours[2][0]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-6)


def test_an_event_function_of_time_alone_gives_no_state_gradient():
    y0 = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    event_t, ys = odeint_event(lambda t, y: torch.stack([y[1], -y[0]]), y0,
                               torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: t - 1.0)
    assert float(event_t.detach()) == pytest.approx(1.0, abs=1e-8)
    assert float(torch.autograd.grad(event_t, y0, retain_graph=True)[0].abs().max()) == 0.0
    (grad,) = torch.autograd.grad(ys[-1, 0], y0)  # y[0](1) = sin 1 + y0[0] cos 1 ...
    assert grad.tolist() == pytest.approx([math.cos(1.0), math.sin(1.0)], abs=1e-7)


# ---- events: errors -------------------------------------------------------------------------

@pytest.mark.parametrize("t", [torch.tensor([0.0, 1.0, 2.0]), torch.tensor(0.0), [0.0, 1.0]])
def test_event_mode_needs_t0_and_t1(t):
    with pytest.raises(SolverInputError, match=r"t must be \[t0, t1\].*odeint_event"):
        odeint(_decay, torch.ones(1), t, event_fn=_half)


def test_scipy_solver_refuses_events_as_torchdiffeqs():
    with pytest.raises(SolverInputError, match="event_fn is not supported by method "
                                               "'scipy_solver'.*dopri5"):
        odeint(_decay, ONE, T01, event_fn=_half, method="scipy_solver")


@pytest.mark.parametrize("method", ["rk4", "implicit_adams", "gl4"])
def test_a_fixed_step_event_needs_step_size(method):
    with pytest.raises(SolverInputError, match=f"'{method}' needs options=\\{{'step_size'"):
        odeint(_decay, ONE, T01, event_fn=_half, method=method)


def test_an_event_that_never_comes_exceeds_the_step_limits(monkeypatch):
    never = lambda t, y: y + 1.0  # noqa: E731
    with pytest.raises(MaxStepsExceededError, match="max_num_steps=20"):
        odeint(_decay, ONE, T01, event_fn=never, options={"max_num_steps": 20})
    monkeypatch.setattr(solvers.events, "MAX_FIXED_EVENT_STEPS", 30)
    stats = SolverStats()
    with pytest.raises(MaxStepsExceededError, match="max_num_steps=30 exceeded at t=3\\b") \
            as err:
        odeint(_decay, ONE, T01, event_fn=never, method="rk4", options={"step_size": 0.1},
               stats=stats)
    assert stats.n_accepted == 31
    # the advice fits a fixed-step solve (which has no max_num_steps option)
    assert "larger step_size" in str(err.value) and "options={" not in str(err.value)


# ---- Adams methods --------------------------------------------------------------------------

@pytest.mark.parametrize("method,options,order,h", [
    ("explicit_adams", {"max_order": 5}, 4, 1 / 32),  # Bashforth of order 4
    ("implicit_adams", {"max_order": 4, "max_iters": 20}, 4, 1 / 32),  # 3 + Moulton 4
    ("fixed_adams", {"max_order": 5, "max_iters": 20}, 5, 1 / 16)])  # 4 + Moulton 5
def test_adams_methods_converge_at_their_order(method, options, order, h):
    ratio = _field_error(method, h, **options) / _field_error(method, h / 2, **options)
    assert math.log2(ratio) == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("options", [{"step_size": 1 / 16}, {"step_size": 0.1, "max_iters": 1},
                                     {"step_size": 0.05, "max_order": 6, "perturb": True}])
@pytest.mark.parametrize("method", ADAMS)
def test_adams_methods_match_torchdiffeq(method, options):
    # max_iters=1: the corrector never converges, so both warn and drop a derivative each
    # step; t decreasing in the last case. Agreement is to rounding (the Runge-Kutta start
    # rounds differently), which explicit_adams of order 11 amplifies: it is unstable here.
    net = _Field()
    f = lambda t, y: net(t, y) + torch.sin(3 * t)  # noqa: E731
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 2, 5, dtype=F64)
    if "perturb" in options:
        t = -t
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = odeint(f, y0, t, method=method, options=options)
        n_ours = len(caught)
        ref = torchdiffeq.odeint(f, y0, t, method=method, options=options)
    assert n_ours == len(caught) - n_ours
    assert float((ours - ref).abs().max()) < 1e-11 * float(ref.abs().max())


@pytest.mark.parametrize("method", ADAMS)
def test_an_uneven_step_restarts_the_adams_history_where_torchdiffeq_loses_accuracy(method):
    net = _Field()
    y0 = torch.tensor([1.0, 0.2], dtype=F64)
    with torch.no_grad():
        for t1, better in ((1.5, False), (1.52, True)):  # 0.05 divides 1.5, not 1.52
            t = torch.tensor([0.0, t1], dtype=F64)
            truth = odeint(net, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)[-1]
            options = {"step_size": 0.05, "max_order": 5}  # 12 is unstable for Bashforth
            ours = odeint(net, y0, t, method=method, options=options)[-1]
            ref = torchdiffeq.odeint(net, y0, t, method=method, options=options)[-1]
            err, err_ref = (float((y - truth).abs().max()) for y in (ours, ref))
            assert err < 1e-5  # order 4 (Bashforth) or 5 (Moulton) at h = 0.05
            if better:  # ours takes the last, shorter step as a Runge-Kutta step
                assert err_ref > 20 * err
            else:
                assert abs(err - err_ref) < 1e-12


@pytest.mark.parametrize("method", ADAMS)
def test_gradients_through_adams_match_finite_differences_and_torchdiffeq(method):
    net, y0 = _Field(), torch.tensor([1.0, 0.2], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    options = {"step_size": 1 / 16, "max_order": 6}

    def loss(backend, y: torch.Tensor) -> torch.Tensor:
        return (backend.odeint(net, y, t, method=method, options=options) ** 2).sum()

    y = y0.clone().requires_grad_(True)
    ours = torch.autograd.grad(loss(solvers, y), (y, *net.parameters()))
    theirs = torch.autograd.grad(loss(torchdiffeq, y), (y, *net.parameters()))
    for g, r in zip(ours, theirs):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-13)
    eps = 1e-6
    with torch.no_grad():
        fd = [(loss(solvers, y0 + e) - loss(solvers, y0 - e)) / (2 * eps)
              for e in eps * torch.eye(2, dtype=F64)]
    assert torch.allclose(ours[0], torch.stack(fd), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("options,match", [
    ({"max_order": 13}, "max_order.*at most 12"), ({"max_order": 0}, "max_order"),
    ({"max_order": 4.0}, "max_order"), ({"max_order": True}, "max_order"),
    ({"max_iters": 0}, "max_iters"), ({"max_iters": 2.5}, "max_iters")])
def test_bad_adams_options_are_refused(options, match):
    with pytest.raises(SolverInputError, match=match):
        odeint(_decay, ONE, T01, method="implicit_adams", options={"step_size": 0.1, **options})


@pytest.mark.parametrize("method", ADAMS)
def test_a_max_order_below_4_warns_and_steps_with_rk4(method):
    y0, t = torch.tensor([1.0, 0.5], dtype=F64), torch.linspace(0, 1, 11, dtype=F64)
    f = lambda t, y: y @ A.T  # noqa: E731
    with pytest.warns(UserWarning, match="reduces to `rk4`"):
        ys = odeint(f, y0, t, method=method, options={"max_order": 3})
    assert float((ys - odeint(f, y0, t, method="rk4")).abs().max()) < 1e-14


# ---- scipy_solver ---------------------------------------------------------------------------

#: torchdiffeq passes min_step=0 to solve_ivp, which warns for RK45 that it has no effect.
IGNORE_MIN_STEP = pytest.mark.filterwarnings("ignore:The following arguments have no effect")


@IGNORE_MIN_STEP
@pytest.mark.parametrize("solver", ["RK45", "LSODA"])
def test_scipy_solver_is_solve_ivp_and_matches_torchdiffeq(solver):
    y0, t = torch.tensor([1.0, 0.5], dtype=F64), torch.linspace(0, 2, 5, dtype=F64)
    f = lambda t, y: y @ A.T + torch.sin(3 * t)  # noqa: E731
    kw = {"method": "scipy_solver", "options": {"solver": solver}, "rtol": 1e-8, "atol": 1e-10}
    ys, ref = odeint(f, y0, t, **kw), torchdiffeq.odeint(f, y0, t, **kw)
    direct = solve_ivp(lambda s, v: v @ A.numpy().T + np.sin(3 * s), (0.0, 2.0), y0.numpy(),
                       method=solver, t_eval=t.numpy(), rtol=1e-8, atol=1e-10)
    assert np.abs(ys.numpy() - direct.y.T).max() < 1e-12
    # (torchdiffeq's LSODA takes a first step 2e-8 relatively different: it agrees to 6e-8)
    assert float((ys - ref).abs().max()) < (1e-12 if solver == "RK45" else 1e-6)


def test_scipy_solver_passes_max_step_and_reverses_time():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    f = lambda t, y: y @ A.T  # noqa: E731
    loose, tight = SolverStats(), SolverStats()
    t = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    ys = odeint(f, y0, t, method="scipy_solver", options={"solver": "RK45"}, stats=loose)
    odeint(f, y0, t, method="scipy_solver", options={"solver": "RK45", "max_step": 0.01},
           stats=tight)
    assert tight.nfe > 6 * 200 > loose.nfe
    exact = torch.stack([torch.linalg.matrix_exp(A * float(s - 1)) @ y0 for s in t])
    assert float((ys - exact).abs().max()) < 1e-5


def test_scipy_solver_has_no_gradients_and_says_so():
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -y, y0, T01, method="scipy_solver")
    with pytest.raises(SolverInputError, match="'scipy_solver' has no gradients.*dopri5"):
        ys.sum().backward()
    ys = odeint(_Field(), y0.detach(), T01, method="scipy_solver")  # the field's parameters
    with pytest.raises(SolverInputError, match="no gradients"):
        ys.sum().backward()
    with torch.no_grad():
        assert not odeint(lambda t, y: -y, y0, T01, method="scipy_solver").requires_grad


def test_a_failed_scipy_solve_names_the_time_and_a_field_error_passes_unchanged():
    # y' = -y^2 from y(0) = 1 backward: y = 1 / (1 + t) blows up at t = -1
    with pytest.raises(SolverError, match=r"\(RK45\) failed at t=-1\b"):
        odeint(lambda t, y: -(y**2), ONE, torch.tensor([0.0, -2.0], dtype=F64),
               method="scipy_solver", options={"solver": "RK45"})

    def broken(t, y):
        raise ValueError("the field's own bug")

    with pytest.raises(ValueError, match="^the field's own bug$") as info:
        odeint(broken, ONE, T01, method="scipy_solver")
    assert not isinstance(info.value, SolverError)
    with pytest.raises(SolverInputError, match="scipy_solver: `max_step` must be positive"):
        odeint(_decay, ONE, T01, method="scipy_solver", options={"max_step": -1.0})


@IGNORE_MIN_STEP
def test_scipy_solver_keeps_a_float32_dtype_and_a_tuple_structure():
    t = torch.linspace(0, 1, 3)
    y0 = (torch.ones(2), torch.zeros(()))
    f = lambda t, y: (-y[0], y[0].sum())  # noqa: E731
    kw = {"method": "scipy_solver", "options": {"solver": "RK45"}}
    xs, s = odeint(f, y0, t, **kw)
    rx, rs = torchdiffeq.odeint(f, y0, t, **kw)
    assert xs.dtype == s.dtype == torch.float32 and xs.shape == (3, 2) and s.shape == (3,)
    assert torch.allclose(xs[-1], torch.full((2,), math.exp(-1)), atol=1e-5)
    assert float((xs - rx).abs().max()) < 1e-6 and float((s - rs).abs().max()) < 1e-6


def _ab_stability_boundary(k: int) -> float:
    """The left end of Adams-Bashforth-k's real stability interval [z*, 0]: the first z < 0
    at which a root of zeta^k - zeta^(k-1) - z sum_j b_j zeta^(k-1-j) leaves the unit disc
    (bisection between a stable and an unstable z)."""
    b = bashforth(k)

    def stable(z: float) -> bool:
        coeffs = [1.0, -1.0 - z * b[0], *(-z * bj for bj in b[1:])]
        return bool(np.max(np.abs(np.roots(coeffs))) <= 1.0 + 1e-12)

    lo, hi = -3.0, -1e-9  # unstable, stable
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if stable(mid) else (mid, hi)
    return hi


def test_adams_bashforth_weights_have_the_textbook_stability_intervals() -> None:
    """AB1-AB4: [-2, 0], [-1, 0], [-6/11, 0], [-3/10, 0] (Hairer-Wanner II, section V.1); the
    interval then shrinks so fast that explicit_adams at its default max_order (12, as
    torchdiffeq's: Adams-Bashforth of order 11) is stable only for h * |lambda| below 0.0034."""
    for k, edge in ((1, -2.0), (2, -1.0), (3, -6.0 / 11.0), (4, -0.3)):
        assert _ab_stability_boundary(k) == pytest.approx(edge, abs=1e-6)
    edges = [_ab_stability_boundary(k) for k in range(4, MAX_ORDER)]
    assert all(a < b for a, b in zip(edges, edges[1:]))
    assert -0.0035 < edges[-1] < -0.0033
