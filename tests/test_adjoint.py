"""The adjoint: gradients vs backprop and finite differences, time gradients, the observer."""

from __future__ import annotations

import contextlib

import pytest
import torch

from solvers import (
    NonFiniteGradientError,
    NonFiniteStateError,
    SolverInputError,
    SolverStats,
    odeint,
    odeint_adjoint,
)
from solvers.adjoint import stage_weights

TOL = dict(rtol=1e-10, atol=1e-10)


class Field(torch.nn.Module):
    """A small time-dependent vector field (float64)."""

    def __init__(self, dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)
        self.double()

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1).to(y.dtype)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))


@pytest.fixture
def problem():
    torch.manual_seed(0)
    f = Field()
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 2, dtype=torch.float64)
    return f, y0, w


def _loss(ys, w):
    return (ys * w).sum() + 0.5 * (ys**2).sum()


@pytest.mark.parametrize("t_values", [[0.0, 0.4, 1.1], [1.0, 0.3, -0.2]])
def test_adjoint_gradients_match_backprop_through_the_solver(problem, t_values):
    f, y0, w = problem
    t = torch.tensor(t_values, dtype=torch.float64, requires_grad=True)
    inputs = [y0, t, *f.parameters()]
    g_bp = torch.autograd.grad(_loss(odeint(f, y0, t, **TOL), w), inputs)
    g_adj = torch.autograd.grad(_loss(odeint_adjoint(f, y0, t, **TOL), w), inputs)
    for a, b in zip(g_bp, g_adj):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_time_gradients_match_finite_differences(problem):
    f, y0, w = problem
    t = torch.tensor([0.0, 0.4, 1.1], dtype=torch.float64, requires_grad=True)
    grad_t, = torch.autograd.grad(_loss(odeint_adjoint(f, y0, t, **TOL), w), t)
    eps = 1e-6
    for k in range(3):
        bump = torch.zeros(3, dtype=torch.float64)
        bump[k] = eps
        with torch.no_grad():
            up = _loss(odeint(f, y0, t + bump, rtol=1e-12, atol=1e-12), w)
            down = _loss(odeint(f, y0, t - bump, rtol=1e-12, atol=1e-12), w)
        assert float(grad_t[k]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-5)


def test_gradcheck_of_a_fixed_step_adjoint():
    torch.manual_seed(1)
    f = Field(hidden=4)
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)

    def fn(y0, t, *params):
        return odeint_adjoint(f, y0, t, method="rk4", options={"step_size": 0.01},
                              adjoint_params=params)

    assert torch.autograd.gradcheck(fn, (y0, t, *f.parameters()), atol=1e-6, rtol=1e-5)


def test_tuple_state_and_seminorm_give_backprop_gradients(problem):
    f, y0, _ = problem
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def aug(t, state):
        y, _ = state
        return f(t, y), (y**2).sum(-1)

    def loss(ode, **kw):
        y, q = ode(aug, (y0, torch.zeros(4, dtype=torch.float64)), t, **kw)
        return (y[-1] ** 3).sum() + q[-1].sum()

    inputs = [y0, *f.parameters()]
    g_bp = torch.autograd.grad(loss(odeint, **TOL), inputs)
    g_adj = torch.autograd.grad(
        loss(odeint_adjoint, adjoint_params=tuple(f.parameters()),
             adjoint_options={"norm": "seminorm"}, **TOL), inputs)
    for a, b in zip(g_bp, g_adj):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adjoint_stats_are_filled_by_forward_and_backward(problem):
    f, y0, w = problem
    fwd, bwd = SolverStats(), SolverStats()
    ys = odeint_adjoint(f, y0, torch.tensor([0.0, 1.0]), stats=fwd, adjoint_stats=bwd)
    assert fwd.nfe > 0 and bwd.nfe == 0
    ys[-1].sum().backward()
    assert bwd.nfe > 0 and bwd.n_accepted > 0


class Recorder:
    """A solvers.Observer that keeps clones of its samples and counts its finish() calls."""

    def __init__(self) -> None:
        self.samples: list[tuple] = []
        self.finished = 0

    def __call__(self, t, x, a, weight):
        self.samples.append((t, x.clone(), a.clone(), weight, self.finished))

    def finish(self):
        self.finished += 1

    @property
    def times(self):
        return [s[0] for s in self.samples]


