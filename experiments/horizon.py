"""Experiment: optimising the integration horizon T (SNOpt paper; docs/algorithms.md).

On sklearn's digits (MLP ODE classifier, dopri5 with rtol = atol = 1e-3, adjoint), for
each seed, three runs from the same seed (same initial model, same batches):

fixed
    ``adaptive_t1="off"``: T stays at 1.0.
baseline
    the open-loop, first-order policy ``dT = -eta_T * EMA[Q_T]``.
feedback
    the paper's second-order feedback policy
    ``dT = -eta_T * (EMA[Q_T] + s <grad_theta L, d theta>) / EMA[Q_TT]``.

All start from T = 1.0 and use the same horizon settings (not tuned per seed): eta_T = 0.1
(the paper's default), T updated every 10 iterations (digits has 23 batches of 64 per
epoch, so the paper's 50-100 would give only 2-5 updates in 10 epochs), c = 1e-3 (the top
of the paper's 1e-4..1e-3 range; with ~230 iterations the weaker 1e-4 barely moves the
baseline's T), T_min = 0.1.

Every run is one ``ocnode train`` run: :func:`ocnode.training.train` with a
:class:`ocnode.training.TrainConfig` (``adaptive_t1``, ``t1_update_freq``, ``t1_reg``, ...).
Recorded per run: final test accuracy, final T, training wall time (the run's own clock,
``wall_time`` of the last row of its metrics.csv: evaluation and checkpointing excluded),
and the inference NFE: the trained model is rebuilt from the run's task
(:func:`ocnode.training.make_task`), loaded from the run's checkpoint.pt and evaluated once on
the whole test set under ``torch.no_grad()``; the forward NFE (summed over the ODE blocks,
:class:`ocnode.training.NFECounter`) is averaged over the test batches.

``--problem image`` runs the same three policies on the SNOpt paper's image net (a conv stem
to 64 channels, an ODE block of two 3x3 time-concatenated convolutions) on MNIST-5k, Adam lr
1e-3, batch 128, as the paper optimised T on its image sets.

Outputs (``--out``, default experiments/results): horizon.json, horizon.md (table with
means over seeds) and horizon.png (T and test accuracy against the step). The runs
themselves (metrics, checkpoints) go to ``--run-dir`` (default runs/horizon, ignored by
git); they are overwritten.

Usage:
    python experiments/horizon.py                    # 3 seeds x 3 policies, 10 epochs
    python experiments/horizon.py --quick            # smoke run: 1 seed, 1 epoch, tiny
    python experiments/horizon.py --seeds 0,1 --epochs 5 --optimizer snopt
    python experiments/horizon.py --problem image --epochs 5   # -> horizon-image.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ocnode.data import load_dataset
from ocnode.nn import ode_blocks
from ocnode.training import OPTIMIZERS, NFECounter, TrainConfig, make_task, train
from ocnode.training.loop import CHECKPOINT, METRICS
from ocnode.training.records import MetricsLog, load_checkpoint

# ---- configuration (CLI flags override some of it) --------------------------------------
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "results"
RUN_DIR = ROOT / "runs" / "horizon"
POLICIES = ("fixed", "baseline", "feedback")  # fixed = adaptive_t1 "off"
SEEDS = (0, 1, 2)
EPOCHS = 10
OPTIMIZER = "adam"
THREADS = 1
BASE = dict(
    dataset="digits", model="mlp", width=64, lr=1e-2, batch_size=64,
    method="dopri5", rtol=1e-3, atol=1e-3, adjoint=True,
    t1=1.0, t1_lr=0.1, t1_reg=1e-3, t1_update_freq=10, t1_min=0.1,
    log_every=10, eval_batch_size=1024, device="cpu", progress=False, overwrite=True,
)
#: ``--problem image``: the SNOpt paper's image net (a conv stem to 64 channels, an ODE block
#: of two 3x3 time-concatenated convolutions) on the real 5,000-digit MNIST subset, Adam at
#: the usual 1e-3, batch 128 (31 iterations per epoch), evaluated on 1,000 test images.
IMAGE = dict(dataset="mnist5k", model="conv", width=64, lr=1e-3, batch_size=128,
             eval_batch_size=500, log_every=31)
PROBLEMS = {"digits": {}, "image": IMAGE}
# --quick: a smoke run, not a result
QUICK = dict(seeds=(0,), epochs=1, train_size=192, t1_update_freq=2, log_every=2)


def policy_config(policy: str, seed: int, epochs: int, optimizer: str, out: Path,
                  overrides: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one run."""
    adaptive = "off" if policy == "fixed" else policy
    return TrainConfig(**{**BASE, **overrides}, seed=seed, epochs=epochs, optimizer=optimizer,
                       adaptive_t1=adaptive, out=str(out))


