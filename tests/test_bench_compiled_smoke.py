"""Smoke test of experiments/bench_compiled.py: a quick run of one case with inductor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_experiment


@pytest.mark.compiler
def test_bench_compiled_quick_writes_every_contender(tmp_path: Path) -> None:
    run_experiment("bench_compiled.py", "--quick", "--cases", "mlp-fwd", "--out", str(tmp_path),
                   timeout=300)
    result = json.loads((tmp_path / "bench_compiled.json").read_text())
    (case,) = result["results"]
    rows = case["rows"]
    assert {"torchdiffeq", "ours", "ours-compiled"} <= set(rows)
    assert "torchode" in rows or "torchode" in case["failed"]  # optional: run, or say why not
    # the same method and tolerance: every engine with per-solve step control does equal work
    assert rows["ours"]["nfe"] == rows["ours-compiled"]["nfe"] == rows["torchdiffeq"]["nfe"]
    assert all(row["median_ms"] > 0 and len(row["times_ms"]) == 3 for row in rows.values())
    assert "| mlp-fwd | ours-compiled |" in (tmp_path / "bench_compiled.md").read_text()
