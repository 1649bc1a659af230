"""DGNOpt: game-theoretic feedback policies for residual networks.

Liu, Chen, Theodorou, "Dynamic Game Theoretic Neural Optimizer", ICML 2021 (arXiv 2105.03788),
and its predecessor GT-DDP (arXiv 2007.08880): the layers of a net are the players of a
dynamic game, and a layer inside a residual block gets a feedback policy over its own input
and over the block's skip source x_r, which the block reuses at its addition,

    u <- u + base_step(grad) - P E[Q_ux dx] - P E[Q_ur dx_r].

The paper's equations were out of reach: the rules here are our derivation (docs/dgnopt.md),
checked against a dense augmented-state DDP on tiny nets. Under DDPNOpt's rank-one
Gauss-Newton model both terms are one weight gradient with the layer's output gradient scaled
per sample by c_i:

- ``mode="fne"`` (feedback Nash: every layer is a player, the others' policies fixed): the
  state of a body layer is (h_{j-1}, x_r) and c_i = <q_h, dh_{j-1}> + <g_skip, dx_r>, g_skip
  the gradient at x_r through the shortcut alone; the update pass cascades inside the block.
  A projection shortcut's layers are players too, after the body: their state is
  (h_m, s_{k-1}) and c_i = <q_s, ds_{k-1}> + <g_sum, dh_m>, g_sum the gradient at the addition.
- ``mode="gr"`` (group rationality: a block's layers cooperate as one player with state x_r):
  c_i = <dL/dx_r, dx_r> for every layer of the block (the total gradient at the block input),
  and the block's update is computed at block entry.
- ``mode="chain"`` (the baseline that ignores the skips: DDPNOpt's rule on each layer's own
  input): FNE without the skip terms, c_i = <q_h, dh_{j-1}> (and <q_s, ds_{k-1}> in a
  projection shortcut).

On a net without :class:`~ocnode.nn.Residual` blocks every mode is DDPNOpt, bit for bit.
The class keeps the records (it extends :class:`~ocnode.optim.DDPNOpt`'s); the net's
structure and the block function are the pure functions below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from ocnode.curvature import CoveredLayer
from ocnode.nn.residual import Residual
from ocnode.optim import ddp_math
from ocnode.optim.ddpnopt import (
    _STOCHASTIC,
    Chain,
    DDPNOpt,
    Probe,
    Stage,
    _as_matrix,
    _Record,
    _replayed_rng,
    flatten_chain,
    group_stages,
)

MODES = ("fne", "gr", "chain")
_NOT_A_NET = ("DGNOpt needs the model as an nn.Sequential of stages and ocnode.Residual blocks, "
              "a block's body and shortcut being chains of stages (nested nn.Sequentials are "
              "flattened) whose entries with parameters are single layers (Linear, Conv2d, "
              "BatchNorm, ...). {what} Write the model out as such a chain; nested Residual "
              "blocks, shared modules and other modules holding parameters are not supported.")

#: One step of the update pass through a branch: (stage index, input) -> output.
Step = Callable[[int, Tensor], Tensor]
#: The update pass's context: (base maps, V_xx factors, the base steps' new values).
Context = tuple[dict[int, ddp_math.LayerMap], dict[int, Tensor], dict[Tensor, Tensor]]


# ----------------------------------------------------------------------------- the net


@dataclass(frozen=True)
class Block:
    """A :class:`~ocnode.nn.Residual` block of the chain, y = post(shortcut(x_r) + body(x_r)).

    Attributes:
        module: the Residual. name: its name in the model.
        body_prefix: the body's modules before its first layer (parameter-free).
        body: indices of the body's stages (into the optimizer's stages), in order.
        shortcut_prefix, shortcut: the same for the shortcut (the identity:
            ``(nn.Identity(),)`` and no stage).
        post: the parameter-free modules after the block in the chain (e.g. its ReLU).
        probe: index of its first probe record, after the stages' records:
            ``probe``: x_r and the gradient at x_r through the body alone;
            ``probe + 1``: x_r and the gradient at x_r through the shortcut alone (g_skip);
            ``probe + 2``: the body's output h_m and the gradient at the addition (g_sum).
    """

    module: Residual
    name: str
    body_prefix: tuple[nn.Module, ...]
    body: tuple[int, ...]
    shortcut_prefix: tuple[nn.Module, ...]
    shortcut: tuple[int, ...]
    post: tuple[nn.Module, ...]
    probe: int

    @property
    def stages(self) -> tuple[int, ...]:
        """The block's stages: the body's, then the shortcut's (the FNE players' order)."""
        return self.body + self.shortcut

    def probes(self) -> list[Probe]:
        """The three tensors the recorder keeps for this block (see ``probe``)."""
        return [Probe(self.module.body, "input"), Probe(self.module.shortcut, "input"),
                Probe(self.module.body, "output")]


#: A node of the chain: an outer stage (its index) or a block.
Node = int | Block


class ResidualNet(NamedTuple):
    """A model split into stages and blocks (:func:`residual_net`).

    Attributes:
        prefix: the modules before the first node (x_0 is their output).
        stages: every stage, in the run order of the nodes (a block's body, then shortcut).
        nodes: the outer stages and the blocks, in order.
        unsupported: "name (type)" of the trained modules that get no feedback policy.
    """

    prefix: tuple[nn.Module, ...]
    stages: list[Stage]
    nodes: list[Node]
    unsupported: list[str]


def _segments(entries: Iterable[tuple[str, nn.Module]]
              ) -> list[tuple[tuple[str, Residual] | None, list[tuple[str, nn.Module]]]]:
    """Split a flat chain at its Residual blocks: (the block before, the entries after)."""
    out: list[tuple[tuple[str, Residual] | None, list[tuple[str, nn.Module]]]] = [(None, [])]
    for name, m in entries:
        if isinstance(m, Residual):
            out.append(((name, m), []))
        else:
            out[-1][1].append((name, m))
    return out


def _check_deterministic(modules: Sequence[nn.Module], where: str) -> None:
    """Raise for dropout/RReLU where the update pass cannot replay their draws."""
    bad = [type(m).__name__ for m in modules if isinstance(m, _STOCHASTIC)]
    if bad:
        raise ValueError(f"DGNOpt: {', '.join(bad)} {where} cannot be replayed in the update "
                         "pass; place it after a layer inside the block's body")


class _NetBuilder:
    """Collects stages and nodes, in run order, while :func:`residual_net` walks the chain."""

    def __init__(self, owned: set[int]) -> None:
        self.owned: set[int] = owned
        self.seen: set[int] = set()
        self.prefix: tuple[nn.Module, ...] = ()
        self.stages: list[Stage] = []
        self.nodes: list[Node] = []
        self.unsupported: list[str] = []

    def group(self, entries: Iterable[tuple[str, nn.Module]]) -> Chain:
        """Entries grouped into stages (not appended yet)."""
        return group_stages(entries, self.owned, self.seen, _NOT_A_NET)

    def append(self, chain: Chain) -> tuple[int, ...]:
        """Append a chain's stages; their indices."""
        start = len(self.stages)
        self.stages += chain.stages
        self.unsupported += chain.unsupported
        return tuple(range(start, len(self.stages)))

    def block(self, name: str, res: Residual, post: tuple[nn.Module, ...]) -> None:
        """Append a block: its body's stages, then its shortcut's."""
        body = self.group(flatten_chain(res.body, f"{name}.body."))
        short = self.group(flatten_chain(res.shortcut, f"{name}.shortcut."))
        _check_deterministic(post, f"after block {name}")
        _check_deterministic(body.prefix, f"before the first layer of {name}'s body")
        _check_deterministic(short.prefix, f"before the first layer of {name}'s shortcut")
        k = sum(isinstance(n, Block) for n in self.nodes)
        self.nodes.append(Block(res, name, body.prefix, self.append(body), short.prefix,
                                self.append(short), post, k))

    def result(self) -> ResidualNet:
        """The net, with the blocks' probe indices placed after the stages' records."""
        n = len(self.stages)
        nodes = [dataclasses.replace(node, probe=n + 3 * node.probe)
                 if isinstance(node, Block) else node for node in self.nodes]
        return ResidualNet(self.prefix, self.stages, nodes, self.unsupported)


def residual_net(model: nn.Module, owned: set[int]) -> ResidualNet:
    """Split an ``nn.Sequential`` of stages and :class:`~ocnode.nn.Residual` blocks.

    The parameter-free modules after a block (its ReLU) belong to the block; a block's body
    and shortcut are chains of stages (nested Sequentials flattened, a single layer allowed).

    Args:
        model: the net. owned: ids of the parameters the optimizer trains.

    Raises:
        ValueError: a structure DGNOpt does not support (the message says which).
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ValueError(_NOT_A_NET.format(what=f"Got a {type(model).__name__}."))
    net = _NetBuilder(owned)
    for head, entries in _segments(flatten_chain(model)):
        chain = net.group(entries)
        if head is None:
            net.prefix = chain.prefix
        else:
            net.block(*head, post=chain.prefix)
        net.nodes += list(net.append(chain))
    return net.result()


# ----------------------------------------------------------------------------- the maths


def skip_weights(grad: Tensor | None, d: Tensor) -> Tensor | None:
    """c_i = <g^(i), d^(i)> on the per-sample scale, or None for a missing gradient.

    A tensor without a recorded gradient does not depend on any trained parameter, so its
    deviation in the update pass is exactly zero: the term is absent.

    Args:
        grad: the gradient of the mean loss at a state, (B, ...), or None. d: the state's
            deviation x_hat - x, same shape.

    Returns:
        (B,) or None.
    """
    return None if grad is None else ddp_math.feedback_weights(grad, d)


def add_optional(*terms: Tensor | None) -> Tensor | None:
    """The sum of the terms that are not None (None if all are)."""
    out: Tensor | None = None
    for term in terms:
        if term is not None:
            out = term if out is None else out + term
    return out


def block_function(stages: Sequence[Stage], block: Block, records: Sequence[_Record],
                   layers: Sequence[int]) -> ddp_math.Stage:
    """The block node x_r -> post(shortcut(x_r) + body(x_r)) as a function of its input and
    of the parameters of ``layers`` (their ``names``, concatenated in order).

    The other modules keep their current parameters; each stage replays its forward's random
    draws. Used for GR's eps_vxx and second-order terms, where the player is the whole block.
    """
    fns = {t: ddp_math.stage_function(stages[t].modules, stages[t].names) for t in layers}
    sizes = [len(stages[t].names) for t in layers]

    def branch(prefix: Sequence[nn.Module], idx: Sequence[int], x: Tensor,
               params: Mapping[int, Sequence[Tensor]]) -> Tensor:
        for m in prefix:
            x = m(x)
        for t in idx:
            with _replayed_rng(records[t].rng):
                if t in fns:
                    x = fns[t](x, params[t])
                else:
                    for m in stages[t].modules:
                        x = m(x)
        return x

    def run(x: Tensor, flat: Sequence[Tensor]) -> Tensor:
        params, start = {}, 0
        for t, size in zip(layers, sizes):
            params[t], start = flat[start:start + size], start + size
        y = branch(block.body_prefix, block.body, x, params) \
            + branch(block.shortcut_prefix, block.shortcut, x, params)
        for m in block.post:
            y = m(y)
        return y

    return run


def split_by_layer(parts: Sequence[Tensor], sizes: Sequence[int]) -> list[Tensor]:
    """Per-parameter tensors of several layers as one (d_out, d_in [+1]) matrix per layer."""
    out, start = [], 0
    for size in sizes:
        out.append(_as_matrix(parts[start:start + size]))
        start += size
    return out


# ----------------------------------------------------------------------------- the optimizer


class DGNOpt(DDPNOpt):
    """Dynamic game theoretic neural optimizer: DDPNOpt's feedback extended over skip states.

    Liu, Chen, Theodorou, ICML 2021 (arXiv 2105.03788), in DDPNOpt's practical form (rank-one
    Gauss-Newton value Hessians per sample, the base optimizer's curvature for E[Q_uu]); the
    update rules are our derivation (module docstring, docs/dgnopt.md). Used like DDPNOpt:
    one forward and backward of the batch (the loss a mean over dimension 0), then ``step``.

    BatchNorm layers (and other layers without a policy) are stages that take the base step;
    the update pass runs them as the net would (in training mode: the batch statistics of
    the updated states) and restores their running statistics afterwards.

    Args:
        model: an ``nn.Sequential`` of stages and :class:`~ocnode.nn.Residual` blocks (see
            :func:`residual_net`), not its parameters.
        lr: learning rate.
        base: 'sgd', 'rmsprop', 'adam' or 'ekfac', as DDPNOpt.
        mode: 'fne' (feedback Nash equilibrium: every layer a player, cascading inside a
            block), 'gr' (group rationality: a block's layers one player at block entry) or
            'chain' (FNE without the skip terms: DDPNOpt's rule on each layer's own input,
            the skips ignored; a baseline).
        momentum, weight_decay, betas, eps, alpha, eps_ekfac, update_freq, eps_vxx,
            vxx_correction, feedback, second_order, max_feedback_ratio, project_bn, params: as
            :class:`~ocnode.optim.DDPNOpt` (eps_vxx and second_order act on a layer's own
            input in FNE and on the whole block in GR).

    Attributes:
        stages: every stage (a block's body, then its shortcut, in run order).
        nodes: the outer stages (indices into ``stages``) and the :class:`Block` s, in order.
        mode: 'fne', 'gr' or 'chain'.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad hyperparameter (or mode), or a structure DGNOpt does not support.
    """

    _KEY = "dgnopt"
    _INIT_DEPTH = 1

    def __init__(self, model: nn.Module, lr: float, base: str = "sgd", mode: str = "fne",
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 alpha: float | None = None, eps_ekfac: float = 0.05, update_freq: int = 100,
                 eps_vxx: float = 0.0, vxx_correction: bool = False, feedback: bool = True,
                 second_order: bool = False, max_feedback_ratio: float | None = None,
                 project_bn: bool = True, params: Iterable | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be 'fne' (feedback Nash: each layer a player), 'gr' "
                             "(group rationality: a block's layers cooperate) or 'chain' (the "
                             f"skips ignored), got {mode!r}")
        self.mode = mode
        super().__init__(model, lr, base, momentum, weight_decay, betas, eps, alpha, eps_ekfac,
                         update_freq, eps_vxx, vxx_correction, feedback, second_order,
                         max_feedback_ratio, project_bn, params)

    # ---- structure -----------------------------------------------------------------------

    def _structure(self, model: nn.Module, owned: set[int]) -> tuple[list[Stage], list[str]]:
        net = residual_net(model, owned)
        self.nodes = net.nodes
        self._node_index: dict[int, int] = {}  # stage -> index of its node
        self._block_of: dict[int, Block] = {}
        for i, node in enumerate(net.nodes):
            for t in node.stages if isinstance(node, Block) else (node,):
                self._node_index[t] = i
                if isinstance(node, Block):
                    self._block_of[t] = node
        return net.stages, net.unsupported

    @property
    def blocks(self) -> list[Block]:
        """The net's Residual blocks, in order."""
        return [n for n in self.nodes if isinstance(n, Block)]

    def _wanted_gx(self) -> set[int]:
        first = {0} if self.nodes and self.nodes[0] == 0 else set()
        return set(range(len(self.stages))) - first

    def _probes(self) -> list[Probe]:
        return [p for b in self.blocks for p in b.probes()]

    def _players(self) -> list[tuple[int, ...]]:
        if self.mode != "gr":
            return super()._players()
        return [n.stages if isinstance(n, Block) else (n,) for n in self.nodes]

    # ---- which stages get feedback -------------------------------------------------------

    def _feedback_stages(self, records: list[_Record] | None, forwards: int,
                         new: dict[Tensor, Tensor]) -> list[int]:
        if not self._records_usable(records, forwards):
            return []
        records = cast(list[_Record], records)
        return [t for t in range(len(self.stages)) if self._complete(t, records, new)
                and self._has_terms(t, records)]

    def _has_terms(self, t: int, records: list[_Record]) -> bool:
        """Whether stage t's c_i has a term whose deviation can be non-zero."""
        block = self._block_of.get(t)
        if block is None:
            return t != self.nodes[0] and records[t].gx is not None
        if self.mode == "gr":
            return self._total_gradient(block, records) is not None
        other = block.probe + 1 if t in block.body else block.probe + 2
        skip = self.mode == "fne" and records[other].gx is not None
        return records[t].gx is not None or skip

    @staticmethod
    def _total_gradient(block: Block, records: list[_Record]) -> Tensor | None:
        """dL/dx_r: the body's path plus the shortcut's."""
        return add_optional(records[block.probe].gx, records[block.probe + 1].gx)

    def _grad_at_output(self, records: list[_Record], t: int) -> Tensor | None:
        """The value gradient after stage t's player: at the stage's output (FNE, outer
        stages), or at its block's output (GR)."""
        block = self._block_of.get(t)
        if block is None or self.mode == "gr":
            return self._node_output_gradient(records, self._node_index[t])
        branch = block.body if t in block.body else block.shortcut
        k = branch.index(t)
        return records[branch[k + 1]].gx if k + 1 < len(branch) else records[block.probe + 2].gx

    def _node_output_gradient(self, records: list[_Record], i: int) -> Tensor | None:
        """dL/dy at node i's output: the next node's input gradient (the model's at the end)."""
        if i + 1 == len(self.nodes):
            return records[len(self.stages) - 1].gy
        nxt = self.nodes[i + 1]
        return self._total_gradient(nxt, records) if isinstance(nxt, Block) else records[nxt].gx

    def _deferred(self, todo: list[int]) -> set[int]:
        out = super()._deferred(todo)
        if self.mode == "gr":  # the whole block is updated at its entry, from nominal values
            for t in todo:
                if t in self._block_of:
                    out |= {id(p) for p in self._block_of[t].module.parameters()}
        return out

    # ---- the update pass -----------------------------------------------------------------

    def _update_pass(self, records: list[_Record], todo: list[int], new: dict[Tensor, Tensor],
                     scales: dict[Tensor, Tensor | float]) -> None:
        """x_hat_0 = x_0; node by node: feedback and base steps, then the node's output."""
        maps, r2 = self._pass_maps(records, todo, scales)
        ctx: Context = (maps, r2, new)
        last = self._node_index[todo[-1]]
        first = self.nodes[0]
        x_hat = cast(Tensor, records[first.probe if isinstance(first, Block) else first].x)
        with self._quiet():
            for i, node in enumerate(self.nodes[:last + 1]):
                if isinstance(node, Block):
                    update = self._gr_block if self.mode == "gr" else self._fne_block
                    x_hat = update(node, records, x_hat, ctx)
                else:
                    x_hat = self._stage_update(node, records, x_hat, ctx, run=i < last)

    @staticmethod
    def _branch(prefix: Sequence[nn.Module], idx: Sequence[int], x: Tensor,
                step: Step) -> Tensor:
        for m in prefix:
            x = m(x)
        for t in idx:
            x = step(t, x)
        return x

    def _fne_block(self, block: Block, records: list[_Record], x_hat: Tensor,
                   ctx: Context) -> Tensor:
        """FNE: body layers with the skip term <g_skip, dx_r>, then the shortcut's layers with
        <g_sum, dh_m>, each on its own cascaded input (mode 'chain': without those terms)."""
        fne = self.mode == "fne"
        d_r = x_hat - cast(Tensor, records[block.probe].x)
        skip = skip_weights(records[block.probe + 1].gx, d_r) if fne else None
        h = self._branch(block.body_prefix, block.body, x_hat,
                         lambda t, x: self._stage_update(t, records, x, ctx, skip))
        out = records[block.probe + 2]
        join = skip_weights(out.gx, h - cast(Tensor, out.x)) if fne else None
        s = self._branch(block.shortcut_prefix, block.shortcut, x_hat,
                         lambda t, x: self._stage_update(t, records, x, ctx, join))
        return self._post(block, h + s)

    def _gr_block(self, block: Block, records: list[_Record], x_hat: Tensor,
                  ctx: Context) -> Tensor:
        """GR: every layer of the block from <dL/dx_r, dx_r> at block entry, then the block."""
        maps, r2, new = ctx
        layers = [t for t in block.stages if t in maps]
        if layers:
            d_r = x_hat - cast(Tensor, records[block.probe].x)
            c = ddp_math.feedback_weights(cast(Tensor, self._total_gradient(block, records)),
                                          d_r)
            if layers[0] in r2:
                c = c * r2[layers[0]]
            extras = self._group_terms(block, records, layers, d_r)
            for t, extra in zip(layers, extras):
                direction = self._layer_direction(t, records, c)
                direction = self._global_direction(direction if extra is None
                                                   else direction + extra)
                self._apply_feedback(t, records, maps[t](direction), new)
            self._write_base(block, layers, new)

        def run(t: int, x: Tensor) -> Tensor:
            return self._run_stage(t, records, x)
        h = self._branch(block.body_prefix, block.body, x_hat, run)
        return self._post(block, h + self._branch(block.shortcut_prefix, block.shortcut, x_hat,
                                                  run))

    @staticmethod
    def _post(block: Block, y: Tensor) -> Tensor:
        for m in block.post:
            y = m(y)
        return y

    def _write_base(self, block: Block, layers: list[int], new: dict[Tensor, Tensor]) -> None:
        """The base step of the block's parameters without feedback (deferred for GR)."""
        done = {id(p) for t in layers for p in self._layer_params(self.stages[t])}
        for p in block.module.parameters():
            if id(p) not in done and p in new:
                p.copy_(new[p])

    def _group_terms(self, block: Block, records: list[_Record], layers: list[int],
                     d_r: Tensor) -> list[Tensor | None]:
        """GR's eps_vxx and second-order terms of each layer, through the whole block:
        eps/B sum_i F_u^T F_x dx_r and (1/B) sum_i (V'_y . F_ux) dx_r, F the block node."""
        if not (self.eps_vxx or self.second_order):
            return [None] * len(layers)
        fn = block_function(self.stages, block, records, layers)
        params = [getattr(cast(CoveredLayer, self.stages[t].layer).module, n)
                  for t in layers for n in self.stages[t].names]
        sizes = [len(self.stages[t].names) for t in layers]
        x_r = cast(Tensor, records[block.probe].x)
        total: list[Tensor] = [torch.zeros_like(p) for p in params]
        if self.eps_vxx:
            tik = ddp_math.tikhonov_direction(fn, params, x_r, d_r)
            total = [a + (self.eps_vxx / x_r.shape[0]) * b for a, b in zip(total, tik)]
        if self.second_order:
            gy = cast(Tensor, self._grad_at_output(records, layers[0]))
            mixed = ddp_math.mixed_direction(fn, params, x_r, d_r, gy)
            total = [a + b for a, b in zip(total, mixed)]
        return list(split_by_layer(total, sizes))
