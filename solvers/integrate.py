"""The explicit Runge-Kutta engine on flat state vectors.

Everything here works on a 1-D state ``y`` of shape (n,) and a right-hand side
``rhs(t: float, y) -> (n,)``; :mod:`solvers.odeint` adapts user functions, tuples and
decreasing time to this form. Time is a Python float (float64) throughout; the state keeps the
caller's dtype.

The loop streams outputs: at each requested time it calls ``emit(index, t, y)`` with a view
that is only valid during the call, instead of stacking a trajectory. Adaptive methods step
freely and produce outputs by dense interpolation, so requesting more output times never
changes the steps taken (Hairer-Norsett-Wanner I, II.4 and II.6).

A :class:`Progress` maps the internal time to the caller's (errors and warnings report the
caller's time) and warns once, with a :class:`~solvers.errors.SlowSolveWarning`, when an
adaptive solve passes :data:`SLOW_SOLVE_STEPS` step attempts or :data:`SLOW_SOLVE_SECONDS`
seconds.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Protocol

import numpy as np
import torch

from solvers.errors import (
    MaxStepsExceededError,
    MinStepWarning,
    NonFiniteStateError,
    SlowSolveWarning,
    SolverInputError,
    StepSizeUnderflowError,
)
from solvers.stats import SolverStats
from solvers.tableau import ButcherTableau

Rhs = Callable[[float, torch.Tensor], torch.Tensor]
Emit = Callable[[int, float, torch.Tensor], None]
Norm = Callable[[torch.Tensor], float]

#: Step attempts (accepted and rejected) after which an adaptive solve warns that it is slow.
#: Well above a non-stiff solve's count: adaptive_heun (order 2) needs over 10,000 steps for
#: a few time units at odeint's default tolerances, dopri5 a few hundred.
SLOW_SOLVE_STEPS = 100_000
#: Seconds after which an adaptive solve warns that it is slow (a large CNF's solve can
#: legitimately take tens of seconds).
SLOW_SOLVE_SECONDS = 60.0


class Progress:
    """One solve as its caller sees it: the caller's time, its name, the slow-solve warning.

    The engine integrates forward on internal time s; the caller's time is
    ``t = direction * s``, which every error and warning reports. One Progress can span
    several engine calls (the adjoint's backward solve makes one per output interval): it
    warns at most once for all of them.

    Args:
        direction: +1.0, or -1.0 when the caller's time runs backward (t = -s).
        name: put in front of the warning, e.g. "backward (adjoint) solve".
    """

    def __init__(self, direction: float = 1.0, name: str = "") -> None:
        self.direction, self.name = direction, name
        self.steps, self.warned, self.min_step_warned = 0, False, False
        self.start = time.monotonic()

    def time(self, s: float) -> float:
        """The caller's time at internal time s."""
        return self.direction * s + 0.0  # + 0.0: report t=0, not t=-0

    def accept_min_step(self, s: float, dt: float, ratio: float) -> None:
        """A step of size min_step at s was accepted with error ratio > 1: warn once."""
        if not self.min_step_warned:
            self.min_step_warned = True
            warnings.warn(MinStepWarning(self.time(s), dt, ratio, self.name), stacklevel=3)

    def step(self, s: float, dt: float) -> None:
        """Count one step attempt of size dt at internal time s; warn once if it is slow."""
        self.steps += 1
        if self.warned:
            return
        seconds = time.monotonic() - self.start
        if self.steps >= SLOW_SOLVE_STEPS or seconds >= SLOW_SOLVE_SECONDS:
            self.warned = True
            warnings.warn(SlowSolveWarning(self.time(s), dt, self.steps, seconds, self.name),
                          stacklevel=3)


class SideTime(float):
    """An internal time at which the field is evaluated one floating-point step before
    (``side=-1``) or after (``side=+1``) the time itself, in the state's dtype: the two
    limits of a field that jumps there (torchdiffeq's ``Perturb.PREV`` / ``Perturb.NEXT``).

    It is a float, so a right-hand side that ignores the side simply sees the time;
    arithmetic on it gives plain floats. Right-hand sides built by :mod:`solvers.flat` and
    :mod:`solvers.adjoint` read it with :func:`side_of`.
    """

    side: int

    def __new__(cls, value: float, side: int) -> SideTime:
        obj = super().__new__(cls, value)
        obj.side = side
        return obj


def at_side(s: float, side: int) -> float:
    """s, tagged to be evaluated just before (-1) or after (+1) it; s itself for side 0."""
    return SideTime(s, side) if side else float(s)


def side_of(s: float) -> int:
    """The side of an internal time made by :func:`at_side` (0 for a plain float)."""
    return getattr(s, "side", 0)


class StepCallbacks:
    """What the engine calls around each step, on its internal time s (no-ops here: override
    what you need). The names follow torchdiffeq's ``callback_step``,
    ``callback_accept_step`` and ``callback_reject_step``; every call gets the step's start
    ``s``, the state there ``y`` (shape (n,), valid during the call only) and the step size.
    A fixed-step solve accepts every step."""

    def step(self, s: float, y: torch.Tensor, dt: float) -> None:
        """Before each step attempt."""

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        """After an accepted attempt (its stages are evaluated, the state not yet advanced)."""

    def reject(self, s: float, y: torch.Tensor, dt: float) -> None:
        """After a rejected attempt (adaptive methods only)."""


#: The callbacks of a solve that has none.
NO_CALLBACKS = StepCallbacks()


class CallbackChain(StepCallbacks):
    """Several StepCallbacks called in order."""

    def __init__(self, *callbacks: StepCallbacks) -> None:
        self.callbacks = list(callbacks)

    def step(self, s: float, y: torch.Tensor, dt: float) -> None:
        for c in self.callbacks:
            c.step(s, y, dt)

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        for c in self.callbacks:
            c.accept(s, y, dt)

    def reject(self, s: float, y: torch.Tensor, dt: float) -> None:
        for c in self.callbacks:
            c.reject(s, y, dt)


def chain_callbacks(*callbacks: StepCallbacks) -> StepCallbacks:
    """One StepCallbacks calling each of ``callbacks`` (NO_CALLBACKS when none is left)."""
    kept = [c for c in callbacks if c is not NO_CALLBACKS]
    if not kept:
        return NO_CALLBACKS
    return kept[0] if len(kept) == 1 else CallbackChain(*kept)


#: An error tolerance on a flat vector: a float, or per-element values of shape (n,) (the
#: tuple tolerances of a tuple state).
FlatTol = float | torch.Tensor


@dataclass(frozen=True)
class StepControl:
    """Options of the adaptive step-size controller (names follow torchdiffeq).

    The step factor is ``safety * r**(-icoeff/q) * r_prev**(pcoeff/q)`` clipped to
    [dfactor, ifactor], with r the error ratio and q the estimator order: an integral (I)
    controller by default, a PI controller when ``pcoeff > 0`` (Gustafsson 1991; Hairer-Wanner
    II.4 suggest icoeff=0.7, pcoeff=0.4).
    """

    rtol: FlatTol
    atol: FlatTol
    first_step: float | None = None
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    icoeff: float = 1.0
    pcoeff: float = 0.0
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: int = 2**31 - 1


@lru_cache(maxsize=64)
def _coefficients(tab: ButcherTableau, dtype: torch.dtype, device: torch.device) -> tuple:
    """Tableau arrays as tensors of the state's dtype/device (cached per method and dtype)."""
    def as_t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype, device=device)
    b_err = as_t(tab.b_err) if tab.b_err is not None else None
    return [as_t(row) for row in tab.a], as_t(tab.b), b_err


