"""The private toolbox of :mod:`solvers.odeint` and :mod:`solvers.adjoint`.

User states (a tensor or a tuple of tensors) become one flat vector (:class:`FlatState`),
user functions become ``rhs(s, y_flat)`` on internal time ``s = direction * t`` (so that the
engine of :mod:`solvers.integrate` always integrates forward), and :func:`solve_flat` runs the
engine with the settings of one :class:`~solvers.spec.SolverSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from solvers.errors import SolverInputError
from solvers.implicit import ImplicitTableau, integrate_implicit
from solvers.integrate import (
    NO_CALLBACKS,
    Emit,
    Norm,
    Progress,
    Rhs,
    StepCallbacks,
    StepControl,
    integrate_adaptive,
    integrate_fixed,
    rms_norm,
    segment_norm,
)
from solvers.spec import SolverSpec, State
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
        dy = func(field_time(direction * s, y), flat.unflatten(y))
        if not checked:
            _check_derivative(dy, flat, y)
            checked = True
        dy = flat.flatten(dy)
        return dy if direction > 0 else -dy
    return rhs


def field_time(t: float, y: torch.Tensor) -> torch.Tensor:
    """The time handed to a vector field at state y: a 0-dim tensor in y's (real) dtype."""
    dtype = y.dtype if y.dtype.is_floating_point else torch.float64
    return torch.tensor(t, dtype=dtype, device=y.device)


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


def step_control(spec: SolverSpec, flat: FlatState) -> tuple[StepControl, Norm]:
    """Adaptive options -> (StepControl, error norm). Tuple states use the max of RMS norms."""
    options = spec.solve_options()
    kw = {k: v for k, v in options.items() if k != "norm"}
    for key in ("max_step", "min_step", "first_step"):
        if key in kw and kw[key] is not None:
            kw[key] = abs(float(kw[key]))
    norm = segment_norm(flat.bounds) if flat.is_tuple else rms_norm
    user_norm = options.get("norm")
    if user_norm is not None:
        norm = _user_norm(user_norm, flat)
    return StepControl(rtol=spec.rtol, atol=spec.atol, **kw), norm


def _user_norm(user_norm: Callable, flat: FlatState) -> Norm:
    return lambda v: float(user_norm(flat.unflatten(v)))


def solve_flat(rhs: Rhs, y0: torch.Tensor, s_out: Sequence[float], emit: Emit,
               spec: SolverSpec, flat: FlatState, stats: SolverStats,
               norm: Norm | None = None, progress: Progress | None = None,
               first_step: float | None = None,
               callbacks: StepCallbacks = NO_CALLBACKS) -> float | None:
    """Run the engine on a flat state at increasing internal times s_out.

    Uses ``spec``'s method, tolerances and options (those of the forward solve: pass
    ``spec.backward()`` for the adjoint's); ``norm`` replaces the default error norm;
    ``progress`` maps s_out's time to the caller's in errors and warnings (None: the same);
    ``first_step`` (adaptive methods) replaces the starting step search or option;
    ``callbacks`` are called around every step.

    Returns:
        An adaptive solve's next step size (see :func:`integrate_adaptive`); None for a
        fixed-step one.
    """
    tab = get_tableau(spec.method)
    step_size = spec.solve_options().get("step_size")
    if isinstance(tab, ImplicitTableau):
        integrate_implicit(rhs, y0, s_out, emit, tab, step_size, stats, progress, callbacks)
        return None
    if tab.adaptive:
        ctl, default_norm = step_control(spec, flat)
        if first_step is not None:
            ctl = dataclasses.replace(ctl, first_step=first_step)
        return integrate_adaptive(rhs, y0, s_out, emit, tab, ctl, norm or default_norm, stats,
                                  progress, callbacks)
    integrate_fixed(rhs, y0, s_out, emit, tab, step_size, stats, progress, callbacks)
    return None


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
