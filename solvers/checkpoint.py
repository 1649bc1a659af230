"""Backpropagation through the solver with checkpoints: the discrete gradient at small memory.

Backpropagation through the solver (``adjoint=False``) keeps the graph of every stage of
every step (rejected ones included) until ``backward()``: memory grows with the number of
steps times the field's activations. The adjoint (``adjoint=True``) needs O(1) memory but
solves a second ODE backward, restarting at every output time, and its gradient is that of
the continuous problem, only within the tolerance of the discrete one.

``SolverSpec(adjoint=False, checkpoint=True)`` takes a third way, the checkpointed discrete
adjoint (Gholami, Keutzer, Biros 2019, "ANODE"; Zhuang et al. 2020, "Adaptive Checkpoint
Adjoint Method for Gradient Estimation in Neural ODE"; diffrax's default): the forward solve
runs without a graph and keeps only each accepted step's start (time, size, state); the
backward replays the steps from the last to the first, each with a graph of one step, and
backpropagates through it. The gradient is backpropagation's through the accepted steps (to
rounding), at one forward solve and one evaluation per step more than backpropagation, with
memory of one state per step plus one step's graph.

Explicit Runge-Kutta methods only (adaptive and fixed-step); the replay calls no step
callbacks and cannot be differentiated twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from solvers.flat import FlatState, adaptive_stops, make_rhs, solve_flat
from solvers.integrate import (
    Progress,
    StepCallbacks,
    _coefficients,
    _dense,
    _hermite,
    _Stages,
    at_side,
    chain_callbacks,
    rk_step,
)
from solvers.spec import SolverSpec
from solvers.stats import SolverStats
from solvers.tableau import ButcherTableau, get_tableau


@dataclass
class _Step:
    """One accepted step of the forward solve: its start, size, end, start state, and the
    outputs it emitted as (output index, output time), all on internal time."""

    s0: float
    dt: float
    s1: float
    y0: torch.Tensor
    outputs: list[tuple[int, float]] = field(default_factory=list)


class _Recorder(StepCallbacks):
    """Keeps the accepted steps of a solve and which outputs each step emitted."""

    def __init__(self, stops: Sequence[float]) -> None:
        self.steps: list[_Step] = []
        self.stops = stops

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        if self.steps:  # a step ends exactly where the next one starts
            self.steps[-1].s1 = s
        # the engine shortens a step that would pass a stop to end on it exactly
        s1 = next((stop for stop in self.stops if stop > s and stop - s == dt), s + dt)
        self.steps.append(_Step(s, dt, s1, y.detach().clone()))

    def emitted(self, j: int, s: float) -> None:
        if j > 0:  # output 0 is the initial state itself
            self.steps[-1].outputs.append((j, s))


@dataclass
class _Config:
    """What the backward replay needs of the forward solve."""

    func: Callable
    flat: FlatState
    times: list[float]  # internal times s_out, increasing
    direction: float
    spec: SolverSpec
    stats: SolverStats
    backward_stats: SolverStats
    progress: Progress
    callbacks: StepCallbacks
    steps: list[_Step] = field(default_factory=list)


def solve_checkpointed(cfg: _Config, y0: torch.Tensor,
                       params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The solution at cfg.times, shape (T, n), differentiable in y0 and ``params`` by
    replaying each step (row 0 is y0 itself)."""
    return _CheckpointFunction.apply(cfg, y0, *params)


def make_config(func: Callable, flat: FlatState, times: list[float], direction: float,
                spec: SolverSpec, stats: SolverStats, backward_stats: SolverStats,
                progress: Progress, callbacks: StepCallbacks) -> _Config:
    """The configuration of one checkpointed solve (see :func:`solve_checkpointed`)."""
    return _Config(func, flat, times, direction, spec, stats, backward_stats, progress,
                   callbacks)


