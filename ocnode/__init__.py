"""ocnode: Neural ODE training with optimal-control (second-order) optimizers."""

from ocnode.cnf import CNF
from ocnode.data import load_dataset
from ocnode.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from ocnode.models import (
    ConvODEClassifier,
    ConvODEFunc,
    MLPODEClassifier,
    MLPODEFunc,
    ODEBlock,
)
from ocnode.sequence import ODERNNClassifier
from ocnode.training import TrainConfig, train
from ocnode.trajectory import TrajectoryODE

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConvODEClassifier",
    "ConvODEFunc",
    "MLPODEClassifier",
    "MLPODEFunc",
    "ODEBlock",
    "ODERNNClassifier",
    "TrainConfig",
    "TrajectoryODE",
    "__version__",
    "load_dataset",
    "train",
]
