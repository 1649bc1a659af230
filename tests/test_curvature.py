"""Kronecker factors collected along the adjoint equal brute-force per-sample outer products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnode.curvature import (
    LAYER_HELPERS,
    CurvatureCollector,
    FactorAccumulator,
    KFACHooks,
    ODEObserver,
    ODEStageObserver,
    check_layer,
    helper_for,
    input_rows,
    output_rows,
    register_layer,
)
from ocnode.nn import MLPODEFunc, ODEBlock
from ocnode.nn.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from solvers import SolverSpec, odeint_adjoint

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
    """Per-sample, per-time sums of outer products, one sample at a time.

    Averages over the first `batch` samples; the per-sample scale is loss_batch * weight.
    """
    loss_batch = loss_batch or batch
    a_sum = {m: 0.0 for m in modules}
    b_sum = {m: 0.0 for m in modules}
    for t, x, a, weight in samples:
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
                gs = gr * (loss_batch * weight)
                per_b[m] = per_b[m] + gs.t() @ gs / gs.shape[0]
        for m in modules:
            a_sum[m] = a_sum[m] + per_a[m] / batch
            b_sum[m] = b_sum[m] + per_b[m] / batch
    return a_sum, b_sum


class _Recorder:
    """An observer that keeps a copy of every sample and forwards it to the real one."""

    def __init__(self, obs: ODEObserver) -> None:
        self.obs, self.samples = obs, []

    def __call__(self, t, x, a, weight):
        self.samples.append((t, x.clone(), a.clone(), weight))
        self.obs(t, x, a, weight)

    def finish(self):
        self.obs.finish()


def _collect(func, x0, batched: bool, stats_batch=None, budget=None):
    """Run an Euler adjoint whose steps coincide with the grid; return stats and samples."""
    modules = [m for m in func.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sums = FactorAccumulator()
    budget = budget or 3 * x0.numel() * x0.element_size()
    obs = _Recorder(ODEObserver(func, modules, sums, batched_time=batched,
                                memory_budget=budget, stats_batch=stats_batch))
    w = torch.randn_like(x0)
    ys = odeint_adjoint(func, x0, torch.tensor([0.0, 1.0], dtype=x0.dtype), method="euler",
                        options={"step_size": DT}, observer=obs, observer_dt=DT)
    ((ys[-1] * w).sum() / x0.shape[0]).backward()  # the solve's finish() evaluates the rest
    return sums.pop(), obs.samples, modules


@pytest.mark.parametrize("field,shape", [(LinearField, (4, 3)), (SquashField, (4, 3)),
                                         (ConvField, (2, 2, 5, 5))])
@pytest.mark.parametrize("batched", [True, False])
def test_factors_equal_brute_force_per_sample_outer_products(field, shape, batched):
    torch.manual_seed(0)
    func = field().double()
    x0 = torch.randn(*shape, dtype=torch.float64)
    stats, samples, modules = _collect(func, x0, batched)
    assert len(samples) == 11 and [s[0] for s in samples] == pytest.approx(
        [1.0 - DT * k for k in range(11)])
    assert [s[3] for s in samples] == pytest.approx([DT / 2] + [DT] * 9 + [DT / 2])
    tracked = [m for m in modules if not (isinstance(m, nn.Linear) and m.in_features == 1)]
    _assert_brute_force(stats, func, tracked, samples, shape[0])


def _assert_brute_force(stats, func, modules, samples, batch):
    """Each module's factors equal :func:`_brute_force`'s, from every sample."""
    a_ref, b_ref = _brute_force(func, modules, samples, batch)
    for m in modules:
        assert stats[m].uses == len(samples)
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
    sums = FactorAccumulator()
    obs = ODEObserver(func, modules, sums, batched_time=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    for t0 in (0.0, 1.0, 2.0):  # an ODE-RNN calls the block once per interval
        t = torch.tensor([t0, t0 + 1.0], dtype=torch.float64)
        x = odeint_adjoint(func, x, t, method="euler", options={"step_size": DT},
                           observer=obs, observer_dt=DT)[-1]
    x.sum().backward()
    assert sums.pop()[func.l2].uses == 33  # 11 nodes per call


def test_ordinary_hooks_give_kfac_factors_of_a_plain_layer():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    sums = FactorAccumulator()
    hooks = KFACHooks([lin], sums)
    out = lin(x)
    (out**2).mean().backward()
    hooks.remove()
    st = sums.pop()[lin]
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
    sums = FactorAccumulator()
    hooks = KFACHooks([lin], sums)
    out = torch.tanh(lin(x))
    (inner,) = torch.autograd.grad(out.sum(), x, create_graph=True)  # fires the output hook
    assert sums.stats == {}
    loss = (out**2).mean() + inner.square().mean()
    loss.backward()
    hooks.remove()
    st = sums.pop()[lin]
    assert st.uses == 1
    lin_out = lin(x).detach().requires_grad_(True)
    out2 = torch.tanh(lin_out)
    (inner2,) = torch.autograd.grad(out2.sum(), lin_out, create_graph=True)
    g = torch.autograd.grad((out2**2).mean() + (inner2 @ lin.weight).square().mean(),
                            lin_out)[0] * 5
    assert torch.allclose(st.b_sum, g.t() @ g / 5)


def test_unsupported_convolutions_are_rejected_with_advice():
    with pytest.raises(ValueError, match="groups=2"):
        check_layer(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="exclude"):
        check_layer(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        check_layer(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))


# ---- layer helpers ------------------------------------------------------------------------


def test_linear_rows_take_every_leading_dimension():
    lin = nn.Linear(3, 2)
    x, g = torch.randn(4, 5, 3), torch.randn(4, 5, 2)
    assert torch.equal(input_rows(lin, x), x.reshape(20, 3))
    assert torch.equal(output_rows(lin, g), g.reshape(20, 2))


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                    dict(padding="same"), dict(padding="valid", bias=False)])
def test_conv_rows_are_the_patches_of_each_output_location(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, **kwargs).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    z = input_rows(conv, x)
    if isinstance(conv.padding, str):  # 'same'/'valid': compare with explicit padding
        pad = conv._reversed_padding_repeated_twice
        ref = nn.Conv2d(2, 3, 3, padding=(pad[2], pad[0])).double()
        assert torch.equal(z, _manual_patches(x, ref))
    else:
        assert torch.equal(z, _manual_patches(x, conv))
    out = conv(x)
    # the patch rows times the flattened weight are the output rows
    rows = z @ conv.weight.reshape(3, -1).t()
    if conv.bias is not None:
        rows = rows + conv.bias
    assert torch.allclose(rows, output_rows(conv, out), atol=1e-12)


def test_a_new_layer_type_needs_one_helper_and_subclasses_inherit_theirs():
    class Scale(nn.Module):
        """y = x * w, one weight per feature (a made-up layer type)."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 1))
            self.bias = None

        def forward(self, x):
            return x * self.weight[:, 0]

    class ScaleHelper:
        def check(self, module):
            pass

        def input_rows(self, module, x):
            return x.reshape(-1, 1)

        def output_rows(self, module, g):
            return g.reshape(-1, 1)

        def has_bias(self, module):
            return False

    class MyLinear(nn.Linear):
        pass

    assert helper_for(MyLinear(2, 2)) is LAYER_HELPERS[nn.Linear]
    assert helper_for(Scale()) is None
    try:
        register_layer(Scale, ScaleHelper())
        model = nn.Sequential(Scale(), nn.Tanh())
        collector = CurvatureCollector(model, full=True)
        assert list(collector.layers) == [model[0]]
    finally:
        del LAYER_HELPERS[Scale]
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(int, ScaleHelper())


