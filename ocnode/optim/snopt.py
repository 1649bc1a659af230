"""SNOpt: the second-order Neural ODE optimizer (Liu, Chen, Theodorou, NeurIPS 2021).

A :class:`torch.optim.Optimizer` used in the ordinary loop (``zero_grad``, ``backward``,
``step``). Every ``update_freq`` iterations (a *refresh*) it collects Kronecker factors of the
Linear/Conv2d layers inside ODE blocks along the adjoint's backward solve (O(1) memory), and,
with ``full=True``, of the layers outside ODE blocks from the normal backward; it then
eigendecomposes them and preconditions every step's gradient in the Kronecker eigenbasis
(EKFAC, George et al. 2018) before an SGD step with momentum and weight decay. Parameters that
are not weights/biases of such layers take the plain SGD step. ODE blocks that backpropagate
through their solver (``adjoint=False``) get ordinary K-FAC hooks on every solver evaluation
("K-FAC through the solver", memory linear in the number of steps).

The bookkeeping lives here; the maths are the functions of :mod:`ocnode.optim.functional`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ocnode.curvature import (
    TRACKED,
    FactorCollector,
    LayerStats,
    ODECurvatureObserver,
    check_layer,
    hook_layers,
)
from ocnode.nn.ode import ODEBlock
from ocnode.optim import functional as Fn

_GLOBAL = "snopt"  # key of the optimizer-wide counters in self.state


@dataclass
class _Layer:
    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None


def _validate(lr: float, momentum: float, weight_decay: float, eps: float, alpha: float,
              update_freq: int, damping: str, fisher: str) -> None:
    checks = [
        (lr > 0, f"lr must be > 0, got {lr}"),
        (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        (eps > 0, f"eps (damping) must be > 0, got {eps}; 0.03-0.1 are typical"),
        (0 <= alpha <= 1, f"alpha must be in [0, 1] (1 = plain K-FAC), got {alpha}"),
        (isinstance(update_freq, int) and update_freq >= 1,
         f"update_freq must be a positive int, got {update_freq}"),
        (damping in ("ekfac", "tikhonov"),
         f"damping must be 'ekfac' or 'tikhonov', got {damping!r}"),
        (fisher in ("empirical", "true"), f"fisher must be 'empirical' or 'true', got {fisher!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


class SNOpt(torch.optim.Optimizer):
    """Kronecker-factored second-order optimizer for Neural ODEs (and their stems/heads).

    Args:
        model: the network; its ODEBlocks and Linear/Conv2d layers are found by type.
        lr, momentum, weight_decay: the SGD base step (weight decay added after
            preconditioning).
        eps: damping epsilon (ALGORITHM.md 1.6; 0.03-0.1).
        alpha: EKFAC moving-average rate of the second moments; 1 = plain K-FAC.
        update_freq: refresh period K (factors and eigenbases), in iterations.
        full: also precondition Linear/Conv2d layers outside ODE blocks (ordinary K-FAC).
        damping: 'ekfac' (eigenvalue damping, default) or 'tikhonov' (factored
            (A + sqrt(eps) I) (x) (B + sqrt(eps) I)).
        observer_dt: spacing of the curvature grid along each solve; None: 0.01 * horizon.
        fisher: 'empirical' (y = grad of the loss) or 'true' (y = softmax - onehot(y_hat) with
            y_hat sampled from the model; the model's output must be cross-entropy logits).
        memory_budget: bytes of stacked ODE states evaluated per batched grid chunk.
        stats_batch: use only this many samples of each batch for the ODE-block statistics
            (None: all). The refresh cost scales with it; the factors stay unbiased.
        params: parameters or parameter groups (default: ``model.parameters()``).
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, eps: float = 0.05, alpha: float = 0.75,
                 update_freq: int = 100, full: bool = False, damping: str = "ekfac",
                 observer_dt: float | None = None, fisher: str = "empirical",
                 memory_budget: float = 64e6, stats_batch: int | None = None,
                 params: Iterable | None = None) -> None:
        _validate(lr, momentum, weight_decay, eps, alpha, update_freq, damping, fisher)
        if stats_batch is not None and not (isinstance(stats_batch, int) and stats_batch >= 1):
            raise ValueError(f"stats_batch must be a positive int or None, got {stats_batch!r}")
        self.stats_batch = stats_batch
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        alpha=alpha)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model, self.update_freq, self.full = model, update_freq, full
        self.damping, self.fisher, self.observer_dt = damping, fisher, observer_dt
        self.collector = FactorCollector()
        self._observers: list[ODECurvatureObserver] = []
        self._handles: list = []
        self._layers = self._find_layers(memory_budget)
        # torch keys state by parameter; a string key round-trips through state_dict too
        self.state[_GLOBAL] = {"step": 0, "batch": 1}  # type: ignore[index]
        self._arm()

    # ---- discovery ---------------------------------------------------------------------

    def _find_layers(self, memory_budget: float) -> dict[nn.Module, _Layer]:
        """Map each preconditioned layer to its parameters; build the block observers."""
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        blocks = [m for m in self.model.modules() if isinstance(m, ODEBlock)]
        inner = {id(m) for b in blocks for m in b.func.modules()}
        self._block_layers: list[tuple[ODEBlock, Sequence[nn.Module]]] = []
        self._hooked: list[nn.Module] = []
        layers: dict[nn.Module, _Layer] = {}
        for block in blocks:
            mods: list[nn.Module] = [m for m in block.func.modules() if isinstance(m, TRACKED)]
            (self._block_layers.append((block, mods)) if block.adjoint
             else self._hooked.extend(mods))
            layers.update(self._own(mods, owned))
        outer: list[nn.Module] = [m for m in self.model.modules() if isinstance(m, TRACKED)
                                  and id(m) not in inner] if self.full else []
        self._hooked.extend(outer)
        layers.update(self._own(outer, owned))
        self._memory_budget = memory_budget
        return layers

    @staticmethod
    def _own(modules: Sequence[nn.Module], owned: set[int]) -> dict[nn.Module, _Layer]:
        out = {}
        for m in modules:
            weight, bias = cast(torch.Tensor, m.weight), cast(torch.Tensor | None, m.bias)
            if id(weight) in owned:
                check_layer(m)
                out[m] = _Layer(m, weight, bias if bias is not None and id(bias) in owned
                                else None)
        return out

    # ---- collection (alive only on refresh iterations) ---------------------------------

    def _refresh_due(self) -> bool:
        return self._counters["step"] % self.update_freq == 0

    def _arm(self) -> None:
        """Register observers and hooks if the coming iteration is a refresh."""
        self._disarm()
        if not self._refresh_due():
            return
        for block, mods in self._block_layers:
            obs = ODECurvatureObserver(block.func, mods, self.collector,
                                       getattr(block.func, "supports_batched_time", False),
                                       self._memory_budget, self.stats_batch)
            self._observers.append(obs)
            self._handles.append(block.register_observer(obs, self.observer_dt))
        self._handles += hook_layers(self._hooked, self.collector)
        if self.fisher == "true":
            self._handles.append(self.model.register_forward_hook(self._true_fisher_hook))
        self.collector.enabled = self.fisher == "empirical"

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._observers = [], []

    def _true_fisher_hook(self, module: nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        """On the real backward's arrival at the logits, run one backward of the sampled loss.

        The sampled loss is cross-entropy with labels drawn from softmax(logits); its backward
        (with the collectors switched on) feeds the factors, and accumulates no gradient.
        """
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return
        sources = [p for p in self.model.parameters() if p.requires_grad]

        fired = False

        def hook(_grad: torch.Tensor) -> None:
            nonlocal fired
            if fired:  # the nested backward below reaches this tensor again
                return
            fired = True
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=-1)
                y_hat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(
                    probs.shape[:-1])
                y = (probs - nn.functional.one_hot(y_hat, probs.shape[-1])) / y_hat.numel()
            self.collector.enabled = True
            try:
                torch.autograd.grad(logits, sources, y.to(logits.dtype), retain_graph=True,
                                    allow_unused=True)
            finally:
                self.collector.enabled = False

        logits.register_hook(hook)

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
        refresh = self._refresh_due()
        if refresh:
            for obs in self._observers:
                obs.flush()
        if not self._grads_finite():
            self.collector.pop()
            warnings.warn("SNOpt: non-finite gradient, step skipped (state unchanged); lower "
                          "the learning rate or clip gradients", RuntimeWarning, stacklevel=2)
            return loss
        if refresh:
            self._refresh(self.collector.pop())
        self._precondition()
        self._sgd()
        self._counters["step"] += 1
        self._arm()
        return loss

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        # max |g| per tensor in one fused call: NaN and +-inf survive it, huge values do not
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())

    def _refresh(self, stats: dict[nn.Module, LayerStats]) -> None:
        """Eigendecompose each layer's mean factors and reset its second moments."""
        if self._layers and not stats:
            warnings.warn("SNOpt: no curvature was collected on this refresh iteration (did "
                          "backward run through the ODE blocks?); keeping the old factors",
                          RuntimeWarning, stacklevel=3)
        for module, st in stats.items():
            layer = self._layers.get(module)
            if layer is not None:
                self._refresh_layer(layer, st)
        if stats:
            self._counters["batch"] = max(st.batch for st in stats.values())

    def _refresh_layer(self, layer: _Layer, st: LayerStats) -> None:
        a_factor, g_factor = st.a_sum / st.uses, st.b_sum / st.uses
        if not (bool(torch.isfinite(a_factor).all()) and bool(torch.isfinite(g_factor).all())):
            warnings.warn(f"SNOpt: non-finite factor for {layer.module}; keeping the old "
                          "basis", RuntimeWarning, stacklevel=4)
            return
        try:
            lam_a, basis_a = Fn.eigenbasis(a_factor)
            lam_b, basis_b = Fn.eigenbasis(g_factor)
        except torch.linalg.LinAlgError:
            warnings.warn(f"SNOpt: eigh failed for {layer.module}; keeping the old basis",
                          RuntimeWarning, stacklevel=4)
            return
        num_locations = st.uses * st.locations
        self.state[layer.weight].update(
            a_factor=a_factor, g_factor=g_factor, basis_a=basis_a, basis_b=basis_b,
            lam_a=lam_a, lam_b=lam_b, num_locations=num_locations,
            m2=Fn.reset_second_moment(lam_a, lam_b, num_locations))

    def _precondition(self) -> None:
        """Replace each preconditioned layer's gradient (weight and bias) in place."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        batch = self._counters["batch"]
        for layer in self._layers.values():
            st = self.state[layer.weight]
            if "m2" not in st or layer.weight.grad is None:
                continue
            group = group_of[id(layer.weight)]
            bias_grad = layer.bias.grad if layer.bias is not None else None
            if layer.bias is not None and bias_grad is None:
                bias_grad = torch.zeros_like(layer.bias)
            g = Fn.layer_gradient(layer.weight.grad, bias_grad)
            g = self._precondition_matrix(g, st, group, batch)
            w, b = Fn.split_gradient(g, layer.weight.shape, layer.bias is not None)
            layer.weight.grad.copy_(w)
            if layer.bias is not None and layer.bias.grad is not None and b is not None:
                layer.bias.grad.copy_(b)

    def _precondition_matrix(self, g: torch.Tensor, st: dict, group: dict,
                             batch: int) -> torch.Tensor:
        if self.damping == "tikhonov":
            return Fn.tikhonov_precondition(g, st["basis_a"], st["lam_a"], st["basis_b"],
                                            st["lam_b"], group["eps"], st["num_locations"])
        g, st["m2"] = Fn.ekfac_precondition(g, st["basis_a"], st["basis_b"], st["m2"],
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

    def close(self) -> None:
        """Detach every observer and hook from the model (to build another optimizer on it)."""
        self._disarm()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore factors, eigenbases, m2, momentum and counters; re-arm collection."""
        super().load_state_dict(state_dict)
        self._arm()

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
        return list(self._layers)
