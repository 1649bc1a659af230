"""Optimizers: SNOpt, the horizon (T) optimizer, the exact Newton-CG baseline, DDPNOpt (chains),
DGNOpt (residual nets) and the E-MSA baseline (chains).

The classes keep the records; the maths are the functions of
:mod:`ocnode.optim.kfac_math` (K-FAC/EKFAC) and :mod:`ocnode.optim.cg` (conjugate gradients,
Hessian-vector products); the curvature they use is collected by :mod:`ocnode.curvature`.
"""

from ocnode.optim.ddpnopt import DDPNOpt, vanilla_ddp_step
from ocnode.optim.dgnopt import DGNOpt
from ocnode.optim.emsa import EMSA
from ocnode.optim.horizon import HorizonOptimizer
from ocnode.optim.newton_cg import NewtonCG
from ocnode.optim.snopt import SNOpt

__all__ = ["SNOpt", "HorizonOptimizer", "NewtonCG", "DDPNOpt", "DGNOpt", "EMSA",
           "vanilla_ddp_step"]
