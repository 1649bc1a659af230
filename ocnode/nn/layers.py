"""Time-conditioned layers for Neural ODE vector fields F(t, x).

Every layer is called as ``layer(t, x)`` with ``t`` a python float, a 0-dim tensor, or a
per-row time vector of shape ``(B,)`` (one time per leading row of ``x``; the curvature
observer evaluates many grid times in one batched call this way), and keeps its learnable
maps in real ``nn.Linear`` / ``nn.Conv2d`` submodules (``_layer``, ``_hyper_gate``,
``_hyper_bias``): the curvature code of the second-order optimizers hooks
those module types, and time is simply one more input column or channel for them
(docs/algorithms.md, "Kronecker factors").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _time_like(t: float | Tensor, x: Tensor) -> Tensor:
    """Return ``t`` with the dtype/device of ``x``, shaped to broadcast over ``x``'s rows.

    Args:
        t: a python number, a one-element tensor, or a ``(B,)`` tensor with B = x.shape[0].
        x: the state, ``(B, ...)``.

    Returns:
        A 0-dim tensor, or ``(B, 1, ..., 1)`` with ``x.dim()`` dims for per-row times.
        Gradients still flow back to ``t`` when it is a tensor.
    """
    if not isinstance(t, Tensor):
        return torch.tensor(float(t), dtype=x.dtype, device=x.device)
    t = t.to(dtype=x.dtype, device=x.device)
    if t.numel() == 1:
        return t.reshape(())
    if x.dim() >= 1 and t.numel() == x.shape[0]:
        return t.reshape(x.shape[0], *([1] * (x.dim() - 1)))
    raise ValueError(f"t must be a scalar or hold one time per row of x ({x.shape[0]}), got "
                     f"shape {tuple(t.shape)}")


class ConcatLinear(nn.Module):
    """``Linear(cat([x, t]))``: a linear map that also sees the time as an extra column.

    Args:
        dim_in: features of ``x``.
        dim_out: output features.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self._layer = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: time: a python float, 0-dim tensor or ``(B,)`` per-row times.
            x: ``(B, ..., dim_in)``.

        Returns:
            ``(B, ..., dim_out)``.
        """
        tt = _time_like(t, x).expand(*x.shape[:-1], 1)
        return self._layer(torch.cat([x, tt], dim=-1))


class ConcatConv2d(nn.Module):
    """A 2-D convolution over ``cat([t-channel, x])``, the t-channel filled with ``t``.

    The inner convolution has ``dim_in + 1`` input channels. Arguments follow ``nn.Conv2d``;
    ``transpose=True`` uses ``nn.ConvTranspose2d`` instead.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        ksize: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        transpose: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self._layer = conv(
            dim_in + 1,
            dim_out,
            kernel_size=ksize,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )

    def forward(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: time: a python float, 0-dim tensor or ``(B,)`` per-row times.
            x: ``(B, dim_in, H, W)``.

        Returns:
            ``(B, dim_out, H', W')``.
        """
        tt = _time_like(t, x).expand(x.shape[0], 1, *x.shape[2:])
        return self._layer(torch.cat([tt, x], dim=1))


class ConcatSquashLinear(nn.Module):
    """``Linear(x) * sigmoid(Linear_gate(t)) + Linear_bias(t)`` (Grathwohl et al. 2019, FFJORD).

    The two hyper-layers are ``nn.Linear(1, dim_out)`` (the bias one without a bias of its
    own) that see a scalar ``t`` as a batch of one, shape ``(1, 1)``, and per-row times as
    ``(B, 1)``.

    Args:
        dim_in: features of ``x``.
        dim_out: output features.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_gate = nn.Linear(1, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: float | Tensor, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: time: a python float, 0-dim tensor or ``(B,)`` per-row times.
            x: ``(B, ..., dim_in)``.

        Returns:
            ``(B, ..., dim_out)``.
        """
        tt = _time_like(t, x)
        rows = 1 if tt.dim() == 0 else x.shape[0]
        shape = (-1,) if tt.dim() == 0 else (rows, *([1] * (x.dim() - 2)), -1)
        tt = tt.reshape(rows, 1)
        gate = torch.sigmoid(self._hyper_gate(tt)).reshape(shape)
        return self._layer(x) * gate + self._hyper_bias(tt).reshape(shape)
