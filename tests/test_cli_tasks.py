"""``ocnode train`` on every task: the dataset picks the task and its metric column, each run
writes its metrics, checkpoint and pictures, and resumes bit-identically."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from ocnode.training.cli import main
from ocnode.training.loop import CHECKPOINT
from ocnode.training.records import load_checkpoint

# (dataset flags, metric column, extra columns, picture); tiny data, one or two epochs
TASKS = {
    "density": (["--dataset", "circles", "--train-size", "256", "--test-size", "64",
                 "--width", "8", "--batch-size", "128"], "test_nll", (), "density.png"),
    "series": (["--dataset", "JapaneseVowels", "--train-size", "64", "--test-size", "32",
                "--width", "8", "--batch-size", "32"], "test_acc", (), None),
    "trajectory": (["--dataset", "spirals", "--train-size", "16", "--width", "8",
                    "--batch-size", "8"], "test_mse", ("extrap_mse", "train_mse"),
                   "trajectory.png"),
    "sde": (["--dataset", "spirals", "--model", "sde", "--train-size", "16", "--width", "8",
             "--batch-size", "8"], "test_mse", ("extrap_mse", "train_mse"), "trajectory.png"),
    # DDPNOpt on the paper's FCN (a plain chain: no ODE block, so no vector-field calls)
    "ddpnopt": (["--dataset", "digits", "--model", "fcn", "--optimizer", "ddpnopt",
                 "--ddp-base", "adam", "--width", "8", "--batch-size", "256"], "test_acc", (),
                None),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, flags: list[str], *extra: str) -> list[dict[str, str]]:
    assert main(["train", "--out", str(out), "--no-progress", "--log-every", "2", *flags,
                 *extra]) == 0
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_trains_from_the_command_line_and_resumes_bit_identically(
    tmp_path: Path, name: str
) -> None:
    flags, metric, extra, picture = TASKS[name]
    rows = _train(tmp_path / "full", flags, "--epochs", "2")
    assert list(rows[0]) == ["step", "epoch", "wall_time", "train_loss", "test_loss", metric,
                             *extra, "nfe_forward", "nfe_backward", "lr", "t1"]
    assert all(math.isfinite(float(v)) for r in rows for k, v in r.items() if k != "t1")
    assert (float(rows[-1]["nfe_forward"]) > 0) == (name != "ddpnopt")
    assert (tmp_path / "full" / "curves.png").stat().st_size > 0
    if picture:
        assert (tmp_path / "full" / picture).read_bytes()[:4] == b"\x89PNG"

    _train(tmp_path / "split", flags, "--epochs", "1")
    resumed = _train(tmp_path / "split", flags, "--epochs", "2", "--resume")
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in resumed] == [
        {k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)["model"]
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_task_that_does_not_fit_the_dataset_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--dataset", "spirals", "--task",
              "classification"])
    assert "needs a classification dataset; spirals is a trajectories dataset" in (
        capsys.readouterr().err.replace("\n", " "))
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "y"), "--dataset", "digits", "--model", "sde"])
    assert "trains the models mlp, conv, fcn, cnn, resmlp, resnet, not 'sde'" in (
        capsys.readouterr().err.replace("\n", " "))


def test_the_comparison_harness_runs_from_the_command_line(tmp_path: Path) -> None:
    assert main(["compare", "--dataset", "spirals", "--train-size", "16", "--width", "8",
                 "--optimizers", "adam,snopt", "--seeds", "0", "--max-steps", "2",
                 "--eval-every", "1", "--no-memory", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "trajectory-spirals"
    assert (folder / "results.md").is_file() and (folder / "trajectory.png").is_file()
    assert {p.name for p in (folder / "runs").iterdir()} == {"adam_seed0.csv",
                                                            "snopt_seed0.csv"}
