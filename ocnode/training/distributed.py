"""Data-parallel training with ``torch.distributed``, launched with ``torchrun``.

``torchrun --standalone --nproc_per_node N -m ocnode train ...`` starts N processes (*ranks*);
each trains a replica of the model on its share of every batch, and the replicas stay equal
because every update is made from quantities that are the same on every rank:

- the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, NCCL on CUDA, with a
  timeout, so that a rank that dies or stalls makes the others fail instead of waiting
  forever (:func:`process_group`);
- ``--batch-size`` is the global batch B: every rank iterates the same seeded loader of global
  batches and takes its slice, B / N rows (:func:`rank_loader`), so the ranks' batches of a
  step together are the single-process batch of that step;
- the gradients are averaged by ``DistributedDataParallel`` around a module that computes the
  task's loss (:func:`parallel_loss`), except for NewtonCG, which averages its gradient and
  every Hessian-vector product itself (DDP's hooks do not see a double backward);
- curvature (SNOpt, DDPNOpt's EKFAC base) is gathered locally and averaged once per refresh
  inside the optimizer's ``step`` (:class:`FactorSync`), DDPNOpt's feedback directions are
  averaged stage by stage in its update pass, and E-MSA averages every evaluation of a stage's
  objective (value and gradient), so every rank's L-BFGS takes the same path.

Nothing here runs unless ``torch.distributed`` is initialised: a plain ``ocnode train``
behaves exactly as before. README.md, "Multiple processes and machines", has the commands,
the conventions and the costs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from ocnode.curvature import CoveredLayer, LayerStats
from ocnode.optim import EMSA, DDPNOpt, NewtonCG, SNOpt
from ocnode.training.records import seed_everything

#: Choices of ``--dist-backend``: auto = NCCL for CUDA devices, gloo otherwise.
BACKENDS = ("auto", "gloo", "nccl")
#: Seconds a collective may wait for the other ranks before the run fails (torch's default).
DEFAULT_TIMEOUT = 1800.0
#: The environment torchrun gives every process.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: What failed collectives raise (a peer died, the network broke, a timeout).
_COLLECTIVE_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(dist, "DistError", None),) if isinstance(e, type))
#: Words of the RuntimeErrors that gloo and NCCL raise when a peer or the network fails.
_COLLECTIVE_MARKERS = ("gloo", "nccl", "c10d", "processgroup", "connection reset",
                       "connection closed", "timed out")

T = TypeVar("T")


# ----------------------------------------------------------------------------- processes

def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` says that a collective failed: a peer process died or stalled past the
    timeout, or the network broke (torch raises these as plain RuntimeErrors too)."""
    if isinstance(err, _COLLECTIVE_ERRORS):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _COLLECTIVE_MARKERS)


def launched() -> bool:
    """Whether this process was started by torchrun (or with its environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE"))


def active() -> bool:
    """Whether ``torch.distributed`` is initialised: the data-parallel code paths are on."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (e.g. after the
    group is closed), else 0."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


