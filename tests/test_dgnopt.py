"""DGNOpt and ocnode.Residual: the dense augmented-state oracle, DDPNOpt on chains, BatchNorm,
projection shortcuts, the torch contract, the structures it refuses, and the command line."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import _batch, _reference, _step, _toy, _train
from torch import nn

from ocnode import DDPNOpt, DGNOpt, Residual, SNOpt
from ocnode.optim import ddp_math as dm
from ocnode.optim.kfac_math import layer_gradient, split_gradient
from ocnode.training import TrainConfig
from ocnode.training.cli import main
from ocnode.training.optimizers import OPTIMIZERS, build_optimizer
from ocnode.training.tasks import TaskSettings, make_task

F64 = torch.float64
LAYERS = (nn.Linear, nn.Conv2d)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one intra-op thread."""


def _mlp(seed=0, dtype=F64):
    """Stage, identity block, projection block (Linear shortcut), stage."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(),
        Residual(nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))), nn.Tanh(),
        Residual(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
                 shortcut=nn.Linear(5, 3)), nn.Tanh(),
        nn.Linear(3, 3)).to(dtype)


def _conv(seed=0, dtype=F64):
    """Conv stage, a strided block with a 1x1 conv projection, flatten, Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
        Residual(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                               nn.Conv2d(3, 3, 3, padding=1)),
                 shortcut=nn.Conv2d(2, 3, 1, stride=2)), nn.Tanh(),
        nn.Flatten(), nn.Linear(27, 3)).to(dtype)


def _bn_net(seed=0):
    """A small ResNet block stack with BatchNorm in the body and in the shortcut."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                               nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                               nn.BatchNorm2d(4))), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1)),
                 shortcut=nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False),
                                        nn.BatchNorm2d(6))), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


# ----------------------------------------------------------------------------- the oracle
#
# The net is rewritten as a chain of per-sample transitions of an augmented state. FNE: a
# block's entry copies x into (h, r); each body layer maps (h, r) -> (f(h, u), r); each
# shortcut layer maps (h_m, s) -> (h_m, g(s, u)); the exit gives post(h_m + s). GR: a block
# is one transition x -> y whose control is all of its layers. Dense per-sample Jacobians
# and ddp_math.gauss_newton_gains (the rank-one Gauss-Newton recursion with explicit
# matrices) then give the gains, and dense_update_pass the new controls.


def _branch(module):
    """A branch's stages as module lists, each starting with its layer."""
    mods = [m for m in (module if isinstance(module, nn.Sequential) else [module])
            if not isinstance(m, nn.Identity)]
    stages: list[list[nn.Module]] = []
    for m in mods:
        if isinstance(m, LAYERS):
            stages.append([m])
        else:
            stages[-1].append(m)
    return stages


def _nodes(model):
    """(prefix, nodes): ("stage", modules) or ("block", Residual, post modules)."""
    prefix, nodes = [], []
    for m in model:
        if isinstance(m, Residual):
            nodes.append(("block", m, []))
        elif isinstance(m, LAYERS):
            nodes.append(("stage", [m]))
        elif nodes:
            nodes[-1][-1].append(m)
        else:
            prefix.append(m)
    return prefix, nodes


def _layers(model):
    """Every layer in the oracle's order (outer, body, shortcut)."""
    out = []
    for node in _nodes(model)[1]:
        if node[0] == "stage":
            out.append(node[1][0])
        else:
            out += [s[0] for s in _branch(node[1].body) + _branch(node[1].shortcut)]
    return out


def _flat_stage(mods, shape):
    layer = mods[0]
    return dm.per_sample_stage(dm.stage_function(mods, ("weight", "bias")), layer.weight.shape,
                               True, shape)


def _lift(fn, n, second=False):
    """fn on the first n entries of the state (or on the rest), the other part unchanged."""
    if second:
        return lambda x, u: torch.cat([x[:n], fn(x[n:], u)])
    return lambda x, u: torch.cat([fn(x[:n], u), x[n:]])


def _exit(post, n, shape):
    def fn(x, u):
        y = (x[:n] + x[n:]).reshape(1, *shape)
        for m in post:
            y = m(y)
        return y.reshape(-1)
    return fn


