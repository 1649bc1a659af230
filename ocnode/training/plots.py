"""The pictures a task draws of its trained models (beside the loss curves).

- :func:`plot_trajectories`: trajectory fitting: the data (training, interpolation-test and
  extrapolation-test points) and each model's fitted (solid) and extrapolated (dashed) path.
- :func:`plot_density`: 2-D density estimation: the data, each model's density on a grid and
  its samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: One colour per registered optimizer, the same in every plot.
COLORS = {"adam": "tab:blue", "sgd": "tab:green", "snopt": "tab:red", "kfac": "tab:purple",
          "newton-cg": "tab:orange"}
GRID_LIMIT = 3.5  # density plot: [-L, L]^2 in standardised units
PLOT_POINTS = 200  # points of each drawn trajectory


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def _save(fig: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_trajectories(models: Mapping[str, nn.Module], test: tuple[Tensor, ...],
                      train_mask: Tensor, info: dict[str, Any], path: Path, title: str,
                      rows: int = 4) -> None:
    """Data and fits of trajectory models, in the data's raw units.

    Args:
        models: name -> model called as ``model(x0 (B, D), t (P,)) -> (P, B, D)``.
        test: ``(values (N, L, D), times (N, L), interp (N, L), extrap (N, L))``.
        train_mask: ``(N, L)`` bool, the training observations.
        info: ``mean``, ``std`` ((D,) arrays), ``t_split`` and ``t_end`` (floats).
        path: the PNG to write.
        title: the figure's title.
        rows: trajectories drawn per panel.
    """
    values, _, interp, extrap = test
    rows = min(len(values), rows)
    mean, std = np.asarray(info["mean"]), np.asarray(info["std"])
    grid = torch.linspace(0.0, float(info["t_end"]), PLOT_POINTS)
    fitted = grid <= float(info["t_split"])
    raw = values[:rows].double().numpy() * std + mean
    fig, axes = _figure(1, len(models), (3.6 * len(models), 3.8))
    for ax, (name, model) in zip(axes[0], models.items()):
        model.eval()
        curves = model(values[:rows, 0], grid).double().numpy() * std + mean  # (P, rows, D)
        for i in range(rows):
            color = f"C{i}"
            ax.plot(*curves[fitted, i].T, color=color, lw=1.2)
            ax.plot(*curves[~fitted, i].T, color=color, lw=1.2, ls="--")
            for mask, marker, label in ((train_mask[i], "o", "train"), (interp[i], "s", "interp"),
                                        (extrap[i], "^", "extrap")):
                ax.scatter(*raw[i][mask.numpy()].T, s=10, color=color, marker=marker,
                           facecolors="none" if label != "train" else color,
                           label=label if i == 0 else None)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=7)
    _save(fig, path, f"{title}: data and fits (solid: training window, dashed: extrapolation)")


@torch.no_grad()
def plot_density(models: Mapping[str, nn.Module], data: Tensor, path: Path, title: str,
                 points: int = 100, n_samples: int = 1500) -> None:
    """Top row: the data's histogram and each model's ``exp(log p)`` on a grid; bottom row:
    the data and each model's samples.

    Args:
        models: name -> a :class:`ocnode.nn.CNF` (``log_prob`` and ``sample``).
        data: ``(N, 2)`` points to show.
        path: the PNG to write.
        title: the figure's title.
        points: grid points per side.
        n_samples: samples drawn per model.
    """
    side = torch.linspace(-GRID_LIMIT, GRID_LIMIT, points)
    grid = torch.cartesian_prod(side, side)  # rows (x_i, y_j), x slowest
    extent = (-GRID_LIMIT, GRID_LIMIT, -GRID_LIMIT, GRID_LIMIT)
    fig, axes = _figure(2, len(models) + 1, (2.6 * (len(models) + 1), 5.4))
    axes[0, 0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=60,
                      range=[extent[:2], extent[2:]], cmap="viridis")
    axes[1, 0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.5, color="k")
    axes[0, 0].set_title("test data")
    for col, (name, model) in enumerate(models.items(), start=1):
        model.eval()
        density = model.log_prob(grid).exp().reshape(points, points)  # type: ignore[operator]
        samples = model.sample(n_samples,  # type: ignore[operator]
                               generator=torch.Generator().manual_seed(0))
        axes[0, col].imshow(density.T.numpy(), origin="lower", extent=extent, cmap="viridis")
        axes[1, col].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5,
                             color=COLORS.get(name, "k"))
        axes[0, col].set_title(name)
    for ax in axes.flat:
        ax.set(xlim=extent[:2], ylim=extent[2:], xticks=[], yticks=[], aspect="equal")
    axes[0, 0].set_ylabel("density")
    axes[1, 0].set_ylabel("samples")
    _save(fig, path, f"{title}: learned densities and samples")
