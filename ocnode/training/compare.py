"""The optimizer comparison harness (``ocnode compare``, and the experiment scripts).

:func:`run` trains one :class:`ocnode.training.tasks.Task` with several registered optimizers
over several seeds. Within a seed every optimizer starts from the same initial weights, and
the runs advance interleaved, one iteration each in turn (the order rotates every turn),
each on its own clock: evaluation and bookkeeping are outside the clock, so bursts of
machine load hit every optimizer alike. A run stops at its wall-clock budget, at
``--max-steps``, when its loss stops being finite, or when its solver fails (a blown-up
model ends that run, not the comparison). Iterations are :func:`ocnode.training.step.train_step`,
the same as ``ocnode train``'s.

Hyperparameters: the registry's defaults (:mod:`ocnode.training.optimizers`), then
:data:`COMPARE_HPARAMS` (SNOpt and K-FAC also precondition the layers outside the ODE
blocks; they refresh at the registry's period, every 20 iterations, unless the task tunes
it), then the task's tuned values, then ``--hparams``.

Outputs under ``<out>/<task.label>/``: ``runs/<optimizer>_seed<k>.csv`` (one row per
evaluation: ``step, time_s, train_loss, step_ms, nfe_forward, nfe_backward`` and the task's
evaluation columns), ``summary.json``, ``results.md`` and ``curves.png`` (training loss, the
task's metric and the forward NFE per iteration against each run's own wall-clock), and the
task's picture of the first seed's models where it has one.

Peak memory is measured apart from the timed runs (:mod:`ocnode.training.memory`): for each
optimizer a forked child builds a fresh model, runs one warm-up iteration and measures two
more (including a curvature refresh for SNOpt and K-FAC).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ocnode.training.memory import peak_rss_growth
from ocnode.training.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    check_fits,
    compatible,
    resolve_hparams,
)
from ocnode.training.plots import COLORS
from ocnode.training.records import command_line, machine_info
from ocnode.training.step import NFECounter, train_step
from ocnode.training.tasks import Task
from solvers import SolverError

OPTIMIZER_NAMES = tuple(OPTIMIZERS)
#: The harness's choices over the registry defaults (the task's and --hparams come after).
#: (Runs before 2026-12-03 refreshed every 50 iterations here; with the stage curvature a
#: refresh costs about one Adam iteration, and 20 learned faster early at the same final
#: accuracy: BENCHMARKS.md section 3.1.)
COMPARE_HPARAMS: dict[str, dict[str, Any]] = {
    "snopt": {"full": True},
    "kfac": {"full": True},
}


def add_arguments(parser: argparse.ArgumentParser, budget: float = 40.0,
                  quick_budget: float = 2.0, eval_every: int = 20,
                  quick_eval_every: int = 3) -> None:
    """Add the harness flags; the arguments are the script's defaults."""
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one seed, a tiny budget (numbers not to quote)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"training seconds per run on its own clock (default {budget:g}, "
                             f"--quick {quick_budget:g})")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on iterations per run")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated subset of " + ",".join(OPTIMIZER_NAMES)
                             + " (default: every one that can train the task's model)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"iterations between evaluations (default {eval_every}, "
                             f"--quick {quick_eval_every})")
    parser.add_argument("--out", default="experiments/results", help="results folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes")
    parser.add_argument("--refresh-report", action="store_true",
                        help="no training: recompute the table of an existing result in --out "
                             "from its runs/*.csv and re-run its memory probes (with "
                             "--no-memory: keep the recorded ones)")
    parser.add_argument("--hparams", type=json.loads, default={},
                        help='JSON overrides per optimizer, e.g. \'{"snopt": {"lr": 0.05}}\'')
    parser.set_defaults(_budget=budget, _quick_budget=quick_budget, _eval_every=eval_every,
                        _quick_eval_every=quick_eval_every)