def _block_fn(res, post, shape):
    """The GR transition: x -> post(shortcut(x) + body(x)), u = all its layers' [W | b]."""
    stages = _branch(res.body), _branch(res.shortcut)
    funcs = [[dm.stage_function(s, ("weight", "bias")) for s in b] for b in stages]
    sizes = [s[0].weight.shape for b in stages for s in b]

    def fn(x, u):
        params, start = [], 0
        for w_shape in sizes:
            m = w_shape[0] * (w_shape[1:].numel() + 1)
            params.append(split_gradient(u[start:start + m].reshape(w_shape[0], -1), w_shape,
                                         True))
            start += m
        outs, it = [], iter(params)
        for b in funcs:
            h = x.reshape(1, *shape)
            for f in b:
                h = f(h, list(next(it)))
            outs.append(h)
        y = outs[0] + outs[1]
        for m in post:
            y = m(y)
        return y.reshape(-1)
    return fn


def _transitions(model, x, mode):
    """[(flat per-sample fn, its layers, the slice of the state its layers act on (None:
    all))] of the augmented chain, in order ('chain' mode: FNE's chain)."""
    prefix, nodes = _nodes(model)
    h, out = nn.Sequential(*prefix)(x), []
    for node in nodes:
        if node[0] == "stage":
            out.append((_flat_stage(node[1], h.shape[1:]), [node[1][0]], None))
            h = nn.Sequential(*node[1])(h)
            continue
        res, post = node[1], node[2]
        body, short = _branch(res.body), _branch(res.shortcut)
        if mode == "gr":
            out.append((_block_fn(res, post, h.shape[1:]), [s[0] for s in body + short],
                        None))
        else:
            out.append((lambda x, u: torch.cat([x, x]), [], None))
            hb = h
            for mods in body:
                n = hb[0].numel()
                out.append((_lift(_flat_stage(mods, hb.shape[1:]), n), [mods[0]], slice(0, n)))
                hb = nn.Sequential(*mods)(hb)
            hs = h
            for mods in short:
                n = hb[0].numel()
                out.append((_lift(_flat_stage(mods, hs.shape[1:]), n, True), [mods[0]],
                            slice(n, None)))
                hs = nn.Sequential(*mods)(hs)
            out.append((_exit(post, hb[0].numel(), hb.shape[1:]), [], None))
        h = nn.Sequential(*post)(res(h))
    return out


def _control(layers):
    parts = [layer_gradient(m.weight, m.bias).reshape(-1) for m in layers]
    return torch.cat(parts).detach() if parts else torch.zeros(0, dtype=F64)