def test_observer_samples_match_the_forward_trajectory_and_the_true_adjoint(problem):
    f, y0, w = problem
    obs = Recorder()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = odeint_adjoint(f, y0, t, observer=obs, observer_dt=0.1, **TOL)
    (ys[-1] * w[-1]).sum().backward()
    assert obs.times == pytest.approx([1.0 - 0.1 * k for k in range(11)])
    assert obs.finished == 1 and all(s[4] == 0 for s in obs.samples)  # finish() comes last
    # the trapezoid rule: dt inside, dt / 2 at both ends
    assert [s[3] for s in obs.samples] == pytest.approx([0.05] + [0.1] * 9 + [0.05])
    assert torch.equal(obs.samples[0][2], w[-1])  # a(t_N) = dL/dy(t_N)
    assert torch.allclose(obs.samples[-1][1], y0)  # x(t_0)
    for tj, x, a, _, _ in obs.samples[1:-1]:
        xj = odeint(f, y0.detach(), torch.tensor([0.0, tj], dtype=torch.float64),
                    rtol=1e-12, atol=1e-12)[-1]
        assert torch.allclose(x, xj, atol=1e-7)
        xj.requires_grad_(True)
        end = odeint(f, xj, torch.tensor([tj, 1.0], dtype=torch.float64), **TOL)[-1]
        a_true, = torch.autograd.grad((end * w[-1]).sum(), xj)
        assert torch.allclose(a, a_true, atol=1e-6)


def test_observer_weights_are_the_trapezoid_rule_also_for_a_partial_last_cell(problem):
    f, y0, _ = problem
    obs = Recorder()
    t0, t1 = 0.5, 1.75  # the span 1.25 is not a multiple of dt = 0.5
    odeint_adjoint(f, y0, torch.tensor([t0, t1], dtype=torch.float64), observer=obs,
                   observer_dt=0.5)[-1].sum().backward()
    assert sorted(obs.times) == pytest.approx([0.5, 1.0, 1.5, 1.75])
    # exact for a linear integrand: sum_j w_j t_j = int t dt
    assert sum(s[3] * s[0] for s in obs.samples) == pytest.approx((t1**2 - t0**2) / 2)
    assert sum(s[3] for s in obs.samples) == pytest.approx(t1 - t0)


def test_observer_does_not_change_the_adaptive_steps(problem):
    f, y0, _ = problem
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    plain, observed = SolverStats(), SolverStats()
    odeint_adjoint(f, y0, t, adjoint_stats=plain)[-1].sum().backward()
    odeint_adjoint(f, y0, t, adjoint_stats=observed, observer=Recorder(),
                   observer_dt=0.01)[-1].sum().backward()
    assert (plain.nfe, plain.n_accepted) == (observed.nfe, observed.n_accepted)


def test_observer_visits_each_grid_point_once_across_output_intervals(problem):
    f, y0, _ = problem
    obs = Recorder()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    ys = odeint_adjoint(f, y0, t, observer=obs, observer_dt=0.125)
    ys.sum().backward()
    assert sorted(obs.times) == pytest.approx([0.125 * k for k in range(9)])
    assert obs.finished == 1  # once per backward solve, not per output interval


def test_observer_default_spacing_is_a_hundredth_of_the_span(problem):
    f, y0, _ = problem
    obs = Recorder()
    odeint_adjoint(f, y0, torch.tensor([2.5, 0.5]), observer=obs)[-1].sum().backward()
    assert len(obs.samples) == 101
    assert obs.samples[1][3] == pytest.approx(0.02)
    assert obs.times[-1] == pytest.approx(2.5)


@pytest.mark.parametrize("t, dt", [([0.0], 0.1), ([1.0, 1.0 + 1e-12], 0.1)])
def test_observer_finish_is_called_once_per_solve_even_without_samples(problem, t, dt):
    f, y0, _ = problem
    obs = Recorder()
    for expected in (1, 2):
        ys = odeint_adjoint(f, y0, torch.tensor(t, dtype=torch.float64), observer=obs,
                            observer_dt=dt)
        ys.sum().backward()
        assert obs.finished == expected
    assert not obs.samples


class StageRecorder:
    """A solvers.StageObserver that records the states its field sees in each evaluation."""

    def __init__(self) -> None:
        self.watching: float | None = None
        self.pending: list[tuple[float, torch.Tensor]] = []
        self.kept: list[tuple[float, torch.Tensor, float]] = []
        self.evaluations = self.rejected = self.finished = 0

    @contextlib.contextmanager
    def evaluation(self, t):
        self.watching, self.evaluations = t, self.evaluations + 1
        yield
        self.watching = None

    def see(self, y):
        if self.watching is not None:
            self.pending.append((self.watching, y.detach().clone()))

    def accept_step(self, weights):
        assert len(weights) == len(self.pending)
        self.kept += [(t, y, w) for (t, y), w in zip(self.pending, weights)]
        self.pending = []

    def reject_step(self):
        self.rejected += len(self.pending)
        self.pending = []

    def finish(self):
        self.finished += 1


