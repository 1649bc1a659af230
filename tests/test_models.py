"""ODEBlock numerics and gradients, vector fields and classifier networks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import solvers
from ocnode.nn import (
    ConvODEClassifier,
    ConvODEFunc,
    MLPODEClassifier,
    MLPODEFunc,
    ODEBlock,
    ode_blocks,
)
from solvers import SolverSpec

TIGHT = SolverSpec(rtol=1e-10, atol=1e-10)


class LinearField(nn.Module):
    """dx/dt = A x, whose solution is x(t) = expm(A (t - t0)) x(t0)."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x @ self.a.T


class RaisingField(nn.Module):
    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        raise solvers.NonFiniteStateError(t=float(t))


class NaNField(nn.Module):
    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x * float("nan")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _a_matrix() -> Tensor:
    return torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64)


@pytest.mark.parametrize("adjoint", [True, False])
def test_block_matches_the_matrix_exponential_of_a_linear_field(adjoint: bool) -> None:
    a = _a_matrix()
    block = ODEBlock(LinearField(a), t0=0.5, t1=2.0, solver=TIGHT.replace(adjoint=adjoint)).double()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    expected = x0 @ torch.linalg.matrix_exp(a * 1.5).T
    torch.testing.assert_close(block(x0), expected, rtol=1e-7, atol=1e-9)


def test_trajectory_returns_the_state_at_every_time() -> None:
    a = _a_matrix()
    block = ODEBlock(LinearField(a), solver=TIGHT).double()
    x0 = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.1], dtype=torch.float64)
    states = block.trajectory(x0, t)
    assert states.shape == (3, 3, 2)
    for state, ti in zip(states, t, strict=True):
        torch.testing.assert_close(state, x0 @ torch.linalg.matrix_exp(a * ti).T,
                                   rtol=1e-7, atol=1e-9)


def _grads(adjoint: bool) -> list[Tensor]:
    torch.manual_seed(1)
    block = ODEBlock(MLPODEFunc(3, 8), solver=TIGHT.replace(adjoint=adjoint),
                     trainable_t1=True).double()
    x0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (block(x0) ** 2).sum().backward()
    return [x0.grad, *(p.grad for p in block.parameters())]


