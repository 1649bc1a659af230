"""Peak-memory probe: the resident-set growth of a few training iterations, in a forked child.

:func:`peak_rss_growth` forks; the child builds what it measures from scratch, runs warm-up
iterations, hands its freed heap back to the kernel (``malloc_trim``: otherwise the warm-up's
freed blocks hide the next peak), resets the kernel's peak-RSS mark and runs the measured
iterations; the parent gets ``VmHWM - VmRSS(before)`` in MiB through a pipe. Linux only:
elsewhere (no fork or /proc) the probe returns None. Large blocks are mmapped in the child
(``M_MMAP_THRESHOLD`` 64 KiB), so RSS follows frees closely.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

MMAP_THRESHOLD = 1 << 16  # bytes; larger blocks are mmapped, so RSS follows frees


def read_status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def supported() -> bool:
    """Whether this platform can run the probe (fork and /proc/self/clear_refs)."""
    return hasattr(os, "fork") and Path("/proc/self/clear_refs").exists()


def _measure(prepare: Callable[[], Callable[[], None]], warmup: int, iterations: int) -> float:
    torch.set_num_threads(1)
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    step = prepare()
    for _ in range(warmup):
        step()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    before = read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    for _ in range(iterations):
        step()
    return (read_status_kib("VmHWM") - before) / 1024


def peak_rss_growth(prepare: Callable[[], Callable[[], None]], warmup: int = 1,
                    iterations: int = 2, what: str = "probe") -> float | None:
    """Peak RSS growth (MiB) of ``iterations`` calls of a step, measured in a forked child.

    Args:
        prepare: run in the child; builds everything and returns the step to measure (a
            callable of no arguments, e.g. one training iteration).
        warmup: unmeasured calls of the step first (allocator and autograd warm-up).
        iterations: measured calls.
        what: named in the warning if the child fails.

    Returns:
        MiB, or None where the platform cannot fork or the child failed (with a warning).
    """
    if not supported():
        return None
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, exit without cleanup
        code = 0
        try:
            payload = json.dumps({"mib": _measure(prepare, warmup, iterations)})
        except BaseException as err:  # noqa: BLE001 - report any failure to the parent
            payload, code = json.dumps({"error": f"{type(err).__name__}: {err}"}), 1
        os.write(write_fd, payload.encode())
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(text) if text else {"error": "no output"}
    if "error" in result:
        warnings.warn(f"memory probe of {what} failed: {result['error']}", stacklevel=2)
        return None
    return float(result["mib"])
