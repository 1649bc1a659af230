"""Solver settings as one validated value, and the observer protocol of the adjoint solve.

A :class:`SolverSpec` holds every setting of a solve: the method, tolerances and options of
the forward solve, whether gradients come from the adjoint (Chen et al. 2018, "Neural
Ordinary Differential Equations"), and the settings of the adjoint's backward solve. It is
validated once, when it is built, and is immutable and hashable, so that a model can keep
one and hand it to :func:`solvers.solve` at every call::

    spec = SolverSpec(method="rk4", options={"step_size": 0.1})
    tight = spec.replace(method="dopri5", options=None, rtol=1e-6, atol=1e-6)

An :class:`Observer` receives samples of the adjoint's backward solve on a time grid, with
their quadrature weights, then ``finish()`` once the solve is over; a
:class:`StageObserver` watches the backward solve's own evaluations instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeGuard

import torch

from solvers.adams import ADAMS_METHODS, SCIPY_METHOD
from solvers.compiled import compile_arguments
from solvers.errors import SolverInputError
from solvers.implicit import ImplicitTableau
from solvers.tableau import get_tableau

#: An ODE state: one tensor, or a tuple of tensors integrated together (e.g. a CNF's (z, logp)).
State = torch.Tensor | tuple[torch.Tensor, ...]
#: An error tolerance: a float, or one float per part of a tuple state (torchdiffeq's).
Tolerance = float | tuple[float, ...]

ADAPTIVE_OPTIONS = frozenset({"first_step", "safety", "ifactor", "dfactor", "icoeff", "pcoeff",
                              "min_step", "max_step", "max_num_steps", "norm", "step_t",
                              "jump_t", "compile", "dtype"})
FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "perturb", "interp"})
IMPLICIT_OPTIONS = frozenset({"step_size", "grid_constructor", "max_iters", "interp"})
ADAMS_OPTIONS = FIXED_OPTIONS | {"max_order", "max_iters"}
SCIPY_OPTIONS = frozenset({"solver", "min_step", "max_step"})
#: The values of a fixed-grid method's ``interp`` option, the default first.
INTERPS = ("cubic", "linear")
#: The options of each kind of method (see :func:`method_kind`).
KIND_OPTIONS = {"adaptive": ADAPTIVE_OPTIONS, "fixed": FIXED_OPTIONS,
                "implicit": IMPLICIT_OPTIONS, "adams": ADAMS_OPTIONS, "scipy": SCIPY_OPTIONS}
#: Kinds of methods that step on a fixed grid (step_size, grid_constructor).
GRID_KINDS = frozenset({"fixed", "implicit", "adams"})


def method_kind(method: str) -> str:
    """'adaptive' or 'fixed' (explicit Runge-Kutta), 'implicit', 'adams' (torchdiffeq's
    multistep methods) or 'scipy' (``scipy_solver``).

    Raises:
        SolverInputError: for an unknown method name.
    """
    if method in ADAMS_METHODS:
        return "adams"
    if method == SCIPY_METHOD:
        return "scipy"
    tab = get_tableau(method)
    if isinstance(tab, ImplicitTableau):
        return "implicit"
    return "adaptive" if tab.adaptive else "fixed"


class Observer(Protocol):
    """Receives the adjoint's backward solve as a quadrature over its time span.

    ``odeint_adjoint(..., observer=obs, observer_dt=dt)`` calls ``obs(t_j, x_j, a_j, w_j)`` for
    every grid sample ``t_j`` of each backward solve, with ``w_j`` its quadrature weight, so
    that ``sum_j w_j g(t_j, x_j, a_j)`` approximates ``int g(t, x(t), a(t)) dt`` over the
    solve's span; then ``obs.finish()`` once, after the last sample (also when the solve had
    no sample). The nodes are ``t_0 + j * dt`` within the span and ``t_N`` itself, with the
    trapezoid rule's weights (``dt``, half of it at the ends). ``finish()`` is not called when
    the backward solve raises.
    """

    def __call__(self, t: float, x: State, a: State, weight: float) -> None:
        """One sample: the time ``t``, the state ``x(t)`` and the adjoint ``a(t)``, both
        shaped like the state (valid during the call only: clone them to keep them), and the
        sample's quadrature weight (> 0)."""

    def finish(self) -> None:
        """The backward solve is over: no more samples until the next one."""


