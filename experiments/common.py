"""Helpers shared by the experiment scripts, which run as ``python experiments/NAME.py``
(so this folder is on ``sys.path``)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torchdiffeq


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU model, core count, load, versions and torch's thread count, plus ``extra``."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        load: tuple[float, ...] | None = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchdiffeq": getattr(torchdiffeq, "__version__", "unknown"),
            "platform": platform.platform(), "loadavg_at_start": load, **extra}


def read_status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def command_line() -> str:
    """The command that is running, as ``python experiments/NAME.py ARGS`` (shell-quoted)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        script = Path("experiments") / script.name
    return shlex.join(["python", str(script), *sys.argv[1:]])
