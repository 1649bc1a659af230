"""The name -> loader registry and :func:`load_dataset`, which standardises a loader's raw
splits with training statistics and returns them as a :class:`~ocnode.data.types.Dataset`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ocnode.data.sources import densities, images, series, trajectories
from ocnode.data.sources.densities import TOYS
from ocnode.data.sources.series import SKTIME_SERIES, UEA_FROM_FILES, UEA_PREFIX
from ocnode.data.sources.trajectories import LASA_DEFAULT, LASA_PREFIX
from ocnode.data.transforms import (
    series_statistics,
    standardise,
    statistics,
    stratified_subset,
    trajectory_statistics,
)
from ocnode.data.types import Dataset, Description, RawSplits, Series, Trajectories

#: A loader: ``(data_dir, seed) -> RawSplits``.
Loader = Callable[[Path | None, int], RawSplits]

#: The registered datasets, name -> loader. Also accepted by :func:`load_dataset`:
#: ``"uea:<Name>"`` (UEA/UCR files in ``data_dir``) and ``"lasa:<Shape>"``.
DATASETS: dict[str, Loader] = {
    "digits": images.load_digits, "mnist5k": images.load_mnist5k,
    "fashion-mnist": images.load_fashion_mnist, "fmnist32": images.load_fmnist32,
    "mnist": images.load_mnist, "cifar10": images.load_cifar10, "svhn": images.load_svhn,
    "vowels-frames": densities.load_vowels_frames,
    "miniboone": partial(densities.load_maf_table, "miniboone"),
    "gas": partial(densities.load_maf_table, "gas"),
    **{name: partial(densities.load_toy, name) for name in TOYS},
    **{name: partial(series.load_uea, name, packaged=True) for name in SKTIME_SERIES},
    **{name: partial(series.load_uea, name) for name in UEA_FROM_FILES},
    "spirals": trajectories.load_spirals, "lasa": partial(trajectories.load_lasa, LASA_DEFAULT),
}


def _loader(name: str) -> Loader:
    """The loader of a registered name, ``uea:<Name>`` or ``lasa:<Shape>``."""
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(UEA_PREFIX) and re.fullmatch(r"[A-Za-z0-9_-]+", name[len(UEA_PREFIX):]):
        return partial(series.load_uea, name[len(UEA_PREFIX):])
    if name.startswith(LASA_PREFIX):
        return partial(trajectories.load_lasa, name[len(LASA_PREFIX):])
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}, "
                     f"{UEA_PREFIX}<Name> for the UEA/UCR files <Name>_TRAIN.ts and "
                     f"<Name>_TEST.ts in data_dir, or {LASA_PREFIX}<Shape> for a LASA shape")


def _check_arguments(name: object, seed: object, subset: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name (str), got {name!r}; see "
                        "ocnode.data.DATASETS")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int | np.integer)
                               or subset < 1):
        raise ValueError(f"subset (train size) must be a positive int or None, got {subset!r}")


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0,
                 subset: int | None = None) -> Dataset:
    """Load a dataset's train and test splits, standardised with training statistics.

    Args:
        name: a key of :data:`DATASETS`, e.g. ``"digits"`` or ``"JapaneseVowels"``,
            ``"uea:<Name>"`` for the UEA/UCR files ``<Name>_TRAIN.ts``/``<Name>_TEST.ts``, or
            ``"lasa:<Shape>"`` for a LASA handwriting shape (``lasa_shapes()``).
        data_dir: folder holding the dataset files, for datasets read from disk (None: the
            dataset's default folder or package, where it has one).
        seed: seed of the split (datasets without a fixed split), of generated data and of
            the subset draw.
        subset: cap the training split at this many rows, a class-stratified draw seeded by
            ``seed`` (:func:`~ocnode.data.stratified_subset`); the statistics come from the
            kept rows. The test split is never reduced. None keeps everything.

    Returns:
        The :class:`~ocnode.data.types.Dataset`; its docstring describes the tensors each
        kind holds, with their shapes and dtypes.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: an unknown ``name`` (or LASA shape), a bad ``seed`` or ``subset``.
        DatasetFilesNotFoundError: the dataset's files are missing (says how to get them).
        DatasetPackageMissingError: the package that ships the dataset is not installed.
        CorruptDatasetError: a dataset file is corrupt.
    """
    _check_arguments(name, seed, subset)
    loader = _loader(name)
    raw = loader(Path(data_dir) if data_dir is not None else None, int(seed))
    n_available = len(raw.x_train)
    x_train, y_train = raw.x_train, raw.y_train
    if subset is not None:
        keep = stratified_subset(y_train, int(subset), int(seed))
        x_train, y_train = x_train[keep], y_train[keep]
    x_test, y_test = raw.x_test, raw.y_test
    if isinstance(x_train, Trajectories):  # one set of series: the splits differ in time
        x_test, y_test = x_train, y_train
    train, test, mean, std = _standardised(x_train, y_train, x_test, y_test, raw)
    validation = None
    if raw.validation is not None:
        validation = _tensor_dataset(standardise(raw.validation[0], mean, std),
                                     raw.validation[1])
    return Dataset(**_description_fields(raw.description), name=name, train=train, test=test,
                   input_dim=mean.size, n_train=len(y_train), n_train_available=n_available,
                   n_test=len(y_test), mean=mean / raw.pixel_scale, std=std / raw.pixel_scale,
                   validation=validation)


def _description_fields(about: Description) -> dict[str, Any]:
    """The attributes of ``about`` by name (shallow: values are not copied)."""
    return {f.name: getattr(about, f.name) for f in fields(Description)}


def _standardised(
    x_train: np.ndarray | Series | Trajectories, y_train: np.ndarray,
    x_test: np.ndarray | Series | Trajectories, y_test: np.ndarray, raw: RawSplits,
) -> tuple[TensorDataset, TensorDataset, np.ndarray, np.ndarray]:
    """``(train, test, mean, std)``: both splits standardised with the training statistics."""
    if isinstance(x_train, Trajectories):
        mean, std = trajectory_statistics(x_train)
        return *_trajectory_datasets(x_train, mean, std), mean, std
    if isinstance(x_train, Series) and isinstance(x_test, Series):
        mean, std = series_statistics(x_train)
        return (_series_dataset(x_train, y_train, mean, std),
                _series_dataset(x_test, y_test, mean, std), mean, std)
    if isinstance(x_train, np.ndarray) and isinstance(x_test, np.ndarray):
        mean, std = statistics(x_train, raw.standardise)
        return (_tensor_dataset(standardise(x_train, mean, std), y_train),
                _tensor_dataset(standardise(x_test, mean, std), y_test), mean, std)
    raise TypeError(f"a loader returned {type(x_train).__name__} train and "
                    f"{type(x_test).__name__} test inputs; both must be of one type")


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """``(inputs (N, D) float32, labels (N,) int64)``."""
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                         torch.from_numpy(y.astype(np.int64)))


def _series_dataset(x: Series, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> TensorDataset:
    """``(values (N, T, C) float32, times (N, T) float32, mask (N, T) bool, labels (N,))``."""
    values = np.where(x.mask[..., None], (x.values - mean) / std, 0.0).astype(np.float32)
    return TensorDataset(torch.from_numpy(values), torch.from_numpy(x.times.astype(np.float32)),
                         torch.from_numpy(x.mask.copy()), torch.from_numpy(y.astype(np.int64)))


def _trajectory_datasets(x: Trajectories, mean: np.ndarray,
                         std: np.ndarray) -> tuple[TensorDataset, TensorDataset]:
    """Standardised train ``(values, times, mask)`` and test ``(values, times, interp, extrap)``."""
    observed = x.train | x.interp | x.extrap
    scaled = (x.values - mean) / std

    def tensor(values: np.ndarray, where: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(where[..., None], values, 0.0).astype(np.float32))

    times = torch.from_numpy(x.times.astype(np.float32))
    train = TensorDataset(tensor(scaled, x.train), times, torch.from_numpy(x.train.copy()))
    test = TensorDataset(tensor(scaled, observed), times.clone(),
                         torch.from_numpy(x.interp.copy()), torch.from_numpy(x.extrap.copy()))
    return train, test
