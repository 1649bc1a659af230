"""Smoke test of experiments/dgnopt_batchnorm.py: a few iterations, every accuracy written."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_experiment


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
    assert "| EKFAC (feedback off) | 4 |" in (tmp_path / "results.md").read_text()
