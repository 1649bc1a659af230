"""Offline datasets behind one interface, :func:`load_dataset` (see DATASETS.md).

Each registered loader returns raw numpy arrays of a fixed train/test split; this module
optionally caps the training split to a stratified subset, standardises the features with
statistics of the (capped) training split only, and wraps them in ``TensorDataset`` objects
of flat rows (float32 inputs, int64 labels; ``info["image_shape"]`` says how to reshape a row
into an image).

Datasets:

- ``"digits"``: sklearn's 8x8 handwritten digits, a seeded stratified 80/20 split.
- ``"fashion-mnist"``: the real Fashion-MNIST (Xiao et al. 2017), official 60000/10000 split,
  read from the Debian package ``dataset-fashion-mnist`` (:data:`FASHION_MNIST_DIR`) or from
  ``data_dir``.
- ``"mnist"``: MNIST (LeCun et al. 1998) from the four standard idx files in ``data_dir``.

Images are scaled to [0, 1] and standardised with one scalar mean and std of the training
pixels (per-pixel statistics would blow up the nearly constant border pixels); tables are
standardised per feature.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Loader = Callable[[Path | None, int], tuple[Arrays, dict[str, Any]]]

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The standard idx file names shared by MNIST and Fashion-MNIST (each may end in ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_CHUNK_ROWS = 8192  # rows standardised at a time (bounds the float64 temporaries)


class DatasetError(Exception):
    """Base class of the dataset errors below."""


class DatasetFilesNotFoundError(DatasetError, FileNotFoundError):
    """Some files of a dataset read from disk are missing; the message says how to get them."""


class CorruptDatasetError(DatasetError, ValueError):
    """A dataset file is not what its name promises (bad magic number, truncated, ...)."""


# ----------------------------------------------------------------------------- idx files

def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic bytes."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise CorruptDatasetError(f"{path}: not a valid gzip file ({err}); the download is "
                                  "probably incomplete, fetch the file again") from None


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzipped or plain.

    The header is a big-endian int32 magic number (two zero bytes, a type code, the number of
    dimensions) followed by one big-endian int32 per dimension; then the data, row-major.

    Args:
        path: the file.
        magic: the expected magic number, :data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`.

    Returns:
        A uint8 array of the shape the header gives (a read-only view of the file's bytes).

    Raises:
        CorruptDatasetError: a bad magic number, a truncated header or data of the wrong size.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise CorruptDatasetError(f"{path}: truncated idx header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise CorruptDatasetError(f"{path}: bad idx magic number {found}, expected {magic} "
                                  "(2051 = images, 2049 = labels); is it the right file?")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise CorruptDatasetError(f"{path}: truncated idx header ({len(raw)} bytes, "
                                  f"{offset} expected)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - offset != expected:
        raise CorruptDatasetError(f"{path}: the header promises {shape} = {expected} bytes of "
                                  f"data, the file holds {len(raw) - offset}; it is truncated "
                                  "or corrupt, fetch it again")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def _find_idx_files(folder: Path, dataset: str, how_to_get: str) -> dict[str, Path]:
    """Each standard idx file in ``folder``, gzipped (preferred) or plain."""
    found, missing = {}, []
    for key, name in IDX_FILES.items():
        candidates = [folder / f"{name}.gz", folder / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{name}.gz")
        else:
            found[key] = path
    if missing:
        expected = ", ".join(f"{name}[.gz]" for name in IDX_FILES.values())
        raise DatasetFilesNotFoundError(
            f"{dataset}: missing {', '.join(missing)} in {folder}. The loader expects the "
            f"four idx files {expected} (gzipped or plain) in that folder. {how_to_get}")
    return found


def read_idx_dataset(folder: str | Path, dataset: str = "idx dataset",
                     how_to_get: str = "") -> Arrays:
    """Read the standard train/test idx files of an MNIST-style dataset.

    Args:
        folder: the folder holding the four files of :data:`IDX_FILES` (``.gz`` or plain).
        dataset: the dataset's name, for error messages.
        how_to_get: one sentence telling the user how to get missing files.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 images ``(N, 1, rows, cols)`` scaled
        to [0, 1] and int64 labels ``(N,)``.

    Raises:
        DatasetFilesNotFoundError: when files are missing (the message names them all).
        CorruptDatasetError: a file is corrupt, or images and labels do not match.
    """
    paths = _find_idx_files(Path(folder), dataset, how_to_get)
    arrays: list[np.ndarray] = []
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise CorruptDatasetError(
                f"{dataset}: {paths[f'{split}_images']} holds {len(images)} images but "
                f"{paths[f'{split}_labels']} holds {len(labels)} labels")
        x = images.astype(np.float32)[:, None]
        x /= 255.0
        arrays += [x, labels.astype(np.int64)]
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1:] != x_test.shape[1:]:
        raise CorruptDatasetError(f"{dataset}: train images are {x_train.shape[2:]} but test "
                                  f"images are {x_test.shape[2:]}")
    return x_train, y_train, x_test, y_test


# ----------------------------------------------------------------------------- loaders

def _load_digits(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """sklearn's 8x8 handwritten digits (1797 x 64), stratified 80/20 split seeded by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed)
    info = {"n_classes": 10, "image_shape": (1, 8, 8)}
    return (x_train, y_train, x_test, y_test), info


