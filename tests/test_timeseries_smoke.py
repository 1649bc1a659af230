"""Smoke test of experiments/timeseries.py: ``--quick`` trains the five optimizers and writes
the harness's files.

Not a result: 1 seed, a half-second budget per optimizer on a JapaneseVowels subset.
"""

from __future__ import annotations

from pathlib import Path

from conftest import check_comparison, run_experiment

OPTIMIZERS = ("adam", "sgd", "snopt", "kfac", "newton-cg")


def test_timeseries_quick_writes_results_of_every_optimizer_with_finite_numbers(
        tmp_path: Path) -> None:
    run_experiment("timeseries.py", "--quick", "--out", str(tmp_path), timeout=180)
    summary = check_comparison(tmp_path / "timeseries-JapaneseVowels", OPTIMIZERS)
    assert summary["metric"] == "test_acc"
    for name, result in summary["optimizers"].items():
        assert 0 <= result["final_mean"] <= 1, name
