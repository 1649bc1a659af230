"""Datasets, the training loop (metrics, checkpoints, exact resume, failures) and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import ocnode.training.loop as train_module
from ocnode.data import load_dataset
from ocnode.nn import ode_blocks
from ocnode.optim import SNOpt
from ocnode.training import OPTIMIZERS, TrainConfig, build_optimizer, make_task, train
from ocnode.training.cli import main
from ocnode.training.loop import CHECKPOINT, horizon_parameters, optimizer_parameters
from ocnode.training.records import atomic_torch_save, load_checkpoint
from ocnode.training.tasks import TaskSettings

#: metrics.csv of a classification run
METRIC_COLUMNS = ("step", "epoch", "wall_time", "train_loss", "test_loss", "test_acc",
                  "nfe_forward", "nfe_backward", "lr", "t1")

# A tiny, fast run: 12 steps per epoch, two fixed RK4 steps per solve.
FAST = {"width": 16, "method": "rk4", "step_size": 0.5, "batch_size": 128, "lr": 1e-2,
        "log_every": 5, "progress": False}
STEPS_PER_EPOCH = 12  # ceil(1437 / 128)


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, name: str = "run", **overrides: object) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), **{**FAST, **overrides})  # type: ignore[arg-type]


def _rows(out: str | Path) -> list[dict[str, str]]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _load(out: str | Path) -> dict:
    return load_checkpoint(Path(out) / CHECKPOINT)


def _assert_identical(a: object, b: object, where: str = "") -> None:
    """Tensors equal bit for bit, containers recursively, other values by ==."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- data

def test_digits_split_is_stratified_and_deterministic() -> None:
    a = load_dataset("digits", seed=0)
    train_a, test_a = a.train, a.test
    b = load_dataset("digits", seed=0)
    train_b, test_b = b.train, b.test
    test_other = load_dataset("digits", seed=1).test
    assert torch.equal(train_a.tensors[0], train_b.tensors[0])
    assert torch.equal(test_a.tensors[1], test_b.tensors[1])
    assert not torch.equal(test_a.tensors[0], test_other.tensors[0])
    per_class_test = torch.bincount(test_a.tensors[1], minlength=10).double()
    per_class_all = per_class_test + torch.bincount(train_a.tensors[1], minlength=10)
    assert (per_class_test - 0.2 * per_class_all).abs().max() <= 1.0
    assert (a.n_train, a.n_test, a.n_classes) == (1437, 360, 10)


def test_digits_are_standardised_with_training_statistics_only() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    train_set, test_set = ds.train, ds.test
    x_train, x_test = train_set.tensors[0], test_set.tensors[0]
    assert x_train.dtype == torch.float32 and train_set.tensors[1].dtype == torch.int64
    mean, std = torch.from_numpy(ds.mean), torch.from_numpy(ds.std)
    train_std = x_train.double().std(0, correction=0)
    assert x_train.double().mean(0).abs().max() < 1e-5
    assert torch.allclose(train_std[train_std > 0], torch.ones(()).double(), atol=1e-5)
    # Undoing the standardisation with the TRAINING statistics gives back raw digit rows.
    raw_rows = {tuple(row) for row in load_digits().data.astype(int)}
    raw_test = (x_test.double() * std + mean).round().int().numpy()
    assert np.allclose(x_test.double() * std + mean, raw_test, atol=1e-3)
    assert all(tuple(row) in raw_rows for row in raw_test)
    assert x_test.double().mean(0).abs().max() > 0.05  # not centred with its own statistics


def test_unknown_dataset_error_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits"):
        load_dataset("cifar")


# ----------------------------------------------------------------------------- training

