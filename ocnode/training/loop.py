"""The training loop of the ``ocnode train`` command: any task, any registered optimizer.

``train(TrainConfig(...))`` loads the dataset, builds its task (:mod:`ocnode.training.tasks`),
the model and the optimizer (:mod:`ocnode.training.optimizers`), trains for ``epochs`` with
:func:`ocnode.training.step.train_step` and writes to ``config.out``:

- ``metrics.csv``: one row per logging step. Columns: ``step, epoch, wall_time, train_loss``,
  the task's evaluation columns (classification and series: ``test_loss, test_acc``;
  trajectory: ``test_loss, test_mse, extrap_mse, train_mse``; density: ``test_loss,
  test_nll``), then ``nfe_forward, nfe_backward, lr, t1``. ``wall_time`` is training time
  only (the clock pauses while evaluating and checkpointing); ``train_loss`` and the NFE
  columns (see :mod:`ocnode.training.step`) are means over the iterations since the previous
  row; ``t1`` is the horizon (mean over the ODE blocks; NaN without blocks).
- ``checkpoint.pt``: written atomically at the end of every epoch, with the model, the
  optimizer, the horizon optimizers, the counters, the elapsed training time and every RNG
  state, so that ``resume=True`` continues bit-identically to an uninterrupted run. It
  carries a SHA-256 checksum, verified on load; the one it replaced is kept as
  ``checkpoint.prev.pt``.
- ``config.json``: the run's settings, from which ``TrainConfig.from_run`` (and
  ``ocnode train --resume``) rebuild them.
- ``curves.png``: train loss and the task's metric against wall-clock time, and the task's
  picture where it has one (``trajectory.png``: data, fit and extrapolation;
  ``density.png``: a 2-D CNF's density and samples).

Nothing of an earlier run is lost: ``overwrite`` builds the new run first (dataset, model),
then moves the old run's files into ``replaced-<time>/`` inside the folder and deletes them
only once the new run has written its first checkpoint; ``resume`` rewrites
``metrics.csv`` atomically and checks it against the checkpoint.

With ``adaptive_t1`` other than ``"off"``, the ODE blocks get a trainable horizon ``t1``,
which the parameter optimizer leaves out and a :class:`ocnode.optim.HorizonOptimizer` per
block updates (docs/algorithms.md, "The horizon policy").

Under torchrun (:mod:`ocnode.training.distributed`) every process builds the same run; each
trains on its slice of every global batch, with the gradients averaged by DDP. Rank 0 alone
touches ``out``: it prepares the folder, reads the checkpoint (sent to the others), writes
checkpoints (with every rank's RNG states), metrics and plots, evaluates on the whole test
subset and shows the progress bar; ``train_loss`` and the NFE columns are means over the
ranks. An error of rank 0 in these steps is raised on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ocnode.data import load_dataset
from ocnode.nn import ode_blocks
from ocnode.optim import HorizonOptimizer
from ocnode.training import distributed, records
from ocnode.training.config import RESUMABLE_FIELDS, TrainConfig, default_threads
from ocnode.training.optimizers import OPTIMIZERS, build_optimizer, check_fits
from ocnode.training.step import NFECounter, train_step
from ocnode.training.tasks import Task, make_task
from solvers import SolverError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
CURVES = "curves.png"
CONFIG = "config.json"


def metric_columns(task: Task) -> tuple[str, ...]:
    """The columns of a task's ``metrics.csv``."""
    return ("step", "epoch", "wall_time", "train_loss", *task.columns, "nfe_forward",
            "nfe_backward", "lr", "t1")


def horizon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable horizons (``t1`` parameters) of the model's ODE blocks."""
    return [b.t1_tensor for b in ode_blocks(model) if isinstance(b.t1_tensor, nn.Parameter)]


