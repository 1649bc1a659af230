"""``odeint_adjoint``: gradients by solving the adjoint ODE backward, in O(1) memory.

Forward: integrate without a graph and keep only the outputs. Backward: integrate the
augmented state (x, a, a_theta) from t_N to t_0:

    dx/dt = F(t, x),   da/dt = -F_x^T a,   da_theta/dt = -F_theta^T a,

re-integrating x backward (Chen et al. 2018, "Neural Ordinary Differential Equations"), with
a jump a += dL/dy(t_i) at every output time. The result is a(t_0) = dL/dy0 and
a_theta(t_0) = dL/dtheta; time gradients are dL/dt_i = <dL/dy(t_i), F(t_i, y_i)> for i >= 1
and dL/dt_0 = -<a(t_0), F(t_0, y_0)> (a(t_0) without the direct dL/dy(t_0) term).

An optional observer watches the backward solve: this is where second-order statistics
(SNOpt, Liu-Chen-Theodorou 2021) are collected. A grid :class:`~solvers.spec.Observer`
receives (t_j, x(t_j), a(t_j), w_j) at the grid t_j = t_0 + j * observer_dt within
[t_0, t_N] (and t_N itself), with trapezoid-rule weights w_j, through dense output, so the
adaptive steps do not change and nothing is stored. A :class:`~solvers.spec.StageObserver`
instead sees the solve's own evaluations of the field and its vector-Jacobian product, with
quadrature weights from the accepted steps (see :func:`stage_weights`): no extra evaluation.
Both get ``finish()`` at the end.

Errors of the backward solve are raised from ``loss.backward()``: they name the caller's time
(not the backward solve's internal s = -t), say that it was the backward (adjoint) solve,
carry the solve's ``label``, and blame a non-finite incoming gradient dL/dy, when there is one,
with a :class:`~solvers.errors.NonFiniteGradientError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from solvers.compiled import TracedField, compile_arguments, compiled_rhs
from solvers.errors import (
    BACKWARD_SOLVE,
    NonFiniteGradientError,
    SolverError,
    SolverInputError,
    in_context,
    join_context,
)
from solvers.events import check_event_times, solve_until_event
from solvers.flat import (
    CountingFunc,
    FieldCallbacks,
    FlatState,
    callback_time_dtype,
    check_backend,
    check_times,
    defined_callbacks,
    field_callbacks,
    field_time,
    flat_state,
    flat_tolerances,
    make_rhs,
    solve_flat,
    traced_field,
    user_state_norm,
)
from solvers.integrate import (
    NO_CALLBACKS,
    Norm,
    Progress,
    StepCallbacks,
    chain_callbacks,
    segment_norm,
    side_of,
)
from solvers.spec import (
    Observer,
    SolverSpec,
    StageObserver,
    State,
    Tolerance,
    call_spec,
    check_observer,
    is_stage_observer,
)
from solvers.stats import SolverStats

#: The default observer grid spacing, as a fraction of the solve's span |t_N - t_0|.
DEFAULT_OBSERVER_FRACTION = 0.01


@dataclass
class _Config:
    """Everything the autograd.Function needs besides tensors."""

    func: Callable
    flat: FlatState
    times: list[float]
    direction: float
    spec: SolverSpec
    observer: Observer | StageObserver | None
    observer_dt: float | None
    stats: SolverStats
    adjoint_stats: SolverStats
    t_dtype: torch.dtype = torch.float32
    label: str | None = None
    #: the forward outputs when they are already known (event mode: the solve that found
    #: the event computed them)
    precomputed: torch.Tensor | None = None

    @property
    def backward_label(self) -> str:
        """What the backward solve's messages start with, e.g. "ODE block 'enc', backward
        (adjoint) solve"."""
        return join_context(self.label, BACKWARD_SOLVE)


