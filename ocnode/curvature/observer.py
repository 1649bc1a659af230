"""The ODE observer: Kronecker factors of a vector field's layers along the adjoint solve.

Handed to an ODE block's adjoint (``ODEBlock.register_observer``), it is called by the backward
solve as ``observer(t, x, a, weight)`` at each grid time t_j, with the state x(t_j), the
adjoint a(t_j) and the quadrature weight of the sample (the trapezoid rule's), and
``observer.finish()`` once at the end of every backward solve. At each sample it re-evaluates
the vector field on (t_j, x(t_j)) with the layer inputs captured, takes one vector-Jacobian
product with a(t_j) to get the layer-output gradients, and adds A and B with the per-sample
scale B * weight (Liu, Chen, Theodorou 2021, "Second-order Neural ODE Optimizer", section 3).
Samples are buffered (cloned) and evaluated many at a time, in chunks bounded by a memory
budget; :meth:`ODEObserver.finish` evaluates what is left. The budget counts the bytes a
sample's evaluation holds: the covered layers' inputs and outputs and their gradients, as
measured on the first evaluation (which evaluates one sample alone).

A vector field that accepts a per-row time vector, shape (U * B,), declares it with the class
attribute ``supports_batched_time = True``; a chunk of U samples is then one call of the field
on the stacked states. Any other field (one that takes a scalar ``t``, as most are written) is
batched over the chunk's samples with :func:`torch.func.vmap` over (t, x); where vmap cannot
run the field (e.g. it calls ``float(t)`` or ``.item()``), the observer says so once, in a
warning, and calls the field once per sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ocnode.curvature.factors import FactorAccumulator


def supports_batched_time(func: object) -> bool:
    """Whether a vector field declares ``supports_batched_time = True`` (per-row times)."""
    return bool(getattr(func, "supports_batched_time", False))


class _Capture:
    """Forward hooks that record (module, input, output) of the layers; removed on exit.

    While ``shifts`` is set (one tensor per layer call, in call order), each output is
    returned plus its shift: the gradient w.r.t. a shift is that output's gradient, which
    reaches the caller from inside :func:`torch.func.vmap`, where the outputs themselves
    cannot.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles: list[RemovableHandle] = []
        self.shifts: Sequence[torch.Tensor] | None = None

    def __enter__(self) -> _Capture:
        for m in self.modules:
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> Any:
        self.records.append((module, inputs[0], output))
        if self.shifts is None:
            return None
        k = len(self.records) - 1
        if k >= len(self.shifts):
            raise RuntimeError("the vector field called its layers more often than at the "
                               "first grid sample")
        return output + self.shifts[k]

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
        memory_budget: bytes per chunk of samples evaluated in one call (see the module
            docstring).
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
        #: per-sample bytes of an evaluation (see :meth:`_chunk`), once measured; the layer
        #: calls of a sample, [(module, output shape)], once seen
        self.sample_bytes: int | None = None
        self._layout: list[tuple[nn.Module, torch.Size]] | None = None
        self._layout_key: tuple | None = None  # the state shapes the layout was seen with
        self._vmap = True  # False once vmap failed on this field

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
        if len(self.buffer) >= self._chunk():
            self.finish()

    def _chunk(self) -> int:
        """Samples per chunk: the budget over a sample's measured bytes; 1 until the first
        evaluation has measured them. A sample's bytes are what its evaluation holds at once:
        the tensors the field's graph saves for the VJP (its parameters excluded), the
        covered layers' factor rows (a conv layer's unfolded patches, its output gradients and
        their row copy) and the buffered state and adjoint. A state's bytes alone say little:
        a 64-channel conv field holds tens of times them."""
        if self.sample_bytes is None:
            return 1
        return max(1, int(self.memory_budget // max(self.sample_bytes, 1)))

    def finish(self) -> None:
        """Evaluate the buffered samples and add their factors to the sink."""
        if not self.buffer:
            return
        samples, self.buffer = self.buffer, []
        if self.batched_time:
            x, a = _stack(samples, 1), _stack(samples, 2)
            ref = x[0] if isinstance(x, tuple) else x
            rows = ref.shape[0] // len(samples)
            t = torch.cat([torch.full((rows,), s[0], dtype=ref.dtype, device=ref.device)
                           for s in samples])
            self._evaluate(t, x, a, len(samples), [s[3] for s in samples])
            return
        # the first sample (of each new state shape: a smaller last batch) alone: it finds
        # the layer calls that vmap will shift
        if self._layout_key != _shapes(samples[0][1]):
            self._evaluate_one(samples.pop(0))
        if len(samples) > 1 and self._vmap:
            found = self._vmapped(samples)
            if found is not None:
                self._add(*found, len(samples), [s[3] for s in samples])
                return
        for sample in samples:
            self._evaluate_one(sample)

    @property
    def pending(self) -> int:
        """Samples buffered and not yet evaluated."""
        return len(self.buffer)

    def discard(self) -> None:
        """Drop the buffered samples (a backward solve that failed)."""
        self.buffer = []

    def _evaluate_one(self, sample: tuple) -> None:
        t, x, a, weight = sample
        self._layout_key = _shapes(x)
        ref = x[0] if isinstance(x, tuple) else x
        self._evaluate(torch.tensor(t, dtype=ref.dtype, device=ref.device), x, a, 1, [weight])

    def _evaluate(self, t: torch.Tensor, x, a, uses: int, weight: list[float]) -> None:
        """One call of the field on (t, x): its layers' factors, and the layout and bytes
        of its layer calls (per sample) for the chunks that follow."""
        saved = _SavedBytes(self.func)
        with torch.enable_grad(), _Capture(self.modules) as cap, saved:
            out = self.func(t, x)
        self._layout = [(m, o.shape) for m, _, o in cap.records]
        self.sample_bytes = (saved.bytes + _factor_row_bytes(cap.records)
                             + 2 * _nbytes(x)) // uses
        with torch.enable_grad():
            pairs = _pairs(out, a)
            if not pairs or not cap.records:
                return
            grads = torch.autograd.grad([o for o, _ in pairs], [r[2] for r in cap.records],
                                        [g for _, g in pairs], allow_unused=True)
        self._add([m for m, _, _ in cap.records], [i for _, i, _ in cap.records], grads,
                  uses, weight)

    def _vmapped(self, samples: list[tuple]) -> tuple[list, list, tuple] | None:
        """The layer calls of U scalar-t samples in one vmapped call of the field:
        (modules, inputs (U * rows, ...) each, output gradients (U * rows, ...) each), or
        None when vmap cannot run the field (then it warns once and is not tried again)."""
        assert self._layout is not None
        u = len(samples)
        x, a = _per_sample(_stack(samples, 1), u), _per_sample(_stack(samples, 2), u)
        ref = x[0] if isinstance(x, tuple) else x
        t = torch.tensor([s[0] for s in samples], dtype=ref.dtype, device=ref.device)
        shifts = [torch.zeros((u, *shape), dtype=ref.dtype, device=ref.device,
                              requires_grad=True) for _, shape in self._layout]
        cap = _Capture(self.modules)

        def field(t_u: torch.Tensor, x_u, *shifts_u: torch.Tensor):
            cap.records, cap.shifts = [], shifts_u
            out = self.func(t_u, x_u)
            if len(cap.records) != len(shifts_u):
                raise RuntimeError("the vector field called its layers fewer times than at "
                                   "the first grid sample")
            return out, tuple(i for _, i, _ in cap.records)

        try:
            with torch.enable_grad(), cap:
                out, inputs = torch.func.vmap(field, randomness="different")(t, x, *shifts)
                pairs = _pairs(out, a)
                grads = torch.autograd.grad([o for o, _ in pairs], shifts,
                                            [g for _, g in pairs], allow_unused=True) \
                    if pairs else (None,) * len(shifts)
        except Exception as err:  # noqa: BLE001 - whatever keeps vmap from the user's field
            self._vmap = False
            warnings.warn(
                f"SNOpt's grid curvature could not batch the vector field's samples with "
                f"torch.func.vmap ({type(err).__name__}: {err}); it calls the field once per "
                "sample instead, which is slower. Let the field take a per-row time tensor "
                "and set supports_batched_time = True, or use curvature='stages'.",
                RuntimeWarning, stacklevel=2)
            return None
        finally:
            cap.records, cap.shifts = [], None
        flat = [i.reshape(-1, *i.shape[2:]) for i in inputs]
        return [m for m, _ in self._layout], flat, tuple(
            None if g is None else g.reshape(-1, *g.shape[2:]) for g in grads)

    def _add(self, modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor],
             grads: Sequence[torch.Tensor | None], uses: int, weight: list[float]) -> None:
        for module, inp, g in zip(modules, inputs, grads):
            if g is not None:
                self.sink.add(module, inp, g, uses,
                              weight[0] if len(set(weight)) == 1 else weight, self.loss_batch)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the tensors autograd saves for the backward while active, each
    storage once, the module's own parameters and buffers left out (they are not per sample)."""

    def __init__(self, module: Callable) -> None:
        own = module.parameters() if isinstance(module, nn.Module) else ()
        own_buffers = module.buffers() if isinstance(module, nn.Module) else ()
        self._skip = {t.untyped_storage().data_ptr() for t in (*own, *own_buffers)}
        self._seen: set[int] = set()
        self.bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._skip and ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)


