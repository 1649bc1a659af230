"""A compiled step attempt for adaptive explicit Runge-Kutta methods (``options['compile']``).

For a small vector field, a solve's time goes to Python and to launching kernels: a dopri5
attempt on a 2-64-2 MLP is about forty tiny operations (six field evaluations, the stage
combinations, the scaled error), each a few microseconds of overhead for well under a
microsecond of arithmetic. With the option, one whole attempt (every stage, the new state,
the error scaled by ``atol + rtol * max(|y0|, |y1|)``) is traced once with
:func:`torch.compile` into one graph, which inductor fuses; the step-size controller, the
outputs, the callbacks and the error norm stay in Python around it, so the solution and the
step sequence are those of the eager engine to rounding.

A compiled attempt is cached per vector field (weakly: it dies with the field) and per
setting (method, tolerances, direction, state structure, compile arguments); torch.compile
itself adds a graph per new input shape, dtype, device or grad mode (and stops compiling,
with its own warning, after its recompile limit). The adjoint's backward solve compiles the
augmented field written with :func:`torch.func.vjp` over ``func``'s parameters; a stage
observer (SNOpt's stage curvature) runs that solve eagerly, because it hooks every
evaluation.

Costs and limits: compiling takes seconds per graph (reported apart in the benchmarks);
inductor needs a C++ compiler on CPU (``backend='aot_eager'`` does not, but fuses nothing).
On CUDA, ``{'mode': 'reduce-overhead'}`` captures the attempt in a CUDA graph.
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from solvers.errors import SolverInputError
from solvers.integrate import FlatTol, _Stages, side_of
from solvers.stats import SolverStats
from solvers.tableau import ButcherTableau

#: torch.compile's keyword arguments that ``options['compile']`` may set.
COMPILE_KEYS = frozenset({"backend", "mode", "fullgraph", "dynamic", "options"})

#: A traceable field: field(t, y, *args) -> dy/ds on flat states, t a 0-dim tensor of y's
#: dtype (the time handed to the user's function), args extra tensors (the adjoint's
#: parameters), with no Python side effects.
Field = Callable[..., torch.Tensor]

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TracedField(NamedTuple):
    """A solve's vector field in the form a compiled attempt traces.

    ``field(t, y, *args)``: see :data:`Field`; ``owner``: the user's function it wraps (the
    cache's weak key); ``key``: what else the field's closure depends on (the state's
    structure, which parameters ``args`` are); ``direction``: the field's time is
    direction * the engine's internal time.
    """

    field: Field
    args: tuple[torch.Tensor, ...]
    owner: object
    key: tuple
    direction: float


def compile_arguments(value: object) -> dict[str, Any] | None:
    """``options['compile']`` -> torch.compile's keyword arguments (None: do not compile).

    True means torch.compile's defaults (inductor); a dict passes those of
    :data:`COMPILE_KEYS`, e.g. ``{'backend': 'aot_eager'}`` or ``{'mode': 'reduce-overhead'}``.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - COMPILE_KEYS)
        if unknown:
            raise SolverInputError(f"options['compile'] takes torch.compile's arguments "
                                   f"{sorted(COMPILE_KEYS)}; unknown: {unknown}")
        return dict(value)
    raise SolverInputError(f"options['compile'] must be True, False or a dict of torch.compile's "
                           f"arguments (e.g. {{'mode': 'reduce-overhead'}}), got {value!r}")


def next_time(t: float, dtype: torch.dtype, side: float) -> float:
    """The value of ``dtype`` next to t below (side -1) or above (side +1) it, as a float:
    a field that jumps at t is seen from that side (torchdiffeq's ``perturb``)."""
    towards = math.copysign(math.inf, side)
    if dtype == torch.float64:
        return math.nextafter(t, towards)
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(t), np.float32(towards)))
    tt = torch.tensor(t, dtype=dtype)
    return float(torch.nextafter(tt, torch.tensor(towards, dtype=dtype)))


class CompiledAttempt:
    """One step attempt of an adaptive explicit tableau on a traceable field, compiled.

    Call as ``attempt(t, dt, t_end, y, f0)`` on internal times (floats): the stages with
    node 1 are evaluated just before ``t_end``, as the eager engine's. Returns
    (y1 (n,), the scaled error (n,) (detached), the stages (S, n)), as
    :class:`solvers.integrate.Attempt`. ``direction`` maps the
    internal time to the field's (t = direction * s).
    """

    def __init__(self, compiled: Callable, args: Sequence[Any], tab: ButcherTableau,
                 direction: float) -> None:
        self._fn, self.args, self.direction = compiled, tuple(args), direction
        self.nodes = [float(c) for c in tab.c[1:]]
        #: field evaluations per attempt (stage 0 is the last attempt's, or f(t0, y0))
        self.nfe = tab.stages - 1

    def __call__(self, t: float, dt: float, t_end: float, y: torch.Tensor,
                 f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Stages]:
        d = self.direction
        end = next_time(d * t_end, y.dtype, -d)
        times = [dt] + [end if c == 1.0 else d * (t + c * dt) for c in self.nodes]
        packed = torch.tensor(times, dtype=y.dtype, device=y.device)
        y1, scaled_err, ks = self._fn(packed, y, f0, *self.args)
        return y1, scaled_err, _Stages.holding(ks)


