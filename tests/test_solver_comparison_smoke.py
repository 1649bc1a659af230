"""Smoke test of ``ocnode solvers`` (:mod:`ocnode.workprecision`): a quick run on the linear
problem, and the NFE-during-training part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _ocnode_solvers(*args: str, timeout: float = 90) -> str:
    """Run ``python -m ocnode solvers ARGS`` from the repository root, one thread; its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "ocnode", "solvers", *args], cwd=ROOT, env=env,
                          timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, f"ocnode solvers failed:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def test_solver_comparison_quick_linear_writes_a_consistent_study(tmp_path: Path) -> None:
    _ocnode_solvers("--quick", "--problems", "linear", "--methods", "dopri5,rk4_classic",
                    "--out", str(tmp_path))

    result = json.loads((tmp_path / "solver_comparison.json").read_text())
    assert (tmp_path / "solver_comparison.md").is_file()
    png = tmp_path / "solver_comparison_linear.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = result["problems"]["linear"]["points"]
    for engine in ("ocnode", "torchdiffeq"):
        sweep = sorted((p for p in points if p["method"] == "dopri5" and p["engine"] == engine),
                       key=lambda p: -p["tol"])
        # a point predicted to take over MAX_SOLVE_S is skipped (a slow burst of the machine
        # can do that to the tightest one); none fails
        assert len(sweep) == 3 and all(p["status"] in ("ok", "skipped") for p in sweep)
        ok = [p for p in sweep if p["status"] == "ok"]
        assert len(ok) >= 2 and ok == sweep[:len(ok)]
        errors, nfes = [p["error"] for p in ok], [p["nfe"] for p in ok]
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
        assert all(a < b for a, b in zip(nfes, nfes[1:])), nfes
        assert all(p["wall_s"] > 0 for p in ok)
    rk4 = [p for p in points if p["method"] == "rk4_classic"]
    assert rk4 and {p["engine"] for p in rk4} == {"ocnode"}  # torchdiffeq has no classic rk4
    assert all(p["status"] == "ok" and p["error"] >= 0 for p in rk4)


def test_solver_comparison_nfe_during_training_trains_through_the_core(tmp_path: Path) -> None:
    _ocnode_solvers("--nfe-during-training", "--quick", "--out", str(tmp_path))

    result = json.loads((tmp_path / "solver_comparison_training.json").read_text())
    assert (tmp_path / "solver_comparison_training.png").stat().st_size > 0
    log = result["log"]
    assert [r["iter"] for r in log] == list(range(result["settings"]["iters"]))
    assert all(r["nfe_forward"] > 0 and r["nfe_backward"] == 0 for r in log)  # backprop
    assert all(r["loss"] > 0 and r["seconds"] > 0 for r in log)


def test_ocnode_solvers_help_lists_the_study_flags() -> None:
    out = _ocnode_solvers("--help", timeout=60)
    assert "--nfe-during-training" in out and "--problems" in out
