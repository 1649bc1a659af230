"""The vanishing-gradient experiment of the DDPNOpt paper (Liu, Chen, Theodorou,
"Differential Dynamic Programming Neural Optimizer", ICLR 2021, its Fig. 6): a deep sigmoid
MLP on DIGITS trained with the Max-Mahalanobis-center (MMC) loss, where the paper reports
that SGD, EKFAC and first-order DDPNOpt stay stuck and only "DDPNOpt2nd" (the dynamics'
second derivatives in Q_ux) escapes, its training loss falling from about 9 to about 7 within
2000 iterations, with per-layer update norms 5-10x larger than the others'.

The net: an ``nn.Sequential`` of ``DEPTH`` = 9 Linear layers, the first eight each followed
by a sigmoid (64 -> 32 -> ... -> 32 -> 10, width ``WIDTH`` = 32, the width of the paper's
FCNs), PyTorch's default initialisation. With that initialisation a Linear+sigmoid stage
shrinks a backpropagated gradient by about 0.14 (the sigmoid's slope is at most 1/4, the
weights' scale is 1/sqrt(3 fan_in)), so the first layer's gradient is ~1e-7 of the last's.

The loss (Pang, Du, Zhu, "Max-Mahalanobis Linear Discriminant Analysis Networks", ICML 2018;
as a training loss: Pang, Xu, Dong, Du, Chen, Zhu, "Rethinking Softmax Cross-Entropy Loss for
Adversarial Robustness", ICLR 2020): L fixed class centers mu_1..mu_L in R^d (d = the last
layer's output size, here d = L = 10), all of norm C and with pairwise inner products
-C^2/(L-1), the largest possible minimal distance between L points on that sphere
(:func:`mmc_centers`, the papers' deterministic construction); the loss of a batch is
mean_i 0.5 ||z_i - mu_{y_i}||^2 (:func:`mmc_loss`) and the prediction the nearest center.
The radius C = 3 sqrt(2) (``RADIUS``) is chosen so that the plateau is the paper's starting
loss: the centers sum to zero, so a net whose output ignores its input does best by
outputting 0 and then pays exactly 0.5 C^2 = 9. A loss below 9 therefore means the early
layers have started to separate the classes; "escaped" below means a final training loss
under 8/9 of the plateau (8; the paper's DDPNOpt2nd reaches about 7).

Columns (one learning rate shared by SGD, DDPNOpt and DDPNOpt2nd; EKFAC has its own):

============ =================================================================
column       optimizer
============ =================================================================
SGD          ``torch.optim.SGD(params, lr)`` (no momentum)
EKFAC        ``DDPNOpt(model, lr, base="ekfac", feedback=False)``
DDPNOpt      ``DDPNOpt(model, lr, base="sgd")`` (Gauss-Newton feedback)
DDPNOpt2nd   ``DDPNOpt(model, lr, base="sgd", second_order=True)``
============ =================================================================

Protocol: a learning-rate grid (``LR_GRID``; EKFAC: ``EKFAC_GRID``) on a tuning seed
(``TUNE_SEED`` = 100, not a reported seed), all four columns interleaved per grid index,
each run scored by its mean batch loss over the last fifth of the iterations. EKFAC takes its
best rate; the shared rate is the one with the lowest score of DDPNOpt2nd (the column the
claim is about gets its best rate; every column's score at every rate is in results.md,
so it is visible whether SGD or DDPNOpt would have done better elsewhere). Then every
reported seed: per seed all columns start from the same initial weights (the net is built
after ``torch.manual_seed(seed)``) and see the same batches (batch ``BATCH`` = 32, seeded
epochs of random permutations without the last partial batch), and advance interleaved (one
iteration each in turn, the order rotating every iteration), each timed on its own clock
(zero_grad, forward, loss, backward, step). Recorded per run: the batch loss of every
iteration (stored as means over windows of ``THIN`` iterations), the MMC loss on the whole
training set before and after training, the test accuracy after training (nearest center),
the per-layer update norm ||u_t^after - u_t^before||_F of each Linear layer (weight and bias
together, u_t = [W_t | b_t], the paper's control) averaged over iterations, and the median ms
per iteration. A non-finite batch loss marks the run as diverged and stops it; the others go
on.

Commands::

    OMP_NUM_THREADS=1 python experiments/ddpnopt_vanishing.py            # the full run
    OMP_NUM_THREADS=1 python experiments/ddpnopt_vanishing.py --quick --out DIR  # smoke run

Outputs under ``--out`` (default ``experiments/results/ddpnopt-vanishing``): ``summary.json``
(command line, machine, settings, the tuning scores, every seed's data), ``results.md`` (the
tables, the paper's claim beside ours, and a reading) and ``curves.png`` (training loss
against iteration, mean over seeds with a min-max band; per-layer update norms, log scale).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ocnode.data import load_dataset
from ocnode.optim import DDPNOpt
from ocnode.training.records import command_line, machine_info

COLUMNS = ["SGD", "EKFAC", "DDPNOpt", "DDPNOpt2nd"]
#: the columns that share one learning rate (EKFAC has its own grid).
SHARED = ("SGD", "DDPNOpt", "DDPNOpt2nd")
#: the column whose best tuning rate becomes the shared rate.
TUNED_BY = "DDPNOpt2nd"
#: the paper's Fig. 6, in words (it gives curves, not a table).
PAPER = {"SGD": "stuck (≈ 9)", "EKFAC": "stuck (≈ 9)", "DDPNOpt": "stuck (≈ 9)",
         "DDPNOpt2nd": "≈ 9 → ≈ 7 in 2k iterations; update norms 5-10x the others'"}
WIDTH = 32
DEPTH = 9
BATCH = 32
ITERATIONS = 2000
SEEDS = [0, 1, 2, 3, 4]
TUNE_SEED = 100
RADIUS = 3 * math.sqrt(2)
LR_GRID = [0.01, 0.03, 0.1, 0.3]
EKFAC_GRID = [0.01, 0.03, 0.1, 0.3]
#: the rates without tuning (--quick, --no-tune).
DEFAULT_LR = {"shared": 0.1, "EKFAC": 0.1}
THIN = 10
#: escaped: final training loss below this fraction of the plateau 0.5 C^2.
ESCAPE_FRACTION = 8 / 9
QUICK = {"iterations": 20, "seeds": [0], "width": 16, "batch": 16}


class Data(NamedTuple):
    """DIGITS as tensors, and the MMC centers.

    Attributes:
        x_train: (N, 64) float32. y_train: (N,) int64. x_test: (M, 64). y_test: (M,).
        centers: (L, d) float32, the MMC centers.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    centers: Tensor


