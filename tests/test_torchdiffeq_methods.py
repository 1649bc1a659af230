"""torchdiffeq's method names on our engine: parity with torchdiffeq, convergence orders, the
implicit methods' Newton solve and gradients, and the 0-dim state and float64-time fixes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from solvers import (
    METHODS,
    SolverError,
    SolverInputError,
    SolverStats,
    get_tableau,
    odeint,
    odeint_adjoint,
)
from solvers.implicit import IMPLICIT_METHODS, MAX_UNKNOWNS, NewtonConvergenceError
from solvers.integrate import StepControl, integrate_adaptive, integrate_fixed
from solvers.tableau import ButcherTableau, order_residual

F64 = torch.float64
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
#: torchdiffeq's methods that are not Runge-Kutta methods (multistep, scipy).
NOT_RUNGE_KUTTA = {"explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver"}
NEW_FIXED = ["heun2", "heun3", "rk4"]
NEW_ADAPTIVE = ["fehlberg2", "dopri8"]
IMPLICIT = list(IMPLICIT_METHODS)
L_STABLE = ["implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 2)).double()


def _fields() -> dict:
    """A linear system and a non-autonomous MLP field (so that the nodes c matter)."""
    net = _mlp()
    return {"linear": lambda t, y: y @ A.T, "mlp": lambda t, y: net(y) + torch.sin(3 * t)}


def _scalar_error(method: str, h: float) -> float:
    """Error at t=1 of y' = -y + sin(3t), y(0) = 1, with fixed step h (float64)."""
    y = odeint(lambda t, y: -y + torch.sin(3 * t), torch.ones(1, dtype=F64),
               torch.tensor([0.0, 1.0], dtype=F64), method=method, options={"step_size": h})
    exact = 1.3 * math.exp(-1.0) + (math.sin(3.0) - 3 * math.cos(3.0)) / 10
    return abs(float(y[-1, 0]) - exact)


# ---- names ----------------------------------------------------------------------------------

def test_every_torchdiffeq_runge_kutta_name_is_ours_with_its_kind():
    for name, solver in TORCHDIFFEQ_SOLVERS.items():
        if name in NOT_RUNGE_KUTTA:
            continue
        assert name in METHODS, name
        assert get_tableau(name).adaptive == (not issubclass(solver, FixedGridODESolver)), name


def test_implicit_names_are_found_and_fixed_step():
    for name in IMPLICIT:
        tab = get_tableau(name)
        assert tab is IMPLICIT_METHODS[name] and not tab.adaptive
        assert order_residual(tab.a, tab.b, tab.order) < 1e-12
        assert order_residual(tab.a, tab.b, tab.order + 1) > 1e-4  # not one order higher
    with pytest.raises(SolverInputError, match="implicit"):
        get_tableau("radau5")


# ---- explicit methods: parity with torchdiffeq ----------------------------------------------

@pytest.mark.parametrize("field", ["linear", "mlp"])
@pytest.mark.parametrize("method", ["euler", "midpoint", *NEW_FIXED])
def test_fixed_methods_match_torchdiffeq(method, field):
    f = _fields()[field]
    y0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 2, 41, dtype=F64)  # one step per output interval in both
    with torch.no_grad():
        ours = odeint(f, y0, t, method=method)
        ref = torchdiffeq.odeint(f, y0, t, method=method)
    assert float((ours - ref).abs().max()) < 1e-12


def test_rk4_is_torchdiffeqs_three_eighths_rule_and_rk4_classic_the_classic_method():
    f = _fields()["mlp"]
    y0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0, 2, 11, dtype=F64)
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, y0, t, method="rk4")
        rk4, rk38 = odeint(f, y0, t, method="rk4"), odeint(f, y0, t, method="rk38")
        classic = odeint(f, y0, t, method="rk4_classic")
        truth = odeint(f, y0, t, rtol=1e-12, atol=1e-12)
    assert torch.equal(rk4, rk38)
    assert float((rk4 - ref).abs().max()) < 1e-12
    assert float((classic - ref).abs().max()) > 1e-8  # another method ...
    assert float((classic - truth).abs().max()) < 1e-3  # ... of the same order
    assert _scalar_error("rk4_classic", 0.1) / _scalar_error("rk4_classic", 0.05) > 2**3.7


