"""The training loop shared by the ``ocnode`` command and the experiments.

``train(TrainConfig(...))`` trains a classifier and writes to ``config.out``:

- ``metrics.csv``: one row per logging step (columns :data:`METRIC_COLUMNS`). ``wall_time``
  is training time only: the clock pauses while evaluating and checkpointing.
  ``nfe_forward``/``nfe_backward`` are the vector-field evaluations per iteration (summed
  over the model's ODE blocks), averaged over the iterations since the previous row; ``t1``
  is the horizon at the row's time (mean over the ODE blocks; NaN without blocks).
- ``checkpoint.pt``: written atomically at the end of every epoch, with the model, the
  optimizer, the counters, the elapsed training time and every RNG state, so that
  ``resume=True`` continues bit-identically to an uninterrupted run (SNOpt's factors,
  eigenbases and second moments, and the horizon optimizer's averages, included).
- ``curves.png``: train loss and test accuracy against wall-clock time.

Models and optimizers come from the registries :data:`MODELS` and :data:`OPTIMIZERS`.
With ``adaptive_t1`` other than ``"off"``, the ODE blocks get a trainable horizon ``t1``,
which the parameter optimizer leaves out and a :class:`ocnode.optim.HorizonOptimizer` per
block updates (ALGORITHM.md section 1.7)::

    loss.backward(); horizon.observe(); optimizer.step(); horizon.step()
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ocnode.data import DATASETS, load_dataset
from ocnode.nn import ConvODEClassifier, MLPODEClassifier, ode_blocks
from ocnode.optim import HorizonOptimizer, SNOpt

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
CURVES = "curves.png"
METRIC_COLUMNS = ("step", "epoch", "wall_time", "train_loss", "test_loss", "test_acc",
                  "nfe_forward", "nfe_backward", "lr", "t1")
#: Choices of ``TrainConfig.damping``, ``.fisher`` and ``.adaptive_t1``.
DAMPINGS = ("ekfac", "tikhonov")
FISHERS = ("empirical", "true")
ADAPTIVE_T1 = ("off", "baseline", "feedback")
# Fields that may change when a run is resumed; any other change would break bit-identity.
_RESUMABLE_FIELDS = {"epochs", "out", "resume", "overwrite", "device", "progress",
                     "log_every", "eval_batch_size"}


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on.

    Attributes:
        dataset: a key of ``ocnode.data.DATASETS``.
        data_dir: folder with the dataset files, for datasets read from disk (None: the
            dataset's default folder, e.g. the Debian package's for ``"fashion-mnist"``).
        train_size: cap the training split at this many examples (a stratified draw seeded
            by ``seed``); None uses all. The test split is never reduced.
        model: a key of :data:`MODELS` (``"mlp"`` or ``"conv"``).
        width: ODE state width (MLP) or channels (conv).
        optimizer: a key of :data:`OPTIMIZERS`: ``"adam"``, ``"sgd"``, ``"snopt"``
            (:class:`ocnode.optim.SNOpt`) or ``"kfac"`` (SNOpt with ``alpha = 1``: plain K-FAC
            with eigenvalue damping).
        lr, weight_decay: optimizer hyperparameters.
        momentum: SGD/SNOpt momentum (Adam ignores it); None: 0.9 for ``"sgd"``, 0 for
            ``"snopt"``/``"kfac"`` (the SNOpt authors' defaults).
        eps, alpha, update_freq, full, damping, observer_dt, fisher, stats_batch: SNOpt/K-FAC
            settings (ALGORITHM.md 1.5-1.6): damping epsilon; EKFAC second-moment rate
            (``"kfac"`` fixes it to 1); refresh period of the factors in iterations; also
            precondition the layers outside ODE blocks; ``"ekfac"`` or ``"tikhonov"``
            damping; spacing of the curvature grid along each adjoint solve (None: 0.01 of
            the horizon); ``"empirical"`` or ``"true"`` Fisher; samples per batch used for
            the ODE-block statistics (None: all). Other optimizers ignore them.
        lr_decay: the learning rate of epoch e (from 0) is ``lr * lr_decay**e``; 1 keeps it
            constant. A per-epoch factor, so extending ``epochs`` on resume stays exact.
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: training batch size.
        seed: seeds torch, numpy, python and the data split and shuffling.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        out: output folder.
        resume: continue the run saved in ``out``.
        overwrite: start a new run in an ``out`` that already holds one.
        method, rtol, atol, step_size, adjoint, t1: ODE block settings (``step_size`` for
            fixed-step methods; ``t1`` is the initial horizon when it is adaptive).
        adaptive_t1: ``"off"`` (fixed horizon), ``"baseline"`` (first-order open loop) or
            ``"feedback"`` (SNOpt's second-order policy) optimisation of the horizon t1.
        t1_lr, t1_reg, t1_update_freq, t1_min: the horizon optimizer's step size eta_T,
            T^2 regularisation c, iterations between T updates and lower bound of T.
        log_every: a metrics row (with a test evaluation) every this many steps, and at
            the end of every epoch.
        eval_batch_size: batch size of the test evaluation.
        progress: show a tqdm progress bar.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    train_size: int | None = None
    model: str = "mlp"
    width: int = 64
    optimizer: str = "adam"
    lr: float = 1e-2
    momentum: float | None = None
    weight_decay: float = 0.0
    eps: float = 0.05
    alpha: float = 0.75
    update_freq: int = 100
    full: bool = False
    damping: str = "ekfac"
    observer_dt: float | None = None
    fisher: str = "empirical"
    stats_batch: int | None = None
    lr_decay: float = 0.8
    epochs: int = 15
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    out: str = "runs/ocnode"
    resume: bool = False
    overwrite: bool = False
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    step_size: float | None = None
    adjoint: bool = True
    t1: float = 1.0
    adaptive_t1: str = "off"
    t1_lr: float = 0.1
    t1_reg: float = 1e-4
    t1_update_freq: int = 50
    t1_min: float = 0.1
    log_every: int = 10
    eval_batch_size: int = 1024
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError, saying what to change, if the configuration cannot run."""
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("damping", self.damping, DAMPINGS)
        _check_choice("fisher", self.fisher, FISHERS)
        _check_choice("adaptive_t1", self.adaptive_t1, ADAPTIVE_T1)
        positive = {"lr": self.lr, "rtol": self.rtol, "atol": self.atol, "t1": self.t1,
                    "eps": self.eps, "t1_lr": self.t1_lr, "t1_min": self.t1_min}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        at_least_one = {"epochs": self.epochs, "batch_size": self.batch_size,
                        "log_every": self.log_every, "width": self.width,
                        "eval_batch_size": self.eval_batch_size,
                        "update_freq": self.update_freq, "t1_update_freq": self.t1_update_freq}
        for name, value in at_least_one.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be >= 1 (an int), got {value!r}")
        for name, opt in {"step_size": self.step_size, "observer_dt": self.observer_dt}.items():
            if opt is not None and not opt > 0:
                raise ValueError(f"{name} must be > 0 or None, got {opt}")
        if self.stats_batch is not None and (not isinstance(self.stats_batch, int)
                                             or self.stats_batch < 1):
            raise ValueError(f"stats_batch must be an int >= 1 or None, got {self.stats_batch!r}")
        if self.train_size is not None and (not isinstance(self.train_size, int)
                                            or self.train_size < 1):
            raise ValueError(f"train_size must be an int >= 1 or None, got {self.train_size!r}")
        self._validate_rates()
        resolve_device(self.device)

    def _validate_rates(self) -> None:
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        momentum = self.momentum if self.momentum is not None else 0.0
        if not 0 <= momentum < 1 or self.weight_decay < 0:
            raise ValueError("momentum must be in [0, 1) and weight_decay >= 0, got "
                             f"{self.momentum} and {self.weight_decay}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (EKFAC second-moment rate) must be in [0, 1], got "
                             f"{self.alpha}; 1 freezes the second moments (plain K-FAC)")
        if self.t1_reg < 0:
            raise ValueError(f"t1_reg must be >= 0, got {self.t1_reg}")
        if self.adaptive_t1 != "off" and self.t1_min > self.t1:
            raise ValueError(f"t1_min ({self.t1_min}) must not exceed the initial horizon t1 "
                             f"({self.t1}); lower t1_min or raise t1")


