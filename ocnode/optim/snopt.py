"""SNOpt: the second-order Neural ODE optimizer (Liu, Chen, Theodorou, NeurIPS 2021).

A :class:`torch.optim.Optimizer` used in the ordinary loop (``zero_grad``, ``backward``,
``step``). Every ``update_freq`` iterations (a *refresh*) a
:class:`~ocnode.curvature.CurvatureCollector` gathers Kronecker factors of the Linear/Conv2d
layers inside ODE blocks along the adjoint's backward solve (O(1) memory), and, with
``full=True``, of the layers outside ODE blocks from the normal backward; SNOpt then
eigendecomposes them and preconditions every step's gradient in the Kronecker eigenbasis
(EKFAC, George et al. 2018) before an SGD step with momentum and weight decay. Parameters that
are not weights/biases of such layers take the plain SGD step. ODE blocks that backpropagate
through their solver (``adjoint=False``) get ordinary K-FAC hooks on every solver evaluation
("K-FAC through the solver", memory linear in the number of steps).

The optimizer keeps the records (state, refresh schedule); the collection is
:mod:`ocnode.curvature`, the maths are the functions of :mod:`ocnode.optim.kfac_math`.

Data-parallel runs set :attr:`SNOpt.sync` (``ocnode.training.distributed`` does): each
process gathers its factors locally, and at a refresh ``step`` averages them over the
processes before the eigendecomposition, then checks that every process holds the same
eigenbases. The per-sample scale of B is the local batch (each process's loss is the mean
over its own rows), and the ``batch`` of EKFAC's m2 update is the global one (the gradient is
the global mean), so N processes of batch b give the curvature of one process of batch N * b.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from ocnode.curvature import CoveredLayer, CurvatureCollector, LayerStats
from ocnode.curvature.collection import FactorSync
from ocnode.curvature.factors import DEFAULT_FACTOR_COST
from ocnode.optim import kfac_math

_GLOBAL = "snopt"  # key of the optimizer-wide counters in self.state
DAMPING_MODES = ("ekfac", "tikhonov")
#: The tensors of a layer's refreshed state that must be equal on every process.
_BASIS_KEYS = ("a_factor", "b_factor", "basis_a", "basis_b", "lam_a", "lam_b", "m2")


def _validate(lr: float, momentum: float, weight_decay: float, eps: float, alpha: float,
              update_freq: int, damping_mode: str) -> None:
    checks = [
        (lr > 0, f"lr must be > 0, got {lr}"),
        (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        (eps > 0, f"eps (damping) must be > 0, got {eps}; 0.03-0.1 are typical"),
        (0 <= alpha <= 1, f"alpha must be in [0, 1] (1 = plain K-FAC), got {alpha}"),
        (isinstance(update_freq, int) and update_freq >= 1,
         f"update_freq must be a positive int, got {update_freq}"),
        (damping_mode in DAMPING_MODES,
         f"damping_mode must be 'ekfac' or 'tikhonov', got {damping_mode!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


class SNOpt(torch.optim.Optimizer):
    """Kronecker-factored second-order optimizer for Neural ODEs (and their stems/heads).

    Call ``zero_grad()`` at the start of every iteration: besides the gradients it drops the
    curvature gathered since the last step, so a refresh iteration whose backward raised
    leaves nothing behind.

    Args:
        model: the network (an ``nn.Module``, not its parameters); its ODEBlocks and
            Linear/Conv2d layers are found by type.
        lr, momentum, weight_decay: the SGD base step (weight decay added after
            preconditioning).
        eps: damping epsilon (0.03-0.1).
        alpha: EKFAC moving-average rate of the second moments; 1 = plain K-FAC.
        update_freq: refresh period K (factors and eigenbases), in iterations. Default 20
            (the SNOpt authors used 100, when a refresh cost 10-30 iterations; with the
            stage curvature it costs about 1.3, and refreshing every 20 iterations
            reached higher accuracy early on the image benchmark).
        full: also precondition Linear/Conv2d layers outside ODE blocks (ordinary K-FAC).
        damping_mode: 'ekfac' (eigenvalue damping, default) or 'tikhonov' (factored
            (A + sqrt(eps) I) (x) (B + sqrt(eps) I)).
        curvature: where the ODE blocks' factors come from: 'stages' (default: the adjoint
            solve's own stage evaluations, weighted by the accepted steps; no extra field
            evaluation) or 'grid' (the field re-evaluated on a time grid of spacing
            ``observer_dt``, the SNOpt authors' way).
        observer_dt: spacing of the curvature grid ('grid'); None: 0.01 * horizon.
        factor_cost: the cost of each factor product relative to the layer's own product,
            per use of the layer (an ODE block's stage evaluation, a forward of an outer
            layer); sets how many samples of the batch form the factors (more: less noisy
            factors, a dearer refresh); None: every sample. The grid curvature uses every
            sample of its grid points.
        fisher: 'empirical' (y = grad of the loss) or 'true' (y = softmax - onehot(y_hat) with
            y_hat sampled from the model; the model's output must be cross-entropy logits;
            a refresh iteration then runs each adjoint backward solve twice).
        memory_budget: bytes an evaluation of the grid samples in one call may hold
            ('grid': the field's saved activations, the factor rows, the buffered samples,
            measured on the first sample), or of factor rows kept before they are multiplied
            out ('stages'); None: 64 MB for the grid, 8 MB for the
            stages (``ocnode.curvature.collection.MEMORY_BUDGETS``).
        stats_batch: use only this many samples of each batch for the ODE-block statistics
            (None: all). The refresh cost scales with it; the factors stay unbiased.
        params: parameters or parameter groups (default: ``model.parameters()``).
        exclude: modules left out of the preconditioning (with everything inside them), e.g.
            a grouped convolution; their parameters take the plain SGD step.

    Attributes:
        collector: the :class:`~ocnode.curvature.CurvatureCollector` on ``model``.
        sync: None (one process), or the data-parallel run's
            :class:`~ocnode.curvature.collection.FactorSync`, called at each refresh.
        state[p] for a preconditioned layer's weight p: ``a_factor``, ``b_factor``,
            ``basis_a``, ``basis_b``, ``lam_a``, ``lam_b``, ``num_locations``, ``m2`` (see
            :class:`ocnode.optim.kfac_math.KroneckerBasis`) after its first refresh.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` (e.g. ``model.parameters()``).
        ValueError: for a bad hyperparameter or an unsupported layer (the message says how
            to exclude it).
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, eps: float = 0.05, alpha: float = 0.75,
                 update_freq: int = 20, full: bool = False, damping_mode: str = "ekfac",
                 observer_dt: float | None = None, fisher: str = "empirical",
                 memory_budget: float | None = None, stats_batch: int | None = None,
                 params: Iterable | None = None, exclude: Iterable[nn.Module] = (),
                 curvature: str = "stages",
                 factor_cost: float | None = DEFAULT_FACTOR_COST) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SNOpt takes the model (an nn.Module), got {type(model).__name__}: "
                            "write SNOpt(model, lr=...), and pass params=... to choose the "
                            "parameters or parameter groups")
        _validate(lr, momentum, weight_decay, eps, alpha, update_freq, damping_mode)
        if observer_dt is not None and curvature != "grid":
            raise ValueError(f"observer_dt={observer_dt} sets the grid of curvature='grid'; "
                             "pass curvature='grid' too, or drop observer_dt (the default "
                             "curvature='stages' has no grid)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        alpha=alpha)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model, self.update_freq, self.damping_mode = model, update_freq, damping_mode
        self.full, self.fisher, self.observer_dt = full, fisher, observer_dt
        self.stats_batch = stats_batch
        self.sync: FactorSync | None = None
        owned = [p for g in self.param_groups for p in g["params"]]
        self.collector = CurvatureCollector(model, owned, full=full, fisher=fisher,
                                            observer_dt=observer_dt, stats_batch=stats_batch,
                                            memory_budget=memory_budget, exclude=exclude,
                                            curvature=curvature, factor_cost=factor_cost)
        if self.collector.uncovered:
            warnings.warn("SNOpt: these parameters of ODE vector fields are in no Linear/Conv2d "
                          "layer, get no curvature and take the plain SGD step: "
                          + ", ".join(self.collector.uncovered), UserWarning, stacklevel=2)
        # torch keys state by parameter; a string key round-trips through state_dict too
        self.state[_GLOBAL] = {"step": 0, "batch": 1}  # type: ignore[index]
        self._arm()

    # ---- schedule ------------------------------------------------------------------------

    def _refresh_due(self) -> bool:
        return self._counters["step"] % self.update_freq == 0

    def _arm(self) -> None:
        """Collect curvature during the coming iteration if it is a refresh."""
        if self._refresh_due():
            self.collector.arm()
        else:
            self.collector.disarm()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop the curvature gathered since the last step."""
        self.collector.discard()
        super().zero_grad(set_to_none=set_to_none)

    # ---- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """Precondition the gradients (refreshing the factors when due) and take an SGD step.

        A non-finite gradient skips the step with a warning and changes no state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            self.collector.discard()
            warnings.warn("SNOpt: non-finite gradient, step skipped (state unchanged); lower "
                          "the learning rate or clip gradients", RuntimeWarning, stacklevel=2)
            return loss
        if self._refresh_due():
            self._refresh(self._global_stats(self.collector.pop()))
            self._agree_bases()
        self._precondition()
        self._sgd()
        self._counters["step"] += 1
        self._arm()
        return loss

    def _grads_finite(self) -> bool:
        return kfac_math.all_finite([p.grad for g in self.param_groups for p in g["params"]
                                     if p.grad is not None])

    def _global_stats(self, stats: dict[nn.Module, LayerStats]) -> dict[nn.Module, LayerStats]:
        """This process's factors, or (with :attr:`sync`) those of the global batch."""
        if self.sync is None:
            return stats
        return self.sync.reduce(list(self.collector.layers.values()), stats)

    def _agree_bases(self) -> None:
        """With :attr:`sync`: the refreshed state, equal on every process."""
        if self.sync is not None:
            layers = self.collector.layers.values()
            self.sync.agree([self.state.get(c.weight, {}).get(k) for c in layers
                             for k in _BASIS_KEYS])

    def _refresh(self, stats: dict[nn.Module, LayerStats]) -> None:
        """Eigendecompose each layer's mean factors and reset its second moments."""
        layers = self.collector.layers
        if layers and not stats:
            warnings.warn("SNOpt: no curvature was collected on this refresh iteration (did "
                          "backward run through the ODE blocks?); keeping the old factors",
                          RuntimeWarning, stacklevel=3)
        for module, st in stats.items():
            layer = layers.get(module)
            if layer is not None:
                self._refresh_layer(layer, st)
        if stats:
            self._counters["batch"] = max(st.batch for st in stats.values())

    def _refresh_layer(self, layer: CoveredLayer, st: LayerStats) -> None:
        basis = kfac_math.refreshed_basis(st.a_factor, st.b_factor, st.num_locations)
        if isinstance(basis, str):
            warnings.warn(f"{type(self).__name__}: {basis} for {layer.module}; keeping the old "
                          "basis", RuntimeWarning, stacklevel=4)
            return
        self.state[layer.weight].update(basis._asdict())

    def _precondition(self) -> None:
        """Replace each preconditioned layer's gradient (weight and bias) in place."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        batch = self._counters["batch"]
        for layer in self.collector.layers.values():
            st = self.state[layer.weight]
            if "m2" not in st or layer.weight.grad is None:
                continue
            g = kfac_math.layer_gradient(layer.weight.grad, self._bias_grad(layer))
            g = self._precondition_matrix(g, st, group_of[id(layer.weight)], batch)
            w, b = kfac_math.split_gradient(g, layer.weight.shape, layer.has_bias)
            layer.weight.grad.copy_(w)
            if layer.bias is not None and layer.bias.grad is not None and b is not None:
                layer.bias.grad.copy_(b)

    @staticmethod
    def _bias_grad(layer: CoveredLayer) -> torch.Tensor | None:
        """The bias column of G: the bias's gradient, zeros where it has none or is not ours."""
        if not layer.has_bias:
            return None
        if layer.bias is not None and layer.bias.grad is not None:
            return layer.bias.grad
        grad = cast(torch.Tensor, layer.weight.grad)
        return grad.new_zeros(layer.weight.shape[0])

    def _precondition_matrix(self, g: torch.Tensor, st: dict, group: dict,
                             batch: int) -> torch.Tensor:
        if self.damping_mode == "tikhonov":
            return kfac_math.tikhonov_precondition(g, st["basis_a"], st["lam_a"], st["basis_b"],
                                                   st["lam_b"], group["eps"],
                                                   st["num_locations"])
        g, st["m2"] = kfac_math.ekfac_precondition(g, st["basis_a"], st["basis_b"], st["m2"],
                                                   group["alpha"], group["eps"], batch)
        return g

    def _sgd(self) -> None:
        """SGD with weight decay (added after preconditioning) and momentum, fused per group."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            d_p = [cast(torch.Tensor, p.grad) for p in params]
            if group["weight_decay"]:
                d_p = list(torch._foreach_add(d_p, params, alpha=group["weight_decay"]))
            if group["momentum"]:
                d_p = self._momentum(params, d_p, group["momentum"])
            torch._foreach_add_(params, d_p, alpha=-group["lr"])

    def _momentum(self, params: list[torch.Tensor], d_p: list[torch.Tensor],
                  momentum: float) -> list[torch.Tensor]:
        """buf <- momentum * buf + d_p (buf = d_p at the first step); returns the buffers."""
        has = ["momentum_buffer" in self.state[p] for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p, h in zip(params, has) if h]
        if bufs:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [d for d, h in zip(d_p, has) if h])
        for p, d, h in zip(params, d_p, has):
            if not h:
                self.state[p]["momentum_buffer"] = d.clone()
        return [self.state[p]["momentum_buffer"] for p in params]

    # ---- state ---------------------------------------------------------------------------

    def close(self) -> None:
        """Detach every observer and hook from the model (to build another optimizer on it)."""
        self.collector.close()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore factors, eigenbases, m2, momentum and counters; re-arm collection.

        Raises:
            ValueError: if a layer's saved factors or bases do not have the shapes of this
                model's layer (a checkpoint of another architecture), or the groups differ.
        """
        state_dict = _renamed_keys(state_dict)
        self._check_layer_shapes(state_dict)
        super().load_state_dict(state_dict)
        self._arm()

    def _check_layer_shapes(self, state_dict: dict[str, Any]) -> None:
        saved = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        if len(saved) != len(current):
            return  # torch's load_state_dict says what differs
        index = {id(p): i for i, p in zip(saved, current)}
        for layer in self.collector.layers.values():
            st = state_dict["state"].get(index.get(id(layer.weight)), {})
            for key, shape in kfac_math.basis_shapes(*layer.shape).items():
                if key in st and tuple(st[key].shape) != shape:
                    raise ValueError(
                        f"SNOpt.load_state_dict: {key} of {layer.module} has shape "
                        f"{tuple(st[key].shape)}, the model's layer needs {shape}; load a "
                        "checkpoint of the same architecture (and the same params order)")

    @property
    def _counters(self) -> dict:
        """Optimizer-wide counters: 'step' (iterations taken) and 'batch' (for EKFAC's B)."""
        return self.state[_GLOBAL]  # type: ignore[index]

    @property
    def iteration(self) -> int:
        """Number of steps taken."""
        return int(self._counters["step"])

    @property
    def preconditioned_layers(self) -> list[nn.Module]:
        """The layers whose gradients are preconditioned."""
        return list(self.collector.layers)


def _renamed_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the rename keep B under 'g_factor'; read it as 'b_factor'."""
    state = state_dict.get("state", {})
    if not any(isinstance(v, dict) and "g_factor" in v for v in state.values()):
        return state_dict
    renamed = {k: ({("b_factor" if n == "g_factor" else n): t for n, t in v.items()}
                   if isinstance(v, dict) else v) for k, v in state.items()}
    return {**state_dict, "state": renamed}