@pytest.mark.parametrize("tol", [1e-5, 1e-8])
@pytest.mark.parametrize("method", NEW_ADAPTIVE)
def test_adaptive_methods_match_torchdiffeq_with_the_same_steps(method, tol):
    f = _fields()["mlp"]
    y0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0, 2, 5, dtype=F64)
    ours, theirs = SolverStats(), SolverStats()
    with torch.no_grad():
        y = odeint(f, y0, t, method=method, rtol=tol, atol=tol, stats=ours)
        ref = odeint(f, y0, t, method=method, rtol=tol, atol=tol, stats=theirs,
                     backend="torchdiffeq")
        truth = odeint(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
    # the same step attempts: f0, the initial-step probe, then the stages of every attempt
    # (fehlberg2: 3 here, 2 in torchdiffeq, which reuses f at its order-1 solution)
    new_stages = {"fehlberg2": (3, 2), "dopri8": (13, 13)}[method]
    assert (ours.nfe - 2) / new_stages[0] == (theirs.nfe - 2) / new_stages[1]
    allowed = 20 * tol + float((ref - truth).abs().max())
    assert float((y - ref).abs().max()) <= allowed
    assert float((y - truth).abs().max()) <= 2 * float((ref - truth).abs().max()) + 20 * tol


@pytest.mark.parametrize("method", [*NEW_FIXED, *NEW_ADAPTIVE])
def test_gradients_through_the_solver_match_torchdiffeq(method):
    net = _mlp(4)
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0, 1, 11, dtype=F64)

    def grads(method: str, tol: float, backend: str) -> list[torch.Tensor]:
        y0_ = y0.clone().requires_grad_(True)
        ys = odeint(lambda t, y: net(y), y0_, t, method=method, rtol=tol, atol=tol,
                    backend=backend)
        return list(torch.autograd.grad((ys**2).sum(), (y0_, *net.parameters())))

    ours, theirs = grads(method, 1e-8, "ocnode"), grads(method, 1e-8, "torchdiffeq")
    if not get_tableau(method).adaptive:  # the same steps: equal to rounding
        for g, r in zip(ours, theirs):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
        return
    # the same steps, different dense output: agree within torchdiffeq's own error
    truth = grads("dopri8", 1e-12, "ocnode")
    theirs_error = max(float((r - g).abs().max()) for r, g in zip(theirs, truth))
    for g, r, x in zip(ours, theirs, truth):
        assert float((g - r).abs().max()) <= 1.5 * theirs_error
        assert float((g - x).abs().max()) <= theirs_error


# ---- explicit methods: orders and dense output ----------------------------------------------

@pytest.mark.parametrize("method,h", [("heun2", 0.02), ("heun3", 0.04), ("rk4", 0.1),
                                      ("rk4_classic", 0.1)])
def test_new_fixed_methods_converge_at_their_order(method, h):
    ratio = _scalar_error(method, h) / _scalar_error(method, h / 2)
    assert math.log2(ratio) == pytest.approx(get_tableau(method).order, abs=0.3)


def _fixed_error(tab: ButcherTableau, h: float) -> float:
    out: dict[int, torch.Tensor] = {}
    integrate_fixed(lambda t, y: -y + math.sin(3 * t), torch.ones(1, dtype=F64), [0.0, 1.0],
                    lambda j, t, y: out.__setitem__(j, y), tab, h)
    exact = 1.3 * math.exp(-1.0) + (math.sin(3.0) - 3 * math.cos(3.0)) / 10
    return abs(float(out[1][0]) - exact)


def test_dopri8_propagates_order_8_and_embeds_order_7():
    tab = get_tableau("dopri8")
    b_hat = tab.b - tab.b_err
    embedded = ButcherTableau("dopri8-hat", c=tab.c, a=tab.a, b=b_hat, order=7,
                              dense=np.outer(b_hat, [1.0]))
    for t, order in ((tab, 8), (embedded, 7)):
        ratio = _fixed_error(t, 1 / 3) / _fixed_error(t, 1 / 6)  # above round-off
        assert math.log2(ratio) == pytest.approx(order, abs=0.6)