def _check_choice(field: str, value: str, registry: Collection[str]) -> None:
    if value not in registry:
        raise ValueError(f"unknown {field} {value!r}; choose one of {', '.join(sorted(registry))}")


# ----------------------------------------------------------------------------- registries

def _block_kwargs(config: TrainConfig) -> dict[str, Any]:
    options = {"step_size": config.step_size} if config.step_size is not None else None
    return {"method": config.method, "rtol": config.rtol, "atol": config.atol,
            "adjoint": config.adjoint, "t1": config.t1, "options": options,
            "trainable_t1": config.adaptive_t1 != "off"}


def _build_mlp(config: TrainConfig, info: dict[str, Any]) -> nn.Module:
    return MLPODEClassifier(info["input_dim"], info["n_classes"], hidden=config.width,
                            **_block_kwargs(config))


def _build_conv(config: TrainConfig, info: dict[str, Any]) -> nn.Module:
    shape = tuple(info["image_shape"])
    return nn.Sequential(
        nn.Unflatten(1, shape),
        ConvODEClassifier(shape[0], info["n_classes"], channels=config.width,
                          **_block_kwargs(config)),
    )


def horizon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable horizons (``t1`` parameters) of the model's ODE blocks."""
    return [b.t1_tensor for b in ode_blocks(model) if isinstance(b.t1_tensor, nn.Parameter)]