def test_short_run_writes_metrics_checkpoint_and_curves(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=1)
    final = train(config)
    rows = _rows(config.out)
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r["step"]) for r in rows] == [5, 10, STEPS_PER_EPOCH]
    values = [float(v) for row in rows for v in row.values()]
    assert all(math.isfinite(v) for v in values)
    assert all(float(r["nfe_forward"]) > 0 and float(r["nfe_backward"]) > 0 for r in rows)
    assert final["test_acc"] == float(rows[-1]["test_acc"]) and 0.5 < final["test_acc"] <= 1
    checkpoint = _load(config.out)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, STEPS_PER_EPOCH)
    assert {"torch", "numpy", "python", "loader"} <= set(checkpoint["rng"])
    assert (Path(config.out) / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wall_time_excludes_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluate = train_module._Run._evaluate

    def slow_evaluate(self: train_module._Run) -> dict[str, float]:
        time.sleep(0.5)
        return evaluate(self)

    monkeypatch.setattr(train_module._Run, "_evaluate", slow_evaluate)
    start = time.perf_counter()
    final = train(_config(tmp_path, epochs=1))
    elapsed = time.perf_counter() - start
    assert 0 < final["wall_time"] < elapsed - 3 * 0.5  # three evaluations were not counted


def test_resuming_a_killed_run_ends_bit_identical_to_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _config(tmp_path, "full", epochs=2)
    train(full)

    original_step = train_module._Run.train_step

    def killed_in_epoch_two(self: train_module._Run, batch: tuple[Tensor, ...]) -> None:
        if self.step == STEPS_PER_EPOCH + 6:
            raise KeyboardInterrupt
        original_step(self, batch)

    interrupted = _config(tmp_path, "interrupted", epochs=2)
    monkeypatch.setattr(train_module._Run, "train_step", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.undo()
    assert _load(interrupted.out)["epoch"] == 1
    train(dataclasses.replace(interrupted, resume=True))

    a, b = _load(full.out), _load(interrupted.out)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(),
                                b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    def without_wall_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]

    assert without_wall_time(_rows(interrupted.out)) == without_wall_time(_rows(full.out))

    with pytest.raises(ValueError, match="settings differ.*lr"):
        train(dataclasses.replace(interrupted, resume=True, lr=0.5))


def test_a_failing_checkpoint_write_leaves_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)

    def disk_full(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


class _NaNAfter(nn.Module):
    """A linear classifier whose logits turn NaN after ``healthy_steps`` training calls."""

    def __init__(self, in_dim: int, n_classes: int, healthy_steps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_classes)
        self.healthy_steps, self.calls = healthy_steps, 0

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(x)
        if self.training:
            self.calls += 1
            if self.calls > self.healthy_steps:
                return logits * float("nan")
        return logits


def _with_model(monkeypatch: pytest.MonkeyPatch, build: object) -> None:
    """Make the training loop's tasks build ``build(dataset)`` as their model."""
    def task_with_model(ds: object, settings: TaskSettings) -> object:
        task = make_task(ds, settings)  # type: ignore[arg-type]
        task.build_model = lambda adjoint: build(ds)  # type: ignore[operator]
        return task

    monkeypatch.setattr(train_module, "make_task", task_with_model)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_model(monkeypatch, lambda ds: _NaNAfter(ds.input_dim, ds.n_classes,
                                                  healthy_steps=STEPS_PER_EPOCH + 3))
    config = _config(tmp_path, epochs=3)
    with pytest.raises(FloatingPointError, match="loss became nan at epoch 2") as error:
        train(config)
    assert "left untouched" in str(error.value) and "smaller lr" in str(error.value)
    checkpoint = _load(config.out)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, STEPS_PER_EPOCH)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; choose one of .*digits"),
    ({"optimizer": "lbfgs"},
     "unknown optimizer 'lbfgs'; choose one of adam, ddpnopt, dgnopt, emsa, kfac, newton-cg, sgd, "
     "snopt"),
    ({"model": "transformer"}, "unknown model 'transformer'"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"rtol": -1.0}, "rtol must be > 0"),
    ({"device": "gpu7"}, "unknown device"),
    ({"resume": True}, "no checkpoint at"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"alpha": 1.5}, r"alpha .* must be in \[0, 1\]"),
    ({"update_freq": 0}, "update_freq must be an int >= 1"),
    ({"update_freq": 2.5}, "update_freq must be an int >= 1"),
    ({"damping_mode": "svd"}, "unknown damping_mode 'svd'; choose one of ekfac, tikhonov"),
    ({"fisher": "exact"}, "unknown fisher 'exact'; choose one of empirical, true"),
    ({"observer_dt": 0.0}, "observer_dt must be > 0"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"adaptive_t1": "on"}, "unknown adaptive_t1 'on'; choose one of baseline, feedback, off"),
    ({"t1_lr": 0.0}, "t1_lr must be > 0"),
    ({"t1_reg": -1.0}, "t1_reg must be >= 0"),
    ({"t1_min": 0.0}, "t1_min must be > 0"),
    ({"t1_update_freq": 0}, "t1_update_freq must be an int >= 1"),
    ({"adaptive_t1": "feedback", "t1_min": 2.0}, "t1_min .* must not exceed .* t1"),
    ({"train_size": 0}, "train_size must be an int >= 1"),
])
def test_bad_config_raises_a_value_error_saying_what_to_do(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path, **overrides))


def test_adaptive_t1_needs_a_model_with_a_trainable_horizon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_model(monkeypatch, lambda ds: nn.Linear(ds.input_dim, 10))
    with pytest.raises(ValueError, match="needs a model whose ODE blocks have a trainable t1"):
        train(_config(tmp_path, adaptive_t1="feedback"))


def test_an_out_folder_holding_a_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=1)
    Path(config.out).mkdir()
    (Path(config.out) / CHECKPOINT).write_bytes(b"an earlier run")
    with pytest.raises(ValueError, match="already holds a run.*resume.*overwrite"):
        train(config)
    assert train(dataclasses.replace(config, overwrite=True))["step"] == STEPS_PER_EPOCH


