"""torchdiffeq's multistep methods on a fixed grid, and ``scipy_solver``.

``explicit_adams`` is the Adams-Bashforth method, ``implicit_adams`` (also ``fixed_adams``,
torchdiffeq's older name) Adams-Bashforth-Moulton: the Bashforth formula predicts, the
Moulton formula corrects by functional iteration. As in torchdiffeq (0.2.5), the order
grows with the history: the first two steps are Runge-Kutta steps (Kutta's 3/8 rule, our
``rk4``), then step k (from 1) uses the k derivatives known so far, up to ``max_order - 1``
of them (``max_order`` defaults to 12): Bashforth of order min(k, max_order - 1) and Moulton
of one order more. The corrector iterates at most ``max_iters`` (4) times, until two
successive increments agree to rtol/atol in the max norm; when it does not converge the
method warns and drops its oldest derivative (its order goes down by one).

Unlike torchdiffeq, a step of another size than the previous ones (the last, shorter step
of a grid whose step does not divide the span; a ``grid_constructor``'s uneven grid; the
output times without ``step_size``) starts the history again with Runge-Kutta steps, since
the weights are those of equal steps: torchdiffeq applies them to the uneven step, which
costs it most of its accuracy (y' = tanh-bent rotation on [0, 1.52] with step 0.05: error
4e-4 at the end against 7e-9 on [0, 1.5]).

Every step evaluates f at its start, which is also the slope at the end of the previous step
for the cubic Hermite output between grid points (``options={'interp': 'linear'}``:
torchdiffeq's default, the straight line between them).

``scipy_solver`` hands the solve to ``scipy.integrate.solve_ivp`` (``options={'solver':
'RK45'}``, default 'LSODA', as torchdiffeq); it has no gradients.

The coefficients are computed here, exactly (fractions), by integrating the Lagrange
polynomials through the derivative history: Hairer, Norsett, Wanner, "Solving Ordinary
Differential Equations I", 2nd ed., 1993, section III.1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache

import numpy as np
import torch

from solvers.errors import SolverError, SolverInputError
from solvers.integrate import (
    NO_CALLBACKS,
    Emit,
    FlatTol,
    Progress,
    Rhs,
    StepCallbacks,
    _check_finite,
    _coefficients,
    _first_derivative,
    _hermite_at,
    _needs_slope,
    _Outputs,
    _Stages,
    at_side,
    fixed_grid,
    rk_step,
)
from solvers.stats import SolverStats
from solvers.tableau import RK4

#: The highest ``max_order`` (torchdiffeq's limit) and its default.
MAX_ORDER = 12
#: Corrector iterations per step (torchdiffeq's default ``max_iters``).
MAX_ITERS = 4
#: Below this many derivatives in the history a step is a Runge-Kutta step.
MIN_HISTORY = 3
#: Steps that differ by more than this (relative) start the history again (the Adams weights
#: are those of equal steps).
EQUAL_STEPS = 1e-9


@dataclass(frozen=True)
class AdamsMethod:
    """A multistep method: Adams-Bashforth, with the Moulton corrector when ``implicit``."""

    name: str
    implicit: bool
    adaptive: bool = False


ADAMS_METHODS = {
    "explicit_adams": AdamsMethod("explicit_adams", implicit=False),
    "implicit_adams": AdamsMethod("implicit_adams", implicit=True),
    "fixed_adams": AdamsMethod("fixed_adams", implicit=True),
}
SCIPY_METHOD = "scipy_solver"


def _integrate_poly(nodes: Sequence[Fraction], j: int) -> Fraction:
    """The integral over u in [0, 1] of the Lagrange basis polynomial of node j."""
    poly = [Fraction(1)]  # coefficients, lowest degree first
    for k, node in enumerate(nodes):
        if k == j:
            continue
        scale = nodes[j] - node
        shifted = [Fraction(0)] + poly  # u * poly
        poly = [(hi - node * lo) / scale
                for hi, lo in zip(shifted, poly + [Fraction(0)])]
    return sum((c / (d + 1) for d, c in enumerate(poly)), Fraction(0))


@cache
def bashforth(k: int) -> tuple[float, ...]:
    """Adams-Bashforth weights of order k, for f_n, f_{n-1}, ..., f_{n-k+1}."""
    nodes = [Fraction(-j) for j in range(k)]
    return tuple(float(_integrate_poly(nodes, j)) for j in range(k))


@cache
def moulton(k: int) -> tuple[float, ...]:
    """Adams-Moulton weights of order k, for f_{n+1}, f_n, ..., f_{n-k+2}."""
    nodes = [Fraction(1 - j) for j in range(k)]
    return tuple(float(_integrate_poly(nodes, j)) for j in range(k))


def _weighted(weights: Sequence[float], fs: Sequence[torch.Tensor], dt: float) -> torch.Tensor:
    """dt * sum_j weights[j] * fs[j] (in the order of the history, newest first)."""
    total = (dt * weights[0]) * fs[0]
    for w, f in zip(weights[1:], fs[1:]):
        total = total + (dt * w) * f
    return total


def _converged(old: torch.Tensor, new: torch.Tensor, rtol: FlatTol, atol: FlatTol) -> bool:
    """Whether two corrector increments agree to rtol/atol in the max norm."""
    with torch.no_grad():
        scale = torch.maximum(old.abs(), new.abs()).mul_(rtol).add_(atol)
        return bool(((old - new).abs() / scale).max() < 1)


def integrate_adams(rhs: Rhs, y0: torch.Tensor, t_out: Sequence[float], emit: Emit,
                    method: AdamsMethod, rtol: FlatTol, atol: FlatTol,
                    step_size: float | None = None, stats: SolverStats | None = None,
                    progress: Progress | None = None, callbacks: StepCallbacks = NO_CALLBACKS,
                    grid: Sequence[float] | None = None, perturb: bool = False,
                    max_order: int = MAX_ORDER, max_iters: int = MAX_ITERS,
                    interp: str = "cubic") -> None:
    """Integrate with an Adams method on a fixed grid, emitting at t_out.

    Args: as :func:`solvers.integrate.integrate_fixed` (``interp`` included), plus
    ``method``, ``rtol`` and ``atol`` (the corrector's convergence test), ``max_order`` (1 ...
    12; below 4 every step is a Runge-Kutta step, as torchdiffeq warns) and ``max_iters``
    (corrector iterations).
    ``callbacks.step`` is called before every step; ``accept`` after it.
    """
    stats = stats if stats is not None else SolverStats()
    progress = progress or Progress()
    if max_order < MIN_HISTORY + 1:
        warnings.warn(f"max_order is below {MIN_HISTORY + 1}, so the solver reduces to `rk4`.",
                      stacklevel=3)
    out = _Outputs(t_out, emit)
    grid = fixed_grid(t_out, step_size, grid)
    start, end = (1, -1) if perturb else (0, 0)
    coeffs = _coefficients(RK4, y0.dtype, y0.device)
    stages = _Stages(RK4.stages, y0, torch.is_grad_enabled())
    history: list[torch.Tensor] = []  # newest first, at most max_order - 1
    y, f0 = y0, _first_derivative(rhs, at_side(grid[0], start), y0, progress)
    emit(0, grid[0], y)
    h_history = 0.0  # the step of the history's derivatives
    for k, (t, t1) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t1 - t
        _check_finite(f0, progress.time(t), "derivative")
        callbacks.step(t, y, dt)
        if not math.isclose(dt, h_history, rel_tol=EQUAL_STEPS):
            history, h_history = [], dt  # the weights assume equal steps: start again
        history = [f0, *history][:max(1, max_order - 1)]
        order = min(len(history), max_order - 1)
        converged = True
        if order < MIN_HISTORY:
            stages.set(0, f0)
            y1 = rk_step(rhs, RK4, coeffs, t, y, dt, stages, t1, end)
        else:
            dy = _weighted(bashforth(order), history, dt)
            if method.implicit:
                dy, converged = _correct(rhs, y, dy, history, order, t1, dt, end, rtol, atol,
                                         max_iters)
                if not converged:
                    warnings.warn(f"{method.name}: the corrector's functional iteration did "
                                  f"not converge in the step from t={progress.time(t):.6g}; "
                                  "the solution may be incorrect (the order goes down by one)",
                                  stacklevel=3)
            y1 = y + dy
        stats.n_accepted += 1
        callbacks.accept(t, y, dt)
        last = k == len(grid) - 2
        f1 = rhs(at_side(t1, start), y1) if _needs_slope(out, t1, last, interp) else None
        out.flush(t, t1, _hermite_at(y, y1, f0, f1, dt, interp))
        y, f0 = y1, f1  # type: ignore[assignment]  # f1 is None only after the last step
        if not converged:
            history = history[:-1]  # torchdiffeq drops the oldest derivative
    _check_finite(y, progress.time(grid[-1]), "state")


def _correct(rhs: Rhs, y: torch.Tensor, dy: torch.Tensor, history: list[torch.Tensor],
             order: int, t1: float, dt: float, end_side: int, rtol: FlatTol, atol: FlatTol,
             max_iters: int) -> tuple[torch.Tensor, bool]:
    """The Moulton corrector of order ``order + 1`` by functional iteration from the
    predicted increment ``dy``; returns the increment and whether the iteration converged."""
    weights = moulton(order + 1)
    known = _weighted(weights[1:], history[:order], dt)
    converged = False
    for _ in range(max_iters):
        previous = dy
        f = rhs(at_side(t1, end_side), y + dy)
        dy = (dt * weights[0]) * f + known
        converged = _converged(previous, dy, rtol, atol)
        if converged:
            break
    return dy, converged


def integrate_scipy(rhs: Rhs, y0: torch.Tensor, t_out: Sequence[float], emit: Emit,
                    rtol: FlatTol, atol: FlatTol, solver: str = "LSODA",
                    min_step: float | None = None, max_step: float = math.inf,
                    progress: Progress | None = None) -> None:
    """Integrate with ``scipy.integrate.solve_ivp`` (float64 on the CPU), without a graph.

    Raises:
        SolverInputError: an unknown ``solver``.
        SolverError: solve_ivp failed (its message, and the last time f was evaluated at);
            the field's own errors pass unchanged.
    """
    from scipy.integrate import solve_ivp

    progress = progress or Progress()
    emit(0, t_out[0], y0)
    if len(t_out) == 1:
        return
    dtype, device = y0.dtype, y0.device
    last_s = [t_out[0]]  # the latest time f was evaluated at: where a failed solve stopped
    failed = []  # errors of the field (or of our checks on it), raised through solve_ivp

    def fun(s: float, v: np.ndarray) -> np.ndarray:
        last_s[0] = max(last_s[0], float(s))
        try:
            with torch.no_grad():
                dv = rhs(float(s), torch.as_tensor(v, dtype=dtype, device=device))
        except Exception as err:
            failed.append(err)
            raise
        return dv.detach().to("cpu", torch.float64).numpy()

    extra = {} if min_step is None else {"min_step": min_step}
    try:
        sol = solve_ivp(fun, (t_out[0], t_out[-1]), y0.detach().to("cpu", torch.float64).numpy(),
                        method=solver, t_eval=list(t_out), rtol=_as_numpy(rtol),
                        atol=_as_numpy(atol),
                        max_step=max_step, **extra)
    except ValueError as err:
        if failed:  # not solve_ivp's complaint about its arguments
            raise
        raise SolverInputError(f"scipy_solver: {err}") from None
    if sol.status != 0 or sol.y.shape[1] != len(t_out):
        raise SolverError(f"scipy_solver ({solver}) failed at t={progress.time(last_s[0]):.6g}: "
                          f"{sol.message}")
    ys = torch.as_tensor(sol.y.T, dtype=dtype, device=device)
    for j in range(1, len(t_out)):
        emit(j, t_out[j], ys[j])


def _as_numpy(tol: FlatTol) -> float | np.ndarray:
    """A tolerance as solve_ivp takes it (per-element values as a float64 array)."""
    return tol if isinstance(tol, float) else tol.detach().to("cpu", torch.float64).numpy()
