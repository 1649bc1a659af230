"""Datasets read from disk: the idx reader, MNIST/Fashion-MNIST loading, errors, subsets."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SYSTEM_DATA_ENV, system_data_enabled

from ocnode.data import (
    FASHION_MNIST_DIR,
    CorruptDatasetError,
    Dataset,
    DatasetFilesNotFoundError,
    load_dataset,
    read_idx,
    read_idx_dataset,
    stratified_subset,
)
from ocnode.data.formats import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from ocnode.data.sources import images

ALL_FILES = list(IDX_FILES.values())


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> Path:
    data = _idx_bytes(array, magic)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _make_split(n: int, rng: np.random.Generator, brightness: int) -> tuple[np.ndarray, ...]:
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, brightness, size=(n, 6, 5), dtype=np.uint8)
    return images, labels.astype(np.uint8)


def _write_dataset(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Small 6x5 idx files; test images are brighter than training images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = dict(zip(["train_images", "train_labels"], _make_split(n_train, rng, 128)))
    arrays.update(zip(["test_images", "test_labels"], _make_split(n_test, rng, 256)))
    for i, (key, array) in enumerate(arrays.items()):
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        _write_idx(folder / IDX_FILES[key], array, magic, gz=gz and i % 2 == 0)  # mixed
    return arrays


# ----------------------------------------------------------------------------- the reader

@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(7, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    image_path = _write_idx(tmp_path / "img", images, IDX_IMAGES_MAGIC, gz)
    label_path = _write_idx(tmp_path / "lbl", labels, IDX_LABELS_MAGIC, gz)
    read_images, read_labels = read_idx(image_path, 2051), read_idx(label_path, 2049)
    assert read_images.dtype == np.uint8 and np.array_equal(read_images, images)
    assert read_labels.shape == (7,) and np.array_equal(read_labels, labels)


def test_read_idx_dataset_gives_unit_range_float_images_and_int64_labels(tmp_path: Path) -> None:
    raw = _write_dataset(tmp_path / "d")
    x_train, y_train, x_test, y_test = read_idx_dataset(tmp_path / "d")
    assert x_train.shape == (60, 1, 6, 5) and x_test.shape == (20, 1, 6, 5)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert np.array_equal(x_train[:, 0] * 255, raw["train_images"].astype(np.float32))
    assert np.array_equal(y_test, raw["test_labels"]) and 0 <= x_test.min() <= x_test.max() <= 1


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_a_labels_file_in_place_of_images_is_rejected_by_its_magic_number(
    tmp_path: Path, gz: bool
) -> None:
    path = _write_idx(tmp_path / "x", np.zeros(4, np.uint8), IDX_LABELS_MAGIC, gz)
    with pytest.raises(CorruptDatasetError, match=r"bad idx magic number 2049, expected 2051"):
        read_idx(path, IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("cut", [2, 25, 10], ids=["magic", "dims", "data"])
def test_truncated_idx_files_are_rejected_naming_the_file(tmp_path: Path, cut: int) -> None:
    data = _idx_bytes(np.zeros((2, 3, 3), np.uint8), IDX_IMAGES_MAGIC)[:-cut]
    data = data[:2] if cut == 2 else data
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(CorruptDatasetError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_a_broken_gzip_stream_is_a_corrupt_dataset_error(tmp_path: Path) -> None:
    data = gzip.compress(_idx_bytes(np.zeros((20, 8, 8), np.uint8), IDX_IMAGES_MAGIC))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDatasetError, match="not a valid gzip file.*fetch the file again"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_image_and_label_counts_must_match(tmp_path: Path) -> None:
    _write_dataset(tmp_path, gz=False)
    _write_idx(tmp_path / IDX_FILES["test_labels"], np.zeros(19, np.uint8), IDX_LABELS_MAGIC,
               gz=False)
    with pytest.raises(CorruptDatasetError, match="holds 20 images but .* holds 19 labels"):
        read_idx_dataset(tmp_path, "mnist")


def test_labels_outside_the_classes_are_rejected(tmp_path: Path) -> None:
    _write_dataset(tmp_path, gz=False)
    _write_idx(tmp_path / IDX_FILES["test_labels"], np.full(20, 12, np.uint8), IDX_LABELS_MAGIC,
               gz=False)
    with pytest.raises(CorruptDatasetError, match=r"test labels outside 0..9"):
        load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- missing files

def test_missing_fashion_mnist_files_name_every_file_the_folder_and_the_package(
    tmp_path: Path
) -> None:
    with pytest.raises(DatasetFilesNotFoundError) as error:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert str(tmp_path / "nowhere") in message
    assert all(name in message for name in ALL_FILES)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_a_single_missing_mnist_file_is_named_with_how_to_get_it(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    (tmp_path / f"{IDX_FILES['train_labels']}.gz").unlink(missing_ok=True)
    (tmp_path / IDX_FILES["train_labels"]).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="mnist: missing train-labels-idx1-ubyte.gz in"
                       ) as error:
        load_dataset("mnist", data_dir=tmp_path)
    assert all(name in str(error.value) for name in ALL_FILES)
    assert "--data-dir" in str(error.value)


def test_mnist_without_a_data_dir_says_to_pass_one() -> None:
    with pytest.raises(DatasetFilesNotFoundError, match="no data_dir given") as error:
        load_dataset("mnist")
    assert all(name in str(error.value) for name in ALL_FILES)


# ----------------------------------------------------------------------------- standardising

def test_images_are_standardised_with_training_pixel_statistics_only(tmp_path: Path) -> None:
    raw = _write_dataset(tmp_path)
    ds = load_dataset("mnist", data_dir=tmp_path)
    x_train, x_test = ds.train.tensors[0].double(), ds.test.tensors[0].double()
    assert ds.train.tensors[0].dtype == torch.float32 and ds.test.tensors[1].dtype == torch.int64
    assert x_train.shape == (60, 30) and ds.image_shape == (1, 6, 5)
    pixels = raw["train_images"].astype(np.float64) / 255
    assert np.allclose(ds.mean, pixels.mean()) and np.allclose(ds.std, pixels.std())
    assert abs(float(x_train.mean())) < 1e-6 and abs(float(x_train.std(correction=0)) - 1) < 1e-6
    undone = x_test.numpy() * ds.std + ds.mean
    assert np.allclose(undone, raw["test_images"].reshape(20, -1) / 255, atol=1e-6)
    assert float(x_test.mean()) > 0.5  # brighter test images are not centred on their own


def test_fashion_mnist_reads_from_data_dir_when_given(tmp_path: Path) -> None:
    raw = _write_dataset(tmp_path, gz=False)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (ds.n_train, ds.n_test, ds.n_classes) == (60, 20, 10)
    assert ds.class_names is not None and ds.class_names[0] == "T-shirt/top"
    assert torch.equal(ds.test.tensors[1], torch.from_numpy(raw["test_labels"].astype(np.int64)))


# ----------------------------------------------------------------------------- subsets

def test_stratified_subset_keeps_class_proportions_and_is_seeded() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    keep = stratified_subset(labels, 20, seed=0)
    assert len(keep) == 20 and np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [10, 6, 3, 1]
    assert np.array_equal(keep, stratified_subset(labels, 20, seed=0))
    assert not np.array_equal(keep, stratified_subset(labels, 20, seed=1))
    odd = stratified_subset(labels, 33, seed=0)  # shares do not divide evenly
    assert len(odd) == 33 and np.all(np.abs(np.bincount(labels[odd]) - [16.5, 9.9, 4.95, 1.65])
                                     < 1)
    assert np.array_equal(stratified_subset(labels, 1000), np.arange(100))
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        stratified_subset(labels, 3)


def test_load_dataset_subset_caps_only_the_training_split(tmp_path: Path) -> None:
    raw = _write_dataset(tmp_path)
    ds = load_dataset("mnist", data_dir=tmp_path, seed=3, subset=20)
    again = load_dataset("mnist", data_dir=tmp_path, seed=3, subset=20)
    assert (ds.n_train, ds.n_train_available, ds.n_test) == (20, 60, 20)
    assert torch.bincount(ds.train.tensors[1]).tolist() == [2] * 10
    assert torch.equal(ds.train.tensors[0], again.train.tensors[0])
    kept = stratified_subset(raw["train_labels"], 20, seed=3)
    assert np.allclose(ds.mean, raw["train_images"][kept].mean() / 255)  # kept rows only
    digits = load_dataset("digits", subset=100)
    assert len(digits.train) == 100 and digits.n_train_available == 1437
    with pytest.raises(ValueError, match="subset .* positive int"):
        load_dataset("digits", subset=0)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": -1}, ValueError, "seed must be a non-negative int"),
    ({"seed": True}, ValueError, "seed must be a non-negative int"),
    ({"subset": 2.5}, ValueError, "subset .* positive int"),
])
def test_bad_seeds_and_subsets_are_rejected_saying_what_is_expected(
    kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        load_dataset("digits", **kwargs)


def test_a_name_that_is_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="name must be a dataset name"):
        load_dataset(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the Dataset type

def test_load_dataset_returns_a_frozen_typed_dataset() -> None:
    ds = load_dataset("digits", seed=0)
    assert isinstance(ds, Dataset) and (ds.name, ds.kind) == ("digits", "classification")
    assert (ds.n_train, ds.n_test, ds.n_classes, ds.input_dim) == (1437, 360, 10, 64)
    assert len(ds.train) == ds.n_train and len(ds.test) == ds.n_test
    assert ds.mean.shape == ds.std.shape == (64,) and ds.image_shape == (1, 8, 8)
    assert ds.validation is None and ds.max_length is None and ds.t_split is None
    with pytest.raises(AttributeError):
        ds.n_classes = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- Fashion-MNIST

def _write_fashion_mnist(folder: Path) -> dict[str, np.ndarray]:
    """Small 28x28 Fashion-MNIST idx files (gzipped like the Debian package's)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    arrays = {"train_images": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(30) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(10)[::-1] % 10).astype(np.uint8)}
    for key, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        _write_idx(folder / IDX_FILES[key], array, magic, gz=True)
    return arrays


def test_fashion_mnist_reads_the_debian_package_folder_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _write_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "fashion-mnist")
    ds = load_dataset("fashion-mnist")
    assert (ds.kind, ds.image_shape, ds.n_train, ds.n_test) == ("classification", (1, 28, 28),
                                                                30, 10)
    assert ds.class_names is not None and ds.class_names[9] == "Ankle boot"
    assert ds.test.tensors[1].tolist() == raw["test_labels"].tolist()
    pixels = ds.train.tensors[0].double().numpy() * ds.std + ds.mean
    assert np.allclose(pixels, raw["train_images"].reshape(30, -1) / 255, atol=1e-6)
    assert np.allclose(ds.mean, raw["train_images"].mean() / 255)


