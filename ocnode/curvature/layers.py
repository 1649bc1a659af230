"""Layer helpers: how one layer type's input and output gradient become Kronecker-factor rows.

A layer h = W z (+ b) contributes the factors A = E_rows[z z^T] and B = E_rows[g g^T] (Martens,
Grosse 2015), with one *row* per place the same weight is applied: one per sample for a
Linear on ``(B, d)`` inputs, one per sample and leading position for ``(B, ..., d)`` inputs,
and one per sample and output location for a Conv2d (its unfolded patches; Grosse, Martens
2016). A helper turns the layer's input x and output gradient g into aligned row matrices:

* ``input_rows(module, x)``: z, shape (M, d_in), without the bias's constant 1 (the factor
  code appends it without copying the rows);
* ``output_rows(module, g)``: g, shape (M, d_out), row k matching row k of z;
* ``has_bias(module)``: whether the layer adds a bias (a last row/column of A);
* ``check(module)``: raise a ValueError, saying what to do, for a configuration the rows do
  not describe (grouped convolutions, circular padding).

The layer's ``weight`` must have shape (d_out, ...) with ``weight[0].numel() == d_in``, so that
the gradient matrix G = [dW reshaped to (d_out, d_in) | db] matches the factors.

Adding a layer type: write one helper class with these four methods in this file and add it to
:data:`LAYER_HELPERS` (or call :func:`register_layer` from your own code). A subclass of a
registered type uses its parent's helper.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn


class LayerHelper(Protocol):
    """What the curvature code needs to know about one layer type."""

    def check(self, module: nn.Module) -> None:
        """Raise a ValueError for a configuration the rows do not describe."""

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Layer input x -> rows z, shape (M, d_in)."""

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Output gradient g (the layer output's shape) -> rows, shape (M, d_out)."""

    def has_bias(self, module: nn.Module) -> bool:
        """Whether the layer adds a bias."""


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


class LinearHelper:
    """``nn.Linear`` on inputs of shape (..., d_in): every leading index is a row."""

    def check(self, module: nn.Module) -> None:
        """Every Linear is supported."""

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (M, d_in), M the product of the leading dims."""
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """(..., d_out) -> (M, d_out)."""
        return g.reshape(-1, g.shape[-1])

    def has_bias(self, module: nn.Module) -> bool:
        """Whether ``module.bias`` exists."""
        return _has_bias(module)


class Conv2dHelper:
    """``nn.Conv2d`` (groups=1, zero padding): rows are the unfolded input patches."""

    def check(self, module: nn.Module) -> None:
        """Reject grouped convolutions and non-zero padding modes."""
        module = cast(nn.Conv2d, module)
        if module.groups != 1:
            raise ValueError(
                f"Conv2d with groups={module.groups} is not supported by the Kronecker "
                "factorisation; use groups=1, or leave the layer out with "
                "SNOpt(..., exclude={layer}) (it then takes the plain SGD step)")
        if module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d padding_mode={module.padding_mode!r} is not supported; use "
                "padding_mode='zeros', or leave the layer out with SNOpt(..., exclude={layer})")

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N * L, C_in * kh * kw), L the number of output locations."""
        module = cast(nn.Conv2d, module)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation,
                           padding=_conv_padding(module), stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """(N, C_out, H', W') -> (N * H' * W', C_out), in the patches' order."""
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])

    def has_bias(self, module: nn.Module) -> bool:
        """Whether ``module.bias`` exists."""
        return _has_bias(module)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """The explicit (h, w) zero padding of a Conv2d, also for padding='valid'/'same'."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        (dh, dw), (kh, kw) = module.dilation, module.kernel_size
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    return module.padding  # type: ignore[return-value]


#: Layer type -> helper. A module is covered when its type (or a parent type) is a key.
LAYER_HELPERS: dict[type[nn.Module], LayerHelper] = {
    nn.Linear: LinearHelper(),
    nn.Conv2d: Conv2dHelper(),
}


def register_layer(layer_type: type[nn.Module], helper: LayerHelper) -> None:
    """Cover ``layer_type`` (and its subclasses) with ``helper`` from now on.

    Raises:
        TypeError: if ``layer_type`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    LAYER_HELPERS[layer_type] = helper


def helper_for(module: nn.Module) -> LayerHelper | None:
    """The helper of ``module``'s type (its nearest registered parent type), or None."""
    for cls in type(module).__mro__:
        helper = LAYER_HELPERS.get(cls)
        if helper is not None:
            return helper
    return None


def is_covered(module: nn.Module) -> bool:
    """Whether the curvature code knows ``module``'s layer type."""
    return helper_for(module) is not None


def check_layer(module: nn.Module) -> None:
    """Raise a ValueError (saying what to do) if ``module`` cannot be Kronecker-factored."""
    helper = helper_for(module)
    if helper is None:
        raise ValueError(f"{type(module).__name__} has no Kronecker-factor helper; register "
                         "one with ocnode.curvature.register_layer, or leave it out")
    helper.check(module)


def _helper(module: nn.Module) -> LayerHelper:
    helper = helper_for(module)
    if helper is None:
        raise ValueError(f"{type(module).__name__} has no Kronecker-factor helper")
    return helper


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as rows z, shape (M, d_in); conv inputs become unfolded patches."""
    return _helper(module).input_rows(module, x)


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient as rows, shape (M, d_out), aligned with :func:`input_rows`."""
    return _helper(module).output_rows(module, g)


def has_bias(module: nn.Module) -> bool:
    """Whether the layer's factor A carries the bias's constant-1 row and column."""
    return _helper(module).has_bias(module)
