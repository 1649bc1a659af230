"""Backpropagation through the solver with step checkpoints (solvers.checkpoint).

The oracle is plain backpropagation through the same solve (``checkpoint=False``): the
replayed steps must give its outputs and its gradients to rounding (float64: 1e-9; the two
forward solves form their stage sums in different memory layouts), for adaptive
and fixed-step methods, with stops, jumps, perturbed grids, decreasing and dense output
times, tuple states and time gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import solvers.checkpoint as checkpointing
from ocnode import load_dataset
from ocnode.training import TaskSettings, TrainConfig, make_task
from solvers import SolverInputError, SolverSpec, SolverStats, get_tableau, solve

F64 = torch.float64


class JumpField(nn.Module):
    """An MLP field whose scale jumps at t = 0.3 (it tells the two sides of a jump apart)."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).to(F64)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) * torch.where(t <= 0.3, 1.0, 2.0) * (1 + t)


def _weights(ys: torch.Tensor) -> torch.Tensor:
    return torch.arange(ys.numel(), dtype=ys.dtype).reshape(ys.shape).sin()


def _grads(func, y0, t, spec, params=None):
    """(outputs, dL/dy0, dL/dparams, dL/dt or None, forward NFE, backward NFE, accepted
    steps)."""
    func.zero_grad(set_to_none=True)
    y0 = y0.detach().requires_grad_(True)
    t = t.detach().requires_grad_(t.requires_grad)
    stats, back = SolverStats(), SolverStats()
    ys = solve(func, y0, t, spec, stats=stats, adjoint_stats=back, adjoint_params=params)
    (ys * _weights(ys)).sum().backward()
    return (ys.detach(), y0.grad, [p.grad for p in func.parameters()], t.grad, stats.nfe,
            back.nfe, stats.n_accepted)


def _assert_same(a, b, tol=1e-9):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    if a[3] is not None:
        torch.testing.assert_close(a[3], b[3], rtol=tol, atol=tol)


CASES = [
    ("dopri5", None), ("tsit5", None), ("bosh3", None), ("adaptive_heun", None),
    ("rk4", {"step_size": 0.13}), ("midpoint", {"step_size": 0.1}),
    ("rk4", {"step_size": 0.1, "perturb": True}), ("rk4", {"step_size": 0.13, "interp": "linear"}),
    ("dopri5", {"jump_t": [0.3], "step_t": [0.55]}),
]
TIMES = [[0.0, 1.0], [0.0, 0.17, 0.5, 0.51, 1.2], [1.0, 0.3, -0.5]]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("times", TIMES)
@pytest.mark.parametrize("segment_bytes", [1, 20_000, checkpointing.SEGMENT_BYTES])
def test_replayed_steps_give_backprops_outputs_and_gradients(method, options, times,
                                                             segment_bytes, monkeypatch):
    """Whether the replay backpropagates step by step (1 byte), through a few steps at a time
    or through the whole solve at once (the default, for this small problem)."""
    monkeypatch.setattr(checkpointing, "SEGMENT_BYTES", segment_bytes)
    torch.manual_seed(0)
    func, y0 = JumpField(), torch.randn(5, 3, dtype=F64)
    t = torch.tensor(times, dtype=F64)
    spec = SolverSpec(method, rtol=1e-6, atol=1e-6, options=options, adjoint=False)
    plain = _grads(func, y0, t, spec)
    replayed = _grads(func, y0, t, spec.replace(checkpoint=True))
    _assert_same(plain, replayed)
    assert replayed[4] == plain[4]  # the same forward solve
    # the backward replays each accepted step (rejected ones are not): its stages but the
    # first, which the forward kept, except where it was evaluated afresh (the first step,
    # after a jump); a fixed grid's slope at each step's end too (the next first stage)
    tab, steps = get_tableau(method), replayed[6]
    fresh = 1 + len((options or {}).get("jump_t", []))
    if tab.adaptive:
        assert replayed[5] == (tab.stages - 1) * steps + fresh
    else:
        assert tab.stages * steps <= replayed[5] <= tab.stages * steps + 1


