"""E-MSA (Li et al. 2018): the objective's terms, the step against an independent Newton
oracle, training, the records' edge cases and the registry/CLI."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnode import Residual
from ocnode.optim import EMSA
from ocnode.optim.emsa import costate_in, extended_hamiltonian
from ocnode.training import build_optimizer
from ocnode.training.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _batch(n: int = 5, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 2, (n,), generator=g)


def test_objective_at_old_parameters_is_the_linearised_loss() -> None:
    """At theta_old both penalties vanish with their gradients: the value is mean <z, f> and
    the parameter gradient is the ordinary gradient of the mean loss; the costate at the
    input is B times the loss's input gradient."""
    model = _tiny()
    x, y = _batch()
    x.requires_grad_(True)
    h = model[1](model[0](x))
    h.retain_grad()
    F.cross_entropy(model[2](h), y).backward()
    batch = x.shape[0]
    z_h, stage = batch * h.grad, nn.Sequential(model[0], model[1])
    out, z_in = costate_in(stage, x.detach(), z_h)
    torch.testing.assert_close(z_in, batch * x.grad, rtol=1e-12, atol=1e-14)
    loss_grads = [p.grad.clone() for p in stage.parameters()]
    value = extended_hamiltonian(stage, x.detach(), out.detach(), z_h, z_in.detach(), rho=0.7)
    torch.testing.assert_close(value, (z_h * out).sum() / batch)
    grads = torch.autograd.grad(value, list(stage.parameters()))
    for g, want in zip(grads, loss_grads):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-14)


def _oracle_objective(theta: torch.Tensor, shape: tuple[int, int], x: torch.Tensor,
                      y: torch.Tensor, z: torch.Tensor, z_in: torch.Tensor, rho: float,
                      wd: float, tanh: bool) -> torch.Tensor:
    """The extended Hamiltonian of a Linear(+tanh) stage written out by hand (flat theta)."""
    w = theta[: shape[0] * shape[1]].view(shape)
    b = theta[shape[0] * shape[1]:]
    f = x @ w.T + b
    back_pre = z
    if tanh:
        f = torch.tanh(f)
        back_pre = (1 - f ** 2) * z
    back = back_pre @ w
    per_sample = (z * f).sum(1) + rho / 2 * ((f - y) ** 2).sum(1) \
        + rho / 2 * ((back - z_in) ** 2).sum(1)
    return per_sample.mean() + wd / 2 * theta.pow(2).sum()


def _newton(fun, theta: torch.Tensor, iters: int = 40) -> torch.Tensor:
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(fun, theta)
        h = torch.autograd.functional.hessian(fun, theta)
        assert torch.linalg.eigvalsh(h).min() > 0, "oracle objective not convex here"
        theta = theta - torch.linalg.solve(h, g)
    return theta


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_step_equals_the_exact_minimiser_of_each_stage(wd: float) -> None:
    """A converged E-MSA step (float64) equals Newton's minimiser of the hand-written
    objective of every stage, all against the one recorded forward and backward."""
    rho = 1.0
    model = _tiny()
    x, y = _batch()
    x = x.requires_grad_(True)
    h = model[1](model[0](x))
    h.retain_grad()
    logits = model[2](h)
    logits.retain_grad()
    F.cross_entropy(logits, y).backward()
    batch = x.shape[0]
    z_h, z_out = batch * h.grad, batch * logits.grad
    want = []
    for lin, xin, yout, z, tanh in ((model[0], x.detach(), h.detach(), z_h, True),
                                    (model[2], h.detach(), logits.detach(), z_out, False)):
        theta0 = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()])
        z_in = (((1 - yout ** 2) * z) if tanh else z) @ lin.weight.detach()

        def fun(theta, lin=lin, xin=xin, yout=yout, z=z, tanh=tanh, z_in=z_in):
            return _oracle_objective(theta, tuple(lin.weight.shape), xin, yout, z, z_in, rho,
                                     wd, tanh)
        want.append(_newton(fun, theta0.clone()))

    opt = EMSA(model, rho=rho, inner_steps=200, inner_tol=1e-14, weight_decay=wd)
    opt.zero_grad()
    F.cross_entropy(model(x.detach()), y).backward()
    opt.step()
    for lin, theta in zip((model[0], model[2]), want):
        got = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()])
        # L-BFGS stops when the objective stops changing in float64: ~1e-8 from the optimum
        torch.testing.assert_close(got, theta, rtol=1e-5, atol=1e-6)
    moved = (want[0] - torch.cat([_tiny()[0].weight.flatten(), _tiny()[0].bias])).norm()
    assert moved > 1e-2  # the oracle moved: the comparison is not of unchanged weights


