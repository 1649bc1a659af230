"""Smoke test of experiments/ddpnopt_vanishing.py: the quick run writes complete, finite
outputs; and the Max-Mahalanobis centers have the property the loss relies on.

Not a timed test and not the paper's numbers: one seed, 20 iterations of a narrow net.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import experiment_module, run_experiment

COLUMNS = ["SGD", "EKFAC", "DDPNOpt", "DDPNOpt2nd"]


def _script() -> ModuleType:
    return experiment_module("ddpnopt_vanishing")


@pytest.mark.parametrize(("n_classes", "dim", "radius"),
                         [(10, 10, 3 * math.sqrt(2)), (10, 32, 10.0), (3, 3, 1.0), (2, 5, 2.5)])
def test_mmc_centers_lie_on_the_sphere_with_equal_negative_inner_products(
        n_classes: int, dim: int, radius: float) -> None:
    mu = _script().mmc_centers(n_classes, dim, radius)

    assert mu.shape == (n_classes, dim) and mu.dtype == torch.float64
    gram = mu @ mu.T
    off = gram[~torch.eye(n_classes, dtype=torch.bool)]
    norms = mu.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, radius), atol=1e-5)
    assert torch.allclose(off, torch.full_like(off, -radius ** 2 / (n_classes - 1)), atol=1e-5)
    # consequences the experiment's docstring uses: they sum to zero, so a constant output
    # does best at 0 and pays 0.5 C^2; each center is its own class's nearest center
    assert mu.sum(0).abs().max() < 1e-9
    labels = torch.arange(n_classes)
    plateau = _script().mmc_loss(torch.zeros(n_classes, dim, dtype=mu.dtype), labels, mu)
    assert float(plateau) == pytest.approx(0.5 * radius ** 2)
    assert torch.equal(_script().predict(mu, mu), labels)


def test_mmc_centers_refuse_too_few_dimensions() -> None:
    with pytest.raises(ValueError, match="dim >= n_classes"):
        _script().mmc_centers(10, 9, 1.0)


def test_the_quick_run_writes_complete_finite_outputs(tmp_path: Path) -> None:
    run_experiment("ddpnopt_vanishing.py", "--quick", "--out", str(tmp_path), timeout=60)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert summary["columns"] == COLUMNS and summary["quick"] is True
    assert summary["command"].startswith("python experiments/ddpnopt_vanishing.py --quick")
    assert summary["machine"]["cpu_count"] >= 1
    st = summary["settings"]
    assert st["depth"] >= 9 and list(summary["seeds"]) == ["0"]
    assert summary["plateau"] == pytest.approx(0.5 * st["radius"] ** 2)
    assert "|  | " + " | ".join(COLUMNS) + " |" in md
    for col in COLUMNS:
        run = summary["seeds"]["0"][col]
        assert not run["diverged"] and run["iterations_run"] == st["iterations"]
        assert math.isfinite(run["final_train_loss"]) and math.isfinite(run["tail_loss"])
        assert 0.0 <= run["test_acc"] <= 1.0
        assert run["step_ms_median"] > 0
        norms = run["update_norm_mean"]
        assert len(norms) == st["depth"] and all(math.isfinite(v) and v > 0 for v in norms)
        curve = run["curve"]
        assert len(curve) == math.ceil(st["iterations"] / st["thin"])
        assert curve[-1][0] == st["iterations"]
        assert all(math.isfinite(loss) for _, loss in curve)
        res = summary["results"][col]
        assert res["n_diverged"] == 0 and math.isfinite(res["final_train_loss"]["mean"])
    # the shared rate is shared; every column started from the same weights
    lrs = {c: summary["seeds"]["0"][c]["lr"] for c in COLUMNS}
    assert lrs["SGD"] == lrs["DDPNOpt"] == lrs["DDPNOpt2nd"]
    assert len({summary["seeds"]["0"][c]["initial_train_loss"] for c in COLUMNS}) == 1
    assert "Reading: (A --quick smoke run: not a result.)" in md
    assert "| paper (Fig. 6) |" in md and "DDPNOpt2nd / SGD" in md


def test_a_diverging_run_is_recorded_and_stopped_while_the_others_go_on() -> None:
    script = _script()
    data = script.load_data(script.RADIUS)
    cfg = {"width": 8, "depth": 9, "batch": 8, "iterations": 6}
    lrs = {c: 1e-3 for c in COLUMNS}
    lrs["SGD"] = 1e30  # the first step blows the last layer up; the next loss is not finite
    out = script.train_seed(data, cfg, 0, lrs)

    assert out["SGD"]["diverged"] and out["SGD"]["final_train_loss"] is None
    assert out["SGD"]["diverged_at"] == out["SGD"]["iterations_run"] == 1
    for col in COLUMNS[1:]:
        assert not out[col]["diverged"] and out[col]["iterations_run"] == cfg["iterations"]
