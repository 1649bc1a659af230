"""Readers of the file formats datasets come in: idx (MNIST), ``.ts`` (UEA/UCR), CIFAR-10
python batches, SVHN ``.mat`` files and the MAF preprocessing's ``.npy`` tables.

The readers return raw numpy arrays, check what they read and raise
:class:`~ocnode.data.errors.CorruptDatasetError` naming the file when it is not what it
should be.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ocnode.data.errors import CorruptDatasetError, DatasetError, DatasetFilesNotFoundError
from ocnode.data.locate import require
from ocnode.data.types import Arrays

#: The standard idx file names shared by MNIST and Fashion-MNIST (each may end in ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
#: The three arrays of a MAF-preprocessed table (MiniBooNE, Gas), in split order.
MAF_FILES = ("train.npy", "validation.npy", "test.npy")


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


def read_idx_images(folder: Path, dataset: str, how_to_get: str) -> Arrays:
    """The raw images and labels of both splits of an MNIST-style idx folder.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, rows, cols)`` and int64
        labels ``(N,)``.

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
    x_train, y_train, x_test, y_test = read_idx_images(Path(folder), dataset, how_to_get)
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


# ----------------------------------------------------------------------------- CIFAR-10 batches

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


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> uint8 ``(N, 3, 32, 32)`` images, int64 ``(N,)`` labels.

    Raises:
        CorruptDatasetError: not a pickled dict of ``b"data"`` ``(N, 3072)`` and ``b"labels"``,
            or it holds other objects than arrays, lists and bytes.
    """
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


# ----------------------------------------------------------------------------- SVHN .mat files

def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat`` -> uint8 ``(N, 3, 32, 32)`` images and int64 labels 0..9.

    Raises:
        DatasetPackageMissingError: scipy (the ``.mat`` reader) is not installed.
        CorruptDatasetError: not a ``.mat`` file with ``X (32, 32, 3, N)`` and ``y (N, 1)``.
    """
    io = require("scipy.io", "scipy", "svhn")
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


# ----------------------------------------------------------------------------- MAF tables

def read_maf_tables(folder: Path) -> list[np.ndarray]:
    """The float ``(N, D)`` train, validation and test tables of :data:`MAF_FILES`.

    Raises:
        CorruptDatasetError: a table is not 2-D float rows of the same width as the others.
    """
    tables: list[np.ndarray] = []
    for file in MAF_FILES:
        table = np.load(folder / file, allow_pickle=False)
        if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating) or (
                tables and table.shape[1] != tables[0].shape[1]):
            raise CorruptDatasetError(f"{folder / file}: a {table.dtype} array of shape "
                                      f"{table.shape}; expected float rows (N, D) like the "
                                      "other splits")
        tables.append(table)
    return tables
