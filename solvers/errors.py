"""Exceptions raised by the solvers package.

Every error says what happened, where (``t``, ``dt``) and what to try. They all derive from
:class:`SolverError`, so ``except solvers.SolverError`` catches any failure of a solve. Input
errors also derive from :class:`ValueError`, as Python users expect of bad arguments.
"""

from __future__ import annotations


class SolverError(RuntimeError):
    """Base class of every error raised by a solve."""


class SolverInputError(SolverError, ValueError):
    """Bad arguments: unknown method or option, non-monotone ``t``, wrong dtype or device."""


class StepSizeUnderflowError(SolverError):
    """The adaptive controller shrank the step below what floating point can resolve."""

    def __init__(self, t: float, dt: float, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"step size underflow at t={t:.6g}: dt={dt:.3g} is too small to make progress{why}. "
            "Try a looser tolerance (larger rtol/atol), a fixed-step method "
            "(method='rk4', options={'step_size': ...}), or regularise the vector field "
            "(weight decay, smaller learning rate) so that the dynamics stay non-stiff."
        )
        self.t, self.dt = t, dt


class NonFiniteStateError(SolverError):
    """The state or its derivative became NaN or infinite."""

    def __init__(self, t: float, what: str = "state") -> None:
        super().__init__(
            f"non-finite {what} at t={t:.6g}: the vector field returned NaN or inf. "
            "Check the inputs for NaN, lower the learning rate, or clip gradients; a blown-up "
            "model cannot be integrated."
        )
        self.t = t


class MaxStepsExceededError(SolverError):
    """More than ``max_num_steps`` steps were taken."""

    def __init__(self, t: float, dt: float, max_num_steps: int) -> None:
        super().__init__(
            f"max_num_steps={max_num_steps} exceeded at t={t:.6g} (last dt={dt:.3g}). "
            "The problem may be stiff or the tolerance too tight: loosen rtol/atol, raise "
            "options={'max_num_steps': ...}, or regularise the vector field."
        )
        self.t, self.dt = t, dt
