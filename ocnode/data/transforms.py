"""Array transforms of the loaders: training statistics, standardising, stratified subsets
and padding (variable-length series, grey images to 3-channel 32x32)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ocnode.data.errors import CorruptDatasetError
from ocnode.data.types import Series, Standardise, Trajectories

_CHUNK_VALUES = 1 << 22  # values standardised at a time (bounds the float64 temporaries)


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified random subset of ``size`` rows, in ascending order.

    Each class gets its share of ``size`` (largest-remainder rounding, so the counts add up
    exactly); the rows of a class are drawn without replacement with ``seed``.

    Args:
        labels: ``(N,)`` integer class labels.
        size: rows to keep; ``size >= N`` keeps all.
        seed: seed of the draw.

    Returns:
        ``(min(size, N),)`` int64 row indices.

    Raises:
        ValueError: if ``size`` is smaller than the number of classes.
    """
    classes, counts = np.unique(labels, return_counts=True)
    if size >= len(labels):
        return np.arange(len(labels))
    if size < len(classes):
        raise ValueError(f"train size {size} is smaller than the number of classes "
                         f"({len(classes)}); keep at least one row per class")
    quota = counts * (size / len(labels))
    take = np.floor(quota).astype(np.int64)
    by_remainder = np.argsort(-(quota - take), kind="stable")
    take[by_remainder[: size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False)
              for c, n in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------- statistics

def statistics(x: np.ndarray, mode: Standardise) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ((D,) float64) of ``(N, ...)`` inputs, D their flattened size.

    Args:
        x: ``(N, ...)`` inputs.
        mode: "feature" (one per input), "global" (one value) or "channel" (one per channel,
            the second axis, repeated over that channel's inputs).

    Returns:
        ``(mean, std)``, each ``(D,)``; a constant input (or set) gets std 1, so it stays at 0.
    """
    if mode == "feature":
        rows = x.reshape(len(x), -1)
        mean, std = rows.mean(axis=0, dtype=np.float64), rows.std(axis=0, dtype=np.float64)
        return mean, np.where(std > 1e-8, std, 1.0)  # constant features stay at 0
    groups = x.shape[1] if mode == "channel" else 1
    size = int(np.prod(x.shape[1:], dtype=np.int64)) // groups
    count = max(len(x) * size, 1)
    # two passes over row chunks: no float64 copy of a large image set
    centre = sum((c.reshape(-1, groups, size).sum(axis=(0, 2), dtype=np.float64)
                  for c in _chunks(x)), np.zeros(groups)) / count
    squares = sum((np.square(c.reshape(-1, groups, size) - centre[:, None]).sum(axis=(0, 2))
                   for c in _chunks(x)), np.zeros(groups))
    std = np.sqrt(squares / count)
    std = np.where(std > 1e-8, std, 1.0)  # a blank image set stays at 0
    return np.repeat(centre, size), np.repeat(std, size)


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive row blocks of ``x`` of about :data:`_CHUNK_VALUES` values each."""
    rows = max(1, _CHUNK_VALUES // max(1, int(np.prod(x.shape[1:], dtype=np.int64))))
    return (x[i:i + rows] for i in range(0, len(x), rows))


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` of ``(N, ...)`` inputs as ``(N, D)`` float32 rows, in chunks."""
    out = np.empty((len(x), mean.size), np.float32)
    start = 0
    for chunk in _chunks(x):
        rows = chunk.reshape(-1, mean.size)
        out[start:start + len(rows)] = (rows.astype(np.float64) - mean) / std
        start += len(rows)
    return out


def series_statistics(x: Series) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std ((C,) float64) over the observed steps only.

    Raises:
        ValueError: no step is observed.
    """
    observed = x.values[x.mask]
    if not len(observed):
        raise ValueError("the training series have no observed step to standardise with")
    mean, std = observed.mean(axis=0, dtype=np.float64), observed.std(axis=0, dtype=np.float64)
    return mean, np.where(std > 1e-8, std, 1.0)


def trajectory_statistics(x: Trajectories) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std ((D,) float64) of the training observations only."""
    return series_statistics(Series(x.values, x.times, x.train))


# ----------------------------------------------------------------------------- padding

def pad_series(series: Sequence[np.ndarray], length: int | None = None) -> Series:
    """Left-align ``(L_i, C)`` series into a zero-padded :class:`Series` of ``length`` steps.

    Args:
        series: the series, NaN where a value is missing.
        length: the common length ``T`` (None: the longest series). Never truncates.

    Returns:
        The ``(N, T, C)`` :class:`Series`, observed where every channel has a value.

    Raises:
        ValueError: ``length`` is shorter than a series.
    """
    longest = max((len(s) for s in series), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} would truncate a series of {longest} steps")
    channels = series[0].shape[1] if series else 0
    values = np.zeros((len(series), length, channels))
    mask = np.zeros((len(series), length), bool)
    for i, s in enumerate(series):
        observed = np.isfinite(s).all(axis=1)
        values[i, : len(s)] = np.where(observed[:, None], s, 0.0)
        mask[i, : len(s)] = observed
    times = np.broadcast_to(np.arange(length, dtype=np.float64), mask.shape).copy()
    return Series(values, times, mask)


def pad_to_rgb32(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` grey images -> a read-only ``(N, 3, 32, 32)`` view, zero-padded, centred.

    Raises:
        CorruptDatasetError: the images are larger than 32x32.
    """
    n, height, width = images.shape
    if height > 32 or width > 32:
        raise CorruptDatasetError(f"fmnist32: images are {height}x{width}, larger than 32x32")
    top, left = (32 - height) // 2, (32 - width) // 2
    padded = np.zeros((n, 1, 32, 32), images.dtype)
    padded[:, 0, top:top + height, left:left + width] = images
    return np.broadcast_to(padded, (n, 3, 32, 32))  # channels share memory until standardised
