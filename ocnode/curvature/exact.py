"""Reference solver of the exact second-order backward ODEs of a Neural ODE.

For small problems only: it forms the dense derivatives F_x (m x m), F_theta (m x n) and the
adjoint-contracted second derivatives with :mod:`torch.func`, and integrates

    dQx/dt      = -F_x^T Qx
    dQtheta/dt  = -F_theta^T Qx
    dQxx/dt     = -(F_x^T Qxx + Qxx F_x + sum_i a_i d2F_i/dx2)
    dQxtheta/dt = -(F_x^T Qxtheta + Qxx F_theta + sum_i a_i d2F_i/dxdtheta)
    dQtt/dt     = -(F_theta^T Qxtheta + Qxtheta^T F_theta + sum_i a_i d2F_i/dtheta2)

backward from Q(t1) = (grad Phi, 0, hess Phi, 0, 0), re-integrating x alongside. Qtt(t0) is
the exact Hessian of L = Phi(x(t1)) w.r.t. theta (Liu-Chen-Theodorou 2021, Theorem 1);
``gauss_newton=True`` drops the second derivatives of F (Proposition 2). It is the ground
truth for tests and a tool for studying curvature on toy problems; training uses the
Kronecker-factored statistics instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import solvers


def _flat_field(func: nn.Module, x_shape: torch.Size) -> tuple[Callable, torch.Tensor]:
    """f(t, x_flat, theta_flat) -> (m,) and the current theta (n,)."""
    names = [k for k, p in func.named_parameters() if p.requires_grad]
    params = [p for _, p in func.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def f(t: torch.Tensor, x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(th, [s.numel() for s in shapes])
        p = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        return functional_call(func, p, (t, x.view(x_shape))).reshape(-1)

    return f, theta


def second_order_backward(func: nn.Module, x0: torch.Tensor, t0: float, t1: float,
                          phi: Callable[[torch.Tensor], torch.Tensor],
                          gauss_newton: bool = False, method: str = "rk4",
                          step_size: float = 0.01) -> dict[str, torch.Tensor]:
    """Integrate the value function's first and second derivatives from t1 back to t0.

    Args:
        func: vector field f(t, x) (an nn.Module); its trainable parameters are theta (n).
        x0: initial state, any shape; m = x0.numel().
        t0, t1: the horizon.
        phi: terminal loss Phi(x(t1)) -> scalar, taking x in x0's shape.
        gauss_newton: drop the second derivatives of f (the GN truncation).
        method, step_size: the fixed-grid solver of both passes.

    Returns:
        dict with 'Qx' (m,), 'Qtheta' (n,), 'Qxx' (m, m), 'Qxtheta' (m, n), 'Qtt' (n, n),
        all at t0, plus 'x1' (x(t1), x0's shape).
    """
    f, theta = _flat_field(func, x0.shape)
    opts = {"step_size": step_size}
    t_fwd = torch.tensor([t0, t1], dtype=x0.dtype)
    with torch.no_grad():
        x1 = solvers.odeint(lambda t, x: f(t, x, theta), x0.reshape(-1), t_fwd,
                            method=method, options=opts)[-1]
    phi_flat = lambda x: phi(x.view(x0.shape))  # noqa: E731
    m, n = x1.numel(), theta.numel()
    state = (x1, jacrev(phi_flat)(x1), torch.zeros(n, dtype=x1.dtype), hessian(phi_flat)(x1),
             torch.zeros(m, n, dtype=x1.dtype), torch.zeros(n, n, dtype=x1.dtype))
    rhs = _backward_rhs(f, theta, gauss_newton)
    with torch.no_grad():
        out = solvers.odeint(rhs, state, t_fwd.flip(0), method=method, options=opts)
    names = ("x", "Qx", "Qtheta", "Qxx", "Qxtheta", "Qtt")
    result = {k: v[-1] for k, v in zip(names, out)}
    result["x1"] = x1.view(x0.shape)
    del result["x"]
    return result


def _backward_rhs(f: Callable, theta: torch.Tensor, gauss_newton: bool) -> Callable:
    def rhs(t: torch.Tensor, state: tuple) -> tuple:
        x, a, _, qxx, qxt, _ = state
        fx = jacrev(f, argnums=1)(t, x, theta)
        ft = jacrev(f, argnums=2)(t, x, theta)
        d_qxx = fx.t() @ qxx + qxx @ fx
        d_qxt = fx.t() @ qxt + qxx @ ft
        d_qtt = ft.t() @ qxt + qxt.t() @ ft
        if not gauss_newton:
            af = lambda xx, th: a @ f(t, xx, th)  # noqa: E731
            d_qxx = d_qxx + hessian(af, argnums=0)(x, theta)
            d_qxt = d_qxt + jacrev(jacrev(af, argnums=0), argnums=1)(x, theta)
            d_qtt = d_qtt + hessian(af, argnums=1)(x, theta)
        return (f(t, x, theta), -fx.t() @ a, -ft.t() @ a, -d_qxx, -d_qxt, -d_qtt)
    return rhs