def optimizer_parameters(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """All parameters, except the horizons when horizon optimizers own them."""
    if config.adaptive_t1 == "off":
        return list(model.parameters())
    horizons = {id(p) for p in horizon_parameters(model)}
    return [p for p in model.parameters() if id(p) not in horizons]


def build_horizons(model: nn.Module, config: TrainConfig) -> list[HorizonOptimizer]:
    """One horizon optimizer per ODE block when ``adaptive_t1`` is on, else none."""
    if config.adaptive_t1 == "off":
        return []
    blocks = [b for b in ode_blocks(model) if isinstance(b.t1_tensor, nn.Parameter)]
    if not blocks:
        raise ValueError(f"adaptive_t1={config.adaptive_t1!r} needs a model whose ODE blocks "
                         f"have a trainable t1; the {config.model!r} model has none: use "
                         "adaptive_t1='off'")
    return [HorizonOptimizer(b, policy=config.adaptive_t1, lr=config.t1_lr, reg=config.t1_reg,
                             update_freq=config.t1_update_freq, t_min=config.t1_min)
            for b in blocks]


class _Window:
    """Training statistics accumulated since the last metrics row."""

    def __init__(self) -> None:
        self.loss_sum, self.nfe_forward, self.nfe_backward, self.steps = 0.0, 0, 0, 0

    def add(self, loss: float, nfe: tuple[int, int]) -> None:
        self.loss_sum += loss
        self.nfe_forward += nfe[0]
        self.nfe_backward += nfe[1]
        self.steps += 1

    def means(self) -> tuple[float, float, float]:
        n = max(self.steps, 1)
        return self.loss_sum / n, self.nfe_forward / n, self.nfe_backward / n


class _Run:
    """One training run: the objects a step needs, its counters and its files."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.out = config, Path(config.out)
        self.parallel, self.main = distributed.active(), distributed.is_main()
        self.device = (distributed.process_device(config.device) if self.parallel
                       else records.resolve_device(config.device))
        records.seed_everything(config.seed)
        dataset = load_dataset(config.dataset, config.data_dir, config.seed,
                               subset=config.train_size)
        self.task = make_task(dataset, config.task_settings())
        entry = OPTIMIZERS[config.optimizer]
        check_fits(config.optimizer, self.task.chain, self.task.model_name)
        self.model = self.task.build_model(config.adjoint and not entry.through_solver)
        self.model.to(self.device)
        hparams = {**self.task.hparams.get(config.optimizer, {}),
                   **config.hparams(entry.defaults)}
        if self.parallel:
            hparams = distributed.per_process_hparams(hparams, distributed.world_size())
        self.optimizer = build_optimizer(config.optimizer, self.model, hparams,
                                         params=optimizer_parameters(self.model, config))
        self.horizons = build_horizons(self.model, config)
        for horizon in self.horizons:  # B of the horizon's s = dL/dT / B is the global batch
            horizon.processes = distributed.world_size()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.loss = self.task.loss
        if self.parallel:
            self._go_parallel()
        else:
            self.train_loader = self.task.loader(self.generator)
        self.blocks = ode_blocks(self.model)
        self.counter = NFECounter(self.model)
        self.log = records.MetricsLog(self.out / METRICS, metric_columns(self.task))
        self.epoch = self.step = self.rows = 0
        self.saved_rows: int | None = None  # metrics rows the resumed checkpoint had seen
        self.saved_wall_time = 0.0  # training time of the epochs done before resuming
        self.clock = records.Stopwatch()
        self.window = _Window()
        self.replaced: list[Path] | None = None  # an earlier run's folders, rank 0

    def _go_parallel(self) -> None:
        """Each rank's slice of the global batches, DDP's averaged loss, synced curvature."""
        self.train_loader = distributed.rank_loader(self.task.dataset.train,
                                                    self.task.batch_size, self.generator)
        distributed.attach(self.optimizer)
        self.loss = distributed.parallel_loss(
            self.model, self.task.loss, self.device,
            reduce_gradients=not distributed.averages_its_own_gradients(self.optimizer))
        distributed.seed_process(self.config.seed)

    def save_checkpoint(self) -> None:
        rng = records.rng_states(self.generator)
        if not self.parallel:
            self._write_checkpoint(rng)
            return
        every_rng = distributed.gather_objects(rng)
        distributed.on_main(lambda: self._write_checkpoint(
            rng, world_size=distributed.world_size(), rng_ranks=every_rng))

    def _write_checkpoint(self, rng: dict[str, Any], **extra: Any) -> None:
        records.save_checkpoint({
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "horizon": [h.state_dict() for h in self.horizons],
            "epoch": self.epoch,
            "step": self.step,
            "metrics_rows": self.rows,
            "wall_time": self.clock.elapsed(),
            "rng": rng,
            **extra,
        }, self.out / CHECKPOINT)

    def load_checkpoint(self, ckpt: dict[str, Any] | None = None) -> None:
        """Continue from ``ckpt`` (default: read ``out``'s checkpoint)."""
        ckpt = records.load_checkpoint(self.out / CHECKPOINT) if ckpt is None else ckpt
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
        self.saved_rows = ckpt.get("metrics_rows")
        self.saved_wall_time = ckpt["wall_time"]
        self._restore_rng(ckpt)

    def _restore_rng(self, ckpt: dict[str, Any]) -> None:
        """This rank's saved generators; a rank the saved run did not have takes fresh ones
        (the loader's, equal on every rank, comes from rank 0)."""
        saved = ckpt.get("rng_ranks") or [ckpt["rng"]]
        r = distributed.rank()
        if r < len(saved):
            records.set_rng_states(saved[r], self.generator)
            return
        records.set_rng_states(ckpt["rng"], self.generator)
        distributed.seed_process(self.config.seed, self.epoch)

    def train_step(self, batch: Any) -> None:
        batch = tuple(t.to(self.device) for t in batch)
        try:
            value = train_step(self.model, self.optimizer, self.loss, batch,
                               self.horizons, self.counter, parallel=self.parallel)
        except FloatingPointError as err:
            raise FloatingPointError(self._diverged_message(err)) from None
        except SolverError as err:  # the run stops; say where and what is left of it
            message = err.args[0] if err.args else "the solve failed"
            err.args = (f"{message} (epoch {self.epoch + 1}, step {self.step + 1}); "
                        f"{self._folder_state()}", *err.args[1:])
            raise
        self.window.add(value, self.counter.take())
        self.step += 1

    def log_metrics(self) -> dict[str, float]:
        """Append a metrics row (rank 0; the others return {})."""
        wall_time = self.clock.elapsed()
        with self.clock.paused():
            means: Sequence[float] = self.window.means()
            self.window = _Window()
            if self.parallel:
                means = distributed.mean_of(means)
            if not self.main:
                self.rows += 1
                return {}
            metrics = self._evaluate()
            train_loss, nfe_forward, nfe_backward = means
            row = {"step": self.step, "epoch": self.step / len(self.train_loader),
                   "wall_time": wall_time, "train_loss": train_loss, **metrics,
                   "nfe_forward": nfe_forward, "nfe_backward": nfe_backward,
                   "lr": self.optimizer.param_groups[0]["lr"], "t1": self.current_t1()}
            self.log.append(row)
            self.rows += 1
        return row

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            metrics = self.task.evaluate(self.model)
        finally:
            self.model.train(was_training)
        return {k: metrics[k] for k in self.task.columns}

    def current_t1(self) -> float:
        """The current integration horizon (mean over the ODE blocks; NaN without blocks)."""
        return sum(b.t1 for b in self.blocks) / len(self.blocks) if self.blocks else math.nan

    def run(self, replaced: list[Path] | None = None) -> dict[str, float]:
        """Train to ``config.epochs``; ``replaced`` (an earlier run moved aside) is deleted
        once this run's first checkpoint is written."""
        config, n_batches = self.config, len(self.train_loader)
        self.clock = records.Stopwatch(self.saved_wall_time)
        metric = self.task.metric
        with tqdm(total=config.epochs * n_batches, initial=self.step, unit="step",
                  desc="train", disable=not (config.progress and self.main),
                  dynamic_ncols=True) as bar:
            for epoch in range(self.epoch, config.epochs):
                _set_epoch_lr(self.optimizer, config.lr_decay**epoch)
                for i, batch in enumerate(self.train_loader):
                    self.train_step(batch)
                    bar.update(1)
                    if self.step % config.log_every == 0 or i == n_batches - 1:
                        row = self.log_metrics()
                        if row:
                            bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                                            **{metric: f"{row[metric]:.4f}"})
                self.epoch = epoch + 1
                with self.clock.paused():
                    self.save_checkpoint()
                    for folder in replaced or []:
                        shutil.rmtree(folder, ignore_errors=True)
                    replaced = None
        self.counter.remove()
        return distributed.on_main(self._finish) if self.parallel else self._finish()

    def _finish(self) -> dict[str, float]:
        rows = self.log.read()
        records.plot_curves(rows, self.out / CURVES, self.task.metric,
                            f"{self.task.label}: {self.task.model_name}, {self.config.optimizer}")
        if self.task.plot is not None:
            self.task.plot({self.config.optimizer: self.model.cpu()},
                           self.out / f"{self.task.name}.png")
        return rows[-1]

    def _folder_state(self) -> str:
        path = self.out / CHECKPOINT
        return (f"the last good checkpoint, {path} (epoch {self.epoch}), is left untouched"
                if path.exists() else "no checkpoint had been written yet")

    def _diverged_message(self, err: FloatingPointError) -> str:
        return (f"{err} at epoch {self.epoch + 1}, step {self.step + 1}; stopped before the "
                f"optimizer step, and {self._folder_state()}. Start a new run with a smaller "
                "lr, tighter rtol/atol or weight decay.")


def _set_epoch_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    now = dataclasses.asdict(config)
    changed = sorted(k for k in now if k not in RESUMABLE_FIELDS and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {config.out}: the settings differ from the saved run "
                         f"({diffs}); resume with the same settings, or start a new run "
                         "in another out folder")


def _check_out(config: TrainConfig) -> None:
    """Refuse an ``out`` that does not fit ``resume``/``overwrite``; touches nothing."""
    out = Path(config.out)
    checkpoint = out / CHECKPOINT
    if config.resume and not checkpoint.exists():
        raise ValueError(f"resume: there is no checkpoint at {checkpoint}; run without "
                         "resume to start a new run there, or point out at the run's folder")
    if not config.resume and _holds_run(out) and not config.overwrite:
        raise ValueError(f"{out} already holds a run ({checkpoint}); pass resume to "
                         "continue it, overwrite to start over, or choose another out")


def _holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in (CHECKPOINT, METRICS, CONFIG))


