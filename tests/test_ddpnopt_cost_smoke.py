"""Smoke test of experiments/ddpnopt_cost.py: the quick run writes a complete, finite table.

Not a timed test: the numbers are not checked, only that every column ran and was measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_experiment

from ocnode.training import memory


def test_ddpnopt_cost_quick_measures_every_column_on_both_nets(tmp_path: Path) -> None:
    run_experiment("ddpnopt_cost.py", "--quick", "--out", str(tmp_path), timeout=120)

    summary = json.loads((tmp_path / "summary.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert [(c["net"], c["batch"]) for c in summary["cases"]] == [("fcn", 8), ("cnn", 8)]
    expected = {"fcn": {"Adam", "EKFAC", "DDPNOpt-RMS", "DDPNOpt-EKFAC", "vanilla DDP"},
                "cnn": {"Adam", "EKFAC", "DDPNOpt-RMS", "DDPNOpt-EKFAC"}}
    for case in summary["cases"]:
        assert set(case["columns"]) == expected[case["net"]]
        for col in case["columns"].values():
            assert len(col["ms"]) == summary["rounds"] == 3
            assert all(math.isfinite(ms) and ms > 0 for ms in col["ms"])
            mib = col["peak_rss_growth_mib"]
            assert (mib is None) == (not memory.supported())
        assert f"| {case['net']} ({case['dataset']}) | 8 |" in md


def test_ddpnopt_cost_runs_the_dgnopt_columns_on_the_residual_nets_only(tmp_path: Path) -> None:
    run_experiment("ddpnopt_cost.py", "--quick", "--nets", "resmlp", "--out", str(tmp_path),
                   timeout=120)

    summary = json.loads((tmp_path / "summary.json").read_text())
    [case] = summary["cases"]
    assert (case["net"], case["dataset"]) == ("resmlp", "digits")
    # DDPNOpt itself refuses a net with skips: on it the chain treatment is DGNOpt's
    assert set(case["columns"]) == {"Adam", "EKFAC", "DDPNOpt-chain", "DGNOpt-FNE",
                                    "DGNOpt-GR"}
    for col in case["columns"].values():
        assert all(math.isfinite(ms) and ms > 0 for ms in col["ms"])
    md = (tmp_path / "results.md").read_text()
    assert "| resmlp (digits) | 8 |" in md and "| DGNOpt-GR |" in md
