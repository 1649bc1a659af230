"""Per-call solver statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SolverStats:
    """Counts of one solve, filled in by :func:`solvers.odeint` when passed as ``stats=``.

    Attributes:
        nfe: number of evaluations of the vector field.
        n_accepted: accepted steps.
        n_rejected: rejected steps (adaptive methods only).
    """

    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0

    def reset(self) -> None:
        """Zero every counter (a stats object can be reused across calls)."""
        self.nfe = self.n_accepted = self.n_rejected = 0

    def add(self, other: SolverStats) -> None:
        """Add another call's counts to this one."""
        self.nfe += other.nfe
        self.n_accepted += other.n_accepted
        self.n_rejected += other.n_rejected
