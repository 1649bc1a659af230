"""Why the feedback columns of the ResNet rows scored near chance: BatchNorm's running
statistics, not the weights; and what projecting the feedback (``project_bn``) changes.

The ResNet rows of ``ddpnopt_table.py`` (``resnet-mnist5k``, ``resnet-fmnist32``) evaluate
in eval mode, where BatchNorm normalises with its running statistics. This script trains one
seed of the row's net with three columns of the same optimizer class, DGNOpt ``mode="chain"``
on the EKFAC base: the feedback on (the DDPNOpt column, at the row's chosen rate), projected
before each BatchNorm (the default) and unprojected (``project_bn=False``, the feedback as first
derived), and off (the EKFAC column), and every ``--eval-every`` iterations reports the mean
training loss and the test accuracy three ways: eval mode with the running statistics (what
the table reports), train mode (each test batch's own statistics), and eval mode after recalibrating
the running statistics on ``--recalibrate`` training batches with the current weights (a
copy of the model: training is not disturbed); and where the running statistics are off
(:func:`running_misfit`: means, variances, the conv weights' scale). At the end, over the
last ``--lag-window`` iterations, why the running means are off (:func:`decompose`): a
running mean is an average of the batch means of the training forwards, each the
population mean of the weights of its iteration plus batch noise, so its misfit to the
final weights' population mean splits exactly into what was averaged before the window, the
lag (the weights' population means in the window against the final one) and the noise; and
how far one step moves the population means (the largest channel's jump per step), and the
test accuracy with only the means, or only the variances, recomputed. Then
(:func:`attribute_jumps`) each feedback column goes on for ``--attribution`` iterations, each
step taken three times from the same state, with the feedback off, projected and unprojected:
which part of the step makes the jumps, and how much each changes the train-mode function.

Usage:
    python experiments/dgnopt_batchnorm.py                       # ~25 min, one core
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

COLUMNS = {"DDPNOpt (projected feedback)": {"base": "ekfac", "mode": "chain", "lr": 0.01},
           "DDPNOpt (unprojected feedback)": {"base": "ekfac", "mode": "chain", "lr": 0.01,
                                            "project_bn": False},
           "EKFAC (feedback off)": {"base": "ekfac", "mode": "chain", "feedback": False,
                                    "lr": 0.03}}
#: the steps :func:`attribute_jumps` takes from the same state: optimizer attributes
STEPS = {"off": {"feedback": False}, "projected": {"feedback": True, "project_bn": True},
         "unprojected": {"feedback": True, "project_bn": False}}


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
    mean, var = population(model, [next(batches) for _ in range(n)])
    layers = _batchnorms(model)
    shift = max(float(((a.running_mean - m).abs() / (v + a.eps).sqrt()).max())
                for a, m, v in zip(layers, mean, var))
    ratios = torch.cat([(a.running_var + a.eps) / (v + a.eps) for a, v in zip(layers, var)])
    conv = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return {"mean_shift_sd": shift, "var_ratio_min": float(ratios.min()),
            "var_ratio_max": float(ratios.max()),
            "conv_weight_norm": float(torch.sqrt(sum((w.detach() ** 2).sum() for w in conv)))}


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class BatchMeans:
    """Record, per training forward of ``model`` (train mode, with grad: not the update
    pass, not a copy's forwards), each BatchNorm layer's batch mean of its input, (C,)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers, self.forwards = _batchnorms(model), []
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()) or not self.forwards:
            return
        i = next(k for k, m in enumerate(self.layers) if m is module)
        x = inputs[0].detach()
        self.forwards[-1][i] = x.mean([d for d in range(x.dim()) if d != 1])

    def start_forward(self) -> None:
        self.forwards.append([None] * len(self.layers))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def population(model: torch.nn.Module, batches: list[Any]) -> tuple[list[torch.Tensor],
                                                                       list[torch.Tensor]]:
    """Each BatchNorm layer's population mean and variance, (C,) each, of ``model``'s
    current weights (recomputed on ``batches`` in a copy)."""
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, ref)
    return ([m.running_mean.clone() for m in _batchnorms(ref)],
            [m.running_var.clone() for m in _batchnorms(ref)])


