"""The pure maths of the Kronecker-factored optimizers, as functions you can test alone.

Notation (ALGORITHM.md sections 1.5-1.6): a layer with h = W z (+ b) has the input factor
A = E[z z^T] (d_in x d_in, a 1 appended for the bias) and the output-gradient factor
B = E[g g^T] (d_out x d_out); the curvature of its parameters is approximated by
num_locations * A (x) B. The gradient G is a d_out x d_in matrix (bias as the last column).

References:
    Martens, Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", ICML 2015 (K-FAC); Grosse, Martens, "A Kronecker-factored approximate Fisher
    matrix for convolution layers", ICML 2016; George et al., "Fast Approximate Natural
    Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018 (EKFAC);
    Liu, Chen, Theodorou, "Second-order Neural ODE Optimizer", NeurIPS 2021 (SNOpt).

The end of the module holds the maths of the exact second-order baseline (Newton-CG):
conjugate gradients over tensor lists and exact Hessian-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


def layer_gradient(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """Gradient of a Linear/Conv2d layer as a matrix.

    Args:
        weight_grad: (d_out, d_in) or conv (C_out, C_in, kh, kw).
        bias_grad: (d_out,) or None.

    Returns:
        G, shape (d_out, d_in [+1]); conv weights are flattened to C_in*kh*kw columns.
    """
    g = weight_grad.reshape(weight_grad.shape[0], -1)
    return g if bias_grad is None else torch.cat([g, bias_grad.reshape(-1, 1)], dim=1)


def split_gradient(g: torch.Tensor, weight_shape: torch.Size,
                   has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`layer_gradient`: G (d_out, d_in [+1]) -> (weight, bias) shapes."""
    if has_bias:
        return g[:, :-1].reshape(weight_shape), g[:, -1].contiguous()
    return g.reshape(weight_shape), None


def eigenbasis(factor: torch.Tensor, jitter: float = 1e-10,
               max_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD factor, retried with growing jitter.

    Args:
        factor: (d, d) symmetric positive semi-definite.

    Returns:
        (eigenvalues clamped at 0, shape (d,); eigenvectors, shape (d, d)).

    Raises:
        torch.linalg.LinAlgError: if every retry fails or gives non-finite values.
    """
    sym = 0.5 * (factor + factor.t())
    scale = float(sym.diagonal().abs().mean()) or 1.0
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    for k in range(max_tries):
        shift = 0.0 if k == 0 else jitter * scale * 10.0 ** (2 * k)
        try:
            lam, vec = torch.linalg.eigh(sym + shift * eye)
        except torch.linalg.LinAlgError:
            continue
        if bool(torch.isfinite(lam).all()) and bool(torch.isfinite(vec).all()):
            return (lam - shift).clamp_min(0.0), vec
    raise torch.linalg.LinAlgError("eigh failed on a Kronecker factor even with jitter")


def reset_second_moment(lam_a: torch.Tensor, lam_b: torch.Tensor,
                        num_locations: float) -> torch.Tensor:
    """EKFAC's second-moment table at a refresh: m2 = (lam_b lam_a^T) * num_locations.

    Returns:
        m2, shape (d_out, d_in).
    """
    return torch.outer(lam_b, lam_a) * num_locations


def ekfac_precondition(g: torch.Tensor, basis_a: torch.Tensor, basis_b: torch.Tensor,
                       m2: torch.Tensor, alpha: float, eps: float,
                       batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Precondition G in the Kronecker eigenbasis and update the second moments.

        G~ = U_B^T G U_A;   m2 <- alpha m2 + (1 - alpha) B (G~ * G~);
        G  <- U_B (G~ / (m2 + eps)) U_A^T

    alpha = 1 keeps m2 fixed: plain K-FAC with eigenvalue damping, (N A (x) B + eps)^-1 g.

    Args:
        g: (d_out, d_in). basis_a: (d_in, d_in). basis_b: (d_out, d_out). m2: (d_out, d_in).

    Returns:
        (preconditioned G, new m2), both (d_out, d_in); m2 is not modified in place.
    """
    g_rot = basis_b.t() @ g @ basis_a
    if alpha < 1.0:
        m2 = alpha * m2 + (1.0 - alpha) * batch_size * g_rot.square()
    return basis_b @ (g_rot / (m2 + eps)) @ basis_a.t(), m2


def tikhonov_precondition(g: torch.Tensor, basis_a: torch.Tensor, lam_a: torch.Tensor,
                          basis_b: torch.Tensor, lam_b: torch.Tensor, eps: float,
                          num_locations: float) -> torch.Tensor:
    """Factored Tikhonov damping: (N (A + sqrt(eps) I) (x) (B + sqrt(eps) I))^-1 g.

    Args: as :func:`ekfac_precondition`, with the factors' eigenvalues lam_a (d_in,),
    lam_b (d_out,).
    """
    root = math.sqrt(eps)
    denom = torch.outer(lam_b + root, lam_a + root) * num_locations
    return basis_b @ ((basis_b.t() @ g @ basis_a) / denom) @ basis_a.t()


# ---- Hessian-free (truncated) Newton: exact Hessian-vector products and CG ----------------
# References: Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 1994;
# Martens, "Deep learning via Hessian-free optimization", ICML 2010; Nocedal, Wright,
# "Numerical Optimization", 2nd ed., 2006, Algorithm 5.2 (CG) and Algorithm 7.1 (Newton-CG).


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
