"""A residual block, y = shortcut(x) + body(x): the marker DGNOpt reads for skip connections.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. DGNOpt
(Liu, Chen, Theodorou, "Dynamic Game Theoretic Neural Optimizer", ICML 2021) sees a net as an
``nn.Sequential`` chain of stages and :class:`Residual` blocks; a block's input is the skip
source x_r that its body's layers reuse at the addition.
"""

from __future__ import annotations

from torch import Tensor, nn


class Residual(nn.Module):
    """y = shortcut(x) + body(x).

    Args:
        body: the residual branch F, e.g. an ``nn.Sequential`` of layers (nested Sequentials
            are fine); its output has the shortcut's output shape.
        shortcut: None (the default) for the identity, or a projection where the body
            changes the shape: a 1x1 ``nn.Conv2d`` (with the body's stride), an
            ``nn.Linear``, or an ``nn.Sequential`` of such a layer and a BatchNorm.

    Shapes:
        x: (B, ...) the block input; y: the body's output shape.

    Raises:
        TypeError: ``body`` or ``shortcut`` is not an ``nn.Module``.
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        for name, m in (("body", body), ("shortcut", shortcut)):
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(f"Residual: {name} must be an nn.Module, got "
                                f"{type(m).__name__}")
        self.body = body
        self.shortcut: nn.Module = nn.Identity() if shortcut is None else shortcut

    @property
    def projected(self) -> bool:
        """Whether the shortcut is a projection (not the identity)."""
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        """y = shortcut(x) + body(x).

        Raises:
            ValueError: the two branches' outputs differ in shape (no broadcasting).
        """
        s, h = self.shortcut(x), self.body(x)
        if s.shape != h.shape:
            raise ValueError(f"Residual: the body's output {tuple(h.shape)} and the shortcut's "
                             f"{tuple(s.shape)} differ; give a projection shortcut, e.g. "
                             "nn.Conv2d(c_in, c_out, 1, stride=s) or nn.Linear(d_in, d_out)")
        return s + h
