"""ocnode: Neural ODE training with optimal-control (second-order) optimizers."""

from ocnode.data import load_dataset
from ocnode.nn import (
    CNF,
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashLinear,
    ConvODEClassifier,
    ConvODEFunc,
    MLPODEClassifier,
    MLPODEFunc,
    NeuralSDE,
    ODEBlock,
    ODERNNClassifier,
    Residual,
    TrajectoryODE,
)
from ocnode.optim import DDPNOpt, DGNOpt, SNOpt
from ocnode.training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConvODEClassifier",
    "ConvODEFunc",
    "DDPNOpt",
    "DGNOpt",
    "MLPODEClassifier",
    "MLPODEFunc",
    "NeuralSDE",
    "ODEBlock",
    "ODERNNClassifier",
    "Residual",
    "SNOpt",
    "TrainConfig",
    "TrajectoryODE",
    "__version__",
    "load_dataset",
    "train",
]