def _settings(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    variants: dict[str, tuple[str, dict[str, Any]]] = getattr(args, "variants", None) or {}
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()] \
        if args.optimizers is not None else compatible(task.chain, task.residual)
    unknown = sorted(set(names) - set(OPTIMIZER_NAMES) - set(variants))
    if unknown or not names:
        raise SystemExit(f"unknown optimizer(s) {unknown or names}; choose from "
                         + ", ".join(OPTIMIZER_NAMES))
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    budget = args.budget if args.budget is not None else (
        args._quick_budget if args.quick else args._budget)
    eval_every = args.eval_every or (args._quick_eval_every if args.quick else args._eval_every)
    if budget <= 0 or eval_every < 1:
        raise SystemExit("--budget must be > 0 and --eval-every >= 1")
    for name in names:
        try:
            check_fits(variants.get(name, (name,))[0], task.chain, task.model_name,
                       task.residual)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if not isinstance(args.hparams, dict) or set(args.hparams) - set(OPTIMIZER_NAMES):
        raise SystemExit(f"--hparams must map optimizer names to keyword dicts, got "
                         f"{args.hparams!r}")
    return {"optimizers": names, "seeds": seeds, "budget_s": budget, "eval_every": eval_every,
            "max_steps": args.max_steps, "threads": args.threads, "hparams": args.hparams,
            "variants": variants}