class StageObserver(Protocol):
    """Watches the adjoint backward solve's own evaluations, at no extra evaluation.

    The backward solve evaluates the vector field and its vector-Jacobian product with the
    adjoint at every stage of every step attempt. Each such evaluation at time ``t`` runs
    inside ``with obs.evaluation(t):`` (what the observer records there, e.g. with hooks on
    the field's layers, belongs to that evaluation); after an accepted step,
    ``obs.accept_step(weights)`` gives one quadrature weight per evaluation made since the
    previous ``accept_step``/``reject_step``, in order, so that summing over accepted steps
    approximates the time integral over the span (weights >= 0, see
    :func:`solvers.adjoint.stage_weights`); after a rejected attempt ``obs.reject_step()``
    says to drop the evaluations since then. ``finish()`` comes once at the end (evaluations
    not accepted by then are dropped too); not when the backward solve raises.
    """

    def evaluation(self, t: float) -> AbstractContextManager:
        """A context around one evaluation of the field at the caller's time ``t``."""

    def accept_step(self, weights: list[float]) -> None:
        """Keep the pending evaluations, with these quadrature weights."""

    def reject_step(self) -> None:
        """Drop the pending evaluations (a rejected step attempt)."""

    def finish(self) -> None:
        """The backward solve is over."""


def is_stage_observer(observer: object) -> TypeGuard[StageObserver]:
    """Whether ``observer`` follows :class:`StageObserver` (it has ``evaluation``)."""
    return callable(getattr(observer, "evaluation", None))


def check_observer(observer: object) -> None:
    """Raise a :class:`SolverInputError` unless ``observer`` follows :class:`Observer` or
    :class:`StageObserver`."""
    if is_stage_observer(observer):
        missing = [m for m in ("accept_step", "reject_step", "finish")
                   if not callable(getattr(observer, m, None))]
        if missing:
            raise SolverInputError(
                f"a stage observer (it has evaluation()) also needs {', '.join(missing)} (see "
                f"solvers.StageObserver); got {type(observer).__name__}")
        return
    if not (callable(observer) and callable(getattr(observer, "finish", None))):
        raise SolverInputError(
            f"an observer must be called as observer(t, x, a, weight) and have a finish() "
            f"method (see solvers.Observer); got {type(observer).__name__}: wrap a function in "
            "a class with __call__ and finish")