def compiled_attempt(traced: TracedField, tab: ButcherTableau, rtol: FlatTol, atol: FlatTol,
                     compile_kw: dict[str, Any]) -> CompiledAttempt:
    """The cached :class:`CompiledAttempt` of a traced field with these settings (the graph
    is traced on its first call). Float tolerances are constants of the graph (one graph
    per value); per-element ones (tensors, shape (n,)) are its inputs."""
    setting = tuple(v if isinstance(v, float) else "per-element" for v in (rtol, atol))
    fn = _cached(traced, (tab.name, *setting), compile_kw,
                 lambda: _attempt_fn(traced.field, tab))
    return CompiledAttempt(fn, (rtol, atol, *traced.args), tab, traced.direction)


def compiled_rhs(traced: TracedField, stats: SolverStats,
                 compile_kw: dict[str, Any]) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """One evaluation of a traced field as a compiled rhs(s, y) on internal time, counting
    NFE in ``stats``: the evaluations a solve makes outside its attempts (the first
    derivative, the starting step's search), for a field whose eager evaluation is costly
    (the adjoint's, with its vector-Jacobian products)."""
    fn = _cached(traced, ("rhs",), compile_kw, lambda: _own_code(traced.field))
    d, args = traced.direction, traced.args

    def rhs(s: float, y: torch.Tensor) -> torch.Tensor:
        stats.nfe += 1
        side = side_of(s)
        t = next_time(d * s, y.dtype, d * side) if side else d * s
        return fn(torch.tensor(t, dtype=y.dtype, device=y.device), y, *args)
    return rhs


def _cached(traced: TracedField, setting: tuple, compile_kw: dict[str, Any],
            build: Callable[[], Callable]) -> Callable:
    """torch.compile(build()), cached per traced field, ``setting`` and compile arguments."""
    owner = getattr(traced.owner, "__self__", traced.owner)  # a bound method: its object
    key = (traced.key, getattr(traced.owner, "__func__", None), setting, traced.direction,
           repr(sorted(compile_kw.items())))
    try:
        per_owner = _CACHE.setdefault(owner, {})
    except TypeError:  # not weakly referenceable: compiled for this solve alone
        per_owner = {}
    fn = per_owner.get(key)
    if fn is None:
        fn = torch.compile(build(), **compile_kw)
        per_owner[key] = fn
    return fn


def _own_code(fn: Callable) -> Callable:
    """A copy of a Python function with a code object of its own: torch.compile keeps its
    graphs (and counts its recompile limit) per code object, so every field and setting gets
    its own allowance."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def _attempt_fn(field: Field, tab: ButcherTableau) -> Callable:
    """The function torch.compile traces: (packed times, y, f0, rtol, atol, *args) ->
    (y1, scaled err, K).

    ``packed`` holds dt and the field times of stages 1..S-1; the tableau's coefficients are
    Python constants of the graph (zeros dropped)."""
    a_rows = [[float(v) for v in row[:i]] for i, row in enumerate(tab.a)]
    b = [float(v) for v in tab.b]
    b_err = [float(v) for v in tab.b_err] if tab.b_err is not None else None
    if b_err is None:
        raise SolverInputError(f"options['compile'] needs an adaptive method; {tab.name!r} "
                               "has no error estimate")
    stages, fsal = tab.stages, tab.fsal

    def attempt(packed: torch.Tensor, y: torch.Tensor, f0: torch.Tensor, rtol: Any, atol: Any,
                *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = packed[0]
        ks = [f0]
        y_new = y
        for i in range(1, stages):
            y_new = y + dt * _weighted(a_rows[i], ks)
            ks.append(field(packed[i], y_new, *args))
        if not fsal:
            y_new = y + dt * _weighted(b, ks)
        err = dt * _weighted(b_err, ks)
        scale = torch.maximum(y.abs(), y_new.abs()) * rtol + atol
        return y_new, (err / scale).detach(), torch.stack(ks)
    return _own_code(attempt)


def _weighted(weights: Sequence[float], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i w_i k_i over the nonzero weights (at least one term)."""
    terms = [w * k for w, k in zip(weights, ks) if w != 0.0]
    out = terms[0] if terms else ks[0] * 0.0
    for term in terms[1:]:
        out = out + term
    return out
