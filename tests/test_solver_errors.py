"""Bad inputs and failing solves raise our errors with messages that say what to try."""

from __future__ import annotations

import pytest
import torch

from solvers import (
    MaxStepsExceededError,
    NonFiniteStateError,
    SolverError,
    SolverInputError,
    StepSizeUnderflowError,
    odeint,
    odeint_adjoint,
)

T01 = torch.tensor([0.0, 1.0])


def test_blow_up_raises_underflow_or_non_finite_naming_t():
    # y' = y^2, y(0) = 1 blows up at t = 1.
    with pytest.raises(SolverError, match=r"t=(0\.99|1\b)") as info:
        odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64),
               torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert isinstance(info.value, (StepSizeUnderflowError, NonFiniteStateError))


def test_step_size_underflow_suggests_remedies():
    with pytest.raises(StepSizeUnderflowError, match="looser tolerance.*fixed-step"):
        odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64),
               torch.tensor([0.0, 2.0], dtype=torch.float64), options={"min_step": 1e-3})


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


def test_unknown_and_torchdiffeq_only_options_are_named():
    with pytest.raises(SolverInputError, match="unknown option 'stepsize'"):
        odeint(lambda t, y: -y, torch.ones(2), T01, method="rk4", options={"stepsize": 0.1})
    with pytest.raises(SolverInputError, match="backend='torchdiffeq'"):
        odeint(lambda t, y: -y, torch.ones(2), T01, options={"jump_t": T01})


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


def test_unknown_backend_and_event_fn_are_explained():
    with pytest.raises(SolverInputError, match="unknown backend"):
        odeint(lambda t, y: -y, torch.ones(2), T01, backend="scipy")
    with pytest.raises(NotImplementedError, match="backend='torchdiffeq'"):
        odeint(lambda t, y: -y, torch.ones(2), T01, event_fn=lambda t, y: y.sum())


def test_adjoint_rejects_a_user_norm_other_than_seminorm():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(SolverInputError, match="seminorm"):
        odeint_adjoint(lambda t, y: lin(y), torch.ones(2), T01, adjoint_params=tuple(
            lin.parameters()), adjoint_options={"norm": "max"})
