"""Smoke tests of experiments/bench_solvers.py and bench_gradients.py: the quickest cases run
and write their files."""

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


def test_bench_gradients_quick_writes_the_three_modes(tmp_path: Path) -> None:
    run_experiment("bench_gradients.py", "--quick", "--cases", "fit-rk4", "--out", str(tmp_path))

    [record] = json.loads((tmp_path / "bench_gradients.json").read_text())["records"]
    assert (tmp_path / "bench_gradients.md").is_file()
    assert set(record["ms"]) == {"backprop", "checkpoint", "adjoint"}
    assert all(math.isfinite(v) and v > 0 for v in record["ms"].values())
    forward, backward = record["nfe"]["checkpoint"]
    assert forward > 0 and backward > 0  # the replay evaluates the field again
    assert record["nfe"]["backprop"][1] == 0
