"""Newton-CG: Hessian-free (truncated) Newton with exact Hessian-vector products.

The exact second-order baseline that SNOpt is compared against. Each ``step(closure)``
evaluates the loss, takes its gradient g with a graph, and solves (H + damping I) d = g by
conjugate gradients, where every H v is an exact Hessian-vector product by double backward
(Pearlmutter 1994). For a Neural ODE these products go through the solver's operations, so ODE
blocks must be built with ``adjoint=False`` (memory linear in the number of solver steps, and
about twice a backward pass per CG iteration). Then theta <- theta - lr * d.

The bookkeeping lives here; the maths are :func:`ocnode.optim.cg.conjugate_gradient` and
:func:`ocnode.optim.cg.hessian_vector_product`.

References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010; Nocedal, Wright,
    "Numerical Optimization", 2nd ed., 2006, chapter 7 (Algorithm 7.1, line-search Newton-CG).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ocnode.optim import cg

_GLOBAL = "newton_cg"  # key of the optimizer-wide counters in self.state


def _check_group(lr: Any, damping: Any) -> None:
    if not (isinstance(lr, int | float) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if not (isinstance(damping, int | float) and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}; 1e-4 to 1 are "
                         "typical (0 risks negative-curvature stops)")


#: Levenberg-Marquardt rule (Martens 2010, section 4.1): reduction ratio thresholds and the
#: factors applied to every group's damping.
LM_LOW, LM_HIGH, LM_UP, LM_DOWN = 0.25, 0.75, 1.5, 2.0 / 3.0
LM_MIN_DAMPING, LM_MAX_DAMPING = 1e-6, 1e6


def _check_solver(cg_iters: Any, cg_tol: Any, max_step_norm: Any) -> None:
    if not (isinstance(cg_iters, int) and cg_iters >= 1):
        raise ValueError(f"cg_iters must be an int >= 1, got {cg_iters!r}")
    if not (isinstance(cg_tol, int | float) and cg_tol >= 0):
        raise ValueError(f"cg_tol must be a number >= 0, got {cg_tol!r}")
    if max_step_norm is not None and not (isinstance(max_step_norm, int | float)
                                          and max_step_norm > 0):
        raise ValueError(f"max_step_norm must be None or a number > 0, got {max_step_norm!r}")


def _check_second_order(grads: list[torch.Tensor]) -> None:
    """Refuse gradients that cannot be differentiated again; warn when only some can."""
    flat = [g for g in grads if not g.requires_grad]
    if not flat:
        return
    hint = ("the loss is linear in them, or the model differentiates through an operation "
            "without double backward, e.g. an ODEBlock with adjoint=True (build it with "
            "adjoint=False for NewtonCG)")
    if len(flat) == len(grads):
        raise ValueError(f"NewtonCG: no gradient has a graph to differentiate again: {hint}")
    warnings.warn(f"NewtonCG: the gradients of {len(flat)} parameter tensor(s) have no graph, "
                  f"so their Hessian rows count as zero: {hint}", RuntimeWarning, stacklevel=4)


class NewtonCG(torch.optim.Optimizer):
    """Hessian-free Newton: solve (H + damping I) d = g by CG with exact HVPs, step -lr * d.

    One CG solve covers all parameters together; each parameter group contributes its own
    ``damping`` to the diagonal and scales its part of d by its own ``lr``.

    CG stops after ``cg_iters`` iterations, at relative residual ``cg_tol``, or on a direction
    of non-positive curvature p^T (H + damping I) p <= 0; there it keeps the current iterate,
    or, at the first iteration, takes d = g (a plain gradient step of size lr).

    Usage::

        def closure():
            return loss_fn(model(x), y)    # the loss with its graph; no backward()
        loss = opt.step(closure)

    The gradient g is written into each parameter's ``.grad`` (detached) for logging.
    Parameters the loss does not use (gradient None) and those without ``requires_grad`` are
    left alone. Gradients without a graph (an ``adjoint=True`` ODE block, or a loss linear in
    the parameter) give zero Hessian rows: a warning, or a ValueError when no gradient has one.
    A non-finite loss, gradient or Hessian-vector product skips the update with a
    ``RuntimeWarning`` and leaves the parameters and ``state`` unchanged.

    Args:
        params: parameters or parameter groups (groups may set ``lr`` and ``damping``).
        lr: step size on the Newton direction (1 = full Newton step).
        damping: Tikhonov damping lambda >= 0 added to the Hessian. There is no line search:
            on non-convex losses a small damping can give huge steps (the default 1e-3 is
            for near-convex problems); 0.1-1 or ``max_step_norm`` keep a Neural ODE stable.
        cg_iters: maximum CG iterations (Hessian-vector products) per step.
        cg_tol: CG's relative residual tolerance.
        max_step_norm: clip the whole step (all parameters) to this Euclidean norm; None: no
            clipping.
        adapt_damping: Levenberg-Marquardt damping (Martens 2010, section 4.1): after each
            update the closure is evaluated again (without grad) and the reduction ratio
            rho = (L(theta + s) - L(theta)) / q(s), with q the damped quadratic model of the
            step s, scales every group's damping by 3/2 when rho < 1/4 and by 2/3 when
            rho > 3/4 (kept in [1e-6, 1e6]); an update that raises the loss is undone. Costs
            one more forward pass per step; recommended on non-convex losses.

    Data-parallel runs set :attr:`sync` (``ocnode.training.distributed`` does; the model is
    then not wrapped in DistributedDataParallel, whose hooks do not see double backward):
    each rank differentiates its own loss, and the loss, the gradient and every
    Hessian-vector product are averaged over the ranks (one all-reduce each), so every rank
    runs the same CG iterations on the global batch's Hessian and takes the same step; with
    ``adapt_damping`` the new loss is averaged too.

    Attributes:
        sync: an object with ``mean(tensor)`` (the mean over the ranks), or None (one process).
        state["newton_cg"]: ``step`` (updates taken), ``cg_iterations``, ``cg_residual`` and
            ``negative_curvature`` of the last solve (residual NaN before the first step),
            ``step_norm`` of the last update, and with ``adapt_damping`` the last ``rho`` and
            the count of ``rejected`` updates; it round-trips through ``state_dict``. After a
            skipped update ``.grad`` still holds the (non-finite) gradient, when it exists.
    """

    def __init__(self, params: Iterable, lr: float = 1.0, damping: float = 1e-3,
                 cg_iters: int = 10, cg_tol: float = 1e-4,
                 max_step_norm: float | None = None, adapt_damping: bool = False) -> None:
        _check_solver(cg_iters, cg_tol, max_step_norm)
        self.cg_iters, self.cg_tol, self.max_step_norm = cg_iters, cg_tol, max_step_norm
        self.adapt_damping = bool(adapt_damping)
        super().__init__(params, dict(lr=lr, damping=damping))
        # torch keys state by parameter; a string key round-trips through state_dict too
        record = {"step": 0, "cg_iterations": 0, "cg_residual": math.nan,
                  "negative_curvature": False, "step_norm": 0.0, "rho": math.nan,
                  "rejected": 0}
        self.state[_GLOBAL] = record  # type: ignore[index]
        self.sync: Any = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated: ``lr`` > 0, ``damping`` >= 0)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group["lr"], group["damping"])

    @property
    def counters(self) -> dict[str, Any]:
        """The optimizer-wide record: step count and the last CG solve's outcome."""
        return self.state[_GLOBAL]  # type: ignore[index]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the record (copied, so two optimizers never share it)."""
        super().load_state_dict(state_dict)
        self.state[_GLOBAL] = dict(self.state[_GLOBAL])  # type: ignore[index]

    # ---- the step ------------------------------------------------------------------------

    def step(self, closure: Callable[[], torch.Tensor] | None = None  # type: ignore[override]
             ) -> torch.Tensor:
        """Evaluate the closure, solve for the Newton direction by CG and update.

        Args:
            closure: returns the scalar loss with its autograd graph, without calling
                ``backward()``; it is called once, with grad enabled.

        Returns:
            The loss, detached.

        Raises:
            TypeError: without a closure.
            ValueError: if the loss is not a one-element tensor with a graph, or no gradient
                can be differentiated again.
        """
        if closure is None:
            raise TypeError("NewtonCG needs step(closure); the closure returns the loss "
                            "without calling backward")
        with torch.enable_grad():
            local = closure()
            if not isinstance(local, torch.Tensor) or local.numel() != 1:
                raise ValueError("the closure must return the loss as a one-element tensor")
            loss = self._mean([local.detach().reshape(1)])[0].reshape(local.shape)
            if not bool(torch.isfinite(loss)):
                return self._skip("non-finite loss", loss)
            params, grads = self._gradients(local)
            mean_grads = self._mean([g.detach() for g in grads])
            if not all(bool(torch.isfinite(g).all()) for g in mean_grads):
                return self._skip("non-finite gradient", loss)
            for p, g in zip(params, mean_grads):
                p.grad = g
            direction, info = self._solve(params, grads, mean_grads)
        if not math.isfinite(info.residual):
            return self._skip("non-finite Hessian-vector product", loss)
        steps = self._steps(params, direction)
        self._apply(params, steps, sign=-1.0)
        if self.adapt_damping:
            self._levenberg_marquardt(closure, float(loss), params, steps, mean_grads,
                                      direction, info)
        self.counters.update(step=self.counters["step"] + 1, cg_iterations=info.iterations,
                             cg_residual=info.residual,
                             negative_curvature=info.negative_curvature,
                             step_norm=math.sqrt(sum(float(t.square().sum()) for t in steps)))
        return loss.detach()

    def _levenberg_marquardt(self, closure: Callable[[], torch.Tensor], loss: float,
                             params: list[torch.Tensor], steps: list[torch.Tensor],
                             grads: list[torch.Tensor], direction: list[torch.Tensor],
                             info: cg.CGInfo) -> None:
        """Rate the update by rho = actual / predicted reduction; adapt damping; undo the
        update if the loss rose. Steps are s = -c * d per group (c = lr times the clip)."""
        with torch.no_grad():
            new_loss = float(self._mean([closure().reshape(1)])[0])
        # q(s) = g^T s + 1/2 s^T (H + lambda) s for s = -c d with one common c: exact when
        # all groups share lr; otherwise a first-order estimate of the scale
        d_norm2 = sum(float(d.square().sum()) for d in direction)
        c = sum(float((s * d).sum()) for s, d in zip(steps, direction)) / d_norm2 \
            if d_norm2 > 0 else 0.0
        g_dot_d = sum(float((g * d).sum()) for g, d in zip(grads, direction))
        predicted = -c * g_dot_d + 0.5 * c * c * info.curvature
        rho = (new_loss - loss) / predicted if predicted < 0 else -math.inf
        if not math.isfinite(new_loss) or new_loss > loss:
            self._apply(params, steps, sign=1.0)  # undo
            self.counters["rejected"] += 1
        factor = LM_UP if not rho >= LM_LOW else LM_DOWN if rho > LM_HIGH else 1.0
        for group in self.param_groups:
            group["damping"] = min(max(group["damping"] * factor, LM_MIN_DAMPING),
                                   LM_MAX_DAMPING)
        self.counters["rho"] = rho

    def _mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors averaged over the ranks (one all-reduce; as they are in one process)."""
        if self.sync is None or not tensors:
            return tensors
        flat = self.sync.mean(torch.cat([t.reshape(-1) for t in tensors]))
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]),
                                                    tensors)]

    def _skip(self, why: str, loss: torch.Tensor) -> torch.Tensor:
        warnings.warn(f"NewtonCG: {why}; update skipped, parameters and state unchanged",
                      RuntimeWarning, stacklevel=3)
        return loss.detach()

    def _gradients(self, loss: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """g = dL/dtheta with a graph, for the used trainable parameters; also into ``.grad``
        (this process's; :meth:`step` replaces it by the mean over the ranks)."""
        if not loss.requires_grad:
            raise ValueError("the closure's loss has no autograd graph: compute it with grad "
                             "enabled from the parameters, without detaching it")
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return [], []
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        for p, g in used:
            p.grad = g.detach()
        _check_second_order([g for _, g in used])
        return [p for p, _ in used], [g for _, g in used]

    def _group_values(self, params: list[torch.Tensor], key: str) -> list[float]:
        """Per-parameter value of a group hyperparameter (``lr`` or ``damping``)."""
        by_id = {id(p): group[key] for group in self.param_groups for p in group["params"]}
        return [float(by_id[id(p)]) for p in params]

    def _solve(self, params: list[torch.Tensor], grads: list[torch.Tensor],
               b: list[torch.Tensor]) -> tuple[list[torch.Tensor], cg.CGInfo]:
        """d = (H + damping I)^-1 b by CG, H v by double backward through this process's
        gradient ``grads`` (averaged over the ranks); b: the (averaged) gradient."""
        dampings = self._group_values(params, "damping")

        def matvec(v: list[torch.Tensor]) -> list[torch.Tensor]:
            hv = self._mean(cg.hessian_vector_product(grads, params, v))
            return [h + lam * u for h, u, lam in zip(hv, v, dampings)]

        return cg.conjugate_gradient(matvec, b, self.cg_iters, self.cg_tol)

    @torch.no_grad()
    def _steps(self, params: list[torch.Tensor],
               direction: list[torch.Tensor]) -> list[torch.Tensor]:
        """lr * d per parameter, the whole step clipped to ``max_step_norm``."""
        steps = [lr * d for lr, d in zip(self._group_values(params, "lr"), direction)]
        norm = math.sqrt(sum(float(s.square().sum()) for s in steps))
        if self.max_step_norm is not None and norm > self.max_step_norm:
            steps = [s * (self.max_step_norm / norm) for s in steps]
        return steps

    @staticmethod
    @torch.no_grad()
    def _apply(params: list[torch.Tensor], steps: list[torch.Tensor], sign: float) -> None:
        """theta <- theta + sign * step."""
        for p, s in zip(params, steps):
            p.add_(s, alpha=sign)
