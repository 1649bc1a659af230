"""Neural ODE classifiers: a stem, one :class:`ODEBlock`, a head."""

from __future__ import annotations

from torch import Tensor, nn

from ocnode.nn.fields import ConvODEFunc, MLPODEFunc
from ocnode.nn.ode import ODEBlock
from solvers import SolverSpec


class MLPODEClassifier(nn.Module):
    """``Linear`` stem -> :class:`ODEBlock` of an :class:`MLPODEFunc` -> ``Linear`` head.

    Args:
        in_dim: input features (inputs are flattened after the batch dimension).
        n_classes: number of classes (logits returned).
        hidden: width of the ODE state and of the vector field's hidden layers.
        n_layers: ConcatLinear layers in the vector field.
        activation: activation of the vector field.
        solver: the ODE block's solver settings; None: ``SolverSpec()`` (dopri5, rtol = atol
            = 1e-3, adjoint).
        t1: the ODE block's horizon (t0 = 0).
        trainable_t1: learn the horizon (see :class:`ODEBlock`).
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 64, n_layers: int = 2,
                 activation: str = "tanh", solver: SolverSpec | None = None, t1: float = 1.0,
                 trainable_t1: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(in_dim, hidden)
        self.ode = ODEBlock(MLPODEFunc(hidden, hidden, n_layers, activation), t1=t1,
                            solver=solver, trainable_t1=trainable_t1)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, *) -> (B, n_classes)`` logits."""
        return self.head(self.ode(self.stem(x.flatten(1))))


class ConvODEClassifier(nn.Module):
    """Conv stem -> :class:`ODEBlock` of a :class:`ConvODEFunc` -> pooled ``Linear`` head.

    The stem (conv3x3, ReLU, conv3x3 stride 2, ReLU, conv3x3 stride 2) brings the image to
    ``channels`` channels at a quarter of its side, as in the SNOpt/ANODE MNIST networks.

    Args:
        in_channels: image channels.
        n_classes: number of classes (logits returned).
        channels: channels of the ODE state.
        solver: the ODE block's solver settings; None: ``SolverSpec()`` (dopri5, rtol = atol
            = 1e-3, adjoint).
        t1: the ODE block's horizon (t0 = 0).
        trainable_t1: learn the horizon (see :class:`ODEBlock`).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, channels: int = 64,
                 solver: SolverSpec | None = None, t1: float = 1.0,
                 trainable_t1: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=1, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        )
        self.ode = ODEBlock(ConvODEFunc(channels), t1=t1, solver=solver,
                            trainable_t1=trainable_t1)
        self.head = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, n_classes)`` logits."""
        if x.dim() != 4:
            raise ValueError(f"ConvODEClassifier expects images (B, C, H, W), got shape "
                             f"{tuple(x.shape)}; reshape flat inputs first")
        return self.head(self.ode(self.stem(x)))
