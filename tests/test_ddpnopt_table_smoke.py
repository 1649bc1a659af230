"""Smoke test of experiments/ddpnopt_table.py: the quick run writes a complete, finite table.

Not a timed test and not the paper's numbers: one seed, a dozen iterations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import experiment_module, run_experiment

COLUMNS = ["SGD-m", "RMSprop", "Adam", "EKFAC", "E-MSA", "DDPNOpt", "DDPNOpt-Adam",
           "DDPNOpt-bounded"]


def test_ddpnopt_table_quick_writes_complete_finite_outputs(tmp_path: Path) -> None:
    run_experiment("ddpnopt_table.py", "--quick", "--out", str(tmp_path), timeout=300)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    # asked for every column but vanilla DDP; an FCN row runs the paper's columns only
    assert summary["columns"] == COLUMNS + ["DGNOpt-FNE", "DGNOpt-GR"]
    assert sorted(summary["datasets"]) == ["digits", "mnist5k", "wine"]
    # --quick skips the grid, and the report must not claim one
    assert "not tuned: the middle rate of each grid" in md and "grid on seed" not in md
    for name, d in summary["datasets"].items():
        paper = {"mnist5k": "paper: MNIST"}.get(name, "paper")
        assert f"| {name} (ours) |" in md and f"| {name} ({paper}) |" in md
        assert sorted(d["results"]) == sorted(COLUMNS)
        for col in COLUMNS:
            r = d["results"][col]
            assert len(r["test_acc"]) == len(d["seeds"]) == 1
            assert all(0.0 <= a <= 1.0 for a in r["test_acc"])
            assert math.isfinite(r["mean"]) and math.isfinite(r["sd"])
            assert math.isfinite(r["step_ms_median"]) and r["step_ms_median"] > 0
            assert d["lr"][col] > 0
            [curve] = r["curves"]
            assert curve[0][0] == 0 and curve[-1][0] == d["iterations"]
            assert all(math.isfinite(acc) for _, acc in curve)


def test_ddpnopt_table_cnn_row_runs_its_own_columns_with_the_ekfac_base(tmp_path: Path) -> None:
    run_experiment("ddpnopt_table.py", "--quick", "--datasets", "cnn-mnist5k", "--iterations",
                   "2", "--out", str(tmp_path), timeout=300)

    d = json.loads((tmp_path / "summary.json").read_text())["datasets"]["cnn-mnist5k"]
    assert d["model"] == "cnn" and d["dataset"] == "mnist5k" and d["batch"] == 128
    assert d["ddpnopt_base"] == "ekfac"
    # the CNN row leaves out DDPNOpt-Adam; its DDPNOpt columns take EKFAC's grid, narrowed
    # (by --quick to one rate); E-MSA's rho keeps its whole grid
    assert sorted(d["results"]) == sorted(["SGD-m", "RMSprop", "Adam", "EKFAC", "E-MSA",
                                           "DDPNOpt", "DDPNOpt-bounded"])
    assert d["grid"]["DDPNOpt"] == d["grid"]["EKFAC"] != d["grid"]["RMSprop"]
    assert len(d["grid"]["EKFAC"]) == 1 and len(d["grid"]["E-MSA"]) == 6
    for r in d["results"].values():
        assert [step for step, _ in r["curves"][0]] == [0, 2]
        assert 0.0 <= r["mean"] <= 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| cnn-mnist5k (paper: CNN MNIST) | 10 | – | 97.94 |" in md


def test_ddpnopt_table_residual_row_runs_ddpnopt_as_dgnopt_chain(tmp_path: Path) -> None:
    table = experiment_module("ddpnopt_table")
    cfg = table.DATASETS["resmlp-digits"]
    specs = table.column_specs(cfg)
    assert specs["DDPNOpt"] == ("dgnopt", {"base": "rmsprop", "mode": "chain"})
    assert specs["RMSprop"] == ("dgnopt", {"base": "rmsprop", "feedback": False,
                                           "mode": "chain"})
    assert specs["DGNOpt-GR"] == ("dgnopt", {"base": "rmsprop", "mode": "gr"})
    assert table.column_specs(table.DATASETS["digits"])["DDPNOpt"][0] == "ddpnopt"

    run_experiment("ddpnopt_table.py", "--quick", "--datasets", "resmlp-digits",
                   "--iterations", "2", "--out", str(tmp_path), timeout=300)
    d = json.loads((tmp_path / "summary.json").read_text())["datasets"]["resmlp-digits"]
    assert d["model"] == "resmlp" and sorted(d["results"]) == sorted(
        ["SGD-m", "RMSprop", "Adam", "EKFAC", "E-MSA", "DDPNOpt", "DGNOpt-FNE", "DGNOpt-GR"])
    assert all(0.0 <= r["mean"] <= 1.0 for r in d["results"].values())
    assert "resmlp-digits (paper" not in (tmp_path / "results.md").read_text()


def test_ddpnopt_table_vanilla_ddp_column_runs_on_the_fcn_rows_only_when_asked(
        tmp_path: Path) -> None:
    run_experiment("ddpnopt_table.py", "--quick", "--datasets", "wine,mnist5k,resmlp-digits",
                   "--iterations", "2", "--columns", "Adam,vanilla DDP", "--out", str(tmp_path),
                   timeout=300)
    rows = json.loads((tmp_path / "summary.json").read_text())["datasets"]
    # the FCNs, a 784-input one too (its first layer solved in the row space)
    for row in ("wine", "mnist5k"):
        assert sorted(rows[row]["results"]) == ["Adam", "vanilla DDP"]
        vanilla = rows[row]["results"]["vanilla DDP"]
        assert 0.0 <= vanilla["mean"] <= 1.0 and vanilla["step_ms_median"] > 0
        assert rows[row]["lr"]["vanilla DDP"] == 1.0  # the middle of its damping grid
    assert sorted(rows["resmlp-digits"]["results"]) == ["Adam"]  # not a chain of Linears


def test_ddpnopt_table_a_diverging_column_stops_without_ending_the_run() -> None:
    table = experiment_module("ddpnopt_table")
    task = table.make("wine", 32)
    # SGD with a NaN rate makes the weights NaN at its first step; Adam beside it goes on
    res = table.train_seed(task, 0, {"SGD-m": float("nan"), "Adam": 1e-3}, 12, 4,
                           ["SGD-m", "Adam"])
    sgd, adam = res["SGD-m"], res["Adam"]
    assert sgd["diverged_at"] is not None and sgd["diverged_at"] < 12
    assert sgd["tail_loss"] == float("inf")
    assert adam["diverged_at"] is None and adam["tail_loss"] < float("inf")
    assert [step for step, _ in adam["curve"]] == [0, 4, 8, 12]
    assert [step for step, _ in sgd["curve"]] == [0, 4, 8, 12]  # still evaluated


def test_batchnorm_recalibration_changes_the_evaluation_not_the_training() -> None:
    """``--bn-recalibrate``: the accuracy is measured on a recalibrated copy, so the training
    (losses, weights) is the run without it, while BatchNorm's statistics differ."""
    table = experiment_module("ddpnopt_table")
    task = table.make("resnet-mnist5k", 16)
    lrs = {"SGD-m": 0.1}
    plain = table.train_seed(task, 0, lrs, 6, 3, ["SGD-m"])
    recal = table.train_seed(task, 0, lrs, 6, 3, ["SGD-m"], recalibrate=2)
    assert recal["SGD-m"]["tail_loss"] == plain["SGD-m"]["tail_loss"]
    assert [it for it, _ in recal["SGD-m"]["curve"]] == [0, 3, 6]
    assert recal["SGD-m"]["curve"] != plain["SGD-m"]["curve"]  # other statistics, other scores


