"""One object that collects a model's Kronecker factors for an optimizer, one iteration at a time.

:class:`CurvatureCollector` finds the covered layers (:mod:`ocnode.curvature.layers`) of a model
and where their factors come from:

* inside ODE blocks with ``adjoint=True``: an observer of the block's adjoint backward solve
  (O(1) memory; Liu, Chen, Theodorou 2021): by default (``curvature="stages"``) an
  :class:`~ocnode.curvature.stages.ODEStageObserver`, which reads the solve's own
  evaluations, or (``curvature="grid"``) an :class:`~ocnode.curvature.observer.ODEObserver`,
  which re-evaluates the field on a time grid;
* inside ODE blocks that backpropagate through their solver, and (``full=True``) outside ODE
  blocks: ordinary K-FAC hooks (:class:`~ocnode.curvature.kfac.KFACHooks`).

Observers and hooks exist only between :meth:`~CurvatureCollector.arm` and
:meth:`~CurvatureCollector.disarm` (or the next ``arm``), so iterations without a refresh cost
nothing. :meth:`~CurvatureCollector.pop` hands out the factors of the armed iteration;
:meth:`~CurvatureCollector.discard` drops them (a backward that raised).

Empirical Fisher (``fisher="empirical"``): the factors come from the loss's own backward.
True Fisher (``fisher="true"``): the model's output must be cross-entropy logits; when the
loss's backward arrives at them, one more backward runs from the logits with labels sampled
from softmax(logits), and only that pass feeds the factors. Its cost: the loss's backward has
adjoint a(t1) = dL/dx(t1), the sampled pass dL~/dx(t1); the observer needs the sampled a(t) on
the grid and the gradient needs the real one, two different solutions of the adjoint ODE, so a
refresh iteration runs each adjoint block's backward solve twice (twice the backward NFE, e.g.
14 -> 28 for a dopri5 MLP block; docs/algorithms.md, "SNOpt: second-order training of Neural
ODEs"). Iterations without a refresh are unaffected.

Data-parallel runs: the collector itself never communicates (adaptive solvers take a different
number of steps on each process, so a collective inside a solve or a hook could wait
forever). The optimizer that pops the factors hands them, inside its ``step``, to a
:class:`FactorSync` (``ocnode.training.distributed`` provides one), which averages them over
the processes before the eigendecomposition.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from ocnode.curvature.factors import DEFAULT_FACTOR_COST, FactorAccumulator, LayerStats
from ocnode.curvature.kfac import KFACHooks
from ocnode.curvature.layers import check_layer, has_bias, is_covered
from ocnode.curvature.observer import ODEObserver, supports_batched_time
from ocnode.curvature.stages import ODEStageObserver
from ocnode.nn.ode import ODEBlock, ode_blocks

FISHERS = ("empirical", "true")
CURVATURES = ("stages", "grid")
#: Default ``memory_budget`` per curvature mode: the stage rows are flushed into the factor
#: sums at 8 MB (a refresh's peak memory stays flat in the number of solver steps), a grid
#: chunk may hold 64 MB of activations (fewer, larger calls of the field).
MEMORY_BUDGETS = {"stages": 8e6, "grid": 64e6}


@dataclass(frozen=True)
class CoveredLayer:
    """A Kronecker-factored layer and its parameters.

    Attributes:
        module: the layer.
        weight: its weight, (d_out, ...), one of the collector's parameters.
        bias: its bias (d_out,) when it is one of the collector's parameters, else None.
        has_bias: whether the factor A carries the bias row (the module has a bias, whether
            or not it is one of the parameters).
    """

    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    has_bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in [+1]): the shape of the layer's gradient matrix G."""
        d_out = self.weight.shape[0]
        return d_out, self.weight.numel() // d_out + int(self.has_bias)


