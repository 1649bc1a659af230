"""Tasks: what to train on a dataset, with which model, loss and metric.

A :class:`Task` is everything the training loop (:func:`ocnode.training.train`) and the
comparison harness (:mod:`ocnode.training.compare`) need to know about one problem: its data,
how to build a fresh model, the training loss, the held-out evaluation and its metric
column, the batch size and the hyperparameters tuned for it. :func:`make_task` builds one
from a loaded dataset; the dataset's kind picks the task unless ``settings.task`` says
otherwise:

============== =================== ================= ============ ============================
task           dataset kinds       models            metric       loss
============== =================== ================= ============ ============================
classification classification      mlp (default),    test_acc     cross-entropy
                                   conv (images),
                                   fcn, cnn (images),
                                   resmlp, resnet
                                   (images)
series         series              odernn            test_acc     cross-entropy (ODE-RNN)
trajectory     trajectories        ode (default),    test_mse     masked MSE (ode); Gaussian
                                   sde                            NLL of one path (sde)
density        density,            cnf               test_nll     NLL in nats (CNF)
               classification
============== =================== ================= ============ ============================

Every task reports ``test_loss`` beside its metric (the same number for ``test_nll`` and
``test_mse``); trajectory tasks add ``extrap_mse`` (after the training window) and
``train_mse``. Adding a task: write its builder (a function of the dataset and the
settings returning a :class:`Task`) and add it to :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ocnode.data import Dataset
from ocnode.nn import (
    CNF,
    ConvODEClassifier,
    MLPODEClassifier,
    ODERNNClassifier,
    Residual,
    TrajectoryODE,
)
from ocnode.nn.sde import NeuralSDE, sde_mse
from ocnode.nn.trajectory import trajectory_mse
from ocnode.training import plots
from solvers import SolverSpec

Batch = Any  # a tuple of tensors from the task's TensorDataset
Plot = Callable[[Mapping[str, nn.Module], Path], None]


@dataclass
class TaskSettings:
    """The choices a caller makes when building a task (None: the task's default).

    Attributes:
        task: a key of :data:`TASKS`; None picks the dataset kind's task.
        model: one of the task's models; None: its first.
        width: the model's width (hidden units or channels).
        batch_size: training batch size.
        solver: the ODE blocks' solver settings (``adjoint`` is set per optimizer); None:
            the task's default.
        solver_changes: ``method``, ``rtol``, ``atol``, ``step_size``, ``checkpoint`` (for
            the models that backpropagate through the solver) to change in that
            solver (a new method drops the old method's options).
        t1: the integration horizon; trainable_t1: let a horizon optimizer move it.
        test_size: evaluate on a fixed random subset of this many test rows (seed 1234, the
            same for every run); None: the whole test split.
        eval_batch_size: batch size of the evaluation.
        max_length: series only: keep the first this many steps (smoke runs).
        label: the task's name in result folders (default ``<task>-<dataset>``).
    """

    task: str | None = None
    model: str | None = None
    width: int | None = None
    batch_size: int | None = None
    solver: SolverSpec | None = None
    solver_changes: dict[str, Any] = field(default_factory=dict)
    t1: float = 1.0
    trainable_t1: bool = False
    test_size: int | None = None
    eval_batch_size: int = 1024
    max_length: int | None = None
    label: str | None = None


@dataclass
class Task:
    """One training problem.

    Attributes:
        name: the task's key in :data:`TASKS`, e.g. ``"classification"``.
        label: its name in result folders, e.g. ``"classification-digits"``.
        model_name: the model it trains.
        dataset: the loaded data.
        metric: the column by which runs are compared, e.g. ``"test_acc"``.
        higher_is_better: the metric's direction.
        columns: the keys ``evaluate`` returns, in the order of ``metrics.csv``.
        build_model: ``build_model(adjoint)`` returns a fresh model (seed torch first for
            reproducible weights); ``adjoint=False`` backpropagates through the solver.
        loss: ``loss(model, batch)``, the scalar training loss with its graph.
        evaluate: ``evaluate(model)``, the held-out metrics (the caller turns grad off).
        batch_size: training batch size.
        hparams: optimizer name -> hyperparameters tuned for this task (over the registry's
            defaults).
        plot: ``plot(models, path)`` draws the task's picture (None: no picture).
        logits: the model's output is cross-entropy logits (SNOpt's true Fisher needs it).
        chain: the model is an ``nn.Sequential`` chain of layers (and Residual blocks)
            without ODE blocks: what DDPNOpt (plain chains only) and DGNOpt train.
        residual: the model has ``ocnode.Residual`` blocks (skip connections).
    """

    name: str
    label: str
    model_name: str
    dataset: Dataset
    metric: str
    higher_is_better: bool
    columns: tuple[str, ...]
    build_model: Callable[[bool], nn.Module]
    loss: Callable[[nn.Module, Batch], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    batch_size: int
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    plot: Plot | None = None
    logits: bool = False
    chain: bool = False
    residual: bool = False

    def loader(self, generator: torch.Generator, drop_last: bool = False) -> DataLoader:
        """Shuffled training batches of one epoch, drawn with ``generator``."""
        return DataLoader(self.dataset.train, self.batch_size, shuffle=True,
                          generator=generator, drop_last=drop_last)

    def batches(self, seed: int) -> Iterator[Batch]:
        """Shuffled training batches forever (each pass drops its last partial batch); the
        same seed, the same sequence."""
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(self.dataset.train, min(self.batch_size, len(self.dataset.train)),
                            shuffle=True, generator=gen, drop_last=True)
        while True:
            yield from loader


# ----------------------------------------------------------------------------- helpers

def _test_tensors(ds: Dataset, size: int | None) -> tuple[Tensor, ...]:
    """The test split's tensors, or a fixed random subset of ``size`` rows (seed 1234)."""
    tensors = ds.test.tensors
    if size is None or size >= len(tensors[0]):
        return tensors
    keep = torch.randperm(len(tensors[0]), generator=torch.Generator().manual_seed(1234))[:size]
    return tuple(t[keep] for t in tensors)


def _in_batches(tensors: tuple[Tensor, ...], batch: int) -> Iterator[tuple[Tensor, ...]]:
    for i in range(0, len(tensors[0]), batch):
        yield tuple(t[i:i + batch] for t in tensors)


def _solver(settings: TaskSettings, default: SolverSpec) -> Callable[[bool], SolverSpec]:
    """``adjoint -> SolverSpec``: the settings' solver (or the task's), with their changes."""
    spec, changes = settings.solver or default, dict(settings.solver_changes)
    if changes:
        method = changes.pop("method", spec.method)
        options = dict(spec.options or {}) if method == spec.method else {}
        if "step_size" in changes:
            options["step_size"] = changes.pop("step_size")
        checkpoint = changes.pop("checkpoint", spec.checkpoint)
        spec = replace(spec, method=method, options=options or None, adjoint=False,
                       checkpoint=checkpoint, **changes)
    # a checkpointed solve is a way of backpropagating: it applies where adjoint is False
    return lambda adjoint: replace(spec, adjoint=adjoint,
                                   checkpoint=spec.checkpoint and not adjoint)


def _pick_model(task: str, settings: TaskSettings, models: tuple[str, ...]) -> str:
    model = settings.model or models[0]
    if model not in models:
        raise ValueError(f"the {task} task trains the models {', '.join(models)}, not "
                         f"{model!r}; pick one with --model")
    return model


def _label(settings: TaskSettings, task: str, ds: Dataset) -> str:
    return settings.label or f"{task}-{ds.name.replace(':', '-')}"


# ----------------------------------------------------------------------------- classification

def _classification_metrics(model: nn.Module, test: tuple[Tensor, ...],
                            batch: int) -> dict[str, float]:
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for x, y in _in_batches(test, batch):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
    return {"test_loss": loss_sum / len(test[1]), "test_acc": correct / len(test[1])}


def _paper_fcn(d_in: int, n_classes: int, width: int) -> nn.Sequential:
    """The DDPNOpt paper's FCN: 5 Linear layers with tanh, a plain chain (Liu, Chen,
    Theodorou 2021, "Differential Dynamic Programming Neural Optimizer")."""
    dims = [d_in] + [width] * 4
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


def _paper_cnn(shape: tuple[int, ...], n_classes: int, channels: int) -> nn.Sequential:
    """The DDPNOpt paper's CNN as a plain chain: 4 Conv2d 3x3 with ReLU (2x2 max-pooling
    after the 2nd and 4th), then 2 Linear layers (hidden width 2 * channels)."""
    layers: list[nn.Module] = [nn.Unflatten(1, shape)]
    for i, c_in in enumerate([shape[0]] + [channels] * 3):
        layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i % 2 else []
    features = channels * (shape[1] // 4) * (shape[2] // 4)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(features, 2 * channels), nn.ReLU(),
                         nn.Linear(2 * channels, n_classes))


def _resmlp(d_in: int, n_classes: int, width: int, blocks: int = 2) -> nn.Sequential:
    """A residual MLP for DGNOpt: Linear + tanh, ``blocks`` identity blocks
    y = tanh(x + W2 tanh(W1 x)), a Linear head."""
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
    for _ in range(blocks):
        body = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        layers += [Residual(body), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


def _basic_block(c_in: int, c_out: int, stride: int) -> Residual:
    """He et al. 2016's basic block: two 3x3 convs with BatchNorm, a 1x1 conv + BatchNorm
    projection where the shape changes."""
    body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(c_out))
    shortcut = None if stride == 1 and c_in == c_out else nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
    return Residual(body, shortcut)


def _resnet(shape: tuple[int, ...], n_classes: int, width: int) -> nn.Sequential:
    """A small ResNet for DGNOpt: a 3x3 stem conv, three stages of one basic block with
    width, 2 width, 4 width channels (16-32-64 by default; strides 1, 2, 2), global average
    pooling and a Linear head."""
    chans = (width, 2 * width, 4 * width)
    layers: list[nn.Module] = [nn.Unflatten(1, shape), nn.Conv2d(shape[0], width, 3, 1, 1),
                               nn.ReLU()]
    for c_in, c_out, stride in zip((width, *chans[:-1]), chans, (1, 2, 2)):
        layers += [_basic_block(c_in, c_out, stride), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(chans[-1], n_classes))


def _chain_model(model: str, ds: Dataset, width: int | None) -> nn.Sequential:
    """The classification models without ODE blocks (DDPNOpt's and DGNOpt's)."""
    shape = tuple(ds.image_shape or ())
    if model == "fcn":
        return _paper_fcn(ds.input_dim, ds.n_classes, width or 32)
    if model == "cnn":
        return _paper_cnn(shape, ds.n_classes, width or 32)
    if model == "resmlp":
        return _resmlp(ds.input_dim, ds.n_classes, width or 32)
    return _resnet(shape, ds.n_classes, width or 16)


#: The classification models that are chains (no ODE block).
CHAIN_MODELS = ("fcn", "cnn", "resmlp", "resnet")


def _classification(ds: Dataset, s: TaskSettings) -> Task:
    model = _pick_model("classification", s, MODELS["classification"])
    if model in ("conv", "cnn", "resnet") and ds.image_shape is None:
        raise ValueError(f"--model {model} needs images; {ds.name} is a table: use --model mlp")
    width, solver = s.width or 64, _solver(s, SolverSpec())

    def build(adjoint: bool) -> nn.Module:
        if model in CHAIN_MODELS:  # no ODE blocks: DDPNOpt's and DGNOpt's chains
            return _chain_model(model, ds, s.width)
        if model == "mlp":
            return MLPODEClassifier(ds.input_dim, ds.n_classes, hidden=width,
                                    solver=solver(adjoint), t1=s.t1,
                                    trainable_t1=s.trainable_t1)
        shape = tuple(ds.image_shape or ())
        return nn.Sequential(nn.Unflatten(1, shape), ConvODEClassifier(
            shape[0], ds.n_classes, channels=width, solver=solver(adjoint), t1=s.t1,
            trainable_t1=s.trainable_t1))

    test = _test_tensors(ds, s.test_size)
    return Task(
        name="classification", label=_label(s, "classification", ds), model_name=model,
        dataset=ds, metric="test_acc", higher_is_better=True, columns=("test_loss", "test_acc"),
        build_model=build, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        evaluate=lambda m: _classification_metrics(m, test, s.eval_batch_size),
        batch_size=s.batch_size or 64, logits=True, chain=model in CHAIN_MODELS,
        residual=model in ("resmlp", "resnet"),
        # the main job's tuned rate (digits MLP); the conv net keeps the authors' defaults
        hparams={"adam": {"lr": 1e-2}} if model == "mlp" else {})


# ----------------------------------------------------------------------------- series

#: Tuned on JapaneseVowels (single-seed 20 s runs, interleaved; BENCHMARKS.md).
SERIES_HPARAMS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-2},
    "sgd": {"lr": 0.02, "momentum": 0.9},
    "snopt": {"lr": 0.02, "eps": 0.05, "alpha": 0.75, "update_freq": 20, "full": True,
              "curvature": "grid", "observer_dt": 0.25},
    "kfac": {"lr": 0.01, "eps": 0.05, "update_freq": 20, "full": True},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}