def rms_norm(v: torch.Tensor) -> float:
    """Root-mean-square norm, the default error norm. v: (n,)."""
    return float(torch.linalg.vector_norm(v)) / math.sqrt(max(v.numel(), 1))


def segment_norm(bounds: Sequence[tuple[int, int]]) -> Norm:
    """Max of the RMS norms of the given [start, stop) segments (tuple states, seminorm)."""
    def norm(v: torch.Tensor) -> float:
        return max(rms_norm(v[a:b]) for a, b in bounds)
    return norm


class _Stages:
    """Holds the stage derivatives k_i of one step, shape (S, n), and forms combinations.

    Without autograd the stages live in one reused buffer and a combination is one ``addmv``;
    when a graph is being recorded the stages are kept as separate tensors so that
    backpropagation through the solver sees no in-place writes.
    """

    def __init__(self, s: int, y: torch.Tensor, graph: bool) -> None:
        self.graph = graph
        self.ks: list[torch.Tensor] = [y] * s
        self.buf = None if graph else torch.empty((s, y.numel()), dtype=y.dtype, device=y.device)

    @classmethod
    def holding(cls, ks: torch.Tensor) -> _Stages:
        """Stages already computed, shape (S, n) (a compiled attempt's), read-only."""
        stages = cls.__new__(cls)
        stages.graph, stages.ks, stages.buf = False, [], ks
        return stages

    def set(self, i: int, k: torch.Tensor) -> None:
        if self.graph:
            self.ks[i] = k
        else:
            self.buf[i].copy_(k)  # type: ignore[index]

    def get(self, i: int) -> torch.Tensor:
        return self.ks[i] if self.graph else self.buf[i]  # type: ignore[index]

    def combine(self, y: torch.Tensor | None, w: torch.Tensor, dt: float) -> torch.Tensor:
        """y + dt * sum_i w_i k_i over the first len(w) stages (y None: the sum alone)."""
        m = w.shape[0]
        if self.graph:
            mat = torch.stack(self.ks[:m], dim=1)
        else:
            mat = self.buf[:m].t()  # type: ignore[index]
        if y is None:
            return torch.mv(mat, w).mul_(dt)
        return torch.addmv(y, mat, w, alpha=dt)