class FactorSync(Protocol):
    """What an optimizer calls, inside ``step``, to keep curvature equal across the processes
    of a data-parallel run. Every process must make the same calls in the same order."""

    def reduce(self, layers: Sequence[CoveredLayer],
               stats: dict[nn.Module, LayerStats]) -> dict[nn.Module, LayerStats]:
        """The statistics of the global batch from each process's local ``stats`` of
        ``layers`` (a layer missing from ``stats`` counts as unseen on this process)."""
        ...

    def agree(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """Make ``tensors`` (None: absent here) equal on every process, in place."""
        ...

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the processes."""
        ...


def sampled_logit_gradient(logits: torch.Tensor) -> torch.Tensor:
    """Gradient of the mean cross-entropy at labels sampled from the model, d L~ / d logits.

    Args:
        logits: (..., C); each row's label y~ is drawn from softmax(row).

    Returns:
        (softmax(logits) - onehot(y~)) / rows, shape and dtype of ``logits``.
    """
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1)
        y_hat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])
        y = (probs - nn.functional.one_hot(y_hat, probs.shape[-1])) / y_hat.numel()
    return y.to(logits.dtype)


def _validate(fisher: str, curvature: str, observer_dt: float | None, stats_batch: int | None,
              memory_budget: float | None, factor_cost: float | None) -> None:
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be 'stages' (the adjoint solve's own evaluations) or "
                         f"'grid' (re-evaluations on a time grid), got {curvature!r}")
    if factor_cost is not None and not (isinstance(factor_cost, (int, float))
                                        and factor_cost > 0):
        raise ValueError(f"factor_cost must be > 0 or None (every sample), got {factor_cost!r}")
    if observer_dt is not None and not observer_dt > 0:
        raise ValueError(f"observer_dt must be > 0 or None, got {observer_dt!r}")
    if stats_batch is not None and not (isinstance(stats_batch, int) and stats_batch >= 1):
        raise ValueError(f"stats_batch must be a positive int or None, got {stats_batch!r}")
    if memory_budget is not None and not memory_budget > 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget!r}")


def _module_set(exclude: Iterable[nn.Module]) -> set[int]:
    """Ids of the excluded modules and of everything inside them."""
    out: set[int] = set()
    for m in exclude:
        if not isinstance(m, nn.Module):
            raise TypeError(f"exclude must hold nn.Modules (layers or containers), got "
                            f"{type(m).__name__}")
        out.update(id(sub) for sub in m.modules())
    return out


class CurvatureCollector:
    """Finds a model's covered layers and collects their Kronecker factors when armed.

    Args:
        model: the network; its ODE blocks and covered layers are found by type.
        params: the parameters whose layers are covered (default ``model.parameters()``);
            a layer counts when its weight is one of them.
        full: also cover the layers outside ODE blocks (ordinary K-FAC).
        fisher: 'empirical' or 'true' (see the module docstring).
        curvature: where the ODE blocks' factors come from: 'stages' (the adjoint solve's
            own evaluations, no extra cost in evaluations) or 'grid' (the field re-evaluated
            on a time grid of spacing ``observer_dt``).
        observer_dt: spacing of the curvature grid along each adjoint solve ('grid'); None:
            0.01 of the solve's span.
        factor_cost: each factor product's cost relative to the layer's own, per use (an
            evaluation of an ODE block's stage, a forward of an outer layer): it sets how
            many samples of the batch form the factors (a grid observer uses them all); None:
            every sample.
        stats_batch: use only this many samples of each batch for the ODE-block statistics
            (None: all); the factors stay unbiased.
        memory_budget: bytes an evaluation of the grid samples in one call may hold
            ('grid': the field's saved activations, the factor rows, the buffered samples,
            measured on the first sample), or of factor rows kept before they are multiplied
            out ('stages'); None: :data:`MEMORY_BUDGETS`' value for the
            curvature mode.
        exclude: modules left out (with everything inside them): no factors, and no error
            for a layer the factorisation does not support (a grouped convolution).

    Attributes:
        layers: layer -> :class:`CoveredLayer`, in model order.
        uncovered: names of the ODE vector fields' parameters (among ``params``, trainable,
            not excluded) that are in no covered layer.

    Raises:
        ValueError: for a bad setting, or a covered layer the factorisation does not support
            (the message says how to exclude it).
    """

    def __init__(self, model: nn.Module, params: Iterable[torch.Tensor] | None = None,
                 full: bool = False, fisher: str = "empirical",
                 observer_dt: float | None = None, stats_batch: int | None = None,
                 memory_budget: float | None = None, exclude: Iterable[nn.Module] = (),
                 curvature: str = "stages",
                 factor_cost: float | None = DEFAULT_FACTOR_COST) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _validate(fisher, curvature, observer_dt, stats_batch, memory_budget, factor_cost)
        self.model, self.full, self.fisher = model, full, fisher
        self.curvature, self.factor_cost = curvature, factor_cost
        self.observer_dt, self.stats_batch = observer_dt, stats_batch
        self.memory_budget = MEMORY_BUDGETS[curvature] if memory_budget is None \
            else memory_budget
        owned = {id(p) for p in (model.parameters() if params is None else params)}
        self._find(owned, _module_set(exclude))
        self._sums = FactorAccumulator()
        self._observers: list[ODEObserver | ODEStageObserver] = []
        self._kfac: KFACHooks | None = None
        self._handles: list[Any] = []
        self._pending: dict[int, torch.Tensor] = {}  # logits awaiting the sampled pass
        self._tokens = itertools.count()

    # ---- discovery ---------------------------------------------------------------------

    def _find(self, owned: set[int], excluded: set[int]) -> None:
        """Fill ``layers``, ``uncovered`` and the observed blocks / hooked layers."""
        blocks = ode_blocks(self.model)
        inner = {id(m) for b in blocks for m in b.func.modules()}
        self.layers: dict[nn.Module, CoveredLayer] = {}
        self._observed: list[tuple[ODEBlock, list[nn.Module]]] = []
        self._hooked: list[nn.Module] = []
        for block in blocks:
            mods = self._cover(block.func.modules(), owned, excluded)
            if not mods:
                continue
            if block.adjoint:
                self._observed.append((block, mods))
            else:
                self._hooked.extend(mods)
        if self.full:
            outer = (m for m in self.model.modules() if id(m) not in inner)
            self._hooked.extend(self._cover(outer, owned, excluded))
        self.uncovered = self._uncovered(blocks, owned, excluded)

    def _cover(self, modules: Iterable[nn.Module], owned: set[int],
               excluded: set[int]) -> list[nn.Module]:
        """The covered, checked layers among ``modules``; records them in ``layers``."""
        out = []
        for m in modules:
            weight = getattr(m, "weight", None)
            if id(m) in excluded or not is_covered(m) or id(weight) not in owned:
                continue
            check_layer(m)
            bias = cast(torch.Tensor | None, getattr(m, "bias", None))
            self.layers[m] = CoveredLayer(m, cast(torch.Tensor, weight),
                                          bias if bias is not None and id(bias) in owned
                                          else None, has_bias(m))
            out.append(m)
        return out

    def _uncovered(self, blocks: Sequence[ODEBlock], owned: set[int],
                   excluded: set[int]) -> list[str]:
        covered = {id(t) for c in self.layers.values() for t in (c.weight, c.bias)}
        left_out = {id(p) for m in self.model.modules() if id(m) in excluded
                    for p in m.parameters(recurse=False)}
        in_fields = {id(p) for b in blocks for p in b.func.parameters()}
        return [name for name, p in self.model.named_parameters()
                if id(p) in in_fields and id(p) in owned and p.requires_grad
                and id(p) not in covered and id(p) not in left_out]

    # ---- arming --------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        """Whether observers and hooks are in place for the current iteration."""
        return bool(self._handles) or self._kfac is not None

    def arm(self) -> None:
        """Put the observers and hooks in place for one iteration (anything gathered before
        is discarded)."""
        self.disarm()
        listening = self.fisher == "empirical"
        for block, mods in self._observed:
            obs = self._observer(block, mods, listening)
            self._observers.append(obs)
            self._handles.append(block.register_observer(obs, self.observer_dt))
        if self._hooked:
            self._kfac = KFACHooks(self._hooked, self._sums, listening=listening,
                                   factor_cost=self.factor_cost)
        if self.fisher == "true":
            self._handles.append(self.model.register_forward_hook(self._on_output))

    def _observer(self, block: ODEBlock, mods: list[nn.Module],
                  listening: bool) -> ODEObserver | ODEStageObserver:
        if self.curvature == "stages":
            return ODEStageObserver(mods, self._sums, self.factor_cost, self.stats_batch,
                                    listening=listening, memory_budget=self.memory_budget)
        return ODEObserver(block.func, mods, self._sums, supports_batched_time(block.func),
                           self.memory_budget, self.stats_batch, listening=listening)

    def disarm(self) -> None:
        """Remove every observer and hook and drop what they gathered."""
        for h in self._handles:
            h.remove()
        for obs in self._observers:
            obs.close()
        if self._kfac is not None:
            self._kfac.remove()
        self.discard()
        self._handles, self._observers, self._kfac = [], [], None

    def close(self) -> None:
        """Detach everything from the model (to build another collector on it)."""
        self.disarm()

    # ---- the factors ---------------------------------------------------------------------

    def pop(self) -> dict[nn.Module, LayerStats]:
        """The factors gathered since arming (or the last pop/discard); starts afresh.

        Samples an observer still buffers belong to a backward solve that raised (the solver
        calls ``finish()`` only after a complete one): they are dropped.
        """
        for obs in self._observers:
            obs.discard()
        return self._sums.pop()

    def discard(self) -> None:
        """Drop everything gathered since arming, e.g. after a backward that raised."""
        self._sums.discard()
        for obs in self._observers:
            obs.discard()
        if self._kfac is not None:
            self._kfac.restart()
        self._pending.clear()

    # ---- the true-Fisher pass ------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        for obs in self._observers:
            obs.listen(on)
        if self._kfac is not None:
            self._kfac.listen(on)

    def _on_output(self, module: nn.Module, inputs: tuple, logits: Any) -> None:
        """Model forward hook: have the backward's arrival at the logits run the sampled pass."""
        if not isinstance(logits, torch.Tensor):
            raise TypeError("fisher='true' needs a model that returns cross-entropy logits as "
                            f"one tensor (..., C), got {type(logits).__name__}; use "
                            "fisher='empirical'")
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return
        token = next(self._tokens)
        self._pending[token] = logits  # held here, not in the hook: no cycle through autograd
        logits.register_hook(lambda _grad: self._sampled_pass(token))

    def _sampled_pass(self, token: int) -> None:
        """One backward of the sampled loss from the logits; it alone feeds the factors.

        Parameter gradients of this pass are computed (they make the backward traverse the
        whole model) and thrown away: ``.grad`` is untouched.
        """
        logits = self._pending.pop(token, None)
        if logits is None:  # the nested pass reaching the logits, or discarded meanwhile
            return
        sources = [p for p in self.model.parameters() if p.requires_grad]
        if not sources:
            return
        y = sampled_logit_gradient(logits)
        self._listen(True)
        try:
            torch.autograd.grad(logits, sources, y, retain_graph=True, allow_unused=True)
        finally:
            self._listen(False)