# dopri5 tries each gap (rescaled to [0, 1]) in one step; the step cap ends a run whose field
# has blown up (a solver error) instead of letting it crawl.
SERIES_SOLVER = SolverSpec(options={"first_step": 1.0, "max_num_steps": 100}, seminorm=True)


def _crop(tensors: tuple[Tensor, ...], steps: int | None) -> tuple[Tensor, ...]:
    """Drop the trailing steps no series observes (and all after ``steps``)."""
    values, times, mask, labels = tensors
    last = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
    last = last if steps is None else min(last, steps)
    return values[:, :last], times[:, :last], mask[:, :last], labels


def _series_metrics(model: nn.Module, test: tuple[Tensor, ...], batch: int) -> dict[str, float]:
    correct, total = 0, 0.0
    for values, times, mask, labels in _in_batches(test, batch):
        logits = model(values, times, mask)
        correct += int((logits.argmax(1) == labels).sum())
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
    return {"test_loss": total / len(test[3]), "test_acc": correct / len(test[3])}


def _series(ds: Dataset, s: TaskSettings) -> Task:
    model = _pick_model("series", s, ("odernn",))
    width, solver = s.width or 64, _solver(s, SERIES_SOLVER)
    ds = replace(ds, train=TensorDataset(*_crop(ds.train.tensors, s.max_length)))
    test = _crop(_test_tensors(ds, s.test_size), s.max_length)

    def build(adjoint: bool) -> nn.Module:
        return ODERNNClassifier(ds.input_dim, ds.n_classes, hidden=max(1, width // 2),
                                ode_hidden=width, solver=solver(adjoint))

    return Task(
        name="series", label=_label(s, "series", ds), model_name=model, dataset=ds,
        metric="test_acc", higher_is_better=True, columns=("test_loss", "test_acc"),
        build_model=build, loss=lambda m, b: F.cross_entropy(m(b[0], b[1], b[2]), b[3]),
        evaluate=lambda m: _series_metrics(m, test, s.eval_batch_size),
        batch_size=s.batch_size or 32, hparams=SERIES_HPARAMS, logits=True)


# ----------------------------------------------------------------------------- trajectories

#: Tuned on spirals and LASA Angle (single-seed 15 s runs; BENCHMARKS.md).
TRAJECTORY_HPARAMS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-2},
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "snopt": {"lr": 0.03, "eps": 0.05, "alpha": 0.75, "update_freq": 10, "full": True},
    "kfac": {"lr": 0.03, "eps": 0.05, "alpha": 0.75, "update_freq": 10, "full": True},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}


