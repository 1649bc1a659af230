"""Shared fixtures, the helpers of the experiment smoke tests, and the opt-in marker
``system_data`` (tests that read dataset files installed on the system)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster, and fair to other jobs on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROOT = Path(__file__).resolve().parents[1]

#: Set to 1 to run the tests marked ``system_data``; CI sets it after installing the files.
SYSTEM_DATA_ENV = "OCNODE_SYSTEM_DATA"


def system_data_enabled() -> bool:
    """Whether :data:`SYSTEM_DATA_ENV` switches the ``system_data`` tests on ("1") or off.

    Raises:
        pytest.UsageError: any other value than unset, "", "0" or "1".
    """
    value = os.environ.get(SYSTEM_DATA_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{SYSTEM_DATA_ENV} must be 1 (run the system_data tests) or "
                                f"0/unset (skip them), got {value!r}")
    return value == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``system_data`` tests, with a reason saying how to run them, unless enabled.

    Enabled, they run as usual: a missing file fails them, it does not skip them.
    """
    if system_data_enabled():
        return
    skip = pytest.mark.skip(reason=f"needs dataset files installed on the system (e.g. `apt-get "
                                   f"install dataset-fashion-mnist`); set {SYSTEM_DATA_ENV}=1 "
                                   "to run it")
    for item in items:
        if item.get_closest_marker("system_data"):
            item.add_marker(skip)


def experiment_module(name: str) -> ModuleType:
    """``experiments/<name>.py`` imported as a module (experiments/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_experiment(script: str, *args: str, timeout: float = 120) -> None:
    """Run ``python experiments/<script> ARGS`` from the repository root, one torch thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                          env=env, timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def check_comparison(folder: Path, optimizers: Iterable[str]) -> dict[str, Any]:
    """Assert that experiments/compare.py wrote a complete, finite comparison in ``folder``;
    returns its summary."""
    summary = json.loads((folder / "summary.json").read_text())
    assert (folder / "results.md").is_file() and (folder / "curves.png").stat().st_size > 0
    assert sorted(summary["optimizers"]) == sorted(optimizers)
    for name, result in summary["optimizers"].items():
        for key in ("final_mean", "step_ms_median", "nfe_forward_mean", "steps_mean"):
            assert math.isfinite(result[key]), (name, key, result[key])
        assert result["nfe_forward_mean"] > 0 and result["steps_mean"] >= 1, name
        rows = list(csv.DictReader(open(folder / "runs" / f"{name}_seed0.csv")))
        assert len(rows) >= 2 and float(rows[-1]["time_s"]) > 0, name
        assert all(math.isfinite(float(r[summary["metric"]])) for r in rows), name
    return summary
