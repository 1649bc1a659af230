"""Optimizers: SNOpt, the horizon (T) optimizer, and the exact Newton-CG baseline.

The classes keep the records; the maths are the functions of
:mod:`ocnode.optim.kfac_math` (K-FAC/EKFAC) and :mod:`ocnode.optim.cg` (conjugate gradients,
Hessian-vector products); the curvature they use is collected by :mod:`ocnode.curvature`.
"""

from ocnode.optim.ddpnopt import DDPNOpt, vanilla_ddp_step
from ocnode.optim.horizon import HorizonOptimizer
from ocnode.optim.newton_cg import NewtonCG
from ocnode.optim.snopt import SNOpt

__all__ = ["SNOpt", "HorizonOptimizer", "NewtonCG", "DDPNOpt", "vanilla_ddp_step"]