def _trajectory_metrics(model: nn.Module, train: tuple[Tensor, ...],
                        test: tuple[Tensor, ...], score: Callable) -> dict[str, float]:
    values, times, interp, extrap = test
    test_mse = float(score(model, values, times, interp))
    return {"test_loss": test_mse, "test_mse": test_mse,
            "extrap_mse": float(score(model, values, times, extrap)),
            "train_mse": float(score(model, *train))}


def _trajectory_model(ds: Dataset, s: TaskSettings, model: str) -> Callable[[bool], nn.Module]:
    width, step = s.width or 32, float(ds.time_step or 0.1)
    # RK4 on the data's time grid: the adjoint restarts at every observation time, and an
    # adaptive method pays a first-step search at each restart (BENCHMARKS.md).
    solver = _solver(s, SolverSpec(method="rk4", options={"step_size": step}))
    if model == "sde":
        return lambda adjoint: NeuralSDE(ds.input_dim, hidden=width, n_layers=3, dt=step,
                                         adjoint=adjoint)
    return lambda adjoint: TrajectoryODE(ds.input_dim, hidden=width, n_layers=3,
                                         solver=solver(adjoint))


def _trajectory(ds: Dataset, s: TaskSettings) -> Task:
    model = _pick_model("trajectory", s, ("ode", "sde"))
    train, test = ds.train.tensors, _test_tensors(ds, s.test_size)
    score: Callable = _sde_mse if model == "sde" else trajectory_mse

    def loss(m: nn.Module, b: Batch) -> Tensor:
        return _sde_loss(m, b) if model == "sde" else trajectory_mse(m, *b)
    info = {"mean": ds.mean, "std": ds.std, "t_split": ds.t_split, "t_end": ds.t_end}
    label = _label(s, "trajectory", ds)

    def plot(models: Mapping[str, nn.Module], path: Path) -> None:
        plots.plot_trajectories(models, test, train[2], info, path, label,
                                rows=7 if ds.name.startswith("lasa") else 4)

    return Task(
        name="trajectory", label=label, model_name=model, dataset=ds, metric="test_mse",
        higher_is_better=False, columns=("test_loss", "test_mse", "extrap_mse", "train_mse"),
        build_model=_trajectory_model(ds, s, model), loss=loss,
        evaluate=lambda m: _trajectory_metrics(m, train, test, score),
        batch_size=s.batch_size or 16, hparams=TRAJECTORY_HPARAMS, plot=plot)


