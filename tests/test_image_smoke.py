"""Smoke test of experiments/image.py: ``--quick`` trains every optimizer on mnist5k and
writes a complete comparison. Not a result: one seed, 1.5 s per run, an 8-channel model."""

from __future__ import annotations

from pathlib import Path

from conftest import check_comparison, run_experiment

OPTIMIZERS = ("adam", "sgd", "snopt", "kfac", "newton-cg")


def test_image_quick_compares_all_optimizers(tmp_path: Path) -> None:
    run_experiment("image.py", "--quick", "--out", str(tmp_path))
    summary = check_comparison(tmp_path / "image-mnist5k", OPTIMIZERS)
    accuracies = [o["final_mean"] for o in summary["optimizers"].values()]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    # K-FAC and Newton-CG backpropagate through the solver: no backward solve
    assert summary["optimizers"]["kfac"]["nfe_backward_mean"] == 0
    assert summary["optimizers"]["snopt"]["nfe_backward_mean"] > 0
