"""``ocnode train`` with SNOpt, K-FAC and an adaptive horizon; new flags and their errors."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest

from ocnode.data import load_dataset
from ocnode.optim import SNOpt
from ocnode.training import TrainConfig, build_optimizer, make_task
from ocnode.training.cli import build_parser, main
from ocnode.training.loop import CHECKPOINT
from ocnode.training.records import load_checkpoint

METRIC_COLUMNS = ("step", "epoch", "wall_time", "train_loss", "test_loss", "test_acc",
                  "nfe_forward", "nfe_backward", "lr", "t1")

# Tiny settings: 12 steps of 128 digits, two RK4 steps per solve, width 8.
TINY = ["--epochs", "1", "--width", "8", "--method", "rk4", "--step-size", "0.5",
        "--batch-size", "128", "--log-every", "3", "--lr", "0.02", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, *flags: str) -> list[dict[str, float]]:
    assert main(["train", "--out", str(out), *TINY, *flags]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert {"t1", "nfe_forward", "nfe_backward"} <= set(rows[0])
    values = [{k: float(v) for k, v in row.items()} for row in rows]
    assert all(math.isfinite(v) for row in values for v in row.values())
    return values


@pytest.mark.parametrize(("optimizer", "flags", "alpha"), [
    ("snopt", [], 0.75), ("snopt", ["--alpha", "1"], 1.0), ("kfac", [], 0.75)],
    ids=["snopt", "snopt-alpha-1", "kfac-through-the-solver"])
def test_snopt_and_kfac_runs_write_finite_metrics_with_horizon_and_nfe(
    tmp_path: Path, optimizer: str, flags: list[str], alpha: float
) -> None:
    rows = _train(tmp_path / optimizer, "--optimizer", optimizer, "--update-freq", "5",
                  "--eps", "0.1", *flags)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    # fixed horizon; rk4 with two steps: 8 evaluations; K-FAC through the solver
    # backpropagates through them (no vector-field call in the backward)
    assert all(r["t1"] == 1.0 and r["nfe_forward"] == 8 for r in rows)
    assert all((r["nfe_backward"] == 0) == (optimizer == "kfac") for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    saved = load_checkpoint(tmp_path / optimizer / CHECKPOINT)["optimizer"]
    group = saved["param_groups"][0]
    assert (group["alpha"], group["eps"]) == (alpha, 0.1)
    assert saved["state"]["snopt"]["step"] == 12
    # Without --full only the vector field's two layers are preconditioned.
    assert sum("basis_a" in st for k, st in saved["state"].items() if k != "snopt") == 2


def test_adaptive_feedback_horizon_moves_t1_and_respects_t1_min(tmp_path: Path) -> None:
    # A strong T^2 regulariser pulls T down by about t1_lr per update until the floor.
    rows = _train(tmp_path / "t1", "--optimizer", "snopt", "--update-freq", "5",
                  "--adaptive-t1", "feedback", "--t1-update-freq", "2", "--t1-reg", "1",
                  "--t1-lr", "0.1", "--t1-min", "0.75", "--log-every", "1")
    horizons = [r["t1"] for r in rows]
    assert horizons[0] == 1.0 and horizons[1] < 1.0  # first update after step 2
    assert all(b <= a for a, b in zip(horizons, horizons[1:])) and len(set(horizons)) > 2
    assert min(horizons) >= 0.75 and abs(horizons[-1] - 0.75) < 1e-6
    assert all(r["nfe_backward"] > 0 for r in rows)
    checkpoint = load_checkpoint(tmp_path / "t1" / CHECKPOINT)
    assert checkpoint["horizon"][0]["step"] == 12
    assert abs(float(checkpoint["model"]["ode.t1_tensor"]) - 0.75) < 1e-6


def test_adaptive_baseline_horizon_runs_with_adam(tmp_path: Path) -> None:
    rows = _train(tmp_path / "base", "--adaptive-t1", "baseline", "--t1-update-freq", "3",
                  "--t1-reg", "0.1")
    assert rows[-1]["t1"] < 1.0 and min(r["t1"] for r in rows) >= 0.1


def test_snopt_flags_reach_the_optimizer() -> None:
    args = vars(build_parser().parse_args([
        "train", "--optimizer", "snopt", "--eps", "0.03", "--alpha", "0.5", "--update-freq",
        "7", "--full", "--damping-mode", "tikhonov", "--curvature", "grid", "--observer-dt",
        "0.02", "--fisher", "true", "--momentum", "0.9"]))
    args.pop("command")
    config = TrainConfig(**args)
    config.validate()
    model = make_task(load_dataset("digits"), config.task_settings()).build_model(True)
    opt = build_optimizer("snopt", model, config.hparams({"eps", "alpha", "update_freq", "full",
                                                          "damping_mode", "observer_dt",
                                                          "fisher", "momentum",
                                                          "curvature"}))
    assert isinstance(opt, SNOpt)
    group = opt.param_groups[0]
    assert (group["eps"], group["alpha"], group["momentum"]) == (0.03, 0.5, 0.9)
    assert (opt.update_freq, opt.full, opt.damping_mode, opt.observer_dt, opt.fisher) == (
        7, True, "tikhonov", 0.02, "true")
    assert opt.collector.curvature == "grid"
    assert len(opt.preconditioned_layers) == 4  # 2 in the vector field + stem + head


def test_the_stage_curvature_is_the_default_and_takes_its_factor_cost() -> None:
    args = vars(build_parser().parse_args(["train", "--optimizer", "snopt", "--factor-cost",
                                           "0.5"]))
    args.pop("command")
    config = TrainConfig(**args)
    config.validate()
    model = make_task(load_dataset("digits"), config.task_settings()).build_model(True)
    opt = build_optimizer("snopt", model, config.hparams({"factor_cost", "curvature"}))
    assert (opt.collector.curvature, opt.collector.factor_cost) == ("stages", 0.5)


@pytest.mark.system_data
def test_fashion_mnist_conv_model_trains_from_the_command_line(tmp_path: Path) -> None:
    rows = _train(tmp_path / "fmnist", "--dataset", "fashion-mnist", "--model", "conv",
                  "--train-size", "256", "--width", "4", "--log-every", "100")
    assert rows[-1]["step"] == 2  # 256 stratified images in batches of 128
    saved = load_checkpoint(tmp_path / "fmnist" / CHECKPOINT)
    assert saved["config"]["train_size"] == 256
    assert saved["model"]["1.stem.0.weight"].shape == (4, 1, 3, 3)


@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["--optimizer", "snopt", "--eps", "0"], "eps must be > 0"),
    (["--optimizer", "snopt", "--alpha", "1.5"], "alpha"),
    (["--update-freq", "0"], "update_freq must be an int >= 1"),
    (["--damping-mode", "svd"], "invalid choice: 'svd'"),
    (["--fisher", "exact"], "invalid choice: 'exact'"),
    (["--observer-dt", "-1"], "observer_dt must be > 0"),
    (["--curvature", "exact"], "invalid choice: 'exact'"),
    (["--factor-cost", "0"], "factor_cost must be > 0"),
    (["--adaptive-t1", "on"], "invalid choice: 'on'"),
    (["--adaptive-t1", "feedback", "--t1-min", "2"], "t1_min .* must not exceed"),
    (["--t1-lr", "0"], "t1_lr must be > 0"),
    (["--t1-reg", "-1"], "t1_reg must be >= 0"),
    (["--t1-update-freq", "0"], "t1_update_freq must be an int >= 1"),
    (["--momentum", "1.5"], "momentum must be in"),
    (["--train-size", "0"], "train_size must be an int >= 1"),
    (["--method", "rk4"], "rk4 needs options=.*step_size.*--step-size"),
    (["--method", "rk5"], "unknown method 'rk5'"),
    (["--dataset", "mnist"], "mnist: no data_dir given.*--data-dir"),
])
def test_bad_flags_are_usage_errors_saying_what_to_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "bad"), "--no-progress", *flags])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", " "))