def test_fehlberg2_propagates_order_2_and_embeds_order_1():
    tab = get_tableau("fehlberg2")
    assert math.log2(_fixed_error(tab, 0.02) / _fixed_error(tab, 0.01)) == pytest.approx(
        2, abs=0.3)
    b_hat = tab.b - tab.b_err
    assert order_residual(tab.a, b_hat, 1) < 1e-15 < 1e-3 < order_residual(tab.a, b_hat, 2)
    assert tab.fsal and tab.stages == 4


def test_dopri8_dense_output_is_order_5_inside_a_step():
    # local interpolation error at theta = 0.4 of one step of size h scales as h^6
    tab = get_tableau("dopri8")
    assert max(order_residual(tab.a, tab.dense_weights(th), 5, th)
               for th in (0.2, 0.5, 0.9)) < 1e-12
    hs, errs = [0.2, 0.1, 0.05], []
    for h in hs:
        out: dict[int, torch.Tensor] = {}
        y0 = torch.tensor([1.0], dtype=F64)
        integrate_adaptive(lambda t, y: torch.cos(3 * t + y), y0, [0.0, 0.4 * h],
                           lambda j, t, y, out=out: out.__setitem__(j, y), tab,
                           StepControl(rtol=1.0, atol=1.0, first_step=h))
        ref = odeint(lambda t, y: torch.cos(3 * t + y), y0,
                     torch.tensor([0.0, 0.4 * h], dtype=F64), method="dopri8", rtol=1e-14,
                     atol=1e-14)
        errs.append(abs(float(out[1] - ref[1])))
    assert float(np.polyfit(np.log(hs), np.log(errs), 1)[0]) >= 5.5


def test_dopri8_outputs_between_steps_are_as_accurate_as_its_steps():
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    t = torch.linspace(0, 3, 61, dtype=F64)  # about 3 outputs inside every step
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(A * float(ti)).T for ti in t])
    stats = SolverStats()
    y = odeint(lambda t, y: y @ A.T, y0, t, method="dopri8", rtol=1e-10, atol=1e-10,
               stats=stats)
    end = odeint(lambda t, y: y @ A.T, y0, t[[0, -1]], method="dopri8", rtol=1e-10,
                 atol=1e-10)
    theirs = torchdiffeq.odeint(lambda t, y: y @ A.T, y0, t, method="dopri8", rtol=1e-10,
                                atol=1e-10)
    assert stats.n_accepted < 30  # so that most outputs fall inside steps
    interior = float((y - exact).abs().max())
    assert interior <= 3 * float((end[-1] - exact[-1]).abs().max())
    assert interior <= 0.1 * float((theirs - exact).abs().max())


# ---- implicit methods -------------------------------------------------------------------------

def _linear_reference(method: str, M: torch.Tensor, y0: torch.Tensor, h: float,
                      steps: int) -> torch.Tensor:
    """The Runge-Kutta map of y' = M y in closed form: K = (I - h a (x) M)^-1 (1 (x) M y)."""
    tab = IMPLICIT_METHODS[method]
    s, n = tab.stages, y0.numel()
    a, b = torch.as_tensor(tab.a, dtype=F64), torch.as_tensor(tab.b, dtype=F64)
    system = torch.eye(s * n, dtype=F64) - h * torch.kron(a, M)
    y = y0
    for _ in range(steps):
        ks = torch.linalg.solve(system, (M @ y).repeat(s)).view(s, n)
        y = y + h * (b @ ks)
    return y


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_methods_and_their_gradients_match_the_exact_linear_map(method):
    M = torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: M @ y, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                options={"step_size": 0.1})
    ref = _linear_reference(method, M, y0, 0.1, 10)
    assert float((ys[-1] - ref).detach().abs().max()) < 1e-12
    ours = torch.autograd.grad((ys[-1] ** 2).sum(), (M, y0))
    exact = torch.autograd.grad((ref**2).sum(), (M, y0))
    for g, r in zip(ours, exact):
        assert float((g - r).abs().max()) < 1e-10