def optimizer_parameters(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """The parameters the parameter optimizer trains: all of them, except the horizons
    when a horizon optimizer owns them (``adaptive_t1`` on)."""
    if config.adaptive_t1 == "off":
        return list(model.parameters())
    horizons = {id(p) for p in horizon_parameters(model)}
    return [p for p in model.parameters() if id(p) not in horizons]


def _momentum(config: TrainConfig, default: float) -> float:
    return default if config.momentum is None else config.momentum


def _build_adam(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(optimizer_parameters(model, config), lr=config.lr,
                            weight_decay=config.weight_decay)


def _build_sgd(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(optimizer_parameters(model, config), lr=config.lr,
                           momentum=_momentum(config, 0.9), weight_decay=config.weight_decay)


def _build_snopt(model: nn.Module, config: TrainConfig,
                 alpha: float | None = None) -> torch.optim.Optimizer:
    return SNOpt(model, lr=config.lr, momentum=_momentum(config, 0.0),
                 weight_decay=config.weight_decay, eps=config.eps,
                 alpha=config.alpha if alpha is None else alpha,
                 update_freq=config.update_freq, full=config.full, damping=config.damping,
                 observer_dt=config.observer_dt, fisher=config.fisher,
                 stats_batch=config.stats_batch, params=optimizer_parameters(model, config))


def _build_kfac(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SNOpt with frozen second moments (alpha = 1): K-FAC with eigenvalue damping."""
    return _build_snopt(model, config, alpha=1.0)


ModelBuilder = Callable[[TrainConfig, dict[str, Any]], nn.Module]
OptimizerBuilder = Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
#: name -> builder(config, dataset info) returning a classifier of ``(B, input_dim)`` rows.
MODELS: dict[str, ModelBuilder] = {"mlp": _build_mlp, "conv": _build_conv}
#: name -> builder(model, config). Builders get the model, not only its parameters,
#: because curvature-based optimizers hook its layers.
OPTIMIZERS: dict[str, OptimizerBuilder] = {"adam": _build_adam, "sgd": _build_sgd,
                                            "snopt": _build_snopt, "kfac": _build_kfac}


# ----------------------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; "
                         "use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stopwatch:
    """A wall clock that can be paused; ``elapsed()`` counts running time only."""

    def __init__(self, offset: float = 0.0) -> None:
        self._total = offset
        self._since: float | None = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds counted so far, the offset included."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._total + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop counting inside the ``with`` body."""
        self._total, self._since = self.elapsed(), None
        try:
            yield
        finally:
            self._since = time.perf_counter()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash or error at any point leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _rng_states(loader_generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state())
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    loader_generator.set_state(states["loader"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class MetricsLog:
    """Rows of :data:`METRIC_COLUMNS` appended to a CSV file, flushed row by row."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start(self, keep_until_step: int | None = None) -> None:
        """Begin a fresh file, or keep the rows with ``step <= keep_until_step`` (resume)."""
        rows = [] if keep_until_step is None else [
            r for r in self._read_text() if float(r["step"]) <= keep_until_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, float]) -> None:
        """Append one row (keys :data:`METRIC_COLUMNS`)."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS).writerow(row)

    def read(self) -> list[dict[str, float]]:
        """All rows, values as floats."""
        return [{k: float(v) for k, v in row.items()} for row in self._read_text()]

    def _read_text(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Save train loss and test accuracy against wall-clock time as a PNG (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    wall = [r["wall_time"] for r in rows]
    ax_loss.plot(wall, [r["train_loss"] for r in rows])
    ax_loss.set(xlabel="wall-clock time [s] (excl. evaluation)", ylabel="train loss",
                yscale="log")
    ax_acc.plot(wall, [r["test_acc"] for r in rows])
    ax_acc.set(xlabel="wall-clock time [s] (excl. evaluation)", ylabel="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    model.train(was_training)
    return loss_sum / count, correct / count


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class _Window:
    """Training statistics accumulated since the last metrics row."""

    loss_sum: float = 0.0
    nfe_forward: int = 0
    nfe_backward: int = 0
    steps: int = 0

    def means(self) -> tuple[float, float, float]:
        n = max(self.steps, 1)
        return self.loss_sum / n, self.nfe_forward / n, self.nfe_backward / n


class _Run:
    """One training run: the objects a step needs, its counters and its files."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.out = config, Path(config.out)
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        train_set, test_set, info = load_dataset(config.dataset, config.data_dir, config.seed,
                                                 subset=config.train_size)
        if info.get("kind", "classification") != "classification":
            raise ValueError(f"dataset {config.dataset!r} is a {info['kind']} dataset; "
                             "`ocnode train` trains classifiers on classification datasets "
                             "(digits, fashion-mnist, mnist, mnist5k, fmnist32, cifar10, svhn)")
        self.model = MODELS[config.model](config, info).to(self.device)
        self.optimizer = OPTIMIZERS[config.optimizer](self.model, config)
        self.horizons = _build_horizons(self.model, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_loader = DataLoader(train_set, config.batch_size, shuffle=True,
                                       generator=self.generator)
        self.test_loader = DataLoader(test_set, config.eval_batch_size)
        self.blocks = ode_blocks(self.model)
        self.log = MetricsLog(self.out / METRICS)
        self.epoch = self.step = 0
        self.saved_wall_time = 0.0  # training time of the epochs done before resuming
        self.clock = Stopwatch()
        self.window = _Window()

    def save_checkpoint(self) -> None:
        atomic_torch_save({
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "horizon": [h.state_dict() for h in self.horizons],
            "epoch": self.epoch,
            "step": self.step,
            "wall_time": self.clock.elapsed(),
            "rng": _rng_states(self.generator),
        }, self.out / CHECKPOINT)

    def load_checkpoint(self) -> None:
        ckpt = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=True)
        _check_resumable(ckpt["config"], self.config)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        saved_horizons = ckpt.get("horizon", [])
        if len(saved_horizons) != len(self.horizons):
            raise ValueError(f"cannot resume {self.out}: the checkpoint holds "
                             f"{len(saved_horizons)} horizon optimizer states, the model needs "
                             f"{len(self.horizons)}")
        for horizon, state in zip(self.horizons, saved_horizons):
            horizon.load_state_dict(state)
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.saved_wall_time = ckpt["wall_time"]
        _set_rng_states(ckpt["rng"], self.generator)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(self._diverged_message(value))
        self.window.nfe_forward += sum(b.nfe_forward for b in self.blocks)
        loss.backward()
        self.window.nfe_backward += sum(b.nfe_backward for b in self.blocks)
        for horizon in self.horizons:
            horizon.observe()  # reads dL/dT and clears t1's gradient
        self.optimizer.step()
        for horizon in self.horizons:
            horizon.step()
        self.window.loss_sum += value
        self.window.steps += 1
        self.step += 1

    def log_metrics(self) -> dict[str, float]:
        wall_time = self.clock.elapsed()
        with self.clock.paused():
            test_loss, test_acc = evaluate(self.model, self.test_loader, self.device)
            train_loss, nfe_forward, nfe_backward = self.window.means()
            self.window = _Window()
            row = {"step": self.step, "epoch": self.step / len(self.train_loader),
                   "wall_time": wall_time, "train_loss": train_loss, "test_loss": test_loss,
                   "test_acc": test_acc, "nfe_forward": nfe_forward,
                   "nfe_backward": nfe_backward, "lr": self.optimizer.param_groups[0]["lr"],
                   "t1": self.current_t1()}
            self.log.append(row)
        return row

    def current_t1(self) -> float:
        """The current integration horizon (mean over the ODE blocks; NaN without blocks)."""
        return sum(b.t1 for b in self.blocks) / len(self.blocks) if self.blocks else math.nan

    def run(self) -> dict[str, float]:
        config, n_batches = self.config, len(self.train_loader)
        self.clock = Stopwatch(self.saved_wall_time)
        with tqdm(total=config.epochs * n_batches, initial=self.step, unit="step",
                  desc="train", disable=not config.progress, dynamic_ncols=True) as bar:
            for epoch in range(self.epoch, config.epochs):
                _set_epoch_lr(self.optimizer, config.lr_decay**epoch)
                for i, (x, y) in enumerate(self.train_loader):
                    self.train_step(x, y)
                    bar.update(1)
                    if self.step % config.log_every == 0 or i == n_batches - 1:
                        row = self.log_metrics()
                        bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                                        acc=f"{row['test_acc']:.4f}")
                self.epoch = epoch + 1
                with self.clock.paused():
                    self.save_checkpoint()
        rows = self.log.read()
        plot_curves(rows, self.out / CURVES)
        return rows[-1]

    def _diverged_message(self, value: float) -> str:
        path = self.out / CHECKPOINT
        kept = (f"the last good checkpoint, {path} (epoch {self.epoch}), is left untouched"
                if path.exists() else "no checkpoint had been written yet")
        return (f"training loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}; "
                f"stopped before the optimizer step, and {kept}. Start a new run with a "
                f"smaller lr (now {self.config.lr:g}), tighter rtol/atol or weight decay.")


def _build_horizons(model: nn.Module, config: TrainConfig) -> list[HorizonOptimizer]:
    """One horizon optimizer per ODE block when ``adaptive_t1`` is on, else none."""
    if config.adaptive_t1 == "off":
        return []
    blocks = [b for b in ode_blocks(model) if isinstance(b.t1_tensor, nn.Parameter)]
    if not blocks:
        raise ValueError(f"adaptive_t1={config.adaptive_t1!r} needs a model whose ODE blocks "
                         f"have a trainable t1; model {config.model!r} has none: use "
                         "adaptive_t1='off' or a model built from TrainConfig's block settings")
    return [HorizonOptimizer(b, policy=config.adaptive_t1, lr=config.t1_lr, reg=config.t1_reg,
                             update_freq=config.t1_update_freq, t_min=config.t1_min)
            for b in blocks]


def _set_epoch_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    now = dataclasses.asdict(config)
    changed = sorted(k for k in now if k not in _RESUMABLE_FIELDS and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {config.out}: the settings differ from the saved run "
                         f"({diffs}); resume with the same settings, or start a new run "
                         "in another out folder")


def _prepare_out(config: TrainConfig) -> None:
    out = Path(config.out)
    checkpoint = out / CHECKPOINT
    if config.resume and not checkpoint.exists():
        raise ValueError(f"resume: there is no checkpoint at {checkpoint}; run without "
                         "resume to start a new run there, or point out at the run's folder")
    if not config.resume and checkpoint.exists():
        if not config.overwrite:
            raise ValueError(f"{out} already holds a run ({checkpoint}); pass resume to "
                             "continue it, overwrite to start over, or choose another out")
        checkpoint.unlink()
    out.mkdir(parents=True, exist_ok=True)


def train(config: TrainConfig) -> dict[str, float]:
    """Train a classifier as configured and write metrics, checkpoints and curves.

    Args:
        config: the run's settings.

    Returns:
        The last metrics row (keys :data:`METRIC_COLUMNS`).

    Raises:
        ValueError: bad settings, a missing checkpoint with ``resume``, or an ``out`` that
            already holds a run without ``resume``/``overwrite``.
        FloatingPointError: the training loss became NaN or infinite.
    """
    config.validate()
    _prepare_out(config)
    run = _Run(config)
    if config.resume:
        run.load_checkpoint()
    run.log.start(keep_until_step=run.step if config.resume else None)
    return run.run()