def decompose(start: list[torch.Tensor], means: list[list[torch.Tensor]],
              pops: list[list[torch.Tensor]], final: list[torch.Tensor],
              momentum: float) -> dict[str, list[torch.Tensor]]:
    """Split ``running - final`` per layer, (C,) each, for a running mean that was ``start``
    before W training forwards with batch means ``means[k]`` (W lists of per-layer (C,))
    at weights whose population means were ``pops[k]``:
    running = (1-m)^W start + sum_k m (1-m)^(W-1-k) means[k], so running - final =
    before (1-m)^W (start - final) + lag sum_k w_k (pops[k] - final) + noise
    sum_k w_k (means[k] - pops[k])."""
    w = len(means)
    weights = [momentum * (1 - momentum) ** (w - 1 - k) for k in range(w)]
    out: dict[str, list[torch.Tensor]] = {"before": [], "lag": [], "noise": []}
    for i, f in enumerate(final):
        out["before"].append((1 - momentum) ** w * (start[i] - f))
        out["lag"].append(sum(c * (p[i] - f) for c, p in zip(weights, pops)))
        out["noise"].append(sum(c * (m[i] - p[i]) for c, m, p in zip(weights, means, pops)))
    return out


def _worst(vectors: list[torch.Tensor], sd: list[torch.Tensor]) -> float:
    """The largest |entry| over layers and channels, in population standard deviations."""
    return max(float((v.abs() / s).max()) for v, s in zip(vectors, sd))


def lag_report(task: Any, model: torch.nn.Module, record: BatchMeans,
               window: dict[str, Any], batches: list[Any]) -> dict[str, Any]:
    """Why the running means of ``model`` are off, over the window's iterations (their
    weights ``window['snapshots']``, the running means before them ``window['start']``):
    the three parts of :func:`decompose` and the misfit, worst channel of any layer; the
    largest channel's jump of the population mean per step (median, max, last step); and
    the test accuracy in eval mode with the running statistics, with only the means, and
    with only the variances replaced by the population's."""
    final, var = population(model, batches)
    sd = [(v + m.eps).sqrt() for v, m in zip(var, record.layers)]
    pops = []
    for state in window["snapshots"]:
        past = copy.deepcopy(model)
        past.load_state_dict(state)
        pops.append(population(past, batches)[0])
    means = record.forwards[-len(pops):]
    parts = decompose(window["start"], means, pops, final, record.layers[0].momentum)
    running = [m.running_mean.clone() for m in record.layers]
    jumps = [_worst([a - b for a, b in zip(nxt, cur)], sd)
             for cur, nxt in zip(pops, pops[1:] + [final])]
    return {"window": len(pops),
            "misfit": _worst([r - f for r, f in zip(running, final)], sd),
            **{k: _worst(v, sd) for k, v in parts.items()},
            "jump_median": statistics.median(jumps), "jump_max": max(jumps),
            "jump_last": jumps[-1],
            "acc_running": _accuracy_with(task, model, {}),
            "acc_means_recomputed": _accuracy_with(task, model, {"running_mean": final}),
            "acc_vars_recomputed": _accuracy_with(task, model, {"running_var": var})}


def attribute_jumps(task: Any, run: dict[str, Any], batches: list[Any], n: int
                    ) -> dict[str, dict[str, float]]:
    """Continue a feedback run for ``n`` iterations; before each, take the same step from the
    same state (model and optimizer state_dict) each way of :data:`STEPS` (feedback off,
    projected, unprojected), and measure for each: the worst channel's jump of the population
    means (in population sd), the relative change of the train-mode logits on a fixed batch,
    the step's norm, and the training loss on the step's batch after it (train mode, a
    copy). The run goes on with its own kind of step (the last taken). Medians and maxima
    over the ``n`` iterations."""
    model, opt, probe = run["model"], run["opt"], batches[0][0]
    own = "projected" if opt.project_bn else "unprojected"
    order = [k for k in STEPS if k != own] + [own]
    rows: dict[str, list[tuple[float, ...]]] = {k: [] for k in STEPS}
    before, var = population(model, batches)
    for _ in range(n):
        batch = next(run["batches"])
        weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        sd = [(v + m.eps).sqrt() for v, m in zip(var, _batchnorms(model))]
        with torch.no_grad():
            logits = model(probe)
        for key in order:
            model.load_state_dict(weights)
            opt.load_state_dict(state)
            for name, value in STEPS[key].items():
                setattr(opt, name, value)
            train_step(model, opt, task.loss, batch)
            after, after_var = population(model, batches)
            with torch.no_grad():
                change = float((model(probe) - logits).norm() / logits.norm())
                loss = float(task.loss(copy.deepcopy(model).train(), batch))
            step = float(torch.sqrt(sum(((p.detach() - weights[k]) ** 2).sum()
                                        for k, p in model.named_parameters())))
            rows[key].append((_worst([a - b for a, b in zip(after, before)], sd), change, step,
                              loss))
        before, var = after, after_var  # the run goes on from its own kind of step
    return {key: {"jump_median": statistics.median(r[0] for r in rs),
                  "jump_max": max(r[0] for r in rs),
                  "logit_change_median": statistics.median(r[1] for r in rs),
                  "step_norm_median": statistics.median(r[2] for r in rs),
                  "loss_after_median": statistics.median(r[3] for r in rs)}
            for key, rs in rows.items()}


