"""SNOpt's maths against independent computations: exact and Gauss-Newton second-order
backward ODEs vs autograd, and the Kronecker preconditioner vs dense linear algebra."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import solvers
from ocnode.curvature import second_order_backward
from ocnode.optim import kfac_math

STEP = {"method": "rk4", "options": {"step_size": 0.01}}


class TinyField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, 3)
        self.l2 = nn.Linear(3, 2)
        self.double()

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x))) * (1 + 0.5 * torch.sin(t))


def _phi(x):
    return ((x - 0.3) ** 2).sum() + 0.1 * (x**3).sum()


def _loss_of_theta(func, x0):
    """L(theta) through a fixed-grid solve (backprop through the solver)."""
    names = [k for k, _ in func.named_parameters()]
    shapes = [p.shape for p in func.parameters()]

    def x1_of(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        p = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        return solvers.odeint(lambda t, x: functional_call(func, p, (t, x)), x0,
                              torch.tensor([0.0, 1.0], dtype=x0.dtype), **STEP)[-1]

    theta = torch.cat([p.detach().reshape(-1) for p in func.parameters()])
    return x1_of, theta


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyField(), torch.randn(2, 2, dtype=torch.float64)


def test_exact_second_order_backward_odes_equal_autograd_hessian(tiny):
    func, x0 = tiny
    res = second_order_backward(func, x0, 0.0, 1.0, _phi, step_size=0.01)
    x1_of, theta = _loss_of_theta(func, x0)
    hess = torch.autograd.functional.hessian(lambda th: _phi(x1_of(th)), theta)
    grad = torch.autograd.functional.jacobian(lambda th: _phi(x1_of(th)), theta)
    assert torch.allclose(res["Qtt"], hess, atol=1e-8 * hess.abs().max())
    assert torch.allclose(res["Qtheta"], grad, atol=1e-10)


def test_exact_qxx_equals_the_hessian_wrt_the_initial_state(tiny):
    func, x0 = tiny
    res = second_order_backward(func, x0, 0.0, 1.0, _phi, step_size=0.01)
    x1 = lambda x: solvers.odeint(func, x, torch.tensor([0.0, 1.0], dtype=x.dtype),  # noqa: E731
                                  **STEP)[-1]
    hess = torch.autograd.functional.hessian(lambda x: _phi(x1(x.view(2, 2))), x0.reshape(-1))
    assert torch.allclose(res["Qxx"], hess, atol=1e-8 * hess.abs().max())


def test_gauss_newton_low_rank_adjoint_equals_jt_hessian_j(tiny):
    # Phi(x) = 0.5 |W x - c|^2 has hess Phi = W^T W = sum_r y_r y_r^T with y_r the rows of W.
    func, x0 = tiny
    w = torch.randn(3, 4, dtype=torch.float64)
    params = tuple(func.parameters())
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # one adjoint solve per rank component: q_r(t1) = y_r gives p_r(t0) = dtheta
    x1 = solvers.odeint_adjoint(func, x0, t, **STEP)[-1]
    p_rows = []
    for r in range(w.shape[0]):
        grads = torch.autograd.grad(x1, params, w[r].view(2, 2), retain_graph=True)
        p_rows.append(torch.cat([g.reshape(-1) for g in grads]))
    gn_adjoint = sum(torch.outer(p, p) for p in p_rows)
    # autograd: J_theta^T (W^T W) J_theta through a fixed-grid solve
    x1_of, theta = _loss_of_theta(func, x0)
    jac = torch.autograd.functional.jacobian(lambda th: x1_of(th).reshape(-1), theta)
    gn_autograd = jac.t() @ w.t() @ w @ jac
    assert torch.allclose(gn_adjoint, gn_autograd, atol=1e-7 * gn_autograd.abs().max())
    # and the reference utility's truncated ODEs agree
    res = second_order_backward(func, x0, 0.0, 1.0, lambda x: 0.5 * ((w @ x.reshape(-1)) ** 2)
                                .sum(), gauss_newton=True, step_size=0.01)
    assert torch.allclose(res["Qtt"], gn_autograd, atol=1e-7 * gn_autograd.abs().max())


def _random_psd(d, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return m @ m.t() / (2 * d)


def test_alpha_one_is_kfac_with_eigenvalue_damping():
    a, b = _random_psd(4, 0), _random_psd(3, 1)
    g = torch.randn(3, 4, dtype=torch.float64)
    n, eps = 7.0, 0.05
    lam_a, basis_a = kfac_math.eigenbasis(a)
    lam_b, basis_b = kfac_math.eigenbasis(b)
    m2 = kfac_math.reset_second_moment(lam_a, lam_b, n)
    out, m2_after = kfac_math.ekfac_precondition(g, basis_a, basis_b, m2, alpha=1.0, eps=eps,
                                          batch_size=32)
    # (N A (x) B + eps I)^-1 vec(G), with column-major vec: (A (x) B) vec(G) = vec(B G A^T)
    dense = n * torch.kron(a, b) + eps * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.solve(dense, g.t().reshape(-1)).reshape(4, 3).t()
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.equal(m2_after, m2)


def test_identity_factors_leave_the_gradient_unchanged():
    g = torch.randn(3, 5, dtype=torch.float64)
    eye_a, eye_b = torch.eye(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    m2 = torch.full((3, 5), 1 - 0.05, dtype=torch.float64)
    out, _ = kfac_math.ekfac_precondition(g, eye_a, eye_b, m2, alpha=1.0, eps=0.05, batch_size=8)
    assert torch.allclose(out, g, rtol=0, atol=1e-15)


def test_ekfac_moving_average_tracks_the_rotated_squared_gradient():
    g = torch.randn(2, 3, dtype=torch.float64)
    eye_a, eye_b = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    m2 = torch.ones(2, 3, dtype=torch.float64)
    _, new = kfac_math.ekfac_precondition(g, eye_a, eye_b, m2, alpha=0.75, eps=0.05, batch_size=4)
    assert torch.allclose(new, 0.75 + 0.25 * 4 * g**2)
    assert torch.equal(m2, torch.ones(2, 3, dtype=torch.float64))  # not modified in place


def test_tikhonov_damping_inverts_the_damped_kronecker_product():
    a, b = _random_psd(3, 2), _random_psd(2, 3)
    g = torch.randn(2, 3, dtype=torch.float64)
    lam_a, basis_a = kfac_math.eigenbasis(a)
    lam_b, basis_b = kfac_math.eigenbasis(b)
    out = kfac_math.tikhonov_precondition(g, basis_a, lam_a, basis_b, lam_b, eps=0.04,
                                          num_locations=5)
    damped = 5 * torch.kron(a + 0.2 * torch.eye(3, dtype=torch.float64),
                            b + 0.2 * torch.eye(2, dtype=torch.float64))
    expected = torch.linalg.solve(damped, g.t().reshape(-1)).reshape(3, 2).t()
    assert torch.allclose(out, expected, atol=1e-12)


def test_eigenbasis_retries_with_jitter_and_never_returns_nan(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def flaky(m):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("simulated failure")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    lam, vec = kfac_math.eigenbasis(_random_psd(3, 4))
    assert len(calls) == 2 and bool(torch.isfinite(lam).all()) and bool((lam >= 0).all())
    with pytest.raises(torch.linalg.LinAlgError):
        kfac_math.eigenbasis(torch.full((2, 2), float("nan"), dtype=torch.float64))


def test_layer_gradient_round_trips_conv_weights_and_bias():
    w, b = torch.randn(4, 2, 3, 3), torch.randn(4)
    g = kfac_math.layer_gradient(w, b)
    assert g.shape == (4, 19)
    w2, b2 = kfac_math.split_gradient(g, w.shape, True)
    assert torch.equal(w2, w) and torch.equal(b2, b)
