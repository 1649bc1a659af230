"""Density-estimation sets: seeded 2-D toys, the frames of JapaneseVowels, and the
MAF-preprocessed MiniBooNE and Gas tables."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np

from ocnode.data.formats import MAF_FILES, read_maf_tables
from ocnode.data.locate import find_folder, no_data_dir, require
from ocnode.data.sources.series import load_uea
from ocnode.data.types import Description, RawSplits, Series

TOY_SIZES = (8000, 2000)  # train / test rows of the generated 2-D densities


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """A mixture of 8 Gaussians (std 0.35) centred on a circle of radius 2.83."""
    angles = rng.integers(0, 8, n) * (np.pi / 4)
    centres = 2 * np.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres + rng.normal(scale=0.5 / np.sqrt(2), size=(n, 2))


def _pinwheel(n: int, rng: np.random.Generator, arms: int = 5) -> np.ndarray:
    """The pinwheel of Johnson et al. 2016: Gaussian blobs bent into spiral arms."""
    arm = rng.integers(0, arms, n)
    radial = rng.normal(size=(n, 2)) * np.array([0.3, 0.1])  # radial, tangential std
    radial[:, 0] += 1.0
    angle = 2 * np.pi * arm / arms + 0.25 * np.exp(radial[:, 0])
    cos, sin = np.cos(angle), np.sin(angle)
    x = np.stack([cos * radial[:, 0] - sin * radial[:, 1],
                  sin * radial[:, 0] + cos * radial[:, 1]], axis=1)
    return 2 * x


def _sklearn_toy(maker: str, n: int, seed: int, **kwargs: Any) -> np.ndarray:
    datasets = require("sklearn.datasets", "scikit-learn", maker)
    return getattr(datasets, maker)(n_samples=n, random_state=seed, **kwargs)[0]


#: name -> generator ``(n, seed) -> (n, 2)`` points of a 2-D toy density.
TOYS: dict[str, Callable[[int, int], np.ndarray]] = {
    "circles": partial(_sklearn_toy, "make_circles", noise=0.06, factor=0.5),
    "moons": partial(_sklearn_toy, "make_moons", noise=0.1),
    "pinwheel": lambda n, seed: _pinwheel(n, np.random.default_rng(seed)),
    "8gaussians": lambda n, seed: _eight_gaussians(n, np.random.default_rng(seed)),
}


def load_toy(name: str, data_dir: Path | None, seed: int) -> RawSplits:
    """One seeded draw of a 2-D toy density, split into :data:`TOY_SIZES` train/test rows."""
    n_train, n_test = TOY_SIZES
    x = TOYS[name](n_train + n_test, seed)
    zeros = np.zeros(len(x), np.int64)
    about = Description(kind="density", n_classes=1,
                        split=f"one draw of {n_train + n_test} points seeded by seed, first "
                              f"{n_train} train, rest test (unlabelled: labels are 0)")
    return RawSplits(x[:n_train], zeros[:n_train], x[n_train:], zeros[n_train:], about)


def load_vowels_frames(data_dir: Path | None, seed: int) -> RawSplits:
    """Every observed frame of JapaneseVowels as a 12-D row, labelled with its speaker."""
    raw = load_uea("JapaneseVowels", data_dir, seed, packaged=True)
    x_train, x_test = cast(Series, raw.x_train), cast(Series, raw.x_test)
    about = Description(kind="density", n_classes=raw.description.n_classes,
                        class_names=raw.description.class_names,
                        source=raw.description.source,
                        split="frames of the official JapaneseVowels train/test series; "
                              "labels are the speakers (unused for density estimation)")
    return RawSplits(x_train.values[x_train.mask], np.repeat(raw.y_train, x_train.lengths),
                     x_test.values[x_test.mask], np.repeat(raw.y_test, x_test.lengths), about)


def load_maf_table(name: str, data_dir: Path | None, seed: int) -> RawSplits:
    """MiniBooNE or Gas as preprocessed for MAF (Papamakarios et al. 2017): three .npy arrays.

    Args:
        name: ``"miniboone"`` or ``"gas"``, also the subfolder of ``data_dir`` looked in first.
        data_dir: the parent of that folder (or the folder itself).
        seed: unused (the split is the preprocessing's).
    """
    how = (f"No package ships {name}: use the MAF preprocessing's {name} folder and pass its "
           "parent as data_dir (--data-dir).")
    if data_dir is None:
        raise no_data_dir(name, [f"{name}/{f}" for f in MAF_FILES], how)
    folder = find_folder([data_dir / name, data_dir], MAF_FILES, name, how)
    train, validation, test = read_maf_tables(folder)
    about = Description(kind="density", n_classes=1, source=str(folder),
                        split="the MAF preprocessing's train/validation/test files")
    return RawSplits(train, np.zeros(len(train), np.int64), test, np.zeros(len(test), np.int64),
                     about, validation=(validation, np.zeros(len(validation), np.int64)))
