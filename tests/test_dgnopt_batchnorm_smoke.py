"""Smoke test of experiments/dgnopt_batchnorm.py: a few iterations, every accuracy written."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import experiment_module, run_experiment
from torch import nn


def test_dgnopt_batchnorm_quick_writes_three_accuracies_per_column(tmp_path: Path) -> None:
    run_experiment("dgnopt_batchnorm.py", "--iterations", "4", "--eval-every", "2",
                   "--recalibrate", "2", "--out", str(tmp_path), timeout=300)
    result = json.loads((tmp_path / "summary.json").read_text())
    assert set(result["rows"]) == {"DDPNOpt (feedback on)", "EKFAC (feedback off)"}
    for rows in result["rows"].values():
        assert [r["iteration"] for r in rows] == [2, 4]
        for r in rows:
            assert 0.0 <= r["running"] <= 1.0 and 0.0 <= r["batch"] <= 1.0
            assert 0.0 <= r["recalibrated"] <= 1.0 and r["train_loss"] > 0
            assert r["mean_shift_sd"] >= 0 and 0 < r["var_ratio_min"] <= r["var_ratio_max"]
            assert r["conv_weight_norm"] > 0
    assert "| EKFAC (feedback off) | 4 |" in (tmp_path / "results.md").read_text()


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
