"""DDPNOpt's robustness over its base optimizer's hyperparameters (the DDPNOpt paper's Fig. 4:
Liu, Chen, Theodorou, "Differential Dynamic Programming Neural Optimizer", ICLR 2021).

What: on a grid of the base optimizer's hyperparameters, the test-accuracy difference between
DDPNOpt (feedback on) and the same optimizer with ``feedback=False``, which is exactly the
base. Two bases: ``sgd`` over learning rate x momentum and
``rmsprop`` over learning rate x weight decay (both options act on the base step only; the
feedback gets neither: see docs/ddpnopt.md).

Why: the paper reports that DDPNOpt's gain over its base holds at most settings and grows with
the learning rate. Our Table 3 rows (``experiments/ddpnopt_table.py``) found the opposite at
tuned rates: the feedback destabilised the base's larger rates, so the tuning picked smaller
ones and DDPNOpt lost to its base. This script maps the difference over the whole grid, with
no tuning.

Protocol: the setup of the Table 3 rows (imported from ``ddpnopt_table``): the paper's FCN
(5 Linear layers with tanh, width 32) built by the training core, DIGITS (batch 32, 1500
iterations) and MNIST-5k (batch 64, 2000 iterations). Per cell and seed, both optimizers go
through :func:`ocnode.training.build_optimizer` (``"ddpnopt"``), start from the same initial
weights (:func:`ocnode.training.compare.build_model`), see the same batches
(``task.batches(seed)``) and advance interleaved, one :func:`ocnode.training.train_step` each
in turn, the order rotating. A run whose training loss becomes non-finite is stopped there
(diverged) and scored at the test accuracy of its weights at that point (chance, 1/classes,
if the weights are not finite). Cell value: the mean over seeds of (DDPNOpt's test accuracy -
the base's), in percentage points, after the last iteration; a win (loss) is a mean
difference above (below) the sample sd over seeds of the per-seed differences, else a tie.
The report marks, per cell and arm, the seeds on which a run blew up: diverged as above, or
collapsed (a finite loss, but its mean over the last fifth of the run at or above ln(classes),
the cross-entropy of a uniform guess).

Commands (DIGITS alone: 19 minutes on 2 shared cores, one thread; the default, DIGITS and
MNIST-5k, about three times that)::

    OMP_NUM_THREADS=1 python experiments/ddpnopt_robustness.py --datasets digits --threads 1
    OMP_NUM_THREADS=1 python experiments/ddpnopt_robustness.py --threads 1
    OMP_NUM_THREADS=1 python experiments/ddpnopt_robustness.py --quick --out <dir>  # smoke
    python experiments/ddpnopt_robustness.py --report-from <dir> --out <dir>  # report only

Outputs under ``--out`` (default ``experiments/results/ddpnopt-robustness``):
``summary.json`` (command line, machine, settings, every run), ``results.md`` (per dataset and
base: the difference, the base's and DDPNOpt's accuracy, win/tie/loss counts, a reading) and
``heatmap.png`` (the difference per cell, one panel per dataset and base).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ddpnopt_table import DATASETS, WIDTH, make

from ocnode.training import build_optimizer, train_step
from ocnode.training.compare import build_model
from ocnode.training.records import command_line, machine_info
from ocnode.training.tasks import Task

#: base -> the second hyperparameter of its grid, the learning rates (rows), and that
#: hyperparameter's values (columns).
GRIDS: dict[str, dict[str, Any]] = {
    "sgd": {"key": "momentum", "lrs": [0.01, 0.03, 0.1, 0.3, 1.0], "values": [0.0, 0.5, 0.9]},
    "rmsprop": {"key": "weight_decay", "lrs": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                "values": [0.0, 1e-4, 1e-3]},
}
#: the two runs of a cell: the label and the ``feedback`` flag.
ARMS = {"DDPNOpt": True, "base": False}
DEFAULT_DATASETS = ["digits", "mnist5k"]
SEEDS = [0, 1, 2]
#: the quick run: one seed, a dozen iterations, a 2 x 2 corner of each grid.
QUICK = {"iterations": 12, "eval_every": 4, "seeds": [0], "lrs": slice(2, 4),
         "values": slice(0, 2)}


# ----------------------------------------------------------------------------- training

def evaluate(task: Task, model: torch.nn.Module) -> float:
    """Test accuracy of ``model``; chance (1/classes) if its weights are not finite."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return 1.0 / task.dataset.n_classes
    model.eval()
    with torch.no_grad():
        acc = float(task.evaluate(model)["test_acc"])
    model.train()
    return acc if math.isfinite(acc) else 1.0 / task.dataset.n_classes


