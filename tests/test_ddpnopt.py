"""DDPNOpt: the dense DDP oracle, the base optimizers, the Conv2d feedback, the torch contract."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import _batch, _reference, _step, _toy, _train
from torch import nn

from ocnode import MLPODEClassifier
from ocnode.optim import DDPNOpt, SNOpt, vanilla_ddp_step
from ocnode.optim import ddp_math as dm
from ocnode.optim.kfac_math import layer_gradient, split_gradient

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one intra-op thread."""


def _fcn(widths=(4, 5, 3, 3), seed=0, dtype=F64, act=nn.Tanh):
    """Linear stages with ``act`` between them (3 stages by default)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(act())
    return nn.Sequential(*mods).to(dtype)


def _cnn(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(2, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8, 3)).to(dtype)


# ----------------------------------------------------------------------------- the oracle

HPARAMS = {
    "sgd": dict(lr=0.3, momentum=0.5, weight_decay=1e-2),
    "rmsprop": dict(lr=0.03, momentum=0.5, weight_decay=1e-2, alpha=0.9, eps=1e-3),
    "adam": dict(lr=0.05, weight_decay=1e-2, betas=(0.8, 0.9), eps=1e-3),
    "ekfac": dict(lr=0.3, momentum=0.5, weight_decay=1e-2, alpha=0.8, eps_ekfac=0.1),
}


def _copy_state(opt, ref, ref_model):
    """Give ``ref`` (on a copy of the model ``opt`` trains) ``opt``'s state."""
    for p, q in zip(opt.model.parameters(), ref_model.parameters()):
        ref.state[q] = {k: torch.tensor(float(v)) if k == "step" else
                        v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    if isinstance(ref, SNOpt):
        ref.state["snopt"] = dict(opt.state["ddpnopt"])


def _dense_map(base, ref, layer, hp):
    """The base map P of one layer as a dense (m, m) matrix, from the reference's state."""
    st_w, st_b = ref.state[layer.weight], ref.state[layer.bias]
    lr, m = hp["lr"], layer.weight.numel() + layer.bias.numel()
    if base == "sgd":
        return lr * torch.eye(m, dtype=F64)
    if base == "ekfac":
        rot = torch.kron(st_w["basis_b"], st_w["basis_a"])
        return lr * rot @ torch.diag(1 / (st_w["m2"] + hp["eps_ekfac"]).reshape(-1)) @ rot.t()

    def diag(st):
        if base == "rmsprop":
            return lr / (st["square_avg"].sqrt() + hp["eps"])
        bc2 = 1 - hp["betas"][1] ** float(st["step"])
        return lr / (st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + hp["eps"])
    return torch.diag(layer_gradient(diag(st_w), diag(st_b)).reshape(-1))


def _split(model):
    """(prefix modules, stages): each Linear/Conv2d starts a stage's module list."""
    stages, prefix = [], []
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            stages.append([m])
        else:
            (stages[-1] if stages else prefix).append(m)
    return prefix, stages


def _dense_oracle(model, opt, base, hp, x, y, eps_vxx=0.0, correction=False,
                  second_order=False, feedback=True):
    """The new parameters by dense per-sample DDP, from ``model`` (a copy of the nominal net
    that ``opt`` trains): k from the reference base optimizer with ``opt``'s state."""
    prefix, stages = _split(model)
    xs, fns, us, h = [], [], [], nn.Sequential(*prefix)(x)
    for mods in stages:
        layer = mods[0]
        fns.append(dm.per_sample_stage(dm.stage_function(mods, ("weight", "bias")),
                                       layer.weight.shape, True, h.shape[1:]))
        us.append(layer_gradient(layer.weight, layer.bias).reshape(-1).detach().clone())
        xs.append(h.flatten(1).detach())
        h = nn.Sequential(*mods)(h)
    (z,) = torch.autograd.grad(F.cross_entropy(h, y, reduction="sum"), h)  # per-sample scale
    jac = [dm.dense_jacobians(fn, xt, u) for fn, xt, u in zip(fns, xs, us)]
    mixed = None
    if second_order:
        v, mixed = z, [None] * len(fns)
        for t in reversed(range(len(fns))):
            mixed[t] = dm.dense_mixed(fns[t], xs[t], us[t], v)
            v = torch.einsum("bon,bo->bn", jac[t][0], v)
    ref_model = copy.deepcopy(model)
    ref = _reference(base, ref_model, hp)
    _copy_state(opt, ref, ref_model)
    _step(ref_model, ref, x, y)
    _, ref_stages = _split(ref_model)
    ks = [layer_gradient(s[0].weight, s[0].bias).reshape(-1).detach() - u
          for s, u in zip(ref_stages, us)]
    maps = [_dense_map(base, ref, s[0], hp) for s in ref_stages]
    gains = dm.gauss_newton_gains([j[0] for j in jac], [j[1] for j in jac], z, maps, eps_vxx,
                                  correction, mixed)
    if not feedback:
        gains = [torch.zeros_like(g) for g in gains]
    return torch.cat(dm.dense_update_pass(fns, us, xs, ks, gains))


def _flat(model):
    return torch.cat([layer_gradient(s[0].weight, s[0].bias).reshape(-1)
                      for s in _split(model)[1]]).detach()


ORACLE_CASES = [(base, opts) for base in HPARAMS
                for opts in ({}, {"eps_vxx": 0.5}, {"vxx_correction": True})]
ORACLE_CASES += [("sgd", {"second_order": True}), ("adam", {"second_order": True}),
                 ("sgd", {"vxx_correction": True, "lr": 3.0})]


def _run_oracle(base, opts, net, make_batch):
    hp = {**HPARAMS[base], **{k: v for k, v in opts.items() if k == "lr"}}
    options = {k: v for k, v in opts.items() if k != "lr"}
    model = net()
    opt = DDPNOpt(model, base=base, update_freq=100, **hp, **options)
    for seed in (1, 2):  # warm up: momentum buffers, moments, EKFAC's factors
        _step(model, opt, *make_batch(seed))
    x, y = make_batch(3)
    nominal = copy.deepcopy(model)
    expected = _dense_oracle(nominal, opt, base, hp, x, y,
                             eps_vxx=options.get("eps_vxx", 0.0),
                             correction=options.get("vxx_correction", False),
                             second_order=options.get("second_order", False))
    base_only = _dense_oracle(nominal, opt, base, hp, x, y, feedback=False)
    plain = _dense_oracle(nominal, opt, base, hp, x, y)
    _step(model, opt, x, y)
    return _flat(model), expected, base_only, plain


@pytest.mark.parametrize("base,opts", ORACLE_CASES,
                         ids=[f"{b}-{'-'.join(o) or 'plain'}" for b, o in ORACLE_CASES])
def test_update_equals_the_dense_ddp_oracle(base, opts):
    got, expected, base_only, plain = _run_oracle(base, opts, _fcn, _batch)
    assert (got - expected).abs().max() < 1e-10
    assert (expected - base_only).abs().max() > 1e-4  # the feedback is not negligible
    if opts and set(opts) != {"lr"}:
        assert (expected - plain).abs().max() > 1e-7  # and neither is the option


def test_conv_net_update_equals_the_dense_ddp_oracle():
    got, expected, base_only, _ = _run_oracle("sgd", {}, _cnn,
                                              lambda s: _batch(s, n=3, d=36))
    assert (got - expected).abs().max() < 1e-10
    assert (expected - base_only).abs().max() > 1e-5


def test_vxx_correction_clamps_at_zero():
    r2 = dm.value_scale(torch.tensor([1.0, 0.5]), torch.tensor([3.0, 1.0]))
    assert torch.equal(r2, torch.tensor([0.0, 0.25]))


# ----------------------------------------------------------------------------- conv feedback


@pytest.mark.parametrize("padding", [1, "same"])
def test_conv_feedback_direction_equals_the_per_sample_reweighted_gradient(padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=1 if padding == "same" else 2, padding=padding,
                     dilation=2).double()
    features = conv(torch.zeros(1, 3, 7, 7, dtype=F64)).numel()
    head = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 5)).double()
    x = torch.randn(5, 3, 7, 7, dtype=F64, requires_grad=True)
    y = torch.randint(0, 5, (5,))
    h = conv(x)
    loss = F.cross_entropy(head[1:](h), y)
    gx, g = torch.autograd.grad(loss, (x, h))
    dx = torch.randn_like(x)
    fast = dm.feedback_direction(conv, x.detach(), g, dm.feedback_weights(gx, dx))
    brute = torch.zeros_like(fast)
    for i in range(5):  # per-sample autograd: q_u^(i), q_x^(i) of phi_i
        xi = x[i:i + 1].detach().requires_grad_(True)
        phi = F.cross_entropy(head(xi), y[i:i + 1])
        qx, qw, qb = torch.autograd.grad(phi, (xi, conv.weight, conv.bias))
        brute += (qx * dx[i:i + 1]).sum() * layer_gradient(qw, qb) / 5
    assert torch.allclose(fast, brute, atol=1e-12)
    rows = dm.per_sample_gradients(conv, x.detach(), g)  # their mean is the gradient
    assert torch.allclose(rows.mean(0), layer_gradient(*torch.autograd.grad(
        F.cross_entropy(head(x.detach()), y), (conv.weight, conv.bias))), atol=1e-12)


