"""The private toolbox of :mod:`solvers.odeint` and :mod:`solvers.adjoint`.

User states (a tensor or a tuple of tensors) become one flat vector (:class:`FlatState`),
user functions become ``rhs(s, y_flat)`` on internal time ``s = direction * t`` (so that the
engine of :mod:`solvers.integrate` always integrates forward), and :func:`solve_flat` runs the
engine with the settings of one :class:`~solvers.spec.SolverSpec`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from solvers.adams import ADAMS_METHODS, MAX_ITERS, MAX_ORDER, integrate_adams, integrate_scipy
from solvers.compiled import TracedField, compile_arguments, compiled_attempt, next_time
from solvers.errors import SolverInputError
from solvers.implicit import MAX_ITERS as IMPLICIT_MAX_ITERS
from solvers.implicit import ImplicitTableau, integrate_implicit
from solvers.integrate import (
    NO_CALLBACKS,
    Emit,
    FlatTol,
    Norm,
    Progress,
    Rhs,
    StepCallbacks,
    StepControl,
    integrate_adaptive,
    integrate_fixed,
    rms_norm,
    segment_norm,
    side_of,
)
from solvers.spec import (
    SolverSpec,
    State,
    Tolerance,
    clock_dtype,
    fixed_interp,
    method_kind,
    stop_times,
)
from solvers.stats import SolverStats
from solvers.tableau import get_tableau

BACKENDS = ("ocnode", "torchdiffeq")

#: The fewest bits of a floating state dtype the engine accepts: float16 and bfloat16 have
#: too few for the step-size control (the error ratio and the step size underflow).
MIN_STATE_BITS = 32


@dataclass(frozen=True)
class FlatState:
    """How a tensor or tuple of tensors maps to one flat vector.

    Attributes:
        shapes: shape of each component.
        is_tuple: whether the user passed a tuple.
        bounds: [start, stop) of each component in the flat vector.
    """

    shapes: tuple[torch.Size, ...]
    is_tuple: bool

    @property
    def size(self) -> int:
        """The length of the flat vector."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append((start, start + n))
            start += n
        return out

    def flatten(self, y: State) -> torch.Tensor:
        """(tensor or tuple) -> flat (n,) tensor; a view when y is one contiguous tensor."""
        if not self.is_tuple:
            return y.reshape(-1)  # type: ignore[union-attr]
        return torch.cat([c.reshape(-1) for c in y])

    def unflatten(self, v: torch.Tensor) -> State:
        """flat (..., n) -> the user's structure with leading dims kept."""
        lead = v.shape[:-1]
        if not self.is_tuple:  # shapes as one tuple: view(*()) would fail for a 0-dim state
            return v.view((*lead, *self.shapes[0]))
        parts = [v[..., a:b].reshape((*lead, *s))
                 for (a, b), s in zip(self.bounds, self.shapes)]
        return tuple(parts) if self.is_tuple else parts[0]


def flat_state(y0: State) -> FlatState:
    """Describe y0 (a floating tensor or a non-empty tuple of them on one device and dtype)."""
    comps = y0 if isinstance(y0, tuple) else (y0,)
    if not comps or not all(isinstance(c, torch.Tensor) for c in comps):
        raise SolverInputError("y0 must be a tensor or a non-empty tuple of tensors")
    if not all(c.is_floating_point() for c in comps):
        raise SolverInputError(
            f"y0 must have a floating dtype, got {[c.dtype for c in comps]}; use y0.float()")
    if len({c.dtype for c in comps}) > 1 or len({c.device for c in comps}) > 1:
        raise SolverInputError(
            "every tensor of a tuple state must share one dtype and device, got "
            f"{[(c.dtype, str(c.device)) for c in comps]}")
    _check_precision(comps[0].dtype)
    return FlatState(tuple(c.shape for c in comps), isinstance(y0, tuple))


def _check_precision(dtype: torch.dtype) -> None:
    """Reject float16/bfloat16 (and other floats narrower than 32 bits) states."""
    if _low_precision(dtype):
        name = str(dtype).removeprefix("torch.")
        raise SolverInputError(
            f"{name} is not supported by the solver: integrate in float32 (e.g. autocast off "
            "inside the vector field, and y0.float()); its step-size control needs at least "
            "32-bit floats")


def _low_precision(dtype: object) -> bool:
    return (isinstance(dtype, torch.dtype) and dtype.is_floating_point
            and torch.finfo(dtype).bits < MIN_STATE_BITS)