def contender(name: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A contender's registry optimizer and its own hyperparameters: ``name`` itself, or a
    variant of ``settings["variants"]`` (label -> (registry name, hyperparameters over the
    optimizer's), e.g. ``{"snopt-grid": ("snopt", {"curvature": "grid"})}``; experiment
    scripts pass them as ``args.variants``)."""
    return settings.get("variants", {}).get(name, (name, {}))


def contender_hparams(task: Task, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters contender ``name`` trains with: :func:`hparams_for` of its
    registry optimizer, then the variant's own."""
    base, extra = contender(name, settings)
    return {**hparams_for(task, base, settings["hparams"]), **extra}


def _memory_args(name: str, settings: dict[str, Any]) -> tuple:
    base, extra = contender(name, settings)
    return base, settings["seeds"][0], settings["hparams"], extra


# ----------------------------------------------------------------------------- optimizers

def hparams_for(task: Task, name: str,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Registry defaults, the harness's choices, the task's, then ``--hparams``."""
    return resolve_hparams(name, COMPARE_HPARAMS.get(name), task.hparams.get(name),
                           (overrides or {}).get(name))


def build_model(task: Task, name: str, seed: int) -> nn.Module:
    """The task's model for optimizer ``name``, from the seed's initial weights."""
    torch.manual_seed(seed)
    return task.build_model(not OPTIMIZERS[name].through_solver)


# ----------------------------------------------------------------------------- training

@dataclass
class _Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    batches: Iterator[Any]
    counter: NFECounter
    clock: float = 0.0
    steps: int = 0
    done: bool = False
    status: str = "budget"
    window: dict[str, list[float]] = field(default_factory=lambda: {
        "loss": [], "ms": [], "nfe_f": [], "nfe_b": []})
    rows: list[dict[str, float]] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    nfe: list[tuple[int, int]] = field(default_factory=list)


def _fail(run: _Run, err: Exception) -> None:
    run.done, run.status = True, f"error: {type(err).__name__}"
    print(f"  {run.name} stopped at iteration {run.steps}: {err}", file=sys.stderr, flush=True)


def _evaluate(task: Task, run: _Run) -> dict[str, float]:
    """The task's held-out metrics; NaN (and the run ended) if the model cannot be solved."""
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad():
            metrics = task.evaluate(run.model)
    except SolverError as err:  # a blown-up model: the run ends, the comparison goes on
        _fail(run, err)
        return {k: math.nan for k in task.columns}
    finally:
        run.model.train(was_training)
    return {k: float(metrics[k]) for k in task.columns}


def _record(task: Task, run: _Run) -> None:
    w = run.window
    row = {"step": run.steps, "time_s": run.clock,
           "train_loss": statistics.fmean(w["loss"]) if w["loss"] else math.nan,
           "step_ms": statistics.median(w["ms"]) if w["ms"] else math.nan,
           "nfe_forward": statistics.fmean(w["nfe_f"]) if w["nfe_f"] else math.nan,
           "nfe_backward": statistics.fmean(w["nfe_b"]) if w["nfe_b"] else math.nan,
           **_evaluate(task, run)}
    run.rows.append(row)
    run.window = {k: [] for k in w}


def _advance(task: Task, run: _Run, settings: dict[str, Any]) -> None:
    batch = next(run.batches)
    start = time.perf_counter()
    try:
        loss = train_step(run.model, run.opt, task.loss, batch, counter=run.counter)
    except FloatingPointError:
        loss = math.nan
    except SolverError as err:  # a blown-up model ends this run, not the comparison
        loss = math.nan
        _fail(run, err)
    elapsed = time.perf_counter() - start
    run.clock += elapsed
    run.steps += 1
    nfe = run.counter.take()
    run.step_ms.append(elapsed * 1e3)
    run.nfe.append(nfe)
    for key, value in zip(("loss", "ms", "nfe_f", "nfe_b"), (loss, elapsed * 1e3, *nfe)):
        run.window[key].append(value)
    if not math.isfinite(loss):
        run.done, run.status = True, run.status if run.status != "budget" else "diverged"
    elif settings["max_steps"] is not None and run.steps >= settings["max_steps"]:
        run.done, run.status = True, "max_steps"
    elif run.clock >= settings["budget_s"]:
        run.done = True
    if run.done or run.steps % settings["eval_every"] == 0:
        _record(task, run)


def train_seed(task: Task, seed: int, settings: dict[str, Any]) -> dict[str, _Run]:
    """All optimizers on one seed, interleaved; returns the finished runs."""
    runs: dict[str, _Run] = {}
    for name in settings["optimizers"]:
        base = contender(name, settings)[0]
        model = build_model(task, base, seed)
        opt = build_optimizer(base, model, contender_hparams(task, name, settings))
        runs[name] = _Run(name, model, opt, task.batches(seed), NFECounter(model))
        _record(task, runs[name])  # the initial model, at time 0
    order, turn = list(runs), 0
    while not all(r.done for r in runs.values()):
        for name in order[turn % len(order):] + order[:turn % len(order)]:
            if not runs[name].done:
                _advance(task, runs[name], settings)
        turn += 1
    for run in runs.values():
        run.counter.remove()
        if hasattr(run.opt, "close"):
            run.opt.close()
    return runs


# ----------------------------------------------------------------------------- memory

def measure_memory(task: Task, name: str, seed: int = 0,
                   overrides: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> float | None:
    """Peak RSS growth (MiB) of two iterations of ``name`` (hyperparameters ``extra`` on top)
    after one warm-up, in a forked child (:func:`ocnode.training.memory.peak_rss_growth`);
    SNOpt and K-FAC refresh every second iteration so that a refresh is measured. None where
    the probe cannot run."""
    def prepare() -> Callable[[], None]:
        model = build_model(task, name, seed)
        hp = {**hparams_for(task, name, overrides), **(extra or {})}
        if "update_freq" in hp:
            hp["update_freq"] = 2  # refresh, plain, refresh
        opt = build_optimizer(name, model, hp)
        batches = task.batches(seed)

        def step() -> None:
            train_step(model, opt, task.loss, next(batches))
        return step

    return peak_rss_growth(prepare, warmup=1, iterations=2, what=f"{name} on {task.label}")


# ----------------------------------------------------------------------------- summary

def _better(task: Task, a: float, b: float) -> bool:
    """Whether metric value ``a`` is at least as good as ``b``."""
    return a >= b - 1e-12 if task.higher_is_better else a <= b + 1e-12


def time_to(task: Task, rows: list[dict[str, float]], level: float) -> float | None:
    """First own-clock time at which a run's metric reaches ``level`` (None: never)."""
    return next((r["time_s"] for r in rows if math.isfinite(r[task.metric])
                 and _better(task, r[task.metric], level)), None)


def _median(values: list[float | None]) -> float | None:
    """Median of the values that exist (seeds that reached a level); None if none did."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


Rows = list[dict[str, float]]


def metric_summary(task: Task, rows_by_seed: list[dict[str, Rows]],
                   names: list[str]) -> dict[str, Any]:
    """From the evaluation rows alone: the target (best mean final metric of the baselines),
    per optimizer final/best metric and time to the target, and the claim check."""
    finals = {n: [rows[n][-1][task.metric] for rows in rows_by_seed] for n in names}
    pick = max if task.higher_is_better else min
    means = [statistics.fmean(finals[n]) for n in names if n != "snopt"]
    finite = [m for m in means if math.isfinite(m)]  # a diverged baseline sets no target
    target = pick(finite) if finite else None
    per_opt = {}
    for n in names:
        runs = [rows[n] for rows in rows_by_seed]
        times = [time_to(task, r, target) for r in runs] if target is not None else []
        per_opt[n] = {
            "final_mean": statistics.fmean(finals[n]),
            "final_sd": statistics.stdev(finals[n]) if len(finals[n]) > 1 else 0.0,
            "best_mean": statistics.fmean(
                pick((row[task.metric] for row in r if math.isfinite(row[task.metric])),
                     default=math.nan) for r in runs),
            "time_to_target_s": _median(times),
            "reached_target": f"{sum(t is not None for t in times)}/{len(times)}"}
    return {"target": target, "optimizers": per_opt,
            "claim": _claim(task, rows_by_seed, names)}


def summarise(task: Task, seed_runs: list[dict[str, _Run]], memory: dict[str, float | None],
              settings: dict[str, Any]) -> dict[str, Any]:
    """Per optimizer: final metric, time to target, step time, memory, NFE; plus the claim
    check (SNOpt's time to each baseline's final metric over the baseline's own)."""
    names = settings["optimizers"]
    metrics = metric_summary(task, [{n: r.rows for n, r in runs.items()} for runs in seed_runs],
                             names)
    for n, result in metrics["optimizers"].items():
        runs = [r[n] for r in seed_runs]
        result.update({
            "step_ms_median": statistics.median(ms for r in runs for ms in r.step_ms),
            "nfe_forward_mean": statistics.fmean(f for r in runs for f, _ in r.nfe),
            "nfe_backward_mean": statistics.fmean(b for r in runs for _, b in r.nfe),
            "steps_mean": statistics.fmean(r.steps for r in runs),
            "status": sorted({r.status for r in runs}),
            "peak_rss_growth_mib": memory.get(n)})
    return {"task": task.label, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "target_rule": "best mean final metric among the baselines (every optimizer "
                           "except snopt)", **metrics, "settings": settings,
            "hparams": {n: contender_hparams(task, n, settings) for n in names},
            "command": command_line(), "machine": machine_info()}


#: the claim's two levels, key prefix -> the key of the baseline's level: its final metric,
#: and its best one (the stricter reading when a baseline overfits late).
CLAIM_LEVELS = {"": "baseline_final_mean", "best_": "baseline_best_mean"}


def _claim(task: Task, rows_by_seed: list[dict[str, Rows]], names: list[str]) -> dict[str, Any]:
    """Per baseline b and seed, at two levels (:data:`CLAIM_LEVELS`): b's final metric and
    its best one. For each, when b first reached it and when SNOpt did; medians over the
    seeds where they did (the ratio: where both did)."""
    if "snopt" not in names:
        return {}
    pick = max if task.higher_is_better else min
    out: dict[str, Any] = {}
    for b in (n for n in names if n != "snopt"):
        out[b] = {}
        for prefix, value_key in CLAIM_LEVELS.items():
            own, snopt, ratios, values = [], [], [], []
            for rows in rows_by_seed:
                level = rows[b][-1][task.metric] if not prefix else pick(
                    (r[task.metric] for r in rows[b] if math.isfinite(r[task.metric])),
                    default=math.nan)
                t_b, t_s = time_to(task, rows[b], level), time_to(task, rows["snopt"], level)
                own.append(t_b)
                snopt.append(t_s)
                ratios.append(t_s / t_b if t_s is not None and t_b else None)
                values.append(level)
            out[b].update({value_key: statistics.fmean(values),
                           f"{prefix}baseline_time_s": _median(own),
                           f"{prefix}snopt_time_s": _median(snopt),
                           f"{prefix}snopt_reached":
                               f"{sum(t is not None for t in snopt)}/{len(snopt)}",
                           f"{prefix}ratio_median": _median(ratios)})
    return out


# ----------------------------------------------------------------------------- outputs

def write_csvs(folder: Path, seed: int, runs: dict[str, _Run]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        with open(folder / f"{name}_seed{seed}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(run.rows[0]))
            writer.writeheader()
            writer.writerows(run.rows)


def plot_curves(task: Task, seed_runs: list[dict[str, _Run]], path: Path) -> None:
    """Training loss, the metric and forward NFE per iteration vs own wall-clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("train_loss", "training loss"), (task.metric, task.metric),
            ("nfe_forward", "forward NFE per iteration")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (key, label) in zip(axes, keys):
        for i, runs in enumerate(seed_runs):
            for name, run in runs.items():
                rows = run.rows[1:] if key != task.metric else run.rows
                ax.plot([r["time_s"] for r in rows], [r[key] for r in rows],
                        color=COLORS.get(name), alpha=0.85, lw=1.2,
                        label=name if i == 0 else None)
        ax.set(xlabel="own training wall-clock (s)", ylabel=label)
        ax.grid(alpha=0.3)
    losses = [r["train_loss"] for runs in seed_runs for run in runs.values()
              for r in run.rows[1:] if math.isfinite(r["train_loss"])]
    if losses and min(losses) > 0:
        axes[0].set_yscale("log")
    axes[1].legend(loc="best")
    fig.suptitle(f"{task.label}: one line per optimizer and seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(summary: dict[str, Any]) -> str:
    """The results table and the claim check of one task."""
    s, m = summary["settings"], summary["metric"]
    arrow = "higher" if summary["higher_is_better"] else "lower"
    lines = [f"# {summary['task']}: {', '.join(s['optimizers'])}", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']['cpu']}, {summary['machine']['cpu_count']} cores, "
             f"torch {summary['machine']['torch']}, {s['threads']} thread(s)  ",
             f"Seeds {s['seeds']}, budget {s['budget_s']:g} s of training per run (own clock), "
             f"evaluation every {s['eval_every']} iterations. Metric: {m} ({arrow} is better).",
             f"Target = {summary['target_rule']} = {_fmt(summary['target'])}.",
             *([f"Table recomputed from the runs by `{summary['report_command']}` (peak RSS "
                "re-measured unless it says --no-memory)."] if "report_command" in summary
               else []), "",
             f"| optimizer | final {m} (mean ± sd) | best {m} | time to target (s; median of "
             "the seeds that reached it) "
             "| reached | ms / iteration (median) | peak RSS growth (MiB) | NFE fwd / bwd "
             "per iteration | iterations | end |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, o in summary["optimizers"].items():
        lines.append(
            f"| {name} | {_fmt(o['final_mean'])} ± {_fmt(o['final_sd'], '.2g')} "
            f"| {_fmt(o['best_mean'])} | {_fmt(o['time_to_target_s'], '.1f')} "
            f"| {o['reached_target']} | {_fmt(o['step_ms_median'], '.1f')} "
            f"| {_fmt(o['peak_rss_growth_mib'], '.1f')} | {_fmt(o['nfe_forward_mean'], '.0f')} / "
            f"{_fmt(o['nfe_backward_mean'], '.0f')} | {_fmt(o['steps_mean'], '.0f')} "
            f"| {', '.join(o['status'])} |")
    if summary["claim"]:
        lines += ["", "Claim check: SNOpt's time to reach each baseline's final metric, over "
                  "the time the baseline itself needed (target ≤ 0.5). Times: medians over "
                  "the seeds that got there; ratio: median over the seeds where both did.",
                  "",
                  f"| baseline | its final {m} | its time (s) | SNOpt time (s) | SNOpt reached "
                  "| ratio |", "|---|---|---|---|---|---|"]
        lines += [*_claim_rows(summary["claim"], ""), "",
                  "The same at each baseline's best metric (its best evaluation, wherever in "
                  "the run; the stricter reading when a baseline overfits late):", "",
                  f"| baseline | its best {m} | its time (s) | SNOpt time (s) | SNOpt reached "
                  "| ratio |", "|---|---|---|---|---|---|", *_claim_rows(summary["claim"], "best_")]
    return "\n".join(lines) + "\n"


def _claim_rows(claim: dict[str, Any], prefix: str) -> list[str]:
    """One claim-table row per baseline at the level of ``prefix`` (:data:`CLAIM_LEVELS`)."""
    return [f"| {b} | {_fmt(c[CLAIM_LEVELS[prefix]])} "
            f"| {_fmt(c[prefix + 'baseline_time_s'], '.1f')} "
            f"| {_fmt(c[prefix + 'snopt_time_s'], '.1f')} "
            f"| {c[prefix + 'snopt_reached']} | {_fmt(c[prefix + 'ratio_median'], '.2f')} |"
            for b, c in claim.items()]


def read_rows(path: Path) -> Rows:
    """The evaluation rows of one run's CSV, as floats."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def refresh_report(task: Task, folder: Path, memory: bool = True) -> dict[str, Any]:
    """For the result in ``folder``: recompute the metric columns from its runs/*.csv, re-run
    the memory probes with its own settings (``memory=False``: keep the recorded ones);
    rewrite summary.json and results.md (the timing and NFE columns are kept). ``models`` is
    empty."""
    path = folder / "summary.json"
    if not path.is_file():
        raise SystemExit(f"--refresh-report: no {path}; run the experiment first")
    summary = json.loads(path.read_text())
    settings, names = summary["settings"], list(summary["optimizers"])
    rows = [{n: read_rows(folder / "runs" / f"{n}_seed{seed}.csv") for n in names}
            for seed in settings["seeds"]]
    metrics = metric_summary(task, rows, names)
    for name, result in summary["optimizers"].items():
        result.update(metrics["optimizers"][name])
        if memory:
            result["peak_rss_growth_mib"] = measure_memory(task, name, settings["seeds"][0],
                                                           settings.get("hparams"))
    summary.update(target=metrics["target"], claim=metrics["claim"],
                   report_command=command_line())
    path.write_text(json.dumps(summary, indent=1, default=str))
    (folder / "results.md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    return {**summary, "models": {}}


def run(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """Train, measure and report ``task``; returns the summary with ``models`` (optimizer ->
    trained model of the first seed) added."""
    settings = _settings(args, task)
    torch.set_num_threads(settings["threads"])
    folder = Path(args.out) / task.label
    if args.refresh_report:
        return refresh_report(task, folder, memory=not args.no_memory)
    seed_runs = []
    for seed in settings["seeds"]:
        start = time.perf_counter()
        runs = train_seed(task, seed, settings)
        write_csvs(folder / "runs", seed, runs)
        seed_runs.append(runs)
        print(f"[{task.label}] seed {seed} ({time.perf_counter() - start:.0f} s): " + ", ".join(
            f"{n} {task.metric}={r.rows[-1][task.metric]:.4g} ({r.steps} it, {r.status})"
            for n, r in runs.items()), flush=True)
    memory = {} if args.no_memory else {
        n: measure_memory(task, *_memory_args(n, settings)) for n in settings["optimizers"]}
    summary = summarise(task, seed_runs, memory, settings)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (folder / "results.md").write_text(markdown(summary))
    plot_curves(task, seed_runs, folder / "curves.png")
    models = {n: r.model for n, r in seed_runs[0].items()}
    if task.plot is not None:
        task.plot(models, folder / f"{task.name}.png")
    print(markdown(summary), flush=True)
    return {**summary, "models": models}