def _fixed_point_reference(method: str, f, y0: torch.Tensor, t_grid: list[float],
                           iters: int = 40) -> torch.Tensor:
    """An independent implicit Runge-Kutta solve: stages by fixed-point iteration, with
    autograd through every iteration (it contracts by h*Lip(f)*|a| per iteration)."""
    tab = IMPLICIT_METHODS[method]
    y = y0
    for t0, t1 in zip(t_grid[:-1], t_grid[1:]):
        h = t1 - t0
        ks = [f(torch.tensor(t0, dtype=F64), y)] * tab.stages
        for _ in range(iters):
            ks = [f(torch.tensor(t0 + tab.c[i] * h, dtype=F64),
                    y + h * sum(float(tab.a[i, j]) * ks[j] for j in range(tab.stages)))
                  for i in range(tab.stages)]
        y = y + h * sum(float(tab.b[i]) * ks[i] for i in range(tab.stages))
    return y


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_methods_match_an_independent_solve_on_an_mlp_field(method):
    net = _mlp(5)

    def f(t, y):
        return net(y) + torch.sin(3 * t)

    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    y0.requires_grad_(True)
    grid = [0.05 * k for k in range(9)]
    ys = odeint(f, y0, torch.tensor([0.0, 0.4], dtype=F64), method=method,
                options={"step_size": 0.05})
    ref = _fixed_point_reference(method, f, y0, grid)
    assert float((ys[-1] - ref).detach().abs().max()) < 1e-10
    ours = torch.autograd.grad((ys[-1] ** 2).sum(), (y0, *net.parameters()))
    theirs = torch.autograd.grad((ref**2).sum(), (y0, *net.parameters()))
    for g, r in zip(ours, theirs):
        assert float((g - r).abs().max()) < 1e-9


# No parity test against torchdiffeq for the implicit methods: its released versions (0.2.5)
# have none. The exact linear map and an independent fixed-point solve are the references.


@pytest.mark.parametrize("method,h", [
    ("implicit_euler", 0.01), ("implicit_midpoint", 0.02), ("trapezoid", 0.02), ("gl4", 0.1),
    ("gl6", 0.25), ("radauIIA3", 0.05), ("radauIIA5", 0.2), ("sdirk2", 0.02),
    ("trbdf2", 0.02)])
def test_implicit_methods_converge_at_their_order(method, h):
    ratio = _scalar_error(method, h) / _scalar_error(method, h / 2)
    assert math.log2(ratio) == pytest.approx(IMPLICIT_METHODS[method].order, abs=0.3)


@pytest.mark.parametrize("method", [*L_STABLE, "trapezoid", "gl4"])
def test_l_stable_methods_damp_a_stiff_transient_in_one_large_step(method):
    # y' = -lam (y - cos t) from y = 0: a transient of time 1/lam, then the slow solution;
    # h = 0.1 is 1000 times explicit Euler's stability limit
    lam = 1e4
    t = torch.linspace(0, 1, 11, dtype=F64)
    ys = odeint(lambda t, y: -lam * (y - torch.cos(t)), torch.zeros(1, dtype=F64), t,
                method=method)
    slow = (lam**2 * torch.cos(t) + lam * torch.sin(t)) / (lam**2 + 1)
    after = float((ys[2:, 0] - slow[2:]).abs().max())
    if method in L_STABLE:
        assert after < 1e-4
    else:  # A-stable only: R(-inf) = -1 keeps the transient alive, sign flipping each step
        assert after > 0.5


def test_newton_failure_names_the_step():
    # y' = y^2 + 1 blows up at t = pi/4; from t = 0.3 a step of 0.5 has no real stage
    t = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.8], dtype=F64)
    with pytest.raises(NewtonConvergenceError, match=r"t=0\.3 \(dt=0\.5\)") as info:
        odeint(lambda t, y: y**2 + 1, torch.ones(1, dtype=F64), t, method="implicit_euler")
    assert isinstance(info.value, SolverError) and info.value.t == pytest.approx(0.3)