def _factor_row_bytes(records: Sequence[tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of the factor rows the accumulator forms from these layer calls: the inputs as
    rows (rows x d_in: a conv's unfolded patches), and the output gradient twice (itself and
    its row layout)."""
    total = 0
    for module, _, out in records:
        weight = getattr(module, "weight", None)
        d_out = int(weight.shape[0]) if weight is not None else 1
        d_in = weight[0].numel() if weight is not None else 1
        rows = out.numel() // max(d_out, 1)
        total += (rows * d_in + 2 * out.numel()) * out.element_size()
    return total


def _nbytes(v) -> int:
    """Bytes of a tensor or a tuple of them."""
    parts = v if isinstance(v, tuple) else (v,)
    return sum(c.numel() * c.element_size() for c in parts)


def _pairs(out, a) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output part, its adjoint) for the parts of the field's output that have a graph."""
    outs = out if isinstance(out, tuple) else (out,)
    a_t = a if isinstance(a, tuple) else (a,)
    return [(o, g) for o, g in zip(outs, a_t) if o.requires_grad]


def _shapes(x) -> tuple:
    """The shapes of a state's tensors."""
    return tuple(c.shape for c in x) if isinstance(x, tuple) else (x.shape,)


def _per_sample(v, u: int):
    """Stacked rows (U * rows, ...) -> (U, rows, ...), for a tensor or each of a tuple."""
    if isinstance(v, tuple):
        return tuple(c.reshape(u, -1, *c.shape[1:]) for c in v)
    return v.reshape(u, -1, *v.shape[1:])