def check_times(t: torch.Tensor, y_ref: torch.Tensor) -> tuple[list[float], float]:
    """Validate t (1-D, floating, strictly monotone, on y0's device).

    Returns:
        (times as float64 Python floats, direction +1.0 or -1.0)
    """
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 1:
        raise SolverInputError(
            "t must be a 1-D tensor of output times, e.g. torch.tensor([0., 1.])")
    if not t.is_floating_point():
        raise SolverInputError(f"t must have a floating dtype, got {t.dtype}; use t.float()")
    if t.device != y_ref.device:
        raise SolverInputError(
            f"t is on {t.device} but y0 on {y_ref.device}: move it with t.to(y0.device)")
    times = t.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(v) for v in times):
        raise SolverInputError(f"t must be finite, got {times}")
    diffs = [b - a for a, b in zip(times, times[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise SolverInputError(
            f"t must be strictly increasing or strictly decreasing, got {times}")
    return times, (-1.0 if diffs and diffs[0] < 0 else 1.0)


def make_rhs(func: Callable, flat: FlatState, device: torch.device, direction: float,
             stats: SolverStats) -> Rhs:
    """Wrap func(t, y) as rhs(s, y_flat) on internal time s = direction * t, counting NFE.

    ``func`` gets ``t`` as a 0-dim tensor in the state's dtype (torchdiffeq's convention: a
    float32 field that concatenates t to its input works with float64 output times); the
    engine's own clock stays float64.
    """
    checked = False

    def rhs(s: float, y: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        stats.nfe += 1
        dy = func(field_time(direction * s, y, direction * side_of(s)), flat.unflatten(y))
        if not checked:
            _check_derivative(dy, flat, y)
            checked = True
        dy = flat.flatten(dy)
        return dy if direction > 0 else -dy
    return rhs


def traced_field(func: Callable, flat: FlatState, direction: float) -> TracedField:
    """func as a traceable field on flat states at internal time s (for a compiled attempt;
    the checks of :func:`make_rhs` are made by its first, eager, evaluation)."""
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dy = flat.flatten(func(t, flat.unflatten(y)))
        return dy if direction > 0 else -dy
    return TracedField(field, (), func, ("forward", flat.shapes, flat.is_tuple), direction)


def field_time(t: float, y: torch.Tensor, side: float = 0) -> torch.Tensor:
    """The time handed to a vector field at state y: a 0-dim tensor in y's (real) dtype;
    with ``side`` -1 or +1 the neighbouring representable time below or above t in that
    dtype (torchdiffeq's ``Perturb.PREV``/``Perturb.NEXT``: a field that jumps at t is seen
    from that side)."""
    dtype = y.dtype if y.dtype.is_floating_point else torch.float64
    if not side:
        return torch.tensor(t, dtype=dtype, device=y.device)
    # on the host: no extra kernel per evaluation
    return torch.tensor(next_time(t, dtype, side), dtype=dtype, device=y.device)


def _check_derivative(dy: Any, flat: FlatState, y: torch.Tensor) -> None:
    comps = dy if isinstance(dy, tuple) else (dy,)
    shapes = tuple(getattr(c, "shape", None) for c in comps)
    if isinstance(dy, tuple) != flat.is_tuple or shapes != flat.shapes:
        raise SolverInputError(
            f"func(t, y) must return the state's structure and shapes {list(flat.shapes)}, "
            f"got {list(shapes)}")
    bad = [c.dtype for c in comps if c.dtype != y.dtype]
    if bad:
        amp = " (autocast? turn it off inside func)" if _low_precision(bad[0]) else ""
        raise SolverInputError(
            f"func(t, y) returned dtype {bad[0]} for a {y.dtype} state{amp}: cast inside func "
            "or create the model in the state's dtype")


def flat_tolerance(tol: Tolerance, flat: FlatState, y: torch.Tensor,
                   name: str = "rtol") -> float | torch.Tensor:
    """An error tolerance on a flat vector y: a float as it is; a tuple (one per part of a
    tuple state) as per-element values, shape (y.numel(),), in y's real dtype.

    y is the flat state of ``flat`` (n elements) or the adjoint's augmented state
    (x, a, a_theta) (2n + k elements), whose x and a take their parts' tolerances and
    a_theta the smallest of them.

    Raises:
        SolverInputError: a tuple whose length is not the state's number of parts.
    """
    if not isinstance(tol, tuple):
        return tol
    if not flat.is_tuple or len(tol) != len(flat.shapes):
        parts = f"a tuple of {len(flat.shapes)} parts" if flat.is_tuple else "a tensor"
        raise SolverInputError(
            f"{name} has {len(tol)} values, one per part of a tuple state, but the state is "
            f"{parts}: pass one value per part, or a float")
    n = flat.size
    sizes = torch.tensor([b - a for a, b in flat.bounds], device=y.device)
    per_part = torch.tensor(tol, dtype=y.real.dtype, device=y.device)
    state = torch.repeat_interleave(per_part, sizes, output_size=n)
    if y.numel() == n:
        return state
    rest = per_part.min().expand(y.numel() - 2 * n)
    return torch.cat([state, state, rest])


def flat_tolerances(spec: SolverSpec, flat: FlatState, y: torch.Tensor,
                    prefix: str = "") -> tuple[FlatTol, FlatTol]:
    """``spec``'s (rtol, atol) on the flat vector y (see :func:`flat_tolerance`); call it
    for its errors alone to check a tuple tolerance before a solve. ``prefix`` names the
    settings in the error (``"adjoint_"``: the backward solve's)."""
    return (flat_tolerance(spec.rtol, flat, y, prefix + "rtol"),
            flat_tolerance(spec.atol, flat, y, prefix + "atol"))


def step_control(spec: SolverSpec, flat: FlatState,
                 tolerances: tuple[FlatTol, FlatTol]) -> tuple[StepControl, Norm]:
    """Adaptive options and the flat (rtol, atol) (see :func:`flat_tolerances`) ->
    (StepControl, error norm). Tuple states use the max of RMS norms."""
    options = spec.solve_options()
    kw = {k: v for k, v in options.items()
          if k not in ("norm", "step_t", "jump_t", "perturb", "compile", "dtype")}
    for key in ("max_step", "min_step", "first_step"):
        if key in kw and kw[key] is not None:
            kw[key] = abs(float(kw[key]))
    norm = segment_norm(flat.bounds) if flat.is_tuple else rms_norm
    user_norm = options.get("norm")
    if user_norm is not None:
        norm = user_state_norm(user_norm, flat)
    rtol, atol = tolerances
    return StepControl(rtol=rtol, atol=atol, **kw), norm


def user_state_norm(user_norm: Callable, flat: FlatState) -> Norm:
    """A user's ``options['norm']``, which takes the state's structure, on flat vectors."""
    return lambda v: float(user_norm(flat.unflatten(v)))


def solve_flat(rhs: Rhs, y0: torch.Tensor, s_out: Sequence[float], emit: Emit,
               spec: SolverSpec, flat: FlatState, stats: SolverStats,
               norm: Norm | None = None, progress: Progress | None = None,
               first_step: float | None = None,
               callbacks: StepCallbacks = NO_CALLBACKS,
               land_on_end: bool = False, traced: TracedField | None = None) -> float | None:
    """Run the engine on a flat state at increasing internal times s_out.

    Uses ``spec``'s method, tolerances and options (those of the forward solve: pass
    ``spec.backward()`` for the adjoint's); ``norm`` replaces the default error norm;
    ``progress``
    maps s_out's time to the caller's in errors, warnings, ``step_t``/``jump_t`` and the grid
    of a ``grid_constructor`` (None: the same); ``first_step`` (adaptive methods) replaces
    the starting step search or option; ``callbacks`` are called around every step;
    ``land_on_end``: an adaptive solve's last step ends on s_out[-1] (see
    :func:`~solvers.integrate.integrate_adaptive`); ``traced``: rhs as a traceable field,
    which ``options['compile']`` compiles (None: the solve runs eagerly). y0 is
    the flat state of ``flat``, or any flat vector (the adjoint's augmented state), which a
    ``grid_constructor`` then receives as it is.

    Returns:
        An adaptive solve's next step size (see :func:`integrate_adaptive`); None for a
        fixed-step one.
    """
    progress = progress or Progress()
    options = spec.solve_options()
    kind = method_kind(spec.method)
    step_size = options.get("step_size")
    perturb = bool(options.get("perturb", False))
    interp = fixed_interp(options)
    grid = _constructed_grid(options, rhs, y0, s_out, flat, progress)
    rtol, atol = tolerances = flat_tolerances(spec, flat, y0)  # checked for every method
    if kind == "scipy":
        integrate_scipy(rhs, y0, s_out, emit, rtol, atol,
                        options.get("solver", "LSODA"), options.get("min_step"),
                        float(options.get("max_step", math.inf)), progress)
        return None
    if kind == "adams":
        integrate_adams(rhs, y0, s_out, emit, ADAMS_METHODS[spec.method], rtol, atol,
                        step_size, stats, progress, callbacks, grid, perturb,
                        int(options.get("max_order", MAX_ORDER)),
                        int(options.get("max_iters", MAX_ITERS)), interp)
        return None
    tab = get_tableau(spec.method)
    if isinstance(tab, ImplicitTableau):
        integrate_implicit(rhs, y0, s_out, emit, tab, step_size, stats, progress, callbacks,
                           int(options.get("max_iters", IMPLICIT_MAX_ITERS)), grid, interp)
        return None
    if tab.adaptive:
        ctl, default_norm = step_control(spec, flat, tolerances)
        if first_step is not None:
            ctl = dataclasses.replace(ctl, first_step=first_step)
        compile_kw = compile_arguments(options.get("compile"))
        attempt = None if compile_kw is None or traced is None else \
            compiled_attempt(traced, tab, ctl.rtol, ctl.atol, compile_kw)
        return integrate_adaptive(rhs, y0, s_out, emit, tab, ctl, norm or default_norm, stats,
                                  progress, callbacks, adaptive_stops(options, progress.direction),
                                  land_on_end, attempt)
    integrate_fixed(rhs, y0, s_out, emit, tab, step_size, stats, progress, callbacks, grid,
                    perturb, interp)
    return None


def adaptive_stops(options: dict, direction: float) -> list[tuple[float, bool]]:
    """options' step_t and jump_t as increasing internal times, tagged whether a jump."""
    tagged = [(direction * t, False) for t in stop_times(options, "step_t")]
    tagged += [(direction * t, True) for t in stop_times(options, "jump_t")]
    return sorted(tagged)


def _constructed_grid(options: dict, rhs: Rhs, y0: torch.Tensor, s_out: Sequence[float],
                      flat: FlatState, progress: Progress) -> list[float] | None:
    """The internal step times from ``options['grid_constructor']`` (None without one).

    torchdiffeq's contract: ``grid_constructor(func, y0, t)`` gets the field, the initial
    state and the output times (the caller's, as a tensor in the state's dtype) and returns
    the step times from t[0] to t[-1], monotone in t's direction.
    """
    constructor = options.get("grid_constructor")
    if constructor is None:
        return None
    direction = progress.direction
    user = y0.numel() == flat.size  # else the adjoint's augmented state: flat in and out
    unflatten = flat.unflatten if user else (lambda v: v)
    flatten = flat.flatten if user else (lambda v: v)

    def func(t: torch.Tensor, y: State) -> State:
        return unflatten(direction * rhs(direction * float(t), flatten(y)))

    t = torch.tensor([progress.time(s) for s in s_out], dtype=y0.dtype, device=y0.device)
    grid = constructor(func, unflatten(y0), t)
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        raise SolverInputError(
            "grid_constructor(func, y0, t) must return a 1-D tensor of at least two step "
            f"times, got {grid if not isinstance(grid, torch.Tensor) else grid.shape}")
    s_grid = [direction * v for v in grid.detach().to("cpu", torch.float64).tolist()]
    tol = 1e-6 * max(1.0, abs(s_out[0]), abs(s_out[-1]))
    if abs(s_grid[0] - s_out[0]) > tol or abs(s_grid[-1] - s_out[-1]) > tol:
        raise SolverInputError(
            f"grid_constructor's grid must start at t[0]={progress.time(s_out[0]):g} and end "
            f"at t[-1]={progress.time(s_out[-1]):g}, got {grid[0].item():g} ... "
            f"{grid[-1].item():g}")
    if not all(b > a for a, b in zip(s_grid, s_grid[1:])) or not all(
            math.isfinite(v) for v in s_grid):
        raise SolverInputError("grid_constructor's grid must be finite and strictly monotone "
                               "in the direction of t")
    s_grid[0], s_grid[-1] = s_out[0], s_out[-1]  # exactly the solve's ends
    return s_grid


#: torchdiffeq's step callbacks of a vector field.
CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


def supported_callbacks(method: str) -> tuple[str, ...]:
    """The callbacks a method calls, as torchdiffeq: adaptive Runge-Kutta methods all three,
    fixed-grid ones (explicit, implicit, Adams) only ``callback_step``, scipy_solver none."""
    kind = method_kind(method)
    if kind == "adaptive":
        return CALLBACK_NAMES
    return () if kind == "scipy" else CALLBACK_NAMES[:1]


def defined_callbacks(func: Any, method: str, suffix: str = "") -> list[Callable | None]:
    """``func``'s callbacks (``callback_step`` ... with ``suffix``), None for those that it
    lacks or that ``method`` does not call; warns, as torchdiffeq, when func defines some that
    the method does not call."""
    found = [getattr(func, name + suffix, None) for name in CALLBACK_NAMES]
    found = [fn if callable(fn) else None for fn in found]
    supported = supported_callbacks(method)
    unused = {name + suffix for name, fn in zip(CALLBACK_NAMES, found)
              if fn is not None and name not in supported}
    if unused:
        warnings.warn(f"Solver '{method}' does not support callbacks {unused}", stacklevel=4)
    return [fn if name in supported else None for name, fn in zip(CALLBACK_NAMES, found)]


class FieldCallbacks(StepCallbacks):
    """Calls a vector field's torchdiffeq callbacks ``fn(t0, y0, dt)`` around the engine's
    steps: ``t0`` the step's start in the caller's time and ``dt`` the step size (> 0), both
    0-dim tensors of ``t_dtype`` on the state's device, ``y0`` the state at t0 as ``to_user``
    makes it (the caller's structure)."""

    def __init__(self, fns: Sequence[Callable | None], to_user: Callable[[torch.Tensor], Any],
                 direction: float, t_dtype: torch.dtype) -> None:
        self.fns, self.to_user = list(fns), to_user
        self.direction, self.t_dtype = direction, t_dtype

    def _call(self, k: int, s: float, y: torch.Tensor, dt: float) -> None:
        fn = self.fns[k]
        if fn is not None:
            t0 = torch.tensor(self.direction * s + 0.0, dtype=self.t_dtype, device=y.device)
            fn(t0, self.to_user(y), torch.tensor(dt, dtype=self.t_dtype, device=y.device))

    def step(self, s: float, y: torch.Tensor, dt: float) -> None:
        self._call(0, s, y, dt)

    def accept(self, s: float, y: torch.Tensor, dt: float) -> None:
        self._call(1, s, y, dt)

    def reject(self, s: float, y: torch.Tensor, dt: float) -> None:
        self._call(2, s, y, dt)


def callback_time_dtype(spec: SolverSpec, t_dtype: torch.dtype,
                        y_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the times handed to callbacks, as torchdiffeq: for adaptive methods
    their clock's (:func:`solvers.spec.clock_dtype`: float64 unless ``options['dtype']``
    says otherwise), for fixed-grid ones t's own (their grid is made of t)."""
    if method_kind(spec.method) == "adaptive":
        return clock_dtype(spec.solve_options(), y_dtype)
    return t_dtype


def field_callbacks(func: Any, flat: FlatState, direction: float, spec: SolverSpec,
                    t: torch.Tensor, y: torch.Tensor) -> StepCallbacks:
    """The engine's StepCallbacks for ``func.callback_step`` & co. (NO_CALLBACKS if none);
    t: the output times, y: the flat state (their dtypes set the callbacks' time dtype)."""
    fns = defined_callbacks(func, spec.method)
    if not any(fns):
        return NO_CALLBACKS
    return FieldCallbacks(fns, flat.unflatten, direction,
                          callback_time_dtype(spec, t.dtype, y.dtype))


def check_backend(backend: str) -> None:
    """Raise a SolverInputError for a backend other than 'ocnode' or 'torchdiffeq'."""
    if backend not in BACKENDS:
        raise SolverInputError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")


class CountingFunc(torch.nn.Module):
    """Wraps a vector field to count its evaluations (for the torchdiffeq backend)."""

    def __init__(self, func: Callable, stats: SolverStats) -> None:
        super().__init__()
        self.func, self.stats = func, stats

    def forward(self, t: torch.Tensor, y: State) -> State:
        self.stats.nfe += 1
        return self.func(t, y)

    def __getattr__(self, name: str) -> Any:
        """The wrapped field's step callbacks (``callback_step`` & co.), for torchdiffeq."""
        if name.startswith("callback_"):
            return getattr(self.func, name)
        return super().__getattr__(name)
