"""ocnode: Neural ODE training with optimal-control (second-order) optimizers."""

from ocnode.data import load_dataset
from ocnode.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from ocnode.models import (
    ConvODEClassifier,
    ConvODEFunc,
    MLPODEClassifier,
    MLPODEFunc,
    ODEBlock,
)
from ocnode.training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConvODEClassifier",
    "ConvODEFunc",
    "MLPODEClassifier",
    "MLPODEFunc",
    "ODEBlock",
    "TrainConfig",
    "__version__",
    "load_dataset",
    "train",
]
