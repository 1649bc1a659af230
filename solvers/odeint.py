"""``odeint``: torchdiffeq's call signature on our Runge-Kutta engine; ``solve``: one spec.

Precision contract: time is float64 inside the solver (Python floats); the state, the
stages and the outputs keep ``y0``'s dtype (float32 or wider: float16 and bfloat16 states are
refused); ``func`` receives ``t`` as a 0-dim tensor in the state's dtype, on ``y0``'s device,
as torchdiffeq gives it (a float32 field that concatenates ``t`` to its input works with
float64 output times). A 0-dim ``y0`` (or tuple part) gives outputs of shape (T,).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from solvers.adjoint import params_of, solve_adjoint
from solvers.checkpoint import CheckpointedSolve, solve_checkpointed
from solvers.errors import SolverInputError, in_context
from solvers.events import EventGradient, check_event_times, combine_event_fn, solve_until_event
from solvers.flat import (
    CountingFunc,
    check_backend,
    check_times,
    field_callbacks,
    flat_state,
    make_rhs,
    solve_flat,
    traced_field,
)
from solvers.integrate import Progress
from solvers.spec import (
    Observer,
    SolverSpec,
    StageObserver,
    State,
    Tolerance,
    call_spec,
    method_kind,
)
from solvers.stats import SolverStats


def odeint(func: Callable, y0: State, t: torch.Tensor, *, rtol: Tolerance = 1e-7,
           atol: Tolerance = 1e-9, method: str | None = None, options: dict | None = None,
           event_fn: Callable | None = None, stats: SolverStats | None = None,
           backend: str = "ocnode", label: str | None = None) -> Any:
    """Solve dy/dt = func(t, y) from y(t[0]) = y0 and return y at every time in t.

    A drop-in for ``torchdiffeq.odeint``: same arguments and semantics. Differentiable by
    backpropagation through the solver, including w.r.t. ``t`` (first order).

    Args:
        func: f(t, y) -> dy/dt with y's structure; t is a 0-dim tensor.
        y0: initial state, a tensor of any shape (...) or a tuple of tensors.
        t: output times, shape (T,), strictly increasing or decreasing; t[0] is the start.
        rtol, atol: error tolerances of adaptive methods: floats, or for a tuple state a
            tuple with one per part (the error of part i is scaled by its own tolerances).
        method: one of ``solvers.METHODS`` (explicit; default 'dopri5') or of
            ``solvers.implicit.IMPLICIT_METHODS`` (implicit, fixed grid). The names are
            torchdiffeq's: 'rk4' is Kutta's 3/8 rule ('rk4_classic': the classic one).
        options: adaptive: first_step, min_step, max_step, max_num_steps, safety, ifactor,
            dfactor, icoeff, pcoeff (PI control), norm, step_t, jump_t, compile (a step
            attempt compiled with torch.compile: see :mod:`solvers.compiled`), dtype (the
            time dtype of callbacks and event_fn, as torchdiffeq's); fixed: step_size
            (None: one step per output interval, as torchdiffeq), grid_constructor, perturb
            (not for implicit methods), interp ('cubic' Hermite between grid points, the
            default, or 'linear', torchdiffeq's default); implicit methods also max_iters
            (Newton iterations per step); Adams methods also max_order, max_iters;
            scipy_solver: solver, min_step, max_step. See docs/torchdiffeq.md.
        event_fn: g(t, y) -> tensor: integrate from t[0] until it crosses zero (t must be
            [t0, t1], t1 only sets the direction) and return ``(event_t, y at [t0,
            event_t])``, as torchdiffeq; :func:`odeint_event` makes event_t differentiable.
        stats: a SolverStats to fill with NFE and accepted/rejected steps.
        backend: 'ocnode' (our engine) or 'torchdiffeq'.
        label: put in front of every error message and warning of the solve, e.g.
            ``"ODE block 'enc'"`` (ocnode backend).

    Returns:
        y at each time, shape (T, ...) (a tuple of such tensors for a tuple state); with
        ``event_fn``, (event_t, y at [t0, event_t]).

    Raises:
        SolverInputError, StepSizeUnderflowError, NonFiniteStateError, MaxStepsExceededError:
            naming the time ``t`` where it happened. An adaptive solve past
            ``solvers.integrate.SLOW_SOLVE_STEPS`` steps or ``SLOW_SOLVE_SECONDS`` seconds
            warns once with a :class:`solvers.SlowSolveWarning`.
    """
    method = method or "dopri5"
    stats = stats if stats is not None else SolverStats()
    if backend == "torchdiffeq":
        return _torchdiffeq_odeint(func, y0, t, rtol, atol, method, options, event_fn,
                                   stats, backend)
    check_backend(backend)
    spec = call_spec(method, rtol, atol, options, adjoint=False)
    if event_fn is not None:
        with in_context(label):
            return _solve_direct_event(func, y0, t, spec, stats, label or "", event_fn)
    return solve_direct(func, y0, t, spec, stats, label)


def _solve_direct_event(func: Callable, y0: State, t: torch.Tensor, spec: SolverSpec,
                        stats: SolverStats, label: str,
                        event_fn: Callable) -> tuple[torch.Tensor, State]:
    """odeint in event mode: (event time, the solution at [t0, event time])."""
    check_event_times(t)
    flat = flat_state(y0)
    y0_flat = flat.flatten(y0)
    times, direction = check_times(t, y0_flat)
    rhs = make_rhs(func, flat, y0_flat.device, direction, stats)
    start = y0_flat
    if torch.is_grad_enabled() and t.requires_grad:  # dy(t*)/dt0 = -Phi f(t0, y0)
        f0 = direction * rhs(direction * times[0], y0_flat).detach()
        start = y0_flat - (t[0] - t[0].detach()) * f0
    t_event, y_event = solve_until_event(
        rhs, flat, start, y0, times[0], direction, event_fn, spec, stats,
        Progress(direction, label), field_callbacks(func, flat, direction, spec, t, y0_flat))
    event_t = torch.tensor(t_event, dtype=t.dtype, device=t.device)
    return event_t, flat.unflatten(torch.stack([y0_flat, y_event]))


def odeint_event(func: Callable, y0: State, t0: torch.Tensor, *, event_fn: Callable,
                 reverse_time: bool = False, odeint_interface: Callable = odeint,
                 **kwargs: Any) -> tuple[torch.Tensor, State]:
    """Integrate from (t0, y0) until ``event_fn(t, y)`` crosses zero; torchdiffeq's
    ``odeint_event``, with a differentiable event time.

    Args:
        func, y0: as :func:`odeint`.
        t0: the start time, a tensor (0-dim or of one element).
        event_fn: g(t, y) -> tensor; the solve ends when it (or, for several entries, the
            first of them) changes sign. It gets the caller's time as a 0-dim tensor (float64
            for adaptive methods, the state's dtype for fixed-step ones) and y in the
            state's structure.
        reverse_time: integrate backward in time from t0.
        odeint_interface: :func:`odeint` (default) or :func:`solvers.odeint_adjoint` (then
            the adjoint gives the gradients of the solution at the event).
        kwargs: the other arguments of ``odeint_interface`` (rtol, atol, method, options,
            ...); fixed-step methods need ``options={'step_size': ...}``.

    Returns:
        (event_t, solution): the event time (shape of t0 reshaped to (), in t0's dtype) and
        the solution at [t0, event_t] (shape (2, ...), a tuple for a tuple state). Both
        carry gradients; the event time's reach the inputs through the state by the
        implicit function theorem, dt*/dtheta = -(dg/dy . dy/dtheta) / (dg/dt + dg/dy . f).
    """
    interface = odeint_interface
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = interface(func, y0, t, event_fn=event_fn, **kwargs)
    flat = flat_state(y0)
    last = flat.flatten(tuple(s[-1] for s in solution) if flat.is_tuple else solution[-1])
    combined = combine_event_fn(event_fn, t0[0].to(event_t.dtype), y0)
    event_t, last = EventGradient.apply(func, combined, flat, event_t.reshape(()), last)
    end = flat.unflatten(last)
    if flat.is_tuple:
        solution = tuple(torch.cat([s[:-1], e[None]]) for s, e in zip(solution, end))
    else:
        solution = torch.cat([solution[:-1], end[None]])  # type: ignore[call-overload,index]
    return event_t, solution


def solve(func: Callable, y0: State, t: torch.Tensor, spec: SolverSpec, *,
          adjoint_params: Sequence[torch.Tensor] | None = None,
          observer: Observer | StageObserver | None = None,
          observer_dt: float | None = None, stats: SolverStats | None = None,
          adjoint_stats: SolverStats | None = None, label: str | None = None) -> State:
    """Solve dy/dt = func(t, y) with the settings of one :class:`SolverSpec`.

    With ``spec.adjoint`` this is :func:`solvers.odeint_adjoint`, otherwise
    :func:`solvers.odeint` (backpropagation through the solver); the spec was validated when
    it was built, so nothing is checked again here but the call's own arguments.

    Args:
        func: f(t, y) -> dy/dt; an nn.Module for the adjoint unless ``adjoint_params`` is
            given.
        y0: initial state, a tensor of any shape (...) or a tuple of tensors.
        t: output times, shape (T,), strictly monotone; t[0] is the time of y0.
        spec: the solver settings.
        adjoint_params: tensors the adjoint differentiates (default ``func.parameters()``).
        observer, observer_dt: an :class:`Observer` of the adjoint's backward solve and its
            grid spacing (None: 0.01 of the span), as :func:`solvers.odeint_adjoint`.
        stats: filled by the forward solve; adjoint_stats: by the backward solve.
        label: put in front of every error message and warning of the solve, the adjoint's
            backward solve included (raised from ``loss.backward()``), e.g.
            ``"ODE block 'enc'"``.

    Returns:
        y at each time, shape (T, ...) (a tuple of such tensors for a tuple state).

    Raises:
        SolverInputError: ``spec`` is not a SolverSpec, an observer without the adjoint, or
            bad ``y0``/``t``; the solver errors of a failed solve, forward or backward.
    """
    if not isinstance(spec, SolverSpec):
        raise SolverInputError(f"spec must be a solvers.SolverSpec, e.g. SolverSpec("
                               f"method='rk4', options={{'step_size': 0.1}}), got {spec!r}")
    stats = stats if stats is not None else SolverStats()
    if not spec.adjoint:
        if observer is not None:
            raise SolverInputError("observers run in the adjoint's backward solve; use a spec "
                                   "with adjoint=True")
        return solve_direct(func, y0, t, spec, stats, label, adjoint_params, adjoint_stats)
    adjoint_stats = adjoint_stats if adjoint_stats is not None else SolverStats()
    return solve_adjoint(func, y0, t, spec, adjoint_params, observer, observer_dt, stats,
                         adjoint_stats, label)


def solve_direct(func: Callable, y0: State, t: torch.Tensor, spec: SolverSpec,
                 stats: SolverStats, label: str | None = None,
                 params: Sequence[torch.Tensor] | None = None,
                 backward_stats: SolverStats | None = None) -> State:
    """The solve of :func:`odeint`, differentiable by backpropagation (``t`` included).

    Errors get ``label`` in front of their message. With ``spec.checkpoint`` the steps are
    replayed in the backward (:mod:`solvers.checkpoint`), which differentiates ``params``
    (default: ``func.parameters()``) and counts its evaluations in ``backward_stats``.
    """
    with in_context(label):
        return _solve_direct(func, y0, t, spec, stats, label or "", params,
                             backward_stats if backward_stats is not None else SolverStats())


def _solve_direct(func: Callable, y0: State, t: torch.Tensor, spec: SolverSpec,
                  stats: SolverStats, label: str, adjoint_params: Sequence[torch.Tensor] | None,
                  backward_stats: SolverStats) -> State:
    flat = flat_state(y0)
    y0_flat = flat.flatten(y0)
    times, direction = check_times(t, y0_flat)
    rhs = make_rhs(func, flat, y0_flat.device, direction, stats)
    time_grad = torch.is_grad_enabled() and t.requires_grad
    if time_grad:
        f0 = direction * rhs(direction * times[0], y0_flat).detach()
        y0_flat = y0_flat - (t[0] - t[0].detach()) * f0
    s_out = [direction * v for v in times]
    progress = Progress(direction, label)
    callbacks = field_callbacks(func, flat, direction, spec, t, y0_flat)
    outs: list[torch.Tensor] = []
    if spec.checkpoint and torch.is_grad_enabled():  # without grad: nothing to replay
        cfg = CheckpointedSolve(func, flat, s_out, direction, spec, stats, backward_stats,
                          progress, callbacks)
        outs = list(solve_checkpointed(cfg, y0_flat, params_of(func, adjoint_params)))
    else:
        solve_flat(rhs, y0_flat, s_out, lambda j, s, y: outs.append(y), spec, flat, stats,
                   progress=progress, callbacks=callbacks,
                   traced=traced_field(func, flat, direction))
    outs[0] = flat.flatten(y0)
    if time_grad:
        outs[1:] = [y + (t[j] - t[j].detach()) * direction * rhs(direction * times[j], y).detach()
                    for j, y in enumerate(outs[1:], start=1)]
    ys = torch.stack(outs)
    if method_kind(spec.method) == "scipy":
        ys = _no_gradient(ys, func, y0_flat, t)
    return flat.unflatten(ys)


class _NoGradient(torch.autograd.Function):
    """Passes a scipy_solver solution through; its backward raises (no gradients)."""

    @staticmethod
    def forward(ctx: Any, ys: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return ys.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        raise SolverInputError(
            "method='scipy_solver' has no gradients (scipy integrates outside autograd): use "
            "a torch method such as 'dopri5' to differentiate, or odeint_adjoint with "
            "adjoint_method='scipy_solver' (the forward solve can then be another method)")


def _no_gradient(ys: torch.Tensor, func: Callable, y0: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """ys, with a backward that raises if anything it came from requires a gradient."""
    if not torch.is_grad_enabled():
        return ys
    params = [p for p in func.parameters() if p.requires_grad] \
        if isinstance(func, torch.nn.Module) else []
    inputs = [x for x in (y0, t, *params) if x.requires_grad]
    return _NoGradient.apply(ys, *inputs) if inputs else ys


def _torchdiffeq_odeint(func, y0, t, rtol, atol, method, options, event_fn, stats, backend):
    import torchdiffeq

    return torchdiffeq.odeint(CountingFunc(func, stats), y0, t, rtol=rtol, atol=atol,
                              method=method, options=options, event_fn=event_fn)
