"""The data types of :mod:`ocnode.data`: raw series and trajectories, and the loaded
:class:`Dataset` that :func:`~ocnode.data.load_dataset` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch.utils.data import TensorDataset

#: ``(x_train, y_train, x_test, y_test)`` numpy arrays of a fixed train/test split.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
#: The four shapes of dataset :func:`~ocnode.data.load_dataset` returns (see :class:`Dataset`).
Kind = Literal["classification", "density", "series", "trajectories"]
#: How inputs are standardised: one mean/std per input ("feature"), one for all ("global"),
#: or one per channel, the second axis ("channel").
Standardise = Literal["feature", "global", "channel"]


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


@dataclass(frozen=True, kw_only=True)
class Description:
    """What a loader states about its dataset; :class:`Dataset` adds the data itself.

    The attributes are those of :class:`Dataset` of the same names.
    """

    kind: Kind
    n_classes: int
    image_shape: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    source: str | None = None
    split: str | None = None
    max_length: int | None = None
    n_channels: int | None = None
    stand_in_for: tuple[str, ...] | None = None
    lasa_shape: str | None = None
    t_split: float | None = None
    t_end: float | None = None
    time_step: float | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class Dataset(Description):
    """A loaded dataset: train and test splits standardised with training statistics.

    Frozen; compared by identity (``==`` is ``is``); its repr leaves out the data.

    What ``train`` and ``test`` hold depends on ``kind`` (N rows, D = ``input_dim``):

    - ``"classification"`` and ``"density"``: ``(inputs (N, D) float32, labels (N,) int64)``.
      Images are flattened rows; ``image_shape`` says how to reshape one into ``(C, H, W)``.
      Unlabelled density sets (toys, MiniBooNE, Gas) have every label 0 and ``n_classes`` 1.
      Log-densities of standardised rows convert to raw units by ``- sum(log(std))``.
    - ``"series"`` (see :class:`Series`): ``(values (N, T, C) float32, times (N, T) float32,
      mask (N, T) bool, labels (N,) int64)``, T = ``max_length``, C = D; values are
      standardised per channel with the observed training steps, unobserved steps are 0.
    - ``"trajectories"`` (see :class:`Trajectories`): both splits hold the same N
      trajectories on the same L padded steps (L = ``max_length``; step 0 is each initial
      state, at one common time t0). ``train``: ``(values (N, L, D) float32, times (N, L)
      float32, mask (N, L) bool)``, ``mask`` the training observations, values 0 elsewhere
      (held-out values are not in it). ``test``: ``(values (N, L, D) float32, times (N, L)
      float32, interp (N, L) bool, extrap (N, L) bool)`` with every observed value (step 0
      included, so a model can start from it), ``interp`` the held-out points of the
      training window ``t <= t_split`` and ``extrap`` the points after it. Values are
      standardised per channel with the training observations; a ``subset`` keeps the same
      trajectories in both splits.

    Attributes:
        name: the name it was loaded by (e.g. ``"digits"``, ``"uea:Toy"``, ``"lasa:Angle"``).
        kind: ``"classification"``, ``"density"``, ``"series"`` or ``"trajectories"``.
        train: the (possibly capped) training split, a ``TensorDataset`` as above.
        test: the test split, never capped.
        n_classes: number of classes (1 for unlabelled sets and trajectories).
        input_dim: D, the size of one standardised row, channels of a series, or the state
            dimension of a trajectory.
        n_train: rows of ``train`` (after ``subset``).
        n_train_available: training rows before ``subset``.
        n_test: rows of ``test``.
        mean: ``(D,)`` float64 training mean the inputs were centred with (for the 8-bit
            image sets in [0, 1] pixel units, repeated over the pixels it applies to).
        std: ``(D,)`` float64 training std the inputs were divided by (same units).
        image_shape: how one row reshapes into ``(C, H, W)``; None if not images.
        class_names: the class names, index = label; None where the loader has none.
        source: where the data came from (a folder, a package, a generator); None if obvious.
        split: how train and test were split; None for a dataset's official split.
        max_length: T of series or L of trajectories, the padded length; None otherwise.
        n_channels: C, the channels of a series (equal to ``input_dim``); None otherwise.
        validation: the standardised validation split (MiniBooNE, Gas), as ``train``;
            None where the dataset has none.
        stand_in_for: the datasets this one stands in for (``fmnist32``); None otherwise.
        lasa_shape: the LASA handwriting shape (e.g. ``"Angle"``); None for other datasets.
        t_split: trajectories: the training window's end; None otherwise.
        t_end: trajectories: the time window's end; None otherwise.
        time_step: trajectories: the spacing of the time grid all observations lie on;
            None otherwise.
    """

    name: str
    train: TensorDataset = field(repr=False)
    test: TensorDataset = field(repr=False)
    input_dim: int
    n_train: int
    n_train_available: int
    n_test: int
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    validation: TensorDataset | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class RawSplits:
    """What a loader returns: the raw (unstandardised) splits and how to standardise them.

    Attributes:
        x_train: ``(N, ...)`` inputs, :class:`Series` or :class:`Trajectories`.
        y_train: ``(N,)`` int64 labels (zeros where unlabelled).
        x_test: test inputs of the same type (the same trajectories for trajectories).
        y_test: test labels.
        description: what the loader states about the dataset.
        standardise: the statistics for array inputs, see :data:`Standardise`.
        pixel_scale: the inputs' raw unit (255 for uint8 pixels): mean and std are reported
            divided by it.
        validation: raw ``(inputs, labels)`` of a validation split, or None.
    """

    x_train: np.ndarray | Series | Trajectories
    y_train: np.ndarray
    x_test: np.ndarray | Series | Trajectories
    y_test: np.ndarray
    description: Description
    standardise: Standardise = "feature"
    pixel_scale: float = 1.0
    validation: tuple[np.ndarray, np.ndarray] | None = None