def _reference_step(base, hp, opt, nominal, x, y):
    """A copy of the nominal net after the base optimizer's step with ``opt``'s state; and
    the reference optimizer (its state holds this step's moments)."""
    ref_model = copy.deepcopy(nominal)
    ref = _reference(base, ref_model, hp)
    for p, q in zip(opt.model.parameters(), ref_model.parameters()):
        ref.state[q] = {k: torch.tensor(float(v)) if k == "step" else
                        v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    if isinstance(ref, SNOpt):
        ref.state["snopt"] = dict(opt.state["dgnopt"])
    _step(ref_model, ref, x, y)
    return ref_model, ref


def _dense_map(base, ref, layer, hp):
    """The base map P of one layer as a dense (m, m) matrix, from the reference's state."""
    st_w, st_b = ref.state[layer.weight], ref.state[layer.bias]
    lr, m = hp["lr"], layer.weight.numel() + layer.bias.numel()
    if base == "sgd":
        return lr * torch.eye(m, dtype=F64)
    if base == "ekfac":
        rot = torch.kron(st_w["basis_b"], st_w["basis_a"])
        return lr * rot @ torch.diag(1 / (st_w["m2"] + hp["eps_ekfac"]).reshape(-1)) @ rot.t()
    if base == "rmsprop":
        diag = [lr / (st["square_avg"].sqrt() + hp["eps"]) for st in (st_w, st_b)]
    else:
        bc2 = [1 - hp["betas"][1] ** float(st["step"]) for st in (st_w, st_b)]
        diag = [lr / (st["exp_avg_sq"].sqrt() / math.sqrt(c) + hp["eps"])
                for st, c in zip((st_w, st_b), bc2)]
    return torch.diag(layer_gradient(*diag).reshape(-1))


def _mixed_terms(fns, xs, us, jac, z):
    """Per transition the V'_x . f_ux terms (B, m, n), V'_x propagated by f_x^T."""
    out, v = [None] * len(fns), z
    for t in reversed(range(len(fns))):
        out[t] = dm.dense_mixed(fns[t], xs[t], us[t], v)
        v = torch.einsum("bon,bo->bn", jac[t][0], v)
    return out


def _dense_oracle(nominal, opt, base, hp, mode, x, y, options, feedback=True):
    """The new layer parameters (flat, in :func:`_layers` order) by dense augmented DDP."""
    trans = _transitions(nominal, x, mode)
    fns, us = [t[0] for t in trans], [_control(t[1]) for t in trans]
    xs, h = [], nn.Sequential(*_nodes(nominal)[0])(x).flatten(1).detach()
    for fn, u in zip(fns, us):
        xs.append(h)
        h = torch.func.vmap(fn, in_dims=(0, None))(h, u)
    out = nominal(x)
    (z,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), out)
    assert torch.allclose(h, out.detach(), atol=1e-12)  # the augmented chain is the net
    jac = [dm.dense_jacobians(fn, xt, u) for fn, xt, u in zip(fns, xs, us)]
    ref_model, ref = _reference_step(base, hp, opt, nominal, x, y)
    index = {id(m): i for i, m in enumerate(_layers(nominal))}
    ref_layers = _layers(ref_model)
    ks, maps = [], []
    for (_, layers, _), u in zip(trans, us):
        moved = [ref_layers[index[id(m)]] for m in layers]
        ks.append(_control(moved) - u)
        maps.append(torch.block_diag(*[_dense_map(base, ref, m, hp) for m in moved])
                    if moved else None)
    mixed = _mixed_terms(fns, xs, us, jac, z) if options.get("second_order") else None
    gains = dm.gauss_newton_gains([j[0] for j in jac], [j[1] for j in jac], z, maps,
                                  options.get("eps_vxx", 0.0),
                                  options.get("vxx_correction", False), mixed)
    if not feedback:
        gains = [torch.zeros_like(g) for g in gains]
    if mode == "chain":  # the skips ignored: a layer's gain acts on its own input only
        gains = [_own_columns(g, own) for g, (_, _, own) in zip(gains, trans)]
    return torch.cat(dm.dense_update_pass(fns, us, xs, ks, gains))


def _own_columns(gain, own):
    """The gain (B, m, n) with the columns outside ``own`` (a slice of n) zeroed."""
    if own is None:
        return gain
    kept = torch.zeros_like(gain)
    kept[..., own] = gain[..., own]
    return kept


def _flat(model):
    return _control(_layers(model))


HPARAMS = {
    "sgd": dict(lr=0.3, momentum=0.5, weight_decay=1e-2),
    "rmsprop": dict(lr=0.03, momentum=0.5, weight_decay=1e-2, alpha=0.9, eps=1e-3),
    "adam": dict(lr=0.05, weight_decay=1e-2, betas=(0.8, 0.9), eps=1e-3),
    "ekfac": dict(lr=0.3, momentum=0.5, weight_decay=1e-2, alpha=0.8, eps_ekfac=0.1),
}


def _run_oracle(base, mode, options, net=_mlp, make_batch=_batch):
    hp = HPARAMS[base]
    model = net()
    opt = DGNOpt(model, base=base, mode=mode, update_freq=100, **hp, **options)
    for seed in (1, 2):  # warm up: momentum buffers, moments, EKFAC's factors
        _step(model, opt, *make_batch(seed))
    x, y = make_batch(3)
    nominal = copy.deepcopy(model)
    expected = _dense_oracle(nominal, opt, base, hp, mode, x, y, options)
    base_only = _dense_oracle(nominal, opt, base, hp, mode, x, y, options, feedback=False)
    _step(model, opt, x, y)
    return _flat(model), expected, base_only


ORACLE_CASES = [(b, m, {}) for b in HPARAMS for m in ("fne", "gr", "chain")]
ORACLE_CASES += [(b, m, {k: v}) for m in ("fne", "gr", "chain")
                 for b, k, v in (("sgd", "eps_vxx", 0.5), ("adam", "eps_vxx", 0.5),
                                 ("sgd", "vxx_correction", True),
                                 ("ekfac", "vxx_correction", True),
                                 ("sgd", "second_order", True))]


@pytest.mark.parametrize("base,mode,options", ORACLE_CASES,
                         ids=[f"{b}-{m}-{'-'.join(o) or 'plain'}" for b, m, o in ORACLE_CASES])