@torch.no_grad()
def inference_nfe(config: TrainConfig) -> dict[str, float]:
    """Rebuild the trained model, load its checkpoint, and evaluate it once on the test set.

    Returns the mean forward NFE per test batch (summed over ODE blocks), the number of
    batches, the test accuracy of this pass and the model's horizon.
    """
    dataset = load_dataset(config.dataset, config.data_dir, config.seed,
                           subset=config.train_size)
    task = make_task(dataset, config.task_settings())
    model = task.build_model(config.adjoint and not OPTIMIZERS[config.optimizer].through_solver)
    ckpt = load_checkpoint(Path(config.out) / CHECKPOINT)
    model.load_state_dict(ckpt["model"])
    model.eval()
    blocks, counter = ode_blocks(model), NFECounter(model)
    counter.phase = "forward"  # count the evaluation's calls
    loader = torch.utils.data.DataLoader(dataset.test, config.eval_batch_size)
    nfes, correct, count = [], 0, 0
    for x, y in loader:
        logits = model(x)
        nfes.append(counter.take()[0])
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    counter.remove()
    return {"inference_nfe_per_batch": statistics.fmean(nfes), "inference_batches": len(nfes),
            "inference_batch_size": config.eval_batch_size, "inference_acc": correct / count,
            "model_t1": statistics.fmean(b.t1 for b in blocks)}


def run_one(policy: str, seed: int, epochs: int, optimizer: str, run_dir: Path,
            overrides: dict[str, Any]) -> dict[str, Any]:
    out = run_dir / f"seed{seed}" / policy
    config = policy_config(policy, seed, epochs, optimizer, out, overrides)
    final = train(config)
    rows = MetricsLog(out / METRICS, ()).read()
    record = {
        "seed": seed, "policy": policy, "adaptive_t1": config.adaptive_t1,
        "final_acc": final["test_acc"], "final_t1": final["t1"],
        "train_wall_s": final["wall_time"], "steps": int(final["step"]),
        "train_nfe_forward_last": final["nfe_forward"],
        "train_nfe_backward_last": final["nfe_backward"],
        "curve": {k: [r[k] for r in rows] for k in ("step", "t1", "test_acc", "wall_time",
                                                    "nfe_forward", "nfe_backward")},
    }
    record.update(inference_nfe(config))
    print(f"seed {seed} {policy:8s} acc {record['final_acc']:.4f} T {record['final_t1']:.3f} "
          f"train {record['train_wall_s']:.1f}s inference NFE "
          f"{record['inference_nfe_per_batch']:.1f}", flush=True)
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("final_acc", "final_t1", "train_wall_s", "inference_nfe_per_batch")
    means: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        rs = [r for r in records if r["policy"] == policy]
        if rs:
            means[policy] = {k: statistics.fmean(r[k] for r in rs) for k in keys}
    return means


