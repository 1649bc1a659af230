"""SolverSpec: validated once, immutable, hashable; solve() with a spec equals odeint."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

from solvers import SolverInputError, SolverSpec, SolverStats, odeint, odeint_adjoint, solve


class Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 2).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(y)) * (1 + t)


def test_defaults_and_a_short_repr() -> None:
    spec = SolverSpec()
    assert (spec.method, spec.rtol, spec.atol, spec.adjoint, spec.seminorm) == (
        "dopri5", 1e-3, 1e-3, True, False)
    assert spec.solve_options() == {} and spec.backward() is spec
    assert repr(spec) == "SolverSpec()"
    rk4 = SolverSpec(method="rk4", options={"step_size": 0.1}, adjoint=False)
    assert repr(rk4) == "SolverSpec(method='rk4', options={'step_size': 0.1}, adjoint=False)"


def test_a_spec_is_immutable_hashable_and_copyable() -> None:
    options = {"first_step": 0.5, "max_num_steps": 100}
    spec = SolverSpec(options=options)
    options["first_step"] = 2.0  # the spec kept its own copy
    assert spec.solve_options() == {"first_step": 0.5, "max_num_steps": 100}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rtol = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.options["first_step"] = 1.0  # type: ignore[index]
    same = SolverSpec(options={"max_num_steps": 100, "first_step": 0.5})
    assert spec == same and hash(spec) == hash(same) and len({spec, same}) == 1
    assert pickle.loads(pickle.dumps(spec)) == spec == copy.deepcopy(spec)
    changed = spec.replace(adjoint=False)
    assert changed != spec and changed.options == spec.options


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "rk45"}, "unknown method 'rk45'"),
    ({"rtol": 0.0}, "rtol must be a positive float"),
    ({"atol": -1e-3}, "atol must be a positive float"),
    ({"rtol": "1e-3"}, "rtol must be a positive float"),
    ({"rtol": True}, "rtol must be a positive float"),
    ({"adjoint_rtol": 0.0}, "adjoint_rtol must be a positive float"),
    ({"options": {"stepsize": 0.1}}, "unknown option 'stepsize'"),
    ({"options": {"dtype": "float32"}}, "options\\['dtype'\\] must be a real floating"),
    ({"options": {"interp": "linear"}}, "unknown option 'interp' for method 'dopri5'"),
    ({"method": "rk4", "options": {"interp": "nearest"}}, "must be 'cubic'"),
    ({"options": {"jump_t": "1.0"}}, r"jump_t'\] must be a 1-D tensor"),
    ({"options": {"step_t": [0.5], "jump_t": [0.5]}}, "must not repeat a time"),
    ({"method": "rk4", "options": {"step_size": 0.1, "grid_constructor": lambda f, y, t: t}},
     "exclude each other"),
    ({"method": "gl4", "options": {"step_size": 0.1, "perturb": True}}, "not supported by the"),
    ({"adjoint_options": {"norm": "max"}}, "must be a callable"),
    ({"options": [("first_step", 0.1)]}, "options must be a dict"),
    ({"options": {"max_num_steps": 0}}, "max_num_steps'] must be a positive int"),
    ({"options": {"max_num_steps": 10.5}}, "max_num_steps'] must be a positive int"),
    ({"options": {"norm": "max"}}, "must be a callable"),
    ({"method": "rk4", "options": {"step_size": -0.1}}, "step_size'] must be a positive"),
    ({"method": "rk4"}, r"rk4 needs options=\{'step_size': \.\.\.\}"),
    ({"method": "euler", "options": {"step_size": None}}, "euler needs options="),
    ({"adjoint": 1}, "adjoint must be True or False"),
    ({"adjoint_method": "nope"}, "unknown method 'nope'"),
    ({"adjoint_options": {"norm": "seminorm"}}, "seminorm=True"),
    ({"options": {"first_step": 0.1}, "adjoint_method": "rk4"}, "adjoint solve.*first_step"),
    ({"adjoint_method": "rk4"}, "adjoint solve.*rk4 needs options="),
])
def test_bad_settings_are_rejected_when_the_spec_is_built(kwargs: dict, message: str) -> None:
    with pytest.raises(SolverInputError, match=message):
        SolverSpec(**kwargs)


def test_replace_validates_again() -> None:
    with pytest.raises(SolverInputError, match="rk4 needs"):
        SolverSpec().replace(method="rk4")


def test_the_backward_settings_default_to_the_forward_ones() -> None:
    spec = SolverSpec(rtol=1e-4, options={"first_step": 0.5}, adjoint_atol=1e-6, seminorm=True)
    back = spec.backward()
    assert (back.method, back.rtol, back.atol) == ("dopri5", 1e-4, 1e-6)
    assert back.solve_options() == {"first_step": 0.5} and not back.seminorm
    rk4 = SolverSpec(adjoint_method="rk4", adjoint_options={"step_size": 0.2}).backward()
    assert (rk4.method, rk4.solve_options()) == ("rk4", {"step_size": 0.2})


def test_plain_odeint_still_steps_a_fixed_method_on_the_output_times() -> None:
    stats = SolverStats()
    odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 0.5, 1.0]), method="rk4",
           stats=stats)
    assert stats.n_accepted == 2


@pytest.mark.parametrize("adjoint", [False, True])
def test_solve_with_a_spec_gives_the_numbers_of_odeint(adjoint: bool) -> None:
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    results = []
    for use_spec in (True, False):
        f = Field()
        y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        stats = SolverStats()
        if use_spec:
            ys = solve(f, y0, t, SolverSpec(rtol=1e-5, atol=1e-6, adjoint=adjoint,
                                            seminorm=adjoint), stats=stats)
        elif adjoint:
            ys = odeint_adjoint(f, y0, t, rtol=1e-5, atol=1e-6, stats=stats,
                                adjoint_options={"norm": "seminorm"})
        else:
            ys = odeint(f, y0, t, rtol=1e-5, atol=1e-6, stats=stats)
        grads = torch.autograd.grad(ys.square().sum(), list(f.parameters()))
        results.append((ys.detach(), grads, stats.nfe))
    (ys_a, g_a, nfe_a), (ys_b, g_b, nfe_b) = results
    assert torch.equal(ys_a, ys_b) and nfe_a == nfe_b
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))


def test_solve_checks_its_spec_and_observer() -> None:
    f, y0, t = Field(), torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0])
    with pytest.raises(SolverInputError, match="spec must be a solvers.SolverSpec"):
        solve(f, y0, t, {"method": "rk4"})  # type: ignore[arg-type]
    with pytest.raises(SolverInputError, match="adjoint=True"):
        solve(f, y0, t, SolverSpec(adjoint=False), observer=print)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adjoint", [False, True])
def test_solve_rejects_a_half_precision_state(dtype: torch.dtype, adjoint: bool) -> None:
    f = Field().to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(SolverInputError, match=f"^{name} is not supported by the solver: "
                                               "integrate in float32"):
        solve(f, torch.ones(2, dtype=dtype), torch.tensor([0.0, 1.0]),
              SolverSpec(adjoint=adjoint))


def test_solve_puts_its_label_in_front_of_errors() -> None:
    spec = SolverSpec(method="rk4", options={"step_size": 0.5}, adjoint=False)
    with pytest.raises(SolverInputError, match=r"^ODE block 'x': y0 must have a floating"):
        solve(Field(), torch.ones(2, dtype=torch.int64), torch.tensor([0.0, 1.0]), spec,
              label="ODE block 'x'")
