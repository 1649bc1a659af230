"""Optimizers: SNOpt, the horizon (T) optimizer, and the exact Newton-CG baseline.

The classes keep the records; the maths are the functions of
:mod:`ocnode.optim.functional`.
"""

from ocnode.optim.horizon import HorizonOptimizer
from ocnode.optim.newton_cg import NewtonCG
from ocnode.optim.snopt import SNOpt

__all__ = ["SNOpt", "HorizonOptimizer", "NewtonCG"]