def _image_info(arrays: Arrays, n_classes: int) -> dict[str, Any]:
    for name, labels in (("train", arrays[1]), ("test", arrays[3])):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise CorruptDatasetError(f"{name} labels outside 0..{n_classes - 1}: found "
                                      f"{labels.min()}..{labels.max()}")
    return {"n_classes": n_classes, "image_shape": tuple(arrays[0].shape[1:]),
            "standardise": "global"}


def _load_fashion_mnist(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), official 60000/10000 split."""
    folder = FASHION_MNIST_DIR if data_dir is None else data_dir
    how = ("Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it puts "
           f"them in {FASHION_MNIST_DIR}), or pass data_dir (--data-dir) to a folder holding "
           "them.")
    arrays = read_idx_dataset(folder, "fashion-mnist", how)
    return arrays, {**_image_info(arrays, 10), "class_names": FASHION_MNIST_CLASSES}


def _load_mnist(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """MNIST (LeCun et al. 1998), official 60000/10000 split, from the user's idx files."""
    how = ("No package ships full MNIST: put the four idx files (from the MNIST distribution) "
           "in one folder and pass it as data_dir (--data-dir).")
    if data_dir is None:
        expected = ", ".join(f"{name}[.gz]" for name in IDX_FILES.values())
        raise DatasetFilesNotFoundError(f"mnist: no data_dir given; the loader reads the four "
                                        f"idx files {expected} from data_dir. {how}")
    arrays = read_idx_dataset(data_dir, "mnist", how)
    return arrays, _image_info(arrays, 10)


DATASETS: dict[str, Loader] = {"digits": _load_digits, "fashion-mnist": _load_fashion_mnist,
                               "mnist": _load_mnist}


# ----------------------------------------------------------------------------- the interface

def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified random subset of ``size`` rows, in ascending order.

    Each class gets its share of ``size`` (largest-remainder rounding, so the counts add up
    exactly); the rows of a class are drawn without replacement with ``seed``.

    Args:
        labels: ``(N,)`` integer class labels.
        size: rows to keep; ``size >= N`` keeps all.
        seed: seed of the draw.

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


def _statistics(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ((D,) float64) of ``(N, D)`` rows, per feature or one global value."""
    if mode == "feature":
        mean, std = x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)
    else:  # two passes over row chunks: no float64 copy of a large image set
        chunks = range(0, len(x), _CHUNK_ROWS)
        total = sum(float(x[i:i + _CHUNK_ROWS].sum(dtype=np.float64)) for i in chunks)
        centre = total / x.size
        squares = sum(float(np.square(x[i:i + _CHUNK_ROWS].astype(np.float64) - centre).sum())
                      for i in chunks)
        mean = np.full(x.shape[1], centre)
        std = np.full(x.shape[1], np.sqrt(squares / x.size))
    return mean, np.where(std > 1e-8, std, 1.0)  # constant features (blank pixels) stay at 0


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` in float64, stored as float32, a chunk of rows at a time."""
    out = np.empty(x.shape, np.float32)
    for i in range(0, len(x), _CHUNK_ROWS):
        out[i:i + _CHUNK_ROWS] = (x[i:i + _CHUNK_ROWS].astype(np.float64) - mean) / std
    return out


def load_dataset(
    name: str, data_dir: str | Path | None = None, seed: int = 0, subset: int | None = None
) -> tuple[TensorDataset, TensorDataset, dict[str, Any]]:
    """Load a dataset's train and test splits, standardised with training statistics.

    Args:
        name: a key of :data:`DATASETS`, e.g. ``"digits"`` or ``"fashion-mnist"``.
        data_dir: folder holding the dataset files, for datasets read from disk (None: the
            dataset's default folder, where it has one).
        seed: seed of the split (datasets without a fixed split) and of the subset draw.
        subset: cap the training split at this many rows, a class-stratified draw seeded by
            ``seed`` (:func:`stratified_subset`); the statistics come from the kept rows.
            The test split is never reduced. None keeps everything.

    Returns:
        ``(train, test, info)``: ``TensorDataset`` objects of ``(N, D)`` float32 inputs and
        ``(N,)`` int64 labels, and a dict with ``name``, ``n_classes``, ``input_dim``,
        ``image_shape`` (how to reshape one row into ``(C, H, W)``), ``n_train``,
        ``n_train_available`` (before the cap), ``n_test``, and the training ``mean`` and
        ``std`` (``(D,)`` arrays) used.

    Raises:
        ValueError: for an unknown ``name`` or a bad ``subset``.
        DatasetFilesNotFoundError: the dataset's files are missing (says how to get them).
        CorruptDatasetError: a dataset file is corrupt.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int | np.integer)
                               or subset < 1):
        raise ValueError(f"subset (train size) must be a positive int or None, got {subset!r}")
    (x_train, y_train, x_test, y_test), info = DATASETS[name](
        Path(data_dir) if data_dir is not None else None, seed)
    n_available = len(x_train)
    if subset is not None:
        keep = stratified_subset(y_train, int(subset), seed)
        x_train, y_train = x_train[keep], y_train[keep]
    x_train = x_train.reshape(len(x_train), -1)
    x_test = x_test.reshape(len(x_test), -1)
    info = dict(info)
    mean, std = _statistics(x_train, info.pop("standardise", "feature"))
    info = {**info, "name": name, "input_dim": x_train.shape[1], "n_train": len(x_train),
            "n_train_available": n_available, "n_test": len(x_test), "mean": mean, "std": std}
    train = _tensor_dataset(_standardise(x_train, mean, std), y_train)
    test = _tensor_dataset(_standardise(x_test, mean, std), y_test)
    return train, test, info


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                         torch.from_numpy(y.astype(np.int64)))