def observer_spacing(times: Sequence[float], observer_dt: float | None) -> float:
    """The observer grid spacing: ``observer_dt``, or by default 0.01 of |t_N - t_0|.

    Raises:
        SolverInputError: if ``observer_dt`` is neither None nor a positive float.
    """
    if observer_dt is None:
        return DEFAULT_OBSERVER_FRACTION * abs(times[-1] - times[0])
    if isinstance(observer_dt, bool) or not (
            isinstance(observer_dt, (int, float)) and 0 < observer_dt < math.inf):
        raise SolverInputError(f"observer_dt must be > 0, or None for "
                               f"{DEFAULT_OBSERVER_FRACTION} of the span; got {observer_dt!r}")
    return float(observer_dt)


def observer_grid(times: Sequence[float], dt: float) -> list[tuple[float, float]]:
    """The grid samples (t_j, w_j) of the trapezoid rule on [t_0, t_N] (either direction).

    Nodes t_0 + j*dt within the span, and t_N when the span is not a multiple of dt; the
    weights w_j = (u_{j+1} - u_{j-1}) / 2 over the nodes u (half cells at the ends) sum to
    the span. A zero (or negligible) span has no samples.
    """
    span = abs(times[-1] - times[0])
    if span == 0:
        return []
    n = math.floor(span / dt + 1e-9)
    offsets = [j * dt for j in range(n + 1)]
    if span - offsets[-1] > 1e-9 * max(1.0, span):
        offsets.append(span)
    if len(offsets) == 1:
        return []  # a span below the time resolution: nothing to weigh
    weights = [((offsets[min(j + 1, len(offsets) - 1)] - offsets[max(j - 1, 0)]) / 2)
               for j in range(len(offsets))]
    sign = 1.0 if times[-1] >= times[0] else -1.0
    return [(times[0] + sign * u, w) for u, w in zip(offsets, weights)]


def stage_weights(times: Sequence[float], s0: float, s1: float,
                  end: float = math.inf) -> list[float]:
    """Quadrature weights of an accepted step [s0, s1] over the evaluations made in it.

    Every evaluation inside the step owns the part of the step nearer to its time than to
    the neighbouring evaluations' (ties share it equally), so the weights are positive and
    sum to s1 - s0 (the solver's own b_i can be negative, dopri5's are); an evaluation
    outside [s0, s1] gets 0. A step that overshoots the end of the integration (the solver
    interpolates there) counts only up to ``end``: each cell is cut at ``end``. This is a
    Riemann sum of the integrand on the stage nodes, consistent as the steps shrink.

    Args:
        times: the internal times of the evaluations, in the order made.
        s0, s1: the step's start and end, s0 < s1.
        end: where the integral stops (>= s0).

    Returns:
        One weight per entry of ``times``; they sum to min(s1, end) - s0 (0 with no
        evaluation inside the step).
    """
    tol = 1e-12 * max(1.0, abs(s0), abs(s1))
    nodes = sorted({t for t in times if s0 - tol <= t <= s1 + tol})
    if not nodes:
        return [0.0] * len(times)
    stop = min(s1, end)
    edges = [s0, *((a + b) / 2 for a, b in zip(nodes[:-1], nodes[1:])), s1]
    cell = {u: max(0.0, min(edges[k + 1], stop) - edges[k]) for k, u in enumerate(nodes)}
    ties = {u: sum(1 for t in times if t == u) for u in nodes}
    return [cell[t] / ties[t] if t in cell else 0.0 for t in times]


class _StageSteps(StepCallbacks):
    """Relays the backward solve's step outcomes to a stage observer, with weights."""

    def __init__(self, observer: StageObserver) -> None:
        self.observer = observer
        self.times: list[float] = []  # internal times of the evaluations not yet assigned
        self.end = math.inf  # the current interval's end: a last step's overshoot weighs 0

    def evaluated(self, s: float) -> None:
        self.times.append(s)

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        self.observer.accept_step(stage_weights(self.times, s, s + dt, self.end))
        self.times = []

    def reject(self, s: float, y: torch.Tensor, dt: float) -> None:
        self.observer.reject_step()
        self.times = []