def new_run(task: Task, seed: int, hp: dict[str, Any]) -> dict[str, Any]:
    """A fresh run: the seed's initial weights, a ``ddpnopt`` optimizer with ``hp``, the seed's
    batches, and the accuracy at iteration 0."""
    model = build_model(task, "ddpnopt", seed)  # torch.manual_seed(seed), then the model
    return {"model": model, "opt": build_optimizer("ddpnopt", model, hp),
            "batches": task.batches(seed), "loss": [], "ms": [], "diverged_at": None,
            "curve": [(0, evaluate(task, model))]}


def advance(task: Task, run: dict[str, Any], it: int, iterations: int,
            eval_every: int) -> None:
    """Iteration ``it`` of a run that has not diverged; a non-finite loss stops it there
    (the model and optimizer are untouched by that iteration) and scores it."""
    batch = next(run["batches"])
    start = time.perf_counter()
    try:
        loss = train_step(run["model"], run["opt"], task.loss, batch)
    except FloatingPointError:
        run["diverged_at"] = it
        run["curve"].append((it, evaluate(task, run["model"])))
        return
    run["ms"].append((time.perf_counter() - start) * 1e3)
    run["loss"].append(loss)
    if (it + 1) % eval_every == 0 or it + 1 == iterations:
        run["curve"].append((it + 1, evaluate(task, run["model"])))


