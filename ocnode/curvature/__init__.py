"""Curvature for the Kronecker-factored optimizers: layer helpers, factor collection, exact ODEs.

* :class:`CurvatureCollector` (collection): finds a model's covered layers and gathers their
  Kronecker factors for one iteration at a time, from ODE blocks' adjoint solves (their own
  stage evaluations, :class:`ODEStageObserver`, or a time grid, :class:`ODEObserver`) and
  from the normal backward (:class:`KFACHooks`).
* layers: one helper per layer type (:class:`LinearHelper`, :class:`Conv2dHelper`) and the
  registry :data:`LAYER_HELPERS` / :func:`register_layer` to add one.
* factors: :func:`factor_sums`, :class:`LayerStats`, :class:`FactorAccumulator`.
* exact: :func:`second_order_backward`, the exact second-order backward ODEs (small problems).

References: Martens, Grosse 2015 (K-FAC); Grosse, Martens 2016 (convolutions); Liu, Chen,
Theodorou 2021, "Second-order Neural ODE Optimizer".
"""

from ocnode.curvature.collection import CoveredLayer, CurvatureCollector, sampled_logit_gradient
from ocnode.curvature.exact import second_order_backward
from ocnode.curvature.factors import FactorAccumulator, LayerStats, factor_sums
from ocnode.curvature.kfac import KFACHooks
from ocnode.curvature.layers import (
    LAYER_HELPERS,
    Conv2dHelper,
    LayerHelper,
    LinearHelper,
    check_layer,
    helper_for,
    input_rows,
    is_covered,
    output_rows,
    register_layer,
)
from ocnode.curvature.observer import ODEObserver, supports_batched_time
from ocnode.curvature.stages import ODEStageObserver

__all__ = [
    "LAYER_HELPERS",
    "Conv2dHelper",
    "CoveredLayer",
    "CurvatureCollector",
    "FactorAccumulator",
    "KFACHooks",
    "LayerHelper",
    "LayerStats",
    "LinearHelper",
    "ODEObserver",
    "ODEStageObserver",
    "check_layer",
    "factor_sums",
    "helper_for",
    "input_rows",
    "is_covered",
    "output_rows",
    "register_layer",
    "sampled_logit_gradient",
    "second_order_backward",
    "supports_batched_time",
]