def _aug_rhs(cfg: _Config, params: tuple[torch.Tensor, ...], device: torch.device,
             direction: float,
             steps: _StageSteps | None) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """Right-hand side of the augmented backward system on internal time s = direction * t.

    With ``steps``, every evaluation runs inside its stage observer's ``evaluation(t)``.
    """
    n, flat = sum(math.prod(s) for s in cfg.flat.shapes), cfg.flat
    grad_params = [p for p in params if p.requires_grad]

    def rhs(s: float, z: torch.Tensor) -> torch.Tensor:
        cfg.adjoint_stats.nfe += 1
        t = field_time(direction * s, z, direction * side_of(s))
        watch = contextlib.nullcontext() if steps is None else \
            steps.observer.evaluation(direction * s + 0.0)
        if steps is not None:
            steps.evaluated(s)
        with torch.enable_grad(), watch:
            x = z[:n].detach().requires_grad_(True)
            fx = flat.flatten(cfg.func(t, flat.unflatten(x)))
            # a field of t alone (no parameter, no y) returns a tensor without a graph: its
            # vector-Jacobian products are all zero
            vjps = torch.autograd.grad(fx, (x, *grad_params), -z[n:2 * n], allow_unused=True) \
                if fx.requires_grad else (None,) * (1 + len(grad_params))
        parts = [fx.detach(), *(_or_zeros(g, v) for g, v in zip(vjps, (x, *grad_params)))]
        out = torch.cat([p.reshape(-1) for p in parts])
        return out if direction > 0 else -out
    return rhs


def _traced_aug(cfg: _Config, params: tuple[torch.Tensor, ...], direction: float,
                steps: _StageSteps | None) -> TracedField | None:
    """The augmented field of :func:`_aug_rhs` in traceable form, for a compiled backward
    solve: the vector-Jacobian products by :func:`torch.func.vjp` over ``func``'s parameters
    (called by name, as :func:`torch.func.functional_call`). None with a stage observer,
    which hooks every evaluation (that solve runs eagerly), or without ``options['compile']``.

    Raises:
        SolverInputError: a differentiated tensor is not one of ``func``'s parameters.
    """
    if steps is not None or compile_arguments(
            cfg.spec.backward().solve_options().get("compile")) is None:
        return None
    grad_params = tuple(p for p in params if p.requires_grad)
    names_of = {id(p): name for name, p in getattr(cfg.func, "named_parameters", list)()}
    if any(id(p) not in names_of for p in grad_params):
        raise SolverInputError(
            "options['compile'] with odeint_adjoint differentiates func's own parameters: "
            "func must be an nn.Module and adjoint_params among func.parameters()")
    names = tuple(names_of[id(p)] for p in grad_params)
    n, flat = sum(math.prod(s) for s in cfg.flat.shapes), cfg.flat
    func = cast(torch.nn.Module, cfg.func)

    def field(t: torch.Tensor, z: torch.Tensor, *theta: torch.Tensor) -> torch.Tensor:
        def f(x: torch.Tensor, p: tuple[torch.Tensor, ...]) -> torch.Tensor:
            values = dict(zip(names, p))
            return flat.flatten(torch.func.functional_call(func, values, (t, flat.unflatten(x))))
        fx, vjp = torch.func.vjp(f, z[:n], theta)[:2]
        gx, g_theta = vjp(-z[n:2 * n])
        out = torch.cat([fx, gx, *(g.reshape(-1) for g in g_theta)])
        return out if direction > 0 else -out
    return TracedField(field, grad_params, func, ("adjoint", flat.shapes, flat.is_tuple, names),
                       direction)


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


