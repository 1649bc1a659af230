"""The pure maths of the Kronecker-factored optimizers (K-FAC, EKFAC), as functions.

Notation: a layer with h = W z (+ b) has the input factor A = E[z z^T] (d_in x d_in, a 1
appended for the bias) and the output-gradient factor B = E[g g^T] (d_out x d_out); the
curvature of its parameters is approximated by num_locations * A (x) B. The gradient G is a
d_out x d_in matrix (bias as the last column). The factors themselves are collected by
:mod:`ocnode.curvature`; these functions turn them into an eigenbasis and precondition G.

References:
    Martens, Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", ICML 2015 (K-FAC); Grosse, Martens, "A Kronecker-factored approximate Fisher
    matrix for convolution layers", ICML 2016; George et al., "Fast Approximate Natural
    Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018 (EKFAC);
    Liu, Chen, Theodorou, "Second-order Neural ODE Optimizer", NeurIPS 2021 (SNOpt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    for k in range(max_tries):
        # the first try as it is; the retries (rare) add a growing multiple of the identity
        shifted, shift = (sym, 0.0) if k == 0 else _jittered(sym, jitter * 10.0 ** (2 * k))
        try:
            lam, vec = torch.linalg.eigh(shifted)
        except torch.linalg.LinAlgError:
            continue
        if all_finite([lam, vec]):
            return (lam - shift).clamp_min(0.0), vec
    raise torch.linalg.LinAlgError("eigh failed on a Kronecker factor even with jitter")


def _jittered(sym: torch.Tensor, relative: float) -> tuple[torch.Tensor, float]:
    """(sym + shift * I, shift) with shift = relative * the mean |diagonal| (1 if zero)."""
    shift = relative * (float(sym.diagonal().abs().mean()) or 1.0)
    return sym + shift * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device), shift


class KroneckerBasis(NamedTuple):
    """A layer's refreshed Kronecker factors, their eigenbases and EKFAC's second moments.

    The field names are the keys of the layer's optimizer state.

    Attributes:
        a_factor: mean A, (d_in, d_in). b_factor: mean B, (d_out, d_out).
        basis_a: eigenvectors of A, (d_in, d_in). basis_b: of B, (d_out, d_out).
        lam_a: eigenvalues of A, (d_in,). lam_b: of B, (d_out,).
        num_locations: N * locations, the multiplier of A (x) B.
        m2: EKFAC's second moments in the eigenbasis, (d_out, d_in).
    """

    a_factor: torch.Tensor
    b_factor: torch.Tensor
    basis_a: torch.Tensor
    basis_b: torch.Tensor
    lam_a: torch.Tensor
    lam_b: torch.Tensor
    num_locations: float
    m2: torch.Tensor


def kronecker_basis(a_factor: torch.Tensor, b_factor: torch.Tensor,
                    num_locations: float) -> KroneckerBasis:
    """Eigendecompose both factors and reset the second moments (an EKFAC refresh).

    Args:
        a_factor: (d_in, d_in) symmetric PSD. b_factor: (d_out, d_out) symmetric PSD.
        num_locations: N * locations of the layer.

    Raises:
        torch.linalg.LinAlgError: if an eigendecomposition fails (see :func:`eigenbasis`).
    """
    lam_a, basis_a = eigenbasis(a_factor)
    lam_b, basis_b = eigenbasis(b_factor)
    return KroneckerBasis(a_factor, b_factor, basis_a, basis_b, lam_a, lam_b, num_locations,
                          reset_second_moment(lam_a, lam_b, num_locations))


def refreshed_basis(a_factor: torch.Tensor, b_factor: torch.Tensor,
                    num_locations: float) -> KroneckerBasis | str:
    """:func:`kronecker_basis`, or why a layer must keep its old basis (non-finite factors,
    a failed eigendecomposition) as a short reason for the caller's warning."""
    if not all_finite([a_factor, b_factor]):
        return "non-finite factor"
    try:
        return kronecker_basis(a_factor, b_factor, num_locations)
    except torch.linalg.LinAlgError:
        return "eigh failed"


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one fused max-norm per tensor: NaN and
    +-inf survive it, huge finite values do not)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(list(tensors), float("inf"))))
                .all())


def basis_shapes(d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a :class:`KroneckerBasis` for a (d_out, d_in) gradient matrix."""
    return {"a_factor": (d_in, d_in), "b_factor": (d_out, d_out), "basis_a": (d_in, d_in),
            "basis_b": (d_out, d_out), "lam_a": (d_in,), "lam_b": (d_out,),
            "m2": (d_out, d_in)}


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
