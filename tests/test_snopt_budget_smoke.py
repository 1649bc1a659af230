"""Smoke tests of experiments/bench_refresh.py and experiments/snopt_budget.py (quick runs)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_experiment


def test_bench_refresh_quick_times_every_mode_and_the_stage_refresh_adds_no_evaluation(
        tmp_path: Path) -> None:
    run_experiment("bench_refresh.py", "--quick", "--configs", "user-mlp", "--out",
                   str(tmp_path))
    result = json.loads((tmp_path / "bench_refresh.json").read_text())
    assert (tmp_path / "bench_refresh.md").is_file()
    [rec] = result["timing"]
    stages, grid = rec["snopt-stages"], rec["snopt-grid"]
    assert rec["adam_ms"] > 0 and stages["refresh_ms"] > 0 and grid["refresh_ms"] > 0
    # the stage curvature reads the adjoint's own evaluations; the grid evaluates again
    assert stages["nfe_refresh"] == rec["nfe_adam"]
    assert all(b > a_b for (_, b), (_, a_b) in zip(grid["nfe_refresh"], rec["nfe_adam"]))
    assert {m["mode"] for m in result["memory"]} == {"adam", "snopt-stages", "snopt-grid"}


def test_snopt_budget_quick_runs_the_baselines_and_a_variant(tmp_path: Path) -> None:
    run_experiment("snopt_budget.py", "--quick", "--variants", "snopt-grid", "--no-memory",
                   "--out", str(tmp_path))
    summary = json.loads((tmp_path / "budget-mnist5k" / "summary.json").read_text())
    assert set(summary["optimizers"]) == {"adam", "sgd", "kfac", "snopt", "snopt-grid"}
    assert summary["hparams"]["snopt-grid"]["curvature"] == "grid"
    assert summary["hparams"]["snopt"]["curvature"] == "stages"
