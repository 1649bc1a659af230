"""The training core: one task notion, one iteration, one optimizer registry, one loop.

- :mod:`ocnode.training.tasks`: :class:`Task` (data, model, loss, metric) and :func:`make_task`
  for every application: classification, time-series classification (ODE-RNN), trajectory
  fitting (Neural ODE or Neural SDE), density estimation (CNF).
- :mod:`ocnode.training.optimizers`: the optimizer registry (adam, sgd, snopt, kfac,
  newton-cg).
- :mod:`ocnode.training.step`: :func:`train_step` and the NFE counter.
- :mod:`ocnode.training.loop`: :func:`train`, the ``ocnode train`` loop (metrics, checkpoints,
  resume, plots), configured by :class:`TrainConfig` (:mod:`ocnode.training.config`).
- :mod:`ocnode.training.compare`: the optimizer comparison harness (``ocnode compare``).
- :mod:`ocnode.training.records`, :mod:`ocnode.training.memory`, :mod:`ocnode.training.plots`:
  files, clocks, the peak-memory probe and the task pictures.
"""

from ocnode.training.config import TrainConfig
from ocnode.training.loop import train
from ocnode.training.optimizers import OPTIMIZERS, build_optimizer
from ocnode.training.step import NFECounter, train_step
from ocnode.training.tasks import TASKS, Task, TaskSettings, make_task

__all__ = ["OPTIMIZERS", "TASKS", "NFECounter", "Task", "TaskSettings", "TrainConfig",
           "build_optimizer", "make_task", "train", "train_step"]