class _CheckpointFunction(torch.autograd.Function):
    """Forward without graph, keeping step starts; backward by replaying each step."""

    @staticmethod
    def forward(ctx: Any, cfg: _Config, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        rhs = make_rhs(cfg.func, cfg.flat, y0.device, cfg.direction, cfg.stats)
        stops = [s for s, _ in adaptive_stops(cfg.spec.solve_options(), cfg.direction)]
        recorder = _Recorder(stops)
        outs: list[torch.Tensor] = []

        def emit(j: int, s: float, y: torch.Tensor) -> None:
            recorder.emitted(j, s)
            outs.append(y.clone())

        solve_flat(rhs, y0, cfg.times, emit, cfg.spec, cfg.flat, cfg.stats,
                   progress=cfg.progress, callbacks=chain_callbacks(cfg.callbacks, recorder))
        cfg.steps = recorder.steps
        if not get_tableau(cfg.spec.method).adaptive:  # a fixed grid ends on the last time
            cfg.steps[-1].s1 = cfg.times[-1]
        ctx.cfg, ctx.n_params = cfg, len(params)
        ctx.save_for_backward(*params)
        return torch.stack(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple:
        cfg, params = ctx.cfg, ctx.saved_tensors
        wanted = [p for p in params if p.requires_grad]
        lam, grads = _replay_backward(cfg, grad_ys, wanted)
        by_param = iter(grads)
        param_grads = [next(by_param) if p.requires_grad else None for p in params]
        return (None, lam + grad_ys[0], *param_grads)


def _replay_backward(cfg: _Config, grad_ys: torch.Tensor,
                     params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(dL/dy0 through the steps, dL/dparams): each step replayed with a graph, last first.

    A step's first stage is, in the forward solve, the previous step's last evaluation (the
    FSAL stage of an adaptive pair, the slope at the grid point of a fixed one). The replay
    keeps that structure: the first stage enters a step as a leaf whose gradient goes back
    to the evaluation that made it, so that every evaluation of the forward solve is replayed
    once and receives its whole output gradient (what hooks on the field's layers, e.g.
    K-FAC's, see) - except where the forward evaluated it afresh: the first step, and after
    a jump.
    """
    tab = get_tableau(cfg.spec.method)
    assert isinstance(tab, ButcherTableau)  # SolverSpec refuses checkpoint=True otherwise
    rhs = make_rhs(cfg.func, cfg.flat, grad_ys.device, cfg.direction, cfg.backward_stats)
    sides = _start_sides(cfg, tab)
    lam: torch.Tensor | None = None  # dL/d(state at the end of the current step)
    lam_f: torch.Tensor | None = None  # dL/d(first stage of the following step)
    totals: list[torch.Tensor | None] = [None] * len(params)
    last = len(cfg.steps) - 1
    for k in range(last, -1, -1):
        step, (start, end, fresh) = cfg.steps[k], sides[k]
        with torch.enable_grad():
            y = step.y0.requires_grad_(True)
            if fresh:
                f0 = rhs(at_side(step.s0, start), y)
            else:
                with torch.no_grad():
                    f0 = rhs(at_side(step.s0, start), y)
                f0.requires_grad_(True)
            y1, f_next, outs = _replay_step(rhs, tab, step, y, f0, (start, end), k < last)
        pairs = [(y1, lam), (f_next, lam_f), *zip(outs, (grad_ys[j] for j, _ in step.outputs))]
        roots, seeds = zip(*[(r, g) for r, g in pairs if r is not None and g is not None])
        inputs = [y, *params] if fresh else [y, *params, f0]
        got = torch.autograd.grad(roots, inputs, seeds, allow_unused=True)
        lam = got[0] if got[0] is not None else torch.zeros_like(y)
        lam_f = None if fresh else got[-1]
        totals = [t if g is None else (g if t is None else t + g)
                  for t, g in zip(totals, got[1:1 + len(params)])]
        step.y0 = step.y0.detach()
    lam = lam if lam is not None else torch.zeros_like(grad_ys[0])
    return lam, [torch.zeros_like(p) if t is None else t for p, t in zip(params, totals)]


def _start_sides(cfg: _Config, tab: ButcherTableau) -> list[tuple[int, int, bool]]:
    """Per step: the side of its first stage's time and of its node-1 stages' times (see
    :class:`solvers.integrate.SideTime`), and whether the forward solve evaluated its first
    stage afresh (the first step; a step after a jump) rather than at the end of the
    previous step."""
    n = len(cfg.steps)
    if not tab.adaptive:
        perturb = bool(cfg.spec.solve_options().get("perturb", False))
        start, end = (1, -1) if perturb else (0, 0)
        return [(start, end, k == 0) for k in range(n)]
    jumps = {s for s, jump in adaptive_stops(cfg.spec.solve_options(), cfg.direction) if jump}
    # the FSAL stage is evaluated just before the step's end; after a jump the field is
    # evaluated again just after it
    return [(0, -1, True) if k == 0 else (1, -1, True) if step.s0 in jumps else (-1, -1, False)
            for k, step in enumerate(cfg.steps)]


def _replay_step(rhs: Callable, tab: ButcherTableau, step: _Step, y: torch.Tensor,
                 f0: torch.Tensor, sides: tuple[int, int], has_next: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The step from (step.s0, y) with first stage f0 again, with a graph: (y1, the
    evaluation that is the next step's first stage, or None, the outputs it emitted)."""
    thetas = [min(1.0, (s - step.s0) / (step.s1 - step.s0)) for _, s in step.outputs]
    coeffs = _coefficients(tab, y.dtype, y.device)
    stages = _Stages(tab.stages, y, graph=True)
    stages.set(0, f0)
    y1 = rk_step(rhs, tab, coeffs, step.s0, y, step.dt, stages, step.s1, sides[1])
    if tab.adaptive:
        value_at = _dense(tab, stages, y, step.dt)
        return y1, stages.get(tab.stages - 1), [value_at(theta) for theta in thetas]
    # as integrate_fixed: the slope at the step's end serves the next step and the cubic
    # Hermite interpolant inside this one
    inside = any(theta < 1.0 - 1e-12 for theta in thetas)
    f1 = rhs(at_side(step.s1, sides[0]), y1) if has_next or inside else None
    outs = [y1 if f1 is None or theta >= 1.0 - 1e-12 else _hermite(y, y1, f0, f1, step.dt, theta)
            for theta in thetas]
    return y1, f1, outs