def test_time_gradients_and_tuple_states_match_backprop():
    torch.manual_seed(1)
    lin = nn.Linear(4, 4).to(F64)

    class TupleField(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, t, y):
            a, b = y
            return torch.tanh(self.lin(torch.cat([a, b], -1)))[:, :1] * t, -b * a

    func = TupleField()
    y0 = (torch.randn(3, 1, dtype=F64, requires_grad=True),
          torch.randn(3, 3, dtype=F64, requires_grad=True))
    t = torch.tensor([0.1, 0.6, 1.3], dtype=F64, requires_grad=True)
    results = []
    for checkpoint in (False, True):
        func.zero_grad(set_to_none=True)
        for part in (*y0, t):
            part.grad = None
        ys = solve(func, y0, t, SolverSpec(rtol=1e-7, atol=1e-7, adjoint=False,
                                           checkpoint=checkpoint))
        sum((y * _weights(y)).sum() for y in ys).backward()
        results.append([y0[0].grad, y0[1].grad, t.grad, lin.weight.grad, lin.bias.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_the_forward_keeps_no_graph_of_the_stages():
    """Backprop saves every stage's activations; the checkpointed forward saves none."""
    torch.manual_seed(2)
    func, y0 = JumpField(), torch.randn(64, 3, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 3, 7, dtype=F64)
    saved = {}
    for checkpoint in (False, True):
        count = [0]

        def pack(x, count=count):
            count[0] += x.numel()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            stats = SolverStats()
            solve(func, y0, t, SolverSpec(rtol=1e-6, atol=1e-6, adjoint=False,
                                          checkpoint=checkpoint), stats=stats)
        saved[checkpoint] = count[0]
    params = sum(p.numel() for p in func.parameters())
    assert saved[False] > 50 * y0.numel()  # stages and activations of every step
    assert saved[True] <= params  # the parameters only (the steps' states are not a graph)


def test_frozen_parameters_get_no_gradient_and_explicit_params_work():
    torch.manual_seed(3)
    func, y0 = JumpField(), torch.randn(4, 3, dtype=F64)
    func.net[0].weight.requires_grad_(False)
    t = torch.tensor([0.0, 0.8], dtype=F64)
    spec = SolverSpec(rtol=1e-6, atol=1e-6, adjoint=False)
    plain = _grads(func, y0, t, spec)
    replayed = _grads(func, y0, t, spec.replace(checkpoint=True))
    assert replayed[2][0] is None
    _assert_same(plain, replayed)
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    ys = solve(lambda t, y: y @ w, y0, t, spec.replace(checkpoint=True), adjoint_params=(w,))
    (g,) = torch.autograd.grad(ys[-1].sum(), w)
    ys = solve(lambda t, y: y @ w, y0, t, spec)
    torch.testing.assert_close(g, torch.autograd.grad(ys[-1].sum(), w)[0])


def test_a_plain_function_needs_explicit_params():
    spec = SolverSpec(adjoint=False, checkpoint=True)
    with pytest.raises(SolverInputError, match="adjoint_params"):
        solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), spec)


def test_bad_checkpoint_settings_are_refused_with_what_to_do():
    with pytest.raises(SolverInputError, match="adjoint=False"):
        SolverSpec(checkpoint=True)
    with pytest.raises(SolverInputError, match="explicit Runge-Kutta"):
        SolverSpec(method="implicit_euler", options={"step_size": 0.1}, adjoint=False,
                   checkpoint=True)
    with pytest.raises(SolverInputError, match="True or False"):
        SolverSpec(adjoint=False, checkpoint="yes")


def test_differentiating_twice_raises():
    torch.manual_seed(4)
    func, y0 = JumpField(), torch.randn(2, 3, dtype=F64, requires_grad=True)
    ys = solve(func, y0, torch.tensor([0.0, 1.0], dtype=F64),
               SolverSpec(adjoint=False, checkpoint=True))
    (g,) = torch.autograd.grad(ys[-1].pow(2).sum(), y0, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_the_training_core_builds_checkpointed_models_for_backprop_only():
    data = load_dataset("spirals", seed=0, subset=8)
    task = make_task(data, TaskSettings(width=8, solver_changes={"checkpoint": True}))
    specs = {adjoint: [b.solver for b in task.build_model(adjoint).modules()
                       if hasattr(b, "solver") and isinstance(b.solver, SolverSpec)]
             for adjoint in (False, True)}
    assert specs[False] and all(s.checkpoint and not s.adjoint for s in specs[False])
    assert specs[True] and all(s.adjoint and not s.checkpoint for s in specs[True])


def test_the_config_refuses_checkpoint_steps_with_the_adjoint_or_newton_cg():
    with pytest.raises(ValueError, match="adjoint=False"):
        TrainConfig(dataset="spirals", checkpoint_steps=True).validate()
    with pytest.raises(ValueError, match="newton-cg"):
        TrainConfig(dataset="spirals", checkpoint_steps=True, adjoint=False,
                    optimizer="newton-cg").validate()
    TrainConfig(dataset="spirals", checkpoint_steps=True, adjoint=False).validate()


def test_kfac_through_the_solver_sees_the_same_evaluations_as_with_backprop():
    """Hooks on the field's layers get each evaluation once, with its whole output gradient:
    K-FAC's factors (every row) equal plain backpropagation's."""
    from ocnode.optim import SNOpt

    data = load_dataset("spirals", seed=0, subset=16)
    states = []
    for checkpoint in (False, True):
        task = make_task(data, TaskSettings(width=8, solver_changes={
            "method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "checkpoint": checkpoint}))
        torch.manual_seed(0)
        model = task.build_model(False).to(F64)
        opt = SNOpt(model, lr=0.02, update_freq=1, factor_cost=None)
        batch = tuple(x.to(F64) if x.is_floating_point() else x for x in next(task.batches(0)))
        task.loss(model, batch).backward()
        opt.step()
        states.append({(i, k): v for i, p in enumerate(model.parameters())
                       for k, v in opt.state[p].items() if torch.is_tensor(v)})
    assert states[0].keys() == states[1].keys() and any(k[1] == "b_factor" for k in states[0])
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-7, atol=1e-7)


def test_without_grad_a_checkpointed_spec_solves_plainly():
    """Evaluation under no_grad has nothing to replay: no parameters are needed."""
    spec = SolverSpec(adjoint=False, checkpoint=True)
    with torch.no_grad():
        ys = solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), spec)
    torch.testing.assert_close(ys[-1], torch.full((2,), torch.e ** -1), rtol=1e-3, atol=1e-3)
