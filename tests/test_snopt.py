"""SNOpt as a torch optimizer: the loop, modes, robustness, state, horizon policy."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn

from ocnode import MLPODEClassifier, ODEBlock
from ocnode.nn import MLPODEFunc
from ocnode.optim import HorizonOptimizer, SNOpt
from solvers import SolverSpec

FAST = SolverSpec(method="rk4", options={"step_size": 0.25})


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    return x, y


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MLPODEClassifier(8, 4, hidden=12, solver=FAST.replace(**kw))


def _train(model, opt, steps, seed=0, batch=16):
    x, y = _data(seed)
    losses = []
    for k in range(steps):
        idx = slice((k * batch) % len(x), (k * batch) % len(x) + batch)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_loss_falls_on_a_toy_problem():
    model = _model()
    opt = SNOpt(model, lr=0.05, update_freq=5, full=True)
    losses = _train(model, opt, 60)
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8


def test_refresh_builds_factors_for_block_layers_and_full_mode_adds_the_rest():
    model = _model()
    inner = [m for m in model.ode.func.modules() if isinstance(m, nn.Linear)]
    opt = SNOpt(model, lr=0.01, update_freq=3)
    _train(model, opt, 1)
    assert all("basis_a" in opt.state[m.weight] for m in inner)
    assert "basis_a" not in opt.state[model.stem.weight]
    full = SNOpt(model, lr=0.01, update_freq=3, full=True)
    _train(model, full, 1)
    assert "basis_a" in full.state[model.stem.weight]
    assert len(full.preconditioned_layers) == len(opt.preconditioned_layers) + 2


def test_layers_without_factors_take_the_plain_sgd_step():
    model = _model()
    opt = SNOpt(model, lr=0.1, update_freq=100)
    x, y = _data()
    before = model.stem.weight.detach().clone()
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    grad = model.stem.weight.grad.clone()
    opt.step()
    assert torch.allclose(model.stem.weight, before - 0.1 * grad)


def test_identity_factors_make_snopt_exactly_sgd():
    model = _model()
    ref = copy.deepcopy(model)
    opt = SNOpt(model, lr=0.1, momentum=0.9, weight_decay=1e-3, eps=0.05, alpha=1.0,
                update_freq=1000, full=True)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _train(model, opt, 1)  # the first step refreshes; overwrite its factors with identities
    _train(ref, sgd, 1)
    for layer in opt.preconditioned_layers:
        st = opt.state[layer.weight]
        d_out, d_in = st["m2"].shape
        st["basis_a"], st["basis_b"] = torch.eye(d_in), torch.eye(d_out)
        st["m2"] = torch.full((d_out, d_in), 1 - 0.05)
    model.load_state_dict(ref.state_dict())
    for p in opt.state:  # same momentum buffers as SGD's after its first step
        if isinstance(p, torch.Tensor):
            opt.state[p]["momentum_buffer"] = sgd.state[
                dict(zip(model.parameters(), ref.parameters()))[p]]["momentum_buffer"].clone()
    _train(model, opt, 3, seed=1)
    _train(ref, sgd, 3, seed=1)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_state_dict_round_trip_resumes_bit_identically():
    model_a = _model()
    opt_a = SNOpt(model_a, lr=0.05, momentum=0.9, update_freq=3, full=True)
    _train(model_a, opt_a, 4)
    model_b = copy.deepcopy(model_a)
    opt_b = SNOpt(model_b, lr=0.05, momentum=0.9, update_freq=3, full=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(model_a, opt_a, 5, seed=2)
    _train(model_b, opt_b, 5, seed=2)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert opt_a.iteration == opt_b.iteration == 9


def test_non_finite_gradient_skips_the_step_and_keeps_the_state():
    model = _model()
    opt = SNOpt(model, lr=0.05, momentum=0.9, update_freq=2)
    _train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    model.head.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.iteration == 2
    after = opt.state_dict()["state"]
    for key, value in state["state"].items():
        for name, tensor in value.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(after[key][name], tensor)


def test_none_gradients_are_skipped():
    model = _model()
    opt = SNOpt(model, lr=0.05, update_freq=1)
    x, y = _data()
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    model.head.bias.grad = None
    before = model.head.bias.detach().clone()
    opt.step()
    assert torch.equal(model.head.bias, before)


def test_step_closure_param_groups_and_lr_scheduler():
    model = _model()
    groups = [{"params": list(model.ode.parameters()), "lr": 0.01},
              {"params": list(model.stem.parameters()) + list(model.head.parameters())}]
    opt = SNOpt(model, lr=0.1, update_freq=2, params=groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        return loss

    loss = opt.step(closure)
    sched.step()
    assert math.isfinite(float(loss.detach()))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, "lr"), ({"lr": 0.1, "eps": 0.0}, "eps"), ({"lr": 0.1, "alpha": 1.5}, "alpha"),
    ({"lr": 0.1, "update_freq": 0}, "update_freq"), ({"lr": 0.1, "momentum": -1}, "momentum"),
    ({"lr": 0.1, "damping_mode": "svd"}, "damping_mode"),
    ({"lr": 0.1, "fisher": "exact"}, "fisher"),
])
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SNOpt(_model(), **kwargs)


def test_grouped_conv_layers_are_rejected():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        SNOpt(model, lr=0.1, full=True)


def test_kfac_through_the_solver_collects_from_every_evaluation():
    model = _model(adjoint=False)
    opt = SNOpt(model, lr=0.05, update_freq=5)
    _train(model, opt, 1)
    st = opt.state[model.ode.func.layers[0]._layer.weight]
    assert st["num_locations"] == 4 * 4  # rk4, 4 steps of 0.25: 16 evaluations


def test_true_fisher_uses_labels_sampled_from_the_model():
    # The true-Fisher factors equal empirical factors collected with the sampled labels.
    model = _model()
    opt = SNOpt(model, lr=0.05, update_freq=10, fisher="true", full=True)
    x, _ = _data()
    torch.manual_seed(123)
    nn.functional.cross_entropy(model(x[:16]), torch.zeros(16, dtype=torch.long)).backward()
    torch.manual_seed(123)
    with torch.no_grad():
        probs = torch.softmax(model(x[:16]), -1)
    sampled = torch.multinomial(probs, 1).view(-1)
    opt.step()
    ref_model = _model()
    ref = SNOpt(ref_model, lr=0.05, update_freq=10, full=True)
    nn.functional.cross_entropy(ref_model(x[:16]), sampled).backward()
    ref.step()
    for la, lb in zip(opt.preconditioned_layers, ref.preconditioned_layers):
        assert torch.allclose(opt.state[la.weight]["b_factor"],
                              ref.state[lb.weight]["b_factor"], rtol=1e-5, atol=1e-9)


def test_snopt_takes_the_model_not_its_parameters():
    with pytest.raises(TypeError, match="takes the model"):
        SNOpt(_model().parameters(), lr=0.1)


def test_an_excluded_grouped_conv_takes_the_plain_sgd_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(4, 3, 1), nn.Flatten())
    opt = SNOpt(model, lr=0.1, full=True, update_freq=1, exclude={model[0]})
    assert opt.preconditioned_layers == [model[1]]
    before = model[0].weight.detach().clone()
    model(torch.randn(5, 2, 4, 4)).square().mean().backward()
    grad = model[0].weight.grad.clone()
    opt.step()
    assert torch.allclose(model[0].weight, before - 0.1 * grad)
    assert "basis_a" in opt.state[model[1].weight]


def test_layers_whose_bias_is_not_optimized_keep_the_bias_column():
    model = _model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    opt = SNOpt(model, lr=0.05, update_freq=2, full=True, params=weights)
    _train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_keys_and_shapes_are_checked_on_load():
    model = _model()
    opt = SNOpt(model, lr=0.05, update_freq=2, full=True)
    _train(model, opt, 1)
    layer = opt.preconditioned_layers[0]
    assert set(opt.state[layer.weight]) >= {"a_factor", "b_factor", "basis_a", "basis_b",
                                            "lam_a", "lam_b", "m2", "num_locations"}
    saved = copy.deepcopy(opt.state_dict())
    other = MLPODEClassifier(8, 4, hidden=10, solver=FAST)
    with pytest.raises(ValueError, match="same architecture"):
        SNOpt(other, lr=0.05, update_freq=2, full=True).load_state_dict(saved)
    old = copy.deepcopy(saved)  # a checkpoint from before the rename of g_factor
    for st in old["state"].values():
        if isinstance(st, dict) and "b_factor" in st:
            st["g_factor"] = st.pop("b_factor")
    fresh = SNOpt(copy.deepcopy(model), lr=0.05, update_freq=2, full=True)
    fresh.load_state_dict(old)
    first = fresh.preconditioned_layers[0]
    assert torch.equal(fresh.state[first.weight]["b_factor"],
                       opt.state[layer.weight]["b_factor"])


def test_vector_field_parameters_outside_covered_layers_warn_once():
    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, t, x):
            return self.gain * torch.tanh(self.lin(x))

    model = nn.Sequential(ODEBlock(Field(), solver=FAST), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"plain SGD step: 0\.func\.gain") as record:
        opt = SNOpt(model, lr=0.05, update_freq=1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 3)).square().mean().backward()
            opt.step()
    assert len([w for w in record if "plain SGD" in str(w.message)]) == 1


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_collection_is_alive_only_on_refresh_iterations():
    model = _model()
    opt = SNOpt(model, lr=0.05, update_freq=3, full=True)
    armed = []
    for _ in range(4):
        armed.append((model.ode.observer is not None, _hooks(model) > 0))
        _train(model, opt, 1)
    assert armed == [(True, True), (False, False), (False, False), (True, True)]
    opt.close()
    assert model.ode.observer is None and _hooks(model) == 0


def test_a_refresh_whose_backward_raised_leaves_no_trace():
    # The adjoint solve fails half-way: the head's K-FAC factors, the accepted steps' factors
    # and the observer's pending evaluations were gathered before the failure; the next
    # refresh must not see them.
    model = _model()
    reference = copy.deepcopy(model)
    opt = SNOpt(model, lr=0.05, update_freq=5, full=True)
    fail = {"on": True}

    def bomb(module, args):  # the backward solve evaluates the field with grad mode on
        t = args[0]
        if fail["on"] and torch.is_grad_enabled() and t.numel() == 1 and float(t) < 0.5:
            raise RuntimeError("simulated failure in the backward solve")

    handle = model.ode.func.register_forward_pre_hook(bomb)
    x, y = _data()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
    with pytest.raises(RuntimeError, match="simulated"):
        loss.backward()
    assert opt.collector._sums.stats and opt.collector._observers[0].pending  # a trace to drop
    fail["on"] = False
    handle.remove()
    _train(model, opt, 1)
    ref = SNOpt(reference, lr=0.05, update_freq=5, full=True)
    _train(reference, ref, 1)
    for la, lb in zip(opt.preconditioned_layers, ref.preconditioned_layers):
        for key in ("a_factor", "b_factor", "m2"):
            assert torch.equal(opt.state[la.weight][key], ref.state[lb.weight][key]), key


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_live_tensors_stay_flat_over_many_refreshes(fisher):
    model = _model()
    opt = SNOpt(model, lr=0.01, update_freq=1, full=True, fisher=fisher)
    _train(model, opt, 5)
    before = _live_tensors()
    _train(model, opt, 30)
    assert _live_tensors() <= before


def test_true_fisher_refresh_runs_the_adjoint_backward_twice():
    # The sampled labels need their own adjoint a~(t): one more backward solve per refresh
    # iteration (the real backward's a(t) gives the gradient); other iterations cost the same.
    nfe = {}
    for fisher in ("empirical", "true"):
        model = _model()
        opt = SNOpt(model, lr=0.01, update_freq=2, full=True, fisher=fisher)
        nfe[fisher] = []
        for _ in range(2):
            _train(model, opt, 1)
            nfe[fisher].append(model.ode.nfe_backward)
    assert nfe["true"] == [2 * nfe["empirical"][0], nfe["empirical"][1]]


def test_feedback_horizon_policy_moves_t_towards_the_known_optimum():
    # dx/dt = -x with x(0) = 1; L = (x(T) - e^-2)^2 is minimised at T* = 2.
    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, t, x):
            return -self.k * x

    block = ODEBlock(Decay(), t1=1.0, trainable_t1=True,
                     solver=SolverSpec(rtol=1e-8, atol=1e-8)).double()
    block.func.k.requires_grad_(False)
    horizon = HorizonOptimizer(block, policy="feedback", lr=0.1, reg=1e-3, update_freq=1,
                               ema=0.5)
    path = [block.t1]
    for _ in range(40):
        loss = (block(torch.ones(1, dtype=torch.float64)) - math.exp(-2)).pow(2).sum()
        loss.backward()
        horizon.observe()
        path.append(horizon.step())
    assert abs(path[-1] - 2.0) < 0.25 < abs(path[0] - 2.0)
    assert path[1] > path[0]


def test_open_loop_horizon_policy_and_t_min():
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, t, x):
            return self.w * x

    block = ODEBlock(Zero(), t1=1.0, trainable_t1=True)
    horizon = HorizonOptimizer(block, policy="baseline", lr=100.0, reg=1e-2, update_freq=2,
                               t_min=0.5)
    for _ in range(4):
        block(torch.ones(2)).sum().backward()
        horizon.observe()
        horizon.step()
    assert block.t1 == pytest.approx(0.5)  # pushed down by c*T, clipped at t_min
    assert horizon.state_dict()["step"] == 4


def test_the_horizon_policy_divides_dl_dt_by_the_batch_by_default():
    torch.manual_seed(0)
    block = ODEBlock(MLPODEFunc(2, 8), t1=1.0, trainable_t1=True)
    x = torch.randn(8, 2)
    s_values = []
    for scale in ("batch", "none"):
        horizon = HorizonOptimizer(block, scale=scale)
        block(x).pow(2).mean().backward()
        grad = float(block.t1_tensor.grad)
        s_values.append(horizon.observe())
        assert s_values[-1] == pytest.approx(grad / (8 if scale == "batch" else 1))
    horizon.processes = 2  # a data-parallel run: B is the global batch
    block(x).pow(2).mean().backward()
    grad = float(block.t1_tensor.grad)
    assert horizon.observe() == pytest.approx(grad)  # scale "none" ignores it
    horizon = HorizonOptimizer(block)
    horizon.processes = 2
    block(x).pow(2).mean().backward()
    grad = float(block.t1_tensor.grad)
    assert horizon.observe() == pytest.approx(grad / 16)
    with pytest.raises(ValueError, match="scale"):
        HorizonOptimizer(block, scale="sum")


def test_horizon_optimizer_needs_a_trainable_t1():
    with pytest.raises(ValueError, match="trainable_t1"):
        HorizonOptimizer(ODEBlock(MLPODEClassifier(2, 2).ode.func))