def local_rank() -> int:
    """The rank among the processes of this machine (torchrun's ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """The number of processes of the run on this machine (torchrun's ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size() if active() else 1)))


def process_device(name: str) -> torch.device:
    """The device of this process for ``--device name`` in a multi-process run.

    ``auto`` takes ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cuda`` takes
    ``cuda:LOCAL_RANK``; ``cpu`` the CPU.

    Raises:
        ValueError: a numbered CUDA device (each process needs its own), or CUDA requested
            on a machine without it.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"--device {name} names one device for every process; with torchrun "
                         "use --device cuda (process i takes cuda:LOCAL_RANK), cpu or auto")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise ValueError("--device cuda requested but CUDA is not available; use --device "
                             "cpu or auto")
        return torch.device("cpu")
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {index} has no GPU (this machine has "
                         f"{torch.cuda.device_count()}); start at most that many processes "
                         "per machine (torchrun --nproc_per_node)")
    return torch.device("cuda", index)


def pick_backend(device: torch.device, requested: str | None = None) -> str:
    """The process group's backend: NCCL for CUDA, gloo for the CPU, unless ``requested``.

    Raises:
        ValueError: an unknown backend, or NCCL for a CPU run.
    """
    choice = requested or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown --dist-backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ValueError("--dist-backend nccl needs CUDA devices; use gloo (or auto) on the CPU")
    return choice


@contextlib.contextmanager
def process_group(device_name: str = "auto", backend: str | None = None,
                  timeout: float | None = None) -> Iterator[bool]:
    """Join torchrun's process group for the ``with`` body; yields whether data parallelism
    is on.

    Outside torchrun nothing happens (False). A group that already exists (initialised by the
    caller) is used as it is and left open.

    Args:
        device_name: ``--device``; picks the backend and, for CUDA, this process's GPU.
        backend: ``--dist-backend`` (None: auto).
        timeout: seconds a collective may wait for the other ranks (None:
            :data:`DEFAULT_TIMEOUT`).
    """
    if active() or not launched():
        yield active()
        return
    device = process_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seconds = DEFAULT_TIMEOUT if timeout is None else timeout
    dist.init_process_group(pick_backend(device, backend), timeout=timedelta(seconds=seconds))
    try:
        yield True
        # A run's DDP reducer may outlive it in reference cycles (optimizer hooks); one freed
        # after the group, at exit, is the likely cause of rank 0 aborting after a finished
        # run ("terminate called without an active exception", seen in CI). Free it while
        # the group lives, and let the ranks leave together.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives

def _device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_of(values: Sequence[float]) -> list[float]:
    """The mean over the ranks of each number (one all-reduce)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """A new tensor: the mean over the ranks of ``tensor`` (one all-reduce)."""
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(world_size())


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the others."""
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    An error on rank 0 is raised there as it is and on the other ranks as a ValueError (for
    a ValueError on rank 0) or a RuntimeError with its message, so that every rank stops
    together instead of waiting for rank 0 at the next collective.
    """
    result: Any = None
    failure: tuple[bool, str] | None = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, shared with the others
            error, failure = err, (isinstance(err, ValueError), str(err))
    failure, result = broadcast_object((failure, result if failure is None else None))
    if error is not None:
        raise error
    if failure is not None:
        is_value_error, message = failure
        raise (ValueError if is_value_error else RuntimeError)(f"rank 0: {message}")
    return result


# ----------------------------------------------------------------------------- data

def local_batch_size(global_batch: int, processes: int) -> int:
    """Each rank's share of the global batch.

    Raises:
        ValueError: the global batch does not divide evenly among the processes.
    """
    if global_batch % processes:
        lower = max(processes, global_batch - global_batch % processes)
        raise ValueError(f"--batch-size {global_batch} is the global batch and must divide "
                         f"among the {processes} processes; use a multiple of {processes} "
                         f"(e.g. {lower} or {lower + processes})")
    return global_batch // processes


class RankSlices(Sampler[list[int]]):
    """This rank's slice of each global batch of a batch sampler.

    Every rank iterates the same global batches (the same seeded generator), and rank r takes
    rows ``[r * b, (r + 1) * b)`` of each, b = B / N: the ranks' batches of a step are the
    single-process batch of that step, in rank order.

    Args:
        batches: a batch sampler of global batches of B indices (the last one may be
            shorter only when ``processes`` is 1).
        rank: this process's rank. processes: the number of ranks N.
    """

    def __init__(self, batches: Sampler[list[int]], rank: int, processes: int) -> None:
        self.batches, self.rank, self.processes = batches, rank, processes

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            size = len(batch) // self.processes
            yield batch[self.rank * size:(self.rank + 1) * size]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def rank_loader(dataset: Dataset, batch_size: int, generator: torch.Generator,
                this_rank: int | None = None, processes: int | None = None) -> DataLoader:
    """This rank's loader: its slice of the single-process run's shuffled global batches.

    The global batches are drawn exactly as the single-process loader draws them
    (:meth:`ocnode.training.tasks.Task.loader`, the same ``generator``), so the sequence of
    global batches does not depend on the number of processes. With more than one process
    the last partial batch of each epoch is dropped (it cannot be split evenly).

    Args:
        dataset: the training split. batch_size: the global batch B. generator: the run's
            loader generator, seeded alike on every rank.
        this_rank, processes: default: this process's rank and the number of processes.

    Raises:
        ValueError: B does not divide among the processes, or the split holds fewer than B
            examples (an epoch without a step).
    """
    this_rank = rank() if this_rank is None else this_rank
    processes = world_size() if processes is None else processes
    local_batch_size(batch_size, processes)
    if not isinstance(dataset, Sized):
        raise TypeError(f"the training split must have a length, got {type(dataset).__name__}")
    n = len(dataset)
    if processes > 1 and n < batch_size:
        raise ValueError(f"the training split has {n} examples, fewer than one global batch "
                         f"({batch_size}); lower --batch-size")
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size,
                           drop_last=processes > 1)
    return DataLoader(dataset, batch_sampler=RankSlices(batches, this_rank, processes),
                      generator=generator)