def _sde_loss(model: nn.Module, batch: Batch) -> Tensor:
    assert isinstance(model, NeuralSDE)
    return model.loss(*batch)


def _sde_mse(model: nn.Module, values: Tensor, times: Tensor, mask: Tensor) -> Tensor:
    """MSE of a Neural SDE's Monte-Carlo mean path at the masked points (fixed noise seed, so
    evaluation draws nothing from the training generator)."""
    assert isinstance(model, NeuralSDE)
    return sde_mse(model, values, times, mask, n_samples=16,
                   generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- density

#: Tuned on circles (exact trace) and on the 12-D vowels-frames table (Hutchinson), 10 s
#: single-seed trials (BENCHMARKS.md).
DENSITY_HPARAMS_2D: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.1},
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "snopt": {"lr": 0.3, "momentum": 0.9, "eps": 0.05, "alpha": 0.75, "update_freq": 20,
              "stats_batch": 64},
    "kfac": {"lr": 0.3, "momentum": 0.9, "eps": 0.05, "update_freq": 20},
    "newton-cg": {"lr": 1.0, "damping": 0.1, "cg_iters": 5, "max_step_norm": 1.0},
}
DENSITY_HPARAMS_TABLE: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.03},
    "sgd": {"lr": 0.3, "momentum": 0.9},
    "snopt": {"lr": 0.03, "momentum": 0.9, "eps": 0.05, "alpha": 0.75, "update_freq": 20,
              "stats_batch": 64},
    "kfac": {"lr": 0.03, "momentum": 0.9, "eps": 0.05, "update_freq": 20},
    "newton-cg": {"lr": 1.0, "damping": 1.0, "cg_iters": 5, "max_step_norm": 1.0},
}


