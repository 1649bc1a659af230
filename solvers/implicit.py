"""Implicit Runge-Kutta methods on a fixed grid, their stages solved by Newton's method.

The methods and names are torchdiffeq's: ``implicit_euler``, ``implicit_midpoint``,
``trapezoid``, ``gl4``, ``gl6`` (Gauss-Legendre), ``radauIIA3``, ``radauIIA5``, ``sdirk2`` and
``trbdf2``. Each is an :class:`ImplicitTableau` (validated data: its weights must meet the
order conditions of its stated order) run by one loop, :func:`integrate_implicit`, that steps
on the grid of :func:`solvers.integrate.integrate_fixed` (the output times, or
``options={'step_size': h}``) and emits at the output times with the same interpolation
between grid points (cubic Hermite, or linear with ``options={'interp': 'linear'}``).

One step solves the stage equations ``K_i = f(t + c_i h, y + h sum_j a_ij K_j)`` for all s
stages at once, a dense system of s*n unknowns (n: the state's size), by a simplified Newton
iteration with the Jacobian of f at the step's start (Hairer-Wanner II, IV.8); when it
contracts slowly, the Jacobians are re-evaluated at the current stages (full Newton). The
Jacobian comes from autograd, or from forward differences when f is not differentiable
(the adjoint's backward system). Stages whose row of ``a`` is zero are explicit and are
evaluated once.

Gradients: the Newton iterations run without a graph; when autograd is recording, one final
Newton step with the exact Jacobians at the converged stages is taken with the graph, which
gives the stages the gradient of the implicit function theorem, dK = (dG/dK)^-1 dF, at the
cost of one explicit step's graph (backpropagation through the solver, ``t`` included, as
for the explicit methods).

References:
    Hairer, Wanner, "Solving Ordinary Differential Equations II", 2nd ed., 1996, sections IV.5
    (Gauss and Radau IIA collocation methods, tables 5.1-5.6), IV.6 (SDIRK methods), IV.8
    (the Newton iteration for the stages).
    Butcher, "Implicit Runge-Kutta processes", Math. Comp. 18, 1964 (Gauss-Legendre).
    Alexander, "Diagonally implicit Runge-Kutta methods for stiff O.D.E.'s", SIAM J. Numer.
    Anal. 14, 1977 (the L-stable two-stage SDIRK of order 2, ``sdirk2``).
    Hosea, Shampine, "Analysis and implementation of TR-BDF2", Appl. Numer. Math. 20, 1996
    (TR-BDF2 as a three-stage ESDIRK, ``trbdf2``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from solvers.errors import NonFiniteStateError, SolverError, SolverInputError
from solvers.integrate import (
    _INITIAL_CAUSE,
    NO_CALLBACKS,
    Emit,
    Progress,
    Rhs,
    StepCallbacks,
    _check_finite,
    _hermite_at,
    _needs_slope,
    _Outputs,
    fixed_grid,
)
from solvers.stats import SolverStats
from solvers.tableau import check_order

#: Newton iterations allowed per step (torchdiffeq's ``max_iters`` default).
MAX_ITERS = 100
#: The largest stage system (stages * state size) solved densely: 4096 unknowns is a 128 MiB
#: float64 matrix.
MAX_UNKNOWNS = 4096
#: Re-evaluate the Jacobians at the current stages when one Newton update is not at least
#: this much smaller than the one before.
SLOW_CONTRACTION = 0.5


class NewtonConvergenceError(SolverError):
    """Newton's method did not solve an implicit step's stage equations in ``max_iters``."""

    def __init__(self, t: float, dt: float, max_iters: int, update: float) -> None:
        super().__init__(
            f"Newton's method for the implicit stages did not converge at t={t:.6g} "
            f"(dt={dt:.3g}) in {max_iters} iterations (last update {update:.3g}). Try a "
            "smaller options={'step_size': ...}, an L-stable method (radauIIA5, sdirk2, "
            "trbdf2, implicit_euler) for a stiff problem, or regularise the vector field."
        )
        self.t, self.dt = t, dt


@dataclass(frozen=True, eq=False)
class ImplicitTableau:
    """An implicit Runge-Kutta method (full coupling matrix), fixed step.

    Attributes:
        name: method name used by ``odeint(method=...)``.
        c: nodes, shape (S,).
        a: coupling matrix, shape (S, S).
        b: weights, shape (S,).
        order: order of the solution (checked against the order conditions).
    """

    name: str
    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    order: int
    err_order: int = 0  # no error estimator, as a fixed-step ButcherTableau

    def __post_init__(self) -> None:
        s = len(self.c)
        if self.a.shape != (s, s) or self.b.shape != (s,):
            raise SolverInputError(f"tableau {self.name}: a must be ({s},{s}) and b ({s},)")
        if not np.allclose(self.a.sum(axis=1), self.c, atol=1e-12):
            raise SolverInputError(f"tableau {self.name}: row sums of a must equal c")
        if not np.isclose(self.b.sum(), 1.0, atol=1e-12):
            raise SolverInputError(f"tableau {self.name}: weights b must sum to 1")
        check_order(self.name, "weights b", self.a, self.b, self.order)

    @property
    def adaptive(self) -> bool:
        """Implicit methods step on a fixed grid."""
        return False

    @property
    def stages(self) -> int:
        """Number of stages S."""
        return len(self.c)

    @property
    def explicit_stages(self) -> np.ndarray:
        """Mask of the stages whose row of ``a`` is zero: k_i = f(t + c_i h, y)."""
        return np.asarray(~self.a.any(axis=1))


def _implicit(name: str, c: list[float], a: list[list[float]], b: list[float],
              order: int) -> ImplicitTableau:
    return ImplicitTableau(name, np.array(c, dtype=float), np.array(a, dtype=float),
                           np.array(b, dtype=float), order)


_R3, _R6, _R15, _R2 = math.sqrt(3.0), math.sqrt(6.0), math.sqrt(15.0), math.sqrt(2.0)

# Backward Euler (the one-stage Radau IIA method) and the implicit midpoint rule (one-stage
# Gauss): Hairer-Wanner II, IV.3 and IV.5.
IMPLICIT_EULER = _implicit("implicit_euler", [1.0], [[1.0]], [1.0], order=1)
IMPLICIT_MIDPOINT = _implicit("implicit_midpoint", [0.5], [[0.5]], [1.0], order=2)
# The trapezoidal rule (Crank-Nicolson; two-stage Lobatto IIIA): its first stage is explicit.
TRAPEZOID = _implicit("trapezoid", [0.0, 1.0], [[0.0, 0.0], [0.5, 0.5]], [0.5, 0.5], order=2)
# Gauss-Legendre collocation, 2 and 3 stages (Butcher 1964; Hairer-Wanner II, table IV.5.1-2).
GL4 = _implicit(
    "gl4", [0.5 - _R3 / 6, 0.5 + _R3 / 6],
    [[0.25, 0.25 - _R3 / 6], [0.25 + _R3 / 6, 0.25]], [0.5, 0.5], order=4,
)
GL6 = _implicit(
    "gl6", [0.5 - _R15 / 10, 0.5, 0.5 + _R15 / 10],
    [[5 / 36, 2 / 9 - _R15 / 15, 5 / 36 - _R15 / 30],
     [5 / 36 + _R15 / 24, 2 / 9, 5 / 36 - _R15 / 24],
     [5 / 36 + _R15 / 30, 2 / 9 + _R15 / 15, 5 / 36]],
    [5 / 18, 4 / 9, 5 / 18], order=6,
)
# Radau IIA collocation, 2 and 3 stages (Hairer-Wanner II, tables IV.5.5-6): L-stable.
RADAU_IIA3 = _implicit(
    "radauIIA3", [1 / 3, 1.0], [[5 / 12, -1 / 12], [0.75, 0.25]], [0.75, 0.25], order=3,
)
RADAU_IIA5 = _implicit(
    "radauIIA5", [(4 - _R6) / 10, (4 + _R6) / 10, 1.0],
    [[(88 - 7 * _R6) / 360, (296 - 169 * _R6) / 1800, (-2 + 3 * _R6) / 225],
     [(296 + 169 * _R6) / 1800, (88 + 7 * _R6) / 360, (-2 - 3 * _R6) / 225],
     [(16 - _R6) / 36, (16 + _R6) / 36, 1 / 9]],
    [(16 - _R6) / 36, (16 + _R6) / 36, 1 / 9], order=5,
)
# Alexander's L-stable SDIRK of order 2, gamma = 1 - sqrt(2)/2 (Hairer-Wanner II, IV.6).
_G = 1 - _R2 / 2
SDIRK2 = _implicit("sdirk2", [_G, 1.0], [[_G, 0.0], [1 - _G, _G]], [1 - _G, _G], order=2)
# TR-BDF2 as an ESDIRK (Hosea-Shampine 1996): a trapezoidal stage to t + 2*gamma*h, then
# BDF2; d = gamma = 1 - sqrt(2)/2, w = sqrt(2)/4. L-stable, first stage explicit.
_W = _R2 / 4
TRBDF2 = _implicit(
    "trbdf2", [0.0, 2 * _G, 1.0], [[0.0, 0.0, 0.0], [_G, _G, 0.0], [_W, _W, _G]],
    [_W, _W, _G], order=2,
)

IMPLICIT_METHODS: dict[str, ImplicitTableau] = {
    t.name: t for t in (IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, GL4, GL6, RADAU_IIA3,
                        RADAU_IIA5, SDIRK2, TRBDF2)
}


def integrate_implicit(rhs: Rhs, y0: torch.Tensor, t_out: Sequence[float], emit: Emit,
                       tab: ImplicitTableau, step_size: float | None = None,
                       stats: SolverStats | None = None, progress: Progress | None = None,
                       callbacks: StepCallbacks = NO_CALLBACKS,
                       max_iters: int = MAX_ITERS, grid: Sequence[float] | None = None,
                       interp: str = "cubic") -> None:
    """Integrate with an implicit method on a fixed grid, emitting at t_out.

    Args: as :func:`solvers.integrate.integrate_fixed` (``step_size`` None: one step per
    output interval; ``interp``), plus ``max_iters``, the Newton iterations allowed per
    step, and ``grid`` (explicit step times, replacing ``step_size``).

    Raises:
        SolverInputError: the stage system would have more than :data:`MAX_UNKNOWNS`
            unknowns.
        NewtonConvergenceError: a step's stages did not converge, naming its time.
        NonFiniteStateError: the state, a derivative or a stage is NaN or infinite.
    """
    stats = stats if stats is not None else SolverStats()
    progress = progress or Progress()
    if tab.stages * y0.numel() > MAX_UNKNOWNS:
        raise SolverInputError(
            f"{tab.name} solves a dense system of {tab.stages} stages x {y0.numel()} state "
            f"entries = {tab.stages * y0.numel()} unknowns per step, more than {MAX_UNKNOWNS}: "
            "implicit methods are for small states; use an explicit method (for an adjoint's "
            "backward solve, e.g. adjoint_method='dopri5')")
    grid = fixed_grid(t_out, step_size, grid)
    out = _Outputs(t_out, emit)
    _check_finite(y0, progress.time(grid[0]), "initial state", _INITIAL_CAUSE)
    y, f0 = y0, rhs(grid[0], y0)
    emit(0, grid[0], y)
    for k, (t, t1) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t1 - t
        _check_finite(f0, progress.time(t), "derivative")
        callbacks.step(t, y, dt)
        ks = _Step(rhs, tab, t, y, dt, f0, progress).solve(max_iters)
        b = torch.as_tensor(tab.b, dtype=y.dtype, device=y.device)
        y1 = y + dt * (b @ ks)
        stats.n_accepted += 1
        callbacks.accept(t, y, dt)
        last = k == len(grid) - 2
        f1 = rhs(t1, y1) if _needs_slope(out, t1, last, interp) else None
        out.flush(t, t1, _hermite_at(y, y1, f0, f1, dt, interp))
        y, f0 = y1, f1  # type: ignore[assignment]  # f1 is None only after the last step
    _check_finite(y, progress.time(grid[-1]), "state")


class _Step:
    """The stage equations G(K) = K - F(y + h a K) = 0 of one step, K of shape (S, n)."""

    def __init__(self, rhs: Rhs, tab: ImplicitTableau, t: float, y: torch.Tensor, dt: float,
                 f0: torch.Tensor, progress: Progress) -> None:
        self.rhs, self.tab, self.t, self.y, self.dt, self.f0 = rhs, tab, t, y, dt, f0
        self.progress = progress
        self.a = torch.as_tensor(tab.a, dtype=y.dtype, device=y.device)
        self.times = [t + float(c) * dt for c in tab.c]
        self.implicit = [i for i in range(tab.stages) if not tab.explicit_stages[i]]

    def stage_states(self, ks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Y_i = y + h sum_j a_ij K_j, shape (S, n)."""
        return y + self.dt * (self.a @ ks)

    def field(self, ys: torch.Tensor, fixed: dict[int, torch.Tensor]) -> torch.Tensor:
        """F_i = f(t + c_i h, Y_i) for the implicit stages; ``fixed`` gives the explicit ones."""
        return torch.stack([fixed[i] if i in fixed else self.rhs(self.times[i], ys[i])
                            for i in range(self.tab.stages)])

    def explicit(self, y: torch.Tensor, f0: torch.Tensor) -> dict[int, torch.Tensor]:
        """The explicit stages: f0 where c_i = 0, else one evaluation at y."""
        return {i: f0 if self.tab.c[i] == 0 else self.rhs(self.times[i], y)
                for i in range(self.tab.stages) if self.tab.explicit_stages[i]}

    def matrix(self, jacobians: Sequence[torch.Tensor]) -> torch.Tensor:
        """dG/dK = I - h blockdiag(J_i) (a kron I), shape (S*n, S*n); J_i for stage i."""
        s, n = self.tab.stages, self.y.numel()
        blocks = [[(i == j) * torch.eye(n, dtype=self.y.dtype, device=self.y.device)
                   - (self.dt * self.a[i, j]) * jacobians[i] for j in range(s)]
                  for i in range(s)]
        return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)

    def stage_jacobians(self, ys: torch.Tensor) -> list[torch.Tensor]:
        """df/dy at every stage (zeros for the explicit ones, which do not depend on K)."""
        zero = torch.zeros((self.y.numel(),) * 2, dtype=self.y.dtype, device=self.y.device)
        return [jacobian(self.rhs, self.times[i], ys[i]) if i in self.implicit else zero
                for i in range(self.tab.stages)]

    def solve(self, max_iters: int) -> torch.Tensor:
        """The stages K, shape (S, n): with the implicit-function gradient under autograd."""
        s, n = self.tab.stages, self.y.numel()
        if n == 0:  # an empty state: nothing to solve
            return self.f0.expand(s, n)
        with torch.no_grad():
            y, f0 = self.y.detach(), self.f0.detach()
            fixed = self.explicit(y, f0)
            ks = f0.expand(s, n).clone()
            lu = torch.linalg.lu_factor(self.matrix([jacobian(self.rhs, self.t, y)] * s))
            tol = torch.finfo(y.dtype).eps ** 0.75
            previous = math.inf
            for _ in range(max_iters):
                residual = ks - self.field(self.stage_states(ks, y), fixed)
                _check_finite(residual, self.progress.time(self.t), "implicit stage")
                delta = torch.linalg.lu_solve(lu[0], lu[1], -residual.reshape(-1, 1))
                ks = ks + delta.view(s, n)
                size = self.dt * float(delta.abs().max())
                scale = max(float(y.abs().max()), self.dt * float(ks.abs().max()))
                if not math.isfinite(size):
                    raise NonFiniteStateError(self.progress.time(self.t), "Newton update")
                if size <= tol * scale:
                    break
                if size > SLOW_CONTRACTION * previous:  # slow: full Newton from here
                    jacs = self.stage_jacobians(self.stage_states(ks, y))
                    lu = torch.linalg.lu_factor(self.matrix(jacs))
                previous = size
            else:
                raise NewtonConvergenceError(self.progress.time(self.t), self.dt, max_iters,
                                             size)
        if not torch.is_grad_enabled():
            return ks
        return self.with_gradient(ks)

    def with_gradient(self, ks: torch.Tensor) -> torch.Tensor:
        """One Newton step from the converged stages, recorded by autograd.

        K = K* - (dG/dK)^-1 G(K*; y, theta) with dG/dK exact at K* and not differentiated:
        its value is K* (to the Newton tolerance) and its derivative the implicit function
        theorem's, -(dG/dK)^-1 dG/d(y, theta).
        """
        residual = ks - self.field(self.stage_states(ks, self.y), self.explicit(self.y, self.f0))
        if not residual.requires_grad:
            return ks
        with torch.no_grad():
            exact = self.matrix(self.stage_jacobians(self.stage_states(ks, self.y.detach())))
        delta = torch.linalg.solve(exact, residual.reshape(-1, 1))
        return ks - delta.view_as(ks)