def rk_step(rhs: Rhs, tab: ButcherTableau, coeffs: tuple, t: float, y: torch.Tensor,
            dt: float, stages: _Stages, t_end: float | None = None,
            end_side: int = 0) -> torch.Tensor:
    """One explicit Runge-Kutta step; stage 0 must already hold f(t, y).

    Stages with node c = 1 are evaluated at ``t_end`` (default t + dt: a grid point or a
    stop time is hit exactly), on its side ``end_side`` (-1: just before it, for a field
    that jumps there; see :class:`SideTime`).

    Returns:
        y_new, shape (n,). For FSAL tableaux the last stage is f(t + dt, y_new).
    """
    a_rows, b, _ = coeffs
    end = at_side(t + dt if t_end is None else t_end, end_side)
    y_new = None
    for i in range(1, tab.stages):
        y_i = stages.combine(y, a_rows[i][:i], dt)
        c = float(tab.c[i])
        stages.set(i, rhs(end if c == 1.0 else t + c * dt, y_i))
        y_new = y_i
    if not tab.fsal or y_new is None:
        y_new = stages.combine(y, b, dt)
    return y_new


class Attempt(Protocol):
    """One step attempt of an embedded pair from (t, y), stage 0 f0 = f(t, y), of size dt
    ending at t_end: (y1, err / (atol + rtol * max(|y|, |y1|)) (detached), the stages)."""

    #: field evaluations it makes that the rhs does not count itself
    nfe: int

    def __call__(self, t: float, dt: float, t_end: float, y: torch.Tensor,
                 f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Stages]: ...


class _EagerAttempt:
    """The engine's own attempt: stages in a reused buffer, evaluated by ``rhs``."""

    nfe = 0  # the rhs counts its evaluations

    def __init__(self, rhs: Rhs, tab: ButcherTableau, y0: torch.Tensor, ctl: StepControl,
                 graph: bool) -> None:
        self.rhs, self.tab, self.ctl = rhs, tab, ctl
        self.coeffs = _coefficients(tab, y0.dtype, y0.device)
        self.stages = _Stages(tab.stages, y0, graph)

    def __call__(self, t: float, dt: float, t_end: float, y: torch.Tensor,
                 f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Stages]:
        stages, ctl = self.stages, self.ctl
        stages.set(0, f0)
        y1 = rk_step(self.rhs, self.tab, self.coeffs, t, y, dt, stages, t_end, -1)
        with torch.no_grad():
            err = stages.combine(None, self.coeffs[2], dt).detach()
            scale = torch.maximum(y.detach().abs(), y1.detach().abs()).mul_(ctl.rtol)
            return y1, err.div_(scale.add_(ctl.atol)), stages


def _ratio(norm: Norm, scaled_err: torch.Tensor) -> float:
    """The error ratio norm(scaled_err); NaN when anything is non-finite."""
    ratio = norm(scaled_err)
    return ratio if math.isfinite(ratio) else math.nan


def next_step(dt: float, ratio: float, prev_ratio: float, order: int, ctl: StepControl) -> float:
    """The controller: a new step size from the last error ratio (I or PI control)."""
    if ratio == 0.0:
        return dt * ctl.ifactor
    if math.isnan(ratio):
        return dt * ctl.dfactor
    try:
        factor = ctl.safety * ratio ** (-ctl.icoeff / order)
        if ctl.pcoeff:
            factor *= prev_ratio ** (ctl.pcoeff / order)
    except OverflowError:  # a tiny ratio with a large icoeff: grow as much as allowed
        factor = math.inf
    low = ctl.dfactor if ratio > 1.0 else 1.0
    return dt * min(ctl.ifactor, max(low, factor))