# ----------------------------------------------------------------------------- base optimizers


def _groups(model, lr):
    first = list(model[0].parameters())
    rest = [p for m in list(model)[1:] for p in m.parameters()]
    return [{"params": first, "lr": 2 * lr}, {"params": rest}]


def test_without_feedback_sgd_is_torch_sgd_bit_for_bit_with_groups_and_a_scheduler():
    model = _fcn((8, 12, 12, 4), dtype=torch.float32)
    ref = copy.deepcopy(model)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = DDPNOpt(model, feedback=False, params=_groups(model, 0.05), **hp)
    sgd = torch.optim.SGD(_groups(ref, 0.05), **hp)
    _train(model, opt, 6, sched=torch.optim.lr_scheduler.StepLR(opt, 2, 0.5))
    _train(ref, sgd, 6, sched=torch.optim.lr_scheduler.StepLR(sgd, 2, 0.5))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05 / 8)


@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_without_feedback_adaptive_bases_are_torchs(base):
    model = _fcn((8, 12, 12, 4), dtype=torch.float32)
    ref = copy.deepcopy(model)
    hp = dict(HPARAMS[base], lr=0.01)
    opt = DDPNOpt(model, base=base, feedback=False, **hp)
    _train(model, opt, 6)
    _train(ref, _reference(base, ref, hp), 6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("net", ["fcn", "cnn"])
def test_without_feedback_ekfac_is_snopts_full_ekfac(net):
    model = (_fcn((8, 12, 12, 4)) if net == "fcn" else
             nn.Sequential(nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 2, padding=1),
                           nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).double())
    ref = copy.deepcopy(model)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, eps=0.05, alpha=0.75, update_freq=3)
    eps = hp.pop("eps")
    opt = DDPNOpt(model, base="ekfac", feedback=False, eps_ekfac=eps, **hp)
    snopt = SNOpt(ref, eps=eps, full=True, factor_cost=None, **hp)  # every sample, as DDPNOpt
    _train(model, opt, 7)
    _train(ref, snopt, 7)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    assert "basis_a" in opt.state[model[-1].weight]


