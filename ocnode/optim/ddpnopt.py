"""DDPNOpt: layer-wise feedback policies from differential dynamic programming.

Liu, Chen, Theodorou, "Differential Dynamic Programming Neural Optimizer", ICLR 2021
(arXiv 2002.08809). A :class:`torch.optim.Optimizer` for nets that are chains of stages
(an ``nn.Sequential`` in which each Linear/Conv2d starts a stage and the activation,
pooling, flatten or dropout after it belong to it). Used in the ordinary loop
(``zero_grad``, forward, ``backward``, ``step``): hooks record each stage's input x_t, the
gradient at it and the gradient at the layer's output; ``step`` runs the update pass, one
forward without graph that updates the stages in order,

    u_t <- u_t + base_step(grad) - P_t E[Q_ux dx_t],    dx_t = x_hat_t - x_t,

with P_t the base optimizer's map (SGD, RMSprop, Adam or EKFAC) and x_hat the states of the
updated net. ``feedback=False`` is the base optimizer. The maths are the functions of
:mod:`ocnode.optim.ddp_math`; the class keeps the records and the state. A dense "vanilla
DDP" baseline for tiny nets is :func:`vanilla_ddp_step`. docs/ddpnopt.md explains the
algorithm and the choices made here.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.hooks import RemovableHandle

from ocnode.curvature import CoveredLayer, FactorAccumulator, LayerStats, check_layer, is_covered
from ocnode.curvature.collection import FactorSync
from ocnode.curvature.layers import has_bias
from ocnode.nn.residual import Residual
from ocnode.optim import ddp_math, kfac_math

BASES = ("sgd", "rmsprop", "adam", "ekfac")
#: The default moving-average rate of the squared gradients, per base.
DEFAULT_ALPHA = {"rmsprop": 0.99, "ekfac": 0.75}
_STOCHASTIC = (_DropoutNd, nn.RReLU)
_NOT_A_CHAIN = ("DDPNOpt needs the model as a chain of stages: an nn.Sequential (nested "
                "nn.Sequentials are flattened) whose entries with parameters are single "
                "layers (Linear, Conv2d, ...). {what} Write the model out as such a flat "
                "nn.Sequential; for skip connections (residual nets) use DGNOpt.")


# ----------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class Stage:
    """One stage x_{t+1} = f_t(x_t, u_t) of a chain.

    Attributes:
        modules: the module with parameters first, then the modules that follow it.
        name: the first module's name in the model.
        layer: the layer that gets a feedback policy (a Linear/Conv2d whose weight the
            optimizer trains), or None: the stage takes the base step only.
        stochastic: the stage has dropout/RReLU (its random draws are replayed in the
            update pass).
        normaliser: the BatchNorm that takes the layer's output as its input (the stage's
            next module, or the next stage's first), or None.
    """

    modules: tuple[nn.Module, ...]
    name: str
    layer: CoveredLayer | None
    stochastic: bool
    normaliser: _BatchNorm | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The layer's parameter names, in the order of its gradient matrix's columns."""
        return ("weight", "bias") if self.layer is not None and self.layer.has_bias \
            else ("weight",)


class Chain(NamedTuple):
    """A model split into stages (:func:`chain_stages`).

    Attributes:
        prefix: the modules before the first module with parameters (x_0 is their output).
        stages: the stages, in order.
        unsupported: "name (type)" of the trained modules that get no feedback policy.
    """

    prefix: tuple[nn.Module, ...]
    stages: list[Stage]
    unsupported: list[str]


