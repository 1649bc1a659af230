"""Models: the ODE block, time-conditioned layers, vector fields and the networks built on them.

- :mod:`ocnode.nn.ode`: :class:`ODEBlock` (integrates ``dx/dt = F(t, x)`` over ``[t0, t1]``).
- :mod:`ocnode.nn.layers`: ``ConcatLinear``, ``ConcatConv2d``, ``ConcatSquashLinear``.
- :mod:`ocnode.nn.fields`: ``MLPODEFunc``, ``ConvODEFunc``.
- :mod:`ocnode.nn.classifiers`: ``MLPODEClassifier``, ``ConvODEClassifier``.
- :mod:`ocnode.nn.sequence`: ``ODERNNClassifier`` (irregular time series).
- :mod:`ocnode.nn.trajectory`: ``TrajectoryODE`` (fitting observed trajectories).
- :mod:`ocnode.nn.cnf`: ``CNF`` (continuous normalizing flow).
- :mod:`ocnode.nn.sde`: ``NeuralSDE`` (a Neural SDE fitted to observed trajectories).
- :mod:`ocnode.nn.residual`: ``Residual`` (a skip connection, y = shortcut(x) + body(x)).
"""

from ocnode.nn.classifiers import ConvODEClassifier, MLPODEClassifier
from ocnode.nn.cnf import CNF
from ocnode.nn.fields import ACTIVATIONS, ConvODEFunc, MLPODEFunc
from ocnode.nn.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from ocnode.nn.ode import ObserverHandle, ODEBlock, ode_blocks
from ocnode.nn.residual import Residual
from ocnode.nn.sde import NeuralSDE
from ocnode.nn.sequence import ODERNNClassifier
from ocnode.nn.trajectory import TrajectoryODE

__all__ = [
    "ACTIVATIONS", "CNF", "ConcatConv2d", "ConcatLinear", "ConcatSquashLinear",
    "ConvODEClassifier", "ConvODEFunc", "MLPODEClassifier", "MLPODEFunc", "ODEBlock",
    "NeuralSDE", "ODERNNClassifier", "ObserverHandle", "Residual", "TrajectoryODE",
    "ode_blocks",
]
