"""Tasks: the dataset picks the task, evaluation runs on a fixed test subset, and each task's
metric and columns are what metrics.csv documents."""

from __future__ import annotations

import torch

from ocnode.data import load_dataset
from ocnode.training import TrainConfig, make_task
from ocnode.training.tasks import TaskSettings, _test_tensors


def test_evaluation_uses_a_fixed_test_subset_by_default() -> None:
    frames = load_dataset("vowels-frames")  # thousands of test rows
    assert TrainConfig().test_size == 2000 and frames.n_test > 2000
    a, b = _test_tensors(frames, 2000), _test_tensors(frames, 2000)
    assert len(a[0]) == 2000 and torch.equal(a[0], b[0])  # the same rows every time
    digits = load_dataset("digits")  # 360 test rows: all of them
    assert torch.equal(_test_tensors(digits, 2000)[0], digits.test.tensors[0])


def test_each_dataset_kind_gets_its_task_metric_and_columns() -> None:
    expected = {"digits": ("classification", "test_acc", True),
                "JapaneseVowels": ("series", "test_acc", True),
                "spirals": ("trajectory", "test_mse", False),
                "circles": ("density", "test_nll", False)}
    for name, (task, metric, higher) in expected.items():
        t = make_task(load_dataset(name, subset=64), TaskSettings(width=4, test_size=32))
        assert (t.name, t.metric, t.higher_is_better) == (task, metric, higher), name
        assert t.columns[0] == "test_loss" and metric in t.columns
