"""Smoke test of experiments/solver_comparison.py: a quick run on the linear problem."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_experiment


def test_solver_comparison_quick_linear_writes_a_consistent_study(tmp_path: Path) -> None:
    run_experiment("solver_comparison.py", "--quick", "--problems", "linear", "--methods",
                   "dopri5,rk4", "--out", str(tmp_path), timeout=60)

    result = json.loads((tmp_path / "solver_comparison.json").read_text())
    assert (tmp_path / "solver_comparison.md").is_file()
    png = tmp_path / "solver_comparison_linear.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = result["problems"]["linear"]["points"]
    for engine in ("ocnode", "torchdiffeq"):
        sweep = sorted((p for p in points if p["method"] == "dopri5" and p["engine"] == engine),
                       key=lambda p: -p["tol"])
        assert len(sweep) >= 3 and all(p["status"] == "ok" for p in sweep)
        errors, nfes = [p["error"] for p in sweep], [p["nfe"] for p in sweep]
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
        assert all(a < b for a, b in zip(nfes, nfes[1:])), nfes
        assert all(p["wall_s"] > 0 for p in sweep)
    rk4 = [p for p in points if p["method"] == "rk4"]
    assert rk4 and {p["engine"] for p in rk4} == {"ocnode"}  # torchdiffeq has no classic rk4
    assert all(p["status"] == "ok" and p["error"] >= 0 for p in rk4)
