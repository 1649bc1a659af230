"""No optimizer mode leaks: over 10,000 training iterations the number of live tensors and
the resident memory stay flat (a leak of one tensor per refresh shows as hundreds)."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ocnode.nn import MLPODEClassifier
from ocnode.training import OPTIMIZERS, build_optimizer, train_step
from ocnode.training.memory import read_status_kib, supported
from solvers import SolverSpec

ITERATIONS, WARMUP = 10_000, 1_000
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("adam", {}),
    "sgd": ("sgd", {}),
    "snopt": ("snopt", {"update_freq": 5, "full": True}),
    "snopt-true-fisher": ("snopt", {"update_freq": 5, "fisher": "true"}),
    "snopt-tikhonov": ("snopt", {"update_freq": 5, "damping_mode": "tikhonov"}),
    "snopt-alpha-1": ("snopt", {"update_freq": 5, "alpha": 1.0}),
    "kfac": ("kfac", {"update_freq": 5, "full": True}),
    "newton-cg": ("newton-cg", {"cg_iters": 2}),
}


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_ten_thousand_iterations_leave_live_tensors_and_memory_flat(one_thread, mode: str) -> None:
    name, hparams = MODES[mode]
    torch.manual_seed(0)
    spec = SolverSpec(method="euler", options={"step_size": 1.0},
                      adjoint=not OPTIMIZERS[name].through_solver)
    model = MLPODEClassifier(2, 2, hidden=4, solver=spec)
    opt = build_optimizer(name, model, {"lr": 1e-3, **hparams})
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    batch = (x, (x[:, 0] > 0).long())

    def loss(m: torch.nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    for _ in range(WARMUP):
        train_step(model, opt, loss, batch)
    tensors, rss = _live_tensors(), read_status_kib("VmRSS") if supported() else 0
    for _ in range(ITERATIONS - WARMUP):
        train_step(model, opt, loss, batch)
    assert _live_tensors() <= tensors, mode
    if supported():
        assert read_status_kib("VmRSS") - rss < 4 * 1024, mode  # KiB: under 4 MiB of growth
