"""Optimizers: SNOpt, the horizon (T) optimizer, the exact Newton-CG baseline, DDPNOpt (chains)
and DGNOpt (residual nets).

The classes keep the records; the maths are the functions of
:mod:`ocnode.optim.kfac_math` (K-FAC/EKFAC) and :mod:`ocnode.optim.cg` (conjugate gradients,
Hessian-vector products); the curvature they use is collected by :mod:`ocnode.curvature`.
"""

from ocnode.optim.ddpnopt import DDPNOpt, vanilla_ddp_step
from ocnode.optim.dgnopt import DGNOpt
from ocnode.optim.horizon import HorizonOptimizer
from ocnode.optim.newton_cg import NewtonCG
from ocnode.optim.snopt import SNOpt

__all__ = ["SNOpt", "HorizonOptimizer", "NewtonCG", "DDPNOpt", "DGNOpt", "vanilla_ddp_step"]
