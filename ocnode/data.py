"""Offline datasets behind one interface, :func:`load_dataset` (see DATASETS.md).

Each registered loader returns raw numpy arrays of a fixed train/test split; this module
standardises the features with statistics of the training split only and wraps them in
``TensorDataset`` objects (float32 inputs, int64 labels).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Loader = Callable[[Path | None, int], tuple[Arrays, dict[str, Any]]]


def _load_digits(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """sklearn's 8x8 handwritten digits (1797 x 64), stratified 80/20 split seeded by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed)
    info = {"n_classes": 10, "image_shape": (1, 8, 8)}
    return (x_train, y_train, x_test, y_test), info


DATASETS: dict[str, Loader] = {"digits": _load_digits}


def load_dataset(
    name: str, data_dir: str | Path | None = None, seed: int = 0
) -> tuple[TensorDataset, TensorDataset, dict[str, Any]]:
    """Load a dataset's train and test splits, standardised with training statistics.

    Args:
        name: a key of :data:`DATASETS`, e.g. ``"digits"``.
        data_dir: folder holding the dataset files, for datasets read from disk.
        seed: seed of the split, for datasets that have no fixed split.

    Returns:
        ``(train, test, info)``: ``TensorDataset`` objects of ``(N, D)`` float32 inputs and
        ``(N,)`` int64 labels, and a dict with ``name``, ``n_classes``, ``input_dim``,
        ``image_shape`` (how to reshape one row into ``(C, H, W)``), ``n_train``,
        ``n_test``, and the training ``mean`` and ``std`` (``(D,)`` arrays) used.

    Raises:
        ValueError: for an unknown ``name``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    (x_train, y_train, x_test, y_test), info = DATASETS[name](
        Path(data_dir) if data_dir is not None else None, seed)
    x_train = x_train.reshape(len(x_train), -1).astype(np.float64)
    x_test = x_test.reshape(len(x_test), -1).astype(np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features (e.g. blank pixels) stay at 0
    info = {**info, "name": name, "input_dim": x_train.shape[1], "n_train": len(x_train),
            "n_test": len(x_test), "mean": mean, "std": std}
    train = _tensor_dataset((x_train - mean) / std, y_train)
    test = _tensor_dataset((x_test - mean) / std, y_test)
    return train, test, info


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(x.astype(np.float32)),
                         torch.from_numpy(y.astype(np.int64)))
