"""Kronecker factors collected along the adjoint equal brute-force per-sample outer products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnode.curvature import FactorCollector, ODECurvatureObserver, check_layer, hook_layers
from ocnode.nn.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from solvers import odeint_adjoint

DT = 0.1


class LinearField(nn.Module):
    supports_batched_time = True

    def __init__(self) -> None:
        super().__init__()
        self.l1 = ConcatLinear(3, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(t, x)))


class SquashField(nn.Module):
    supports_batched_time = True

    def __init__(self) -> None:
        super().__init__()
        self.l1 = ConcatSquashLinear(3, 4)
        self.l2 = ConcatSquashLinear(4, 3)

    def forward(self, t, x):
        return self.l2(t, torch.tanh(self.l1(t, x)))


class ConvField(nn.Module):
    supports_batched_time = True

    def __init__(self) -> None:
        super().__init__()
        self.c1 = ConcatConv2d(2, 3, ksize=3, stride=2, padding=2, dilation=2)
        self.c2 = nn.ConvTranspose2d(3, 2, 2, stride=2)  # untracked: back to the input size

    def forward(self, t, x):
        y = self.c2(torch.relu(self.c1(t, x)))
        return y[..., : x.shape[-2], : x.shape[-1]]


def _manual_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches by explicit loops over output positions (independent of F.unfold)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (conv.kernel_size, conv.stride, conv.padding,
                                              conv.dilation)
    xp = F.pad(x, (pw, pw, ph, ph))
    h_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(h_out):
            for j in range(w_out):
                win = xp[b, :, i * sh: i * sh + dh * kh: dh, j * sw: j * sw + dw * kw: dw]
                rows.append(win.reshape(-1))
    return torch.stack(rows)


def _brute_force(func, modules, samples, batch, loss_batch=None):
    """Per-sample, per-time sums of outer products (ALGORITHM.md 1.5), one sample at a time.

    Averages over the first `batch` samples; the per-sample scale is loss_batch * dt.
    """
    loss_batch = loss_batch or batch
    a_sum = {m: 0.0 for m in modules}
    b_sum = {m: 0.0 for m in modules}
    for t, x, a in samples:
        per_a = {m: 0.0 for m in modules}
        per_b = {m: 0.0 for m in modules}
        for i in range(batch):
            rec: dict = {}
            handles = [m.register_forward_hook(
                lambda mod, inp, out, rec=rec: rec.__setitem__(mod, (inp[0], out)))
                for m in modules]
            with torch.enable_grad():
                out = func(torch.tensor(t, dtype=x.dtype), x[i:i + 1])
                grads = torch.autograd.grad((out * a[i:i + 1]).sum(),
                                            [rec[m][1] for m in modules])
            for h in handles:
                h.remove()
            for m, g in zip(modules, grads):
                inp = rec[m][0].detach()
                if isinstance(m, nn.Conv2d):
                    z = _manual_patches(inp, m)
                    gr = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
                else:
                    z, gr = inp.reshape(-1, inp.shape[-1]), g.reshape(-1, g.shape[-1])
                z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1) \
                    if m.bias is not None else z
                # rows of the same use are averaged; per-sample scale B*dt
                per_a[m] = per_a[m] + z.t() @ z / z.shape[0]
                gs = gr * (loss_batch * DT)
                per_b[m] = per_b[m] + gs.t() @ gs / gs.shape[0]
        for m in modules:
            a_sum[m] = a_sum[m] + per_a[m] / batch
            b_sum[m] = b_sum[m] + per_b[m] / batch
    return a_sum, b_sum


def _collect(func, x0, batched: bool, stats_batch=None):
    """Run an Euler adjoint whose steps coincide with the grid; return stats and samples."""
    modules = [m for m in func.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    collector = FactorCollector()
    obs = ODECurvatureObserver(func, modules, collector, batched_time=batched,
                               memory_budget=3 * x0.numel() * x0.element_size(),
                               stats_batch=stats_batch)
    samples = []

    def observer(t, x, a):
        samples.append((t, x.clone(), a.clone()))
        obs(t, x, a, DT)

    w = torch.randn_like(x0)
    ys = odeint_adjoint(func, x0, torch.tensor([0.0, 1.0], dtype=x0.dtype), method="euler",
                        options={"step_size": DT}, observer=observer, observer_dt=DT)
    ((ys[-1] * w).sum() / x0.shape[0]).backward()
    obs.flush()
    return collector.pop(), samples, modules


@pytest.mark.parametrize("field,shape", [(LinearField, (4, 3)), (SquashField, (4, 3)),
                                         (ConvField, (2, 2, 5, 5))])
@pytest.mark.parametrize("batched", [True, False])
def test_factors_equal_brute_force_per_sample_outer_products(field, shape, batched):
    torch.manual_seed(0)
    func = field().double()
    x0 = torch.randn(*shape, dtype=torch.float64)
    stats, samples, modules = _collect(func, x0, batched)
    assert len(samples) == 10 and [s[0] for s in samples] == pytest.approx(
        [1.0 - DT * k for k in range(10)])
    tracked = [m for m in modules if not (isinstance(m, nn.Linear) and m.in_features == 1)]
    a_ref, b_ref = _brute_force(func, tracked, samples, shape[0])
    for m in tracked:
        assert stats[m].uses == 10
        assert torch.allclose(stats[m].a_sum, a_ref[m], rtol=1e-10, atol=1e-12)
        assert torch.allclose(stats[m].b_sum, b_ref[m], rtol=1e-10, atol=1e-14)


def test_stats_batch_uses_the_first_samples_at_the_full_batch_scale():
    torch.manual_seed(0)
    func = LinearField().double()
    x0 = torch.randn(6, 3, dtype=torch.float64)
    stats, samples, modules = _collect(func, x0, batched=True, stats_batch=2)
    a_ref, b_ref = _brute_force(func, modules, samples, 2, loss_batch=6)
    for m in modules:
        assert torch.allclose(stats[m].a_sum, a_ref[m], rtol=1e-10, atol=1e-12)
        assert torch.allclose(stats[m].b_sum, b_ref[m], rtol=1e-10, atol=1e-14)
        assert stats[m].batch == 6


def test_batched_time_gives_t_layers_per_sample_rows():
    # The hyper-layers of ConcatSquashLinear see one row per sample when time is batched:
    # their factors are per-sample expectations, like every other layer's.
    torch.manual_seed(0)
    func = SquashField().double()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    stats, samples, _ = _collect(func, x0, batched=True)
    gate = func.l1._hyper_gate
    ts = torch.tensor([s[0] for s in samples], dtype=torch.float64)
    z = torch.stack([ts, torch.ones_like(ts)], 1)
    assert torch.allclose(stats[gate].a_sum, z.t() @ z)
    assert stats[gate].locations == 1 and stats[gate].batch == 4


def test_conv_locations_count_output_positions():
    torch.manual_seed(0)
    func = ConvField().double()
    stats, _, _ = _collect(func, torch.randn(2, 2, 5, 5, dtype=torch.float64), batched=True)
    conv = func.c1._layer
    assert stats[conv].locations == 3 * 3  # (5 + 4 - 4 - 1) // 2 + 1 = 3 per side


def test_statistics_accumulate_over_every_ode_call_of_an_iteration():
    torch.manual_seed(0)
    func = LinearField().double()
    modules = [func.l1._layer, func.l2]
    collector = FactorCollector()
    obs = ODECurvatureObserver(func, modules, collector, batched_time=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    for t0 in (0.0, 1.0, 2.0):  # an ODE-RNN calls the block once per interval
        t = torch.tensor([t0, t0 + 1.0], dtype=torch.float64)
        x = odeint_adjoint(func, x, t, method="euler", options={"step_size": DT},
                           observer=lambda t, x, a: obs(t, x, a, DT), observer_dt=DT)[-1]
    x.sum().backward()
    obs.flush()
    assert collector.pop()[func.l2].uses == 30


def test_ordinary_hooks_give_kfac_factors_of_a_plain_layer():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    collector = FactorCollector()
    handles = hook_layers([lin], collector)
    out = lin(x)
    (out**2).mean().backward()
    for h in handles:
        h.remove()
    st = collector.pop()[lin]
    z = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)
    g = 2 * out.detach() / out.numel() * 5  # d(mean)/d out, times the batch size
    assert torch.allclose(st.a_sum, z.t() @ z / 5)
    assert torch.allclose(st.b_sum, g.t() @ g / 5)


def test_ordinary_hooks_ignore_inner_derivatives_taken_in_the_forward():
    """A CNF's field differentiates its own layers (the Jacobian trace) with create_graph;
    those inner backward passes are not curvature samples of the loss."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    collector = FactorCollector()
    handles = hook_layers([lin], collector)
    out = torch.tanh(lin(x))
    (inner,) = torch.autograd.grad(out.sum(), x, create_graph=True)  # fires the output hook
    assert collector.stats == {}
    loss = (out**2).mean() + inner.square().mean()
    loss.backward()
    for h in handles:
        h.remove()
    st = collector.pop()[lin]
    assert st.uses == 1
    lin_out = lin(x).detach().requires_grad_(True)
    out2 = torch.tanh(lin_out)
    (inner2,) = torch.autograd.grad(out2.sum(), lin_out, create_graph=True)
    g = torch.autograd.grad((out2**2).mean() + (inner2 @ lin.weight).square().mean(),
                            lin_out)[0] * 5
    assert torch.allclose(st.b_sum, g.t() @ g / 5)


def test_grouped_convolutions_are_rejected_with_advice():
    with pytest.raises(ValueError, match="groups=2"):
        check_layer(nn.Conv2d(4, 4, 3, groups=2))
