"""The pure maths of DDPNOpt: base steps and their maps, feedback directions, dense DDP.

Notation (Liu, Chen, Theodorou, "Differential Dynamic Programming Neural Optimizer", ICLR
2021, arXiv 2002.08809): the net is a chain of stages x_{t+1} = f_t(x_t, u_t), x_t the state
of one sample (the stage's input), u_t the stage layer's weights and bias (the control), and
the loss L = (1/B) sum_i phi(x_T^(i)). Per sample, with the value gradient V'_x = z at stage
t+1 on the per-sample scale (the gradient of phi_i, i.e. B times the gradient of L) and the
rank-one Gauss-Newton value Hessian V'_xx = z z^T,

    q_u^(i) = f_u^T z    (the per-sample weight gradient)
    q_x^(i) = f_x^T z    (the per-sample gradient of the stage input)
    E[Q_ux dx] = (1/B) sum_i c_i q_u^(i),    c_i = <q_x^(i), dx_t^(i)>

and the update of stage t is u_t <- u_t + base_step + (-P E[Q_ux dx]), with P the linear map
the base optimizer applies to a gradient (SGD: lr; RMSprop/Adam: lr / (sqrt(v_hat) + eps);
EKFAC: lr times the damped Kronecker inverse). Matrices of a layer use the layout of
:func:`ocnode.optim.kfac_math.layer_gradient`: G is (d_out, d_in [+1]), the bias the last
column, conv weights flattened to C_in*kh*kw columns.

Sections: the base optimizers' steps (torch's arithmetic, so that DDPNOpt without feedback
is its base optimizer), the layer maps P, the feedback directions (no per-sample gradient is
materialised; before a training-mode BatchNorm projected off the shift and scaling it
cancels, ours, not the paper's), the V_xx correction, and a dense reference: per-sample
Jacobians, the practical recursion with explicit gains (the test oracle) and vanilla DDP on
the batch's augmented state (a baseline for tiny nets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.grad as nn_grad
from torch import Tensor, nn

from ocnode.curvature import input_rows, output_rows
from ocnode.curvature.layers import has_bias
from ocnode.optim.kfac_math import ekfac_precondition, layer_gradient, split_gradient

#: A stage as a function of its input (B, ...) and its layer's parameters [weight(, bias)].
Stage = Callable[[Tensor, Sequence[Tensor]], Tensor]

# ----------------------------------------------------------------------------- base steps


class BaseStep(NamedTuple):
    """One parameter's base step.

    Attributes:
        param: the parameter after the step (same shape).
        state: the optimizer state entries after the step.
        scale: the diagonal of the base map P for this parameter (a float or a tensor of the
            parameter's shape): the feedback moves the parameter by ``-scale * direction``.
    """

    param: Tensor
    state: dict[str, Any]
    scale: Tensor | float


def sgd_step(p: Tensor, grad: Tensor, buf: Tensor | None, lr: float, momentum: float,
             weight_decay: float) -> BaseStep:
    """SGD with weight decay and (heavy-ball) momentum, in torch.optim.SGD's arithmetic.

    Args:
        p: the parameter. grad: its gradient (same shape). buf: the momentum buffer or None
            (the first step).

    Returns:
        The step; ``state`` holds ``momentum_buffer`` when momentum is on; scale = lr.
    """
    d_p = grad.add(p, alpha=weight_decay) if weight_decay else grad
    state: dict[str, Any] = {}
    if momentum:
        d_p = d_p.detach().clone() if buf is None else buf.mul(momentum).add(d_p)
        state["momentum_buffer"] = d_p
    return BaseStep(p.add(d_p, alpha=-lr), state, lr)


def rmsprop_step(p: Tensor, grad: Tensor, st: dict[str, Any], lr: float, alpha: float,
                 eps: float, momentum: float, weight_decay: float) -> BaseStep:
    """RMSprop (not centered), in torch.optim.RMSprop's arithmetic.

    Args:
        p, grad: the parameter and its gradient. st: its state (empty at the first step).
        alpha: the moving-average rate of the squared gradients.

    Returns:
        The step (state ``step``, ``square_avg`` [, ``momentum_buffer``]);
        scale = lr / (sqrt(square_avg) + eps).
    """
    if weight_decay:
        grad = grad.add(p, alpha=weight_decay)
    square_avg = st.get("square_avg", torch.zeros_like(p))
    square_avg = square_avg.mul(alpha).addcmul(grad, grad, value=1 - alpha)
    avg = square_avg.sqrt().add_(eps)
    state: dict[str, Any] = {"step": st.get("step", 0) + 1, "square_avg": square_avg}
    if momentum:
        buf = st.get("momentum_buffer", torch.zeros_like(p)).mul(momentum).addcdiv(grad, avg)
        state["momentum_buffer"] = buf
        return BaseStep(p.add(buf, alpha=-lr), state, lr / avg)
    return BaseStep(p.addcdiv(grad, avg, value=-lr), state, lr / avg)


def adam_step(p: Tensor, grad: Tensor, st: dict[str, Any], lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float) -> BaseStep:
    """Adam (L2 weight decay, no amsgrad), in torch.optim.Adam's arithmetic.

    Args:
        p, grad: the parameter and its gradient. st: its state (empty at the first step).

    Returns:
        The step (state ``step``, ``exp_avg``, ``exp_avg_sq``);
        scale = lr / (sqrt(v_hat) + eps), v_hat the bias-corrected second moment (no first
        moment: the feedback gets no momentum).
    """
    beta1, beta2 = betas
    if weight_decay:
        grad = grad.add(p, alpha=weight_decay)
    exp_avg = st.get("exp_avg", torch.zeros_like(p)).lerp(grad, 1 - beta1)
    exp_avg_sq = st.get("exp_avg_sq", torch.zeros_like(p)).mul(beta2).addcmul(
        grad, grad, value=1 - beta2)
    step = st.get("step", 0) + 1
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    new = p.addcdiv(exp_avg, denom, value=-(lr / (1 - beta1**step)))
    return BaseStep(new, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
                    lr / denom)


# ----------------------------------------------------------------------------- layer maps


class LayerMap(NamedTuple):
    """The base map P of one layer on matrices G (..., d_out, d_in [+1]).

    P G = scale * G (SGD, RMSprop, Adam), or scale * U_B ((U_B^T G U_A) / (m2 + eps)) U_A^T
    (EKFAC with the layer's eigenbases and current second moments, George et al. 2018).
    Leading batch dimensions of G are kept (per-sample matrices).

    Attributes:
        scale: (d_out, d_in [+1]) the per-entry learning rate or diagonal.
        kronecker: (basis_a (d_in', d_in'), basis_b (d_out, d_out), m2 (d_out, d_in'), eps),
            or None for a diagonal map.
        bias_frozen: the layer has a bias the optimizer does not train: its column of G is
            zeroed before the map (as the base step treats it).
    """

    scale: Tensor
    kronecker: tuple[Tensor, Tensor, Tensor, float] | None = None
    bias_frozen: bool = False

    def __call__(self, g: Tensor) -> Tensor:
        """P G, same shape as ``g``."""
        if self.bias_frozen:
            g = torch.cat([g[..., :-1], torch.zeros_like(g[..., -1:])], dim=-1)
        if self.kronecker is not None:
            basis_a, basis_b, m2, eps = self.kronecker
            g = ekfac_precondition(g, basis_a, basis_b, m2, 1.0, eps, 1)[0]
        return self.scale * g


def clip_feedback(step: Tensor, base: Tensor, max_ratio: float | None) -> Tensor:
    """Scale a layer's feedback step down to at most ``max_ratio`` times its base step.

    A trust region on the first-order policy (ours, not the paper's): the feedback is
    derived for small dx, and its gain grows with the per-sample gradients.

    Args:
        step: the feedback step P E[Q_ux dx], (d_out, d_in [+1]). base: the layer's base
            step, same shape. max_ratio: the bound on ||step|| / ||base|| (None: no bound).
    """
    if max_ratio is None:
        return step
    norm, bound = step.norm(), max_ratio * base.norm()
    return step * torch.clamp(bound / norm, max=1.0) if norm > bound else step


def quadratic_forms(pmap: LayerMap, grads: Tensor) -> Tensor:
    """q^(i)T P q^(i) for per-sample matrices q^(i).

    Args:
        grads: (B, d_out, d_in [+1]).

    Returns:
        (B,).
    """
    return (grads * pmap(grads)).sum(dim=(-2, -1))


# ----------------------------------------------------------------------------- feedback


def _per_sample(c: Tensor, like: Tensor) -> Tensor:
    """c (B,) shaped to broadcast over ``like`` (B, ...)."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def feedback_weights(grad_x: Tensor, dx: Tensor) -> Tensor:
    """c_i = <q_x^(i), dx^(i)> on the per-sample scale.

    Args:
        grad_x: dL/dx_t of the mean loss, (B, ...); q_x^(i) = B * grad_x[i].
        dx: the state deviation x_hat_t - x_t, (B, ...).

    Returns:
        c, shape (B,).
    """
    return (grad_x * dx).flatten(1).sum(1) * grad_x.shape[0]


def weight_gradient(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """The gradient of a layer h = W z (+ b) for its input x and output gradient grad_out.

    A Conv2d with explicit padding takes one weight-gradient convolution; other layers
    (Linear, and anything with a curvature layer helper) the helpers' rows, G = g_rows^T z_rows.

    Args:
        module: the layer. x: its input (B, ...). grad_out: the gradient at its output.

    Returns:
        G, shape (d_out, d_in [+1]).
    """
    bias = has_bias(module)
    if isinstance(module, nn.Conv2d) and not isinstance(module.padding, str):
        gw = nn_grad.conv2d_weight(x, module.weight.shape, grad_out, module.stride,
                                   module.padding, module.dilation, module.groups)
        return layer_gradient(gw, grad_out.sum((0, 2, 3)) if bias else None)
    z, g = input_rows(module, x), output_rows(module, grad_out)
    return layer_gradient(g.t() @ z, g.sum(0) if bias else None)


def feedback_direction(module: nn.Module, x: Tensor, grad_out: Tensor, c: Tensor,
                       normalised: Tensor | None = None) -> Tensor:
    """E[Q_ux dx] = (1/B) sum_i c_i q_u^(i): one weight gradient with grad_out scaled per sample.

    Since q_u^(i) = B * (sample i's part of the weight gradient of L), the B's cancel.

    ``normalised``: the layer's output h, when it goes straight into a BatchNorm that
    normalises with the batch's statistics. Such a BatchNorm cancels a per-channel shift and
    a per-channel scaling of h, so the gradients it passes back are orthogonal, per channel,
    to the constant and to h itself (the step leaves the bias and each weight row's length
    alone, to first order). The per-sample weights c break both; the scaled output gradient
    is then projected back, per channel (over every dimension but 1, as BatchNorm averages),
    onto the complement of {1, h}: see :func:`batchnorm_projection`.

    Args:
        module: the stage's layer. x: its input (B, ...). grad_out: dL/dh at its output.
        c: (B,) the per-sample weights (:func:`feedback_weights`, times the V_xx factor).
        normalised: h (grad_out's shape), or None (no projection).

    Returns:
        (d_out, d_in [+1]).
    """
    scaled = grad_out * _per_sample(c, grad_out)
    if normalised is not None:
        scaled = batchnorm_projection(scaled, normalised)
    return weight_gradient(module, x, scaled)


def batchnorm_projection(g: Tensor, h: Tensor) -> Tensor:
    """g with its per-channel components along 1 and h removed: the part of an output
    gradient that a training-mode BatchNorm on h does not cancel.

    Per channel k (dimension 1), over the other dimensions: g_k - mean(g_k) - h~_k <g_k, h~_k> /
    <h~_k, h~_k>, with h~ = h - mean(h). The result sums to zero and is orthogonal to h on
    each channel, so the weight step it makes, G = sum g z^T, satisfies <G_k, W_k> = 0 and
    leaves the bias unchanged (h = W z + b).

    Args:
        g, h: the same shape (B, C, ...).
    """
    dims = [d for d in range(g.dim()) if d != 1]
    gc, hc = g - g.mean(dims, keepdim=True), h - h.mean(dims, keepdim=True)
    scale = (gc * hc).sum(dims, keepdim=True) / (hc * hc).sum(dims, keepdim=True).clamp_min(
        torch.finfo(hc.dtype).tiny)
    return gc - hc * scale


def batchnorm_step_projection(step: Tensor, weight: Tensor, has_bias: bool) -> Tensor:
    """A layer's step without the parts a training-mode BatchNorm on its output cancels.

    Per output channel k: no bias entry (a shift of h_k) and no component along the weight
    row W_k (a scaling of h_k). :func:`batchnorm_projection` gives a feedback direction
    free of both; a base map other than SGD's (RMSprop's or Adam's diagonal, EKFAC's
    Kronecker eigenbasis) mixes them back in, so the mapped step is projected again. The
    removed directions are the ones the BatchNorm cancels: the training-mode function
    changes the same to first order, the BatchNorm's statistics do not follow.

    Args:
        step: (d_out, d_in [+1]) the layer's step, its bias in the last column if
            ``has_bias``. weight: the layer's weight (d_out, ...), the point of the step.

    Returns:
        The projected step, like ``step``.
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    sw = step[:, :w.shape[1]]
    radial = (sw * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(
        torch.finfo(w.dtype).tiny)
    out = sw - radial * w
    return torch.cat([out, out.new_zeros(out.shape[0], 1)], 1) if has_bias else out


def per_sample_gradients(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """The per-sample gradients q_u^(i) (per-sample scale: B times the mean loss's part).

    Materialises B gradient matrices; used only by the V_xx correction.

    Returns:
        (B, d_out, d_in [+1]).
    """
    batch, weight = x.shape[0], cast(Tensor, module.weight)
    z = input_rows(module, x).reshape(batch, -1, weight[0].numel())
    g = output_rows(module, grad_out).reshape(batch, -1, weight.shape[0]) * batch
    grads = torch.einsum("bld,ble->bde", g, z)
    if has_bias(module):
        grads = torch.cat([grads, g.sum(1).unsqueeze(-1)], dim=-1)
    return grads


def value_scale(r2_next: Tensor, quad: Tensor) -> Tensor:
    """The V_xx correction carried one stage back.

    With V'_xx = r2' q q^T, V_xx = Q_xx - Q_xu P Q_ux = r2' max(0, 1 - r2' q_u^T P q_u) q_x q_x^T:
    the returned r2 = r2' max(0, 1 - r2' quad) (the clamp keeps V_xx positive semi-definite).

    Args:
        r2_next: (B,) the factor at stage t+1 (1 at the output). quad: (B,) q_u^T P q_u.
    """
    return r2_next * torch.clamp(1 - r2_next * quad, min=0.0)


def stage_function(modules: Sequence[nn.Module], names: Sequence[str]) -> Stage:
    """A stage (its layer, then the modules that follow it) as a function of the layer's
    parameters ``names`` (e.g. ("weight", "bias")) and its input."""
    layer, followers = modules[0], modules[1:]

    def run(x: Tensor, params: Sequence[Tensor]) -> Tensor:
        y = torch.func.functional_call(layer, dict(zip(names, params)), (x,))
        for m in followers:
            y = m(y)
        return y

    return run


def _detached_inputs(x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    return x.detach().requires_grad_(True), [p.detach().requires_grad_(True) for p in params]


def _grads_or_zeros(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def tikhonov_direction(stage: Stage, params: Sequence[Tensor], x: Tensor,
                       dx: Tensor) -> list[Tensor]:
    """sum_i f_u^(i)T f_x^(i) dx^(i): the eps_vxx part of Q_ux dx, without eps and 1/B.

    For a Linear stage with an elementwise activation s this is
    sum_i (s'^2 * (W dx_i)) z_i^T (and the bias column).

    Args:
        stage: the stage function. params: its layer's parameters at the nominal values.
        x: the nominal stage input (B, ...). dx: the deviation (B, ...).

    Returns:
        One tensor per parameter, in the parameters' shapes.
    """
    with torch.enable_grad():
        x_, ps = _detached_inputs(x, params)
        y = stage(x_, ps)
        probe = torch.zeros_like(y, requires_grad=True)
        (vjp_x,) = torch.autograd.grad(y, x_, probe, create_graph=True)
        (jdx,) = torch.autograd.grad(vjp_x, probe, dx)  # f_x dx (double-vjp trick)
        return _grads_or_zeros(torch.autograd.grad(y, ps, jdx, allow_unused=True), ps)


def mixed_direction(stage: Stage, params: Sequence[Tensor], x: Tensor, dx: Tensor,
                    grad_y: Tensor) -> list[Tensor]:
    """(1/B) sum_i (V'_x^(i) . f_ux^(i)) dx^(i): the second-order dynamics part of Q_ux dx.

    The directional derivative, along dx, of the stage's weight gradient with the output
    gradient held at grad_y (the per-sample V'_x = B grad_y, so the 1/B cancels).

    Args:
        stage, params, x, dx: as :func:`tikhonov_direction`.
        grad_y: dL/dx_{t+1} of the mean loss at the stage's output.

    Returns:
        One tensor per parameter, in the parameters' shapes.
    """
    with torch.enable_grad():
        x_, ps = _detached_inputs(x, params)
        grads = torch.autograd.grad(stage(x_, ps), ps, grad_y, create_graph=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # others ignore x
        probes = [torch.zeros_like(grads[i], requires_grad=True) for i in live]
        vjp_x = torch.autograd.grad([grads[i] for i in live], x_, probes, create_graph=True,
                                    allow_unused=True)[0] if live else None
        out: list[Tensor | None] = [None] * len(ps)
        if vjp_x is not None and vjp_x.requires_grad:
            for i, d in zip(live, torch.autograd.grad(vjp_x, probes, dx, allow_unused=True)):
                out[i] = d
        return _grads_or_zeros(out, ps)


# ----------------------------------------------------------------------------- dense DDP


def per_sample_stage(stage: Stage, weight_shape: torch.Size, bias: bool,
                     in_shape: Sequence[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """The stage for one sample on flat vectors: (x (n,), u (m,)) -> x' (n',).

    u is the layer's matrix G = [W | b] flattened row-major (m = d_out * (d_in [+1])).
    """
    d_out = weight_shape[0]

    def fn(x: Tensor, u: Tensor) -> Tensor:
        w, b = split_gradient(u.reshape(d_out, -1), weight_shape, bias)
        return stage(x.reshape(1, *in_shape), [w] if b is None else [w, b]).reshape(-1)

    return fn


def dense_jacobians(fn: Callable[[Tensor, Tensor], Tensor], xs: Tensor,
                    u: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobians of a flat stage (:func:`per_sample_stage`) by autograd.

    Args:
        xs: (B, n) the samples' states. u: (m,) the control.

    Returns:
        (f_x (B, n', n), f_u (B, n', m)).
    """
    jac = torch.func.jacrev(fn, argnums=(0, 1))
    return torch.func.vmap(jac, in_dims=(0, None))(xs, u)


def dense_mixed(fn: Callable[[Tensor, Tensor], Tensor], xs: Tensor, u: Tensor,
                v: Tensor) -> Tensor:
    """Per-sample d^2 (v_i . f(x_i, u)) / du dx, the V'_x . f_ux term of Q_ux.

    Args:
        xs: (B, n). u: (m,). v: (B, n') the per-sample value gradients at the stage output.

    Returns:
        (B, m, n).
    """
    def contracted(x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return (w * fn(x, u)).sum()

    mixed = torch.func.jacrev(torch.func.jacrev(contracted, argnums=1), argnums=0)
    return torch.func.vmap(mixed, in_dims=(0, None, 0))(xs, u, v)


def psd_part(a: Tensor) -> Tensor:
    """The positive semi-definite part of symmetric matrices (..., n, n): negative
    eigenvalues set to zero."""
    lam, vec = torch.linalg.eigh(0.5 * (a + a.transpose(-1, -2)))
    return (vec * lam.clamp_min(0.0).unsqueeze(-2)) @ vec.transpose(-1, -2)


def gauss_newton_gains(f_x: Sequence[Tensor], f_u: Sequence[Tensor], z: Tensor,
                       precond: Sequence[Tensor | None], eps_vxx: float = 0.0,
                       correction: bool = False,
                       mixed: Sequence[Tensor] | None = None) -> list[Tensor]:
    """DDPNOpt's feedback gains, densely: the practical recursion with explicit matrices.

    Per sample, V_xx^(i) = z z^T at the output; backward over the stages,
    Q_ux = f_u^T (V'_xx + eps I) f_x (+ V'_x . f_ux), K^(i) = -P Q_ux / B,
    V_xx = f_x^T V'_xx f_x, or with the correction the PSD part of Q_xx - Q_xu P Q_ux
    (Q_ux here without eps). The stage update is u_t + k_t + sum_i K_t^(i) dx_t^(i).

    Args:
        f_x: per stage (B, n', n). f_u: per stage (B, n', m).
        z: (B, n_T) per-sample gradients of phi_i at the output.
        precond: per stage the base map P as a dense (m, m) matrix, or None (no feedback).
        eps_vxx: Tikhonov on V'_xx in Q_ux. correction: the V_xx correction.
        mixed: per stage (B, m, n) the V'_x . f_ux terms (DDPNOpt2nd), or None.

    Returns:
        Per stage the gains K, (B, m, n).
    """
    batch = z.shape[0]
    v_xx = z.unsqueeze(-1) * z.unsqueeze(-2)
    gains: list[Tensor] = [torch.empty(0)] * len(f_x)
    for t in reversed(range(len(f_x))):
        fx, fu_t, p = f_x[t], f_u[t].transpose(-1, -2), precond[t]
        q_ux = fu_t @ v_xx @ fx
        reg = q_ux + eps_vxx * (fu_t @ fx) + (mixed[t] if mixed is not None else 0.0)
        gains[t] = torch.zeros_like(reg) if p is None else -(p @ reg) / batch
        v_xx = fx.transpose(-1, -2) @ v_xx @ fx
        if correction and p is not None:
            v_xx = psd_part(v_xx - q_ux.transpose(-1, -2) @ p @ q_ux)
    return gains


#: vanilla DDP solves a stage in F_u's row space when its weights outnumber the rows this
#: many times (:func:`vanilla_ddp_gains`).
ROW_FORM_RATIO = 4


def vanilla_ddp_gains(f_x: Sequence[Tensor], jac_z: Sequence[Tensor], inputs: Sequence[Tensor],
                      v_x: Tensor, v_xx: Tensor, damping: float,
                      input_gain: bool = True) -> tuple[list[Tensor], list[Tensor | None]]:
    """Vanilla DDP on the batch's augmented state X = [x^(1); ...; x^(B)], for Linear stages.

    The loss (1/B) sum_i phi(x_T^(i)) has the value V_X = [v_x^(i)] / B and the exact
    V_XX = blockdiag(nabla^2 phi_i) / B; with F_X = blockdiag(f_x^(i)), F_u = [f_u^(i)],
    Q_uu = F_u^T V'_XX F_u + damping I, Q_uX = F_u^T V'_XX F_X, Q_u = F_u^T V'_X:
    k = -Q_uu^-1 Q_u, K = -Q_uu^-1 Q_uX, V_X = Q_X + Q_uX^T k, V_XX = Q_XX + Q_uX^T K
    (Gauss-Newton in the dynamics: no second derivatives of f). A Linear stage
    x' = s(z), z = [W | b] x~ has f_u^(i) = J^(i) (x) x~_i^T with J^(i) = ds/dz, so F_u is
    never formed: its products contract J and x~ separately. V_XX is dense after the first
    stage (the shared weights couple the samples): memory (B n)^2 per stage.

    A stage with several times more weights m than rows R = B n' of F_u (m > 4 R: a wide
    first layer, 784 inputs give m = 25k) is solved in the R-dimensional row space instead
    (:func:`_row_form`), so no m x m matrix is formed; otherwise Q_uu is factored once
    (Cholesky, the more robust of the two in float32) and the stage costs about
    2 m (B n)^2 + 2 m^2 B n + m^3 / 3 flops.

    Args:
        f_x: per stage (B, n', n) the state Jacobians J^(i) W.
        jac_z: per stage (B, n', d) the Jacobians of the stage output by the layer output z.
        inputs: per stage (B, q) the layer inputs x~ (with a column of ones for a bias), so
            m = d q and u = vec([W | b]) row-major.
        v_x: (B, n_T) per-sample gradients of phi_i. v_xx: (B, n_T, n_T) their Hessians.
        damping: Tikhonov on Q_uu (> 0).
        input_gain: False skips the first stage's K (returned as None) and the last V_XX
            update: its input is the data, so dX_0 = 0 and K_0 never acts.

    Returns:
        (k per stage (m,), K per stage (B, m, n) or None).
    """
    batch = v_x.shape[0]
    vx, vxx = v_x / batch, torch.block_diag(*v_xx) / batch
    ks: list[Tensor] = [torch.empty(0)] * len(f_x)
    gains: list[Tensor | None] = [None] * len(f_x)
    for t in reversed(range(len(f_x))):
        fx, jz, xt = f_x[t], jac_z[t], inputs[t]
        only_k = t == 0 and not input_gain
        wide = jz.shape[2] * xt.shape[1] > ROW_FORM_RATIO * batch * fx.shape[1]
        solve = _row_form if wide else _column_form
        ks[t], gains[t], vx, vxx = solve(fx, jz, xt, vx, vxx, damping, only_k)
    return ks, gains


def _column_form(fx: Tensor, jz: Tensor, xt: Tensor, vx: Tensor, vxx: Tensor, damping: float,
                 only_k: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One stage of :func:`vanilla_ddp_gains` with Q_uu (m, m) formed and Cholesky-factored.

    Args:
        fx: (B, n', n). jz: (B, n', d). xt: (B, q). vx: (B, n') V'_X. vxx: (B n', B n').
        only_k: return k alone (K and the new V_X, V_XX as None / unchanged).

    Returns:
        (k (m,), K (B, m, n) or None, V_X (B, n), V_XX (B n, B n)).
    """
    (batch, n_out, n_in), m = fx.shape, jz.shape[2] * xt.shape[1]
    # J^T V'_XX per sample pair: (B, d, B, n'); F_u^T V'_XX = its rows times x~
    jt_v = torch.einsum("ipa,ipjc->iajc", jz, vxx.reshape(batch, n_out, batch, n_out))
    q_u = torch.einsum("ipa,ip,ik->ak", jz, vx, xt).reshape(-1)
    m_ij = torch.einsum("iajc,jcb->iajb", jt_v, jz)
    q_uu = torch.einsum("ik,iajb,jl->akbl", xt, m_ij, xt).reshape(m, m)
    q_uu.diagonal().add_(damping)
    chol = torch.linalg.cholesky(q_uu)  # reads the lower triangle only
    if only_k:
        return -torch.cholesky_solve(q_u.unsqueeze(1), chol)[:, 0], None, vx, vxx
    q_ux = torch.einsum("ik,iajc,jcd->akjd", xt, jt_v, fx).reshape(m, batch * n_in)
    sol = torch.cholesky_solve(torch.cat([q_u.unsqueeze(1), q_ux], 1), chol)
    k, gain = -sol[:, 0], -sol[:, 1:]
    vx = torch.einsum("bo,boi->bi", vx, fx) + (q_ux.t() @ k).reshape(batch, n_in)
    vxx = torch.addmm(_block_congruence(vxx, fx), q_ux.t(), gain)
    return k, gain.reshape(m, batch, n_in).transpose(0, 1), vx, vxx


def _row_form(fx: Tensor, jz: Tensor, xt: Tensor, vx: Tensor, vxx: Tensor, damping: float,
              only_k: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One stage of :func:`vanilla_ddp_gains` in the row space of F_u (R = B n' rows).

    With G = F_u F_u^T (R, R) and M = damping I + V'_XX G, the push-through identity
    (damping I + F_u^T V' F_u)^-1 F_u^T = F_u^T M^-1 gives k = -F_u^T M^-1 V'_X and
    K = -F_u^T M^-1 V'_XX F_X, and since V'_XX G M^-1 = I - damping M^-1 the new values are
    V_X = damping F_X^T M^-1 V'_X and V_XX = damping F_X^T M^-1 V'_XX F_X: one R x R LU
    instead of an m x m Cholesky. G's blocks are (J^(i) J^(j)T) <x~_i, x~_j>.

    Args and returns: as :func:`_column_form`.
    """
    (batch, n_out, n_in), m = fx.shape, jz.shape[2] * xt.shape[1]
    rows = batch * n_out
    gram = torch.einsum("ipa,jca->ipjc", jz, jz) * (xt @ xt.t())[:, None, :, None]
    m_rows = vxx @ gram.reshape(rows, rows)
    m_rows.diagonal().add_(damping)
    lu = torch.linalg.lu_factor(m_rows)
    rhs = vx.reshape(rows, 1) if only_k else torch.cat([vx.reshape(rows, 1), vxx], 1)
    sol = torch.linalg.lu_solve(*lu, rhs)
    k = -torch.einsum("ipa,ip,ik->ak", jz, sol[:, 0].reshape(batch, n_out), xt).reshape(-1)
    if only_k:
        return k, None, vx, vxx
    s_v = sol[:, 1:]  # M^-1 V'_XX, symmetric
    s_fx = torch.einsum("rjc,jcd->rjd", s_v.reshape(rows, batch, n_out), fx)
    gain = -torch.einsum("ipa,ik,ipx->akx", jz, xt, s_fx.reshape(batch, n_out, -1))
    vx = damping * torch.einsum("bo,boi->bi", sol[:, 0].reshape(batch, n_out), fx)
    vxx = damping * _block_congruence(s_v, fx)
    return k, gain.reshape(m, batch, n_in).transpose(0, 1), vx, vxx


def _block_congruence(a: Tensor, f: Tensor) -> Tensor:
    """blockdiag(f)^T a blockdiag(f) without forming blockdiag(f).

    Args:
        a: (B n', B n'). f: (B, n', n).

    Returns:
        (B n, B n).
    """
    batch, n_out, n_in = f.shape
    a4 = a.reshape(batch, n_out, batch, n_out)
    left = torch.einsum("boi,bocp->bicp", f, a4)
    return torch.einsum("bicp,cpj->bicj", left, f).reshape(batch * n_in, batch * n_in)


def dense_update_pass(fns: Sequence[Callable[[Tensor, Tensor], Tensor]], us: Sequence[Tensor],
                      xs: Sequence[Tensor], ks: Sequence[Tensor],
                      gains: Sequence[Tensor | None]) -> list[Tensor]:
    """The update pass: u_t <- u_t + k_t + sum_i K_t^(i) (x_hat_t^(i) - x_t^(i)), stage by stage.

    Args:
        fns: per stage the flat per-sample function (:func:`per_sample_stage`).
        us: per stage the nominal control (m,). xs: per stage the nominal inputs (B, n).
        ks: per stage the feedforward step (m,). gains: per stage (B, m, n), or None for
            a stage whose feedback never acts (the first: its input is the data).

    Returns:
        The new controls, per stage (m,).
    """
    x_hat, out = xs[0], []
    for t, fn in enumerate(fns):
        u, gain = us[t] + ks[t], gains[t]
        if gain is not None:
            u = u + torch.einsum("bmn,bn->m", gain, x_hat - xs[t])
        out.append(u)
        if t + 1 < len(fns):
            x_hat = torch.func.vmap(fn, in_dims=(0, None))(x_hat, u)
    return out
