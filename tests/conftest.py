"""Shared fixtures, the helpers of the experiment smoke tests, and the opt-in markers
``system_data`` (tests that read dataset files installed on the system) and ``compiler``
(tests that compile with torch.compile's inductor, which needs a C++ compiler)."""

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

#: The opt-in markers: the variable that switches each on ("1"), and what its tests need.
#: CI sets both, after installing what they need.
OPT_IN = {
    "system_data": ("OCNODE_SYSTEM_DATA", "dataset files installed on the system (e.g. "
                    "`apt-get install dataset-fashion-mnist`)"),
    "compiler": ("OCNODE_COMPILER", "a C++ compiler for torch.compile's inductor (e.g. "
                 "`apt-get install g++`)"),
}
SYSTEM_DATA_ENV = OPT_IN["system_data"][0]


def opt_in_enabled(marker: str) -> bool:
    """Whether the variable of ``marker`` in :data:`OPT_IN` switches its tests on ("1").

    Raises:
        pytest.UsageError: any other value than unset, "", "0" or "1".
    """
    env = OPT_IN[marker][0]
    value = os.environ.get(env, "").strip()
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{env} must be 1 (run the {marker} tests) or 0/unset (skip "
                                f"them), got {value!r}")
    return value == "1"


def system_data_enabled() -> bool:
    """Whether the ``system_data`` tests run (see :func:`opt_in_enabled`)."""
    return opt_in_enabled("system_data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests of each opt-in marker, with a reason saying how to run them, unless
    enabled. Enabled, they run as usual: a missing file or compiler fails them."""
    for marker, (env, needs) in OPT_IN.items():
        if opt_in_enabled(marker):
            continue
        skip = pytest.mark.skip(reason=f"needs {needs}; set {env}=1 to run it")
        for item in items:
            if item.get_closest_marker(marker):
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
