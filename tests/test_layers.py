"""Time-conditioned layers: shapes, that time really enters, and the module structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnode.nn.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_concat_linear_keeps_leading_dims() -> None:
    layer = ConcatLinear(5, 7)
    assert layer(0.3, torch.randn(2, 3, 5)).shape == (2, 3, 7)


def test_concat_linear_equals_linear_on_x_with_a_time_column() -> None:
    layer = ConcatLinear(4, 3)
    x = torch.randn(6, 4)
    t = torch.tensor(0.7)
    manual = layer._layer(torch.cat([x, torch.full((6, 1), 0.7)], dim=1))
    torch.testing.assert_close(layer(t, x), manual)


def test_concat_linear_output_changes_with_t() -> None:
    layer = ConcatLinear(4, 3)
    x = torch.randn(6, 4)
    assert not torch.allclose(layer(0.0, x), layer(1.0, x))


@pytest.mark.parametrize("layer", [ConcatLinear(3, 2), ConcatSquashLinear(3, 2)])
def test_python_float_and_zero_dim_tensor_times_agree(layer: nn.Module) -> None:
    x = torch.randn(5, 3)
    torch.testing.assert_close(layer(0.25, x), layer(torch.tensor(0.25), x))


@pytest.mark.parametrize("layer", [ConcatLinear(3, 2), ConcatSquashLinear(3, 2)])
def test_layers_follow_the_state_dtype_and_pass_gradients_to_t(layer: nn.Module) -> None:
    layer = layer.double()
    t = torch.tensor(0.5, requires_grad=True)  # float32 time, float64 state
    out = layer(t, torch.randn(5, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    out.sum().backward()
    assert t.grad is not None and t.grad != 0


def test_concat_conv2d_equals_a_conv_over_a_time_channel_and_x() -> None:
    layer = ConcatConv2d(3, 8, ksize=3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 9, 9)
    t_channel = torch.full((2, 1, 9, 9), 0.4)
    conv = layer._layer
    manual = F.conv2d(torch.cat([t_channel, x], dim=1), conv.weight, conv.bias,
                      stride=2, padding=1)
    torch.testing.assert_close(layer(torch.tensor(0.4), x), manual)
    assert conv.in_channels == 4 and manual.shape == (2, 8, 5, 5)


def test_concat_conv2d_output_changes_with_t() -> None:
    layer = ConcatConv2d(2, 2)
    x = torch.randn(1, 2, 5, 5)
    assert not torch.allclose(layer(0.0, x), layer(1.0, x))


def test_concat_conv2d_transpose_upsamples() -> None:
    layer = ConcatConv2d(4, 2, ksize=4, stride=2, padding=1, transpose=True)
    assert isinstance(layer._layer, nn.ConvTranspose2d)
    assert layer(0.0, torch.randn(3, 4, 6, 6)).shape == (3, 2, 12, 12)


def test_concat_squash_linear_follows_its_formula() -> None:
    layer = ConcatSquashLinear(4, 3)
    x = torch.randn(2, 5, 4)
    t = torch.tensor([[0.3]])
    expected = (layer._layer(x) * torch.sigmoid(layer._hyper_gate(t))
                + layer._hyper_bias(t))
    torch.testing.assert_close(layer(0.3, x), expected)
    assert not torch.allclose(layer(0.0, x), layer(1.0, x))


def test_learnable_maps_are_real_linear_and_conv_submodules() -> None:
    squash = ConcatSquashLinear(4, 3)
    kinds = {name: type(m) for name, m in squash.named_children()}
    assert kinds == {"_layer": nn.Linear, "_hyper_gate": nn.Linear, "_hyper_bias": nn.Linear}
    assert squash._hyper_gate.in_features == 1 and squash._hyper_bias.bias is None
    assert isinstance(ConcatLinear(2, 2)._layer, nn.Linear)
    assert isinstance(ConcatConv2d(2, 2)._layer, nn.Conv2d)


def test_tensor_time_with_several_elements_is_rejected() -> None:
    with pytest.raises(ValueError, match="scalar"):
        ConcatLinear(2, 2)(torch.tensor([0.0, 1.0]), torch.randn(3, 2))