def finish(run: dict[str, Any], iterations: int) -> dict[str, Any]:
    """The run's record: final test accuracy, mean training loss over the last fifth of its
    iterations (None if it ran none), divergence, median ms per iteration, curve."""
    if hasattr(run["opt"], "close"):
        run["opt"].close()
    tail = run["loss"][-max(1, iterations // 5):]
    return {"test_acc": run["curve"][-1][1],
            "tail_loss": statistics.fmean(tail) if tail else None,
            "diverged": run["diverged_at"] is not None, "diverged_at": run["diverged_at"],
            "iterations_run": len(run["loss"]),
            "step_ms_median": statistics.median(run["ms"]) if run["ms"] else None,
            "curve": run["curve"]}


def train_pair(task: Task, seed: int, hp: dict[str, Any], iterations: int,
               eval_every: int) -> dict[str, dict[str, Any]]:
    """DDPNOpt and its base (``feedback=False``) with hyperparameters ``hp`` on one seed:
    the same weights and batches, interleaved, the order rotating every iteration."""
    runs = {arm: new_run(task, seed, {**hp, "feedback": fb}) for arm, fb in ARMS.items()}
    order = list(runs)
    for it in range(iterations):
        k = it % len(order)
        for arm in order[k:] + order[:k]:
            if runs[arm]["diverged_at"] is None:
                advance(task, runs[arm], it, iterations, eval_every)
        if all(r["diverged_at"] is not None for r in runs.values()):
            break
    return {arm: finish(r, iterations) for arm, r in runs.items()}


# ----------------------------------------------------------------------------- cells

def verdict(mean: float, sd: float) -> str:
    """"win" (mean difference above the seed sd), "lose" (below minus it) or "tie"."""
    if mean > sd:
        return "win"
    if mean < -sd:
        return "lose"
    return "tie"


def summarise_cell(lr: float, key: str, value: float,
                   per_seed: list[dict[str, dict[str, Any]]], seeds: list[int]
                   ) -> dict[str, Any]:
    """One cell's entry: the paired difference in points (mean, sd over seeds, verdict), each
    arm's accuracies, tail losses and divergence, and every run."""
    diffs = [100 * (r["DDPNOpt"]["test_acc"] - r["base"]["test_acc"]) for r in per_seed]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    arms = {arm: {"test_acc": [r[arm]["test_acc"] for r in per_seed],
                  "acc_mean": statistics.fmean(r[arm]["test_acc"] for r in per_seed),
                  "tail_loss": [r[arm]["tail_loss"] for r in per_seed],
                  "diverged": sum(r[arm]["diverged"] for r in per_seed)}
            for arm in ARMS}
    return {"lr": lr, key: value, "diff_pp": mean, "diff_sd_pp": sd, "diffs_pp": diffs,
            "verdict": verdict(mean, sd), **arms,
            "runs": [{"seed": s, **r} for s, r in zip(seeds, per_seed)]}


def run_block(task: Task, base: str, grid: dict[str, Any], seeds: list[int], iterations: int,
              eval_every: int, label: str) -> dict[str, Any]:
    """Every cell of one base's grid on one dataset; its summary entry."""
    key, t0 = grid["key"], time.perf_counter()
    cells: dict[str, dict[str, Any]] = {}
    for lr in grid["lrs"]:
        cells[f"{lr:g}"] = {}
        for value in grid["values"]:
            hp = {"base": base, "lr": lr, key: value}
            per_seed = [train_pair(task, s, hp, iterations, eval_every) for s in seeds]
            cell = summarise_cell(lr, key, value, per_seed, seeds)
            cells[f"{lr:g}"][f"{value:g}"] = cell
            print(f"[{label} {base}] lr {lr:g} {key} {value:g}: diff {cell['diff_pp']:+.2f} "
                  f"± {cell['diff_sd_pp']:.2f} (base {100 * cell['base']['acc_mean']:.1f}, "
                  f"DDPNOpt {100 * cell['DDPNOpt']['acc_mean']:.1f}; diverged "
                  f"{cell['DDPNOpt']['diverged']}/{cell['base']['diverged']}) "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return {"key": key, "lrs": grid["lrs"], "values": grid["values"], "cells": cells,
            "counts": counts(cells), "trend": trend(cells, grid["lrs"]),
            "wall_s": time.perf_counter() - t0}


def counts(cells: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many cells DDPNOpt wins, ties and loses."""
    out = {"win": 0, "tie": 0, "lose": 0}
    for row in cells.values():
        for cell in row.values():
            out[cell["verdict"]] += 1
    return out


def _ranks(xs: list[float]) -> list[float]:
    """Ranks 1..n, ties given their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (None if either side is constant or too short)."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return statistics.correlation(rx, ry)


def trend(cells: dict[str, dict[str, Any]], lrs: list[float]) -> dict[str, Any]:
    """The difference averaged over each learning rate's row, and its rank correlation with
    the learning rate (positive: the gain grows with the rate)."""
    rows = [statistics.fmean(c["diff_pp"] for c in cells[f"{lr:g}"].values()) for lr in lrs]
    return {"row_mean_pp": rows, "spearman_lr": spearman(list(lrs), rows)}


# ----------------------------------------------------------------------------- report

def blew_up(run: dict[str, Any], n_classes: int) -> bool:
    """A run that diverged (non-finite loss) or collapsed: a finite mean training loss over
    its last fifth at or above ln(classes), the cross-entropy of a uniform guess."""
    return run["diverged"] or (run["tail_loss"] is not None
                               and run["tail_loss"] >= math.log(n_classes))


def blown(cell: dict[str, Any], arm: str, n_classes: int) -> int:
    """On how many seeds the cell's ``arm`` blew up (see :func:`blew_up`)."""
    return sum(blew_up(r[arm], n_classes) for r in cell["runs"])


def _marks(cell: dict[str, Any], n_classes: int) -> str:
    """``*k``: DDPNOpt blew up on k seeds; ``†k``: the base did."""
    k, j = blown(cell, "DDPNOpt", n_classes), blown(cell, "base", n_classes)
    return (f" *{k}" if k else "") + (f" †{j}" if j else "")


def _table(block: dict[str, Any], fmt: Any) -> list[str]:
    """A markdown table of the block: rows = learning rate, columns = the second key."""
    key = block["key"]
    lines = [f"| lr \\ {key} | " + " | ".join(f"{v:g}" for v in block["values"]) + " |",
             "|---|" + "---|" * len(block["values"])]
    for lr in block["lrs"]:
        row = block["cells"][f"{lr:g}"]
        lines.append(f"| {lr:g} | " + " | ".join(fmt(row[f"{v:g}"]) for v in block["values"])
                     + " |")
    return lines


def reading(block: dict[str, Any], n_classes: int) -> str:
    """A plain statement of what the block says about the paper's two claims."""
    c, n = block["counts"], sum(block["counts"].values())
    rho = block["trend"]["spearman_lr"]
    rows = block["trend"]["row_mean_pp"]
    most = c["win"] > n / 2
    text = (f"DDPNOpt wins {c['win']} of {n} cells, ties {c['tie']}, loses {c['lose']}: the "
            f"claim that its gain holds at most settings **{'holds' if most else 'does not hold'}"
            "** here. ")
    if rho is None:
        text += ("No trend with the learning rate can be read (fewer than three rates, or "
                 "constant row means). ")
    else:
        grows = rho > 0 and rows[-1] > rows[0]
        text += (f"Averaged over each row, the difference goes from {rows[0]:+.2f} points at the "
                 f"smallest rate to {rows[-1]:+.2f} at the largest (Spearman {rho:+.2f} with the "
                 f"rate): the gain **{'grows' if grows else 'does not grow'} with the learning "
                 "rate**. ")
    cells = [cell for row in block["cells"].values() for cell in row.values()]
    only = [cell for cell in cells if blown(cell, "DDPNOpt", n_classes)
            and not blown(cell, "base", n_classes)]
    if only:
        text += (f"DDPNOpt blew up where its base did not in {len(only)} cell(s), from lr "
                 f"{min(cell['lr'] for cell in only):g} up. ")
    calm = [cell for cell in cells
            if not blown(cell, "DDPNOpt", n_classes) and not blown(cell, "base", n_classes)]
    if calm:
        v = [cell["verdict"] for cell in calm]
        text += (f"In the {len(calm)} cell(s) where no run blew up: {v.count('win')} win(s), "
                 f"{v.count('tie')} tie(s), {v.count('lose')} loss(es), mean difference "
                 f"{statistics.fmean(cell['diff_pp'] for cell in calm):+.2f} points.")
    return text.rstrip()


def section(name: str, d: dict[str, Any], base: str, block: dict[str, Any]) -> list[str]:
    """The results.md lines of one dataset and base: three tables, the counts, a reading."""
    nc = d["n_classes"]

    def acc(arm: str, mark: str) -> Any:
        """A cell formatter: the arm's mean accuracy (%), marked where it blew up."""
        def fmt(c: dict[str, Any]) -> str:
            k = blown(c, arm, nc)
            return f"{100 * c[arm]['acc_mean']:.2f}" + (f" {mark}{k}" if k else "")
        return fmt

    n = sum(block["counts"].values())
    return (["", f"## {name}, base {base} ({d['iterations']} iterations, batch {d['batch']}, "
             f"seeds {', '.join(map(str, d['seeds']))})", "", "DDPNOpt − base (points):", ""]
            + _table(block, lambda c: f"{c['diff_pp']:+.2f} ± {c['diff_sd_pp']:.2f}"
                     + _marks(c, nc))
            + ["", "The base's own test accuracy (%, mean over seeds):", ""]
            + _table(block, acc("base", "†"))
            + ["", "DDPNOpt's test accuracy (%, mean over seeds):", ""]
            + _table(block, acc("DDPNOpt", "*"))
            + ["", "Cells: " + ", ".join(f"{k} {v}/{n} ({100 * v / n:.0f} %)"
                                        for k, v in block["counts"].items()) + ".", "",
               "Reading: " + reading(block, nc)])


def markdown(summary: dict[str, Any]) -> str:
    """results.md: per dataset and base the difference, both accuracies, counts, reading."""
    m = summary["machine"]
    lines = ["# DDPNOpt vs its base over the hyperparameter grid (the paper's Fig. 4)", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, "
             f"{summary['threads']} thread(s); wall time {summary['wall_s']:.0f} s.", "",
             "Cell: test accuracy of DDPNOpt minus that of its base (the same optimizer with "
             "`feedback=False`), in points, mean ± sd over seeds of the paired differences; "
             "same weights and batches, interleaved. Win / loss: the mean difference beyond ± "
             "its sd. `*k`: DDPNOpt blew up on k seeds, `†k`: the base did. Blew up: diverged "
             "(non-finite training loss; the run stops there and is scored at its weights' test "
             "accuracy then, chance if they are not finite) or collapsed (finite, but the mean "
             "training loss over the last fifth of the run at or above ln(classes), a uniform "
             "guess's)."]
    for name, d in summary["datasets"].items():
        for base, block in d["bases"].items():
            lines += section(name, d, base, block)
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """heatmap.png: one panel per dataset x base, RdBu centred at 0 (blue: DDPNOpt better),
    each cell annotated with its difference; hatched: some run of the cell blew up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    panels = [(name, base, block) for name, d in summary["datasets"].items()
              for base, block in d["bases"].items()]
    cols = len({base for _, base, _ in panels})
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, base, block) in zip(axes.flat, panels):
        nc = summary["datasets"][name]["n_classes"]
        grid = [[block["cells"][f"{lr:g}"][f"{v:g}"] for v in block["values"]]
                for lr in block["lrs"]]
        z = [[c["diff_pp"] for c in row] for row in grid]
        lim = max(1.0, max(abs(x) for row in z for x in row))
        im = ax.imshow(z, cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto",
                       origin="lower")
        for i, row in enumerate(grid):
            for j, c in enumerate(row):
                marks = _marks(c, nc).strip()
                if marks:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                               hatch="//", edgecolor="0.5", lw=0))
                ax.text(j, i, f"{c['diff_pp']:+.1f}" + (f"\n{marks}" if marks else ""),
                        ha="center", va="center",
                        fontsize=8, color="white" if abs(c["diff_pp"]) > 0.6 * lim else "black")
        ax.set_xticks(range(len(block["values"])), [f"{v:g}" for v in block["values"]])
        ax.set_yticks(range(len(block["lrs"])), [f"{lr:g}" for lr in block["lrs"]])
        ax.set(xlabel=block["key"], ylabel="learning rate", title=f"{name}, base {base}")
        fig.colorbar(im, ax=ax, label="DDPNOpt − base (points)")
    fig.suptitle("DDPNOpt − base, test accuracy (points, mean over seeds; hatched: *k "
                 "DDPNOpt / †k base blew up on k seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary: dict[str, Any], out: Path, start: float) -> None:
    """summary.json, results.md and heatmap.png of the blocks done so far."""
    summary.update(wall_s=time.perf_counter() - start, command=command_line(),
                   machine=machine_info())
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str,
                                                 allow_nan=False))
    write_report(summary, out)


def write_report(summary: dict[str, Any], out: Path) -> None:
    """results.md and heatmap.png from a summary (no training)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "heatmap.png")


def grids(quick: bool) -> dict[str, dict[str, Any]]:
    """:data:`GRIDS`, or their 2 x 2 corner for the quick run."""
    if not quick:
        return GRIDS
    return {b: {**g, "lrs": g["lrs"][QUICK["lrs"]], "values": g["values"][QUICK["values"]]}
            for b, g in GRIDS.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run every dataset and base, write the outputs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one seed, a 2x2 grid, 12 iterations")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help="comma-separated rows of ddpnopt_table.py (FCN rows only; default "
                        + ",".join(DEFAULT_DATASETS) + ")")
    p.add_argument("--bases", default=",".join(GRIDS), help="comma-separated subset of "
                   + ",".join(GRIDS))
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per run")
    p.add_argument("--out", default="experiments/results/ddpnopt-robustness")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-from", default=None, metavar="DIR",
                   help="no training: rewrite results.md and heatmap.png in --out from "
                        "DIR/summary.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_from:
        summary = json.loads((Path(args.report_from) / "summary.json").read_text())
        write_report(summary, Path(args.out))
        return summary
    names = [n for n in args.datasets.split(",") if n]
    bases = [b for b in args.bases.split(",") if b]
    bad = [n for n in names if DATASETS.get(n, {}).get("model", "fcn") != "fcn"
           or n not in DATASETS] + [b for b in bases if b not in GRIDS]
    if bad:
        raise SystemExit(f"unknown or non-FCN dataset(s)/base(s) {bad}")
    seeds = (QUICK["seeds"] if args.quick else SEEDS) if args.seeds is None else [
        int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    summary: dict[str, Any] = {"width": WIDTH, "threads": args.threads, "quick": args.quick,
                               "seeds": seeds, "grids": grids(args.quick), "datasets": {}}
    for name in names:
        cfg = {**DATASETS[name], **({k: QUICK[k] for k in ("iterations", "eval_every")}
                                   if args.quick else {})}
        iterations = args.iterations or cfg["iterations"]
        task = make(name, cfg["batch"])
        d = summary["datasets"][name] = {
            "iterations": iterations, "batch": cfg["batch"], "eval_every": cfg["eval_every"],
            "seeds": seeds, "n_train": task.dataset.n_train, "n_test": task.dataset.n_test,
            "n_classes": task.dataset.n_classes, "bases": {}}
        for base in bases:
            d["bases"][base] = run_block(task, base, summary["grids"][base], seeds, iterations,
                                         cfg["eval_every"], name)
            write(summary, Path(args.out), start)  # after each block: a long run keeps it
    print(markdown(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