def jacobian(rhs: Rhs, s: float, y: torch.Tensor) -> torch.Tensor:
    """d rhs(s, y) / dy, shape (n, n), without a graph.

    By autograd (one evaluation and n vector-Jacobian products, batched where the field
    allows), or by forward differences (n more evaluations) when the result has no graph to
    y: a field that does not depend on y, or a non-differentiable one such as the adjoint's
    backward system.
    """
    with torch.enable_grad():
        x = y.detach().requires_grad_(True)
        fx = rhs(s, x)
        jac = _autograd_jacobian(fx, x) if fx.requires_grad else None
    if jac is not None:
        return jac
    return _finite_differences(rhs, s, y.detach(), fx.detach())


def _autograd_jacobian(fx: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The rows e_i^T J by vector-Jacobian products; None when fx has no graph to x."""
    eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    try:
        (jac,) = torch.autograd.grad(fx, x, eye, retain_graph=True, is_grads_batched=True,
                                     allow_unused=True)
    except RuntimeError:  # an operation without a batching rule: one row at a time
        rows = [torch.autograd.grad(fx, x, v, retain_graph=True, allow_unused=True)[0]
                for v in eye]
        if any(r is None for r in rows):
            return None
        jac = torch.stack(rows)
    return None if jac is None else jac.detach()


def _finite_differences(rhs: Rhs, s: float, y: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Forward-difference Jacobian, column j from a step of sqrt(eps) * max(1, |y_j|)."""
    root_eps = math.sqrt(torch.finfo(y.dtype).eps)
    columns = []
    with torch.no_grad():
        for j in range(y.numel()):
            h = root_eps * max(1.0, abs(float(y[j])))
            yj = y.clone()
            yj[j] += h
            columns.append((rhs(s, yj) - fy) / h)
    return torch.stack(columns, dim=1)
