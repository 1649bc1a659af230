"""ODE-RNN (ocnode.nn.sequence): GRU, variable length, time rescaling, gradients, SNOpt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import solvers
from ocnode.nn.sequence import GRUUpdate, ODERNNClassifier, ODERNNFunc
from ocnode.optim import SNOpt
from solvers import SolverSpec

pytestmark = pytest.mark.usefixtures("one_thread")

C, K, H = 3, 4, 6


def _model(dtype: torch.dtype = torch.float64, solver: SolverSpec | None = None,
           **kw) -> ODERNNClassifier:
    torch.manual_seed(0)
    solver = solver or ODERNNClassifier.default_solver.replace(rtol=1e-7, atol=1e-9)
    return ODERNNClassifier(C, K, **{"hidden": H, "ode_hidden": 10, **kw},
                            solver=solver).to(dtype)


def _loose(**changes) -> SolverSpec:
    return ODERNNClassifier.default_solver.replace(**changes)


def _batch(lengths: list[int], t_len: int, irregular: bool = True,
           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Left-aligned series of the given lengths, padded to t_len with zeros."""
    gen = torch.Generator().manual_seed(1)
    b = len(lengths)
    values = torch.randn(b, t_len, C, generator=gen, dtype=dtype)
    gaps = 0.3 + torch.rand(b, t_len, generator=gen, dtype=dtype) if irregular \
        else torch.ones(b, t_len, dtype=dtype)
    times = gaps.cumsum(1) - gaps[:, :1]
    mask = torch.arange(t_len) < torch.tensor(lengths).unsqueeze(1)
    values = values.masked_fill(~mask.unsqueeze(-1), 0.0)
    return values, times, mask, torch.arange(b) % K


def test_gru_update_equals_torch_gru_cell_with_copied_weights() -> None:
    torch.manual_seed(0)
    cell, ours = torch.nn.GRUCell(5, 7), GRUUpdate(5, 7)
    with torch.no_grad():
        ours.input_map.weight.copy_(cell.weight_ih)
        ours.input_map.bias.copy_(cell.bias_ih)
        ours.hidden_map.weight.copy_(cell.weight_hh)
        ours.hidden_map.bias.copy_(cell.bias_hh)
    x, h = torch.randn(4, 5), torch.randn(4, 7)
    torch.testing.assert_close(ours(x, h), cell(x, h), rtol=1e-6, atol=1e-6)


def test_extra_padding_and_garbage_at_masked_steps_change_nothing() -> None:
    model = _model()
    values, times, mask, _ = _batch([5, 3, 1], 5)
    expected = model(values, times, mask)
    pad = 4
    gen = torch.Generator().manual_seed(7)
    big_mask = torch.cat([mask, torch.zeros(3, pad, dtype=torch.bool)], 1)
    big_values = torch.randn(3, 5 + pad, C, generator=gen, dtype=torch.float64) * 1e3
    big_values[:, :5][mask] = values[mask]
    big_times = torch.randn(3, 5 + pad, generator=gen, dtype=torch.float64) * 1e3
    big_times[:, :5][mask] = times[mask]
    big_values[1, 4, 0] = float("nan")  # garbage can be anything, even NaN, also at a
    big_times[2, 1] = float("nan")        # step that other series of the batch observe
    got = model(big_values, big_times, big_mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.sum().backward()  # and NaN garbage does not leak into the gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_short_series_in_a_batch_gives_its_own_logits_as_if_alone() -> None:
    model = _model(solver=SolverSpec(method="rk4", options={"step_size": 0.25}))  # no coupling
    values, times, mask, _ = _batch([6, 2, 4], 6)
    together = model(values, times, mask)
    for i, n in enumerate([6, 2, 4]):
        alone = model(values[i:i + 1, :n], times[i:i + 1, :n], mask[i:i + 1, :n])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-12, atol=1e-12)


def test_missing_step_inside_a_series_is_bridged_by_one_longer_gap() -> None:
    model = _model()
    values, times, mask, _ = _batch([5], 5)
    holey = mask.clone()
    holey[0, 2] = False
    dense = model(values[:, [0, 1, 3, 4]], times[:, [0, 1, 3, 4]], mask[:, [0, 1, 3, 4]])
    torch.testing.assert_close(model(values, times, holey), dense, rtol=1e-10, atol=1e-10)