# ----------------------------------------------------------------------------- SNOpt, T

SNOPT = {"optimizer": "snopt", "lr": 2e-2, "update_freq": 5}


@pytest.mark.parametrize("overrides", [
    SNOPT,
    {**SNOPT, "adaptive_t1": "feedback", "t1_update_freq": 5, "t1_reg": 1e-2},
    {"optimizer": "adam", "adaptive_t1": "baseline", "t1_update_freq": 4, "t1_reg": 1e-1},
], ids=["snopt", "snopt-feedback-t1", "adam-baseline-t1"])
def test_resuming_snopt_and_adaptive_t1_runs_is_bit_identical(
    tmp_path: Path, overrides: dict
) -> None:
    full = _config(tmp_path, "full", epochs=2, **overrides)
    train(full)
    split = _config(tmp_path, "split", epochs=1, **overrides)
    train(split)
    train(dataclasses.replace(split, epochs=2, resume=True))

    a, b = _load(full.out), _load(split.out)
    for key in ("model", "optimizer", "horizon", "epoch", "step"):
        _assert_identical(a[key], b[key], key)
    rows = _rows(full.out)
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in rows] == [
        {k: v for k, v in r.items() if k != "wall_time"} for r in _rows(split.out)]
    if overrides["optimizer"] == "snopt":  # factors were refreshed (steps 0, 5, ..., 20)
        assert a["optimizer"]["state"]["snopt"]["step"] == 2 * STEPS_PER_EPOCH
        assert any("m2" in st for k, st in a["optimizer"]["state"].items() if k != "snopt")
    if "adaptive_t1" in overrides:  # the horizon moved and its averages were saved
        assert {float(r["t1"]) for r in rows} != {1.0}
        assert a["horizon"][0]["step"] == 2 * STEPS_PER_EPOCH
        assert a["horizon"][0]["ema_qt"] is not None


def _digits_task(**settings: object) -> object:
    return make_task(load_dataset("digits"), TaskSettings(width=8, **settings))  # type: ignore


@pytest.mark.parametrize("name", [n for n, e in OPTIMIZERS.items() if not e.chains_only])
def test_the_parameter_optimizer_leaves_an_adaptive_t1_to_the_horizon_optimizer(
    name: str
) -> None:
    config = TrainConfig(optimizer=name, adaptive_t1="feedback")
    model = _digits_task(trainable_t1=True).build_model(True)  # type: ignore[attr-defined]
    (t1,) = horizon_parameters(model)
    params = optimizer_parameters(model, config)
    optimized = [p for g in build_optimizer(name, model, params=params).param_groups
                 for p in g["params"]]
    assert all(p is not t1 for p in optimized)
    assert len(optimized) == len(list(model.parameters())) - 1
    fixed = _digits_task().build_model(True)  # type: ignore[attr-defined]
    assert horizon_parameters(fixed) == [] and ode_blocks(fixed)[0].t1 == 1.0


def test_optimizer_defaults_follow_the_authors_scripts_but_refresh_every_20() -> None:
    def build(name: str, **hparams: object) -> torch.optim.Optimizer:
        entry = OPTIMIZERS[name]
        model = _digits_task().build_model(not entry.through_solver)  # type: ignore
        return build_optimizer(name, model, hparams)

    sgd, snopt = build("sgd"), build("snopt")
    kfac = build("kfac", alpha=0.5)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.02
    assert isinstance(snopt, SNOpt) and isinstance(kfac, SNOpt)
    assert snopt.param_groups[0]["momentum"] == 0.0
    assert (snopt.param_groups[0]["alpha"], kfac.param_groups[0]["alpha"]) == (0.75, 0.5)
    assert snopt.param_groups[0]["eps"] == 0.05 and snopt.update_freq == 20
    assert build("snopt", momentum=0.5).param_groups[0]["momentum"] == 0.5
    assert build("adam").param_groups[0]["lr"] == 1e-3
    # K-FAC through the solver: the model's blocks backpropagate through the solver
    assert OPTIMIZERS["kfac"].through_solver and not OPTIMIZERS["snopt"].through_solver
    with pytest.raises(ValueError, match="takes no hyperparameter 'eps'"):
        build("adam", eps=0.1)


# ----------------------------------------------------------------------------- CLI

def test_cli_trains_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["train", "--out", str(tmp_path / "cli"), "--epochs", "1", "--width", "16",
                   "--method", "rk4", "--step-size", "0.5", "--batch-size", "128",
                   "--backprop", "--no-progress"])
    assert status == 0
    assert "done: epoch 1, step 12, test_acc" in capsys.readouterr().out
    assert _load(tmp_path / "cli")["config"]["adjoint"] is False


def test_cli_reports_bad_settings_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "cli"), "--lr", "-1"])
    assert exit_info.value.code == 2
    assert "lr must be > 0" in capsys.readouterr().err
