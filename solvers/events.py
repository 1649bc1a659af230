"""Terminal events: integrate until ``event_fn(t, y)`` crosses zero (torchdiffeq's
``event_fn``), and the gradient of the event time.

The solve steps as usual (adaptive Runge-Kutta, or any fixed-grid method: explicit,
implicit or Adams) and checks the sign of the event function at the end of every accepted
step; in the step where it changes, the event time is found by bisection on the step's dense
output (fixed grids: cubic Hermite, or linear with ``interp='linear'``), to ``atol`` in time
(the smallest value of a tuple ``atol``; torchdiffeq's rule: ceil(log2(step / atol))
halvings, then the middle of the last bracket). A multivariate event function ends the solve
when any of its entries changes sign (torchdiffeq's ``min(c * sign(c(t0, y0)))``).

The event time depends on the parameters through the state: g(t*, y(t*; theta)) = 0 gives
dt*/dtheta = -(dg/dy . dy/dtheta) / (dg/dt + dg/dy . f) (the implicit function theorem).
:class:`EventGradient` puts that on the solution at the event, as torchdiffeq's
``odeint_event`` does, so that gradients of the event time reach every input of the solve
(backpropagation or the adjoint). Like torchdiffeq, a direct dependence of ``event_fn`` on
parameters of its own is not differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from solvers.compiled import compile_arguments
from solvers.errors import MaxStepsExceededError, SolverInputError
from solvers.flat import (
    FlatState,
    adaptive_stops,
    callback_time_dtype,
    flat_tolerances,
    solve_flat,
    step_control,
)
from solvers.integrate import (
    NO_CALLBACKS,
    FlatTol,
    Norm,
    Progress,
    Rhs,
    StepCallbacks,
    _hermite_at,
    adaptive_steps,
)
from solvers.spec import SolverSpec, fixed_interp, method_kind, smallest
from solvers.stats import SolverStats
from solvers.tableau import ButcherTableau, get_tableau

#: Steps a fixed-step solve takes at most looking for the event (torchdiffeq's limit).
MAX_FIXED_EVENT_STEPS = 20_000

#: An event function on the engine's terms: (internal time, flat state) -> its value.
FlatEvent = Callable[[float, torch.Tensor], torch.Tensor]


def combine_event_fn(event_fn: Callable, t0: torch.Tensor, y0: Any) -> Callable:
    """One scalar event function from a (possibly multivariate) one: every entry is made
    positive at (t0, y0), and the minimum is taken, so that it crosses zero when the first
    entry does."""
    with torch.no_grad():
        signs = torch.sign(event_fn(t0, y0))

    def combined(t: torch.Tensor, y: Any) -> torch.Tensor:
        return torch.min(event_fn(t, y) * signs)
    return combined


def integrate_until_event(rhs: Rhs, y0: torch.Tensor, s0: float, event: FlatEvent,
                          spec: SolverSpec, flat: FlatState, stats: SolverStats,
                          progress: Progress | None = None,
                          callbacks: StepCallbacks = NO_CALLBACKS,
                          norm: Norm | None = None) -> tuple[float, torch.Tensor]:
    """Integrate from (s0, y0) forward in internal time until ``event`` changes sign.

    Returns:
        (internal event time, flat state there); (s0, y0) when the event is 0 at the start.

    Raises:
        SolverInputError: ``scipy_solver`` (no event handling, as torchdiffeq's), or a
            fixed-grid method (explicit, implicit, Adams) without
            ``options={'step_size': ...}``.
        MaxStepsExceededError: no event within ``max_num_steps`` (adaptive) or
            :data:`MAX_FIXED_EVENT_STEPS` steps (fixed grid); the solver errors of a failed
            solve.
    """
    progress = progress or Progress()
    kind = method_kind(spec.method)
    if kind == "scipy":
        raise SolverInputError(
            f"event_fn is not supported by method {spec.method!r} (nor by torchdiffeq's); use "
            "an adaptive method such as 'dopri5'")
    if compile_arguments(spec.solve_options().get("compile")) is not None:
        raise SolverInputError("options['compile'] is not supported with event_fn (the event "
                               "search runs eagerly): drop one of them")
    tolerances = flat_tolerances(spec, flat, y0)
    with torch.no_grad():
        g0 = event(s0, y0)
    if bool(g0 == 0):
        return s0, y0
    sign0 = torch.sign(g0)
    if kind == "adaptive":
        tab = get_tableau(spec.method)
        assert isinstance(tab, ButcherTableau)
        return _adaptive_event(rhs, y0, s0, event, sign0, tab, spec, flat, stats, progress,
                               callbacks, norm, tolerances)
    return _grid_event(rhs, y0, s0, event, sign0, spec, flat, stats, progress, callbacks)


def _adaptive_event(rhs: Rhs, y0: torch.Tensor, s0: float, event: FlatEvent,
                    sign0: torch.Tensor, tab: ButcherTableau, spec: SolverSpec,
                    flat: FlatState, stats: SolverStats, progress: Progress,
                    callbacks: StepCallbacks, norm: Norm | None,
                    tolerances: tuple[FlatTol, FlatTol]) -> tuple[float, torch.Tensor]:
    ctl, default_norm = step_control(spec, flat, tolerances)
    stops = adaptive_stops(spec.solve_options(), progress.direction)  # step_t and jump_t
    steps = adaptive_steps(rhs, y0, s0, tab, ctl, norm or default_norm, stats, progress,
                           callbacks, stops)
    next(steps)
    try:
        for step in steps:
            with torch.no_grad():
                crossed = bool(torch.sign(event(step.t1, step.y1)) != sign0)
            if crossed:
                assert step.value_at is not None
                return bisect_event(step.value_at, step.t0, step.t1, event, sign0,
                                    smallest(spec.atol))
    finally:
        steps.close()
    raise AssertionError("unreachable: adaptive_steps never ends")  # pragma: no cover


def _grid_event(rhs: Rhs, y0: torch.Tensor, s0: float, event: FlatEvent, sign0: torch.Tensor,
                spec: SolverSpec, flat: FlatState, stats: SolverStats, progress: Progress,
                callbacks: StepCallbacks) -> tuple[float, torch.Tensor]:
    """A fixed-grid method's event solve (explicit, implicit or Adams): its own loop on the
    grid of ``step_size``, watched by :class:`_FixedEventWatch`."""
    options = spec.solve_options()
    h = options.get("step_size")
    if h is None:
        raise SolverInputError(
            f"event handling with the fixed-step method {spec.method!r} needs "
            "options={'step_size': ...} (or use an adaptive method such as 'dopri5')")
    watch = _FixedEventWatch(rhs, event, sign0, smallest(spec.atol), callbacks,
                             fixed_interp(options))
    # the event is checked at the start of each step: one step more than the limit
    s_end = s0 + (MAX_FIXED_EVENT_STEPS + 1) * float(h)
    try:
        solve_flat(watch.rhs, y0, [s0, s_end], lambda j, s, y: None, spec, flat, stats,
                   progress=progress, callbacks=watch)
    except _EventFound as found:
        return found.s, found.y
    raise MaxStepsExceededError(
        progress.time(s0 + MAX_FIXED_EVENT_STEPS * float(h)), float(h), MAX_FIXED_EVENT_STEPS,
        f"No event within the {MAX_FIXED_EVENT_STEPS} steps a fixed-step event solve may "
        "take: check that event_fn changes sign along the solution, or take a larger "
        "step_size.")


class _EventFound(Exception):
    """Ends a fixed-step solve: the event time and the state there."""

    def __init__(self, s: float, y: torch.Tensor) -> None:
        super().__init__(s)
        self.s, self.y = s, y


class _FixedEventWatch(StepCallbacks):
    """Watches a fixed-grid solve (explicit, implicit or Adams) for the event.

    At the start of every step after the first it checks the sign of the event at the grid
    point reached; when it changed, it finds the event in the step just taken by bisection on
    the step's output (cubic Hermite, or ``interp='linear'``: the straight line, as
    torchdiffeq's default) and raises :class:`_EventFound`. Its :meth:`rhs` wraps the
    solve's right-hand side to keep the last evaluation, which at a step's start is f there
    (every fixed-grid loop evaluates f at a step's end, for the next step or its output,
    after its stages, Newton solves or corrector). Otherwise it passes the calls on to
    ``callbacks``.
    """

    def __init__(self, rhs: Rhs, event: FlatEvent, sign0: torch.Tensor, tol: float,
                 callbacks: StepCallbacks, interp: str = "cubic") -> None:
        self.inner, self.event, self.sign0, self.tol = rhs, event, sign0, tol
        self.callbacks, self.interp = callbacks, interp
        self.f: torch.Tensor | None = None
        self.previous: tuple[float, torch.Tensor, torch.Tensor] | None = None

    def rhs(self, s: float, y: torch.Tensor) -> torch.Tensor:
        self.f = self.inner(s, y)
        return self.f

    def step(self, s: float, y: torch.Tensor, dt: float) -> None:
        assert self.f is not None  # f(s, y), evaluated just before the step
        if self.previous is not None:
            with torch.no_grad():
                crossed = bool(torch.sign(self.event(s, y)) != self.sign0)
            if crossed:
                s0, y0, f0 = self.previous
                value_at = _hermite_at(y0, y, f0, self.f, s - s0, self.interp)
                raise _EventFound(*bisect_event(value_at, s0, s, self.event, self.sign0,
                                                self.tol))
        self.previous = (s, y, self.f)  # the fixed-grid loops make a new state every step
        self.callbacks.step(s, y, dt)

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        self.callbacks.accept(s, y, dt)


def bisect_event(value_at: Callable[[float], torch.Tensor], s0: float, s1: float,
                 event: FlatEvent, sign0: torch.Tensor, tol: float) -> tuple[float, torch.Tensor]:
    """The event time in the step [s0, s1] by bisection on its dense output ``value_at``,
    to ``tol`` in time; returns it and the state there (with the graph of the dense output
    when autograd records)."""
    lo, hi = s0, s1
    n = math.ceil(math.log((s1 - s0) / tol, 2)) if s1 - s0 > tol else 0
    with torch.no_grad():
        for _ in range(n):
            mid = 0.5 * (lo + hi)
            if bool(torch.sign(event(mid, value_at((mid - s0) / (s1 - s0)))) == sign0):
                lo = mid
            else:
                hi = mid
    s = 0.5 * (lo + hi)
    return s, value_at((s - s0) / (s1 - s0))


class EventGradient(torch.autograd.Function):
    """Passes the event time and the state there through; its backward adds the event
    time's gradient to the state's by the implicit function theorem (module docstring).

    Inputs: ``func(t, y)`` and the combined ``event_fn(t, y)`` on the caller's time and
    structure, the FlatState, the event time (caller's time, 0-dim) and the flat state.
    """

    @staticmethod
    def forward(ctx: Any, func: Callable, event_fn: Callable, flat: FlatState,
                event_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.func, ctx.event_fn, ctx.flat = func, event_fn, flat
        ctx.save_for_backward(event_t, state)
        return event_t.detach().clone(), state.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_t: torch.Tensor | None,
                 grad_state: torch.Tensor | None) -> tuple:
        event_t, state = ctx.saved_tensors
        flat: FlatState = ctx.flat
        grad_t = torch.zeros_like(event_t) if grad_t is None else grad_t
        grad_state = torch.zeros_like(state) if grad_state is None else grad_state
        with torch.enable_grad():
            tt = event_t.detach().requires_grad_(True)
            yy = state.detach().requires_grad_(True)
            g = ctx.event_fn(tt, flat.unflatten(yy))
            dg_dt, dg_dy = torch.autograd.grad(g, (tt, yy), allow_unused=True)
        dg_dt = torch.zeros_like(event_t) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(state) if dg_dy is None else dg_dy
        with torch.no_grad():
            t_f = event_t.detach().to(state.dtype)
            f = flat.flatten(ctx.func(t_f, flat.unflatten(state.detach())))
            dg_total = dg_dt.to(state.dtype) + (dg_dy * f).sum()  # dg/dt along the solution
            total_t = grad_t.to(state.dtype) + (grad_state * f).sum()
            if bool(dg_total == 0):
                raise SolverInputError(
                    "the event function does not cross zero transversally at the event "
                    "(its derivative along the solution is 0): the event time has no gradient")
            grad_y = grad_state - dg_dy * (total_t / dg_total)
        return None, None, None, None, grad_y


def solve_until_event(rhs: Rhs, flat: FlatState, y0: torch.Tensor, y0_user: Any, t0: float,
                      direction: float, event_fn: Callable, spec: SolverSpec,
                      stats: SolverStats, progress: Progress,
                      callbacks: StepCallbacks = NO_CALLBACKS) -> tuple[float, torch.Tensor]:
    """:func:`integrate_until_event` on the caller's terms: ``event_fn(t, y)`` with the
    caller's time (a 0-dim tensor in the callbacks' time dtype, the state's on a fixed
    grid) and the state's structure, from (t0, y0) in the direction ``direction``.

    Returns:
        (the caller's event time, the flat state there).
    """
    dtype = callback_time_dtype(spec, y0.dtype, y0.dtype)
    combined = combine_event_fn(event_fn, torch.tensor(t0, dtype=dtype, device=y0.device),
                                y0_user)

    def event(s: float, y: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(direction * s + 0.0, dtype=dtype, device=y.device)
        return combined(t, flat.unflatten(y))

    s_event, y_event = integrate_until_event(rhs, y0, direction * t0, event, spec, flat, stats,
                                             progress, callbacks)
    return direction * s_event + 0.0, y_event


def check_event_times(t: torch.Tensor) -> None:
    """Event mode takes t = [t0, t1]: t1 only gives the direction (torchdiffeq's rule)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise SolverInputError(
            f"with event_fn, t must be [t0, t1] (t1 only sets the direction of time), got "
            f"{shape}; or use solvers.odeint_event(func, y0, t0, event_fn=...)")
