"""Smoke test of experiments/bench_solvers.py: the quickest case runs and writes its files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_solvers_quick_writes_finite_positive_timings(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, str(ROOT / "experiments" / "bench_solvers.py"), "--quick",
        "--cases", "mlp-fwd-1e-3", "--threads", "1", "--out", str(tmp_path),
    ]
    subprocess.run(cmd, check=True, env=env, timeout=120, capture_output=True)

    result = json.loads((tmp_path / "bench_solvers.json").read_text())
    assert (tmp_path / "bench_solvers.md").is_file()
    [record] = result["timing"]
    assert record["case"] == "mlp-fwd-1e-3"
    for key in ("ours_median_ms", "torchdiffeq_median_ms", "ratio"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert all(t > 0 for t in record["ours_ms"] + record["torchdiffeq_ms"])
    assert record["nfe_ours"] > 0 and record["nfe_torchdiffeq"] > 0
    assert result["memory"] == []
