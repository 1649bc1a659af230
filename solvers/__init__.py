"""solvers: explicit Runge-Kutta ODE integration, an O(1)-memory adjoint, and an SDE front.

``from solvers import odeint`` is a drop-in for ``from torchdiffeq import odeint``;
``solve(func, y0, t, SolverSpec(...))`` takes every setting as one validated value.
"""

from solvers.adjoint import odeint_adjoint
from solvers.errors import (
    MaxStepsExceededError,
    MinStepWarning,
    NonFiniteGradientError,
    NonFiniteStateError,
    SlowSolveWarning,
    SolverError,
    SolverInputError,
    StepSizeUnderflowError,
)
from solvers.odeint import odeint, odeint_event, solve
from solvers.sde import sdeint, sdeint_adjoint
from solvers.spec import Observer, SolverSpec, StageObserver, State
from solvers.stats import SolverStats
from solvers.tableau import METHODS, ButcherTableau, get_tableau

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "solve", "SolverSpec", "State", "Observer",
    "StageObserver",
    "sdeint", "sdeint_adjoint", "SolverStats", "METHODS", "ButcherTableau", "get_tableau",
    "SolverError", "SolverInputError", "StepSizeUnderflowError", "NonFiniteStateError",
    "MaxStepsExceededError", "NonFiniteGradientError", "SlowSolveWarning", "MinStepWarning",
]