def initial_step(rhs: Rhs, t0: float, y0: torch.Tensor, f0: torch.Tensor, order: int,
                 ctl: StepControl, norm: Norm, progress: Progress | None = None) -> float:
    """Hairer's starting step (Hairer-Norsett-Wanner I, II.4): one extra evaluation.

    Raises:
        NonFiniteStateError: the derivative divided by the error scale overflows the state's
            dtype (a diverging model), so that no step size is small enough; with
            ``min_step > 0`` the caller gets 0.0 instead and steps with ``min_step``.
    """
    progress = progress or Progress()
    with torch.no_grad():
        scale = y0.abs() * ctl.rtol + ctl.atol
        d0, d1 = norm(y0 / scale), norm(f0 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        if h0 == 0.0:  # d1 is inf: f0 / scale overflowed
            raise _scale_overflow(progress.time(t0), ctl, f0)
        f1 = rhs(t0 + h0, y0 + h0 * f0)
        d2 = norm((f1 - f0) / scale) / h0
    big = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if big <= 1e-15 else (0.01 / big) ** (1.0 / order)
    h = min(100.0 * h0, h1)
    if h == 0.0 and not ctl.min_step > 0:  # big is inf
        raise _scale_overflow(progress.time(t0), ctl, f0, f1)
    return h


def _scale_overflow(t: float, ctl: StepControl, *derivatives: torch.Tensor) -> NonFiniteStateError:
    """The error of a derivative too large to divide by the error scale."""
    largest = max(float(f.detach().abs().max()) for f in derivatives)
    return NonFiniteStateError(
        t, "scaled derivative",
        f"|dy/dt| reaches {largest:.3g}, which overflows {derivatives[0].dtype} when divided "
        f"by the error scale atol + rtol*|y| (atol={_least(ctl.atol):g}, "
        f"rtol={_least(ctl.rtol):g}{'' if isinstance(ctl.atol, float) else ' at least'}): the "
        "model is diverging. Lower the learning rate, clip gradients or add weight decay, "
        "normalise the inputs; or loosen atol/rtol, or integrate in float64.")


def _least(tol: FlatTol) -> float:
    return tol if isinstance(tol, float) else float(tol.min())


_INITIAL_CAUSE = ("the initial state contains NaN or inf. Check the inputs (the data, or the "
                  "layers before the solve) for NaN or inf.")


def _check_finite(y: torch.Tensor, t: float, what: str, cause: str | None = None) -> None:
    """Raise a NonFiniteStateError naming the caller's time t unless y is finite."""
    if not bool(torch.isfinite(y).all()):
        raise NonFiniteStateError(t, what, cause)


def _hermite(y0: torch.Tensor, y1: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor,
             dt: float, theta: float) -> torch.Tensor:
    """Cubic Hermite interpolation on one step (used by the fixed-step methods)."""
    h00 = 2 * theta**3 - 3 * theta**2 + 1
    h10 = theta**3 - 2 * theta**2 + theta
    h01 = -2 * theta**3 + 3 * theta**2
    h11 = theta**3 - theta**2
    return h00 * y0 + h01 * y1 + (dt * h10) * f0 + (dt * h11) * f1


class _Outputs:
    """Walks the requested output times (increasing) and emits those a step has passed."""

    def __init__(self, t_out: Sequence[float], emit: Emit) -> None:
        self.t_out, self.emit, self.j = t_out, emit, 1
        self.tol = 1e-12 * max(1.0, abs(t_out[0]), abs(t_out[-1]))

    @property
    def done(self) -> bool:
        return self.j >= len(self.t_out)

    def flush(self, t0: float, t1: float, value_at: Callable[[float], torch.Tensor]) -> None:
        """Emit every output time in (t0, t1]; value_at(theta) gives the state there."""
        while self.j < len(self.t_out) and self.t_out[self.j] <= t1 + self.tol:
            tj = self.t_out[self.j]
            self.emit(self.j, tj, value_at(min(1.0, (tj - t0) / (t1 - t0))))
            self.j += 1


def integrate_adaptive(rhs: Rhs, y0: torch.Tensor, t_out: Sequence[float], emit: Emit,
                       tab: ButcherTableau, ctl: StepControl, norm: Norm = rms_norm,
                       stats: SolverStats | None = None, progress: Progress | None = None,
                       callbacks: StepCallbacks = NO_CALLBACKS,
                       stops: Sequence[tuple[float, bool]] = (),
                       land_on_end: bool = False, attempt: Attempt | None = None) -> float:
    """Integrate with an embedded pair and PI/I step control, emitting at each of t_out.

    As torchdiffeq's adaptive solvers, every step evaluates its stages with node 1 just
    before the step's end (a :class:`SideTime`), so that a field that jumps there is seen
    from inside the step.

    Args:
        rhs: f(t, y) on flat states, y of shape (n,).
        y0: initial state at t_out[0], shape (n,).
        t_out: strictly increasing output times (floats); t_out[0] is the start.
        emit: called as emit(j, t_out[j], y) for every j, in order.
        tab: an adaptive FSAL tableau.
        ctl: tolerances and controller options. A step of size ``ctl.min_step`` is
            accepted whatever its error (torchdiffeq's semantics), with a
            :class:`~solvers.errors.MinStepWarning` the first time its error is too large.
        norm: error norm of the scaled error vector.
        stats: optional counters to increment.
        progress: the caller's time and the slow-solve warning (None: t_out's own time).
        callbacks: called before and after every step attempt.
        stops: (time, is_jump) pairs, increasing internal times that the solver steps
            exactly onto (torchdiffeq's ``step_t``; ``jump_t`` when is_jump): a step that
            would pass one ends on it. The field is discontinuous at a jump: after the step
            that ends there, f is evaluated again just after it (one more evaluation per
            jump). Times at or before t_out[0] are ignored.
        land_on_end: t_out[-1] is a stop too: the last step ends on it instead of passing it
            (the adjoint's backward intervals, whose state jumps at their ends; by default
            the last step may pass it and the output is interpolated, as torchdiffeq's).
        attempt: how a step is attempted (None: the eager engine on ``rhs``; see
            :mod:`solvers.compiled`).

    Returns:
        The controller's next step size: a following solve that continues from the end
        (the adjoint's next output interval) can start with it instead of a new search. When
        a stop shortened the last step, the larger of the controller's proposal and the step
        it would have taken.

    Raises:
        NonFiniteStateError, StepSizeUnderflowError, MaxStepsExceededError: naming the
            caller's time; a :class:`~solvers.errors.SlowSolveWarning` is given once when the
            solve is slow.
    """
    out = _Outputs(t_out, emit)
    stops = list(stops)
    if land_on_end and not any(s == t_out[-1] for s, _ in stops):
        stops = sorted([*stops, (t_out[-1], False)])
    steps = adaptive_steps(rhs, y0, t_out[0], tab, ctl, norm, stats, progress, callbacks, stops,
                           attempt)
    proposal = next(steps).next_dt  # f(t0, y0) and the starting step
    emit(0, t_out[0], y0)
    while not out.done:
        step = next(steps)
        out.flush(step.t0, step.t1, step.value_at)  # type: ignore[arg-type]
        proposal = step.next_dt
    steps.close()
    return proposal


class AcceptedStep(NamedTuple):
    """An accepted step of :func:`adaptive_steps`, from (t0, y0) to (t1, y1).

    ``value_at(theta)`` is the dense output at t0 + theta * (t1 - t0), valid until the
    generator resumes; ``next_dt`` the step size a solve that stops here would continue with.
    """

    t0: float
    t1: float
    y0: torch.Tensor
    y1: torch.Tensor
    value_at: Callable[[float], torch.Tensor] | None
    next_dt: float


def adaptive_steps(rhs: Rhs, y0: torch.Tensor, t0: float, tab: ButcherTableau,
                   ctl: StepControl, norm: Norm = rms_norm, stats: SolverStats | None = None,
                   progress: Progress | None = None, callbacks: StepCallbacks = NO_CALLBACKS,
                   stops: Sequence[tuple[float, bool]] = (),
                   attempt: Attempt | None = None) -> Generator[AcceptedStep, None, None]:
    """The accepted steps of an adaptive solve from (t0, y0), without end.

    The first item comes once f(t0, y0) and the starting step are known: a step of length 0
    at t0 whose ``next_dt`` is the starting step; then every accepted step. Arguments and
    errors as :func:`integrate_adaptive`, which consumes it (``stops``, ``attempt`` as there).
    """
    stats = stats if stats is not None else SolverStats()
    progress = progress or Progress()
    graph = torch.is_grad_enabled()
    attempt = attempt or _EagerAttempt(rhs, tab, y0, ctl, graph)
    t, y = t0, y0
    pending = [(s, jump) for s, jump in stops if s > t]
    f0 = _first_derivative(rhs, t, y, progress)
    dt = ctl.first_step or initial_step(rhs, t, y, f0, tab.err_order, ctl, norm, progress)
    yield AcceptedStep(t, t, y, y, None, min(ctl.max_step, max(ctl.min_step, dt)))
    prev_ratio, ratio, steps = 1.0, 0.0, 0
    while True:
        dt = min(ctl.max_step, max(ctl.min_step, dt))
        steps += 1
        _check_step(t, dt, ratio, steps, ctl, progress)
        callbacks.step(t, y, dt)
        t1, jump, wanted = t + dt, False, dt
        if pending and pending[0][0] <= t1:  # land on the stop time
            (t1, jump), dt = pending[0], pending[0][0] - t
        y1, scaled_err, stages = attempt(t, dt, t1, y, f0)
        stats.nfe += attempt.nfe
        ratio = _ratio(norm, scaled_err)
        accept = ratio <= 1.0
        if not accept and dt <= ctl.min_step:  # torchdiffeq: min_step is always accepted
            if math.isnan(ratio):
                raise NonFiniteStateError(progress.time(t), f"state (NaN or inf in a step of "
                                          f"size min_step={ctl.min_step:g})")
            progress.accept_min_step(t, dt, ratio)
            accept = True
        if not accept:
            stats.n_rejected += 1
            callbacks.reject(t, y, dt)
            dt = next_step(dt, ratio, prev_ratio, tab.err_order, ctl)
            continue
        stats.n_accepted += 1
        callbacks.accept(t, y, dt)
        prev_ratio = max(ratio, 1e-4)
        next_dt = next_step(dt, ratio, prev_ratio, tab.err_order, ctl)
        # when a stop shortened the step, a solve that ends here continues with the larger
        # of the controller's proposal and the step it wanted
        proposal = max(next_dt, wanted) if wanted > dt else next_dt
        yield AcceptedStep(t, t1, y, y1, _dense(tab, stages, y, dt),
                           min(ctl.max_step, max(ctl.min_step, proposal)))
        # copy: in buffer mode the last row is overwritten by the next attempt, and a
        # rejected attempt must restart from f(t, y)
        f_new = stages.get(tab.stages - 1)
        t, y, f0 = t1, y1, f_new if graph else f_new.clone()
        if pending and pending[0][0] <= t:
            pending.pop(0)
        if jump:  # the field on the far side of its discontinuity
            f0 = rhs(at_side(t, 1), y)
            _check_finite(f0, progress.time(t), "derivative")
        dt = next_dt


def _first_derivative(rhs: Rhs, s: float, y0: torch.Tensor, progress: Progress) -> torch.Tensor:
    """f(s, y0), after checking that y0 and then f(s, y0) are finite."""
    _check_finite(y0, progress.time(s), "initial state", _INITIAL_CAUSE)
    f0 = rhs(s, y0)
    _check_finite(f0, progress.time(s), "derivative")
    return f0


def _check_step(s: float, dt: float, ratio: float, steps: int, ctl: StepControl,
                progress: Progress) -> None:
    """Raise unless attempt number ``steps``, of size dt at s, can be taken; count it."""
    if dt < 1e-12 * max(1.0, abs(s)):
        if math.isnan(ratio):
            raise NonFiniteStateError(progress.time(s),
                                      "state (NaN or inf at every step size tried)")
        raise StepSizeUnderflowError(progress.time(s), dt)
    if steps > ctl.max_num_steps:
        raise MaxStepsExceededError(progress.time(s), dt, ctl.max_num_steps)
    progress.step(s, dt)


def _dense(tab: ButcherTableau, stages: _Stages, y: torch.Tensor,
           dt: float) -> Callable[[float], torch.Tensor]:
    """The dense output of the step just taken, as a function of theta in [0, 1]."""
    def value_at(theta: float) -> torch.Tensor:
        w = torch.as_tensor(tab.dense_weights(theta), dtype=y.dtype, device=y.device)
        return stages.combine(y, w, dt)
    return value_at


def fixed_grid(t_out: Sequence[float], step_size: float | None,
               grid: Sequence[float] | None = None) -> list[float]:
    """Step times of a fixed-step solve: ``grid`` when given, else the output times, or
    t0 + k*step_size up to t_end."""
    if grid is not None:
        return list(grid)
    if step_size is None:
        return list(t_out)
    if not step_size > 0:
        raise SolverInputError(f"options['step_size'] must be positive, got {step_size}")
    t0, t_end = t_out[0], t_out[-1]
    n = max(1, math.ceil((t_end - t0) / step_size - 1e-6))  # no sliver step from round-off
    return [t0 + k * step_size for k in range(n)] + [t_end]


def integrate_fixed(rhs: Rhs, y0: torch.Tensor, t_out: Sequence[float], emit: Emit,
                    tab: ButcherTableau, step_size: float | None = None,
                    stats: SolverStats | None = None, progress: Progress | None = None,
                    callbacks: StepCallbacks = NO_CALLBACKS, grid: Sequence[float] | None = None,
                    perturb: bool = False, interp: str = "cubic") -> None:
    """Integrate on a fixed grid, emitting at t_out (cubic Hermite between grid points).

    Args: as :func:`integrate_adaptive`, plus ``step_size`` (None: one step per output
    interval, as torchdiffeq's fixed-grid solvers), ``grid`` (the step times, increasing,
    from t_out[0] to t_out[-1]: replaces ``step_size``), ``perturb`` (torchdiffeq's
    option: each step evaluates f just after its start and, at the stages with node 1, just
    before its end, so that a field that jumps at grid points is seen from inside the step;
    the interpolant between grid points then uses the slope after the jump at its end) and
    ``interp`` (the output between grid points: 'cubic' Hermite, or 'linear'). A
    fixed-step solve knows its number of steps in advance and does not warn that it is slow;
    it accepts every step.
    """
    stats = stats if stats is not None else SolverStats()
    progress = progress or Progress()
    coeffs = _coefficients(tab, y0.dtype, y0.device)
    stages = _Stages(tab.stages, y0, torch.is_grad_enabled())
    out = _Outputs(t_out, emit)
    grid = fixed_grid(t_out, step_size, grid)
    start, end = (1, -1) if perturb else (0, 0)
    _check_finite(y0, progress.time(grid[0]), "initial state", _INITIAL_CAUSE)
    y, f0 = y0, rhs(at_side(grid[0], start), y0)
    emit(0, grid[0], y)
    for k, (t, t1) in enumerate(zip(grid[:-1], grid[1:])):
        _check_finite(f0, progress.time(t), "derivative")
        callbacks.step(t, y, t1 - t)
        stages.set(0, f0)
        y1 = rk_step(rhs, tab, coeffs, t, y, t1 - t, stages, t1, end)
        stats.n_accepted += 1
        callbacks.accept(t, y, t1 - t)
        last = k == len(grid) - 2
        f1 = rhs(at_side(t1, start), y1) if _needs_slope(out, t1, last, interp) else None
        out.flush(t, t1, _hermite_at(y, y1, f0, f1, t1 - t, interp))
        y, f0 = y1, f1  # type: ignore[assignment]  # f1 is None only after the last step
    _check_finite(y, progress.time(grid[-1]), "state")


def _needs_slope(out: _Outputs, t1: float, last: bool, interp: str = "cubic") -> bool:
    """Whether a fixed-grid step needs f at its end: as the next step's first stage, or
    (``interp='cubic'``, the last step) for an output time strictly inside it."""
    return not last or (interp == "cubic" and any(tj < t1 - out.tol
                                                  for tj in out.t_out[out.j:]))


def _hermite_at(y0: torch.Tensor, y1: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor | None,
                dt: float, interp: str = "cubic") -> Callable[[float], torch.Tensor]:
    """A fixed-grid step's output between its ends, theta in [0, 1]: cubic Hermite on
    (y0, f0, y1, f1), or with ``interp='linear'`` (torchdiffeq's default) the straight
    line from y0 to y1."""
    def value_at(theta: float) -> torch.Tensor:
        if theta >= 1.0 - 1e-12:
            return y1
        if interp == "linear":
            return y0 + theta * (y1 - y0)
        assert f1 is not None
        return _hermite(y0, y1, f0, f1, dt, theta)
    return value_at
