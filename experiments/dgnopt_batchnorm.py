"""Why the feedback columns of the ResNet rows score near chance: BatchNorm's running
statistics, not the weights.

The ResNet rows of ``ddpnopt_table.py`` (``resnet-mnist5k``, ``resnet-fmnist32``) evaluate
in eval mode, where BatchNorm normalises with its running statistics. This script trains one
seed of the row's net with two columns of the same optimizer class, DGNOpt ``mode="chain"``
on the EKFAC base with the feedback on (the DDPNOpt column, at the row's chosen rate) and off
(the EKFAC column), and every ``--eval-every`` iterations reports the mean training loss and
the test accuracy three ways: eval mode with the running statistics (what the table
reports), train mode (each test batch's own statistics), and eval mode after recalibrating
the running statistics on ``--recalibrate`` training batches with the current weights (a
copy of the model: training is not disturbed); and where the running statistics are off
(:func:`running_misfit`: means, variances, the conv weights' scale).

Usage:
    python experiments/dgnopt_batchnorm.py                       # ~5 min, one core
    python experiments/dgnopt_batchnorm.py --iterations 20 --eval-every 10 --out <dir>
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from ddpnopt_table import evaluate_accuracy as evaluate_recalibrated
from ddpnopt_table import make

from ocnode.training import build_optimizer, train_step
from ocnode.training.compare import build_model
from ocnode.training.records import machine_info

COLUMNS = {"DDPNOpt (feedback on)": {"base": "ekfac", "mode": "chain", "lr": 0.01},
           "EKFAC (feedback off)": {"base": "ekfac", "mode": "chain", "feedback": False,
                                    "lr": 0.03}}


def accuracies(task: Any, model: torch.nn.Module, batches: Any, recalibrate: int
               ) -> dict[str, float]:
    """Test accuracy with the running statistics, with each test batch's statistics, and
    after recalibrating the running statistics of a copy on ``recalibrate`` training batches."""
    def acc(m: torch.nn.Module, train_mode: bool) -> float:
        m.train(train_mode)
        with torch.no_grad():
            return float(task.evaluate(m)["test_acc"])

    return {"running": acc(copy.deepcopy(model), False),
            "batch": acc(copy.deepcopy(model), True),
            "recalibrated": evaluate_recalibrated(task, model, recalibrate, batches)}


def running_misfit(model: torch.nn.Module, batches: Any, n: int) -> dict[str, float]:
    """How far the BatchNorm layers' running statistics are from the population statistics
    of the current weights (recomputed on ``n`` training batches in a copy), worst over the
    layers and channels: the largest mean shift in population standard deviations, the
    smallest and largest ratio running var / population var; and the norm of every conv
    weight (BatchNorm makes the net blind to that scale, its running variance is not)."""
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn([next(batches) for _ in range(n)], ref)
    pairs = [(a, b) for a, b in zip(model.modules(), ref.modules())
             if isinstance(a, torch.nn.modules.batchnorm._BatchNorm)]
    shift = max(float(((a.running_mean - b.running_mean).abs()
                       / (b.running_var + a.eps).sqrt()).max()) for a, b in pairs)
    ratios = torch.cat([(a.running_var + a.eps) / (b.running_var + a.eps) for a, b in pairs])
    conv = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return {"mean_shift_sd": shift, "var_ratio_min": float(ratios.min()),
            "var_ratio_max": float(ratios.max()),
            "conv_weight_norm": float(torch.sqrt(sum((w.detach() ** 2).sum() for w in conv)))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--recalibrate", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "dgnopt-batchnorm")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    task = make("resnet-mnist5k", 128)
    runs = {}
    for col, hp in COLUMNS.items():
        model = build_model(task, "dgnopt", args.seed)
        runs[col] = {"model": model, "opt": build_optimizer("dgnopt", model, dict(hp)),
                     "batches": task.batches(args.seed), "losses": [], "rows": []}
    calib = task.batches(args.seed + 1000)
    for it in range(args.iterations):
        for col, run in runs.items():
            run["losses"].append(train_step(run["model"], run["opt"], task.loss,
                                            next(run["batches"])))
            if (it + 1) % args.eval_every == 0:
                row = {"iteration": it + 1,
                       "train_loss": statistics.fmean(run["losses"][-args.eval_every:]),
                       **accuracies(task, run["model"], calib, args.recalibrate),
                       **running_misfit(run["model"], calib, args.recalibrate)}
                run["rows"].append(row)
                print(col, row, flush=True)
    result = {"command": "python experiments/dgnopt_batchnorm.py", "args": vars(args) | {
        "out": "experiments/results/dgnopt-batchnorm"}, "columns": COLUMNS,
        "machine": machine_info(), "wall_s": time.perf_counter() - start,
        "rows": {col: run["rows"] for col, run in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["# BatchNorm's running statistics under DDPNOpt's feedback (ResNet, MNIST-5k)", "",
             f"Command: `{result['command']}`; seed {result['args']['seed']}; "
             f"wall time {result['wall_s']:.0f} s.", "",
             "| column | iteration | train loss | test acc, running stats | test acc, batch "
             "stats | test acc, recalibrated | running mean shift (population sd) | running "
             "var / population var (min, max) | conv weight norm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for col, rows in result["rows"].items():
        for r in rows:
            lines.append(f"| {col} | {r['iteration']} | {r['train_loss']:.3f} | "
                         f"{100 * r['running']:.1f} | {100 * r['batch']:.1f} | "
                         f"{100 * r['recalibrated']:.1f} | {r['mean_shift_sd']:.2f} | "
                         f"{r['var_ratio_min']:.2f}, {r['var_ratio_max']:.2f} | "
                         f"{r['conv_weight_norm']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