def test_update_equals_the_dense_augmented_state_oracle(base, mode, options):
    got, expected, base_only = _run_oracle(base, mode, options)
    assert (got - expected).abs().max() < 1e-10
    assert (expected - base_only).abs().max() > 1e-4  # the feedback is not negligible


def test_fne_and_gr_are_different_games_and_options_change_the_update():
    fne, _, _ = _run_oracle("sgd", "fne", {})
    gr, _, _ = _run_oracle("sgd", "gr", {})
    chain, _, _ = _run_oracle("sgd", "chain", {})
    assert (fne - gr).abs().max() > 1e-5
    assert (fne - chain).abs().max() > 1e-5  # the skip terms matter
    for mode in ("fne", "gr"):
        plain, _, _ = _run_oracle("sgd", mode, {})
        for opts in ({"eps_vxx": 0.5}, {"vxx_correction": True}, {"second_order": True}):
            assert (_run_oracle("sgd", mode, opts)[0] - plain).abs().max() > 1e-7, (mode, opts)


@pytest.mark.parametrize("mode", ["fne", "gr", "chain"])
def test_conv_net_with_a_strided_projection_equals_the_oracle(mode):
    got, expected, base_only = _run_oracle("sgd", mode, {}, _conv,
                                           lambda s: _batch(s, n=3, d=36))
    assert (got - expected).abs().max() < 1e-10
    assert (expected - base_only).abs().max() > 1e-5


# ----------------------------------------------------------------------------- chains


def _chains():
    torch.manual_seed(0)
    fcn = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                        nn.Linear(12, 4))
    bn = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Unflatten(1, (1, 6)),
                       nn.Conv1d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(12, 4))
    cnn = nn.Sequential(nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 2, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 4))
    return {"fcn": fcn, "bn": bn, "cnn": cnn}


CHAIN_CASES = [("fcn", "sgd", {"momentum": 0.9}), ("fcn", "adam", {"eps_vxx": 0.1}),
               ("fcn", "ekfac", {"update_freq": 2, "vxx_correction": True}),
               ("fcn", "rmsprop", {"second_order": True}), ("bn", "sgd", {}),
               ("cnn", "adam", {"max_feedback_ratio": 0.5})]


@pytest.mark.parametrize("net,base,opts", CHAIN_CASES)
@pytest.mark.parametrize("mode", ["fne", "gr", "chain"])
def test_without_residual_blocks_dgnopt_is_ddpnopt_bit_for_bit(net, base, opts, mode):
    model = _chains()[net].double()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm/Conv1d: no policy
        dgn = DGNOpt(model, lr=0.05, base=base, mode=mode, **opts)
        ddp = DDPNOpt(twin, lr=0.05, base=base, **opts)
    _train(model, dgn, 5)
    _train(twin, ddp, 5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.buffers(), twin.buffers()))
    ref = copy.deepcopy(_chains()[net]).double()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


# ----------------------------------------------------------------------------- blocks


def test_residual_adds_an_identity_or_projected_shortcut():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    body = nn.Linear(4, 4)
    block = Residual(body)
    assert not block.projected and torch.equal(block(x), x + body(x))
    proj = Residual(nn.Linear(4, 2), shortcut=nn.Linear(4, 2))
    assert proj.projected and torch.equal(proj(x), proj.shortcut(x) + proj.body(x))
    with pytest.raises(ValueError, match="give a projection shortcut"):
        Residual(nn.Linear(4, 2))(x)
    with pytest.raises(TypeError, match="body must be an nn.Module"):
        Residual(lambda v: v)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["fne", "gr", "chain"])
def test_projection_shortcut_with_batchnorm_gets_feedback_and_keeps_the_statistics(mode):
    model = _bn_net()
    with pytest.warns(UserWarning, match="no feedback policy") as caught:
        opt = DGNOpt(model, lr=0.05, momentum=0.9, mode=mode)
    assert "5.shortcut.1 (BatchNorm2d)" in str(caught[0].message)
    base = copy.deepcopy(model)
    with pytest.warns(UserWarning):
        base_opt = DGNOpt(base, lr=0.05, momentum=0.9, mode=mode, feedback=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 32, generator=g), torch.randint(0, 4, (48,), generator=g)
    bn_weight = model[3].body[1].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(3):
            batch = x[16 * k:16 * k + 16], y[16 * k:16 * k + 16]
            ref = copy.deepcopy(model)
            ref(batch[0])  # the running statistics after this step's forward alone
            _step(model, opt, *batch)
            assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))
            if k == 0:  # same start, same gradient: the difference is the feedback alone
                _step(base, base_opt, *batch)
                proj, proj_base = model[5].shortcut[0].weight, base[5].shortcut[0].weight
                assert (proj - proj_base).abs().max() > 1e-6  # the 1x1 projection's
                assert torch.equal(model[3].body[1].weight, base[3].body[1].weight)  # BN: base
    assert not torch.equal(model[3].body[1].weight, bn_weight)  # BatchNorm takes the base step