def seed_process(seed: int, epoch: int = 0) -> None:
    """Give ranks other than 0 generators of their own (rank 0 keeps the single-process
    stream): noise, Hutchinson probes and sampled labels then differ between the ranks'
    samples, as they do between the rows of one big batch."""
    r = rank()
    if r == 0:
        return
    digest = hashlib.sha256(f"ocnode:{seed}:{r}:{epoch}".encode()).digest()
    seed_everything(int.from_bytes(digest[:4], "little"))


# ----------------------------------------------------------------------------- gradients

class _LossModule(nn.Module):
    """The task's loss as a module's forward, so that DDP sees one forward per step."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _ddp_options() -> dict[str, Any]:
    """Buffers are equal on every rank by construction; syncing them each step is wasted."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params \
        else {"broadcast_buffers": False}


def parallel_loss(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor],
                  device: torch.device,
                  reduce_gradients: bool = True) -> Callable[[nn.Module, Any], Tensor]:
    """The loss of a model wrapped in ``DistributedDataParallel``, as ``loss(model, batch)``.

    DDP wraps a module whose forward is ``loss_fn(model, batch)``: every task's loss (it may
    call ``model.nll`` or ``model.loss`` rather than the forward) is then one DDP forward, and
    the backward averages the gradients of every parameter over the ranks, the horizons t1
    included. The returned function ignores its ``model`` argument. Construction broadcasts
    rank 0's parameters. With ``reduce_gradients=False`` (an optimizer that averages them
    itself, see :func:`averages_its_own_gradients`) rank 0's parameters and buffers are
    broadcast and ``loss_fn`` is returned unwrapped.
    """
    if not reduce_gradients:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        return loss_fn
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(_LossModule(model, loss_fn), device_ids=ids,
                                              **_ddp_options())

    def loss(_model: nn.Module, batch: Any) -> Tensor:
        return ddp(batch)

    loss.ddp = ddp  # type: ignore[attr-defined]
    return loss