# ----------------------------------------------------------------------------- the loss


def mmc_centers(n_classes: int, dim: int, radius: float,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """The Max-Mahalanobis centers: ``n_classes`` points on the sphere of radius ``radius``
    in R^dim with pairwise inner products -radius^2/(n_classes-1).

    Deterministic (Pang et al. 2018): mu_1 = e_1; center i has coordinates only in the first
    i axes, the first i-1 fixed by <mu_i, mu_j> = -1/(L-1) for j < i (each mu_j is zero past
    axis j, so coordinate j follows from the earlier ones), the i-th making the norm 1; then
    all are scaled by the radius. Computed in float64.

    Args:
        n_classes: L >= 2. dim: d >= L. radius: C > 0.

    Returns:
        (L, d), row k the center of class k.

    Raises:
        ValueError: L < 2, d < L or C <= 0.
    """
    if n_classes < 2 or dim < n_classes or not radius > 0:
        raise ValueError(f"need n_classes >= 2, dim >= n_classes and radius > 0, got "
                         f"n_classes={n_classes}, dim={dim}, radius={radius}")
    mu = torch.zeros(n_classes, dim, dtype=torch.float64)
    mu[0, 0] = 1.0
    target = -1.0 / (n_classes - 1)
    for i in range(1, n_classes):
        for j in range(i):
            mu[i, j] = (target - mu[i, :j] @ mu[j, :j]) / mu[j, j]
        mu[i, i] = math.sqrt(max(0.0, 1.0 - float(mu[i, :i] @ mu[i, :i])))
    return (radius * mu).to(dtype)


def mmc_loss(z: Tensor, y: Tensor, centers: Tensor) -> Tensor:
    """mean_i 0.5 ||z_i - mu_{y_i}||^2.

    Args:
        z: (B, d) the net's outputs. y: (B,) labels. centers: (L, d).

    Returns:
        The scalar loss (a mean over the batch, as DDPNOpt needs).
    """
    return 0.5 * (z - centers[y]).pow(2).sum(1).mean()


def predict(z: Tensor, centers: Tensor) -> Tensor:
    """The nearest center's class of each output: z (B, d), centers (L, d) -> (B,) int64."""
    return torch.cdist(z, centers).argmin(1)


def load_data(radius: float) -> Data:
    """DIGITS (``load_dataset("digits", seed=0)``: 1437 train / 360 test, standardised) and
    the centers of its 10 classes in R^10 at this radius."""
    ds = load_dataset("digits", seed=0)
    x_tr, y_tr = ds.train.tensors
    x_te, y_te = ds.test.tensors
    centers = mmc_centers(ds.n_classes, ds.n_classes, radius, torch.float32)
    return Data(x_tr, y_tr, x_te, y_te, centers)


# ----------------------------------------------------------------------------- the runs


def build_net(width: int, depth: int, n_in: int, n_out: int, seed: int) -> nn.Sequential:
    """``depth`` Linear layers n_in -> width -> ... -> width -> n_out, a sigmoid after each
    but the last, default init after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    mods: list[nn.Module] = []
    for k in range(depth):
        mods.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < depth - 1:
            mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def make_optimizer(column: str, model: nn.Sequential, lr: float) -> torch.optim.Optimizer:
    """The optimizer of a column (:data:`COLUMNS`) on ``model``."""
    if column == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if column == "EKFAC":
        return DDPNOpt(model, lr, base="ekfac", feedback=False)
    if column == "DDPNOpt":
        return DDPNOpt(model, lr, base="sgd")
    if column == "DDPNOpt2nd":
        return DDPNOpt(model, lr, base="sgd", second_order=True)
    raise ValueError(f"unknown column {column!r}; choose from {', '.join(COLUMNS)}")


def batch_plan(n: int, batch: int, iterations: int, seed: int) -> list[Tensor]:
    """The batches' row indices, ``iterations`` tensors of shape (batch,): epochs of seeded
    random permutations of range(n), the last partial batch of each epoch dropped."""
    gen = torch.Generator().manual_seed(seed)
    plan: list[Tensor] = []
    while len(plan) < iterations:
        perm = torch.randperm(n, generator=gen)
        plan += list(perm[: n - n % batch].split(batch))
    return plan[:iterations]


def controls(model: nn.Sequential) -> list[Tensor]:
    """Each Linear layer's [vec(W), b] as one detached copy, (d_out * (d_in + 1),)."""
    return [torch.cat([m.weight.detach().flatten(), m.bias.detach()]) for m in model
            if isinstance(m, nn.Linear)]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, centers: Tensor) -> tuple[float, float]:
    """(MMC loss, nearest-center accuracy) of the model on x (N, 64), y (N,)."""
    z = model(x)
    return float(mmc_loss(z, y, centers)), float((predict(z, centers) == y).float().mean())