def _accuracy_with(task: Any, model: torch.nn.Module,
                   buffers: dict[str, list[torch.Tensor]]) -> float:
    """Eval-mode test accuracy of a copy whose BatchNorm buffers are replaced by ``buffers``
    (name -> one tensor per layer)."""
    m = copy.deepcopy(model)
    for name, values in buffers.items():
        for layer, v in zip(_batchnorms(m), values):
            getattr(layer, name).copy_(v)
    m.eval()
    with torch.no_grad():
        return float(task.evaluate(m)["test_acc"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--recalibrate", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lag-window", type=int, default=40,
                        help="iterations at the end whose weights the lag report replays")
    parser.add_argument("--attribution", type=int, default=40,
                        help="iterations the feedback column goes on for, each step taken "
                             "with the feedback off, projected and unprojected from the same state")
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
                     "batches": task.batches(args.seed), "losses": [], "rows": [],
                     "record": BatchMeans(model), "window": {"snapshots": []}}
    calib = task.batches(args.seed + 1000)
    lag_stream = task.batches(args.seed + 2000)  # its own: the evaluations' stream is untouched
    lag_batches = [next(lag_stream) for _ in range(args.recalibrate)]
    first = args.iterations - min(args.lag_window, args.iterations)
    for it in range(args.iterations):
        for col, run in runs.items():
            if it == first:
                run["window"]["start"] = [m.running_mean.clone() for m in run["record"].layers]
            if it >= first:
                run["window"]["snapshots"].append(copy.deepcopy(run["model"].state_dict()))
            run["record"].start_forward()
            run["losses"].append(train_step(run["model"], run["opt"], task.loss,
                                            next(run["batches"])))
            if (it + 1) % args.eval_every == 0:
                row = {"iteration": it + 1,
                       "train_loss": statistics.fmean(run["losses"][-args.eval_every:]),
                       **accuracies(task, run["model"], calib, args.recalibrate),
                       **running_misfit(run["model"], calib, args.recalibrate)}
                run["rows"].append(row)
                print(col, row, flush=True)
    lag = {}
    for col, run in runs.items():
        lag[col] = lag_report(task, run["model"], run["record"], run["window"], lag_batches)
        run["record"].close()
        print(col, lag[col], flush=True)
    attribution = {col: attribute_jumps(task, run, lag_batches, args.attribution)
                   for col, run in runs.items() if run["opt"].feedback and args.attribution}
    print(attribution, flush=True)
    changed = "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                      if k != "out" and v != parser.get_default(k))
    result = {"command": f"python experiments/dgnopt_batchnorm.py{changed}",
              "args": vars(args) | {"out": args.out.name}, "columns": COLUMNS,
        "machine": machine_info(), "wall_s": time.perf_counter() - start,
        "rows": {col: run["rows"] for col, run in runs.items()}, "lag": lag,
        "attribution": attribution}
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
    lines += ["", f"Why the running means are off after the last iteration (the last "
              f"{result['args']['lag_window']} iterations replayed; shifts in population sd, "
              "worst channel of any layer; before + lag + noise = misfit per channel, not "
              "for the worst channels):", "",
              "| column | misfit | before the window | lag | noise | population-mean jump "
              "per step (median, max, last) | test acc: running stats, means recomputed, "
              "variances recomputed |", "|---|---|---|---|---|---|---|"]
    for col, g in result["lag"].items():
        lines.append(f"| {col} | {g['misfit']:.3f} | {g['before']:.3f} | {g['lag']:.3f} | "
                     f"{g['noise']:.3f} | {g['jump_median']:.3f}, {g['jump_max']:.3f}, "
                     f"{g['jump_last']:.3f} | {100 * g['acc_running']:.1f}, "
                     f"{100 * g['acc_means_recomputed']:.1f}, "
                     f"{100 * g['acc_vars_recomputed']:.1f} |")
    for col, parts in result["attribution"].items():
        lines += ["", f"Whose jumps: {col}, {result['args']['attribution']} more iterations, "
                  "each step taken from the same state with the feedback off, projected and "
                  "unprojected:", "",
                  "| step | population-mean jump (median, max) | train-mode logit change "
                  "(median, relative) | step norm (median) | training loss after the step "
                  "(median) |", "|---|---|---|---|---|"]
        for key, g in parts.items():
            lines.append(f"| feedback {key} | {g['jump_median']:.3f}, {g['jump_max']:.3f} | "
                         f"{g['logit_change_median']:.3f} | {g['step_norm_median']:.3f} | "
                         f"{g['loss_after_median']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
