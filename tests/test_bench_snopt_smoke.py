"""Smoke test of experiments/bench_snopt.py: the quick digits timing runs and writes its files.

Not a timed test: it only checks that the script runs and reports finite positive numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_experiment


def _finite_positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_bench_snopt_quick_timing_on_digits_writes_finite_positive_numbers(
        tmp_path: Path) -> None:
    run_experiment("bench_snopt.py", "--quick", "--parts", "timing", "--datasets", "digits",
                   "--out", str(tmp_path))

    result = json.loads((tmp_path / "bench_snopt.json").read_text())
    assert (tmp_path / "bench_snopt.md").is_file()
    assert "memory" not in result and "tta" not in result
    [record] = result["timing"]
    assert record["dataset"] == "digits"
    for key in ("adam_median_ms", "snopt_nonrefresh_median_ms", "snopt_refresh_median_ms",
                "snopt_amortised_ms", "ratio_nonrefresh", "ratio_refresh", "ratio_amortised"):
        assert _finite_positive(record[key]), key
    assert record["n_nonrefresh"] > 0 and record["n_refresh"] > 0
    assert all(_finite_positive(r["snopt_ms"]) and _finite_positive(r["adam_ms"])
               for r in record["rows"])
    # a fixed-step solver: both optimizers take the same forward NFE
    assert {f for f, _ in record["nfe_snopt"]} == {f for f, _ in record["nfe_adam"]}
    assert _finite_positive(record["refresh_profile"]["wall_s"])
    assert record["refresh_profile"]["top_cumulative"]