def write_markdown(result: dict[str, Any], path: Path) -> None:
    s = result["settings"]
    lines = [
        f"# Horizon optimisation (SNOpt paper; docs/algorithms.md) on {s['dataset']}",
        "",
        f"{s['model']} ODE classifier (width {s['width']}), {s['method']} "
        f"rtol=atol={s['rtol']:g}, "
        f"adjoint; {s['optimizer']} lr {s['lr']:g}, batch {s['batch_size']}, "
        f"{s['epochs']} epochs; T starts at {s['t1']:g}; eta_T={s['t1_lr']:g}, "
        f"c={s['t1_reg']:g}, T updated every {s['t1_update_freq']} iterations, "
        f"T_min={s['t1_min']:g}. {result['threads']} torch thread(s), CPU.",
        "",
        "Train wall = the run's own clock (evaluation and checkpointing excluded). "
        f"Inference NFE = forward vector-field evaluations per test batch "
        f"(batch {s['eval_batch_size']}) of the trained model under no_grad.",
        "",
        "| seed | policy | final acc | final T | train wall [s] | inference NFE / batch |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['seed']} | {r['policy']} | {r['final_acc']:.4f} | "
                     f"{r['final_t1']:.3f} | {r['train_wall_s']:.1f} | "
                     f"{r['inference_nfe_per_batch']:.1f} |")
    for policy, m in result["means"].items():
        lines.append(f"| mean | {policy} | {m['final_acc']:.4f} | {m['final_t1']:.3f} | "
                     f"{m['train_wall_s']:.1f} | {m['inference_nfe_per_batch']:.1f} |")
    lines += ["", f"Total script time: {result['total_s']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def plot(records: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_t, ax_acc = fig.subplots(1, 2)
    colors = {"fixed": "tab:gray", "baseline": "tab:blue", "feedback": "tab:red"}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in records})
    for r in records:
        c = r["curve"]
        ls = styles[seeds.index(r["seed"]) % len(styles)]
        label = f"{r['policy']} seed {r['seed']}"
        ax_t.plot(c["step"], c["t1"], color=colors[r["policy"]], ls=ls, label=label)
        ax_acc.plot(c["step"], c["test_acc"], color=colors[r["policy"]], ls=ls, label=label)
    ax_t.set(xlabel="iteration", ylabel="horizon T", title="T against iteration")
    ax_acc.set(xlabel="iteration", ylabel="test accuracy", title="test accuracy")
    for ax in (ax_t, ax_acc):
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7, ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, tiny")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for horizon.{json,md,png}")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="folder for the runs (default runs/horizon; --quick: OUT/horizon_runs)")
    p.add_argument("--seeds", type=str, default=None, help="comma-separated, e.g. 0,1,2")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--optimizer", choices=("adam", "snopt", "sgd"), default=OPTIMIZER)
    p.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    p.add_argument("--problem", choices=tuple(PROBLEMS), default="digits",
                   help="digits (MLP ODE) or image (the SNOpt paper's conv net on MNIST-5k)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides: dict[str, Any] = dict(PROBLEMS[args.problem])
    seeds, epochs = SEEDS, EPOCHS
    if args.quick:
        seeds, epochs = QUICK["seeds"], QUICK["epochs"]
        overrides.update({k: QUICK[k] for k in ("train_size", "t1_update_freq", "log_every")})
        if args.problem == "image":
            overrides.update(width=8, batch_size=32)
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.epochs is not None:
        epochs = args.epochs
    run_dir = args.run_dir or (args.out / "horizon_runs" if args.quick else RUN_DIR)
    name = "horizon" if args.problem == "digits" else f"horizon-{args.problem}"
    run_dir = run_dir / args.problem if args.problem != "digits" else run_dir
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    records = [run_one(policy, seed, epochs, args.optimizer, run_dir, overrides)
               for seed in seeds for policy in POLICIES]
    settings = dataclasses.asdict(policy_config("feedback", seeds[0], epochs, args.optimizer,
                                                run_dir, overrides))
    for key in ("seed", "adaptive_t1", "out", "resume", "overwrite", "progress"):
        settings.pop(key)
    result = {
        "experiment": "horizon", "quick": args.quick, "seeds": list(seeds),
        "policies": list(POLICIES), "settings": settings, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "runs": records, "means": summarise(records),
        "total_s": time.perf_counter() - start,
    }
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / f"{name}.md")
    plot(records, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json, .md, .png in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