def test_ddpnopt_table_rates_skip_the_grid_and_are_reported_as_given(tmp_path: Path) -> None:
    table = experiment_module("ddpnopt_table")
    assert table.parse_rates("E-MSA=0.3, Adam=3e-3") == {"E-MSA": 0.3, "Adam": 0.003}
    for bad in ("E-MSA", "E-MSA=x", "Adam=-1"):
        with pytest.raises(SystemExit, match="COLUMN=RATE"):
            table.parse_rates(bad)
    run_experiment("ddpnopt_table.py", "--datasets", "wine", "--columns", "SGD-m,E-MSA",
                   "--rates", "SGD-m=0.05,E-MSA=2.0", "--seeds", "0", "--iterations", "4",
                   "--out", str(tmp_path), timeout=300)
    d = json.loads((tmp_path / "summary.json").read_text())["datasets"]["wine"]
    assert d["tuning"] == {"chosen": {"SGD-m": 0.05, "E-MSA": 2.0}, "given": True}
    assert "not tuned: given by --rates" in (tmp_path / "results.md").read_text()


def test_ddpnopt_table_grid_replaces_a_columns_grid_and_is_tuned_over(tmp_path: Path) -> None:
    table = experiment_module("ddpnopt_table")
    assert table.parse_values("E-MSA=10:30, Adam=3e-3", "--grid") == {
        "E-MSA": [10.0, 30.0], "Adam": [0.003]}
    for bad in ("E-MSA=", "E-MSA=1:x", "E-MSA=1:-2"):
        with pytest.raises(SystemExit, match="COLUMN=RATE"):
            table.parse_values(bad, "--grid")
    with pytest.raises(SystemExit, match="use --grid"):
        table.parse_rates("E-MSA=1:2")
    with pytest.raises(SystemExit, match="both name"):
        table.main(["--rates", "E-MSA=1", "--grid", "E-MSA=1:2"])
    run_experiment("ddpnopt_table.py", "--datasets", "wine", "--columns", "SGD-m,E-MSA",
                   "--grid", "E-MSA=2.0:20.0", "--seeds", "0", "--iterations", "4",
                   "--out", str(tmp_path), timeout=300)
    d = json.loads((tmp_path / "summary.json").read_text())["datasets"]["wine"]
    assert d["grid"]["E-MSA"] == [2.0, 20.0]
    assert set(d["tuning"]["tail_loss"]["E-MSA"]) == {"2.0", "20.0"}
    assert d["tuning"]["chosen"]["E-MSA"] in (2.0, 20.0)
    assert len(d["grid"]["SGD-m"]) > 2  # the other column keeps its own grid


def test_ddpnopt_table_tune_only_reports_the_grid_and_runs_no_seed(tmp_path: Path) -> None:
    run_experiment("ddpnopt_table.py", "--datasets", "wine", "--columns", "SGD-m",
                   "--grid", "SGD-m=0.01:0.1", "--tune-only", "--iterations", "4",
                   "--out", str(tmp_path), timeout=300)
    d = json.loads((tmp_path / "summary.json").read_text())["datasets"]["wine"]
    assert d["seeds"] == [] and d["results"] == {}
    losses = d["tuning"]["tail_loss"]["SGD-m"]
    assert set(losses) == {"0.01", "0.1"}
    assert d["lr"]["SGD-m"] == min((0.01, 0.1), key=lambda r: losses[str(r)])
    report = (tmp_path / "results.md").read_text()
    assert "wine, SGD-m: tuning-seed tail loss per rate: 0.01: " in report
    assert (tmp_path / "curves.png").stat().st_size > 0
    table = experiment_module("ddpnopt_table")
    with pytest.raises(SystemExit, match="excludes --rates"):
        table.main(["--tune-only", "--rates", "SGD-m=0.1"])