def test_dropout_in_a_body_is_replayed_in_the_update_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(),
                          Residual(nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5))),
                          nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    # only the head trains: with the forward's masks dx is exactly 0, so the step is SGD's
    opt = DGNOpt(model, lr=0.1, params=model[3].parameters())
    sgd = torch.optim.SGD(ref[3].parameters(), lr=0.1)
    x, y = _toy()
    torch.manual_seed(1)
    _step(model, opt, x[:16], y[:16])
    rng_after = torch.get_rng_state()
    torch.manual_seed(1)
    _step(ref, sgd, x[:16], y[:16])
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


# ----------------------------------------------------------------------------- BatchNorm projection


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_projected_direction_is_the_gradient_of_the_part_batchnorm_passes_on(kind):
    torch.manual_seed(0)
    layer = (nn.Linear(5, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)).double()
    x = torch.randn(6, 5, dtype=F64) if kind == "linear" else torch.randn(6, 3, 5, 5, dtype=F64)
    h = layer(x).detach()
    g, c = torch.randn_like(h), torch.randn(6, dtype=F64)
    fast = dm.feedback_direction(layer, x, g, c, normalised=h)
    scaled = (g * c.reshape(-1, *[1] * (g.dim() - 1))).movedim(1, -1).reshape(-1, 4)
    rows = h.movedim(1, -1).reshape(-1, 4)
    kept = torch.empty_like(scaled)
    for k in range(4):  # brute force: the least-squares residual of g_k on [1, h_k]
        design = torch.stack([torch.ones_like(rows[:, k]), rows[:, k]], 1)
        coef = torch.linalg.lstsq(design, scaled[:, k:k + 1]).solution
        kept[:, k] = scaled[:, k] - (design @ coef)[:, 0]
    kept = kept.reshape(h.movedim(1, -1).shape).movedim(-1, 1)
    brute = layer_gradient(*torch.autograd.grad((kept * layer(x)).sum(),
                                                (layer.weight, layer.bias)))
    assert torch.allclose(fast, brute, atol=1e-12)
    w = layer.weight.detach().reshape(4, -1)
    assert fast[:, -1].abs().max() < 1e-12  # the shift BatchNorm cancels: no bias step
    assert ((fast[:, :-1] * w).sum(1).abs() < 1e-12).all()  # nor a scaling of any row
    plain = dm.feedback_direction(layer, x, g, c)
    assert plain[:, -1].abs().max() > 1e-3 and (plain[:, :-1] * w).sum(1).abs().max() > 1e-3


def _bn_chain(track=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 6),  # stage 0 has dx = 0
                         nn.BatchNorm1d(6, track_running_stats=track), nn.Tanh(),
                         nn.Linear(6, 4)).double()


