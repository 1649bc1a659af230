"""Nothing lost, nothing misleading: run folders survive failed overwrites, interrupted
resumes and corrupt checkpoints; --resume reloads the run's settings; failures are one line."""

from __future__ import annotations

import csv
import dataclasses
import os
import stat
from pathlib import Path

import pytest
import torch

import ocnode.training.loop as loop
import solvers
from ocnode.data import DatasetError
from ocnode.training import TrainConfig, train
from ocnode.training.cli import main
from ocnode.training.loop import CHECKPOINT
from ocnode.training.records import CheckpointError, load_checkpoint, save_checkpoint

FAST = {"width": 8, "method": "rk4", "step_size": 0.5, "batch_size": 256, "log_every": 3,
        "progress": False, "epochs": 1}
STEPS_PER_EPOCH = 6  # ceil(1437 / 256)
CLI_FAST = ["--width", "8", "--method", "rk4", "--step-size", "0.5", "--batch-size", "256",
            "--log-every", "3", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(out: Path, **overrides: object) -> TrainConfig:
    return TrainConfig(out=str(out), **{**FAST, **overrides})  # type: ignore[arg-type]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _flip_bytes(path: Path, at: float, count: int = 128) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = bytes(255 - b for b in data[start:start + count])
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- overwrite

def test_a_failing_overwrite_leaves_the_earlier_run_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DatasetError, match="fashion-mnist"):
        train(_config(out, overwrite=True, dataset="fashion-mnist",
                      data_dir=str(tmp_path / "empty")))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_overwrite_keeps_the_earlier_run_aside_until_its_first_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(_config(out))
    old_checkpoint = (out / CHECKPOINT).read_bytes()

    def diverge(*args: object, **kwargs: object) -> float:
        raise FloatingPointError("training loss became nan")

    monkeypatch.setattr(loop, "train_step", diverge)
    with pytest.raises(FloatingPointError):
        train(_config(out, overwrite=True, lr=0.5))
    (aside,) = out.glob("replaced-*")
    assert (aside / CHECKPOINT).read_bytes() == old_checkpoint  # still there, moved aside
    monkeypatch.undo()
    train(_config(out, overwrite=True, lr=0.5))
    assert not list(out.glob("replaced-*"))  # deleted once the new run had a checkpoint
    assert load_checkpoint(out / CHECKPOINT)["config"]["lr"] == 0.5


# ----------------------------------------------------------------------------- resume

def test_an_interrupted_resume_never_truncates_the_metrics_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(_config(out))
    history = (out / "metrics.csv").read_bytes()

    def killed(self: csv.DictWriter, rows: object) -> None:
        raise KeyboardInterrupt  # a kill while the kept rows are written

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_config(out, resume=True, epochs=2))
    monkeypatch.undo()
    assert (out / "metrics.csv").read_bytes() == history
    assert not list(out.glob(".metrics.csv.*.tmp"))


def test_resume_refuses_a_truncated_history(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out))
    lines = (out / "metrics.csv").read_text().splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="holds 1 rows up to step 6, the checkpoint expects 2"):
        train(_config(out, resume=True, epochs=2))


def test_resume_reloads_the_saved_settings_and_allows_only_resumable_changes(
    tmp_path: Path
) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--out", str(full), *CLI_FAST, "--lr", "0.02", "--epochs", "2"]) == 0
    assert main(["train", "--out", str(split), *CLI_FAST, "--lr", "0.02", "--epochs", "1"]) == 0
    assert main(["train", "--out", str(split), "--resume", "--epochs", "2",
                 "--no-progress"]) == 0  # no other flag repeated
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa
    assert drop(_rows(split)) == drop(_rows(full))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.02 -> 0.5\)"):
        TrainConfig.from_run(split, lr=0.5)
    assert TrainConfig.from_run(split, epochs=3).epochs == 3


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("damage", ["weights", "optimizer", "truncated", "empty", "garbage"])
def test_a_corrupt_checkpoint_is_refused_with_a_message_saying_what_to_do(
    tmp_path: Path, damage: str
) -> None:
    out = tmp_path / "run"
    train(_config(out, epochs=2))
    path = out / CHECKPOINT
    if damage == "weights":
        _flip_bytes(path, 0.3)
    elif damage == "optimizer":
        _flip_bytes(path, 0.8)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_bytes(b"" if damage == "empty" else os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt is corrupt .*"
                                              r"--overwrite to start over.*checkpoint.prev.pt"):
        train(_config(out, resume=True, epochs=3))


def test_checkpoints_keep_the_previous_one_clean_up_killed_writes_and_share_file_modes(
    tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(out, epochs=2))
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 1
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 2
    mode = stat.S_IMODE((out / "metrics.csv").stat().st_mode)
    assert stat.S_IMODE((out / CHECKPOINT).stat().st_mode) == mode
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(_config(out, resume=True, epochs=3))
    assert not stale.exists()


def test_a_checkpoint_of_an_older_release_without_checksum_resumes_with_a_warning(
    tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(out))
    legacy = load_checkpoint(out / CHECKPOINT)
    torch.save(legacy, out / CHECKPOINT)  # the format before checksums
    (out / "config.json").unlink()
    with pytest.warns(RuntimeWarning, match="without a checksum"):
        resumed = TrainConfig.from_run(out, epochs=2)
    assert resumed.width == 8 and resumed.resume
    with pytest.warns(RuntimeWarning, match="without a checksum"):
        train(resumed)
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 2


def test_save_and_load_checkpoint_round_trip_tensors_bit_for_bit(tmp_path: Path) -> None:
    obj = {"w": torch.randn(5, 3, dtype=torch.float64), "step": 7}
    save_checkpoint(obj, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 7 and torch.equal(back["w"], obj["w"])


# ----------------------------------------------------------------------------- CLI

def test_a_failed_run_is_one_line_and_exit_1_with_the_traceback_behind_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def blow_up(*args: object, **kwargs: object) -> float:
        raise solvers.MaxStepsExceededError(0.5, 0.01, 10)

    monkeypatch.setattr(loop, "train_step", blow_up)
    assert main(["train", "--out", str(tmp_path / "run"), *CLI_FAST]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "max_num_steps=10 exceeded at t=0.5" in err
    assert "no checkpoint had been written yet" in err
    with pytest.raises(solvers.MaxStepsExceededError):
        main(["train", "--out", str(tmp_path / "run2"), *CLI_FAST, "--debug"])


def test_threads_are_set_for_the_run_and_restored_after_it(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    config = _config(tmp_path / "run", threads=1)
    seen: list[int] = []
    original = loop._Run.train_step

    def record(self: loop._Run, batch: tuple) -> None:
        seen.append(torch.get_num_threads())
        original(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop._Run, "train_step", record)
        train(dataclasses.replace(config))
    assert set(seen) == {1} and torch.get_num_threads() == before