class _PairField(nn.Module):
    """d(u, v)/dt = (-u, sum(u)): a tuple state, like a CNF's (z, logp)."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.0))

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        u, _ = state
        return -self.k * u, self.k * u.sum(1, keepdim=True)


@pytest.mark.parametrize("adjoint", [False, True])
def test_a_tuple_state_returns_each_component_at_t1(adjoint: bool) -> None:
    block = ODEBlock(_PairField(), t1=2.0, solver=SolverSpec(
        method="rk4", options={"step_size": 0.01}, adjoint=adjoint)).double()
    u0, v0 = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    u1, v1 = block((u0, v0))
    decay = torch.exp(torch.tensor(-2.0, dtype=torch.float64))
    assert u1.shape == (3, 2) and v1.shape == (3, 1)
    assert torch.allclose(u1, decay * u0, atol=1e-9)
    assert torch.allclose(v1, 2 * (1 - decay) * torch.ones(3, 1, dtype=torch.float64),
                          atol=1e-9)


def test_adjoint_and_backprop_through_the_solver_give_the_same_gradients() -> None:
    for g_adjoint, g_direct in zip(_grads(adjoint=True), _grads(adjoint=False), strict=True):
        torch.testing.assert_close(g_adjoint, g_direct, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adjoint", [True, False])
def test_trainable_t1_gets_the_finite_difference_gradient(adjoint: bool) -> None:
    block = ODEBlock(MLPODEFunc(3, 8), t1=1.2, solver=TIGHT.replace(adjoint=adjoint),
                     trainable_t1=True).double()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    (block(x0) ** 2).sum().backward()
    h = 1e-4
    with torch.no_grad():
        block.set_t1(1.2 + h)
        up = (block(x0) ** 2).sum()
        block.set_t1(1.2 - h)
        down = (block(x0) ** 2).sum()
    finite_difference = (up - down) / (2 * h)
    torch.testing.assert_close(block.t1_tensor.grad, finite_difference, rtol=1e-5, atol=1e-8)


def test_t1_is_a_parameter_only_when_trainable() -> None:
    fixed = ODEBlock(MLPODEFunc(2, 4), t1=2.0)
    trainable = ODEBlock(MLPODEFunc(2, 4), t1=2.0, trainable_t1=True)
    assert "t1_tensor" in dict(fixed.named_buffers())
    assert "t1_tensor" in dict(trainable.named_parameters())
    assert fixed.t1 == trainable.t1 == 2.0 and isinstance(fixed.t1, float)


def test_set_t1_updates_in_place_and_rejects_a_horizon_before_t0() -> None:
    block = ODEBlock(MLPODEFunc(2, 4), t0=0.5, t1=1.0, trainable_t1=True)
    parameter = block.t1_tensor
    block.set_t1(1.5)
    assert block.t1 == 1.5 and block.t1_tensor is parameter
    with pytest.raises(ValueError, match="t1 > t0"):
        block.set_t1(0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"t0": 1.0, "t1": 1.0}, "t1 > t0"),
    ({"t1": -1.0}, "t1 > t0"),
])
def test_block_rejects_a_bad_horizon(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ODEBlock(MLPODEFunc(2, 4), **kwargs)


def test_block_rejects_a_vector_field_that_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        ODEBlock(lambda t, x: x)  # type: ignore[arg-type]


def test_block_takes_its_settings_as_one_solver_spec() -> None:
    block = ODEBlock(MLPODEFunc(2, 4))
    assert block.solver == SolverSpec() and block.adjoint
    with pytest.raises(TypeError, match="SolverSpec"):
        ODEBlock(MLPODEFunc(2, 4), solver={"method": "rk4"})  # type: ignore[arg-type]
    block.solver = SolverSpec(method="rk4", options={"step_size": 0.5}, adjoint=False)
    assert not block.adjoint and block.nfe_forward == 0
    block(torch.randn(3, 2))
    assert block.nfe_forward == 2 * 4  # two rk4 steps
    assert "solver=SolverSpec(method='rk4'" in repr(block)


@pytest.mark.parametrize("adjoint", [True, False])
def test_solver_errors_keep_their_type_and_name_the_block(adjoint: bool) -> None:
    block = ODEBlock(RaisingField(), solver=SolverSpec(adjoint=adjoint), name="encoder")
    with pytest.raises(solvers.NonFiniteStateError, match=r"^ODE block 'encoder': non-finite"):
        block(torch.randn(2, 3))


def test_a_nan_vector_field_raises_a_solver_error_naming_the_block() -> None:
    block = ODEBlock(NaNField(), name="dynamics")
    with pytest.raises(solvers.SolverError, match="ODE block 'dynamics'"):
        block(torch.randn(2, 3))


def test_nfe_counts_fill_on_forward_then_on_backward() -> None:
    block = ODEBlock(MLPODEFunc(3, 8), solver=SolverSpec(adjoint=True))
    out = block(torch.randn(4, 3))
    assert block.nfe_forward > 0 and block.nfe_backward == 0
    out.sum().backward()
    assert block.nfe_backward > 0


def test_mlp_ode_func_stacks_concat_linear_layers() -> None:
    func = MLPODEFunc(3, 16, n_layers=3, activation="relu")
    widths = [(layer._layer.in_features, layer._layer.out_features) for layer in func.layers]
    assert widths == [(4, 16), (17, 16), (17, 3)]
    assert func(0.5, torch.randn(7, 3)).shape == (7, 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"activation": "swish2"}, "unknown activation"),
    ({"n_layers": 0}, "n_layers"),
])
def test_mlp_ode_func_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLPODEFunc(3, 8, **kwargs)


def test_conv_ode_func_keeps_the_image_shape() -> None:
    assert ConvODEFunc(4)(0.1, torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)


def test_mlp_classifier_flattens_inputs_and_forwards_block_settings() -> None:
    spec = SolverSpec(method="rk4", options={"step_size": 0.25}, adjoint=False)
    model = MLPODEClassifier(64, 10, hidden=16, solver=spec, t1=0.5)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert (model.ode.solver, model.ode.adjoint, model.ode.t1) == (spec, False, 0.5)


@pytest.mark.parametrize("side", [8, 28])
def test_conv_classifier_maps_images_to_logits(side: int) -> None:
    model = ConvODEClassifier(1, 10, channels=8,
                              solver=SolverSpec(method="rk4", options={"step_size": 0.5}))
    assert model(torch.randn(2, 1, side, side)).shape == (2, 10)
    assert [b.name for b in ode_blocks(model)] == ["ode"]


def test_conv_classifier_rejects_flat_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ConvODEClassifier(channels=4)(torch.randn(2, 64))


class _Recorder:
    """A solvers.Observer keeping (t, weight) of its samples and counting finish() calls."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.finished = 0

    def __call__(self, t: float, x: Tensor, a: Tensor, weight: float) -> None:
        assert isinstance(x, Tensor) and isinstance(a, Tensor) and x.shape == a.shape
        self.samples.append((float(t), weight))

    def finish(self) -> None:
        self.finished += 1


def test_a_registered_observer_sees_backward_samples_on_its_grid_until_removed() -> None:
    block = ODEBlock(MLPODEFunc(3, 8), t1=1.0, solver=TIGHT)
    observer = _Recorder()
    handle = block.register_observer(observer, dt=0.25)
    block(torch.randn(4, 3)).sum().backward()
    assert [t for t, _ in observer.samples] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert [w for _, w in observer.samples] == pytest.approx([0.125, 0.25, 0.25, 0.25, 0.125])
    assert observer.finished == 1
    handle.remove()
    block(torch.randn(4, 3)).sum().backward()
    assert (len(observer.samples), observer.finished) == (5, 1) and block.observer is None


def test_observer_default_spacing_is_a_hundredth_of_the_horizon() -> None:
    block = ODEBlock(MLPODEFunc(2, 4), t1=2.0)
    observer = _Recorder()
    block.register_observer(observer)
    block(torch.randn(3, 2)).sum().backward()
    weights = [w for _, w in observer.samples]
    assert len(observer.samples) == 101 and sum(weights) == pytest.approx(2.0)
    assert weights[1:-1] == pytest.approx([0.02] * 99)


def test_observers_need_the_adjoint_finish_and_one_at_a_time() -> None:
    with pytest.raises(ValueError, match="adjoint=True"):
        ODEBlock(MLPODEFunc(2, 4), solver=SolverSpec(adjoint=False)).register_observer(
            _Recorder())
    block = ODEBlock(MLPODEFunc(2, 4))
    with pytest.raises(ValueError, match=r"finish\(\)"):
        block.register_observer(lambda t, x, a, w: None)  # type: ignore[arg-type]
    block.register_observer(_Recorder())
    with pytest.raises(ValueError, match="already has an observer"):
        block.register_observer(_Recorder())
    with pytest.raises(ValueError, match="needs the adjoint"):
        block.solver = SolverSpec(adjoint=False)
