"""The ODE observer: Kronecker factors of a vector field's layers along the adjoint solve.

Handed to an ODE block's adjoint (``ODEBlock.register_observer``), it is called by the backward
solve as ``observer(t, x, a, weight)`` at each grid time t_j, with the state x(t_j), the
adjoint a(t_j) and the quadrature weight of the sample (the trapezoid rule's), and
``observer.finish()`` once at the end of every backward solve. At each sample it re-evaluates
the vector field on (t_j, x(t_j)) with the layer inputs captured, takes one vector-Jacobian
product with a(t_j) to get the layer-output gradients, and adds A and B with the per-sample
scale B * weight (Liu, Chen, Theodorou 2021, "Second-order Neural ODE Optimizer", section 3).
Samples are buffered (cloned) and evaluated many at a time, in chunks bounded by a memory
budget; :meth:`ODEObserver.finish` evaluates what is left.

A vector field that accepts a per-row time vector, shape (U * B,), declares it with the class
attribute ``supports_batched_time = True``; a chunk of U samples is then one call of the field
on the stacked states. Otherwise each sample is one call with a scalar time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ocnode.curvature.factors import FactorAccumulator


def supports_batched_time(func: object) -> bool:
    """Whether a vector field declares ``supports_batched_time = True`` (per-row times)."""
    return bool(getattr(func, "supports_batched_time", False))


class _Capture:
    """Forward hooks that record (module, input, output) of the layers; removed on exit."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> _Capture:
        for m in self.modules:
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.records.append((module, inputs[0], output))

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _stack(samples: Sequence, index: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    first = samples[0][index]
    if isinstance(first, tuple):
        return tuple(torch.cat([s[index][k] for s in samples]) for k in range(len(first)))
    return torch.cat([s[index] for s in samples])


class ODEObserver:
    """Accumulates the factors of a vector field's layers from its adjoint backward solves.

    The observer is *listening* from construction unless ``listening=False``; when not
    listening its calls are ignored (the true-Fisher mode opens it only for the sampled pass).

    Args:
        func: the vector field f(t, x) of the block.
        modules: covered layers inside func.
        sink: where the factors go.
        batched_time: whether func accepts a per-row time tensor (U * B,).
        memory_budget: bytes of stacked states per chunk (activations scale with it).
        stats_batch: if set, only the first ``stats_batch`` samples of each batch (batches
            are shuffled) enter the statistics: the refresh costs less in proportion, and
            the factors stay unbiased estimates (the per-sample scale keeps the full B).
        listening: whether calls are taken from the start.
    """

    def __init__(self, func: Callable, modules: Sequence[nn.Module], sink: FactorAccumulator,
                 batched_time: bool = False, memory_budget: float = 64e6,
                 stats_batch: int | None = None, listening: bool = True) -> None:
        self.func, self.modules, self.sink = func, list(modules), sink
        self.batched_time, self.memory_budget = batched_time, memory_budget
        self.stats_batch = stats_batch
        self.loss_batch: int | None = None
        self.buffer: list[tuple] = []
        self.samples = 0
        self._listening = listening

    def close(self) -> None:
        """Nothing to detach (the grid observer hooks the layers only while it evaluates)."""

    def listen(self, on: bool) -> None:
        """Take (True) or ignore (False) the following calls; buffered samples stay."""
        self._listening = on

    def __call__(self, t: float, x, a, weight: float) -> None:
        """Buffer the grid sample (t, x(t), a(t)) of quadrature weight ``weight``."""
        if not self._listening:
            return
        rows = slice(0, self.stats_batch)
        clone = (lambda v: tuple(c[rows].detach().clone() for c in v)) \
            if isinstance(x, tuple) else (lambda v: v[rows].detach().clone())
        self.loss_batch = (x[0] if isinstance(x, tuple) else x).shape[0]
        self.buffer.append((t, clone(x), clone(a), weight))
        self.samples += 1
        if len(self.buffer) >= self._chunk(self.buffer[-1][1]):
            self.finish()

    def _chunk(self, x) -> int:
        comps = x if isinstance(x, tuple) else (x,)
        nbytes = sum(c.numel() * c.element_size() for c in comps)
        return max(1, int(self.memory_budget // max(nbytes, 1))) if self.batched_time else 1

    def finish(self) -> None:
        """Evaluate the buffered samples and add their factors to the sink."""
        if not self.buffer:
            return
        samples, self.buffer = self.buffer, []
        x, a, weight = _stack(samples, 1), _stack(samples, 2), [s[3] for s in samples]
        ref = x[0] if isinstance(x, tuple) else x
        rows = ref.shape[0] // len(samples)
        t = torch.cat([torch.full((rows,), s[0], dtype=ref.dtype, device=ref.device)
                       for s in samples]) if self.batched_time else \
            torch.tensor(samples[0][0], dtype=ref.dtype, device=ref.device)
        self._evaluate(t, x, a, len(samples), weight)

    @property
    def pending(self) -> int:
        """Samples buffered and not yet evaluated."""
        return len(self.buffer)

    def discard(self) -> None:
        """Drop the buffered samples (a backward solve that failed)."""
        self.buffer = []

    def _evaluate(self, t: torch.Tensor, x, a, uses: int, weight: list[float]) -> None:
        with torch.enable_grad(), _Capture(self.modules) as cap:
            out = self.func(t, x)
            outs = out if isinstance(out, tuple) else (out,)
            a_t = a if isinstance(a, tuple) else (a,)
            pairs = [(o, g) for o, g in zip(outs, a_t) if o.requires_grad]
            if not pairs or not cap.records:
                return
            grads = torch.autograd.grad([o for o, _ in pairs], [r[2] for r in cap.records],
                                        [g for _, g in pairs], allow_unused=True)
        for (module, inp, _), g in zip(cap.records, grads):
            if g is not None:
                self.sink.add(module, inp, g, uses,
                              weight[0] if len(set(weight)) == 1 else weight, self.loss_batch)