class Watched(torch.nn.Module):
    """dy/dt = tanh(W y) that shows every state it is evaluated at to a StageRecorder."""

    def __init__(self, recorder: StageRecorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, t, y):
        self.recorder.see(y)
        return torch.tanh(self.lin(y))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_a_stage_observer_sees_the_backward_solves_own_evaluations(method):
    torch.manual_seed(0)
    rec = StageRecorder()
    f = Watched(rec)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    options = {"step_size": 0.05} if method == "rk4" else None
    plain, watched = SolverStats(), SolverStats()
    ys = odeint_adjoint(f, y0, t, method=method, options=options, adjoint_stats=plain)
    ys.sum().backward()
    ys = odeint_adjoint(f, y0, t, method=method, options=options, observer=rec,
                        adjoint_stats=watched, rtol=1e-6, atol=1e-6)
    ys.sum().backward()
    assert rec.evaluations == watched.nfe  # t needs no gradient: no other field call
    assert rec.finished == 1 and not rec.pending
    weights = [w for _, _, w in rec.kept]
    assert min(weights) >= 0 and sum(weights) == pytest.approx(2.0)
    # the weighted evaluations are a quadrature of int |x(t)|^2 dt
    grid = Recorder()
    odeint_adjoint(f, y0, t, observer=grid, observer_dt=1e-3, rtol=1e-9,
                   atol=1e-9)[-1].sum().backward()
    exact = sum(w * float((x**2).sum()) for _, x, _, w, _ in grid.samples)
    approx = sum(w * float((y**2).sum()) for _, y, w in rec.kept)
    assert approx == pytest.approx(exact, rel=2e-2)


def test_stage_weights_are_positive_cells_that_sum_to_the_step():
    w = stage_weights([0.2, 0.3, 0.8, 1.0, 1.0, 5.0], 0.0, 1.0)
    # cells between midpoints: [0, .25], [.25, .55], [.55, .9], [.9, 1] (shared by the two
    # evaluations at 1.0); 5.0 is outside the step
    assert w == pytest.approx([0.25, 0.3, 0.35, 0.05, 0.05, 0.0])
    # a step that overshoots the end at 0.5 counts up to there: cells cut at 0.5
    assert stage_weights([0.2, 0.3, 0.8, 1.0], 0.0, 1.0, end=0.5) == pytest.approx(
        [0.25, 0.25, 0.0, 0.0])
    assert stage_weights([0.8, 1.0], 0.0, 1.0, end=0.5) == pytest.approx([0.5, 0.0])


def test_the_backward_solve_keeps_its_step_size_across_output_times(problem):
    f, y0, _ = problem
    stats = SolverStats()
    odeint_adjoint(f, y0, torch.linspace(0, 2, 11, dtype=torch.float64),
                   adjoint_stats=stats).sum().backward()
    # dopri5: 6 evaluations per attempt, one f(t, y) per interval (the adjoint jumps there),
    # and one step search, for the first interval only (the others start with its step size)
    intervals, attempts = 10, stats.n_accepted + stats.n_rejected
    assert stats.nfe == intervals + 1 + 6 * attempts


def test_an_observer_needs_a_finish_method(problem):
    f, y0, _ = problem
    with pytest.raises(SolverInputError, match=r"finish\(\)"):
        odeint_adjoint(f, y0, torch.tensor([0.0, 1.0]), observer=lambda t, x, a, w: None)


def test_adjoint_needs_a_module_or_explicit_params():
    with pytest.raises(SolverInputError, match="adjoint_params"):
        odeint_adjoint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))


def test_observer_needs_a_positive_spacing(problem):
    f, y0, _ = problem
    with pytest.raises(SolverInputError, match="observer_dt"):
        odeint_adjoint(f, y0, torch.tensor([0.0, 1.0]), observer=Recorder(),
                       observer_dt=0)


class ArmedNaN(torch.nn.Module):
    """-y, NaN where t > 0.5 once ``armed`` (set between the forward and the backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.armed = False

    def forward(self, t, y):
        out = -self.w * y
        return out * float("nan") if self.armed and float(t) > 0.5 else out


def test_backward_errors_of_a_decreasing_time_solve_name_the_callers_time():
    field = ArmedNaN()
    ys = odeint_adjoint(field, torch.ones(2, dtype=torch.float64),
                        torch.tensor([1.0, 0.0], dtype=torch.float64))
    field.armed = True
    with pytest.raises(NonFiniteStateError, match=r"^backward \(adjoint\) solve: ") as info:
        ys[-1].sum().backward()
    assert 0.5 - 1e-9 <= info.value.t <= 1.0 and not isinstance(info.value, NonFiniteGradientError)


def test_a_non_finite_gradient_of_one_tuple_component_is_blamed():
    field = ArmedNaN()
    y0 = (torch.ones(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    y, q = odeint_adjoint(lambda t, s: (field(t, s[0]), torch.ones_like(s[1])), y0,
                          torch.tensor([0.0, 2.0], dtype=torch.float64),
                          adjoint_params=tuple(field.parameters()))
    with pytest.raises(NonFiniteGradientError, match=r"dL/dy at t=2: the gradient arriving"):
        (y[-1].sum() + q[-1].log().sum() * torch.tensor(-float("inf"))).backward()


def test_a_label_leaves_the_gradients_unchanged(problem):
    f, y0, w = problem
    t = torch.tensor([0.0, 0.4, 1.1], dtype=torch.float64)
    plain = torch.autograd.grad(_loss(odeint_adjoint(f, y0, t), w), [y0, *f.parameters()])
    named = torch.autograd.grad(_loss(odeint_adjoint(f, y0, t, label="enc"), w),
                                [y0, *f.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(plain, named))