# ----------------------------------------------------------------------------- torch contract


@pytest.mark.parametrize("base,opts", [("sgd", {"momentum": 0.9}), ("rmsprop", {}),
                                       ("adam", {}), ("ekfac", {"update_freq": 2}),
                                       ("adam", {"eps_vxx": 0.1, "vxx_correction": True})])
def test_state_dict_round_trip_resumes_bit_identically(base, opts):
    model_a = _fcn((8, 12, 12, 4), dtype=torch.float32)
    opt_a = DDPNOpt(model_a, lr=0.01, base=base, **opts)
    _train(model_a, opt_a, 3)
    model_b = copy.deepcopy(model_a)
    opt_b = DDPNOpt(model_b, lr=0.01, base=base, **opts)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(model_a, opt_a, 4, seed=2)
    _train(model_b, opt_b, 4, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert opt_a.iteration == opt_b.iteration == 7


def test_non_finite_gradient_skips_the_step_and_keeps_the_state():
    model = _fcn((8, 12, 4), dtype=torch.float32)
    opt = DDPNOpt(model, lr=0.05, base="adam")
    _train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = _toy()
    opt.zero_grad()
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    for k, v in state["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(after[k][name]), torch.as_tensor(t))


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, "lr must be > 0"), ({"base": "lbfgs"}, "base must be one of"),
    ({"momentum": 1.0}, "momentum must be in"),
    ({"base": "adam", "momentum": 0.9}, "momentum is not used"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"betas": (0.9, 1.0)}, "betas must be"),
    ({"eps": 0.0}, "eps must be > 0"), ({"alpha": 1.5}, "alpha must be in"),
    ({"eps_ekfac": 0.0}, "eps_ekfac"), ({"update_freq": 0}, "update_freq"),
    ({"eps_vxx": -0.1}, "eps_vxx"), ({"feedback": False, "second_order": True}, "feedback"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPNOpt(_fcn(), **{"lr": 0.1, **kwargs})


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.inner(x)


def test_models_that_are_not_chains_raise():
    ode = MLPODEClassifier(4, 3, hidden=4)
    with pytest.raises(ValueError, match="use DGNOpt"):
        DDPNOpt(ode, lr=0.1)
    with pytest.raises(ValueError, match="holds parameters in submodules.*DGNOpt"):
        DDPNOpt(nn.Sequential(nn.Linear(4, 4), _Residual(), nn.Linear(4, 3)), lr=0.1)
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="used twice"):
        DDPNOpt(nn.Sequential(shared, nn.Tanh(), shared), lr=0.1)
    with pytest.raises(TypeError, match="takes the model"):
        DDPNOpt(_fcn().parameters(), lr=0.1)  # type: ignore[arg-type]


