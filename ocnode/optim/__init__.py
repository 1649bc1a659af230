"""Optimal-control-theoretic optimizers: SNOpt and the horizon (T) optimizer.

The classes keep the records; the maths are the functions of
:mod:`ocnode.optim.functional`.
"""

from ocnode.optim.horizon import HorizonOptimizer
from ocnode.optim.snopt import SNOpt

__all__ = ["SNOpt", "HorizonOptimizer"]