def test_implicit_max_iters_bounds_the_newton_iterations():
    # a nonlinear field: one Newton iteration cannot meet the stopping test, the default can
    t = torch.tensor([0.0, 0.5], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    field = lambda t, y: -y**3  # noqa: E731
    ref = odeint(field, y0, t, method="implicit_euler")
    same = odeint(field, y0, t, method="implicit_euler", options={"max_iters": 100})
    assert torch.equal(ref, same)
    with pytest.raises(NewtonConvergenceError, match=r"in 1 iterations"):
        odeint(field, y0, t, method="implicit_euler", options={"max_iters": 1})
    with pytest.raises(SolverInputError, match=r"max_iters"):
        odeint(field, y0, t, method="gl4", options={"max_iters": 0})


def test_decreasing_times_and_float32_states_work_with_implicit_methods():
    net = _mlp(7).float()
    y0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(7))
    t = torch.linspace(1, 0, 6)
    with torch.no_grad():
        y32 = odeint(lambda t, y: net(y), y0, t, method="radauIIA5")
        y64 = odeint(lambda t, y: net.double()(y), y0.double(), t.double(), method="radauIIA5")
    assert y32.dtype == torch.float32
    assert float((y32.double() - y64).abs().max()) < 1e-5


def test_non_differentiable_fields_get_a_finite_difference_jacobian():
    def smooth(t, y):
        return -(y**3) - y + torch.sin(t)

    t = torch.linspace(0, 1, 6, dtype=F64)
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    ref = odeint(smooth, y0, t, method="gl4")
    detached = odeint(lambda t, y: smooth(t, y.detach()), y0, t, method="gl4")
    assert float((detached - ref).abs().max()) < 1e-12
    w = torch.tensor(1.0, dtype=F64, requires_grad=True)  # a graph, but none to y
    scaled = odeint(lambda t, y: w * smooth(t, y.detach()), y0, t, method="gl4")
    assert float((scaled - ref).detach().abs().max()) < 1e-12


def test_too_large_a_stage_system_is_refused():
    with pytest.raises(SolverInputError, match="unknowns"):
        odeint(lambda t, y: -y, torch.zeros(MAX_UNKNOWNS + 1, dtype=F64),
               torch.tensor([0.0, 1.0], dtype=F64), method="implicit_euler")


def test_gauss_legendre_adjoint_gradients_equal_backpropagation():
    # Gauss methods are symplectic: the adjoint solved backward by the same method gives the
    # exact gradient of the discrete forward solve (Sanz-Serna 2016).
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(8)

        def forward(self, t, y):
            return self.net(y)

    func = Field()
    y0 = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    t = torch.linspace(0, 1, 3, dtype=F64)
    grads = []
    for solve in (odeint, odeint_adjoint):
        y0_ = y0.clone().requires_grad_(True)
        ys = solve(func, y0_, t, method="gl4", options={"step_size": 0.1})
        grads.append(torch.autograd.grad((ys**2).sum(), (y0_, *func.parameters())))
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) < 1e-10


# ---- bug 1: 0-dim states ----------------------------------------------------------------------

# dopri8: torchdiffeq's quartic interpolation is less accurate than its steps
@pytest.mark.parametrize("method,parity", [("dopri5", 1e-8), ("rk4", 1e-14), ("dopri8", 1e-6)])
def test_a_zero_dim_state_integrates_like_torchdiffeq(method, parity):
    y0, t = torch.tensor(1.0, dtype=F64), torch.linspace(0, 1, 5, dtype=F64)
    ours = odeint(lambda t, y: -y * t, y0, t, method=method, rtol=1e-10, atol=1e-10)
    ref = torchdiffeq.odeint(lambda t, y: -y * t, y0, t, method=method, rtol=1e-10,
                             atol=1e-10)
    assert ours.shape == ref.shape == (5,)
    assert float((ours - ref).abs().max()) < parity
    assert torch.allclose(ours, torch.exp(-t**2 / 2), atol=1e-4)


