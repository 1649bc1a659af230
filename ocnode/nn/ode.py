"""The ODE block: ``x(t0) -> x(t1)`` by integrating ``dx/dt = F(t, x)`` with :mod:`solvers`.

An :class:`ODEBlock` (Chen et al. 2018, "Neural Ordinary Differential Equations") solves
with the settings of one :class:`solvers.SolverSpec`; with ``adjoint=True`` there (the
default) its gradients come from the adjoint backward solve, in O(1) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import solvers
from solvers import Observer, SolverSpec, StageObserver, State
from solvers.spec import check_observer


class ODEBlock(nn.Module):
    """Integrates ``dx/dt = func(t, x)`` from ``t0`` to ``t1`` and returns ``x(t1)``.

    Args:
        func: the vector field, an ``nn.Module`` called as ``func(t, x)``.
        t0: start time.
        t1: end time (the horizon T); must be greater than ``t0``.
        solver: every solver setting (method, tolerances, options, adjoint or backprop, the
            adjoint solve's settings); None: ``SolverSpec()``, dopri5 at rtol = atol = 1e-3
            with the adjoint.
        trainable_t1: store ``t1`` as an ``nn.Parameter`` so that it receives dL/dt1.
        name: the block's name, put in front of every solver error and warning of its
            solves, forward and (from ``loss.backward()``) backward: ``"ODE block 'enc': ..."``,
            ``"ODE block 'enc', backward (adjoint) solve: ..."``.

    Attributes:
        solver: the :class:`solvers.SolverSpec` (assign a new one to change the settings,
            e.g. ``block.solver = block.solver.replace(rtol=1e-5)``).
        adjoint: ``solver.adjoint`` (read-only).
        stats: :class:`solvers.SolverStats` of the last forward solve.
        adjoint_stats: stats of the adjoint solve of the last call (filled by backward).
        last_batch: the first dimension of the last forward's state (its batch size).
        observer, observer_dt: the adjoint solve's observer and its grid
            spacing (None: the solvers' default, 0.01 of each solve's span); set them with
            :meth:`register_observer`.

    Raises:
        TypeError: ``func`` is not an ``nn.Module`` or ``solver`` not a ``SolverSpec``.
        ValueError: ``t1 <= t0``.
    """

    t0_tensor: Tensor
    t1_tensor: Tensor

    def __init__(
        self,
        func: nn.Module,
        t0: float = 0.0,
        t1: float = 1.0,
        solver: SolverSpec | None = None,
        trainable_t1: bool = False,
        name: str = "ode",
    ) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError("func must be an nn.Module called as func(t, x), "
                             f"got {type(func).__name__}; wrap plain functions in a Module")
        _check_horizon(t0, t1)
        self.func, self.name = func, name
        self.observer: Observer | StageObserver | None = None
        self.observer_dt: float | None = None
        self.last_batch = 1
        self.solver = SolverSpec() if solver is None else solver
        self.register_buffer("t0_tensor", torch.tensor(float(t0)))
        t1_tensor = torch.tensor(float(t1))
        if trainable_t1:
            self.t1_tensor = nn.Parameter(t1_tensor)
        else:
            self.register_buffer("t1_tensor", t1_tensor)
        self.stats = solvers.SolverStats()
        self.adjoint_stats = solvers.SolverStats()

    @property
    def solver(self) -> SolverSpec:
        """The solver settings."""
        return self._solver

    @solver.setter
    def solver(self, spec: SolverSpec) -> None:
        if not isinstance(spec, SolverSpec):
            raise TypeError(f"solver must be a solvers.SolverSpec, e.g. SolverSpec(method='rk4'"
                            f", options={{'step_size': 0.1}}), got {type(spec).__name__}")
        if self.observer is not None and not spec.adjoint:
            raise ValueError(f"ODE block {self.name!r} has an observer, which needs the "
                             "adjoint: remove() its handle first, or keep adjoint=True")
        self._solver = spec

    @property
    def adjoint(self) -> bool:
        """Whether gradients come from the adjoint backward solve (``solver.adjoint``)."""
        return self._solver.adjoint

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

    def register_observer(self, observer: Observer | StageObserver,
                          dt: float | None = None) -> ObserverHandle:
        """Stream every following adjoint backward solve to ``observer``.

        A grid observer is called as ``observer(t_j, x(t_j), a(t_j), weight)`` on the nodes
        ``t_j = t0 + j * dt`` (and t1) with trapezoid weights, a stage observer watches the
        backward solve's own evaluations; either gets ``observer.finish()`` at the end of
        each backward solve (see :class:`solvers.Observer`, :class:`solvers.StageObserver`).
        The solver's adaptive steps do not change.

        Args:
            observer: a :class:`solvers.Observer` or :class:`solvers.StageObserver`.
            dt: grid spacing; None: the solvers' default, 0.01 of each solve's span.

        Returns:
            A handle whose ``remove()`` detaches the observer.

        Raises:
            ValueError: if the block has ``adjoint=False``, already has an observer, the
                observer has no ``finish()``, or ``dt <= 0``.
        """
        if not self.adjoint:
            raise ValueError(f"ODE block {self.name!r}: observers run in the adjoint backward "
                             "solve; build the block with SolverSpec(adjoint=True)")
        if self.observer is not None:
            raise ValueError(f"ODE block {self.name!r} already has an observer; remove() its "
                             "handle first (another SNOpt on this model? call its close())")
        if dt is not None and not dt > 0:
            raise ValueError(f"observer dt must be > 0 or None, got {dt}")
        check_observer(observer)
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
        first = x[0] if isinstance(x, tuple) else x
        self.last_batch = int(first.shape[0]) if first.dim() else 1
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
        return self._call_solver(x, t)

    def _call_solver(self, x: State, t: Tensor) -> State:
        # the label names the block in every solver error and warning, also in those of the
        # adjoint's backward solve, which loss.backward() raises outside this call
        return solvers.solve(
            self.func, x, t, self._solver, adjoint_params=tuple(self.func.parameters()),
            observer=self.observer, observer_dt=self.observer_dt, stats=self.stats,
            adjoint_stats=self.adjoint_stats, label=f"ODE block {self.name!r}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, t0={self.t0:g}, t1={self.t1:g}, solver={self._solver!r}"


class ObserverHandle:
    """Returned by :meth:`ODEBlock.register_observer`; ``remove()`` detaches the observer."""

    def __init__(self, block: ODEBlock, observer: Observer | StageObserver) -> None:
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