def new_run(column: str, model: nn.Sequential, lr: float, data: Data) -> dict[str, Any]:
    """A run's state: its model, optimizer and records (initial training loss included)."""
    return {"column": column, "model": model, "opt": make_optimizer(column, model, lr),
            "lr": lr, "loss": [], "ms": [], "norm_sum": None, "diverged_at": None,
            "initial_train_loss": evaluate(model, data.x_train, data.y_train,
                                           data.centers)[0]}


def iterate(run: dict[str, Any], x: Tensor, y: Tensor, centers: Tensor, it: int) -> None:
    """One timed iteration of a run on the batch x (B, 64), y (B,); the update norms after.

    A non-finite loss marks the run diverged at iteration ``it`` (no step is taken).
    """
    model, opt = run["model"], run["opt"]
    before = controls(model)
    start = time.perf_counter()
    opt.zero_grad()
    loss = mmc_loss(model(x), y, centers)
    value = loss.item()
    if not math.isfinite(value):
        run["diverged_at"] = it
        return
    loss.backward()
    opt.step()
    run["ms"].append((time.perf_counter() - start) * 1e3)
    run["loss"].append(value)
    norms = torch.stack([(a - b).norm() for a, b in zip(controls(model), before)])
    run["norm_sum"] = norms if run["norm_sum"] is None else run["norm_sum"] + norms