def test_a_tuple_state_with_a_zero_dim_part_integrates_like_torchdiffeq():
    y0 = (torch.tensor(1.0, dtype=F64), torch.ones(2, dtype=F64))
    t = torch.linspace(0, 1, 4, dtype=F64)

    def func(t, state):
        a, b = state
        return -a, b * a

    ours, ref = odeint(func, y0, t), torchdiffeq.odeint(func, y0, t)
    assert [o.shape for o in ours] == [r.shape for r in ref] == [(4,), (4, 2)]
    for o, r in zip(ours, ref):
        assert torch.allclose(o, r, atol=1e-7)


def test_a_zero_dim_state_works_with_implicit_methods_and_the_adjoint():
    ys = odeint(lambda t, y: -y, torch.tensor(1.0, dtype=F64),
                torch.linspace(0, 1, 3, dtype=F64), method="radauIIA5")
    assert ys.shape == (3,) and float(ys[-1]) == pytest.approx(math.exp(-1), abs=1e-4)

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rate = torch.nn.Parameter(torch.tensor(-0.5, dtype=F64))

        def forward(self, t, y):
            return self.rate * y

    grads = []
    for solve in (odeint_adjoint, torchdiffeq.odeint_adjoint):
        func, y0 = Decay(), torch.tensor(2.0, dtype=F64, requires_grad=True)
        ys = solve(func, y0, torch.linspace(0, 1, 3, dtype=F64))
        assert ys.shape == (3,)
        grads.append(torch.autograd.grad(ys.sum(), (y0, func.rate)))
    for ours, ref in zip(*grads):
        assert float(ours) == pytest.approx(float(ref), abs=1e-6)


# ---- bug 2: a float32 state with float64 times ----------------------------------------------

def _time_concat_field():
    torch.manual_seed(9)
    layer = torch.nn.Linear(3, 2)  # float32
    return lambda t, y: layer(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))


@pytest.mark.parametrize("make_field", [
    lambda: (lambda t, y: -y * t.reshape(1)),  # float64 derivative with float64 t
    _time_concat_field,  # a float32 layer fed with t: fails with float64 t
], ids=["uses-t", "concat-t"])
@pytest.mark.parametrize("method", ["dopri5", "rk4", "trbdf2"])
def test_a_field_using_float64_times_on_a_float32_state_gets_t_in_float32(make_field, method):
    func, seen = make_field(), []

    def field(t, y):
        seen.append(t.dtype)
        return func(t, y)

    y0 = torch.ones(4, 2)
    t = torch.linspace(0, 1, 5, dtype=F64)
    with torch.no_grad():
        ours = odeint(field, y0, t, method=method)
        ref = odeint(func, y0, t.float(), method=method)
    assert ours.dtype == torch.float32
    assert set(seen) == {torch.float32}
    assert torch.allclose(ours, ref, atol=1e-5)
    if method != "trbdf2":  # torchdiffeq 0.2.5 has no implicit methods
        with torch.no_grad():
            theirs = torchdiffeq.odeint(func, y0, t, method=method)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_field_gets_t_in_the_states_dtype_and_a_wrong_dtype_is_still_an_error():
    seen = []

    def ignores_t(t, y):
        seen.append(t.dtype)
        return -y

    t = torch.linspace(0, 1, 3, dtype=F64)
    odeint(ignores_t, torch.ones(2), t)
    assert set(seen) == {torch.float32}
    with pytest.raises(SolverInputError, match="returned dtype torch.float64"):
        odeint(lambda t, y: -y.double(), torch.ones(2), t)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        odeint(lambda t, y: y @ torch.ones(3, 3), torch.ones(4, 2), t)


def test_the_adjoint_handles_a_field_using_float64_times_on_a_float32_state():
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([-0.5, 0.3]))

        def forward(self, t, y):
            return self.w * y * t.reshape(1)

    t = torch.linspace(0, 1, 4, dtype=F64)
    grads = []
    for solve in (odeint_adjoint, torchdiffeq.odeint_adjoint):
        func, y0 = Field(), torch.ones(3, 2, requires_grad=True)
        ys = solve(func, y0, t, rtol=1e-6, atol=1e-6)
        assert ys.dtype == torch.float32
        grads.append(torch.autograd.grad(ys.sum(), (y0, func.w)))
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, atol=1e-4)