def _one_step(model, **hp):
    """The parameters after one step of a copy of ``model`` (SGD base unless ``base``)."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm: no policy
        opt = DDPNOpt(model, lr=0.1, **hp)
    x, y = _toy(dtype=F64)
    _step(model, opt, x[:16], y[:16])
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("base", ["sgd", "rmsprop", "adam", "ekfac"])
def test_project_bn_takes_the_batchnorm_invariances_out_of_the_feedback_in_training_mode(base):
    model = _bn_chain()
    off, projected, plain = (_one_step(model, feedback=False, base=base),
                             _one_step(model, base=base),
                             _one_step(model, project_bn=False, base=base))
    w = model[2].weight.detach()
    # the layer before the BatchNorm: the feedback step, after the base's map, neither
    # shifts nor scales its output (the map alone would mix both back into the direction)
    assert torch.allclose(projected[3], off[3], atol=1e-14)  # no shift of its output
    assert ((projected[2] - off[2]) * w).sum(1).abs().max() < 1e-14  # no scaling
    assert (projected[2] - off[2]).abs().max() > 1e-4  # but feedback all the same
    assert (plain[3] - off[3]).abs().max() > 1e-6
    assert ((plain[2] - off[2]) * w).sum(1).abs().max() > 1e-4
    model.eval()  # running statistics: the BatchNorm cancels nothing, nothing is projected
    assert all(torch.equal(a, b) for a, b in zip(_one_step(model, base=base),
                                                   _one_step(model, project_bn=False, base=base)))
    untracked = _bn_chain(track=False).eval()  # batch statistics even in eval mode
    assert torch.allclose(_one_step(untracked, base=base)[3],
                          _one_step(untracked, feedback=False, base=base)[3], atol=1e-14)


@pytest.mark.parametrize("mode", ["fne", "gr"])
def test_dgnopt_feedback_step_on_the_ekfac_base_does_not_scale_a_batchnorm_input(mode):
    net = _bn_net().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 32, generator=g, dtype=F64), torch.randint(0, 4, (32,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm: no policy
        opt = DGNOpt(net, lr=0.05, mode=mode, base="ekfac")
    _step(net, opt, x[:16], y[:16])  # the first step refreshes: EKFAC's map from here on
    start = copy.deepcopy((net.state_dict(), opt.state_dict()))
    after = {}
    for feedback in (False, True):  # the same second step from the same state
        net.load_state_dict(start[0])
        opt.load_state_dict(start[1])
        opt.feedback = feedback
        _step(net, opt, x[16:], y[16:])
        after[feedback] = {name: net.get_submodule(name).weight.detach().clone()
                           for name in _FED_TO_BATCHNORM}
    moved = 0.0
    for name in _FED_TO_BATCHNORM:
        w = start[0][name + ".weight"].reshape(after[True][name].shape[0], -1)
        d = (after[True][name] - after[False][name]).reshape(w.shape)  # the feedback step
        assert ((d * w).sum(1).abs() / (d.norm(dim=1) * w.norm(dim=1))).max() < 1e-10
        moved = max(moved, float(d.abs().max()))
    assert moved > 1e-6  # feedback all the same


#: the conv layers of :func:`_bn_net` whose output a BatchNorm takes.
_FED_TO_BATCHNORM = ("3.body.0", "3.body.3", "5.body.0", "5.shortcut.0")


def test_each_stage_knows_the_batchnorm_that_takes_its_layer_output():
    with pytest.warns(UserWarning, match="no feedback policy"):
        opt = DGNOpt(_bn_net(), lr=0.05)
    found = {s.name: type(s.normaliser).__name__ if s.normaliser is not None else None
             for s in opt.stages if s.layer is not None}
    assert found == {"1": None, "3.body.0": "BatchNorm2d", "3.body.3": "BatchNorm2d",
                     "5.body.0": "BatchNorm2d", "5.body.3": None,
                     "5.shortcut.0": "BatchNorm2d", "9": None}
    folded = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False), nn.Tanh(),
                           nn.Linear(3, 2))  # a BatchNorm without parameters: a follower
    stages = DDPNOpt(folded, lr=0.1).stages
    assert stages[0].normaliser is folded[1] and stages[1].normaliser is None


# ----------------------------------------------------------------------------- torch contract


@pytest.mark.parametrize("mode,base,opts", [
    ("fne", "sgd", {"momentum": 0.9}), ("gr", "ekfac", {"update_freq": 2}),
    ("fne", "adam", {"eps_vxx": 0.1, "vxx_correction": True}),
    ("gr", "rmsprop", {"second_order": True})])
def test_state_dict_round_trip_resumes_bit_identically(mode, base, opts):
    model_a = _mlp(dtype=torch.float32)
    opt_a = DGNOpt(model_a, lr=0.01, base=base, mode=mode, **opts)
    x, y = _batch(0, n=48, dtype=torch.float32)
    for k in range(3):
        _step(model_a, opt_a, x[8 * k:8 * k + 8], y[8 * k:8 * k + 8])
    model_b = copy.deepcopy(model_a)
    opt_b = DGNOpt(model_b, lr=0.01, base=base, mode=mode, **opts)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for k in range(3, 6):
        for m, o in ((model_a, opt_a), (model_b, opt_b)):
            _step(m, o, x[8 * k:8 * k + 8], y[8 * k:8 * k + 8])
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert opt_a.iteration == opt_b.iteration == 6


def test_non_finite_gradient_skips_the_step():
    model = _mlp(dtype=torch.float32)
    opt = DGNOpt(model, lr=0.05, base="adam", mode="gr")
    x, y = _batch(0, n=8, dtype=torch.float32)
    _step(model, opt, x, y)
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].body[0].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="DGNOpt: non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "nash"}, "mode must be 'fne'"), ({"lr": 0.0}, "lr must be > 0"),
    ({"base": "lbfgs"}, "base must be one of"), ({"eps_vxx": -1.0}, "eps_vxx"),
    ({"feedback": False, "second_order": True}, "feedback")])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DGNOpt(_mlp(), **{"lr": 0.1, **kwargs})


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x)


def test_unsupported_structures_raise_clearly():
    lin = nn.Linear(4, 4)
    cases = [
        (Residual(nn.Linear(4, 4)), "Got a Residual"),
        (nn.Sequential(nn.Linear(4, 4), Residual(nn.Sequential(
            nn.Linear(4, 4), Residual(nn.Linear(4, 4))))), "1.body.1 is a Residual block"),
        (nn.Sequential(Residual(_Custom())), "0.body .*holds parameters in submodules"),
        (nn.Sequential(Residual(lin), Residual(lin)), "used twice"),
        (nn.Sequential(nn.Linear(4, 4), Residual(nn.Linear(4, 4)), nn.Dropout()),
         "Dropout after block 1 cannot be replayed"),
        (nn.Sequential(Residual(nn.Sequential(nn.Dropout(), nn.Linear(4, 4)))),
         "before the first layer of 0's body"),
    ]
    for model, match in cases:
        with pytest.raises(ValueError, match=match):
            DGNOpt(model, lr=0.1)
    with pytest.raises(ValueError, match="is a Residual block.*use DGNOpt"):
        DDPNOpt(_mlp(), lr=0.1)
    with pytest.raises(TypeError, match="DGNOpt takes the model"):
        DGNOpt(_mlp().parameters(), lr=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode,base,lr", [("fne", "sgd", 0.1), ("gr", "sgd", 0.1),
                                          ("fne", "adam", 0.01), ("gr", "ekfac", 0.05)])
def test_a_few_dozen_steps_lower_the_loss(mode, base, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(),
                          Residual(nn.Sequential(nn.Linear(16, 16), nn.Tanh(),
                                                 nn.Linear(16, 16))), nn.Tanh(),
                          Residual(nn.Linear(16, 8), shortcut=nn.Linear(16, 8)), nn.Tanh(),
                          nn.Linear(8, 4))
    opt = DGNOpt(model, lr=lr, base=base, mode=mode, update_freq=10)
    losses = _train(model, opt, 40)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


# ----------------------------------------------------------------------------- training


def test_task_models_are_chains_with_residual_blocks():
    from ocnode.data import load_dataset

    ds = load_dataset("digits", None, 0)
    for name in ("resmlp", "resnet"):
        task = make_task(ds, TaskSettings(model=name, width=4))
        model = task.build_model(True)
        assert task.chain and any(isinstance(m, Residual) for m in model.modules())
        with pytest.raises(ValueError, match="use DGNOpt"):
            DDPNOpt(model, lr=0.1)
        hp = TrainConfig(dgn_mode="gr", ddp_base="adam").hparams(OPTIMIZERS["dgnopt"].defaults)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # BatchNorm: base step only
            opt = build_optimizer("dgnopt", model, hp)
        assert isinstance(opt, DGNOpt) and (opt.mode, opt.base) == ("gr", "adam")
        assert len(opt.blocks) == (2 if name == "resmlp" else 3)


@pytest.mark.parametrize("flags", [
    ["--model", "resmlp", "--dataset", "digits", "--dgn-mode", "fne", "--width", "8"],
    ["--model", "resnet", "--dataset", "mnist5k", "--train-size", "256", "--width", "8",
     "--dgn-mode", "gr", "--ddp-base", "adam", "--test-size", "200"]],
    ids=["resmlp-fne", "resnet-gr"])
def test_dgnopt_trains_from_the_command_line(tmp_path: Path, flags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["train", "--out", str(tmp_path), "--no-progress", "--optimizer", "dgnopt",
                     "--epochs", "1", "--batch-size", "64", *flags]) == 0
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert math.isfinite(float(rows[-1]["test_acc"]))