def finish(run: dict[str, Any], data: Data) -> dict[str, Any]:
    """A run's record for summary.json (None for the final numbers of a diverged run)."""
    if hasattr(run["opt"], "close"):
        run["opt"].close()
    losses, diverged = run["loss"], run["diverged_at"] is not None
    train, acc = evaluate(run["model"], data.x_train, data.y_train, data.centers)
    test_acc = evaluate(run["model"], data.x_test, data.y_test, data.centers)[1]
    ok = not diverged and math.isfinite(train)
    tail = losses[-max(1, len(losses) // 5):]
    return {
        "lr": run["lr"], "diverged": not ok, "diverged_at": run["diverged_at"],
        "iterations_run": len(losses), "initial_train_loss": run["initial_train_loss"],
        "final_train_loss": train if ok else None, "train_acc": acc if ok else None,
        "test_acc": test_acc if ok else None,
        "tail_loss": statistics.fmean(tail) if ok and tail else None,
        "curve": [[k + len(losses[k:k + THIN]), statistics.fmean(losses[k:k + THIN])]
                  for k in range(0, len(losses), THIN)],
        "update_norm_mean": (run["norm_sum"] / max(1, len(losses))).tolist()
        if run["norm_sum"] is not None else None,
        "step_ms_median": statistics.median(run["ms"]) if run["ms"] else None}


def train_seed(data: Data, cfg: dict[str, Any], seed: int,
               lrs: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Every column on one seed: same initial weights and batches, interleaved, the order
    rotating; ``lrs`` maps each column to its learning rate. Returns column -> record."""
    net = build_net(cfg["width"], cfg["depth"], data.x_train.shape[1],
                    data.centers.shape[1], seed)
    runs = {c: new_run(c, copy.deepcopy(net), lrs[c], data) for c in COLUMNS}
    for it, idx in enumerate(batch_plan(len(data.y_train), cfg["batch"], cfg["iterations"],
                                        seed)):
        k = it % len(COLUMNS)
        for col in COLUMNS[k:] + COLUMNS[:k]:
            if runs[col]["diverged_at"] is None:
                iterate(runs[col], data.x_train[idx], data.y_train[idx], data.centers, it)
    return {c: finish(r, data) for c, r in runs.items()}


def column_lrs(shared: float, ekfac: float) -> dict[str, float]:
    """Column -> learning rate: ``shared`` for SGD and both DDPNOpts, ``ekfac`` for EKFAC."""
    return {c: ekfac if c == "EKFAC" else shared for c in COLUMNS}


def tune(data: Data, cfg: dict[str, Any]) -> dict[str, Any]:
    """Every grid index on :data:`TUNE_SEED`; EKFAC's best rate and the shared rate
    (:data:`TUNED_BY`'s best), by the tail batch loss (a diverged run scores +inf)."""
    scores: dict[str, dict[str, float | None]] = {c: {} for c in COLUMNS}
    for shared, ekfac in zip(LR_GRID, EKFAC_GRID):
        res = train_seed(data, cfg, TUNE_SEED, column_lrs(shared, ekfac))
        for c, r in res.items():
            scores[c][f"{r['lr']:g}"] = r["tail_loss"]
        print(f"[tune] lr {shared:g} / EKFAC {ekfac:g}: " + ", ".join(
            f"{c} {_fmt(r['tail_loss'])}" for c, r in res.items()), flush=True)

    def best(col: str) -> float:
        return float(min(scores[col], key=lambda k: math.inf if scores[col][k] is None
                         else scores[col][k]))

    return {"shared": best(TUNED_BY), "EKFAC": best("EKFAC"), "tail_loss": scores}


# ----------------------------------------------------------------------------- aggregates


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def aggregate(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per column: final/initial training loss and test accuracy over the seeds that did not
    diverge, the number diverged, median ms, and the per-layer update norms (mean over
    seeds, each the mean over its iterations; (n_layers,))."""
    out = {}
    for col in COLUMNS:
        recs = [s[col] for s in per_seed.values()]
        fine = [r for r in recs if not r["diverged"]]
        norms = [r["update_norm_mean"] for r in recs if r["update_norm_mean"] is not None]
        ms = [r["step_ms_median"] for r in recs if r["step_ms_median"] is not None]
        out[col] = {
            "final_train_loss": _stats([r["final_train_loss"] for r in fine]),
            "initial_train_loss": _stats([r["initial_train_loss"] for r in recs]),
            "test_acc": _stats([r["test_acc"] for r in fine]),
            "n_seeds": len(recs), "n_diverged": len(recs) - len(fine),
            "final_losses": [r["final_train_loss"] for r in fine],
            "step_ms_median": statistics.median(ms) if ms else None,
            "update_norm": [statistics.fmean(v) for v in zip(*norms)] if norms else None}
    return out


def verdict(results: dict[str, dict[str, Any]], plateau: float) -> dict[str, Any]:
    """The claim's parts, measured: which columns escaped (final training loss below
    :data:`ESCAPE_FRACTION` of the plateau on a majority of seeds), and DDPNOpt2nd's
    per-layer update norms over each other column's (min, geometric mean, max over layers)."""
    bar = ESCAPE_FRACTION * plateau
    escaped = {c: sum(v < bar for v in r["final_losses"]) for c, r in results.items()}
    ratios: dict[str, dict[str, float]] = {}
    mine = results["DDPNOpt2nd"]["update_norm"]
    for c in COLUMNS[:-1]:
        other = results[c]["update_norm"]
        if mine is None or other is None:
            continue
        per_layer = [a / b for a, b in zip(mine, other) if b > 0]
        ratios[c] = {"min": min(per_layer), "max": max(per_layer),
                     "geomean": math.exp(statistics.fmean(math.log(v) for v in per_layer))}
    majority = {c: escaped[c] > results[c]["n_seeds"] / 2 for c in COLUMNS}
    reproduced = (majority["DDPNOpt2nd"] and not any(majority[c] for c in COLUMNS[:-1])
                  and len(ratios) == 3 and all(r["geomean"] >= 5 for r in ratios.values()))
    return {"escape_below": bar, "seeds_escaped": escaped, "escaped_majority": majority,
            "norm_ratio_2nd_over": ratios, "reproduced": reproduced}


# ----------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _pm(s: dict[str, float | None], scale: float = 1.0, spec: str = ".3f") -> str:
    if s["mean"] is None:
        return "–"
    return f"{format(scale * s['mean'], spec)} ± {format(scale * s['sd'], spec)}"


def _header(cols: list[str], first: str) -> list[str]:
    return [f"| {first} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]


def reading(summary: dict[str, Any]) -> str:
    """The plain-words verdict paragraph of results.md, from the numbers."""
    v, res = summary["verdict"], summary["results"]
    n = len(summary["settings"]["seeds"])
    esc = ", ".join(f"{c} {v['seeds_escaped'][c]}/{n}" for c in COLUMNS)
    ratio = "; ".join(f"vs {c} {r['geomean']:.2f}x (per layer {r['min']:.2f}-{r['max']:.2f}x)"
                      for c, r in v["norm_ratio_2nd_over"].items())
    drop = {c: res[c]["final_train_loss"]["mean"] for c in COLUMNS}
    lead = ("**The claim reproduces.**" if v["reproduced"] else
            "**The claim does not reproduce.**")
    if summary["quick"]:
        lead = "(A --quick smoke run: not a result.) " + lead
    return (f"{lead} Seeds whose final training loss fell below {v['escape_below']:.2f} "
            f"(8/9 of the plateau {summary['plateau']:.2f}): {esc}. Final training loss "
            "(mean): " + ", ".join(f"{c} {_fmt(drop[c])}" for c in COLUMNS)
            + f". DDPNOpt2nd's update norms over the others' (geometric mean over layers): "
            f"{ratio or '–'}; the paper reports 5-10x.")


def markdown(summary: dict[str, Any]) -> str:
    """results.md: settings, the main table with the paper's claim, cost, update norms,
    tuning scores and the reading."""
    res, st, m = summary["results"], summary["settings"], summary["machine"]
    lines = ["# DDPNOpt paper, Fig. 6: vanishing gradients in a deep sigmoid MLP (MMC loss)",
             "", f"Command: `{summary['command']}`  ",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, "
             f"{summary['threads']} thread(s); wall time {summary['wall_s']:.0f} s.", "",
             f"Net: {st['depth']} Linear layers (width {st['width']}, sigmoid after all but "
             f"the last, default init), DIGITS, MMC loss with C = {st['radius']:.4f} "
             f"(plateau 0.5 C² = {summary['plateau']:.2f}), batch {st['batch']}, "
             f"{st['iterations']} iterations, seeds {st['seeds']}. Learning rates: shared "
             f"(SGD, DDPNOpt, DDPNOpt2nd) {summary['lr']['shared']:g}, EKFAC "
             f"{summary['lr']['EKFAC']:g} ({summary['lr_source']}).", "",
             "Training loss on the whole training set (mean ± sd over the seeds that did not "
             "diverge), test accuracy (%, nearest center):", ""]
    lines += _header(COLUMNS, "")
    rows = [("initial training loss", lambda r: _pm(r["initial_train_loss"])),
            ("final training loss", lambda r: _pm(r["final_train_loss"])),
            ("final training loss, min-max", lambda r: "–" if r["final_train_loss"]["min"]
             is None else f"{r['final_train_loss']['min']:.3f}-"
             f"{r['final_train_loss']['max']:.3f}"),
            ("test accuracy (%)", lambda r: _pm(r["test_acc"], 100, ".1f")),
            ("diverged", lambda r: f"{r['n_diverged']}/{r['n_seeds']}"),
            ("paper (Fig. 6)", None)]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(PAPER[c] if cell is None else cell(res[c])
                                                 for c in COLUMNS) + " |")
    sgd_ms = res["SGD"]["step_ms_median"]
    lines += ["", "Median ms per iteration (median over seeds) and its ratio to SGD:", ""]
    lines += _header(COLUMNS, "")
    lines.append("| ms/iteration | " + " | ".join(
        "–" if res[c]["step_ms_median"] is None else f"{res[c]['step_ms_median']:.2f}"
        + (f" ({res[c]['step_ms_median'] / sgd_ms:.1f}x)" if sgd_ms else "")
        for c in COLUMNS) + " |")
    lines += ["", "Per-layer update norm ||Δu_t||_F (u_t = [W_t | b_t]), mean over "
              "iterations and seeds (layer 1 = the input layer):", ""]
    lines += _header(COLUMNS + ["DDPNOpt2nd / SGD"], "layer")
    norms = {c: res[c]["update_norm"] for c in COLUMNS}
    for k in range(st["depth"]):
        cells = [_fmt(norms[c][k] if norms[c] else None, ".2e") for c in COLUMNS]
        ok = norms["SGD"] and norms["DDPNOpt2nd"] and norms["SGD"][k] > 0
        cells.append(f"{norms['DDPNOpt2nd'][k] / norms['SGD'][k]:.2f}" if ok else "–")
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    lines += tuning_table(summary)
    lines += ["", "Reading: " + reading(summary)]
    return "\n".join(lines) + "\n"


def tuning_table(summary: dict[str, Any]) -> list[str]:
    """The tuning scores (mean batch loss over the last fifth, seed TUNE_SEED) as lines."""
    tuning = summary.get("tuning")
    if not tuning:
        return ["", "No tuning (rates fixed on the command line or by --quick/--no-tune)."]
    lines = ["", f"Tuning (seed {TUNE_SEED}, mean batch loss over the last fifth of the run; "
             "– = diverged; the shared rate is DDPNOpt2nd's best):", ""]
    lines += _header(COLUMNS, "rate (EKFAC's)")
    for shared, ekfac in zip(LR_GRID, EKFAC_GRID):
        lines.append(f"| {shared:g} ({ekfac:g}) | " + " | ".join(
            _fmt(tuning["tail_loss"][c].get(f"{ekfac if c == 'EKFAC' else shared:g}"))
            for c in COLUMNS) + " |")
    return lines


def _band(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float],
                                                    list[float]]:
    """x, mean, min, max over the curves that reach each point (diverged ones stop early)."""
    longest = max(curves, key=len)
    xs, mean, lo, hi = [], [], [], []
    for k, (x, _) in enumerate(longest):
        vals = [c[k][1] for c in curves if len(c) > k]
        xs.append(x)
        mean.append(statistics.fmean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def plot(summary: dict[str, Any], path: Path) -> None:
    """curves.png: training loss against iteration; per-layer update norms (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for col in COLUMNS:
        curves = [s[col]["curve"] for s in summary["seeds"].values() if s[col]["curve"]]
        if curves:
            xs, mean, lo, hi = _band(curves)
            (line,) = ax1.plot(xs, mean, label=col, lw=1.3)
            ax1.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        norms = summary["results"][col]["update_norm"]
        if norms:
            ax2.semilogy(range(1, len(norms) + 1), norms, marker="o", label=col)
    ax1.axhline(summary["plateau"], color="k", ls=":", lw=1, label="plateau 0.5 C²")
    ax1.set(xlabel="iteration", ylabel=f"training loss (batch mean over {THIN} its)",
            title=f"MMC loss, mean over {len(summary['seeds'])} seed(s), min-max band")
    ax2.set(xlabel="layer (1 = input)", ylabel="mean ||Δu_t||_F",
            title="per-layer update norm")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary: dict[str, Any], out: Path) -> None:
    """summary.json, results.md and curves.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "curves.png")


# ----------------------------------------------------------------------------- main


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings from the defaults, --quick and the flags."""
    cfg: dict[str, Any] = {"width": WIDTH, "depth": DEPTH, "batch": BATCH,
                           "iterations": ITERATIONS, "seeds": list(SEEDS)}
    if args.quick:
        cfg.update(QUICK)
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",") if s]
    for key in ("iterations", "width", "depth", "batch"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(radius=args.radius, tune_seed=TUNE_SEED, grid=LR_GRID, ekfac_grid=EKFAC_GRID,
               thin=THIN)
    return cfg


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one seed, 20 iterations, width 16, no tuning")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0-4)")
    p.add_argument("--iterations", type=int, default=None, help=f"default {ITERATIONS}")
    p.add_argument("--width", type=int, default=None, help=f"default {WIDTH}")
    p.add_argument("--depth", type=int, default=None,
                   help=f"Linear layers (default {DEPTH})")
    p.add_argument("--batch", type=int, default=None, help=f"default {BATCH}")
    p.add_argument("--radius", type=float, default=RADIUS,
                   help="MMC radius C (default 3 sqrt 2: plateau 0.5 C^2 = 9)")
    p.add_argument("--no-tune", action="store_true",
                   help=f"skip the grid; rates {DEFAULT_LR['shared']:g} (EKFAC "
                        f"{DEFAULT_LR['EKFAC']:g})")
    p.add_argument("--out", default="experiments/results/ddpnopt-vanishing")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = settings(args)
    data = load_data(cfg["radius"])
    summary: dict[str, Any] = {"command": command_line(), "machine": machine_info(),
                               "threads": args.threads, "quick": args.quick,
                               "columns": COLUMNS, "settings": cfg,
                               "plateau": 0.5 * cfg["radius"] ** 2,
                               "centers": data.centers.tolist()}
    if args.quick or args.no_tune:
        lrs, tuning = dict(DEFAULT_LR), None
    else:
        tuning = tune(data, cfg)
        lrs = {"shared": tuning["shared"], "EKFAC": tuning["EKFAC"]}
    summary.update(lr=lrs, tuning=tuning, lr_source="fixed" if tuning is None else
                   f"grid on seed {TUNE_SEED}")
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in cfg["seeds"]:
        per_seed[seed] = train_seed(data, cfg, seed, column_lrs(lrs["shared"], lrs["EKFAC"]))
        print(f"[seed {seed}] final training loss: " + ", ".join(
            f"{c} {_fmt(r['final_train_loss'])}" for c, r in per_seed[seed].items()),
            flush=True)
    results = aggregate(per_seed)
    summary.update(seeds={str(s): r for s, r in per_seed.items()}, results=results,
                   verdict=verdict(results, summary["plateau"]),
                   wall_s=time.perf_counter() - start)
    write(summary, Path(args.out))
    print(markdown(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