class _FrozenOptions(Mapping[str, Any]):
    """A read-only, hashable copy of a dict of solver options (and picklable, unlike
    ``types.MappingProxyType``)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._items = tuple(sorted(options.items()))

    def __getitem__(self, key: str) -> Any:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return repr(dict(self._items))


@dataclasses.dataclass(frozen=True, repr=False)
class SolverSpec:
    """Every setting of a solve, validated once when built; immutable and hashable.

    Args:
        method: one of ``solvers.METHODS``: adaptive (``"dopri5"``, ``"tsit5"``, ``"bosh3"``,
            ``"adaptive_heun"``) or fixed-step (``"euler"``, ``"midpoint"``, ``"rk4"``,
            ``"rk38"``).
        rtol, atol: error tolerances of adaptive methods: positive floats, or for a tuple
            state one per part (a tuple; a list or 1-dim tensor is taken as one).
        options: solver options. Adaptive methods: ``first_step``, ``min_step``,
            ``max_step``, ``max_num_steps`` (a positive int), ``safety``, ``ifactor``,
            ``dfactor``, ``icoeff``, ``pcoeff`` (PI control), ``norm`` (a callable),
            ``dtype`` (the time dtype callbacks and ``event_fn`` get, see
            :func:`clock_dtype`).
            Fixed-step methods need ``step_size``.
        adjoint: gradients by the adjoint backward solve (O(1) memory) instead of
            backpropagation through the solver's operations.
        adjoint_method, adjoint_rtol, adjoint_atol: the backward solve's method and
            tolerances; None: the forward ones.
        adjoint_options: options of the backward solve; None: the forward ``options``
            (without ``norm``).
        seminorm: leave the parameter adjoint out of the backward solve's error control
            (Kidger, Chen, Lyons 2021, "'Hey, that's not an ODE': Faster ODE Adjoints via
            Seminorms"; adaptive backward methods only). It can save backward steps, and
            the gradients stay within the tolerance.
        checkpoint: with ``adjoint=False``, backpropagate through the solver with step
            checkpoints (:mod:`solvers.checkpoint`): the forward solve keeps each accepted
            step's start state and first stage instead of every stage's graph, and the
            backward replays the steps in segments of bounded graph size. The same gradient
            as plain backpropagation, at one forward solve more; explicit Runge-Kutta
            methods only.

    The ``adjoint_*`` settings and ``seminorm`` only matter when ``adjoint`` is True.

    Raises:
        SolverInputError: an unknown method or option, a non-positive tolerance, a bad
            option value, or a fixed-step method without ``options={'step_size': ...}``.
    """

    method: str = "dopri5"
    rtol: Tolerance = 1e-3
    atol: Tolerance = 1e-3
    options: Mapping[str, Any] | None = None
    adjoint: bool = True
    adjoint_method: str | None = None
    adjoint_rtol: Tolerance | None = None
    adjoint_atol: Tolerance | None = None
    adjoint_options: Mapping[str, Any] | None = None
    seminorm: bool = False
    checkpoint: bool = False

    def __post_init__(self) -> None:
        _check_method(self.method, "method")
        for name in ("rtol", "atol"):
            self._set(name, _tolerance(name, getattr(self, name)))
        self._set("options", _FrozenOptions(_check_options(self.method, self.options)))
        _check_flags(adjoint=self.adjoint, seminorm=self.seminorm, checkpoint=self.checkpoint)
        self._check_checkpoint()
        self._check_adjoint_settings()
        self._check_step_size()
        self._set("_backward", self._make_backward())

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_checkpoint(self) -> None:
        if not self.checkpoint:
            return
        if self.adjoint:
            raise SolverInputError(
                "checkpoint=True backpropagates through the solver's steps (replayed from "
                "checkpoints), which excludes the adjoint: pass adjoint=False too")
        if method_kind(self.method) not in ("adaptive", "fixed"):
            raise SolverInputError(
                f"checkpoint=True replays explicit Runge-Kutta steps; {self.method!r} is not "
                "one: use e.g. 'dopri5' or 'rk4', or checkpoint=False")
        if compile_arguments(self.solve_options().get("compile")) is not None:
            raise SolverInputError("options['compile'] is not supported with checkpoint=True "
                                   "(the replayed steps run eagerly): drop one of them")

    def _check_adjoint_settings(self) -> None:
        if self.adjoint_method is not None:
            _check_method(self.adjoint_method, "adjoint_method")
        for name in ("adjoint_rtol", "adjoint_atol"):
            value = getattr(self, name)
            if value is not None:
                self._set(name, _tolerance(name, value))
        if self.adjoint_options is not None:
            if not isinstance(self.adjoint_options, Mapping):
                raise SolverInputError(_not_a_dict("adjoint_options", self.adjoint_options))
            norm = self.adjoint_options.get("norm")
            if norm == "seminorm":
                raise SolverInputError(
                    "adjoint_options['norm']='seminorm': pass seminorm=True for the seminorm")
            if "norm" in self.adjoint_options and not callable(norm):
                raise SolverInputError(
                    "adjoint_options['norm'] must be a callable on the adjoint state "
                    "(t, y, adj_y, *adj_params), as torchdiffeq's; pass seminorm=True for "
                    "the seminorm")
            if norm is not None and self.seminorm:
                raise SolverInputError("adjoint_options['norm'] and seminorm=True exclude "
                                       "each other: the norm decides what is controlled")
            self._set("adjoint_options", _FrozenOptions(_times_as_floats(self.adjoint_options)))

    def _check_step_size(self) -> None:
        """Models step with ``step_size``: stepping on the output times only (what plain
        :func:`solvers.odeint` does without it) would be one step over the whole horizon."""
        options = self.solve_options()
        if method_kind(self.method) in GRID_KINDS and options.get("step_size") is None \
                and options.get("grid_constructor") is None:
            raise SolverInputError(
                f"{self.method} needs options={{'step_size': ...}} (a fixed-step method), or "
                "choose an adaptive method such as 'dopri5'")

    def _make_backward(self) -> SolverSpec:
        """The settings of the adjoint's backward solve, as one spec (validated here)."""
        options = dict(self.adjoint_options if self.adjoint_options is not None
                       else self.solve_options())
        options.pop("norm", None)
        changes: dict[str, Any] = {"method": self.adjoint_method or self.method,
                   "rtol": self.rtol if self.adjoint_rtol is None else self.adjoint_rtol,
                   "atol": self.atol if self.adjoint_atol is None else self.adjoint_atol,
                   "options": options}
        if all(getattr(self, k) == v for k, v in changes.items()) and not self._has_adjoint():
            return self
        try:
            return dataclasses.replace(
                self, **changes, adjoint_method=None, adjoint_rtol=None, adjoint_atol=None,
                adjoint_options=None, seminorm=False, checkpoint=False)
        except SolverInputError as err:
            raise SolverInputError(
                f"the adjoint solve's settings (adjoint_method, adjoint_options): {err}"
            ) from None

    def _has_adjoint(self) -> bool:
        names = ("adjoint_method", "adjoint_rtol", "adjoint_atol", "adjoint_options")
        return self.seminorm or any(getattr(self, name) is not None for name in names)

    @property
    def adaptive(self) -> bool:
        """Whether the forward method has step-size control."""
        return method_kind(self.method) in ("adaptive", "scipy")

    @property
    def adjoint_norm(self) -> Any:
        """The user's norm of the backward solve (``adjoint_options['norm']``), or None."""
        return (self.adjoint_options or {}).get("norm")

    def solve_options(self) -> dict[str, Any]:
        """The forward solve's options, as a new dict."""
        return dict(self.options or {})

    def backward(self) -> SolverSpec:
        """The settings of the adjoint's backward solve: ``adjoint_method``/``rtol``/``atol``/
        ``options`` resolved against the forward ones (``seminorm`` stays on this spec)."""
        backward: SolverSpec = self.__dict__["_backward"]
        return backward

    def replace(self, **changes: Any) -> SolverSpec:
        """A copy with some settings changed (validated again), as ``dataclasses.replace``."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        """Only the settings that differ from the defaults, e.g. ``SolverSpec(method='rk4',
        options={'step_size': 0.1})``."""
        shown = []
        for f in dataclasses.fields(SolverSpec):
            value = getattr(self, f.name)
            if value != f.default and not (f.name == "options" and not value):
                shown.append(f"{f.name}={_show(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"


class _CallSpec(SolverSpec):
    """The settings of a plain :func:`solvers.odeint` call: a fixed-step method without
    ``step_size`` steps on the output times, as in torchdiffeq."""

    def _check_step_size(self) -> None:
        return None


def call_spec(method: str, rtol: Any, atol: Any, options: Mapping[str, Any] | None,
              **adjoint: Any) -> SolverSpec:
    """The spec of an ``odeint``/``odeint_adjoint`` call (torchdiffeq's semantics)."""
    return _CallSpec(method=method, rtol=rtol, atol=atol, options=options, **adjoint)


def _show(value: Any) -> str:
    return repr(dict(value)) if isinstance(value, Mapping) else repr(value)


def _check_method(method: object, name: str) -> None:
    if not isinstance(method, str):
        raise SolverInputError(f"{name} must be a method name such as 'dopri5', got {method!r}")
    method_kind(method)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _tolerance(name: str, value: object) -> Tolerance:
    """A positive float, or (one per part of a tuple state) a tuple of them."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if _positive(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    if isinstance(value, (tuple, list)) and value and all(_positive(v) for v in value):
        return tuple(float(v) for v in value)
    raise SolverInputError(f"{name} must be a positive float, or a tuple of them with one per "
                           f"part of a tuple state, got {value!r}")


def _positive(value: object) -> bool:
    return _is_real(value) and 0 < value < math.inf  # type: ignore[operator]


def smallest(tol: Tolerance) -> float:
    """A tolerance's smallest value (a float: itself)."""
    return min(tol) if isinstance(tol, tuple) else tol


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise SolverInputError(f"{name} must be True or False, got {value!r}")


def _not_a_dict(name: str, value: object) -> str:
    return (f"{name} must be a dict of solver options such as {{'step_size': 0.1}}, got "
            f"{type(value).__name__}")


def fixed_interp(options: Mapping[str, Any]) -> str:
    """A fixed-grid solve's output between grid points: options' ``interp`` or the default."""
    return str(options.get("interp", INTERPS[0]))


def _check_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate option names for a method and the values of step_size, max_num_steps, norm."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise SolverInputError(_not_a_dict("options", options))
    kind = method_kind(method)
    valid = KIND_OPTIONS[kind]
    for key in options:
        if key == "perturb" and kind == "implicit":
            raise SolverInputError(
                f"option 'perturb' is not supported by the implicit method {method!r}; use an "
                "explicit fixed-step method, or put a grid point on the discontinuity")
        if key not in valid:
            raise SolverInputError(
                f"unknown option {key!r} for method {method!r}; valid: {sorted(valid)}")
    _check_option_values(options)
    return _times_as_floats(options)


def _times_as_floats(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` with ``step_t`` and ``jump_t`` as tuples of floats, so that a spec
    that holds them compares and hashes by value (a tensor of times does neither)."""
    out = dict(options)
    for name in ("step_t", "jump_t"):
        if out.get(name) is not None:
            out[name] = tuple(stop_times(options, name))
    return out


def stop_times(options: Mapping[str, Any], name: str) -> list[float]:
    """``options[name]`` (``step_t`` or ``jump_t``: a 1-D tensor, a sequence of finite
    times or one time, in the caller's time) as floats; [] when absent.

    Raises:
        SolverInputError: for anything else.
    """
    value = options.get(name)
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or not (value.is_floating_point() or value.dtype in (
                torch.int32, torch.int64)):
            raise SolverInputError(f"options[{name!r}] must be a 1-D tensor of times, got "
                                   f"shape {tuple(value.shape)} and dtype {value.dtype}")
        times = value.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif _is_real(value):
        times = [float(value)]
    elif isinstance(value, (list, tuple)) and all(_is_real(v) for v in value):
        times = [float(v) for v in value]
    else:
        raise SolverInputError(f"options[{name!r}] must be a 1-D tensor or a list of times, "
                               f"got {type(value).__name__}")
    if not all(math.isfinite(v) for v in times):
        raise SolverInputError(f"options[{name!r}] must be finite, got {times}")
    return times


def clock_dtype(options: Mapping[str, Any], y_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adaptive solve's times as callbacks and ``event_fn`` see them, as
    torchdiffeq's: ``options['dtype']`` (default float64) promoted with the state's real
    dtype. (Our step control itself always runs on float64 host floats.)"""
    real = torch.empty((), dtype=y_dtype).abs().dtype
    return torch.promote_types(options.get("dtype", torch.float64), real)


def _check_option_values(options: Mapping[str, Any]) -> None:
    dtype = options.get("dtype", torch.float64)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SolverInputError(f"options['dtype'] must be a real floating torch dtype such as "
                               f"torch.float32 (the time dtype), got {dtype!r}")
    step_t, jump_t = stop_times(options, "step_t"), stop_times(options, "jump_t")
    if len(set(step_t) | set(jump_t)) < len(step_t) + len(jump_t):
        raise SolverInputError(
            "options 'step_t' and 'jump_t' must not repeat a time (within or between them)")
    if options.get("step_size") is not None and options.get("grid_constructor") is not None:
        raise SolverInputError(
            "options 'step_size' and 'grid_constructor' exclude each other: pass one")
    if options.get("grid_constructor") is not None and not callable(
            options["grid_constructor"]):
        raise SolverInputError("options['grid_constructor'] must be a callable "
                               "grid_constructor(func, y0, t) -> 1-D tensor of step times")
    if options.get("interp", INTERPS[0]) not in INTERPS:
        raise SolverInputError(f"options['interp'] must be 'cubic' (our default: Hermite "
                               f"with the slopes at the grid points) or 'linear' "
                               f"(torchdiffeq's default), got {options['interp']!r}")
    if "perturb" in options and not isinstance(options["perturb"], bool):
        raise SolverInputError(f"options['perturb'] must be True or False, got "
                               f"{options['perturb']!r}")
    for name, low in (("max_order", 1), ("max_iters", 1)):
        value = options.get(name)
        if name in options and not (isinstance(value, numbers.Integral) and not isinstance(
                value, bool) and low <= int(value) <= (12 if name == "max_order" else 10**6)):
            bound = " (at most 12)" if name == "max_order" else ""
            raise SolverInputError(f"options[{name!r}] must be a positive int{bound}, got "
                                   f"{value!r}")
    solver = options.get("solver")
    if "solver" in options and not isinstance(solver, str):
        raise SolverInputError(f"options['solver'] must be a scipy.integrate.solve_ivp method "
                               f"name such as 'RK45' or 'LSODA', got {solver!r}")
    steps = options.get("max_num_steps")
    if "max_num_steps" in options and not (
            isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
            and int(steps) >= 1):
        raise SolverInputError(f"options['max_num_steps'] must be a positive int, got {steps!r}")
    size = options.get("step_size")
    if size is not None and not (_is_real(size) and 0 < size < math.inf):
        raise SolverInputError(f"options['step_size'] must be a positive float, got {size!r}")
    compile_arguments(options.get("compile"))
    norm = options.get("norm")
    if norm is not None and not callable(norm):
        raise SolverInputError("options['norm'] must be a callable: norm(error_state) -> scalar")