def unused_parameters(model: nn.Module) -> list[str]:
    """The trainable parameters that got no gradient from the last backward."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def check_used(model: nn.Module) -> None:
    """Raise if a trainable parameter got no gradient (DDP cannot average it).

    Raises:
        ValueError: naming the parameters and what to do.
    """
    unused = unused_parameters(model)
    if unused:
        raise ValueError(f"these trainable parameters got no gradient from the loss: "
                         f"{', '.join(unused)}; a multi-process run averages every trainable "
                         "parameter's gradient, so each must take part in the loss: remove "
                         "them from the model or freeze them (requires_grad=False)")


# ----------------------------------------------------------------------------- curvature

class FactorSync:
    """Keeps curvature the same on every rank (the :class:`ocnode.curvature.collection.FactorSync`
    protocol that SNOpt and DDPNOpt call inside ``step``).

    - :meth:`reduce`: one all-reduce per refresh of every layer's factor sums, use counts and
      batch sizes; a layer a rank did not see counts zero there. Afterwards mean(A), mean(B)
      and N * locations are those of the global batch, and ``batch`` is the global batch (the
      B of EKFAC's ``m2`` update, whose gradient is the global mean).
    - :meth:`agree`: the eigenbases, computed on every rank from the same factors, are
      compared by a digest (one small all-reduce); if any rank differs (eigh is not bitwise
      reproducible across different CPUs or libraries) rank 0's are broadcast.
    - :meth:`mean`: one all-reduce of a tensor (DDPNOpt's feedback directions).
    """

    def __init__(self) -> None:
        self._warned = False

    def reduce(self, layers: Sequence[CoveredLayer],
               stats: dict[nn.Module, LayerStats]) -> dict[nn.Module, LayerStats]:
        """The global statistics of ``layers`` from every rank's local ``stats``."""
        if not layers:
            return stats
        dtype = _factor_dtype(layers, stats)
        parts = [_pack(layer, stats.get(layer.module), dtype) for layer in layers]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        out: dict[nn.Module, LayerStats] = {}
        offset = 0
        for layer, part in zip(layers, parts):
            st = _unpack(layer, flat[offset:offset + part.numel()], world_size())
            offset += part.numel()
            if st is not None:
                out[layer.module] = st
        return out

    def agree(self, tensors: Sequence[Tensor | None]) -> None:
        """Make ``tensors`` (None: missing on this rank) bitwise equal on every rank.

        Raises:
            RuntimeError: a tensor exists on some ranks only (nothing to broadcast into).
        """
        if not tensors:
            return
        digest = torch.tensor([_digest(t) for t in tensors], dtype=torch.int64,
                              device=_device())
        both = torch.cat([digest, -digest])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        high, low = both[:len(tensors)], -both[len(tensors):]
        if torch.equal(high, low):
            return
        if bool(((high != low) & ((high == -1) | (low == -1))).any()):
            raise RuntimeError("the curvature state exists on some processes only (a refresh "
                               "failed on some of them); resume the run from its checkpoint")
        if not self._warned:
            self._warned = True
            warnings.warn("the eigenbases computed on the processes differ (eigh is not "
                          "bitwise reproducible across machines); rank 0's are used",
                          RuntimeWarning, stacklevel=3)
        for t in tensors:
            if t is not None:
                dist.broadcast(t, src=0)

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the ranks (a new tensor)."""
        return all_reduce_mean(tensor)


def _factor_dtype(layers: Sequence[CoveredLayer], stats: dict[nn.Module, LayerStats]
                  ) -> torch.dtype:
    dtypes = [st.a_sum.dtype for st in stats.values()]
    dtypes += [layer.weight.dtype for layer in layers if layer.weight.is_floating_point()]
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _pack(layer: CoveredLayer, st: LayerStats | None, dtype: torch.dtype) -> Tensor:
    """[A sums, B sums, uses, uses * locations, batch] of one layer (zeros if unseen)."""
    d_out, d_in = layer.shape
    device = layer.weight.device
    if st is None:
        return torch.zeros(d_in * d_in + d_out * d_out + 3, dtype=dtype, device=device)
    counts = torch.tensor([st.uses, st.uses * st.locations, st.batch], dtype=dtype,
                          device=device)
    return torch.cat([st.a_sum.to(dtype).reshape(-1), st.b_sum.to(dtype).reshape(-1), counts])


def _unpack(layer: CoveredLayer, flat: Tensor, processes: int) -> LayerStats | None:
    """A layer's global statistics from the summed :func:`_pack` vectors (None: unseen)."""
    d_out, d_in = layer.shape
    a_sum = flat[:d_in * d_in].reshape(d_in, d_in)
    b_sum = flat[d_in * d_in:d_in * d_in + d_out * d_out].reshape(d_out, d_out)
    uses, located, batch = flat[-3:].tolist()
    if uses <= 0:
        return None
    return LayerStats(a_sum / processes, b_sum / processes, uses / processes, located / uses,
                      int(round(batch)))


def _digest(t: Tensor | None) -> int:
    """63 bits of the SHA-256 of a tensor's bytes; -1 for None."""
    if t is None:
        return -1
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def attach(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that averages inside its ``step`` its :class:`FactorSync`: SNOpt and
    DDPNOpt (curvature, feedback), NewtonCG (loss, gradient, Hessian-vector products), EMSA
    (every stage objective's value and gradient)."""
    if isinstance(optimizer, SNOpt | DDPNOpt | NewtonCG | EMSA):
        optimizer.sync = FactorSync()


def averages_its_own_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` averages the gradients itself (NewtonCG: its double backward is
    invisible to DistributedDataParallel's hooks), so the loss must not be DDP-wrapped."""
    return isinstance(optimizer, NewtonCG)


def per_process_hparams(hparams: dict[str, Any], processes: int) -> dict[str, Any]:
    """Hyperparameters as each rank takes them: ``stats_batch`` counts samples of the global
    batch, so each rank uses ceil(stats_batch / N) of its own."""
    out = dict(hparams)
    if out.get("stats_batch") is not None:
        out["stats_batch"] = max(1, math.ceil(out["stats_batch"] / processes))
    return out