def test_time_rescaled_field_equals_unscaled_field_over_the_gap() -> None:
    torch.manual_seed(0)
    func = ODERNNFunc(H, 10).double()
    h0 = torch.randn(1, H, dtype=torch.float64)
    t_k, t_next = 0.7, 2.3
    tol = {"rtol": 1e-10, "atol": 1e-12}
    scaled, _ = solvers.odeint(func, (h0, torch.tensor([[t_next - t_k]], dtype=torch.float64)),
                               torch.tensor([0.0, 1.0], dtype=torch.float64), **tol)
    direct = solvers.odeint(lambda t, h: func.field(h), h0,
                            torch.tensor([t_k, t_next], dtype=torch.float64), **tol)
    torch.testing.assert_close(scaled[-1], direct[-1], rtol=1e-8, atol=1e-9)
    # the model's evolve() is that solve, row by row, with per-row gaps and time_scale
    model = _model(time_scale=2.0)
    model.ode.func.load_state_dict(func.state_dict())
    h2 = torch.cat([h0, h0])
    out = model.evolve(h2, torch.tensor([2 * (t_next - t_k), 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[0], direct[-1, 0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[1], h0[0], rtol=0, atol=0)  # a zero gap leaves h alone


def test_gradients_of_adjoint_and_backprop_agree() -> None:
    values, times, mask, labels = _batch([5, 4, 2], 5)
    grads = []
    for adjoint in (True, False):
        model = _model(solver=_loose(rtol=1e-7, atol=1e-9, adjoint=adjoint))
        F.cross_entropy(model(values, times, mask), labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert all(g is not None and g.abs().sum() > 0 for g in grads[-1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-5, atol=1e-8, msg=name)


def _snopt_step(model: ODERNNClassifier, batch: tuple[torch.Tensor, ...], **kw) -> SNOpt:
    values, times, mask, labels = batch
    opt = SNOpt(model, lr=0.05, update_freq=1, **({"curvature": "grid", "observer_dt": 0.25}
                                                  | kw))
    opt.zero_grad()
    F.cross_entropy(model(values, times, mask), labels).backward()
    opt.step()
    return opt


def test_snopt_refresh_collects_factors_over_every_gap_and_steps_finitely() -> None:
    model = _model(torch.float32, solver=_loose())
    batch = _batch([5, 4, 3, 5], 5, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = _snopt_step(model, batch, full=True)
    for layer in model.ode.func.layers:  # 5 grid nodes (dt 0.25) in each of the 4 gaps
        st = opt.state[layer.weight]
        assert {"basis_a", "basis_b", "m2"} <= set(st)
        assert st["num_locations"] == 4 * 5
        assert torch.isfinite(st["m2"]).all()
    for layer in (model.gru.input_map, model.gru.hidden_map, model.head):  # full=True
        assert "m2" in opt.state[layer.weight]
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_stage_curvature_collects_the_evaluations_of_every_gap() -> None:
    model = _model(torch.float32, solver=_loose())
    values, times, mask, labels = _batch([5, 4, 3, 5], 5, dtype=torch.float32)
    opt = SNOpt(model, lr=0.05, update_freq=1)  # curvature="stages"
    opt.zero_grad()
    F.cross_entropy(model(values, times, mask), labels).backward()
    opt.step()
    for layer in model.ode.func.layers:  # dopri5 takes each gap in >= 1 step of 6 stages
        st = opt.state[layer.weight]
        assert st["num_locations"] >= 4 * 6 and torch.isfinite(st["m2"]).all()


def test_curvature_is_the_same_whether_grid_samples_are_batched_or_one_by_one() -> None:
    """The per-row gap travels with its row into the observer's stacked, subsetted states."""
    batch = _batch([5, 4, 3, 5], 5)
    factors = []
    for batched in (True, False):
        model = _model(solver=_loose())
        model.ode.func.supports_batched_time = batched
        opt = _snopt_step(model, batch, stats_batch=3)
        factors.append([(opt.state[m.weight]["a_factor"], opt.state[m.weight]["b_factor"])
                        for m in model.ode.func.layers])
    for (a1, g1), (a2, g2) in zip(*factors):
        torch.testing.assert_close(a1, a2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change, error", [
    (lambda v, t, m: (v[0], t, m), ValueError),             # values not (B, T, C)
    (lambda v, t, m: (v[..., :2], t, m), ValueError),       # wrong channel count
    (lambda v, t, m: (v, t[:, :-1], m), ValueError),        # times not (B, T)
    (lambda v, t, m: (v, t, m.float()), TypeError),         # mask not bool
    (lambda v, t, m: (v.long(), t, m), TypeError),          # integer values
    (lambda v, t, m: (v, t.flip(1), m), ValueError),        # decreasing observed times
    (lambda v, t, m: (v, t.masked_fill(m, float("nan")), m), ValueError),  # NaN times
])
def test_bad_inputs_raise_clear_errors(change, error) -> None:
    model = _model()
    values, times, mask, _ = _batch([3, 2], 3)
    with pytest.raises(error):
        model(*change(values, times, mask))


@pytest.mark.parametrize("kw", [{"hidden": 0}, {"time_scale": 0.0}, {"ode_hidden": 2.5}])
def test_bad_constructor_arguments_raise(kw) -> None:
    with pytest.raises(ValueError):
        ODERNNClassifier(C, K, **kw)


def test_the_default_solver_tries_each_gap_in_one_step_with_a_seminorm_adjoint() -> None:
    spec = ODERNNClassifier(C, K).ode.solver
    assert spec == ODERNNClassifier.default_solver == SolverSpec(options={"first_step": 1.0},
                                                                 seminorm=True)
    given = SolverSpec(method="rk4", options={"step_size": 0.5}, adjoint=False)
    assert ODERNNClassifier(C, K, solver=given).ode.solver is given  # used as given
