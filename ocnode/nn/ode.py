"""The ODE block: ``x(t0) -> x(t1)`` by integrating ``dx/dt = F(t, x)`` with :mod:`solvers`.

An :class:`ODEBlock` (Chen et al. 2018, "Neural Ordinary Differential Equations") with
``adjoint=True`` gets its gradients from the adjoint backward solve, in O(1) memory
(see docs/algorithms.md, "The adjoint").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import solvers

#: Called as ``observer(t, x, a, dt)``: a python float time, the state and the adjoint there,
#: and the grid spacing of the solve the sample belongs to.
Observer = Callable[..., None]
#: An ODE state: one tensor, or a tuple of tensors integrated together (e.g. a CNF's (z, logp)).
State = Tensor | tuple[Tensor, ...]


class ODEBlock(nn.Module):
    """Integrates ``dx/dt = func(t, x)`` from ``t0`` to ``t1`` and returns ``x(t1)``.

    Args:
        func: the vector field, an ``nn.Module`` called as ``func(t, x)``.
        t0: start time.
        t1: end time (the horizon T); must be greater than ``t0``.
        method: solver method name (see :mod:`solvers`), e.g. ``"dopri5"`` or ``"rk4"``.
        rtol: relative tolerance (> 0), used by the forward and the adjoint solve.
        atol: absolute tolerance (> 0), used by the forward and the adjoint solve.
        adjoint: differentiate with the adjoint method (O(1) memory) instead of
            backpropagating through the solver's operations.
        options: solver options, e.g. ``{"step_size": 0.1}`` for fixed-step methods.
        adjoint_options: options of the adjoint solve; None leaves them to the solver.
        trainable_t1: store ``t1`` as an ``nn.Parameter`` so that it receives dL/dt1.
        name: the block's name, put in front of every solver error it raises.

    Attributes:
        stats: :class:`solvers.SolverStats` of the last forward solve.
        adjoint_stats: stats of the adjoint solve of the last call (filled by backward).
        observer, observer_dt: the adjoint solve's observer and its grid spacing (None:
            0.01 * (t1 - t0)); set them with :meth:`register_observer`.
    """

    t0_tensor: Tensor
    t1_tensor: Tensor

    def __init__(
        self,
        func: nn.Module,
        t0: float = 0.0,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
        adjoint_options: dict[str, Any] | None = None,
        trainable_t1: bool = False,
        name: str = "ode",
    ) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError("func must be an nn.Module called as func(t, x), "
                             f"got {type(func).__name__}; wrap plain functions in a Module")
        _check_horizon(t0, t1)
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
        self.func = func
        self.method, self.rtol, self.atol, self.adjoint = method, rtol, atol, adjoint
        self.options, self.adjoint_options, self.name = options, adjoint_options, name
        self.register_buffer("t0_tensor", torch.tensor(float(t0)))
        t1_tensor = torch.tensor(float(t1))
        if trainable_t1:
            self.t1_tensor = nn.Parameter(t1_tensor)
        else:
            self.register_buffer("t1_tensor", t1_tensor)
        self.observer: Observer | None = None
        self.observer_dt: float | None = None
        self.stats = solvers.SolverStats()
        self.adjoint_stats = solvers.SolverStats()

    @property
    def t0(self) -> float:
        """Start time as a python float."""
        return float(self.t0_tensor.detach())

    @property
    def t1(self) -> float:
        """End time (horizon) as a python float."""
        return float(self.t1_tensor.detach())

    def set_t1(self, value: float) -> None:
        """Set the end time in place (keeps a trainable ``t1`` the same Parameter).

        Raises:
            ValueError: if ``value <= t0``.
        """
        _check_horizon(self.t0, value)
        with torch.no_grad():
            self.t1_tensor.fill_(float(value))

    @property
    def nfe_forward(self) -> int:
        """Vector-field evaluations of the last forward solve."""
        return self.stats.nfe

    @property
    def nfe_backward(self) -> int:
        """Vector-field evaluations of the last adjoint solve (0 before backward)."""
        return self.adjoint_stats.nfe

    def register_observer(self, observer: Observer,
                          dt: float | None = None) -> ObserverHandle:
        """Stream ``observer(t_j, x(t_j), a(t_j), dt)`` from every following adjoint backward.

        The samples lie on the grid ``t_j = t0 + j * dt`` (ALGORITHM.md §1.5); the solver's
        adaptive steps do not change.

        Args:
            observer: called as ``observer(t, x, a, dt)`` with the time (a float), the state,
                the adjoint at each grid point.
            dt: grid spacing; None uses ``0.01 * (t1 - t0)`` at each solve.

        Returns:
            A handle whose ``remove()`` detaches the observer.

        Raises:
            ValueError: if the block has ``adjoint=False``, already has an observer, or
                ``dt <= 0``.
        """
        if not self.adjoint:
            raise ValueError(f"ODE block {self.name!r}: observers run in the adjoint backward "
                             "solve; build the block with adjoint=True")
        if self.observer is not None:
            raise ValueError(f"ODE block {self.name!r} already has an observer; remove() its "
                             "handle first (another SNOpt on this model? call its close())")
        if dt is not None and not dt > 0:
            raise ValueError(f"observer dt must be > 0 or None, got {dt}")
        self.observer, self.observer_dt = observer, dt
        return ObserverHandle(self, observer)

    def forward(self, x: State) -> State:
        """Integrate from ``t0`` to ``t1``.

        Args:
            x: the initial state ``x(t0)``, any shape ``func`` accepts, e.g. ``(B, D)``, or
                a tuple of such tensors.

        Returns:
            ``x(t1)``, shaped like ``x`` (a tuple for a tuple state).
        """
        t = torch.stack([self.t0_tensor, self.t1_tensor])
        solution = self._solve(x, t)
        if isinstance(solution, tuple):
            return tuple(component[-1] for component in solution)
        return solution[-1]

    def trajectory(self, x: State, t: Tensor) -> State:
        """Integrate and return the states at all times ``t``.

        Args:
            x: the state at ``t[0]``, shape ``S`` (or a tuple of tensors).
            t: ``(N,)`` strictly monotone times; ``t[0]`` is the time of ``x``.

        Returns:
            ``(N, *S)``: the state at each time (per component for a tuple state).
        """
        return self._solve(x, t.to(self.t0_tensor.device))

    def _solve(self, x: State, t: Tensor) -> State:
        self.stats, self.adjoint_stats = solvers.SolverStats(), solvers.SolverStats()
        try:
            return self._call_solver(x, t)
        except solvers.SolverError as err:
            message = err.args[0] if err.args else "solve failed"
            err.args = (f"ODE block {self.name!r}: {message}", *err.args[1:])
            raise

    def _call_solver(self, x: State, t: Tensor) -> State:
        if not self.adjoint:
            return solvers.odeint(self.func, x, t, rtol=self.rtol, atol=self.atol,
                                  method=self.method, options=self.options, stats=self.stats)
        return solvers.odeint_adjoint(
            self.func, x, t, rtol=self.rtol, atol=self.atol, method=self.method,
            options=self.options, adjoint_rtol=self.rtol, adjoint_atol=self.atol,
            adjoint_method=self.method, adjoint_options=self.adjoint_options,
            adjoint_params=tuple(self.func.parameters()), stats=self.stats,
            adjoint_stats=self.adjoint_stats, **self._observer_args(t),
        )

    def _observer_args(self, t: Tensor) -> dict[str, Any]:
        """Bind this solve's grid spacing (default 0.01 of its span) to the observer."""
        if self.observer is None:
            return {}
        obs = self.observer
        dt = self.observer_dt or 0.01 * abs(float(t[-1].detach()) - float(t[0].detach()))
        return {"observer": lambda tj, x, a: obs(tj, x, a, dt), "observer_dt": dt}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, t0={self.t0:g}, t1={self.t1:g}, method={self.method!r}, "
                f"rtol={self.rtol:g}, atol={self.atol:g}, adjoint={self.adjoint}")


class ObserverHandle:
    """Returned by :meth:`ODEBlock.register_observer`; ``remove()`` detaches the observer."""

    def __init__(self, block: ODEBlock, observer: Observer) -> None:
        self._block, self._observer = block, observer

    def remove(self) -> None:
        """Detach the observer (nothing happens if another one has replaced it)."""
        if self._block.observer is self._observer:
            self._block.observer, self._block.observer_dt = None, None


def _check_horizon(t0: float, t1: float) -> None:
    if not float(t1) > float(t0):
        raise ValueError(f"the horizon needs t1 > t0, got t0={t0}, t1={t1}")


def ode_blocks(module: nn.Module) -> list[ODEBlock]:
    """All :class:`ODEBlock` submodules of ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, ODEBlock)]
