"""Collection of Kronecker factors for Linear and Conv2d layers.

Two sources feed one :class:`FactorCollector`:

* :class:`ODECurvatureObserver`, handed to an ODE block's adjoint: at the grid times t_j of
  the backward solve it re-evaluates the vector field on (t_j, x(t_j)) with the layer inputs
  captured, takes one vector-Jacobian product with a(t_j) to get the layer-output gradients,
  and accumulates A and B with the per-sample scale B*dt (ALGORITHM.md section 1.5). Grid
  samples are evaluated many at a time, in chunks bounded by a memory budget.
* :func:`hook_layers`: ordinary K-FAC capture from the normal forward/backward of layers
  outside ODE blocks (scale B, no dt), or of every solver evaluation when an ODE block
  backpropagates through its solver ("K-FAC through the solver").

Each call of a layer is one *use*. Per use, A_u = E_rows[z z^T] and B_u = E_rows[(s g)(s g)^T]
with rows = batch * locations; the collector keeps sum_u A_u, sum_u B_u and the number of uses
N, so that the curvature is N * locations * mean(A) (x) mean(B). Statistics accumulate over
every ODE call of an iteration until :meth:`FactorCollector.pop` takes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

TRACKED = (nn.Linear, nn.Conv2d)


def check_layer(module: nn.Module) -> None:
    """Reject layers whose Kronecker factors we do not compute (grouped convolutions)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"Conv2d with groups={module.groups} is not supported by the Kronecker "
                "factorisation; use groups=1 or exclude the layer from preconditioning")
        if module.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={module.padding_mode!r} is not supported; "
                             "use padding_mode='zeros'")


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        (dh, dw), (kh, kw) = module.dilation, module.kernel_size
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    return module.padding  # type: ignore[return-value]


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as rows z, shape (M, d_in); conv inputs become unfolded patches.

    The bias's constant 1 is not appended here: :func:`factor_sums` adds its row and column
    to the factor without copying the (large) patch matrix.
    """
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation,
                           padding=_conv_padding(module), stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient as rows, shape (M, d_out), aligned with :func:`input_rows`."""
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def factor_sums(z: torch.Tensor, g: torch.Tensor, rows_per_use: int, scale: float,
                bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over uses of the per-use factors E_rows[z z^T] and E_rows[(s g)(s g)^T].

    Args:
        z: layer inputs, (M, d_in) rows (Linear rows or conv patches), M = uses * rows.
        g: output gradients, (M, d_out).
        rows_per_use: rows contributed by one use (batch * locations).
        scale: s, the factor that turns g into per-sample scale (batch size, times dt for
            samples along an ODE trajectory).
        bias: append the constant input 1 of a bias (a last row and column of A).

    Returns:
        (sum_u A_u, sum_u B_u), shapes (d_in [+1], d_in [+1]) and (d_out, d_out).
    """
    a_sum = z.t() @ z
    if bias:
        col = z.sum(0, keepdim=True)
        corner = torch.full((1, 1), float(z.shape[0]), dtype=z.dtype, device=z.device)
        a_sum = torch.cat([torch.cat([a_sum, col.t()], 1), torch.cat([col, corner], 1)], 0)
    a_sum = a_sum / rows_per_use
    gs = g * scale
    return a_sum, gs.t() @ gs / rows_per_use


@dataclass
class LayerStats:
    """Accumulated factors of one layer.

    Attributes:
        a_sum: sum over uses of A_u, (d_in, d_in). b_sum: sum of B_u, (d_out, d_out).
        uses: number of uses N. locations: rows per sample of one use (conv H*W).
        batch: batch size seen (for EKFAC's B * G~^2 term).
    """

    a_sum: torch.Tensor
    b_sum: torch.Tensor
    uses: float
    locations: float
    batch: int


class FactorCollector:
    """Accumulates Kronecker factor sums per layer until :meth:`pop`."""

    def __init__(self) -> None:
        self.stats: dict[nn.Module, LayerStats] = {}
        self.enabled = True  # the optimizer switches collection off outside its passes

    def add(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor, uses: int,
            dt: float | None, loss_batch: int | None = None) -> None:
        """Add `uses` stacked uses of a layer: input x and output gradient g (layer shapes).

        The per-sample scale is B * dt (dt None: 1), with B the loss's batch size: by default
        the rows of x's batch dimension per use; ``loss_batch`` gives it when x holds only a
        subset of the batch. A layer whose batch dimension holds the whole batch in one row
        (a t-layer seeing a batch of one) is scaled by dt alone, since its gradient already
        sums over the samples.
        """
        z, gr = input_rows(module, x.detach()), output_rows(module, g.detach())
        rows_batch = max(1, x.shape[0] // uses)
        batch = loss_batch if loss_batch is not None and rows_batch > 1 else rows_batch
        rows = z.shape[0] // uses
        scale = batch * (1.0 if dt is None else dt)
        a_sum, b_sum = factor_sums(z.float() if z.dtype == torch.half else z,
                                   gr.float() if gr.dtype == torch.half else gr, rows, scale,
                                   bias=getattr(module, "bias", None) is not None)
        old = self.stats.get(module)
        if old is None:
            self.stats[module] = LayerStats(a_sum, b_sum, float(uses), rows / rows_batch,
                                            batch)
        else:
            old.a_sum += a_sum
            old.b_sum += b_sum
            old.uses += uses

    def pop(self) -> dict[nn.Module, LayerStats]:
        """Return the accumulated statistics and start afresh."""
        stats, self.stats = self.stats, {}
        return stats


class _Capture:
    """Forward hooks that record (module, input, output) of tracked layers; removed on exit."""

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


class ODECurvatureObserver:
    """Observer for :func:`solvers.odeint_adjoint` that accumulates layer factors.

    Call it as ``observer(t, x, a, dt)`` (ODEBlock binds dt per solve). Samples are buffered
    (cloned) and evaluated in chunks: with ``batched_time`` the chunk is one call of the
    vector field on the stacked states with a per-row time vector of shape (U*B,); otherwise
    one call per sample with a scalar time.

    Args:
        func: the vector field f(t, x) of the block.
        modules: tracked layers inside func.
        collector: where the factors go.
        batched_time: whether func accepts a per-row time tensor.
        memory_budget: bytes of stacked states per chunk (activations scale with it).
        stats_batch: if set, only the first ``stats_batch`` samples of each batch (batches
            are shuffled) enter the statistics: the refresh costs less in proportion, and
            the factors stay unbiased estimates (the per-sample scale keeps the full B).
    """

    def __init__(self, func: Callable, modules: Sequence[nn.Module], collector: FactorCollector,
                 batched_time: bool = False, memory_budget: float = 64e6,
                 stats_batch: int | None = None) -> None:
        self.func, self.modules, self.collector = func, list(modules), collector
        self.batched_time, self.memory_budget = batched_time, memory_budget
        self.stats_batch = stats_batch
        self.loss_batch: int | None = None
        self.buffer: list[tuple] = []
        self.samples = 0

    def __call__(self, t: float, x, a, dt: float) -> None:
        if not self.collector.enabled:
            return
        rows = slice(0, self.stats_batch)
        clone = (lambda v: tuple(c[rows].detach().clone() for c in v)) \
            if isinstance(x, tuple) else (lambda v: v[rows].detach().clone())
        self.loss_batch = (x[0] if isinstance(x, tuple) else x).shape[0]
        if self.buffer and self.buffer[0][3] != dt:
            self.flush()
        self.buffer.append((t, clone(x), clone(a), dt))
        self.samples += 1
        if len(self.buffer) >= self._chunk(self.buffer[-1][1]):
            self.flush()

    def _chunk(self, x) -> int:
        comps = x if isinstance(x, tuple) else (x,)
        nbytes = sum(c.numel() * c.element_size() for c in comps)
        return max(1, int(self.memory_budget // max(nbytes, 1))) if self.batched_time else 1

    def flush(self) -> None:
        """Evaluate the buffered samples and add their factors to the collector."""
        if not self.buffer:
            return
        samples, self.buffer = self.buffer, []
        x, a, dt = _stack(samples, 1), _stack(samples, 2), samples[0][3]
        ref = x[0] if isinstance(x, tuple) else x
        rows = ref.shape[0] // len(samples)
        t = torch.cat([torch.full((rows,), s[0], dtype=ref.dtype, device=ref.device)
                       for s in samples]) if self.batched_time else \
            torch.tensor(samples[0][0], dtype=ref.dtype, device=ref.device)
        self._evaluate(t, x, a, len(samples), dt)

    def _evaluate(self, t: torch.Tensor, x, a, uses: int, dt: float) -> None:
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
                self.collector.add(module, inp, g, uses, dt, self.loss_batch)


def hook_layers(modules: Iterable[nn.Module], collector: FactorCollector) -> list[RemovableHandle]:
    """Ordinary K-FAC capture: each forward call of a layer with grad is one use.

    Only the loss's own backward feeds the factors: output gradients from a backward with
    ``create_graph`` (an inner derivative of the forward, e.g. a CNF's Jacobian trace) are
    ignored.

    Returns:
        the hook handles; remove them to stop collecting.
    """
    def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()

        def backward_hook(g: torch.Tensor) -> None:
            # checked at backward time (true Fisher: sampled pass only). A differentiable
            # backward (grad mode on: a CNF's trace inside its vector field, Newton-CG's
            # double backward) computes an inner derivative, not the loss's gradient.
            if collector.enabled and not torch.is_grad_enabled():
                collector.add(module, x, g, 1, None)

        output.register_hook(backward_hook)

    return [m.register_forward_hook(forward_hook) for m in modules]
