"""Optimisation of the integration horizon T = t1 (SNOpt; docs/algorithms.md, "The horizon
policy").

Objective J(theta, T) = L(theta, T) + (c/2) T^2. From the adjoint, the time gradient dL/dT
of t1, with L the batch-mean loss; s is that divided once more by the batch size B
(``scale="batch"``, the default: the SNOpt authors' code's convention, under which c
dominates Q_TT and T shrinks unless the loss pushes it out) or dL/dT itself
(``scale="none"``). With Gauss-Newton, rank-one approximations

    Q_T = c T + s,    Q_TT = c + s^2,    Q_Ttheta = s * grad_theta L,

exponential moving averages of Q_T and Q_TT, and every ``update_freq`` iterations

    open loop ('baseline'):  dT = -lr * EMA[Q_T]
    feedback ('feedback'):   dT = -lr * (EMA[Q_T] + s <grad_theta L, d theta>) / EMA[Q_TT]
    T <- max(T_min, T + dT),

where d theta is the parameter step just taken (the feedback term of the second-order
policy, Liu-Chen-Theodorou 2021).

Use with any parameter optimizer::

    loss.backward()
    horizon.observe()   # reads dL/dT and grad_theta, clears t1's grad
    opt.step()
    horizon.step()      # updates T (every update_freq iterations)

Data-parallel runs: s must be dL/dT of the global batch's loss. ``DistributedDataParallel``
averages t1's gradient with the parameters' (the training core wraps the whole model, t1
included), so s, Q_T, Q_TT, grad_theta L and d theta are the same on every process, and so is
every T update: no collective of its own. B is then the global batch: the run sets
:attr:`HorizonOptimizer.processes`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ocnode.nn.ode import ODEBlock

POLICIES = ("baseline", "feedback")
SCALES = ("batch", "none")


class HorizonOptimizer:
    """Second-order (or open-loop) policy for an ODE block's trainable horizon t1.

    Args:
        block: an :class:`ODEBlock` built with ``trainable_t1=True``.
        params: the parameters theta of the network (for the feedback term); default the
            block's vector field's parameters.
        policy: 'feedback' (the paper's) or 'baseline' (first-order, open loop).
        lr: eta_T (0.05-0.1).
        reg: c, the T^2 regularisation (1e-4-1e-3; the paper calls it quite sensitive).
        update_freq: iterations between T updates (50-100).
        t_min: lower bound of T (above t0).
        ema: momentum of the moving averages of Q_T and Q_TT.
        scale: 'batch' (s = dL/dT / B, B the batch of the block's last forward times
            :attr:`processes`; the SNOpt authors' convention) or 'none' (s = dL/dT).

    Attributes:
        processes: the number of data-parallel processes (B counts the global batch).
    """

    def __init__(self, block: ODEBlock, params: Iterable[torch.Tensor] | None = None,
                 policy: str = "feedback", lr: float = 0.1, reg: float = 1e-4,
                 update_freq: int = 50, t_min: float = 0.1, ema: float = 0.99,
                 scale: str = "batch") -> None:
        if not isinstance(getattr(block, "t1_tensor", None), torch.nn.Parameter):
            raise ValueError("the ODE block needs trainable_t1=True for horizon optimisation")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if not (lr > 0 and reg >= 0 and update_freq >= 1 and 0 <= ema < 1):
            raise ValueError("need lr > 0, reg >= 0, update_freq >= 1 and 0 <= ema < 1")
        if not t_min > block.t0:
            raise ValueError(f"t_min must exceed the block's t0={block.t0}, got {t_min}")
        self.block, self.policy, self.lr, self.reg = block, policy, lr, reg
        self.update_freq, self.t_min, self.ema = update_freq, t_min, ema
        self.scale, self.processes = scale, 1
        t1 = block.t1_tensor
        self.params = [p for p in (block.func.parameters() if params is None else params)
                       if p is not t1]
        self.state: dict[str, Any] = {"step": 0, "ema_qt": None, "ema_qtt": None, "s": 0.0}
        self._grad_theta: torch.Tensor | None = None
        self._theta_old: torch.Tensor | None = None

    def _flat(self, grads: bool) -> torch.Tensor:
        """theta or its gradient (zeros where None) as one vector."""
        def pick(p: torch.Tensor) -> torch.Tensor:
            if not grads:
                return p.detach()
            return p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        parts = [pick(p).reshape(-1) for p in self.params]
        return torch.cat(parts) if parts else torch.zeros(0)

    def observe(self) -> float:
        """Read s = dL/dT after backward, update the moving averages, clear t1's gradient.

        Call before the parameter optimizer's step (which then leaves t1 alone).

        Returns:
            s, the derivative of the loss w.r.t. T (divided by the batch size with
            ``scale="batch"``).
        """
        t1 = self.block.t1_tensor
        s = float(t1.grad) if t1.grad is not None else 0.0
        if self.scale == "batch":
            s /= max(1, self.block.last_batch) * self.processes
        t1.grad = None
        q_t, q_tt = self.reg * self.block.t1 + s, self.reg + s * s
        st = self.state
        st["ema_qt"] = q_t if st["ema_qt"] is None else self.ema * st["ema_qt"] + (
            1 - self.ema) * q_t
        st["ema_qtt"] = q_tt if st["ema_qtt"] is None else self.ema * st["ema_qtt"] + (
            1 - self.ema) * q_tt
        st["s"] = s
        if (st["step"] + 1) % self.update_freq == 0 and self.policy == "feedback":
            self._grad_theta, self._theta_old = self._flat(True), self._flat(False).clone()
        return s

    def step(self) -> float:
        """After the parameter step: update T when due. Returns the current T."""
        st = self.state
        st["step"] += 1
        if st["step"] % self.update_freq or st["ema_qt"] is None:
            return self.block.t1
        d_t = -self.lr * self._direction()
        new_t = max(self.t_min, self.block.t1 + d_t)
        self.block.set_t1(new_t)
        return new_t

    def _direction(self) -> float:
        st = self.state
        if self.policy == "baseline":
            return st["ema_qt"]
        feedback = 0.0
        if self._grad_theta is not None and self._theta_old is not None:
            d_theta = self._flat(False) - self._theta_old
            feedback = st["s"] * float(self._grad_theta @ d_theta)
        return (st["ema_qt"] + feedback) / max(st["ema_qtt"], 1e-12)

    def state_dict(self) -> dict:
        """Counters and moving averages (T itself lives in the model's state_dict)."""
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.state = dict(state)
