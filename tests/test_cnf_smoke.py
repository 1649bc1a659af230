"""Smoke test of experiments/cnf.py: ``--quick`` trains every optimizer and writes its files.

Not a result: one seed, a fraction of a second per optimizer, a tiny flow on 512 points.
"""

from __future__ import annotations

import math
from pathlib import Path

from conftest import check_comparison, run_experiment

OPTIMIZERS = ("adam", "sgd", "snopt", "kfac", "newton-cg")


def test_cnf_quick_writes_results_density_plot_and_finite_numbers(tmp_path: Path) -> None:
    run_experiment("cnf.py", "--quick", "--out", str(tmp_path), timeout=120)

    folder = tmp_path / "cnf-circles"
    summary = check_comparison(folder, OPTIMIZERS)
    assert summary["metric"] == "test_nll" and summary["higher_is_better"] is False
    assert (folder / "density.png").stat().st_size > 0
    assert sorted(p.name for p in (folder / "runs").glob("*.csv")) == sorted(
        f"{name}_seed0.csv" for name in OPTIMIZERS)
    for name, result in summary["optimizers"].items():
        # a 2-D density in standardised units: the NLL is a few nats, not a blow-up
        assert math.isfinite(result["final_mean"]) and 0 < result["final_mean"] < 10, name
