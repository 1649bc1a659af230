"""Smoke test of experiments/dgnopt_batchnorm.py: a few iterations, every accuracy written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from conftest import experiment_module, run_experiment
from torch import nn


def test_dgnopt_batchnorm_quick_writes_three_accuracies_per_column(tmp_path: Path) -> None:
    run_experiment("dgnopt_batchnorm.py", "--iterations", "4", "--eval-every", "2",
                   "--recalibrate", "2", "--attribution", "2", "--out", str(tmp_path),
                   timeout=300)
    result = json.loads((tmp_path / "summary.json").read_text())
    assert result["command"] == ("python experiments/dgnopt_batchnorm.py --iterations 4 "
                                 "--eval-every 2 --recalibrate 2 --attribution 2")
    assert set(result["rows"]) == {"DDPNOpt (projected feedback)", "DDPNOpt (unprojected feedback)",
                                   "EKFAC (feedback off)"}
    for rows in result["rows"].values():
        assert [r["iteration"] for r in rows] == [2, 4]
        for r in rows:
            assert 0.0 <= r["running"] <= 1.0 and 0.0 <= r["batch"] <= 1.0
            assert 0.0 <= r["recalibrated"] <= 1.0 and r["train_loss"] > 0
            assert r["mean_shift_sd"] >= 0 and 0 < r["var_ratio_min"] <= r["var_ratio_max"]
            assert r["conv_weight_norm"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| EKFAC (feedback off) | 4 |" in md
    assert set(result["lag"]) == set(result["rows"])
    for g in result["lag"].values():
        assert g["window"] == 4  # --lag-window 40 is cut to the run's 4 iterations
        # the worst channel of the sum is at most the sum of the parts' worst channels
        assert g["misfit"] <= g["before"] + g["lag"] + g["noise"] + 1e-4
        assert 0 <= g["jump_median"] <= g["jump_max"] and g["jump_last"] <= g["jump_max"]
        for k in ("acc_running", "acc_means_recomputed", "acc_vars_recomputed"):
            assert 0.0 <= g[k] <= 1.0
    assert "| DDPNOpt (projected feedback) | " in md.split("Why the running means")[1]
    # only the feedback columns are attributed; each of the three steps is a real, other one
    assert list(result["attribution"]) == ["DDPNOpt (projected feedback)",
                                           "DDPNOpt (unprojected feedback)"]
    for parts in result["attribution"].values():
        assert set(parts) == {"off", "projected", "unprojected"}
        for g in parts.values():
            assert 0 <= g["jump_median"] <= g["jump_max"] and g["step_norm_median"] > 0
            assert g["logit_change_median"] > 0 and g["loss_after_median"] > 0
        assert len({json.dumps(g) for g in parts.values()}) == 3
    assert all(f"| feedback {k} |" in md for k in ("off", "projected", "unprojected"))


def test_decompose_splits_the_running_mean_misfit_exactly() -> None:
    """A running mean's misfit to the final weights' population mean is the sum of the
    part averaged before the window, the lag and the noise, per channel, when the batch
    means are the ones BatchMeans recorded from real training forwards."""
    experiment_module("ddpnopt_table")
    probe = experiment_module("dgnopt_batchnorm")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    data = [(torch.randn(8, 1, 7, 7) + 0.5, torch.zeros(8)) for _ in range(9)]
    pop_batches = data[6:]
    record = probe.BatchMeans(model)
    model(data[0][0]).sum().backward()  # before any start_forward: not recorded
    assert record.forwards == []
    start = [m.running_mean.clone() for m in record.layers]
    snapshots = []
    for x, _ in data[1:6]:
        snapshots.append(copy.deepcopy(model.state_dict()))
        record.start_forward()
        model(x).sum().backward()
        with torch.no_grad():  # a step: the weights move between training forwards
            model[0].weight.add_(0.3 * torch.randn_like(model[0].weight))
            model[3].weight.add_(0.3 * torch.randn_like(model[3].weight))
    record.close()
    assert len(record.forwards) == 5 and all(len(f) == 2 for f in record.forwards)
    pops = []
    for state in snapshots:
        past = copy.deepcopy(model)
        past.load_state_dict(state)
        pops.append(probe.population(past, pop_batches)[0])
    final = probe.population(model, pop_batches)[0]
    parts = probe.decompose(start, record.forwards, pops, final, 0.1)
    for i, layer in enumerate(record.layers):
        total = parts["before"][i] + parts["lag"][i] + parts["noise"][i]
        torch.testing.assert_close(total, layer.running_mean - final[i], atol=1e-6, rtol=0)
        assert parts["lag"][i].abs().max() > 1e-3  # the weights moved: a real lag term


def test_running_misfit_is_nil_for_statistics_recomputed_on_the_same_batches() -> None:
    experiment_module("ddpnopt_table")
    probe = experiment_module("dgnopt_batchnorm")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    batches = [(3.0 * torch.randn(8, 1, 7, 7) + 1.0, torch.zeros(8)) for _ in range(3)]
    torch.optim.swa_utils.update_bn(batches, model)
    nil = probe.running_misfit(model, iter(batches), 3)
    assert nil["mean_shift_sd"] < 1e-5
    assert abs(nil["var_ratio_min"] - 1) < 1e-5 and abs(nil["var_ratio_max"] - 1) < 1e-5
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # twice the scale: the first layer's population var x4
        model[0].bias.mul_(2.0)
    scaled = probe.running_misfit(model, iter(batches), 3)
    assert abs(scaled["var_ratio_min"] - 0.25) < 1e-3  # running var is now a quarter of it
    assert abs(scaled["var_ratio_max"] - 1) < 1e-4  # the second BN is blind to the scale
