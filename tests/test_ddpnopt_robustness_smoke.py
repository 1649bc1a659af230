"""Smoke test of experiments/ddpnopt_robustness.py: the quick run writes complete, finite
outputs over the expected 2 x 2 corner of each grid, and its report can be rebuilt from the
summary; and the win/tie/loss rule, the trend statistic and the blow-up test behave as
documented.

Not a timed test and not the paper's numbers: one seed, a dozen iterations.
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT, run_experiment

#: the quick run's corner of each grid: base -> (second key, learning rates, its values).
QUICK_GRID = {"sgd": ("momentum", ["0.1", "0.3"], ["0", "0.5"]),
              "rmsprop": ("weight_decay", ["0.001", "0.003"], ["0", "0.0001"])}


def _script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """experiments/ddpnopt_robustness.py as a module (it imports its sibling ddpnopt_table,
    so experiments/ goes on the path, as it is when the script runs)."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    return sys.modules.get("ddpnopt_robustness") or importlib.import_module(
        "ddpnopt_robustness")


def _check_run(run: dict, iterations: int) -> None:
    assert 0.0 <= run["test_acc"] <= 1.0
    curve = run["curve"]
    assert curve[0][0] == 0 and all(0.0 <= acc <= 1.0 for _, acc in curve)
    if run["diverged"]:
        assert curve[-1][0] == run["diverged_at"] == run["iterations_run"]
    else:
        assert curve[-1][0] == run["iterations_run"] == iterations
        assert math.isfinite(run["tail_loss"]) and run["step_ms_median"] > 0


def test_ddpnopt_robustness_quick_writes_complete_finite_outputs(tmp_path: Path) -> None:
    run_experiment("ddpnopt_robustness.py", "--quick", "--out", str(tmp_path), timeout=120)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert "ddpnopt_robustness.py --quick" in summary["command"]
    assert summary["machine"]["cpu_count"] >= 1 and summary["seeds"] == [0]
    assert sorted(summary["datasets"]) == ["digits", "mnist5k"]
    for name, d in summary["datasets"].items():
        assert sorted(d["bases"]) == sorted(QUICK_GRID) and d["iterations"] == 12
        for base, (key, lrs, values) in QUICK_GRID.items():
            block = d["bases"][base]
            assert block["key"] == key and sorted(block["cells"]) == lrs
            assert f"## {name}, base {base} " in md and f"| lr \\ {key} | 0 |" in md
            assert sum(block["counts"].values()) == 4
            for lr in lrs:
                assert sorted(block["cells"][lr]) == values
                for v, cell in block["cells"][lr].items():
                    assert cell["lr"] == float(lr) and cell[key] == float(v)
                    [run] = cell["runs"]
                    for arm in ("DDPNOpt", "base"):
                        _check_run(run[arm], d["iterations"])
                        assert cell[arm]["test_acc"] == [run[arm]["test_acc"]]
                    diff = 100 * (run["DDPNOpt"]["test_acc"] - run["base"]["test_acc"])
                    assert math.isclose(cell["diff_pp"], diff, abs_tol=1e-9)
                    assert cell["diff_sd_pp"] == 0.0  # one seed
                    assert cell["verdict"] == ("win" if diff > 0 else "lose" if diff < 0
                                               else "tie")

    # the report alone, from the summary: the same results.md
    run_experiment("ddpnopt_robustness.py", "--report-from", str(tmp_path), "--out",
                   str(tmp_path / "again"), timeout=60)
    assert (tmp_path / "again" / "results.md").read_text() == md
    assert (tmp_path / "again" / "heatmap.png").stat().st_size > 0


def test_verdict_and_trend_follow_the_documented_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script(monkeypatch)

    assert [script.verdict(m, 1.0) for m in (1.5, 1.0, 0.0, -1.0, -1.5)] == [
        "win", "tie", "tie", "tie", "lose"]
    lrs = [0.01, 0.1, 1.0]
    cells = {f"{lr:g}": {"0": {"diff_pp": d}, "0.9": {"diff_pp": d + 2}}
             for lr, d in zip(lrs, [-3.0, 0.0, 5.0])}
    trend = script.trend(cells, lrs)
    assert trend["row_mean_pp"] == [-2.0, 1.0, 6.0] and trend["spearman_lr"] == 1.0
    falling = script.trend({k: {"0": {"diff_pp": -statistics.fmean(
        c["diff_pp"] for c in row.values())}} for k, row in cells.items()}, lrs)
    assert falling["spearman_lr"] == -1.0
    assert script.spearman([1.0, 2.0], [3.0, 4.0]) is None
    run = {"diverged": False, "tail_loss": math.log(10) - 1e-3}
    assert not script.blew_up(run, 10)
    assert script.blew_up({**run, "tail_loss": math.log(10)}, 10)
    assert script.blew_up({"diverged": True, "tail_loss": None}, 10)