class _AdjointFunction(torch.autograd.Function):
    """Forward without graph; backward by the augmented adjoint solve."""

    @staticmethod
    def forward(ctx: Any, cfg: _Config, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        if cfg.precomputed is not None:
            ys = cfg.precomputed
        else:
            rhs = make_rhs(cfg.func, cfg.flat, y0.device, cfg.direction, cfg.stats)
            outs: list[torch.Tensor] = []
            with torch.no_grad():
                solve_flat(rhs, y0, [cfg.direction * v for v in cfg.times],
                           lambda j, s, y: outs.append(y), cfg.spec, cfg.flat, cfg.stats,
                           progress=Progress(cfg.direction, cfg.label or ""),
                           callbacks=field_callbacks(cfg.func, cfg.flat, cfg.direction,
                                                     cfg.spec, t, y0),
                           traced=traced_field(cfg.func, cfg.flat, cfg.direction))
                ys = torch.stack(outs)
        ctx.cfg = cfg
        ctx.save_for_backward(ys, t, *params)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple:
        cfg: _Config = ctx.cfg
        ys, t, *params = ctx.saved_tensors
        with torch.no_grad(), in_context(cfg.backward_label):
            a0, a_theta, grad_t = _backward_solve(cfg, ys, grad_ys, tuple(params),
                                                  need_t=ctx.needs_input_grad[2])
        grads_p = _split_params(a_theta, params)
        return (None, a0, grad_t, *grads_p)


def _split_params(a_theta: torch.Tensor,
                  params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    start = 0
    for p in params:
        if p.requires_grad:
            out.append(a_theta[start:start + p.numel()].view_as(p))
            start += p.numel()
        else:
            out.append(None)
    return out


def _backward_solve(cfg: _Config, ys: torch.Tensor, grad_ys: torch.Tensor,
                    params: tuple[torch.Tensor, ...], need_t: bool) -> tuple:
    """Integrate (x, a, a_theta) from t_N to t_0; returns (dL/dy0, dL/dtheta, dL/dt)."""
    n, times = ys.shape[1], cfg.times
    n_theta = sum(p.numel() for p in params if p.requires_grad)
    direction = -cfg.direction  # the backward solve runs against the forward direction
    observer = cfg.observer
    steps = _StageSteps(observer) if is_stage_observer(observer) else None
    traced = _traced_aug(cfg, params, direction, steps)
    rhs = _aug_rhs(cfg, params, ys.device, direction, steps) if traced is None else \
        compiled_rhs(traced, cfg.adjoint_stats,
                     cast(dict, compile_arguments(cfg.spec.backward().solve_options()["compile"])))
    grad_params = [p for p in params if p.requires_grad]
    norm = _adjoint_norm(cfg.flat, n, n_theta, cfg.spec.seminorm, cfg.spec.adjoint_norm,
                         grad_params, cfg.spec.solve_options().get("norm"))
    callbacks = chain_callbacks(steps or NO_CALLBACKS,
                                _adjoint_callbacks(cfg, n, grad_params, direction, ys))
    grid = observer_grid(times, cfg.observer_dt) \
        if cfg.observer_dt is not None and steps is None else []
    progress = Progress(direction, cfg.backward_label)
    z = torch.cat([ys[-1], grad_ys[-1], ys.new_zeros(n_theta)])
    if len(times) == 1:
        z[n:2 * n] = 0.0
    first_step: float | None = None  # each interval starts with the last one's step size
    for i in range(len(times) - 1, 0, -1):
        try:
            z, first_step = _solve_interval(cfg, (rhs, traced), z, times[i], times[i - 1],
                                            grid, norm, direction, n, progress, first_step,
                                            steps, callbacks)
        except SolverError as err:
            _blame_the_gradient(err, times, grad_ys, i)
            raise
        z[:n] = ys[i - 1]  # restart x from the stored forward value (limits drift)
        if i > 1:
            z[n:2 * n] += grad_ys[i - 1]
    if grid and _same_time(grid[0][0], times[0]):
        _observe(cfg, grid[0][0], z, n, grid[0][1])  # t_0 closes the grid
    if cfg.observer is not None:
        cfg.observer.finish()  # after the last sample, also when there was none
    grad_t = _time_grads(cfg, ys, grad_ys, z[n:2 * n], ys.device) if need_t else None
    return z[n:2 * n] + grad_ys[0], z[2 * n:], grad_t


def _blame_the_gradient(err: SolverError, times: Sequence[float], grad_ys: torch.Tensor,
                        i: int) -> None:
    """Raise a NonFiniteGradientError from ``err`` if a gradient dL/dy(t_k) that entered the
    failed backward solve (k >= i) is not finite: the loss is at fault, not the field."""
    if isinstance(err, SolverInputError):
        return
    bad = [k for k in range(len(times) - 1, i - 1, -1)
           if not bool(torch.isfinite(grad_ys[k]).all())]
    if bad:
        raise NonFiniteGradientError(times[bad[0]]) from err


def _same_time(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _interval_outputs(t_from: float, t_to: float, grid: list[tuple[float, float]],
                      direction: float) -> tuple[list[float], list[float], bool]:
    """Internal output times of one backward interval: its start, the grid points in
    [t_from, t_to) (backward order) and its end; the weights of the grid points; and whether
    the start is a grid point."""
    s_from, s_to = direction * t_from, direction * t_to
    tol = 1e-9 * max(1.0, abs(s_from), abs(s_to))
    inside = sorted((direction * g, w) for g, w in grid
                    if s_from - tol <= direction * g < s_to - tol)
    on_start = bool(inside) and abs(inside[0][0] - s_from) <= tol
    s_grid = [s for s, _ in (inside[1:] if on_start else inside)]
    return [s_from, *s_grid, s_to], [w for _, w in inside], on_start


def _solve_interval(cfg: _Config, field: tuple[Callable, TracedField | None], z: torch.Tensor,
                    t_from: float, t_to: float,
                    grid: list[tuple[float, float]], norm: Norm, direction: float, n: int,
                    progress: Progress, first_step: float | None,
                    steps: _StageSteps | None,
                    callbacks: StepCallbacks = NO_CALLBACKS) -> tuple[torch.Tensor, float | None]:
    """Backward solve over one output interval, streaming grid samples to the observer.

    ``field``: the augmented rhs and its traceable form (None: eager only). Returns the
    adjoint state at ``t_to`` and the solver's next step size (None: let the next interval
    search for one)."""
    s_out, weights, on_start = _interval_outputs(t_from, t_to, grid, direction)
    result: list[torch.Tensor] = []
    if steps is not None:
        steps.end = s_out[-1]

    def emit(j: int, s: float, zj: torch.Tensor) -> None:
        if j == len(s_out) - 1:
            result.append(zj.clone())
        elif j > 0 or on_start:
            _observe(cfg, direction * s, zj, n, weights[j - 1 + int(on_start)])

    next_step = solve_flat(field[0], z, s_out, emit, cfg.spec.backward(), cfg.flat,
                           cfg.adjoint_stats, norm=norm, progress=progress,
                           first_step=first_step, callbacks=callbacks, land_on_end=True,
                           traced=field[1])
    return result[0], next_step


def _observe(cfg: _Config, t: float, z: torch.Tensor, n: int, weight: float) -> None:
    """One grid sample, with its trapezoid weight."""
    observer = cast(Observer, cfg.observer)
    observer(t, cfg.flat.unflatten(z[:n]), cfg.flat.unflatten(z[n:2 * n]), weight)


def _adjoint_norm(flat: FlatState, n: int, n_theta: int, seminorm: bool,
                  user_norm: Callable | None = None, params: Sequence[torch.Tensor] = (),
                  state_norm: Callable | None = None) -> Norm:
    """Max-RMS over the state's components, the adjoint's and (unless seminorm) a_theta; or
    the user's norm on the adjoint state as torchdiffeq gives it (see :func:`adjoint_state`).

    With the forward solve's ``options['norm']`` (``state_norm``) and no user norm, that norm
    measures x and a instead of the max-RMS over their components, as torchdiffeq's.
    """
    if user_norm is not None:
        return lambda v: float(user_norm(adjoint_state(v, flat, n, params, split=True)))
    theta = [(2 * n, 2 * n + n_theta)] if not seminorm and n_theta else []
    if state_norm is None:
        return segment_norm(flat.bounds + [(a + n, b + n) for a, b in flat.bounds] + theta)
    of_state, of_theta = user_state_norm(state_norm, flat), segment_norm(theta)
    return lambda v: max(of_state(v[:n]), of_state(v[n:2 * n]), of_theta(v) if theta else 0.0)


def adjoint_state(z: torch.Tensor, flat: FlatState, n: int, params: Sequence[torch.Tensor],
                  split: bool) -> tuple[torch.Tensor, ...]:
    """The backward solve's flat state z = (x, a, a_theta) as torchdiffeq's augmented state
    ``(t, y, adj_y, *adj_params)``: ``t`` a 0-dim zero (torchdiffeq integrates the time
    gradient there; we compute time gradients from the field at the output times), ``y`` and
    ``adj_y`` shaped like the state, ``adj_params`` like the parameters that require a
    gradient. A tuple state is flat in ``y`` and ``adj_y`` (torchdiffeq's callbacks), or, with
    ``split``, gives its parts in turn, ``(t, *y, *adj_y, *adj_params)`` (torchdiffeq's
    adjoint norm)."""
    zero = z.new_zeros(())
    if flat.is_tuple and split:
        ys: tuple = (*flat.unflatten(z[:n]), *flat.unflatten(z[n:2 * n]))
    elif flat.is_tuple:
        ys = (z[:n], z[n:2 * n])
    else:
        ys = (flat.unflatten(z[:n]), flat.unflatten(z[n:2 * n]))
    parts, start = [], 2 * n
    for p in params:
        parts.append(z[start:start + p.numel()].view_as(p))
        start += p.numel()
    return (zero, *ys, *parts)


def _adjoint_callbacks(cfg: _Config, n: int, params: Sequence[torch.Tensor], direction: float,
                       ys: torch.Tensor) -> StepCallbacks:
    """The field's ``callback_step_adjoint`` & co. around the backward solve's steps, with
    the caller's time and torchdiffeq's augmented state (see :func:`adjoint_state`)."""
    backward = cfg.spec.backward()
    fns = defined_callbacks(cfg.func, backward.method, "_adjoint")
    if not any(fns):
        return NO_CALLBACKS
    t_dtype = callback_time_dtype(backward, cfg.t_dtype, ys.dtype)
    return FieldCallbacks(fns, lambda z: adjoint_state(z, cfg.flat, n, params, split=False),
                          direction, t_dtype)


def _time_grads(cfg: _Config, ys: torch.Tensor, grad_ys: torch.Tensor, a0: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """dL/dt_i = <dL/dy_i, F(t_i, y_i)> (i >= 1) and dL/dt_0 = -<a(t_0), F(t_0, y_0)>."""
    rhs = make_rhs(cfg.func, cfg.flat, device, 1.0, cfg.adjoint_stats)
    f = [rhs(t_i, ys[i]) for i, t_i in enumerate(cfg.times)]
    grads = [-(a0 * f[0]).sum()] + [(grad_ys[i] * f[i]).sum() for i in range(1, len(f))]
    return torch.stack(grads).to(cfg.t_dtype)


def odeint_adjoint(func: Callable, y0: State, t: torch.Tensor, *, rtol: Tolerance = 1e-7,
                   atol: Tolerance = 1e-9, method: str | None = None,
                   options: dict | None = None, event_fn: Callable | None = None,
                   adjoint_rtol: Tolerance | None = None,
                   adjoint_atol: Tolerance | None = None, adjoint_method: str | None = None,
                   adjoint_options: dict | None = None,
                   adjoint_params: Sequence[torch.Tensor] | None = None,
                   observer: Observer | StageObserver | None = None,
                   observer_dt: float | None = None,
                   stats: SolverStats | None = None, adjoint_stats: SolverStats | None = None,
                   backend: str = "ocnode", label: str | None = None) -> State:
    """:func:`solvers.odeint` whose gradients come from the adjoint ODE (O(1) memory).

    torchdiffeq's ``odeint_adjoint`` signature, plus an observer for the backward solve.

    Args:
        func: f(t, y); an nn.Module unless ``adjoint_params`` is given.
        y0, t, rtol, atol, method, options: as :func:`solvers.odeint`.
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: settings of the
            backward solve (default: the forward ones). A tuple tolerance (one per part of
            a tuple state) applies to the state's parts and to their adjoints, and its
            smallest value to the parameters' adjoint. ``adjoint_options={'norm':
            'seminorm'}`` leaves a_theta out of the error control (Kidger et al. 2021).
        adjoint_params: tensors to differentiate (default ``func.parameters()``).
        observer: a :class:`solvers.Observer`: called as ``observer(t_j, x(t_j), a(t_j), w_j)``
            at the nodes ``t_j = t_0 + j * observer_dt`` of the span (and ``t_N``) during the
            backward solve, with trapezoid weights ``w_j`` (tensors valid during the call
            only: clone to keep); or a :class:`solvers.StageObserver`, which watches the
            backward solve's own evaluations. Either gets ``observer.finish()`` once at the
            end of the backward solve.
        observer_dt: spacing of the observer grid (> 0); None: 0.01 of the span
            ``|t[-1] - t[0]|``. Not used by a stage observer.
        stats: filled by the forward solve; adjoint_stats: filled when backward runs.
        backend: 'ocnode' or 'torchdiffeq' (no observer there).
        label: put in front of every error message and warning of the forward and the
            backward solve, e.g. ``"ODE block 'enc'"`` (ocnode backend).

    Returns:
        y at each time, shape (T, ...), as :func:`solvers.odeint`.

    Raises:
        The errors of :func:`solvers.odeint`; from ``loss.backward()``, those of the backward
        solve (their message starts "backward (adjoint) solve"), a
        :class:`solvers.NonFiniteGradientError` when the incoming dL/dy is not finite.
    """
    method = method or "dopri5"
    stats = stats if stats is not None else SolverStats()
    adjoint_stats = adjoint_stats if adjoint_stats is not None else SolverStats()
    if backend == "torchdiffeq":
        return _torchdiffeq_adjoint(func, y0, t, rtol, atol, method, options, event_fn,
                                    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options,
                                    params_of(func, adjoint_params), observer, stats,
                                    backend)
    check_backend(backend)
    backward_options, seminorm = _split_seminorm(adjoint_options)
    spec = call_spec(method, rtol, atol, options, adjoint_method=adjoint_method,
                     adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                     adjoint_options=backward_options, seminorm=seminorm)
    return solve_adjoint(func, y0, t, spec, adjoint_params, observer, observer_dt, stats,
                         adjoint_stats, label, event_fn)


def _split_seminorm(adjoint_options: Mapping[str, Any] | None) -> tuple[dict | None, bool]:
    """torchdiffeq's ``adjoint_options={'norm': 'seminorm', ...}`` -> (the rest, seminorm);
    a callable norm stays in the options."""
    if adjoint_options is None:
        return None, False
    rest = dict(adjoint_options)
    if "norm" not in rest or callable(rest["norm"]):
        return rest, False
    if rest.pop("norm") != "seminorm":
        raise SolverInputError("adjoint_options['norm'] must be 'seminorm' or a callable "
                               "norm(adjoint_state) -> scalar on torchdiffeq's augmented state "
                               "(t, y, adj_y, *adj_params)")
    return rest, True


def solve_adjoint(func: Callable, y0: State, t: torch.Tensor, spec: SolverSpec,
                  adjoint_params: Sequence[torch.Tensor] | None,
                  observer: Observer | StageObserver | None,
                  observer_dt: float | None, stats: SolverStats,
                  adjoint_stats: SolverStats, label: str | None = None,
                  event_fn: Callable | None = None) -> Any:
    """The solve of :func:`odeint_adjoint` with validated settings ``spec``.

    Errors get ``label`` in front of their message, those of the backward solve too. With
    ``event_fn``: (event time, the solution at [t0, event time]), as :func:`solvers.odeint`;
    the backward solve runs from the event time to t0 (no gradient through the event time
    itself: :func:`solvers.odeint_event` adds it).
    """
    with in_context(label):
        return _solve_adjoint(func, y0, t, spec, adjoint_params, observer, observer_dt, stats,
                              adjoint_stats, label, event_fn)


def _solve_adjoint(func: Callable, y0: State, t: torch.Tensor, spec: SolverSpec,
                   adjoint_params: Sequence[torch.Tensor] | None,
                   observer: Observer | StageObserver | None,
                   observer_dt: float | None, stats: SolverStats, adjoint_stats: SolverStats,
                   label: str | None, event_fn: Callable | None = None) -> Any:
    params = params_of(func, adjoint_params)
    flat = flat_state(y0)
    y0_flat = flat.flatten(y0)
    flat_tolerances(spec, flat, y0_flat)  # errors now, not in loss.backward()
    flat_tolerances(spec.backward(), flat, y0_flat, "adjoint_")
    if event_fn is not None:
        check_event_times(t)
    times, direction = check_times(t, y0_flat)
    precomputed, event_t = None, None
    if event_fn is not None:
        rhs = make_rhs(func, flat, y0_flat.device, direction, stats)
        with torch.no_grad():
            t_event, y_event = solve_until_event(
                rhs, flat, y0_flat, y0, times[0], direction, event_fn, spec, stats,
                Progress(direction, label or ""),
                field_callbacks(func, flat, direction, spec, t, y0_flat))
        event_t = torch.tensor(t_event, dtype=t.dtype, device=t.device)
        times = [times[0], t_event]
        precomputed = torch.stack([y0_flat.detach(), y_event])
        t = torch.stack([t[0], event_t])
    if observer is not None:
        check_observer(observer)
        observer_dt = observer_spacing(times, observer_dt)
    cfg = _Config(func, flat, times, direction, spec, observer,
                  observer_dt if observer is not None else None, stats, adjoint_stats, t.dtype,
                  label, precomputed)
    ys = _AdjointFunction.apply(cfg, y0_flat, t, *params)
    return flat.unflatten(ys) if event_t is None else (event_t, flat.unflatten(ys))


def params_of(func: Callable, adjoint_params: Sequence[torch.Tensor] | None) -> tuple:
    """The tensors that the adjoint or a checkpointed solve differentiate (neither sees the
    forward's graph): ``adjoint_params``, or ``func.parameters()``."""
    if adjoint_params is not None:
        return tuple(adjoint_params)
    if not isinstance(func, torch.nn.Module):
        raise SolverInputError(
            "the adjoint and checkpointed solves need func to be an nn.Module, or "
            "adjoint_params=(tensors...) naming what to differentiate")
    return tuple(func.parameters())


def _torchdiffeq_adjoint(func, y0, t, rtol, atol, method, options, event_fn, adjoint_rtol,
                         adjoint_atol, adjoint_method, adjoint_options, params, observer,
                         stats, backend):
    if observer is not None:
        raise SolverInputError("the torchdiffeq backend has no observer; use backend='ocnode'")
    import torchdiffeq

    return torchdiffeq.odeint_adjoint(
        CountingFunc(func, stats), y0, t, rtol=rtol, atol=atol, method=method,
        options=options, event_fn=event_fn, adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
        adjoint_options=adjoint_options, adjoint_params=params)