def _move_aside(out: Path) -> list[Path]:
    """Move an earlier run's files into ``out/replaced-<UTC time>/``; returns every such
    folder in ``out`` (those of earlier overwrites that never reached a checkpoint too)."""
    stamp = time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    aside, n = out / stamp, 1
    while aside.exists():
        aside, n = out / f"{stamp}-{n}", n + 1
    aside.mkdir()
    for entry in out.iterdir():
        if entry != aside and not entry.name.startswith("replaced-"):
            entry.rename(aside / entry.name)
    print(f"ocnode: moved the earlier run in {out} to {aside}; it is deleted once this run "
          "writes its first checkpoint", file=sys.stderr)
    return sorted(out.glob("replaced-*"))


def _write_config(config: TrainConfig) -> None:
    text = json.dumps(dataclasses.asdict(config), indent=1) + "\n"
    records.atomic_write(Path(config.out) / CONFIG, lambda f: f.write(text.encode()))


def train(config: TrainConfig) -> dict[str, float]:
    """Train as configured and write metrics, checkpoints and curves.

    Args:
        config: the run's settings.

    Returns:
        The last metrics row (keys :func:`metric_columns` of the run's task).

    Raises:
        ValueError: bad settings, a missing checkpoint with ``resume``, or an ``out`` that
            already holds a run without ``resume``/``overwrite``.
        FloatingPointError: the training loss became NaN or infinite.
    """
    config.validate()
    with distributed.process_group(config.device, config.dist_backend,
                                   config.dist_timeout) as parallel:
        if parallel:
            distributed.on_main(lambda: _check_out(config))
        else:
            _check_out(config)
        threads = torch.get_num_threads()
        local = distributed.local_world_size() if parallel else 1
        torch.set_num_threads(config.threads or default_threads(local))
        try:
            return _train_parallel(config) if parallel else _train(config)
        finally:
            torch.set_num_threads(threads)


