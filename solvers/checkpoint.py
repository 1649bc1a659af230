"""Backpropagation through the solver with checkpoints: the discrete gradient at small memory.

Backpropagation through the solver (``adjoint=False``) keeps the graph of every stage of
every step (rejected ones included) until ``backward()``: memory grows with the number of
steps times the field's activations. The adjoint (``adjoint=True``) needs O(1) memory but
solves a second ODE backward, restarting at every output time, and its gradient is that of
the continuous problem, only within the tolerance of the discrete one.

``SolverSpec(adjoint=False, checkpoint=True)`` takes a third way, the checkpointed discrete
adjoint (Gholami, Keutzer, Biros 2019, "ANODE"; Zhuang et al. 2020, "Adaptive Checkpoint
Adjoint Method for Gradient Estimation in Neural ODE"; diffrax's default): the forward solve
runs without a graph and keeps only each accepted step's start (time, size, state, first
stage); the backward replays the steps from the last to the first with a graph, in segments
of consecutive steps whose graph stays under :data:`SEGMENT_BYTES` (at least one step), and
backpropagates through each segment. The gradient is backpropagation's through the accepted
steps (to rounding), at the cost of one forward solve without graph more, with memory of two
states per step plus one segment's graph. Hooks on the field's layers (K-FAC through the
solver) see each evaluation of the forward solve once, with its whole output gradient, as
under plain backpropagation.

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
    _hermite_at,
    _Stages,
    at_side,
    chain_callbacks,
    rk_step,
)
from solvers.spec import SolverSpec, fixed_interp
from solvers.stats import SolverStats
from solvers.tableau import ButcherTableau, get_tableau


@dataclass
class _Step:
    """One accepted step of the forward solve: its start, size, end, start state, first
    stage f(s0, y0) and the outputs it emitted as (output index, output time), all on
    internal time."""

    s0: float
    dt: float
    s1: float
    y0: torch.Tensor
    f0: torch.Tensor | None
    outputs: list[tuple[int, float]] = field(default_factory=list)


class _Recorder(StepCallbacks):
    """Keeps the accepted steps of a solve and which outputs each step emitted.

    The engine evaluates a step's first stage on the very tensor that becomes the step's
    start state (the previous step's FSAL stage, or the slope at a grid point), so the
    evaluations since the previous accepted step, keyed by their input tensor, give it.
    """

    def __init__(self, stops: Sequence[float]) -> None:
        self.steps: list[_Step] = []
        self.stops = stops
        self._recent: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output)
        self._older: list[tuple[torch.Tensor, torch.Tensor]] = []

    def watch(self, rhs: Callable) -> Callable:
        """``rhs``, remembering its recent evaluations."""
        def watched(s: float, y: torch.Tensor) -> torch.Tensor:
            out = rhs(s, y)
            self._recent.append((y, out))
            return out
        return watched

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        if self.steps:  # a step ends exactly where the next one starts
            self.steps[-1].s1 = s
        # the engine shortens a step that would pass a stop to end on it exactly
        s1 = next((stop for stop in self.stops if stop > s and stop - s == dt), s + dt)
        f0 = next((out for inp, out in reversed(self._older + self._recent) if inp is y), None)
        self._older, self._recent = self._recent, []
        self.steps.append(_Step(s, dt, s1, y.detach().clone(),
                                None if f0 is None else f0.detach().clone()))

    def emitted(self, j: int, s: float) -> None:
        if j > 0:  # output 0 is the initial state itself
            self.steps[-1].outputs.append((j, s))


@dataclass
class CheckpointedSolve:
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


def solve_checkpointed(cfg: CheckpointedSolve, y0: torch.Tensor,
                       params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The solution at cfg.times, shape (T, n), differentiable in y0 and ``params`` by
    replaying each step (row 0 is y0 itself)."""
    return _CheckpointFunction.apply(cfg, y0, *params)


class _CheckpointFunction(torch.autograd.Function):
    """Forward without graph, keeping step starts; backward by replaying each step."""

    @staticmethod
    def forward(ctx: Any, cfg: CheckpointedSolve, y0: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        rhs = make_rhs(cfg.func, cfg.flat, y0.device, cfg.direction, cfg.stats)
        stops = [s for s, _ in adaptive_stops(cfg.spec.solve_options(), cfg.direction)]
        recorder = _Recorder(stops)
        outs: list[torch.Tensor] = []

        def emit(j: int, s: float, y: torch.Tensor) -> None:
            recorder.emitted(j, s)
            outs.append(y.clone())

        solve_flat(recorder.watch(rhs), y0, cfg.times, emit, cfg.spec, cfg.flat, cfg.stats,
                   progress=cfg.progress, callbacks=chain_callbacks(cfg.callbacks, recorder))
        cfg.steps = recorder.steps
        if cfg.steps and not get_tableau(cfg.spec.method).adaptive:
            cfg.steps[-1].s1 = cfg.times[-1]  # a fixed grid ends on the last time
        ctx.cfg = cfg
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


#: The replay backpropagates through segments of consecutive steps whose graph stays under
#: this many bytes (at least one step): one backward call per segment instead of per step
#: (a backward call's fixed cost exceeds a small field's step), memory still bounded.
SEGMENT_BYTES = 8 * 2**20


@dataclass
class _Replay:
    """The backward replay's running state: the gradients arriving at the end of the part
    not yet replayed, and the parameters' gradients so far."""

    lam: torch.Tensor | None = None  # dL/d(state at the end of the next segment to replay)
    lam_f: torch.Tensor | None = None  # dL/d(first stage of the step after that segment)
    totals: list[torch.Tensor | None] = field(default_factory=list)


def _replay_backward(cfg: CheckpointedSolve, grad_ys: torch.Tensor,
                     params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(dL/dy0 through the steps, dL/dparams): the steps replayed with a graph in segments
    (:data:`SEGMENT_BYTES`), the last segment first; the last step alone measures a step's
    graph.

    A step's first stage is, in the forward solve, the previous step's last evaluation (the
    FSAL stage of an adaptive pair, the slope at the grid point of a fixed one). The replay
    keeps that structure: inside a segment the stages chain as they did, and a segment's
    first stage enters as a leaf whose gradient goes back to the evaluation that made it, so
    that every evaluation of the forward solve is replayed once and receives its whole output
    gradient (what hooks on the field's layers, e.g. K-FAC's, see) - except where the
    forward evaluated it afresh: the first step, and after a jump.
    """
    tab = get_tableau(cfg.spec.method)
    assert isinstance(tab, ButcherTableau)  # SolverSpec refuses checkpoint=True otherwise
    rhs = make_rhs(cfg.func, cfg.flat, grad_ys.device, cfg.direction, cfg.backward_stats)
    sides = _start_sides(cfg, tab)
    state = _Replay(totals=[None] * len(params))
    end, size = len(cfg.steps) - 1, 1
    while end >= 0:
        first = max(0, end - size + 1)
        saved = _replay_segment(cfg, rhs, tab, sides, first, end, grad_ys, params, state)
        if end == len(cfg.steps) - 1:  # the last step alone: size the segments by it
            size = max(1, SEGMENT_BYTES // max(1, saved))
        end = first - 1
    lam = state.lam if state.lam is not None else torch.zeros_like(grad_ys[0])
    return lam, [torch.zeros_like(p) if t is None else t for p, t in zip(params, state.totals)]


def _replay_segment(cfg: CheckpointedSolve, rhs: Callable, tab: ButcherTableau,
                    sides: list[tuple[int, int, bool]], first: int, last: int,
                    grad_ys: torch.Tensor, params: list[torch.Tensor], state: _Replay) -> int:
    """Replay steps first..last with one graph and backpropagate through it, updating
    ``state``; returns the bytes the graph saved."""
    saved = [0]

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved[0] += x.numel() * x.element_size()
        return x

    step = cfg.steps[first]
    interp = fixed_interp(cfg.spec.solve_options())
    start_fresh = sides[first][2]
    roots: list[torch.Tensor] = []
    seeds: list[torch.Tensor] = []
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        y = y_start = step.y0.detach().requires_grad_(True)
        f0 = f0_start = _first_stage(rhs, step, sides[first], y)
        for k in range(first, last + 1):
            step, (start, end, fresh) = cfg.steps[k], sides[k]
            if k > first and fresh:  # after a jump the forward evaluated the field again
                f0 = rhs(at_side(step.s0, start), y)
            y, f_next, outs = _replay_step(rhs, tab, step, y, f0, (start, end),
                                           k < len(cfg.steps) - 1, interp)
            roots += outs
            seeds += [grad_ys[j] for j, _ in step.outputs]
            f0 = f_next  # type: ignore[assignment]  # None only after the very last step
    for root, seed in ((y, state.lam), (f0, state.lam_f)):
        if root is not None and seed is not None:
            roots.append(root)
            seeds.append(seed)
    inputs = [y_start, *params] if start_fresh else [y_start, *params, f0_start]
    got = torch.autograd.grad(roots, inputs, seeds, allow_unused=True)
    state.lam = got[0] if got[0] is not None else torch.zeros_like(y_start)
    state.lam_f = None if start_fresh else got[-1]
    state.totals = [t if g is None else (g if t is None else t + g)
                    for t, g in zip(state.totals, got[1:1 + len(params)])]
    return saved[0]


def _first_stage(rhs: Callable, step: _Step, sides: tuple[int, int, bool],
                 y: torch.Tensor) -> torch.Tensor:
    """A segment's first stage: evaluated with a graph where the forward evaluated it
    afresh, otherwise a leaf holding the value the forward computed."""
    start, _, fresh = sides
    if fresh:
        return rhs(at_side(step.s0, start), y)
    f0 = step.f0 if step.f0 is not None else _value(rhs, step, start, y)
    return f0.detach().requires_grad_(True)


def _value(rhs: Callable, step: _Step, side: int, y: torch.Tensor) -> torch.Tensor:
    """f(step.s0, y) without a graph (a first stage the forward solve did not keep)."""
    with torch.no_grad():
        return rhs(at_side(step.s0, side), y)


def _start_sides(cfg: CheckpointedSolve, tab: ButcherTableau) -> list[tuple[int, int, bool]]:
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
                 f0: torch.Tensor, sides: tuple[int, int], has_next: bool,
                 interp: str = "cubic"
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The step from (step.s0, y) with first stage f0 again, with a graph: (y1, the
    evaluation that is the next step's first stage, or None, the outputs it emitted;
    ``interp``: a fixed grid's output between its points, as the forward's)."""
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
    inside = interp == "cubic" and any(theta < 1.0 - 1e-12 for theta in thetas)
    f1 = rhs(at_side(step.s1, sides[0]), y1) if has_next or inside else None
    value_at = _hermite_at(y, y1, f0, f1, step.dt, interp)
    return y1, f1, [value_at(theta) for theta in thetas]