class ScalarTimeField(nn.Module):
    """A field as users write it: a scalar t, made a column of the input (no per-row time);
    counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.calls = nn.Linear(4, 5), nn.Linear(5, 3), 0

    def forward(self, t, x):
        self.calls += 1
        tt = t * torch.ones(x.shape[0], 1, dtype=x.dtype)
        return self.l2(torch.tanh(self.l1(torch.cat([x, tt], 1))))


class FloatTimeField(ScalarTimeField):
    """float(t): a field that torch.func.vmap cannot batch."""

    def forward(self, t, x):
        return super().forward(torch.tensor(float(t), dtype=x.dtype), x)


def test_scalar_time_fields_are_batched_with_vmap_and_equal_brute_force():
    torch.manual_seed(0)
    func = ScalarTimeField().double()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    stats, samples, modules = _collect(func, x0, batched=False, budget=1e9)
    # 10 Euler steps forward and 10 backward, then the first sample alone (it measures the
    # layer calls) and the other ten in one vmapped call
    assert len(samples) == 11 and func.calls == 20 + 2
    _assert_brute_force(stats, func, modules, samples, 4)


def test_a_field_vmap_cannot_batch_is_called_per_sample_with_one_warning():
    torch.manual_seed(0)
    func = FloatTimeField().double()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="vmap") as record:
        stats, samples, modules = _collect(func, x0, batched=False, budget=1e9)
    assert len([w for w in record if "vmap" in str(w.message)]) == 1
    assert func.calls == 20 + 1 + 10  # the solves, the first sample, the rest one by one
    _assert_brute_force(stats, func, modules, samples, 4)


def test_a_smaller_batch_keeps_vmap_batching(recwarn):
    func = ScalarTimeField().double()
    sums = FactorAccumulator()
    obs = ODEObserver(func, [func.l1, func.l2], sums, memory_budget=1e9)
    for rows in (4, 3):  # e.g. an epoch's smaller last batch
        x, a = torch.randn(rows, 3, dtype=torch.float64), torch.randn(rows, 3, dtype=torch.float64)
        for k in range(4):
            obs(0.1 * k, x, a, 0.1)
        obs.finish()
    # per batch shape: the first sample alone (evaluated at once), then three in one call
    assert func.calls == 4 and sums.stats[func.l2].uses == 8
    assert not [w for w in recwarn if "vmap" in str(w.message)]


def test_the_memory_budget_counts_what_an_evaluation_holds():
    func = ScalarTimeField().double()
    sums = FactorAccumulator()
    x, a = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    # float64 bytes of one sample: the graph saves l1's input (4x4) and tanh's output (4x5,
    # which l2 saves as its input too: counted once; the weights are parameters: not
    # counted); the factor rows are each layer's input rows (l1 4x4, l2 4x5) and its output
    # gradient twice (l1 4x5, l2 4x3); the buffer holds x and a (4x3 each)
    saved, rows, buffered = 16 + 20, (16 + 2 * 20) + (20 + 2 * 12), 2 * 12
    per_sample = 8 * (saved + rows + buffered)
    obs = ODEObserver(func, [func.l1, func.l2], sums, memory_budget=3.5 * per_sample)
    obs(0.5, x, a, 0.1)  # unmeasured: the first sample is evaluated alone, at once
    assert obs.pending == 0 and obs.sample_bytes == per_sample
    for k in range(3):
        obs(0.1 * k, x, a, 0.1)
    assert obs.pending == 0 and sums.stats[func.l2].uses == 4  # the third filled the chunk


# ---- the observer protocol ----------------------------------------------------------------


def test_observer_buffers_until_finish_and_weighs_each_sample_of_a_chunk():
    torch.manual_seed(0)
    func = LinearField().double()
    sums, alone = FactorAccumulator(), FactorAccumulator()
    obs = ODEObserver(func, [func.l2], sums, batched_time=True)
    one = ODEObserver(func, [func.l2], alone, batched_time=True)
    x, a = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    obs(0.9, x, a, 0.1)  # the first sample is evaluated at once: it measures the chunk size
    assert obs.pending == 0 and sums.pop()[func.l2].uses == 1
    for t, w in ((0.5, 0.1), (0.4, 0.1), (0.2, 0.2)):
        obs(t, x, a, w)
        one(t, x, a, w)
        one.finish()  # one sample at a time
    assert sums.stats == {} and obs.pending == 3
    obs.finish()  # one chunk of three samples of two weights
    assert sums.stats[func.l2].uses == 3 and obs.pending == 0
    for key in ("a_sum", "b_sum"):
        assert torch.allclose(getattr(sums.stats[func.l2], key),
                              getattr(alone.stats[func.l2], key), rtol=1e-12)
    obs.listen(False)
    obs(0.1, x, a, 0.1)
    obs.finish()
    assert sums.stats[func.l2].uses == 3
    obs.listen(True)
    obs(0.1, x, a, 0.1)
    obs.discard()
    obs.finish()
    assert sums.pop()[func.l2].uses == 3


class _SeesAdjoint(nn.Module):
    """Wraps a field; records (t, x, a) of every evaluation made with grad (the adjoint's)."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func, self.seen = func, []

    def forward(self, t, x):
        out = self.func(t, x)
        if out.requires_grad:
            entry = [float(t), x.detach().clone(), None]
            out.register_hook(lambda g: entry.__setitem__(2, -g.detach().clone()))
            self.seen.append(entry)
        return out


@pytest.mark.parametrize("field,shape", [(LinearField, (4, 3)), (ConvField, (2, 2, 5, 5))])
def test_stage_factors_equal_the_grid_observers_at_the_evaluated_states(field, shape):
    # Euler with steps on the grid: one evaluation per step, at its start, weight = the step.
    # Fed the same (t, x, a, weight), the grid observer's factors are the reference.
    torch.manual_seed(0)
    func = _SeesAdjoint(field().double())
    modules = [m for m in func.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    stage_sums, grid_sums = FactorAccumulator(), FactorAccumulator()
    obs = ODEStageObserver(modules, stage_sums, factor_cost=1e9)  # every sample
    x0 = torch.randn(*shape, dtype=torch.float64)
    ys = odeint_adjoint(func, x0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                        method="euler", options={"step_size": DT}, observer=obs)
    ((ys[-1] * torch.randn_like(x0)).sum() / shape[0]).backward()
    obs.close()
    assert len(func.seen) == 10 and obs.pending == 0
    ref = ODEObserver(func.func, modules, grid_sums)
    for t, x, a in func.seen:
        ref(t, x, a, DT)
    ref.finish()
    stages, grid = stage_sums.pop(), grid_sums.pop()
    for m in modules:
        assert stages[m].uses == grid[m].uses
        assert (stages[m].locations, stages[m].batch) == (grid[m].locations, grid[m].batch)
        assert torch.allclose(stages[m].a_sum, grid[m].a_sum, rtol=1e-10, atol=1e-12)
        assert torch.allclose(stages[m].b_sum, grid[m].b_sum, rtol=1e-10, atol=1e-14)


def test_stage_stats_batch_uses_the_first_samples_at_the_full_batch_scale():
    torch.manual_seed(0)
    func = _SeesAdjoint(LinearField().double())
    lin = func.func.l2
    x0 = torch.randn(6, 3, dtype=torch.float64)
    sums = []
    for x, stats_batch in ((x0, 2), (x0[:2], None)):
        acc = FactorAccumulator()
        obs = ODEStageObserver([lin], acc, factor_cost=None, stats_batch=stats_batch)
        ys = odeint_adjoint(func, x, torch.tensor([0.0, 1.0], dtype=torch.float64),
                            method="euler", options={"step_size": DT}, observer=obs)
        (ys[-1].sum() / 6).backward()  # both losses: sums over rows / 6, a batch of 6
        obs.close()
        sums.append(acc.pop()[lin])
    first, alone = sums
    assert first.batch == 6 and alone.batch == 2
    assert torch.allclose(first.a_sum, alone.a_sum, rtol=1e-12)
    # the same rows' gradients, at the per-sample scale of a batch of 6 vs 2
    assert torch.allclose(first.b_sum, alone.b_sum * 9, rtol=1e-10)


def test_stage_factors_from_a_window_of_the_batch_are_unbiased_means():
    # Each evaluation forms A and B from a few samples of the batch (a window that moves on
    # at every evaluation); over the evaluations the means match those of every sample.
    torch.manual_seed(0)
    func = _SeesAdjoint(LinearField().double())
    lin = func.func.l2
    full_sums, sub_sums = FactorAccumulator(), FactorAccumulator()
    x0 = torch.randn(64, 3, dtype=torch.float64)
    for sums, cost in ((full_sums, 1e9), (sub_sums, 0.05)):
        obs = ODEStageObserver([lin], sums, factor_cost=cost)
        ys = odeint_adjoint(func, x0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                            method="euler", options={"step_size": 1 / 64}, observer=obs)
        (ys[-1].sum() / 64).backward()
        obs.close()
    full, sub = full_sums.pop()[lin], sub_sums.pop()[lin]
    assert sub.uses == full.uses == 64 and sub.batch == full.batch == 64
    assert torch.allclose(sub.a_factor, full.a_factor, rtol=0.15, atol=0.02)
    assert torch.allclose(sub.b_factor, full.b_factor, rtol=0.15, atol=1e-3)
    assert not torch.allclose(sub.a_factor, full.a_factor, rtol=1e-6)  # a subsample indeed


def test_observer_weight_scales_b_like_the_grid_spacing():
    torch.manual_seed(0)
    func = LinearField().double()
    x, a = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    out = []
    for weight in (0.1, 0.3):
        sums = FactorAccumulator()
        obs = ODEObserver(func, [func.l2], sums)
        obs(0.5, x, a, weight)
        obs.finish()
        out.append(sums.pop()[func.l2])
    assert torch.equal(out[0].a_sum, out[1].a_sum)
    assert torch.allclose(out[1].b_sum, 9 * out[0].b_sum, rtol=1e-12)


# ---- the collector ------------------------------------------------------------------------


FAST = SolverSpec(method="rk4", options={"step_size": 0.25})


class _Net(nn.Module):
    """stem -> adjoint block -> backprop block -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.ode = ODEBlock(MLPODEFunc(4, 6), solver=FAST)
        self.bp = ODEBlock(MLPODEFunc(4, 5), solver=FAST.replace(adjoint=False))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bp(self.ode(self.stem(x))))


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_collector_finds_where_each_layers_factors_come_from():
    torch.manual_seed(0)
    model = _Net()
    field = [m for m in model.ode.func.modules() if isinstance(m, nn.Linear)]
    bp = [m for m in model.bp.func.modules() if isinstance(m, nn.Linear)]
    collector = CurvatureCollector(model)
    assert list(collector.layers) == field + bp
    assert [mods for _, mods in collector._observed] == [field]
    full = CurvatureCollector(model, full=True, exclude=[model.bp])
    assert list(full.layers) == field + [model.stem, model.head]
    assert full.uncovered == []  # excluded parameters are not reported
    assert collector.layers[field[0]].shape == (6, 4 + 1 + 1)  # ConcatLinear: t, bias


def test_collection_is_alive_only_while_armed_and_pop_hands_out_the_factors():
    torch.manual_seed(0)
    model = _Net()
    collector = CurvatureCollector(model, full=True)
    x = torch.randn(5, 3)
    assert not collector.armed and model.ode.observer is None and _forward_hooks(model) == 0
    collector.arm()
    assert collector.armed and model.ode.observer is not None and _forward_hooks(model) > 0
    model(x).square().sum().backward()
    stats = collector.pop()
    assert set(stats) == set(collector.layers)
    collector.disarm()
    assert model.ode.observer is None and _forward_hooks(model) == 0
    model(x).square().sum().backward()  # not armed: nothing, also from stale output hooks
    assert collector.pop() == {}


@pytest.mark.parametrize("curvature", ["grid", "stages"])
def test_discard_drops_factors_and_the_samples_of_an_unfinished_solve(curvature):
    torch.manual_seed(0)
    model = _Net()
    collector = CurvatureCollector(model, full=True, curvature=curvature)
    collector.arm()
    model(torch.randn(5, 3)).square().sum().backward()
    collector.discard()
    assert collector.pop() == {}
    obs = collector._observers[0]
    if curvature == "grid":
        obs(0.5, torch.randn(5, 4), torch.randn(5, 4), 0.01)  # a solve that never finished
    else:
        with obs.evaluation(0.5):  # an evaluation whose step was never accepted
            pass
    assert obs.pending == 1
    assert collector.pop() == {} and obs.pending == 0


def test_exclude_lets_an_unsupported_layer_stay_in_the_model():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="groups=2"):
        CurvatureCollector(model, full=True)
    collector = CurvatureCollector(model, full=True, exclude={model[0]})
    assert list(collector.layers) == [model[1]]
    with pytest.raises(TypeError, match="exclude"):
        CurvatureCollector(model, full=True, exclude=[model[0].weight])


def test_uncovered_vector_field_parameters_are_named():
    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.conv = nn.Conv1d(1, 1, 3, padding=1)
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, t, x):
            return self.gain * torch.tanh(self.lin(x)) + self.conv(x[:, None])[:, 0]

    model = nn.Sequential(ODEBlock(Field(), solver=FAST))
    collector = CurvatureCollector(model)
    assert collector.uncovered == ["0.func.gain", "0.func.conv.weight", "0.func.conv.bias"]


def test_bad_collector_settings_raise_clear_errors():
    model = _Net()
    for kwargs, match in [({"fisher": "exact"}, "fisher"), ({"observer_dt": 0.0}, "observer_dt"),
                          ({"stats_batch": 0}, "stats_batch"),
                          ({"memory_budget": 0}, "memory_budget")]:
        with pytest.raises(ValueError, match=match):
            CurvatureCollector(model, **kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        CurvatureCollector(model.parameters())


@pytest.mark.parametrize("start", [0, 3, 8, 13, 27])
@pytest.mark.parametrize("count", [1, 4, 9, 10, 12])
def test_a_factor_window_takes_consecutive_rows_wrapping_around(start, count):
    from ocnode.curvature.factors import window

    x = torch.arange(20.0).reshape(10, 2)
    expected = x if count >= 10 else x[[(start + i) % 10 for i in range(count)]]
    assert torch.equal(window(x, start, count), expected)


def test_output_gradients_kept_as_their_product_give_the_same_factors_as_rows():
    from ocnode.curvature.factors import GRAM_RATIO, Rows

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    # two uses of 2 samples x 36 locations: 72 rows of width 4 (>= GRAM_RATIO x 4) -> product
    # one use of a Linear-like narrow window: 3 rows of width 4 (< GRAM_RATIO x 4) -> rows
    xs = [torch.randn(2, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(2, 4, 6, 6, dtype=torch.float64) for _ in range(3)]
    weights = [0.25, 0.5, 0.125]

    def use(k: int, narrow: bool) -> Rows:
        rows = Rows(conv, input_rows(conv, xs[k]), batch=2, locations=36, weight=weights[k])
        g = output_rows(conv, gs[k])
        rows.fill(g[:3] if narrow else g)
        return rows

    uses = [use(0, False), use(1, False), use(2, True)]
    assert 72 >= GRAM_RATIO * 4 > 3
    assert uses[0].g is None and uses[0].g_gram is not None and uses[0].g_count == 72
    assert uses[2].g is not None and uses[2].g_gram is None
    assert uses[0].nbytes == (72 * 27 + 4 * 4) * 8
    acc = FactorAccumulator()
    acc.add_rows(uses)
    stats = acc.pop()[conv]

    # brute force: B_u = mean over its rows of (B w_u g)(B w_u g)^T
    expected_b = torch.zeros(4, 4, dtype=torch.float64)
    for k in range(len(uses)):
        g = output_rows(conv, gs[k])[:3] if k == 2 else output_rows(conv, gs[k])
        expected_b += (2 * weights[k]) ** 2 * g.T @ g / g.shape[0]
    assert torch.allclose(stats.b_sum, expected_b, rtol=1e-12, atol=0)
    z = [torch.cat([input_rows(conv, x), torch.ones(72, 1, dtype=torch.float64)], 1)
         for x in xs]
    assert torch.allclose(stats.a_sum, sum(zz.T @ zz / 72 for zz in z), rtol=1e-12, atol=0)
    assert stats.uses == 3


def test_the_memory_budget_counts_a_conv_fields_unfolded_patches_and_graph():
    from ocnode.curvature.observer import _factor_row_bytes

    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(5, 2, 4, 4)
    out = conv(x)
    # 5 samples x 16 locations rows of 2*3*3 = 18 inputs, the output gradient (5x3x4x4) twice
    assert _factor_row_bytes([(conv, x, out)]) == 4 * (80 * 18 + 2 * 240)
    field = ConcatConv2d(2, 2, 3, padding=1)
    obs = ODEObserver(field, [field._layer], FactorAccumulator())
    obs(0.5, x, torch.randn_like(x), 0.1)
    # more than the layer's own input and output: the unfolded patches are 9x the input
    assert obs.sample_bytes > 4 * 5 * 16 * (3 * 9 + 2 * 2)
