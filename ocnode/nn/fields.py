"""Vector fields ``F(t, x)`` of time-conditioned layers: an MLP and the SNOpt image field."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ocnode.nn.layers import ConcatConv2d, ConcatLinear

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


class MLPODEFunc(nn.Module):
    """An MLP vector field of time-conditioned layers: ``dim -> hidden ... -> dim``.

    Args:
        dim: state features.
        hidden: width of the hidden layers.
        n_layers: number of layers (>= 1).
        activation: one of ``"tanh"``, ``"relu"``, ``"softplus"``, ``"elu"``, ``"silu"``.
        layer: the layer class, called as ``layer(d_in, d_out)`` and then ``layer(t, x)``:
            :class:`ConcatLinear` (default) or e.g. ``ConcatSquashLinear``.

    Attributes:
        supports_batched_time: ``t`` may be a ``(B,)`` per-row time vector (see layers).
    """

    supports_batched_time = True

    def __init__(self, dim: int, hidden: int, n_layers: int = 2, activation: str = "tanh",
                 layer: Callable[[int, int], nn.Module] = ConcatLinear) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        widths = [dim] + [hidden] * (n_layers - 1) + [dim]
        self.layers = nn.ModuleList(
            layer(d_in, d_out) for d_in, d_out in itertools.pairwise(widths))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, t: float | Tensor, x: Tensor) -> Tensor:
        """``(..., dim) -> (..., dim)``."""
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.activation(x)
            x = layer(t, x)
        return x


class ConvODEFunc(nn.Module):
    """The SNOpt image vector field: ``conv2(t, relu(conv1(t, x)))`` with 3x3 ConcatConv2d.

    Args:
        channels: channels of the state (input and output).

    Attributes:
        supports_batched_time: ``t`` may be a ``(B,)`` per-row time vector (see layers).
    """

    supports_batched_time = True

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = ConcatConv2d(channels, channels, ksize=3, padding=1)
        self.conv2 = ConcatConv2d(channels, channels, ksize=3, padding=1)

    def forward(self, t: float | Tensor, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return self.conv2(t, F.relu(self.conv1(t, x)))
