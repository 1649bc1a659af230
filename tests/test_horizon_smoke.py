"""Smoke test of experiments/horizon.py: ``--quick`` runs the three policies and writes its files.

Not a result: 1 seed, 1 epoch on a 192-example subset of digits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_experiment


def test_horizon_quick_writes_three_policies_with_finite_numbers(tmp_path: Path) -> None:
    run_experiment("horizon.py", "--quick", "--out", str(tmp_path), "--run-dir",
                   str(tmp_path / "runs"), timeout=60)

    result = json.loads((tmp_path / "horizon.json").read_text())
    assert (tmp_path / "horizon.md").is_file() and (tmp_path / "horizon.png").is_file()
    t_min = result["settings"]["t1_min"]
    runs = result["runs"]
    assert sorted(r["policy"] for r in runs) == ["baseline", "feedback", "fixed"]
    for r in runs:
        assert math.isfinite(r["final_acc"]) and 0 <= r["final_acc"] <= 1, r["policy"]
        assert math.isfinite(r["final_t1"]) and r["final_t1"] >= t_min, r["policy"]
        assert r["inference_nfe_per_batch"] > 0 and r["train_wall_s"] > 0
    assert [r["final_t1"] for r in runs if r["policy"] == "fixed"] == [1.0]
    assert set(result["means"]) == {"fixed", "baseline", "feedback"}
