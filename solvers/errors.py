"""Exceptions and warnings of the solvers package.

Every error says what happened, where (``t`` in the caller's time, ``dt``) and what to try.
They all derive from :class:`SolverError`, so ``except solvers.SolverError`` catches any
failure of a solve. Input errors also derive from :class:`ValueError`, as Python users expect
of bad arguments. A solve with a ``label`` (an ODE block's name) puts it in front of every
message; errors of the adjoint's backward solve say so, e.g. ``"ODE block 'enc', backward
(adjoint) solve: non-finite state at t=0.6: ..."``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: How the messages name the adjoint's backward solve.
BACKWARD_SOLVE = "backward (adjoint) solve"

_FIELD_CAUSE = (
    "the vector field (or, in a backward solve, its vector-Jacobian product) returned NaN or "
    "inf. Check the inputs for NaN, lower the learning rate, or clip gradients; a blown-up "
    "model cannot be integrated."
)


class SolverError(RuntimeError):
    """Base class of every error raised by a solve."""

    def add_context(self, context: str) -> None:
        """Put ``"context: "`` in front of the message (e.g. ``"ODE block 'enc'"``)."""
        message = self.args[0] if self.args else "solve failed"
        self.args = (f"{context}: {message}", *self.args[1:])


class SolverInputError(SolverError, ValueError):
    """Bad arguments: unknown method or option, non-monotone ``t``, wrong dtype or device."""


class StepSizeUnderflowError(SolverError):
    """The adaptive controller shrank the step below what floating point can resolve."""

    def __init__(self, t: float, dt: float, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"step size underflow at t={t:.6g}: dt={dt:.3g} is too small to make progress{why}. "
            "Try a looser tolerance (larger rtol/atol; adjoint_rtol/adjoint_atol for the "
            "backward solve), a fixed-step method (method='rk4', options={'step_size': ...}), "
            "or regularise the vector field (weight decay, smaller learning rate) so that the "
            "dynamics stay non-stiff."
        )
        self.t, self.dt = t, dt


class NonFiniteStateError(SolverError):
    """The state or its derivative became NaN or infinite.

    Args:
        t: the caller's time where it happened.
        what: what is not finite ("state", "derivative", ...).
        cause: what produced it and what to try; None: the vector field.
    """

    def __init__(self, t: float, what: str = "state", cause: str | None = None) -> None:
        super().__init__(f"non-finite {what} at t={t:.6g}: {cause or _FIELD_CAUSE}")
        self.t = t


class NonFiniteGradientError(NonFiniteStateError):
    """The gradient dL/dy that the adjoint's backward solve starts from is NaN or infinite.

    The vector field is not at fault: the loss, or the layers between the solve's output and
    the loss, produced the non-finite value.
    """

    def __init__(self, t: float) -> None:
        super().__init__(
            t, "gradient dL/dy",
            "the gradient arriving at the block's output is not finite; the loss or the layers "
            "after the block produced it, not the vector field. Check the loss for NaN/inf "
            "(log of 0, division by 0, overflow), or find the operation with "
            "torch.autograd.set_detect_anomaly(True).")


class MaxStepsExceededError(SolverError):
    """More than ``max_num_steps`` steps were taken; ``advice`` replaces the default remedies
    (those of an adaptive solve)."""

    def __init__(self, t: float, dt: float, max_num_steps: int,
                 advice: str | None = None) -> None:
        super().__init__(
            f"max_num_steps={max_num_steps} exceeded at t={t:.6g} (last dt={dt:.3g}). "
            + (advice or "The problem may be stiff or the tolerance too tight: loosen "
               "rtol/atol, raise options={'max_num_steps': ...}, or regularise the vector "
               "field.")
        )
        self.t, self.dt = t, dt


class SlowSolveWarning(RuntimeWarning):
    """An adaptive solve has taken many steps or much time, given once per solve.

    The thresholds are ``solvers.integrate.SLOW_SOLVE_STEPS`` and ``SLOW_SOLVE_SECONDS``.
    Silence it with ``warnings.filterwarnings("ignore", category=solvers.SlowSolveWarning)``.
    """

    def __init__(self, t: float, dt: float, steps: int, seconds: float, name: str = "") -> None:
        where = f"{name}: " if name else ""
        super().__init__(
            f"{where}slow solve: {steps} steps in {seconds:.1f} s, now at t={t:.6g} with step "
            f"size dt={dt:.3g}. The problem is probably stiff or the tolerance too tight: "
            "loosen rtol/atol or regularise the vector field (no implicit method for stiff "
            "problems is available); pass options={'max_num_steps': N} to stop the solve "
            "after N steps with a MaxStepsExceededError."
        )
        self.t, self.dt, self.steps, self.seconds = t, dt, steps, seconds


class MinStepWarning(UserWarning):
    """An adaptive step of size ``min_step`` was accepted although its error estimate exceeds
    the tolerance (torchdiffeq's ``min_step`` semantics), given once per solve.

    The solution may miss rtol/atol from the time ``t`` on. Silence it with
    ``warnings.filterwarnings("ignore", category=solvers.MinStepWarning)``.
    """

    def __init__(self, t: float, dt: float, ratio: float, name: str = "") -> None:
        where = f"{name}: " if name else ""
        super().__init__(
            f"{where}accepted a step of size min_step={dt:.3g} at t={t:.6g} whose error "
            f"estimate is {ratio:.3g} times the tolerance: the solution may miss rtol/atol from "
            "here on (warned once per solve). Lower options['min_step'] or loosen rtol/atol.")
        self.t, self.dt, self.ratio = t, dt, ratio


def join_context(*parts: str | None) -> str:
    """The non-empty parts joined by ", ", e.g. ``"ODE block 'enc', backward (adjoint) solve"``."""
    return ", ".join(p for p in parts if p)


@contextmanager
def in_context(context: str | None) -> Iterator[None]:
    """Put ``context`` in front of the message of a :class:`SolverError` raised inside."""
    try:
        yield
    except SolverError as err:
        if context:
            err.add_context(context)
        raise
