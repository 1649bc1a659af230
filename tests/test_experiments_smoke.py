"""Smoke test of experiments/bench_solvers.py: the quickest case runs and writes its files."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_experiment


def test_bench_solvers_quick_writes_finite_positive_timings(tmp_path: Path) -> None:
    run_experiment("bench_solvers.py", "--quick", "--cases", "mlp-fwd-1e-3", "--threads", "1",
                   "--out", str(tmp_path))

    result = json.loads((tmp_path / "bench_solvers.json").read_text())
    assert (tmp_path / "bench_solvers.md").is_file()
    [record] = result["timing"]
    assert record["case"] == "mlp-fwd-1e-3"
    for key in ("ours_median_ms", "torchdiffeq_median_ms", "ratio"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert all(t > 0 for t in record["ours_ms"] + record["torchdiffeq_ms"])
    assert record["nfe_ours"] > 0 and record["nfe_torchdiffeq"] > 0
    assert result["memory"] == []