def test_unsupported_layers_warn_once_take_the_base_step_and_keep_their_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Unflatten(1, (1, 6)),
                          nn.Conv1d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(12, 4))
    with pytest.warns(UserWarning, match="no feedback policy") as caught:
        opt = DDPNOpt(model, lr=0.05)
    assert len(caught) == 1
    assert "1 (BatchNorm1d)" in str(caught[0].message)
    assert "4 (Conv1d)" in str(caught[0].message)
    x, y = _toy()
    bn_weight = model[1].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(3):
            ref = copy.deepcopy(model)
            ref(x[16 * k:16 * k + 16])  # the statistics after this step's forward alone
            _step(model, opt, x[16 * k:16 * k + 16], y[16 * k:16 * k + 16])
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(getattr(model[1], name), getattr(ref[1], name)), name
    assert not torch.equal(model[1].weight, bn_weight)


def test_dropout_draws_are_replayed_in_the_update_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    # only the last layer trains: with the same dropout mask dx is exactly 0, so the
    # update is exactly SGD's; a fresh mask would make dx (and the feedback) non-zero
    opt = DDPNOpt(model, lr=0.1, params=model[3].parameters())
    sgd = torch.optim.SGD(ref[3].parameters(), lr=0.1)
    x, y = _toy()
    torch.manual_seed(1)
    _step(model, opt, x[:16], y[:16])
    rng_after = torch.get_rng_state()
    torch.manual_seed(1)
    _step(ref, sgd, x[:16], y[:16])
    assert torch.equal(torch.get_rng_state(), rng_after)  # the update pass drew nothing
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_a_step_after_two_forwards_takes_the_base_step_and_warns_once():
    model = _fcn((8, 6, 4), dtype=torch.float32)
    ref = copy.deepcopy(model)
    opt = DDPNOpt(model, lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _toy()
    for m, o in ((model, opt), (ref, sgd)):
        o.zero_grad()
        (F.cross_entropy(m(x[:8]), y[:8]) + F.cross_entropy(m(x[8:16]), y[8:16])).backward()
        if o is opt:
            with pytest.warns(RuntimeWarning, match="exactly one forward"):
                o.step()
        else:
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adam", "ekfac"])
def test_a_few_dozen_steps_lower_the_loss(base):
    model = _fcn((8, 16, 16, 4), dtype=torch.float32)
    opt = DDPNOpt(model, lr={"sgd": 0.1, "adam": 0.01, "ekfac": 0.05}[base], base=base,
                  update_freq=10)
    losses = _train(model, opt, 40)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_max_feedback_ratio_bounds_each_layers_feedback_step():
    step, base = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(dm.clip_feedback(step, base, 2.0), step * 0.4)
    assert torch.equal(dm.clip_feedback(step, base, 10.0), step)
    x, y = _toy()
    runs = {}
    for ratio in (None, 1e3, 1e-9):
        model = _fcn((8, 12, 12, 4), dtype=F64)
        opt = DDPNOpt(model, lr=0.5, momentum=0.5, max_feedback_ratio=ratio)
        _train(model, opt, 3)
        runs[ratio] = torch.cat([p.reshape(-1) for p in model.parameters()])
    model = _fcn((8, 12, 12, 4), dtype=F64)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5), 3)
    sgd = torch.cat([p.reshape(-1) for p in model.parameters()]).detach()
    assert torch.equal(runs[None], runs[1e3])  # a loose bound changes nothing
    assert (runs[None] - sgd).abs().max() > 1e-3
    assert (runs[1e-9] - sgd).abs().max() < 1e-7  # a tight one leaves the base step
    with pytest.raises(ValueError, match="max_feedback_ratio"):
        DDPNOpt(_fcn(), lr=0.1, max_feedback_ratio=0.0)


def test_close_removes_the_hooks():
    model = _fcn((8, 6, 4), dtype=torch.float32)
    opt = DDPNOpt(model, lr=0.1)
    opt.close()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- vanilla DDP


