"""Hessian-free (truncated) Newton maths: conjugate gradients over tensor lists and exact
Hessian-vector products, as pure functions.

References:
    Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 1994;
    Martens, "Deep learning via Hessian-free optimization", ICML 2010; Nocedal, Wright,
    "Numerical Optimization", 2nd ed., 2006, Algorithm 5.2 (CG) and Algorithm 7.1 (Newton-CG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class CGInfo(NamedTuple):
    """How a :func:`conjugate_gradient` solve ended.

    Attributes:
        iterations: CG iterations taken (matrix-vector products whose step was applied).
        residual: relative residual ||b - A x_k|| / ||b|| of the last CG iterate x_k (0 when
            b = 0; NaN when a curvature p^T A p was not finite, i.e. the solve broke down).
        negative_curvature: the solve stopped on a direction with p^T A p <= 0.
        curvature: x^T A x of the returned x (what a quadratic model of the step needs).
    """

    iterations: int
    residual: float
    negative_curvature: bool
    curvature: float = math.nan


def _dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> float:
    """Euclidean inner product of two tensor lists of equal shapes."""
    return float(sum((a * b).sum() for a, b in zip(u, v)))


def _axpy(alpha: float, x: Sequence[torch.Tensor],
          y: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """alpha * x + y, element-wise over two tensor lists."""
    return [b + alpha * a for a, b in zip(x, y)]


def conjugate_gradient(matvec: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                       b: Sequence[torch.Tensor], iters: int,
                       tol: float) -> tuple[list[torch.Tensor], CGInfo]:
    """Solve A x = b by conjugate gradients from x_0 = 0 (Nocedal-Wright Alg. 5.2 and 7.1).

    Vectors are lists of tensors (one per parameter, any shapes): the inner product sums over
    all of them, so a parameter list needs no flattening. A is given only through ``matvec``
    and must be symmetric. Stops after ``iters`` iterations, when the relative residual
    ||r_k|| / ||b|| <= ``tol``, or on non-positive curvature p^T A p <= 0. On that last stop
    it returns the current iterate x_k, or b itself when it happens at the first iteration
    (x_0 = 0 carries no information; b is the steepest-descent direction of the quadratic
    model, as in truncated Newton). In exact arithmetic an n-dimensional SPD system is solved
    in at most n iterations (at most the number of distinct eigenvalues of A).

    Args:
        matvec: v -> A v on lists shaped like ``b``; must not modify its argument.
        b: right-hand side, a list of tensors.
        iters: maximum number of iterations (>= 1).
        tol: relative residual tolerance (>= 0).

    Returns:
        (x, info): x shaped like ``b``; :class:`CGInfo`.

    Raises:
        ValueError: if ``iters`` < 1 or ``tol`` < 0.
    """
    if not (isinstance(iters, int) and iters >= 1) or not tol >= 0:
        raise ValueError(f"need an int iters >= 1 and tol >= 0, got iters={iters!r}, tol={tol!r}")
    x = [torch.zeros_like(v) for v in b]
    r, p = list(b), list(b)
    rr = _dot(r, r)
    b_norm = math.sqrt(rr)
    if b_norm == 0.0:
        return x, CGInfo(0, 0.0, False, 0.0)

    def x_ax() -> float:  # A x = b - r, so x^T A x = x^T b - x^T r
        return _dot(x, b) - _dot(x, r)

    for k in range(iters):
        ap = matvec(p)
        curvature = _dot(p, ap)
        if not math.isfinite(curvature):
            return x, CGInfo(k, math.nan, False)
        if curvature <= 0.0:
            if k == 0:  # x = b = p: its curvature is the one just measured
                return list(b), CGInfo(0, 1.0, True, curvature)
            return x, CGInfo(k, math.sqrt(rr) / b_norm, True, x_ax())
        alpha = rr / curvature
        x, r = _axpy(alpha, p, x), _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        if math.sqrt(rr_new) <= tol * b_norm:
            return x, CGInfo(k + 1, math.sqrt(rr_new) / b_norm, False, x_ax())
        p, rr = _axpy(rr_new / rr, p, r), rr_new
    return x, CGInfo(iters, math.sqrt(rr) / b_norm, False, x_ax())


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Exact Hessian-vector product H v = d(g . v)/d(theta) by double backward (Pearlmutter).

    Args:
        grads: g = dL/d(params), computed with ``create_graph=True``; one per parameter. A
            gradient without a graph (L linear in that parameter) contributes nothing.
        params: the parameters, shapes matching ``grads``.
        vector: v, shapes matching ``params``; not differentiated.

    Returns:
        H v as a list shaped like ``params`` (zeros where L has no second derivative). The
        graph of ``grads`` is retained, so the function can be called repeatedly (as CG does).
    """
    pairs = [(g, v.detach()) for g, v in zip(grads, vector) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad([g for g, _ in pairs], list(params),
                             grad_outputs=[v for _, v in pairs], retain_graph=True,
                             allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]
