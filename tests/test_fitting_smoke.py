"""Smoke test of experiments/fitting.py: ``--quick`` fits both datasets with the five
optimizers and writes the harness's files plus the trajectory plots.

Not a result: 1 seed, a half-second budget per optimizer, 16 spirals and the 7 LASA demos.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = {"adam", "sgd", "snopt", "kfac", "newton-cg"}


def _numbers(value: Any) -> list[float]:
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [x for item in items for x in _numbers(item)]


def test_fitting_quick_writes_results_and_trajectory_plots_of_both_datasets(
        tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(ROOT / "experiments" / "fitting.py"), "--quick",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=180, capture_output=True)

    for task in ("fitting-spirals", "fitting-lasa"):
        folder = tmp_path / task
        for name in ("results.md", "summary.json", "curves.png", "trajectory.png"):
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, (task, name)
        csvs = sorted((folder / "runs").glob("*.csv"))
        assert {p.name for p in csvs} == {f"{n}_seed0.csv" for n in OPTIMIZERS}
        with open(csvs[0]) as fh:
            rows = list(csv.DictReader(fh))
        assert {"test_mse", "extrap_mse", "train_mse", "test_loss"} <= set(rows[0])
        assert all(float(r["test_mse"]) == float(r["test_loss"]) for r in rows)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["metric"] == "test_mse" and summary["higher_is_better"] is False
        assert set(summary["optimizers"]) == OPTIMIZERS
        for name, result in summary["optimizers"].items():
            assert result["steps_mean"] >= 1 and result["nfe_forward_mean"] > 0, name
            numbers = _numbers(result)
            assert numbers and all(math.isfinite(x) for x in numbers), (task, name, result)