def test_vanilla_ddp_on_one_linear_stage_is_a_damped_newton_step():
    model = _fcn((4, 3))
    x, y = _batch(0, n=6)
    u = layer_gradient(model[0].weight, model[0].bias).reshape(-1).detach()

    def loss(flat):
        w, b = split_gradient(flat.reshape(3, 5), model[0].weight.shape, True)
        return F.cross_entropy(F.linear(x, w, b), y)

    grad = torch.func.grad(loss)(u)
    hess = torch.func.hessian(loss)(u)
    expected = u - torch.linalg.solve(hess + 0.1 * torch.eye(15, dtype=F64), grad)
    vanilla_ddp_step(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                     damping=0.1)
    got = layer_gradient(model[0].weight, model[0].bias).reshape(-1)
    assert torch.allclose(got, expected, atol=1e-10)


def _dense_vanilla_gains(f_x, f_u, v_x, v_xx, damping):
    """The augmented-state recursion with every matrix formed: F_X = blockdiag(f_x^(i)),
    F_u stacked, V_XX dense, two LU solves (the oracle of the blockwise implementation)."""
    batch = v_x.shape[0]
    vx, vxx = v_x.reshape(-1) / batch, torch.block_diag(*v_xx) / batch
    ks, gains = [None] * len(f_x), [None] * len(f_x)
    for t in reversed(range(len(f_x))):
        big_fx, fu = torch.block_diag(*f_x[t]), f_u[t].reshape(-1, f_u[t].shape[-1])
        q_uu = fu.t() @ vxx @ fu + damping * torch.eye(fu.shape[1], dtype=F64)
        q_ux = fu.t() @ vxx @ big_fx
        k = -torch.linalg.solve(q_uu, fu.t() @ vx)
        gain = -torch.linalg.solve(q_uu, q_ux)
        vx = big_fx.t() @ vx + q_ux.t() @ k
        vxx = big_fx.t() @ vxx @ big_fx + q_ux.t() @ gain
        ks[t], gains[t] = k, gain.reshape(gain.shape[0], batch, -1).transpose(0, 1)
    return ks, gains


@pytest.mark.parametrize("n_in", [4, 25])
def test_vanilla_ddp_gains_equal_the_dense_augmented_state_recursion(n_in):
    gen = torch.Generator().manual_seed(3)
    batch = 5
    # three Linear stages n -> d -> n' (the middle one's follower changes the width: d != n');
    # the middle stage has over 4x more weights (m = 91) than rows (B n' = 15): solved in the
    # row space; the last fewer (8 < 10); the first 30 = 30 (n_in = 4) or 156 > 4 x 30 (n_in
    # = 25: with input_gain=False, the row space without a gain)
    shapes = [(n_in, 6, 6), (6, 13, 3), (3, 2, 2)]
    f_x, jac_z, inputs, f_u = [], [], [], []
    for n, d, n_out in shapes:
        jz = torch.randn(batch, n_out, d, generator=gen, dtype=F64)
        x_tilde = torch.cat([torch.randn(batch, n, generator=gen, dtype=F64),
                             torch.ones(batch, 1, dtype=F64)], 1)
        f_x.append(jz @ torch.randn(d, n, generator=gen, dtype=F64))
        jac_z.append(jz)
        inputs.append(x_tilde)
        # f_u^(i)[p, (a, k)] = J^(i)[p, a] x~_i[k]: u = vec([W | b]) row-major
        f_u.append(torch.einsum("ipa,ik->ipak", jz, x_tilde).reshape(batch, n_out, -1))
    v_x = torch.randn(batch, 2, generator=gen, dtype=F64)
    h = torch.randn(batch, 2, 2, generator=gen, dtype=F64)
    v_xx = h @ h.transpose(1, 2)
    ks, gains = dm.vanilla_ddp_gains(f_x, jac_z, inputs, v_x, v_xx, damping=0.3)
    ks_ref, gains_ref = _dense_vanilla_gains(f_x, f_u, v_x, v_xx, damping=0.3)
    for got, ref in zip(ks + gains, ks_ref + gains_ref):
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    # without the first stage's gain (its input is the data): the same steps, K_0 = 0
    ks, gains = dm.vanilla_ddp_gains(f_x, jac_z, inputs, v_x, v_xx, damping=0.3,
                                     input_gain=False)
    for got, ref in zip(ks + gains[1:], ks_ref + gains_ref[1:]):
        assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    assert gains[0] is None


def test_vanilla_ddp_refuses_a_cnn():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="fully connected"):
        vanilla_ddp_step(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))


def test_vanilla_ddp_lowers_the_loss_of_a_tiny_fcn():
    model = _fcn((4, 5, 5, 3))
    x, y = _batch(0, n=8)
    per_sample = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    losses = [vanilla_ddp_step(model, x, y, per_sample, damping=1.0) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="damping"):
        vanilla_ddp_step(model, x, y, per_sample, damping=0.0)