def _exact_nll(model: nn.Module, test: tuple[Tensor, ...], batch: int) -> dict[str, float]:
    """Mean test NLL (nats) with the exact trace, whatever trace the model trains with."""
    assert isinstance(model, CNF)
    trace, model.func.trace = model.func.trace, "exact"
    try:
        total = sum(float(model.nll(x)) * len(x) for x, *_ in _in_batches(test, batch))
    finally:
        model.func.trace = trace
    nll = total / len(test[0])
    return {"test_loss": nll, "test_nll": nll}


def _density_loss(model: nn.Module, batch: Batch) -> Tensor:
    assert isinstance(model, CNF)
    return model.nll(batch[0])


def _density(ds: Dataset, s: TaskSettings) -> Task:
    model = _pick_model("density", s, ("cnf",))
    width, solver, dim = s.width or 64, _solver(s, SolverSpec()), ds.input_dim
    trace = "exact" if dim <= 2 else "hutchinson"
    test = _test_tensors(ds, s.test_size)
    label = _label(s, "density", ds)

    def build(adjoint: bool) -> nn.Module:
        return CNF(dim, hidden=width, n_layers=3, trace=trace, t1=s.t1, solver=solver(adjoint))

    def plot(models: Mapping[str, nn.Module], path: Path) -> None:
        plots.plot_density(models, test[0], path, label)

    return Task(
        name="density", label=label, model_name=model, dataset=ds, metric="test_nll",
        higher_is_better=False, columns=("test_loss", "test_nll"), build_model=build,
        loss=_density_loss, evaluate=lambda m: _exact_nll(m, test, s.eval_batch_size),
        batch_size=s.batch_size or 256,
        hparams=DENSITY_HPARAMS_2D if dim <= 2 else DENSITY_HPARAMS_TABLE,
        plot=plot if dim == 2 else None)


