"""UEA/UCR classification series from ``.ts`` files: shipped in sktime or read from
``data_dir``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ocnode.data.errors import CorruptDatasetError
from ocnode.data.formats import TsFile, read_ts
from ocnode.data.locate import find_folder, no_data_dir, package_folder
from ocnode.data.transforms import pad_series
from ocnode.data.types import Description, RawSplits

#: UEA/UCR classification sets whose ``.ts`` files ship inside the sktime wheel.
SKTIME_SERIES = ("JapaneseVowels", "BasicMotions", "ArrowHead", "GunPoint", "OSULeaf",
                 "ItalyPowerDemand", "ACSF1", "PLAID")
#: The SNOpt paper's UEA sets, which no package ships: read from ``data_dir``.
UEA_FROM_FILES = ("CharacterTrajectories", "ArticularyWordRecognition", "SpokenArabicDigits")
UEA_PREFIX = "uea:"  # load_dataset("uea:<Name>", data_dir): any UEA/UCR set in data_dir


def _encode_labels(labels: Sequence[str], class_names: Sequence[str], where: str) -> np.ndarray:
    """``(N,)`` int64 indices of ``labels`` in ``class_names``."""
    index = {name: k for k, name in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise CorruptDatasetError(f"{where}: labels {unknown[:5]} are not among the declared "
                                  f"classes {list(class_names)}")
    return np.array([index[label] for label in labels], np.int64)


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """The labels in numeric order when they are all numbers, else alphabetically."""
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


def _ts_paths(name: str, data_dir: Path | None, packaged: bool) -> tuple[Path, Path]:
    """The ``<name>_TRAIN.ts`` and ``<name>_TEST.ts`` paths, from data_dir or sktime."""
    files = (f"{name}_TRAIN.ts", f"{name}_TEST.ts")
    how = ("Put the UEA/UCR archive's two .ts files of the set in data_dir (--data-dir) or in "
           f"data_dir/{name}.")
    if data_dir is not None:
        folder = find_folder([data_dir, data_dir / name], files, name, how)
    elif packaged:
        root = package_folder("sktime", name)
        folder = find_folder([root / "datasets" / "data" / name], files, name,
                             "This sktime version does not ship it: pass data_dir instead.")
    else:
        raise no_data_dir(name, files, "No package ships this set: " + how)
    return folder / files[0], folder / files[1]


def _read_ts_split(name: str, data_dir: Path | None,
                   packaged: bool) -> tuple[TsFile, TsFile, tuple[str, ...], str]:
    """Both ``.ts`` files of a set, their class names and where they came from."""
    train_path, test_path = _ts_paths(name, data_dir, packaged)
    train, test = read_ts(train_path), read_ts(test_path)
    class_names = train.class_names or _sorted_labels(set(train.labels) | set(test.labels))
    if train.series and test.series and train.series[0].shape[1] != test.series[0].shape[1]:
        raise CorruptDatasetError(f"{name}: {train.series[0].shape[1]} channels in "
                                  f"{train_path}, {test.series[0].shape[1]} in {test_path}")
    source = "sktime package" if data_dir is None else "data_dir"
    return train, test, class_names, f"{train_path.parent} ({source})"


def load_uea(name: str, data_dir: Path | None, seed: int, packaged: bool = False) -> RawSplits:
    """A UEA/UCR classification set as padded series, from its official train/test files.

    Args:
        name: the set's file stem (``<name>_TRAIN.ts``, ``<name>_TEST.ts``).
        data_dir: the folder holding them (or its ``<name>`` subfolder); None: sktime's copy.
        seed: unused (the split is the official one).
        packaged: whether sktime ships the set (else ``data_dir`` is required).

    Returns:
        Series of both splits padded to the longest series of either.
    """
    train, test, class_names, source = _read_ts_split(name, data_dir, packaged)
    length = max((len(s) for s in train.series + test.series), default=0)
    x_train, x_test = pad_series(train.series, length), pad_series(test.series, length)
    about = Description(kind="series", n_classes=len(class_names), class_names=class_names,
                        n_channels=x_train.values.shape[2], max_length=length, source=source,
                        split="the official _TRAIN/_TEST files")
    return RawSplits(x_train, _encode_labels(train.labels, class_names, f"{name} train"),
                     x_test, _encode_labels(test.labels, class_names, f"{name} test"), about)