def _train(config: TrainConfig) -> dict[str, float]:
    run = _Run(config)  # data and model first: a failure here leaves the folder untouched
    replaced = _prepare_out(config)
    if config.resume:
        run.load_checkpoint()
    _start_log(run, config)
    return run.run(replaced)


def _train_parallel(config: TrainConfig) -> dict[str, float]:
    """:func:`_train` on every rank, with ``out`` touched by rank 0 alone."""
    run = _Run(config)

    def prepare() -> dict[str, Any] | None:
        run.replaced = _prepare_out(config)
        return records.load_checkpoint(run.out / CHECKPOINT) if config.resume else None

    ckpt = distributed.on_main(prepare)
    if ckpt is not None:
        run.load_checkpoint(ckpt)
    run.rows = distributed.on_main(lambda: _start_log(run, config))
    return run.run(run.replaced if run.main else None)


def _prepare_out(config: TrainConfig) -> list[Path] | None:
    """Move an earlier run aside (overwrite), create the folder, drop stale temporaries;
    returns the folders to delete once the first checkpoint is written."""
    out = Path(config.out)
    replaced = _move_aside(out) if config.overwrite and not config.resume and _holds_run(out) \
        else None
    out.mkdir(parents=True, exist_ok=True)
    records.remove_stale_temporaries(out, CHECKPOINT)
    return replaced


def _start_log(run: _Run, config: TrainConfig) -> int:
    """Start (or, resuming, trim) ``metrics.csv`` and write ``config.json``; returns the rows
    kept."""
    run.rows = run.log.start(keep_until_step=run.step if config.resume else None,
                             expected_rows=run.saved_rows)
    _write_config(config)
    return run.rows
