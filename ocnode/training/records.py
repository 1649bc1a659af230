"""What a run leaves behind and how it is read back: metrics rows, checkpoints, clocks, plots.

- :class:`MetricsLog`: rows appended to ``metrics.csv``, flushed row by row.
- :func:`atomic_torch_save`: write, fsync, rename: a crash leaves the previous file intact.
- :func:`save_checkpoint` / :func:`load_checkpoint`: checkpoints with a SHA-256 checksum,
  verified on load, and the previous one kept as ``checkpoint.prev.pt``.
- :func:`rng_states` / :func:`set_rng_states`: every generator a run draws from, so that a
  resumed run continues bit-identically.
- :class:`Stopwatch`: a clock that pauses while evaluating and checkpointing.
- :func:`plot_curves`: train loss and the task's metric against wall-clock time.
- :func:`machine_info`, :func:`command_line`: what benchmarks record beside their numbers.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import platform
import random
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _file_mode() -> int:
    """The mode a newly created file gets under the process's umask (e.g. 0o644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Any, keep_previous: Path | None = None) -> None:
    """Write a file atomically: ``write(f)`` into a temporary file in the same folder, fsync
    it, give it the permissions of an ordinary new file, then rename it over ``path``.

    A crash or error at any point leaves the previous file at ``path`` untouched. With
    ``keep_previous``, the previous file is moved there just before the rename.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left for ``name``."""
    stale = sorted(folder.glob(f".{name}.*.tmp"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


CHECKPOINT_MAGIC = b"OCNODECK"  # 8 bytes, then the payload's SHA-256 (32 bytes), the payload


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not an ocnode checkpoint."""


def save_checkpoint(obj: Any, path: Path) -> None:
    """Save ``obj`` with its SHA-256 checksum, atomically; the file it replaces becomes
    ``<name>.prev<suffix>`` (e.g. ``checkpoint.prev.pt``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).digest()
    atomic_write(path, lambda f: f.write(CHECKPOINT_MAGIC + digest + payload),
                 keep_previous=previous_checkpoint(path))


def previous_checkpoint(path: Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, fails its checksum or is not a
            checkpoint; the message says how to go on.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    header = len(CHECKPOINT_MAGIC) + 32
    if not data.startswith(CHECKPOINT_MAGIC) or len(data) < header:
        return _legacy_checkpoint(path, data)
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(CHECKPOINT_MAGIC):header]:
        _corrupt(path, "checksum mismatch")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a verified file that torch cannot read
        _corrupt(path, f"unreadable: {type(err).__name__}: {err}")
    raise AssertionError  # unreachable: _corrupt raises


def _legacy_checkpoint(path: Path, data: bytes) -> dict[str, Any]:
    """A checkpoint of an ocnode release before checksums (a plain ``torch.save`` of a dict
    with ``config`` and ``model``), loaded with a warning; anything else is corrupt."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - garbage, truncated or empty
        obj = None
    if not (isinstance(obj, dict) and {"config", "model"} <= set(obj)):
        _corrupt(path, "not an ocnode checkpoint, or truncated")
    warnings.warn(f"{path} was written without a checksum (an older ocnode); it is used as it "
                  "is, and the next checkpoint will carry one", RuntimeWarning, stacklevel=3)
    return obj


def _corrupt(path: Path, why: str) -> None:
    prev = previous_checkpoint(path)
    fallback = (f" ({prev} holds the checkpoint before it: copy it to {path} to resume from "
                "there)" if prev.exists() else "")
    raise CheckpointError(f"checkpoint {path} is corrupt ({why}); use --overwrite to start "
                          f"over, or restore a copy{fallback}")


def rng_states(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every generator state a run draws from (torch, numpy, python, the loader's, CUDA's)."""
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


def set_rng_states(states: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    loader_generator.set_state(states["loader"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class MetricsLog:
    """Rows of fixed ``columns`` appended to a CSV file, flushed row by row."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, tuple(columns)

    def start(self, keep_until_step: int | None = None,
              expected_rows: int | None = None) -> int:
        """Begin a fresh file, or keep the rows with ``step <= keep_until_step`` (resume).

        The file is replaced atomically (written beside it, then renamed), so an interrupted
        start never truncates the history.

        Args:
            keep_until_step: resume: keep the rows up to this step (None: start afresh).
            expected_rows: the number of rows up to that step the run wrote (checked).

        Returns:
            The number of rows kept.

        Raises:
            ValueError: fewer or more rows than ``expected_rows`` (history truncated or
                edited since the checkpoint).
        """
        rows = [] if keep_until_step is None else [
            r for r in self._read_text() if float(r["step"]) <= keep_until_step]
        if expected_rows is not None and len(rows) != expected_rows:
            raise ValueError(f"{self.path} holds {len(rows)} rows up to step {keep_until_step}, "
                             f"the checkpoint expects {expected_rows}: the history was "
                             "truncated or edited; restore it, or start over with --overwrite")

        def write(f: Any) -> None:
            text = io.TextIOWrapper(f, newline="", write_through=True)
            writer = csv.DictWriter(text, self.columns)
            writer.writeheader()
            writer.writerows(rows)
            text.detach()

        atomic_write(self.path, write)
        return len(rows)

    def append(self, row: dict[str, float]) -> None:
        """Append one row (keys: the log's columns)."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def read(self) -> list[dict[str, float]]:
        """All rows, values as floats."""
        return [{k: float(v) for k, v in row.items()} for row in self._read_text()]

    def _read_text(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def plot_curves(rows: list[dict[str, float]], path: Path, metric: str = "test_acc",
                title: str | None = None) -> None:
    """Save train loss and ``metric`` against wall-clock time as a PNG (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    wall = [r["wall_time"] for r in rows]
    losses = [r["train_loss"] for r in rows]
    ax_loss.plot(wall, losses)
    ax_loss.set(xlabel="wall-clock time [s] (excl. evaluation)", ylabel="train loss")
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    ax_metric.plot(wall, [r[metric] for r in rows])
    ax_metric.set(xlabel="wall-clock time [s] (excl. evaluation)", ylabel=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU model, core count, load, versions and torch's thread count, plus ``extra``."""
    import torchdiffeq

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


def command_line() -> str:
    """The command that is running, shell-quoted (``ocnode ...`` or ``python SCRIPT ...``)."""
    script = Path(sys.argv[0])
    if script.name in ("ocnode", "__main__.py"):
        return shlex.join(["ocnode", *sys.argv[1:]])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        script = Path("experiments") / script.name
    return shlex.join(["python", str(script), *sys.argv[1:]])