def flatten_chain(seq: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of an ``nn.Sequential`` with nested Sequentials flattened, in run order;
    any other module is one entry (named ``prefix`` without its trailing dot)."""
    if not isinstance(seq, nn.Sequential):
        yield prefix.rstrip("."), seq
        return
    # not named_children(): it hides a module's second use
    for name, m in seq._modules.items():
        if m is None:
            continue
        if type(m) is nn.Sequential:
            yield from flatten_chain(m, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", m


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _check_entry(name: str, m: nn.Module, seen: set[int], message: str) -> None:
    """Raise for a module with parameters that is not one layer, or that is used twice."""
    if isinstance(m, Residual):
        raise ValueError(message.format(what=f"Entry {name} is a Residual block."))
    if any(_has_params(c) for c in m.children()):
        raise ValueError(message.format(
            what=f"Entry {name} ({type(m).__name__}) holds parameters in submodules."))
    if id(m) in seen:
        raise ValueError(message.format(
            what=f"Entry {name} ({type(m).__name__}) is used twice (shared weights)."))
    seen.add(id(m))


def _feedback_layer(m: nn.Module, owned: set[int]) -> CoveredLayer | None:
    """The layer's record when DDPNOpt can give it a feedback policy, else None."""
    weight = getattr(m, "weight", None)
    if not is_covered(m) or not isinstance(weight, Tensor) or id(weight) not in owned:
        return None
    try:
        check_layer(m)
    except ValueError:
        return None
    bias = getattr(m, "bias", None)
    return CoveredLayer(m, weight, bias if bias is not None and id(bias) in owned else None,
                        has_bias(m))


def chain_stages(model: nn.Module, owned: set[int]) -> Chain:
    """Split an ``nn.Sequential`` into stages: each module with parameters starts one.

    Args:
        model: the net. owned: ids of the parameters the optimizer trains.

    Raises:
        ValueError: the model is not such a chain (the message points to DGNOpt for skip
            connections).
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ValueError(_NOT_A_CHAIN.format(what=f"Got a {type(model).__name__}."))
    return group_stages(flatten_chain(model), owned)


def group_stages(entries: Iterable[tuple[str, nn.Module]], owned: set[int],
                 seen: set[int] | None = None, message: str = _NOT_A_CHAIN) -> Chain:
    """Group a chain's modules into stages: each module with parameters starts one.

    Args:
        entries: (name, module) in the order the chain runs them (:func:`flatten_chain`).
        owned: ids of the parameters the optimizer trains.
        seen: ids of the modules grouped so far (shared weights across calls raise).
        message: the error template, with a ``{what}`` field.

    Raises:
        ValueError: an entry with parameters that is not one layer (a Residual block, a
            module with parameters in submodules), or one used twice.
    """
    seen = set() if seen is None else seen
    prefix: list[nn.Module] = []
    groups: list[tuple[str, list[nn.Module]]] = []
    for name, m in entries:
        if not _has_params(m) and not isinstance(m, Residual):
            (groups[-1][1] if groups else prefix).append(m)
            continue
        _check_entry(name, m, seen, message)
        groups.append((name, [m]))
    stages, unsupported = [], []
    for k, (name, mods) in enumerate(groups):
        layer = _feedback_layer(mods[0], owned)
        trained = any(id(p) in owned and p.requires_grad for p in mods[0].parameters())
        if layer is None and trained:
            unsupported.append(f"{name} ({type(mods[0]).__name__})")
        # the module that takes the layer's output: its follower, or the next stage's layer
        after = mods[1] if len(mods) > 1 else groups[k + 1][1][0] if k + 1 < len(groups) \
            else None
        stages.append(Stage(tuple(mods), name, layer,
                            any(isinstance(m, _STOCHASTIC) for m in mods),
                            after if isinstance(after, _BatchNorm) else None))
    return Chain(tuple(prefix), stages, unsupported)


# ----------------------------------------------------------------------------- records


@dataclass
class _Record:
    """What one stage's forward and backward left: its input, the gradients, the RNG."""

    x: Tensor | None = None  # stage input x_t (= the layer's input), (B, ...)
    gx: Tensor | None = None  # dL/dx_t
    g: Tensor | None = None  # dL/dh at the layer's output
    h: Tensor | None = None  # the layer's output h (stages whose output a BatchNorm takes)
    gy: Tensor | None = None  # dL/dx_T at the model's output (last stage, second order)
    rng: tuple[Tensor, Tensor | None, torch.device] | None = None


def _rng_state(x: Tensor) -> tuple[Tensor, Tensor | None, torch.device]:
    cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    return torch.get_rng_state(), cuda, x.device


@contextlib.contextmanager
def _replayed_rng(rng: tuple[Tensor, Tensor | None, torch.device] | None) -> Iterator[None]:
    """Run with the random state a stage's forward had; restore the current one after."""
    if rng is None:
        yield
        return
    cpu, cuda, device = rng
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class Probe(NamedTuple):
    """A tensor the recorder keeps beside the stages' records: a module's input or output.

    Attributes:
        module: the module. where: ``"input"``: the input's value and the gradient of this
            module's path alone (the module gets an alias of its input, so a tensor that
            also feeds other modules is split by path); ``"output"``: the output's value and
            gradient.
    """

    module: nn.Module
    where: str


class _Recorder:
    """DDPNOpt's forward/backward hooks: registered here at construction, removed by handle.

    Each forward of the model with grad starts a new set of records (a generation): one
    per stage, then one per probe (``x`` its value, ``gx`` its gradient). Gradient hooks of
    older forwards are ignored, and so are differentiable backward passes (grad mode on).

    Args:
        model: the net. stages: its stages. want_gx: indices of the stages whose input
            gradient is needed. want_gy: record the gradient at the model's output (in the
            last stage's record). active: whether the coming forward should be recorded.
        probes: the extra tensors to record.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage], want_gx: set[int],
                 want_gy: bool, active: Callable[[], bool],
                 probes: Sequence[Probe] = ()) -> None:
        self.stages, self.want_gx, self._active = stages, want_gx, active
        self._size = len(stages) + len(probes)
        self.paused, self.forwards, self._gen = False, 0, 0
        self.records: list[_Record] | None = None
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._start_hook(model))]
        # probes first: a stage starting with a probed module must see the alias
        for k, probe in enumerate(probes):
            self._handles.append(self._probe_hook(probe, len(stages) + k))
        for t, stage in enumerate(stages):
            first = stage.modules[0]
            self._handles.append(first.register_forward_pre_hook(self._pre_hook(t)))
            if stage.layer is not None:
                self._handles.append(first.register_forward_hook(
                    self._out_hook(first, t, "g", keep=stage.normaliser is not None)))
        if want_gy and stages:
            self._handles.append(model.register_forward_hook(
                self._out_hook(model, len(stages) - 1, "gy")))

    def _recording(self) -> bool:
        return torch.is_grad_enabled() and not self.paused and self._active()

    def _start_hook(self, owner: nn.Module) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, inputs: tuple) -> None:
            # a deep copy of the model carries this hook along: it must not record
            if module is owner and self._recording():
                self._gen, self.forwards = self._gen + 1, self.forwards + 1
                self.records = [_Record() for _ in range(self._size)]
        return hook

    def _pre_hook(self, t: int) -> Callable[[nn.Module, tuple], None]:
        owner = self.stages[t].modules[0]

        def hook(module: nn.Module, inputs: tuple) -> None:
            if module is not owner or not self._recording() or self.records is None:
                return
            x, stage, rec = inputs[0], self.stages[t], self.records[t]
            rec.x = x.detach()
            if stage.stochastic and any(m.training for m in stage.modules):
                rec.rng = _rng_state(x)
            if t in self.want_gx and x.requires_grad:
                x.register_hook(self._grad_hook(t, "gx"))
        return hook

    def _probe_hook(self, probe: Probe, i: int) -> RemovableHandle:
        owner = probe.module

        def on_input(module: nn.Module, inputs: tuple) -> tuple | None:
            if module is not owner or not self._recording() or self.records is None:
                return None
            x = inputs[0]
            self.records[i].x = x.detach()
            if not x.requires_grad:
                return None
            alias = x.view_as(x)
            alias.register_hook(self._grad_hook(i, "gx"))
            return (alias, *inputs[1:])

        def on_output(module: nn.Module, inputs: tuple, output: Any) -> None:
            if module is owner and self._recording() and self.records is not None \
                    and isinstance(output, Tensor):
                self.records[i].x = output.detach()
                if output.requires_grad:
                    output.register_hook(self._grad_hook(i, "gx"))

        if probe.where == "input":
            return owner.register_forward_pre_hook(on_input)
        return owner.register_forward_hook(on_output)

    def _out_hook(self, owner: nn.Module, t: int, field: str,
                  keep: bool = False) -> Callable[[nn.Module, tuple, Any], None]:
        """Record the gradient at ``owner``'s output in ``field`` (and, with ``keep``, the
        output itself in ``h``)."""
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if module is owner and self._recording() and isinstance(output, Tensor) \
                    and output.requires_grad:
                output.register_hook(self._grad_hook(t, field))
                if keep and self.records is not None:
                    self.records[t].h = output.detach()
        return hook

    def _grad_hook(self, t: int, field: str) -> Callable[[Tensor], None]:
        gen = self._gen

        def hook(grad: Tensor) -> None:
            if gen != self._gen or torch.is_grad_enabled() or self.records is None:
                return
            rec = self.records[t]
            old = getattr(rec, field)
            setattr(rec, field, grad.detach() if old is None else old + grad.detach())
        return hook

    def take(self) -> tuple[list[_Record] | None, int]:
        """The records and the number of recorded forwards since the last take; resets."""
        out = (self.records, self.forwards)
        self.records, self.forwards = None, 0
        return out

    def remove(self) -> None:
        """Remove every hook; tensor hooks of earlier forwards stop recording."""
        for h in self._handles:
            h.remove()
        self._handles, self._gen, self.records = [], self._gen + 1, None


@contextlib.contextmanager
def quiet(model: nn.Module, recorder: _Recorder) -> Iterator[None]:
    """Run extra forwards of ``model``'s modules unrecorded, with its buffers (BatchNorm
    statistics) restored afterwards."""
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    recorder.paused = True
    try:
        yield
    finally:
        recorder.paused = False
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


# ----------------------------------------------------------------------------- the optimizer


def _as_matrix(tensors: Sequence[Tensor]) -> Tensor:
    """[weight(, bias)]-shaped tensors as one (d_out, d_in [+1]) matrix."""
    return kfac_math.layer_gradient(tensors[0], tensors[1] if len(tensors) > 1 else None)


def _validate(base: str, lr: float, momentum: float, weight_decay: float,
              betas: Sequence[float], eps: float, alpha: float | None, eps_ekfac: float,
              update_freq: int, eps_vxx: float) -> None:
    checks = [
        (base in BASES, f"base must be one of {', '.join(BASES)}, got {base!r}"),
        (lr > 0, f"lr must be > 0, got {lr}"),
        (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
        (base != "adam" or momentum == 0,
         "momentum is not used with base='adam' (its first moment is betas[0]); leave it 0"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        (len(betas) == 2 and all(0 <= b < 1 for b in betas),
         f"betas must be two numbers in [0, 1), got {betas!r}"),
        (eps > 0, f"eps must be > 0 (e.g. 1e-8), got {eps}"),
        (alpha is None or 0 <= alpha <= 1,
         f"alpha must be in [0, 1] (or None: the base's default), got {alpha}"),
        (eps_ekfac > 0, f"eps_ekfac (EKFAC damping) must be > 0, got {eps_ekfac}; 0.03-0.1 "
                        "are typical"),
        (isinstance(update_freq, int) and update_freq >= 1,
         f"update_freq must be a positive int, got {update_freq!r}"),
        (eps_vxx >= 0, f"eps_vxx must be >= 0 (0: no Tikhonov on V_xx), got {eps_vxx}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


class DDPNOpt(torch.optim.Optimizer):
    """Differential dynamic programming optimizer with layer-wise feedback policies.

    Liu, Chen, Theodorou, ICLR 2021 (arXiv 2002.08809), in its practical form: rank-one
    Gauss-Newton value Hessians per sample, the base optimizer's curvature for E[Q_uu]. The
    loss must be a mean over the batch (dimension 0): per-sample quantities are B times the
    recorded gradients. Call ``step()`` after exactly one forward and backward of the batch
    (a step after more forwards takes the base step only, with a warning).

    Args:
        model: an ``nn.Sequential`` chain (see :func:`chain_stages`), not its parameters.
        lr: learning rate.
        base: 'sgd', 'rmsprop', 'adam' or 'ekfac' (K-FAC factors from the normal backward,
            eigenbasis second moments, George et al. 2018; the update of SNOpt's EKFAC with
            ``full=True``).
        momentum: heavy-ball momentum of the base step (sgd, rmsprop, ekfac); the feedback
            gets none.
        weight_decay: L2 weight decay of the base step (added after preconditioning for
            ekfac, as SNOpt does).
        betas, eps: Adam's moment rates and denominator epsilon (eps also RMSprop's).
        alpha: moving-average rate of the squared gradients: RMSprop's (default 0.99) and
            EKFAC's second moments (default 0.75; 1 = K-FAC with eigenvalue damping).
        eps_ekfac: EKFAC's damping. update_freq: EKFAC's refresh period (iterations).
        eps_vxx: Tikhonov on V'_xx in the feedback gain, V'_xx + eps_vxx I.
        vxx_correction: propagate V_xx = max(0, 1 - q_u^T P q_u) q_x q_x^T (off by default:
            see docs/ddpnopt.md; it materialises per-sample gradients of the layers).
        feedback: False: the base optimizer exactly (no records, no update pass).
        second_order: "DDPNOpt2nd": add the dynamics' mixed second derivatives
            V'_x . f_ux to Q_ux (one double backward per stage and step; small nets).
        max_feedback_ratio: a trust region (ours, not the paper's): each layer's feedback
            step is scaled down to at most this multiple of its base step's norm. None (the
            default): the paper's update exactly; 1 keeps deep ReLU CNNs stable (see
            docs/ddpnopt.md).
        project_bn: for a layer whose output goes straight into a BatchNorm normalising
            with batch statistics (training mode), project the feedback, per channel, off
            the shift and the scaling such a BatchNorm cancels (as its own backward does for
            the gradient), so the feedback no longer moves the channels' means and scales,
            which the running statistics trail: the direction before the base map
            (:func:`ddp_math.batchnorm_projection`) and the step after it
            (:func:`ddp_math.batchnorm_step_projection`; docs/ddpnopt.md). False: the
            feedback as derived.
        params: parameters or parameter groups (default ``model.parameters()``).

    Attributes:
        stages: the model's :class:`Stage` s.
        state[p]: the base's entries (``momentum_buffer``; ``step``, ``square_avg``;
            ``step``, ``exp_avg``, ``exp_avg_sq``; for EKFAC the layer weight's
            :class:`~ocnode.optim.kfac_math.KroneckerBasis` fields).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad hyperparameter, or a model that is not a chain.
    """

    _KEY = "ddpnopt"  # key of the optimizer-wide counters in self.state
    _INIT_DEPTH = 0  # subclass __init__ frames above this one (for warnings' stacklevel)

    def __init__(self, model: nn.Module, lr: float, base: str = "sgd", momentum: float = 0.0,
                 weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, alpha: float | None = None, eps_ekfac: float = 0.05,
                 update_freq: int = 100, eps_vxx: float = 0.0, vxx_correction: bool = False,
                 feedback: bool = True, second_order: bool = False,
                 max_feedback_ratio: float | None = None, project_bn: bool = True,
                 params: Iterable | None = None) -> None:
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} takes the model (an nn.Module), got {type(model).__name__}"
                            f": write {name}(model, lr=...), and pass params=... to choose the "
                            "parameters or parameter groups")
        _validate(base, lr, momentum, weight_decay, betas, eps, alpha, eps_ekfac, update_freq,
                  eps_vxx)
        if second_order and not feedback:
            raise ValueError("second_order=True needs feedback=True (it changes the feedback)")
        if max_feedback_ratio is not None and not max_feedback_ratio > 0:
            raise ValueError(f"max_feedback_ratio must be > 0 or None (no bound), got "
                             f"{max_feedback_ratio}; 1 is a safe choice")
        alpha = DEFAULT_ALPHA.get(base, 0.0) if alpha is None else alpha
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps, alpha=alpha, eps_ekfac=eps_ekfac)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model, self.base, self.update_freq = model, base, update_freq
        self.eps_vxx, self.vxx_correction = float(eps_vxx), bool(vxx_correction)
        self.feedback, self.second_order = bool(feedback), bool(second_order)
        self.max_feedback_ratio, self.project_bn = max_feedback_ratio, bool(project_bn)
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        self.stages, unsupported = self._structure(model, owned)
        if unsupported:
            warnings.warn(f"{name}: no feedback policy for " + ", ".join(unsupported)
                          + " (only Linear and Conv2d with groups=1 get one); they take the "
                          f"base ({base}) step only", UserWarning,
                          stacklevel=2 + self._INIT_DEPTH)
        want_gx = self._wanted_gx() if self.feedback else set()
        self._recorder = _Recorder(model, self.stages, want_gx, self.second_order,
                                   self._recording_due, self._probes())
        self._warned: set[str] = set()
        self.sync: FactorSync | None = None  # set by data-parallel runs
        self.state[self._KEY] = {"step": 0, "batch": 1}  # type: ignore[index]

    # ---- the net's structure (what DGNOpt extends) ---------------------------------------

    def _structure(self, model: nn.Module, owned: set[int]) -> tuple[list[Stage], list[str]]:
        """The stages, and "name (type)" of the trained modules without a feedback policy."""
        chain = chain_stages(model, owned)
        return chain.stages, chain.unsupported

    def _wanted_gx(self) -> set[int]:
        """The stages whose input gradient the feedback needs (stage 0's dx is 0)."""
        return set(range(1, len(self.stages)))

    def _probes(self) -> list[Probe]:
        """Tensors recorded beside the stages (none for a chain)."""
        return []

    def _players(self) -> list[tuple[int, ...]]:
        """The stages of each player of the game, in order: one stage each in a chain."""
        return [(t,) for t in range(len(self.stages))]

    # ---- records -------------------------------------------------------------------------

    def _recording_due(self) -> bool:
        return self.feedback or (self.base == "ekfac" and self._refresh_due())

    def _refresh_due(self) -> bool:
        return self._counters["step"] % self.update_freq == 0

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{type(self).__name__}: {msg} (warned once)", RuntimeWarning,
                          stacklevel=5)

    # ---- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """The base step for every parameter, plus the feedback of each stage (update pass).

        A non-finite gradient skips the step with a warning and changes no state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records, forwards = self._recorder.take()
        if not self._grads_finite():
            warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped (state "
                          "unchanged); lower the learning rate or clip gradients",
                          RuntimeWarning, stacklevel=2)
            return loss
        if self.base == "ekfac" and self._refresh_due():
            self._refresh(records)
        new, scales = self._base_phase()
        todo = self._feedback_stages(records, forwards, new) if self.feedback else []
        deferred = self._deferred(todo)
        for p, value in new.items():
            if id(p) not in deferred:
                p.copy_(value)
        if todo:
            self._update_pass(cast(list[_Record], records), todo, new, scales)
        self._counters["step"] += 1
        return loss

    def _grads_finite(self) -> bool:
        return kfac_math.all_finite([p.grad for g in self.param_groups for p in g["params"]
                                     if p.grad is not None])

    @staticmethod
    def _layer_params(stage: Stage) -> list[Tensor]:
        layer = cast(CoveredLayer, stage.layer)
        return [layer.weight] + ([layer.bias] if layer.bias is not None else [])

    def _deferred(self, todo: list[int]) -> set[int]:
        """Ids of the parameters the update pass writes (the others take the base step first)."""
        return {id(p) for t in todo for p in self._layer_params(self.stages[t])}

    # ---- the base step -------------------------------------------------------------------

    def _base_phase(self) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor | float]]:
        """Advance the base optimizer's state; the new values and map diagonals per parameter.

        The parameters themselves are not changed here.
        """
        pre = self._ekfac_gradients() if self.base == "ekfac" else {}
        new: dict[Tensor, Tensor] = {}
        scales: dict[Tensor, Tensor | float] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                res = self._base_step(p, pre.get(p, p.grad), group)
                self.state[p].update(res.state)
                new[p], scales[p] = res.param, res.scale
        return new, scales

    def _base_step(self, p: Tensor, grad: Tensor, group: dict) -> ddp_math.BaseStep:
        st, lr, wd = self.state[p], group["lr"], group["weight_decay"]
        if self.base == "adam":
            return ddp_math.adam_step(p, grad, st, lr, group["betas"], group["eps"], wd)
        if self.base == "rmsprop":
            return ddp_math.rmsprop_step(p, grad, st, lr, group["alpha"], group["eps"],
                                         group["momentum"], wd)
        return ddp_math.sgd_step(p, grad, st.get("momentum_buffer"), lr, group["momentum"], wd)

    def _group_of(self, p: Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _layers(self) -> list[CoveredLayer]:
        return [s.layer for s in self.stages if s.layer is not None]

    def _bias_grad(self, layer: CoveredLayer) -> Tensor | None:
        """The bias column of G: the bias's gradient, zeros where it has none or is not ours."""
        if not layer.has_bias:
            return None
        if layer.bias is not None and layer.bias.grad is not None:
            return layer.bias.grad
        return cast(Tensor, layer.weight.grad).new_zeros(layer.weight.shape[0])

    def _ekfac_gradients(self) -> dict[Tensor, Tensor]:
        """EKFAC-preconditioned gradients of the layers with a basis (m2 advanced)."""
        out: dict[Tensor, Tensor] = {}
        for layer in self._layers():
            st = self.state[layer.weight]
            if "m2" not in st or layer.weight.grad is None:
                continue
            group = self._group_of(layer.weight)
            g = kfac_math.layer_gradient(layer.weight.grad, self._bias_grad(layer))
            g, st["m2"] = kfac_math.ekfac_precondition(
                g, st["basis_a"], st["basis_b"], st["m2"], group["alpha"], group["eps_ekfac"],
                self._counters["batch"])
            w, b = kfac_math.split_gradient(g, layer.weight.shape, layer.has_bias)
            out[layer.weight] = w
            if layer.bias is not None and layer.bias.grad is not None and b is not None:
                out[layer.bias] = b
        return out

    def _refresh(self, records: list[_Record] | None) -> None:
        """EKFAC refresh: K-FAC factors of this iteration's batch, eigenbases, reset m2."""
        acc = FactorAccumulator()
        for stage, rec in zip(self.stages, records or []):
            if stage.layer is not None and rec.x is not None and rec.g is not None:
                acc.add(stage.layer.module, rec.x, rec.g, 1, None)
        stats = self._global_stats(acc.pop())
        if not stats and self._layers():
            warnings.warn(f"{type(self).__name__}: no curvature was recorded on this EKFAC "
                          "refresh iteration (no forward/backward with grad before step?); "
                          "keeping the old factors", RuntimeWarning, stacklevel=3)
        by_module = {layer.module: layer for layer in self._layers()}
        for module, st in stats.items():
            self._refresh_layer(by_module[module], st)
        if stats:
            self._counters["batch"] = max(st.batch for st in stats.values())
        self._agree_bases()

    def _refresh_layer(self, layer: CoveredLayer, st: LayerStats) -> None:
        basis = kfac_math.refreshed_basis(st.a_factor, st.b_factor, st.num_locations)
        if isinstance(basis, str):
            warnings.warn(f"{type(self).__name__}: {basis} for {layer.module}; keeping the old "
                          "basis", RuntimeWarning, stacklevel=4)
            return
        self.state[layer.weight].update(basis._asdict())

    # ---- data parallelism ----------------------------------------------------------------
    # With ``sync`` (set by ocnode.training.distributed), every process applies the update of
    # the global batch: EKFAC's factors are averaged once per refresh, and each stage's
    # feedback direction E[Q_ux dx] (a mean over the local rows, on the per-sample scale of
    # the local batch) is averaged over the processes before it is applied, so the next
    # stage's x_hat is the same everywhere: one all-reduce per stage and step, of the size of
    # the layer's gradient.

    def _global_stats(self, stats: dict[nn.Module, LayerStats]) -> dict[nn.Module, LayerStats]:
        return stats if self.sync is None else self.sync.reduce(self._layers(), stats)

    def _agree_bases(self) -> None:
        if self.sync is not None:
            keys = ("a_factor", "b_factor", "basis_a", "basis_b", "lam_a", "lam_b", "m2")
            self.sync.agree([self.state.get(c.weight, {}).get(k) for c in self._layers()
                             for k in keys])

    def _global_direction(self, direction: Tensor) -> Tensor:
        return direction if self.sync is None else self.sync.mean(direction)

    # ---- the update pass -----------------------------------------------------------------

    def _feedback_stages(self, records: list[_Record] | None, forwards: int,
                         new: dict[Tensor, Tensor]) -> list[int]:
        """Indices of the stages that get feedback this step (their records are complete)."""
        if not self._records_usable(records, forwards):
            return []
        records = cast(list[_Record], records)
        return [t for t in range(1, len(self.stages)) if self._complete(t, records, new)
                and records[t].gx is not None]

    def _records_usable(self, records: list[_Record] | None, forwards: int) -> bool:
        """Whether one forward and backward were recorded (else warn once)."""
        if records is None or forwards != 1 or records[0].x is None:
            self._warn_once("records", "feedback needs exactly one forward (with grad) and "
                            f"backward before each step, saw {forwards} forward(s); this step "
                            "took the base step only")
            return False
        return True

    def _complete(self, t: int, records: list[_Record], new: dict[Tensor, Tensor]) -> bool:
        """Stage t has a policy, a base step, its layer's records (and the output gradient
        that the second-order term needs)."""
        stage, rec = self.stages[t], records[t]
        if stage.layer is None or stage.layer.weight not in new or rec.x is None \
                or rec.g is None:
            return False
        return not self.second_order or self._grad_at_output(records, t) is not None

    def _grad_at_output(self, records: list[_Record], t: int) -> Tensor | None:
        """dL/dx_{t+1} at stage t's output (needed by the second-order term)."""
        n = len(self.stages)
        return records[t + 1].gx if t + 1 < n else records[n - 1].gy

    def _quiet(self) -> contextlib.AbstractContextManager[None]:
        return quiet(self.model, self._recorder)

    def _pass_maps(self, records: list[_Record], todo: list[int],
                   scales: dict[Tensor, Tensor | float]
                   ) -> tuple[dict[int, ddp_math.LayerMap], dict[int, Tensor]]:
        """The base map P of each feedback stage, and its V_xx correction factor (if on)."""
        maps = {t: self._layer_map(cast(CoveredLayer, self.stages[t].layer), scales)
                for t in todo}
        return maps, self._value_scales(records, maps) if self.vxx_correction else {}

    def _update_pass(self, records: list[_Record], todo: list[int], new: dict[Tensor, Tensor],
                     scales: dict[Tensor, Tensor | float]) -> None:
        """x_hat_0 = x_0; per stage: apply base step and feedback, then x_hat_{t+1} = f_t."""
        maps, r2 = self._pass_maps(records, todo, scales)
        x_hat = cast(Tensor, records[0].x)
        with self._quiet():
            for t in range(todo[-1] + 1):
                x_hat = self._stage_update(t, records, x_hat, (maps, r2, new),
                                           run=t < todo[-1])

    def _stage_update(self, t: int, records: list[_Record], x_hat: Tensor,
                      ctx: tuple[dict[int, ddp_math.LayerMap], dict[int, Tensor],
                                 dict[Tensor, Tensor]],
                      extra: Tensor | None = None, run: bool = True) -> Tensor:
        """Stage t of the update pass: its feedback (if it has a map), then x_hat_{t+1}.

        Args:
            x_hat: the stage's input in the updated net. ctx: (maps, V_xx factors, the base
                steps' new values). extra: (B,) a term added to the feedback weights c_i
                (DGNOpt's skip terms). run: also run the stage on x_hat.
        """
        maps, r2, new = ctx
        if t in maps:
            dx = x_hat - cast(Tensor, records[t].x)
            direction = self._global_direction(self._direction(t, records, dx, r2.get(t),
                                                               extra))
            self._apply_feedback(t, records, maps[t](direction), new)
        return self._run_stage(t, records, x_hat) if run else x_hat

    def _run_stage(self, t: int, records: list[_Record], x: Tensor) -> Tensor:
        """f_t(x) with the current parameters and the forward's random draws."""
        with _replayed_rng(records[t].rng):
            for m in self.stages[t].modules:
                x = m(x)
        return x

    def _direction(self, t: int, records: list[_Record], dx: Tensor, r2: Tensor | None,
                   extra: Tensor | None = None) -> Tensor:
        """E[Q_ux dx_t] of stage t as a (d_out, d_in [+1]) matrix.

        c_i = <q_x^(i), dx^(i)> (+ ``extra``), times the V_xx factor r2.
        """
        gx = records[t].gx
        c = ddp_math.feedback_weights(gx, dx) if gx is not None else None
        if extra is not None:
            c = extra if c is None else c + extra
        c = cast(Tensor, c)
        if r2 is not None:
            c = c * r2
        return self._stage_direction(t, records, c, dx)

    def _stage_direction(self, t: int, records: list[_Record], c: Tensor,
                         dx: Tensor) -> Tensor:
        """(1/B) sum_i c_i q_u^(i), plus the eps_vxx and second-order terms along dx."""
        stage, rec = self.stages[t], records[t]
        layer, x = cast(CoveredLayer, stage.layer), cast(Tensor, rec.x)
        out = self._layer_direction(t, records, c)
        if not (self.eps_vxx or self.second_order):
            return out
        fn = ddp_math.stage_function(stage.modules, stage.names)
        params = [getattr(layer.module, n) for n in stage.names]
        with _replayed_rng(rec.rng):
            if self.eps_vxx:
                extra = ddp_math.tikhonov_direction(fn, params, x, dx)
                out = out + (self.eps_vxx / x.shape[0]) * _as_matrix(extra)
            if self.second_order:
                gy = cast(Tensor, self._grad_at_output(records, t))
                out = out + _as_matrix(ddp_math.mixed_direction(fn, params, x, dx, gy))
        return out

    def _layer_direction(self, t: int, records: list[_Record], c: Tensor) -> Tensor:
        """(1/B) sum_i c_i q_u^(i) of stage t's layer, projected (``project_bn``) when a
        BatchNorm in batch-statistics mode takes the layer's output."""
        rec = records[t]
        return ddp_math.feedback_direction(cast(CoveredLayer, self.stages[t].layer).module,
                                           cast(Tensor, rec.x), cast(Tensor, rec.g), c,
                                           rec.h if self._projects(t, records) else None)

    def _projects(self, t: int, records: list[_Record]) -> bool:
        """``project_bn`` applies to stage t: a BatchNorm normalising with the batch's
        statistics takes its layer's output (and the output was recorded)."""
        bn = self.stages[t].normaliser
        return self.project_bn and bn is not None and records[t].h is not None and (
            bn.training or (bn.running_mean is None and bn.running_var is None))

    def _apply_feedback(self, t: int, records: list[_Record], step: Tensor,
                        new: dict[Tensor, Tensor]) -> None:
        """p <- base value - P E[Q_ux dx] for stage t's layer's weight and (trained) bias;
        with ``project_bn``, P E[Q_ux dx] projected again after the base map P."""
        layer = cast(CoveredLayer, self.stages[t].layer)
        if self._projects(t, records):
            step = ddp_math.batchnorm_step_projection(step, layer.weight, layer.has_bias)
        if self.max_feedback_ratio is not None:
            base = [new[layer.weight] - layer.weight]
            if layer.has_bias:
                bias = layer.bias
                base.append(new[bias] - bias if bias is not None and bias in new
                            else layer.weight.new_zeros(layer.weight.shape[0]))
            step = ddp_math.clip_feedback(step, _as_matrix(base), self.max_feedback_ratio)
        w, b = kfac_math.split_gradient(step, layer.weight.shape, layer.has_bias)
        layer.weight.copy_(new[layer.weight]).sub_(w)
        if layer.bias is not None and layer.bias in new and b is not None:
            layer.bias.copy_(new[layer.bias]).sub_(b)

    def _layer_map(self, layer: CoveredLayer, scales: dict[Tensor, Tensor | float]
                   ) -> ddp_math.LayerMap:
        """The base map P of one layer, from this step's state."""
        w, bias = layer.weight, layer.bias
        sw = torch.as_tensor(scales[w], dtype=w.dtype, device=w.device).expand_as(w)
        sb = None
        if layer.has_bias:
            sb = (torch.as_tensor(scales[bias], dtype=w.dtype, device=w.device)
                  .expand(w.shape[0]) if bias is not None and bias in scales
                  else w.new_zeros(w.shape[0]))
        scale = kfac_math.layer_gradient(sw, sb)
        frozen = layer.has_bias and (bias is None or bias not in scales)
        st = self.state[w]
        if self.base == "ekfac" and "m2" in st:
            kron = (st["basis_a"], st["basis_b"], st["m2"], self._group_of(w)["eps_ekfac"])
            return ddp_math.LayerMap(scale, kron, frozen)
        return ddp_math.LayerMap(scale, None, frozen)

    def _value_scales(self, records: list[_Record],
                      maps: dict[int, ddp_math.LayerMap]) -> dict[int, Tensor]:
        """Per feedback stage t, the V_xx correction factor r2 of V'_xx = r2 q q^T after its
        player (the players of :meth:`_players`, last to first)."""
        batch = cast(Tensor, records[0].x).shape[0]
        r2 = cast(Tensor, records[0].x).new_ones(batch)
        players = self._players()
        # a player's own factor matters only to earlier players with feedback
        first = next((i for i, p in enumerate(players) if any(t in maps for t in p)),
                     len(players))
        out: dict[int, Tensor] = {}
        for i in reversed(range(len(players))):
            out.update({t: r2 for t in players[i]})
            quads = [self._quadratic_form(t, records, maps) for t in players[i]
                     if i > first and t in maps]
            live = [q for q in quads if q is not None]
            if live:
                r2 = ddp_math.value_scale(r2, functools.reduce(operator.add, live))
        return out

    def _quadratic_form(self, t: int, records: list[_Record],
                        maps: dict[int, ddp_math.LayerMap]) -> Tensor | None:
        """q_u^(i)T P q_u^(i) of stage t, (B,); None without its records."""
        rec, layer = records[t], self.stages[t].layer
        if layer is None or rec.x is None or rec.g is None:
            return None
        grads = ddp_math.per_sample_gradients(layer.module, rec.x, rec.g)
        return ddp_math.quadratic_forms(maps[t], grads)

    # ---- state ---------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook from the model (to build another optimizer on it)."""
        self._recorder.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base's state, EKFAC's factors and the counters.

        Raises:
            ValueError: a layer's saved EKFAC factors do not fit this model's layer.
        """
        self._check_layer_shapes(state_dict)
        super().load_state_dict(state_dict)
        saved = self.state.pop(self._KEY, {})  # type: ignore[call-overload]
        self.state[self._KEY] = {"step": 0, "batch": 1, **saved}  # type: ignore[index]

    def _check_layer_shapes(self, state_dict: dict[str, Any]) -> None:
        saved = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        if len(saved) != len(current):
            return  # torch's load_state_dict says what differs
        index = {id(p): i for i, p in zip(saved, current)}
        for layer in self._layers():
            st = state_dict["state"].get(index.get(id(layer.weight)), {})
            for key, shape in kfac_math.basis_shapes(*layer.shape).items():
                if key in st and tuple(st[key].shape) != shape:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: {key} of {layer.module} "
                        f"has shape {tuple(st[key].shape)}, the model's layer needs {shape}; "
                        "load a checkpoint of the same architecture (and the same params "
                        "order)")

    @property
    def _counters(self) -> dict:
        """Optimizer-wide counters: 'step' (iterations taken) and 'batch' (EKFAC's B)."""
        return self.state[self._KEY]  # type: ignore[index]

    @property
    def iteration(self) -> int:
        """Number of steps taken."""
        return int(self._counters["step"])


# ----------------------------------------------------------------------------- vanilla DDP


def _flat_stages(chain: Chain, x0: Tensor) -> tuple[list[Callable], list[Tensor], list[Tensor]]:
    """Per stage: the flat per-sample function, the flat control, the nominal inputs."""
    fns, us, xs, x = [], [], [], x0
    for stage in chain.stages:
        layer = cast(CoveredLayer, stage.layer)
        fn = ddp_math.per_sample_stage(ddp_math.stage_function(stage.modules, stage.names),
                                       layer.weight.shape, layer.has_bias, x.shape[1:])
        params = [getattr(layer.module, n) for n in stage.names]
        fns.append(fn)
        us.append(_as_matrix(params).reshape(-1).detach())
        xs.append(x.flatten(1))
        for m in stage.modules:
            x = m(x)
    return fns, us, xs


def _linear_factors(stage: Stage, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A Linear stage's per-sample factors at its inputs x (B, n): f_x (B, n', n), the
    Jacobians of the stage output by the layer output z (B, n', d) and the layer inputs
    x~ = [x | 1] (B, n [+1])."""
    layer = cast(nn.Linear, cast(CoveredLayer, stage.layer).module)
    followers = stage.modules[1:]

    def after_layer(z: Tensor) -> Tensor:
        y = z.unsqueeze(0)
        for m in followers:
            y = m(y)
        return y.reshape(-1)

    jac_z = torch.func.vmap(torch.func.jacrev(after_layer))(layer(x))
    x_tilde = x if layer.bias is None else torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return jac_z @ layer.weight.detach(), jac_z, x_tilde


def vanilla_ddp_step(model: nn.Module, x: Tensor, target: Tensor,
                     loss_fn: Callable[[Tensor, Tensor], Tensor], damping: float = 1e-3,
                     lr: float = 1.0) -> float:
    """One iteration of vanilla DDP on the batch (a dense baseline for tiny FCNs).

    The batch is one augmented state; per-sample Jacobians, the exact per-sample Hessians of
    the loss at the output, and dense Q matrices (:func:`ddp_math.vanilla_ddp_gains`) give
    k_t and K_t; the update pass applies u_t <- u_t + lr k_t + K_t dX_t. Memory grows as
    (B n)^2 per stage (n a hidden width; the data's width only enters the first stage,
    solved in its row space when wide): for a few dozen hidden units and small batches only.

    Args:
        model: an ``nn.Sequential`` chain whose stages all start with a Linear layer (an
            FCN; a Flatten before the first is allowed).
        x: the batch (B, ...). target: the targets (B, ...).
        loss_fn: ``loss_fn(outputs, targets)`` -> the per-sample losses (B,), e.g.
            ``lambda o, y: F.cross_entropy(o, y, reduction="none")``; it is differentiated
            per sample under ``torch.func.vmap`` (no ``.item()`` or data-dependent branching).
        damping: Tikhonov on Q_uu (> 0). lr: the step on the feedforward term k.

    Returns:
        The mean loss before the step.

    Raises:
        ValueError: a model that is not a chain of Linear stages, or damping <= 0.
    """
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (Q_uu is singular for small batches), got "
                         f"{damping}")
    chain = chain_stages(model, {id(p) for p in model.parameters()})
    if chain.unsupported or any(s.layer is None or not isinstance(s.layer.module, nn.Linear)
                                for s in chain.stages):
        raise ValueError("vanilla_ddp_step is for fully connected nets: every stage must start "
                         "with a trainable Linear layer (its dense Q matrices over the batch "
                         "would not fit for a CNN; use DDPNOpt there); unsupported: "
                         f"{', '.join(chain.unsupported) or 'a frozen or non-Linear layer'}")
    with torch.no_grad():
        x0 = x
        for m in chain.prefix:
            x0 = m(x0)
        fns, us, xs = _flat_stages(chain, x0)
        out = model(x)
        f_x, jac_z, inputs = zip(*(_linear_factors(s, xt) for s, xt in zip(chain.stages, xs)))
    v_x, v_xx = _loss_derivatives(loss_fn, out.flatten(1).detach(), target, out.shape[1:])
    ks, gains = ddp_math.vanilla_ddp_gains(f_x, jac_z, inputs, v_x, v_xx, damping,
                                           input_gain=False)
    _write_controls(chain, ddp_math.dense_update_pass(fns, us, xs, [lr * k for k in ks], gains))
    return float(loss_fn(out, target).mean())


@torch.no_grad()
def _write_controls(chain: Chain, controls: Sequence[Tensor]) -> None:
    """Copy flat controls u_t = vec([W | b]) into the stages' layers."""
    for stage, u in zip(chain.stages, controls):
        layer = cast(CoveredLayer, stage.layer)
        w, b = kfac_math.split_gradient(u.reshape(layer.shape), layer.weight.shape,
                                        layer.has_bias)
        layer.weight.copy_(w)
        if b is not None:
            cast(Tensor, layer.module.bias).copy_(b)


def _loss_derivatives(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, target: Tensor,
                      shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per-sample gradient (B, n) and Hessian (B, n, n) of phi_i at the flat outputs."""
    def phi(o: Tensor, y: Tensor) -> Tensor:
        return loss_fn(o.reshape(1, *shape), y.unsqueeze(0))[0]

    grad = torch.func.vmap(torch.func.grad(phi))(out, target)
    return grad, torch.func.vmap(torch.func.hessian(phi))(out, target)