def _train(opt_factory, steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, :3].sum(1) > x[:, 3:].sum(1)).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 2))
    opt = opt_factory(model)
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return first, F.cross_entropy(model(x), y).item()


def test_emsa_trains_a_classifier() -> None:
    first, last = _train(lambda m: EMSA(m, rho=0.5))
    assert last < 0.25 * first


def test_gradients_and_buffers_are_left_as_the_backward_left_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = EMSA(model, rho=1.0, inner_steps=5)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), stats))
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_dropout_draws_are_replayed_in_the_inner_solves() -> None:
    """With a huge rho the step is tiny; it is only if each stage's recorded output is
    reproduced exactly (dropout's draws replayed), else the forward penalty pulls the
    weights toward another dropout mask's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 2))
    opt = EMSA(model, rho=1e6, inner_steps=10)
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    change = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))
    assert 0 < change < 1e-4


def test_a_residual_block_is_one_stage() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model = nn.Sequential(nn.Linear(6, 6), Residual(body), nn.Tanh(), nn.Linear(6, 2))
    opt = EMSA(model)
    assert opt.stage_names == ["0", "1", "3"]
    x = torch.randn(64, 6)
    y = (x[:, :3].sum(1) > x[:, 3:].sum(1)).long()
    before = [p.detach().clone() for p in body.parameters()]
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(body.parameters(), before))
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.5 * first


def test_non_finite_gradient_skips_the_step() -> None:
    model = _tiny(dtype=torch.float32)
    opt = EMSA(model)
    x, y = _batch(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradient, step skipped"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_step_needs_one_recorded_forward_and_backward() -> None:
    model = _tiny(dtype=torch.float32)
    opt = EMSA(model)
    x, y = _batch(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="exactly one forward"):
        opt.step()
    model(x)
    with pytest.raises(RuntimeError, match="incomplete gradients"):
        opt.step()
    model(x)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="saw 2 forwards"):
        opt.step()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model(x)  # evaluation forwards are not recorded
    opt.step()


def test_frozen_first_layer_is_left_alone() -> None:
    model = _tiny(dtype=torch.float32)
    model[0].requires_grad_(False)
    opt = EMSA(model, params=[p for p in model.parameters() if p.requires_grad])
    x, y = _batch(dtype=torch.float32)
    frozen = model[0].weight.clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 0.0}, "rho must be > 0"), ({"inner_steps": 0}, "inner_steps must be"),
    ({"inner_steps": 2.5}, "inner_steps must be"), ({"lr": -1.0}, "lr must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"), ({"inner_tol": 0}, "inner_tol")])
def test_bad_hyperparameters_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMSA(_tiny(), **kwargs)


def test_bad_models_are_refused() -> None:
    with pytest.raises(TypeError, match="takes the model"):
        EMSA(list(_tiny().parameters()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chain of stages"):
        EMSA(nn.ModuleList([nn.Linear(2, 2)]))
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="used twice"):
        EMSA(nn.Sequential(lin, nn.Tanh(), lin))


def test_state_dict_round_trip_gives_the_same_next_step() -> None:
    runs = []
    for resume in (False, True):
        model = _tiny(dtype=torch.float32)
        opt = EMSA(model, rho=0.3, inner_steps=4)
        if resume:
            saved = EMSA(_tiny(dtype=torch.float32), rho=0.3, inner_steps=4).state_dict()
            opt = EMSA(model, rho=9.0)
            opt.load_state_dict(saved)
            assert opt.param_groups[0]["rho"] == 0.3
        x, y = _batch(dtype=torch.float32)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_registry_and_cli(tmp_path) -> None:
    opt = build_optimizer("emsa", _tiny(), {"rho": 0.2})
    assert isinstance(opt, EMSA) and opt.param_groups[0]["rho"] == 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["train", "--out", str(tmp_path), "--no-progress", "--dataset", "digits",
                     "--model", "fcn", "--optimizer", "emsa", "--rho", "0.5",
                     "--inner-steps", "3", "--width", "8", "--batch-size", "256",
                     "--epochs", "1"]) == 0
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["test_acc"]) > 0.3  # 10 classes: well above chance after 1 epoch