# ----------------------------------------------------------------------------- registry

TaskBuilder = Callable[[Dataset, TaskSettings], Task]
#: task name -> (builder, the dataset kinds it accepts)
TASKS: dict[str, tuple[TaskBuilder, tuple[str, ...]]] = {
    "classification": (_classification, ("classification",)),
    "series": (_series, ("series",)),
    "trajectory": (_trajectory, ("trajectories",)),
    "density": (_density, ("density", "classification")),
}
#: The task each dataset kind gets by default.
DEFAULT_TASK = {"classification": "classification", "series": "series",
                "trajectories": "trajectory", "density": "density"}
#: The models of each task (the first is the default).
MODELS = {"classification": ("mlp", "conv", "fcn", "cnn", "resmlp", "resnet"),
          "series": ("odernn",),
          "trajectory": ("ode", "sde"), "density": ("cnf",)}


def task_name(ds: Dataset, settings: TaskSettings) -> str:
    """The task ``settings`` ask for, or the one of the dataset's kind (ValueError if the
    dataset cannot feed it)."""
    name = settings.task or DEFAULT_TASK[ds.kind]
    if settings.task is None and settings.model == "sde" and ds.kind == "trajectories":
        name = "trajectory"
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    kinds = TASKS[name][1]
    if ds.kind not in kinds:
        raise ValueError(f"the {name} task needs a {' or '.join(kinds)} dataset; {ds.name} is "
                         f"a {ds.kind} dataset (its task: {DEFAULT_TASK[ds.kind]})")
    return name


def make_task(ds: Dataset, settings: TaskSettings | None = None) -> Task:
    """The task of dataset ``ds`` as ``settings`` choose it.

    Raises:
        ValueError: a task or model that does not fit the dataset.
    """
    settings = settings or TaskSettings()
    return TASKS[task_name(ds, settings)][0](ds, settings)