# ----------------------------------------------------------------------------- the real data

@pytest.mark.system_data
def test_the_real_fashion_mnist_from_the_debian_package_loads() -> None:
    # Opt-in (OCNODE_SYSTEM_DATA=1, set by CI after it installs dataset-fashion-mnist); when
    # on, missing files fail the test instead of skipping it.
    ds = load_dataset("fashion-mnist")
    assert FASHION_MNIST_DIR.is_dir()
    assert tuple(ds.train.tensors[0].shape) == (60000, 784)
    assert tuple(ds.test.tensors[0].shape) == (10000, 784)
    assert ds.n_classes == 10 and ds.image_shape == (1, 28, 28)
    assert torch.bincount(ds.train.tensors[1]).tolist() == [6000] * 10
    assert torch.bincount(ds.test.tensors[1]).tolist() == [1000] * 10
    assert abs(float(ds.mean[0]) - 0.2860) < 1e-3  # the known pixel mean, in [0, 1]
    assert abs(float(ds.train.tensors[0].mean())) < 1e-4


@pytest.mark.parametrize("value, enabled", [(None, False), ("", False), ("0", False),
                                            ("1", True), ("yes", None)])
def test_the_system_data_switch_takes_1_or_0_and_rejects_anything_else(
    monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool | None
) -> None:
    if value is None:
        monkeypatch.delenv(SYSTEM_DATA_ENV, raising=False)
    else:
        monkeypatch.setenv(SYSTEM_DATA_ENV, value)
    if enabled is None:
        with pytest.raises(pytest.UsageError, match=f"{SYSTEM_DATA_ENV} must be 1"):
            system_data_enabled()
    else:
        assert system_data_enabled() is enabled


def test_system_data_tests_are_reported_skipped_saying_how_to_enable_them() -> None:
    env = {k: v for k, v in os.environ.items() if k != SYSTEM_DATA_ENV}
    test = "tests/test_data.py::test_the_real_fashion_mnist_from_the_debian_package_loads"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 skipped" in proc.stdout and f"set {SYSTEM_DATA_ENV}=1 to run it" in proc.stdout
