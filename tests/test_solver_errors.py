"""Bad inputs and failing solves raise our errors with messages that say what to try."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from solvers import (
    MaxStepsExceededError,
    NonFiniteGradientError,
    NonFiniteStateError,
    SlowSolveWarning,
    SolverError,
    SolverInputError,
    SolverSpec,
    SolverStats,
    StepSizeUnderflowError,
    integrate,
    odeint,
    odeint_adjoint,
)
from solvers.integrate import StepControl, next_step

T01 = torch.tensor([0.0, 1.0])


def test_blow_up_raises_underflow_or_non_finite_naming_t():
    # y' = y^2, y(0) = 1 blows up at t = 1.
    with pytest.raises(SolverError, match=r"t=(0\.99|1\b)") as info:
        odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64),
               torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert isinstance(info.value, (StepSizeUnderflowError, NonFiniteStateError))


def test_step_size_underflow_suggests_remedies():
    # (with options={'min_step': ...} the solve would accept steps of min_step instead, as
    # torchdiffeq's, with a MinStepWarning: tests/test_torchdiffeq_api.py)
    with pytest.raises(StepSizeUnderflowError, match="looser tolerance.*fixed-step"):
        odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64),
               torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_nan_from_the_vector_field_names_the_time():
    def func(t, y):
        return y * float("nan") if t > 0.5 else -y

    with pytest.raises(NonFiniteStateError, match="non-finite"):
        odeint(func, torch.ones(2), T01)
    with pytest.raises(NonFiniteStateError, match="t=0"):
        odeint(lambda t, y: y * float("nan"), torch.ones(2), T01, method="rk4")


def test_max_num_steps_is_enforced():
    with pytest.raises(MaxStepsExceededError, match="max_num_steps=3"):
        odeint(lambda t, y: -50 * y, torch.ones(2), torch.tensor([0.0, 10.0]),
               options={"max_num_steps": 3})


@pytest.mark.parametrize("t", [torch.tensor([0.0, 1.0, 0.5]), torch.tensor([0.0, 0.0])])
def test_non_monotone_times_are_rejected(t):
    with pytest.raises(SolverInputError, match="strictly increasing or strictly decreasing"):
        odeint(lambda t, y: -y, torch.ones(2), t)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(SolverInputError, match="dopri5") as info:
        odeint(lambda t, y: -y, torch.ones(2), T01, method="rk45")
    assert isinstance(info.value, ValueError)


def test_unknown_options_are_named():
    with pytest.raises(SolverInputError, match="unknown option 'stepsize'"):
        odeint(lambda t, y: -y, torch.ones(2), T01, method="rk4", options={"stepsize": 0.1})


def test_bad_tolerances_are_rejected():
    with pytest.raises(SolverInputError, match="rtol must be a positive"):
        odeint(lambda t, y: -y, torch.ones(2), T01, rtol=0.0)


def test_integer_state_and_dtype_mismatch_are_rejected():
    with pytest.raises(SolverInputError, match="floating dtype"):
        odeint(lambda t, y: -y, torch.ones(2, dtype=torch.int64), T01)
    with pytest.raises(SolverInputError, match="dtype torch.float64 for a torch.float32"):
        odeint(lambda t, y: -y.double(), torch.ones(2), T01)
    with pytest.raises(SolverInputError, match="share one dtype"):
        odeint(lambda t, s: s, (torch.ones(2), torch.ones(2, dtype=torch.float64)), T01)


def test_wrong_derivative_shape_is_rejected():
    with pytest.raises(SolverInputError, match=r"shapes \[torch.Size\(\[2\]\)\]"):
        odeint(lambda t, y: torch.ones(3), torch.ones(2), T01)


def test_time_on_another_device_is_rejected():
    with pytest.raises(SolverInputError, match="t.to\\(y0.device\\)"):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0], device="meta"))


def test_unknown_backend_and_an_event_that_never_comes_are_explained():
    with pytest.raises(SolverInputError, match="unknown backend"):
        odeint(lambda t, y: -y, torch.ones(2), T01, backend="scipy")
    with pytest.raises(MaxStepsExceededError):
        odeint(lambda t, y: -y, torch.ones(2), T01, event_fn=lambda t, y: y.sum() + 1.0,
               options={"max_num_steps": 50})


def test_adjoint_rejects_a_user_norm_other_than_seminorm():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(SolverInputError, match="seminorm"):
        odeint_adjoint(lambda t, y: lin(y), torch.ones(2), T01, adjoint_params=tuple(
            lin.parameters()), adjoint_options={"norm": "max"})


# --- Errors name the caller's time, the backward solve and the block; the true cause. ---


class NaNBelow(torch.nn.Module):
    """-y, but NaN for t < cut once ``armed`` (set it between forward and backward)."""

    def __init__(self, cut: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.cut, self.armed = cut, False

    def forward(self, t, y):
        out = -self.w * y
        return out * float("nan") if self.armed and float(t) < self.cut else out


@pytest.mark.parametrize(("t0", "t1", "cut"), [(0.0, 1.0, 0.5), (2.0, 5.0, 3.5)])
def test_backward_solve_errors_name_the_callers_time_and_the_backward_solve(t0, t1, cut):
    field = NaNBelow(cut)
    ys = odeint_adjoint(field, torch.ones(2), torch.tensor([t0, t1]))
    field.armed = True
    with pytest.raises(NonFiniteStateError, match=r"^backward \(adjoint\) solve: ") as info:
        ys[-1].sum().backward()
    assert not isinstance(info.value, NonFiniteGradientError)
    assert t0 <= info.value.t <= cut and f"t={info.value.t:.6g}" in str(info.value)
    assert "t=-" not in str(info.value)


def test_a_decreasing_time_solve_names_the_callers_time():
    with pytest.raises(NonFiniteStateError, match=r"at t=0\.") as info:
        odeint(lambda t, y: -y * float("nan") if t < 0.5 else -y, torch.ones(2),
               torch.tensor([1.0, 0.0]))
    assert 0.0 < info.value.t <= 0.5


def test_a_label_goes_in_front_of_forward_and_backward_errors():
    with pytest.raises(NonFiniteStateError, match=r"^my solve: non-finite"):
        odeint(lambda t, y: y * float("nan"), torch.ones(2), T01, label="my solve")
    field = NaNBelow(0.5)
    ys = odeint_adjoint(field, torch.ones(2), T01, label="my solve")
    field.armed = True
    with pytest.raises(NonFiniteStateError, match=r"^my solve, backward \(adjoint\) solve: "):
        ys[-1].sum().backward()


@pytest.mark.parametrize("adjoint_method", ["dopri5", "rk4"])
def test_an_ode_block_names_itself_in_backward_errors(adjoint_method):
    from ocnode.nn.ode import ODEBlock

    field = NaNBelow(0.5)
    options = {"step_size": 0.1} if adjoint_method == "rk4" else None
    block = ODEBlock(field, 0.0, 1.0, SolverSpec(adjoint_method=adjoint_method,
                                                 adjoint_options=options), name="enc")
    out = block(torch.ones(3, 2))
    field.armed = True
    with pytest.raises(NonFiniteStateError,
                       match=r"^ODE block 'enc', backward \(adjoint\) solve: non-finite"):
        out.sum().backward()


GRADIENT_CAUSE = ("the gradient arriving at the block's output is not finite; the loss or the "
                  "layers after the block produced it")


@pytest.mark.parametrize(("t0", "t1"), [(0.0, 1.0), (2.0, 5.0)])
def test_a_non_finite_incoming_gradient_is_blamed_not_the_vector_field(t0, t1):
    from ocnode.nn.ode import ODEBlock

    block = ODEBlock(NaNBelow(0.0), t0, t1, name="enc")
    out = block(torch.ones(3, 2))
    with pytest.raises(NonFiniteGradientError, match=re.escape(GRADIENT_CAUSE)) as info:
        (out.sum() * float("inf")).backward()
    assert str(info.value).startswith(f"ODE block 'enc', backward (adjoint) solve: "
                                      f"non-finite gradient dL/dy at t={t1:g}: ")
    assert isinstance(info.value, NonFiniteStateError) and info.value.t == t1


def test_the_gradient_is_blamed_at_the_output_time_where_it_entered():
    field = NaNBelow(0.0)
    ys = odeint_adjoint(field, torch.ones(2), torch.tensor([0.0, 0.5, 1.0]))
    weights = torch.ones(3, 2)
    weights[1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"dL/dy at t=0\.5: "):
        (ys * weights).sum().backward()


def test_a_non_finite_gradient_at_t0_only_propagates_as_before():
    # dL/dy(t0) enters no backward solve: dL/dy0 is NaN, as for any autograd op, no error
    y0 = torch.ones(2, requires_grad=True)
    ys = odeint_adjoint(NaNBelow(0.0), y0, T01)
    (ys[0].sum() * float("nan") + ys[1].sum()).backward()
    assert torch.isnan(y0.grad).all()


# --- A diverging model: no ZeroDivisionError in the step-size control. ---


@pytest.mark.parametrize("y0", [torch.ones(3), torch.zeros(3)])
def test_a_derivative_that_overflows_the_error_scale_raises_our_error(y0):
    with pytest.raises(NonFiniteStateError, match=r"scaled derivative at t=0: .*1e\+37.*float32"
                       r".*diverging.*float64"):
        odeint(lambda t, y: torch.full_like(y, 1e37), y0, T01)


def test_an_overflowing_first_step_estimate_leaves_min_step_in_charge():
    out = odeint(lambda t, y: torch.full_like(y, 1e30), torch.zeros(3), torch.tensor([0.0, 1e-6]),
                 options={"min_step": 1e-7})
    assert torch.allclose(out[-1], torch.full((3,), 1e24), rtol=1e-4)


def test_the_controller_survives_a_tiny_error_ratio_with_a_large_exponent():
    ctl = StepControl(rtol=1e-6, atol=1e-6, icoeff=3.0)
    assert next_step(0.1, 1e-300, 1.0, 2, ctl) == pytest.approx(0.1 * ctl.ifactor)


def test_a_nan_initial_state_is_named_as_such():
    y0 = torch.tensor([1.0, float("nan")])
    for method in ("dopri5", "rk4"):
        with pytest.raises(NonFiniteStateError, match="non-finite initial state at t=0: .*inputs"):
            odeint(lambda t, y: -y, y0, T01, method=method)


# --- Half precision and bad max_num_steps are rejected up front. ---

HALF = "is not supported by the solver: integrate in float32 \\(e.g. autocast off inside"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_are_rejected(dtype):
    name = str(dtype).removeprefix("torch.")
    y0 = torch.ones(2, dtype=dtype)
    with pytest.raises(SolverInputError, match=f"^{name} {HALF}"):
        odeint(lambda t, y: -y, y0, T01)
    with pytest.raises(SolverInputError, match=f"^{name} {HALF}"):
        odeint_adjoint(lambda t, y: -y, y0, T01, adjoint_params=())
    with pytest.raises(SolverInputError, match=f"^{name} {HALF}"):
        odeint(lambda t, s: s, (y0, y0), T01, method="rk4")


def test_a_half_derivative_of_a_float32_state_hints_at_autocast():
    with pytest.raises(SolverInputError, match="torch.float16 for a torch.float32 state "
                                               r"\(autocast\?"):
        odeint(lambda t, y: (-y).half(), torch.ones(2), T01)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "10", None])
def test_plain_odeint_rejects_a_bad_max_num_steps(steps):
    with pytest.raises(SolverInputError, match=r"options\['max_num_steps'\] must be a positive "
                                               "int"):
        odeint(lambda t, y: -y, torch.ones(2), T01, options={"max_num_steps": steps})
    with pytest.raises(SolverInputError, match="max_num_steps'] must be a positive int"):
        odeint_adjoint(lambda t, y: -y, torch.ones(2), T01, adjoint_params=(),
                       adjoint_options={"max_num_steps": steps})


# --- A slow solve warns once. ---

STIFF_T = torch.tensor([0.0, 0.2, 0.4])


def stiff(t, y):
    return -2000.0 * y


def test_a_slow_solve_warns_once_with_the_time_the_step_and_what_to_try(monkeypatch):
    monkeypatch.setattr(integrate, "SLOW_SOLVE_STEPS", 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slow = odeint(stiff, torch.ones(2), STIFF_T, label="my solve")
    slow_ones = [w for w in caught if issubclass(w.category, SlowSolveWarning)]
    assert len(slow_ones) == 1
    message = str(slow_ones[0].message)
    assert re.match(r"my solve: slow solve: 50 steps in [\d.]+ s, now at t=0\.\d+ with step "
                    r"size dt=[\d.e-]+\. ", message)
    assert all(s in message for s in ("loosen rtol/atol", "no implicit method",
                                      "max_num_steps"))
    monkeypatch.undo()
    assert torch.equal(slow, odeint(stiff, torch.ones(2), STIFF_T))  # warning changes nothing


def test_the_slow_solve_warning_also_fires_on_time(monkeypatch):
    monkeypatch.setattr(integrate, "SLOW_SOLVE_SECONDS", 0.0)
    with pytest.warns(SlowSolveWarning, match=r"slow solve: 1 steps in .* at t=0 "):
        odeint(lambda t, y: -y, torch.ones(2), T01)


def test_a_slow_backward_solve_warns_once_over_its_intervals_in_the_callers_time(monkeypatch):
    rate = torch.nn.Parameter(torch.tensor(5.0))
    stats = SolverStats()
    ys = odeint_adjoint(lambda t, y: -rate * y, torch.ones(2), torch.tensor([0.0, 1.0, 2.0]),
                        adjoint_params=(rate,), adjoint_stats=stats)
    monkeypatch.setattr(integrate, "SLOW_SOLVE_STEPS", 50)  # ~35 steps per interval
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys.sum().backward()
    slow_ones = [str(w.message) for w in caught if issubclass(w.category, SlowSolveWarning)]
    assert stats.n_accepted + stats.n_rejected > 50 and len(slow_ones) == 1
    assert re.match(r"backward \(adjoint\) solve: slow solve: 50 steps .* at t=0\.\d+ ",
                    slow_ones[0])


def test_quick_solves_and_fixed_step_solves_do_not_warn(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowSolveWarning)
        odeint(lambda t, y: -y, torch.ones(2), T01)  # the default thresholds
        monkeypatch.setattr(integrate, "SLOW_SOLVE_STEPS", 5)
        monkeypatch.setattr(integrate, "SLOW_SOLVE_SECONDS", 0.0)
        odeint(stiff, torch.ones(2), STIFF_T, method="euler", options={"step_size": 1e-3})
