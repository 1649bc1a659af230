"""A thin front over torchsde with the conventions of the solvers package.

:func:`sdeint` and :func:`sdeint_adjoint` forward to ``torchsde.sdeint`` and
``torchsde.sdeint_adjoint`` (Li, Wong, Chen, Duvenaud 2020, "Scalable Gradients for Stochastic
Differential Equations"; Kidger et al. 2021 for the reversible Heun method). What they add:

* inputs are checked before torchsde sees them, and a bad one raises
  :class:`solvers.errors.SolverInputError` saying what to change;
* a NaN or inf in the solution raises :class:`solvers.errors.NonFiniteStateError` naming the
  first output time at which it appears;
* drift and diffusion evaluations are counted into a :class:`solvers.stats.SolverStats`;
* the default Brownian motion is seeded from torch's generator and told the step size.

Shapes: ``y0`` is ``(batch, state)``; the solution is ``(len(ts), batch, state)``. torchsde
keeps time in the dtype of ``y0``, so ``ts`` must have the dtype and device of ``y0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchsde
from torch import nn
from torchsde.settings import METHODS

from solvers.errors import NonFiniteStateError, SolverInputError
from solvers.stats import SolverStats

NOISE_TYPES = ("diagonal", "additive", "scalar", "general")
SDE_TYPES = ("ito", "stratonovich")

# torchsde's ``names`` keys and the canonical method each one renames.
_NAME_KEYS = {
    "drift": "f",
    "diffusion": "g",
    "prior_drift": "h",
    "diffusion_prod": "g_prod",
    "drift_and_diffusion": "f_and_g",
    "drift_and_diffusion_prod": "f_and_g_prod",
}
_CANONICAL = tuple(_NAME_KEYS.values())
# Methods that need more of the Brownian path than increments (as torchsde's default bm).
_LEVY_AREA = {"srk": "space-time", "log_ode": "foster"}

__all__ = ["NOISE_TYPES", "SDE_TYPES", "sdeint", "sdeint_adjoint"]


class _CountingSDE(nn.Module):
    """Proxy that counts calls into an SDE's drift/diffusion methods and forwards the rest.

    It exposes exactly the canonical methods (``f``, ``g``, ``h``, ``f_and_g``, ``g_prod``,
    ``f_and_g_prod``) that the wrapped SDE provides, under their canonical names after
    applying ``names``, because torchsde decides what to call with ``hasattr``. Each call adds
    one to ``sink.nfe``. A wrapped ``nn.Module`` is registered as a submodule, so
    ``proxy.parameters()`` reaches its parameters (the adjoint needs them).

    Attributes:
        sink: the stats object currently receiving counts; may be switched between the
            forward and the backward solve.
    """

    def __init__(self, sde: Any, sink: SolverStats, names: dict[str, str] | None) -> None:
        super().__init__()
        if isinstance(sde, nn.Module):
            self.wrapped = sde
        else:
            self.__dict__["wrapped"] = sde
        self.sink = sink
        self.noise_type = sde.noise_type
        self.sde_type = sde.sde_type
        for canonical, source in _method_sources(names).items():
            method = getattr(sde, source, None)
            if callable(method):
                self.__dict__[canonical] = self._counted(method)

    def _counted(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.sink.nfe += 1
            return method(*args, **kwargs)

        return counted

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _CANONICAL or name.startswith("__"):
                raise
            wrapped = self.__dict__.get("wrapped", self.__dict__.get("_modules", {}).get("wrapped"))
            if wrapped is None:
                raise
            return getattr(wrapped, name)


def _method_sources(names: dict[str, str] | None) -> dict[str, str]:
    """Map each canonical method name to the attribute of the user's SDE that provides it."""
    sources = {canonical: canonical for canonical in _CANONICAL}
    for key, attr in (names or {}).items():
        sources[_NAME_KEYS[key]] = attr
    return sources


def _check_sde(sde: Any, names: dict[str, str] | None) -> None:
    """Raise SolverInputError unless ``sde`` declares valid noise and SDE types."""
    for attr, valid in (("noise_type", NOISE_TYPES), ("sde_type", SDE_TYPES)):
        if not hasattr(sde, attr):
            raise SolverInputError(
                f"the sde object has no attribute {attr!r}: set it to one of {list(valid)} "
                "(e.g. as a class attribute of your nn.Module)."
            )
        value = getattr(sde, attr)
        if value not in valid:
            raise SolverInputError(
                f"sde.{attr}={value!r} is invalid; expected one of {list(valid)}."
            )
    unknown = set(names or {}) - set(_NAME_KEYS)
    if unknown:
        raise SolverInputError(
            f"unknown key(s) {sorted(unknown)} in names; valid keys are {list(_NAME_KEYS)}."
        )


def _check_y0(y0: Any) -> None:
    """Raise SolverInputError unless ``y0`` is a finite floating (batch, state) tensor."""
    if not torch.is_tensor(y0):
        raise SolverInputError(
            f"y0 must be a torch.Tensor of shape (batch, state), got {type(y0).__name__}."
        )
    if y0.dim() != 2:
        raise SolverInputError(
            f"y0 must be 2-D (batch, state), got shape {tuple(y0.shape)}; flatten the state "
            "(y0.flatten(1)) or add a batch dimension (y0.unsqueeze(0))."
        )
    if not y0.is_floating_point():
        raise SolverInputError(f"y0 must have a floating dtype, got {y0.dtype}.")
    if not torch.isfinite(y0).all():
        raise SolverInputError("y0 contains NaN or inf; fix the inputs before integrating.")


def _as_times(ts: Any, y0: torch.Tensor) -> torch.Tensor:
    """Return ``ts`` as a tensor after checking it is 1-D, increasing and matches ``y0``."""
    if not torch.is_tensor(ts):
        try:
            ts = torch.tensor(ts, dtype=y0.dtype, device=y0.device)
        except (TypeError, ValueError) as err:
            raise SolverInputError("ts must be a 1-D tensor or a sequence of floats.") from err
    if ts.dim() != 1 or ts.numel() < 1:
        raise SolverInputError(f"ts must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}.")
    if ts.dtype != y0.dtype or ts.device != y0.device:
        raise SolverInputError(
            f"ts is {ts.dtype} on {ts.device} but y0 is {y0.dtype} on {y0.device}; torchsde keeps "
            "time in the state's dtype and device: pass ts.to(y0)."
        )
    if ts.requires_grad:
        raise SolverInputError("ts must not require grad: torchsde gives no gradient w.r.t. times.")
    if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise SolverInputError(
            f"ts must be strictly increasing (torchsde integrates forward in time only), got "
            f"{ts.tolist()}; to integrate backward, substitute s = -t in the SDE."
        )
    return ts


def _check_settings(method: str | None, dt: float, rtol: float, atol: float) -> None:
    """Raise SolverInputError on an unknown method or a non-positive step/tolerance."""
    if method is not None and method not in METHODS:
        raise SolverInputError(f"unknown SDE method {method!r}; expected one of {METHODS.all()}.")
    for name, value in (("dt", dt), ("rtol", rtol), ("atol", atol)):
        if torch.is_tensor(value) or not float(value) > 0:
            raise SolverInputError(f"{name} must be a positive float, got {value!r}.")


def _validate(
    sde: Any, y0: Any, ts: Any, names: dict[str, str] | None, method: str | None,
    dt: float, rtol: float, atol: float,
) -> torch.Tensor:
    """Check every input; return ``ts`` as a tensor."""
    _check_sde(sde, names)
    _check_y0(y0)
    _check_settings(method, dt, rtol, atol)
    return _as_times(ts, y0)


def _default_method(sde: Any) -> str:
    """The method torchsde picks when ``method`` is None."""
    if sde.sde_type == "stratonovich":
        return "midpoint"
    return "euler" if sde.noise_type == "general" else "srk"


def _noise_size(proxy: _CountingSDE, y0: torch.Tensor, ts: torch.Tensor, logqp: bool) -> int | None:
    """Number of Brownian channels, or None where only torchsde can tell (no ``g``)."""
    if proxy.noise_type == "diagonal":
        return y0.shape[1] + (1 if logqp else 0)  # logqp appends one state (and noise) channel
    if proxy.noise_type == "scalar":
        return 1
    g = getattr(proxy, "g", None)
    if g is None:
        return None
    with torch.no_grad():
        return int(g(ts[0], y0).shape[-1])  # (batch, state, noise)


def _default_brownian(
    proxy: _CountingSDE, y0: torch.Tensor, ts: torch.Tensor, method: str | None, dt: float,
    logqp: bool,
) -> torchsde.BrownianInterval | None:
    """The Brownian motion torchsde would make for ``bm=None``, with two changes.

    The step size ``dt`` is passed as a hint: without it, a float32 solve on [0, 1] at
    dt=1e-2 spends ~50x longer in Brownian queries (torchsde issue #109). The entropy is drawn
    from torch's generator, so ``torch.manual_seed`` fixes the sample path (torchsde draws it
    from numpy's global generator). Returns None (torchsde's default) where the noise size is
    unknown or ``ts`` has a single time.
    """
    noise = _noise_size(proxy, y0, ts, logqp) if ts.numel() > 1 else None
    if noise is None:
        return None
    levy = _LEVY_AREA.get(method or _default_method(proxy), "none")
    return torchsde.BrownianInterval(
        t0=ts[0], t1=ts[-1], size=(y0.shape[0], noise), dtype=y0.dtype, device=y0.device,
        entropy=int(torch.randint(0, 2**31 - 1, ()).item()), dt=dt,
        levy_area_approximation=levy,
    )


def _check_finite(result: Any, ts: torch.Tensor) -> None:
    """Raise NonFiniteStateError at the first output time where the solution is not finite.

    Args:
        result: what torchsde returned: the solution ``(T, batch, state)`` or a tuple whose
            first element is it (``logqp``/``extra``); the log-ratio, if any, is checked too.
        ts: the output times, shape ``(T,)``.
    """
    parts = result if isinstance(result, tuple) else (result,)
    checks = [(parts[0], 0, "SDE state")]
    if len(parts) > 1 and torch.is_tensor(parts[1]) and parts[1].dim() == 2:
        checks.append((parts[1], 1, "SDE log-ratio"))  # increments between ts[i-1] and ts[i]
    for tensor, offset, what in checks:
        bad = ~torch.isfinite(tensor.detach()).flatten(1).all(dim=1)
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0]) + offset
            raise NonFiniteStateError(float(ts[index]), what)


def sdeint(
    sde: Any,
    y0: torch.Tensor,
    ts: torch.Tensor | Sequence[float],
    *,
    method: str | None = None,
    dt: float = 1e-2,
    adaptive: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-4,
    bm: Any = None,
    names: dict[str, str] | None = None,
    logqp: bool = False,
    stats: SolverStats | None = None,
    **kwargs: Any,
) -> Any:
    """Integrate an SDE, backpropagating through the solver's operations.

    Args:
        sde: an object (usually an ``nn.Module``) with ``noise_type`` in :data:`NOISE_TYPES`,
            ``sde_type`` in :data:`SDE_TYPES`, and drift/diffusion methods ``f(t, y)``,
            ``g(t, y)`` (or ``f_and_g``, ``g_prod``, ... as torchsde accepts).
        y0: initial state, shape ``(batch, state)``.
        ts: output times, shape ``(T,)``, strictly increasing, dtype and device of ``y0``.
        method: torchsde method name; ``None`` picks torchsde's default for the SDE type.
        dt: step size (initial step size if ``adaptive``).
        adaptive: adaptive step-size control.
        rtol: relative tolerance (adaptive only).
        atol: absolute tolerance (adaptive only).
        bm: a torchsde Brownian motion; ``None`` draws a fresh ``BrownianInterval`` from
            torch's generator (``torch.manual_seed`` makes it reproducible).
        names: renames of the SDE's methods, e.g. ``{"drift": "my_f"}``.
        logqp: also return the log-ratio increments (latent SDEs; needs ``h``, prior drift).
        stats: if given, ``stats.nfe`` is increased by the number of drift/diffusion calls
            (counts are added, so call ``stats.reset()`` to reuse one object).
        **kwargs: passed on to ``torchsde.sdeint`` (``dt_min``, ``options``, ``extra``, ...).

    Returns:
        The solution, shape ``(T, batch, state)``; with ``logqp`` the tuple
        ``(ys, log_ratio)`` where ``log_ratio`` is ``(T - 1, batch)``, as torchsde returns.

    Raises:
        SolverInputError: a bad argument (the message says which and what to do).
        NonFiniteStateError: the solution contains NaN or inf.
    """
    ts = _validate(sde, y0, ts, names, method, dt, rtol, atol)
    proxy = _CountingSDE(sde, stats if stats is not None else SolverStats(), names)
    if bm is None:
        bm = _default_brownian(proxy, y0, ts, method, dt, logqp)
    result = torchsde.sdeint(
        proxy, y0, ts, bm=bm, method=method, dt=dt, adaptive=adaptive, rtol=rtol, atol=atol,
        logqp=logqp, **kwargs,
    )
    _check_finite(result, ts)
    return result


def sdeint_adjoint(
    sde: Any,
    y0: torch.Tensor,
    ts: torch.Tensor | Sequence[float],
    *,
    method: str | None = None,
    adjoint_method: str | None = None,
    dt: float = 1e-2,
    adaptive: bool = False,
    adjoint_adaptive: bool | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-4,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    bm: Any = None,
    names: dict[str, str] | None = None,
    logqp: bool = False,
    stats: SolverStats | None = None,
    adjoint_stats: SolverStats | None = None,
    **kwargs: Any,
) -> Any:
    """Integrate an SDE; gradients come from the stochastic adjoint (memory O(1) in steps).

    The backward pass solves the adjoint SDE on the same Brownian motion, re-integrating the
    state backward (Li et al. 2020). Stratonovich SDEs give cheaper and more accurate
    gradients; ``method="reversible_heun"`` makes them exact up to round-off (Kidger et al.
    2021).

    Args:
        sde: as in :func:`sdeint`; must be an ``nn.Module`` unless ``adjoint_params`` is given.
        y0: initial state, shape ``(batch, state)``.
        ts: output times, shape ``(T,)``, strictly increasing, dtype and device of ``y0``.
        method: forward method (``None``: torchsde's default).
        adjoint_method: backward method (``None``: torchsde's default for ``method``).
        dt: step size of both solves.
        adaptive: adaptive steps in the forward solve.
        adjoint_adaptive: adaptive steps in the backward solve (``None``: same as ``adaptive``).
        rtol: forward relative tolerance.
        atol: forward absolute tolerance.
        adjoint_rtol: backward relative tolerance (``None``: ``rtol``).
        adjoint_atol: backward absolute tolerance (``None``: ``atol``).
        adjoint_params: tensors to differentiate; ``None`` means ``sde.parameters()``.
        bm: a torchsde Brownian motion; ``None`` draws a fresh ``BrownianInterval`` from
            torch's generator (``torch.manual_seed`` makes it reproducible).
        names: renames of the SDE's methods, e.g. ``{"drift": "my_f"}``.
        logqp: also return the log-ratio increments.
        stats: receives the forward solve's drift/diffusion calls (``stats.nfe``), and the
            backward solve's too when ``adjoint_stats`` is None.
        adjoint_stats: receives the backward solve's calls, counted during ``backward()``.
        **kwargs: passed on to ``torchsde.sdeint_adjoint`` (``dt_min``, ``options``, ...).

    Returns:
        As :func:`sdeint`.

    Raises:
        SolverInputError: a bad argument (the message says which and what to do).
        NonFiniteStateError: the solution contains NaN or inf.
    """
    ts = _validate(sde, y0, ts, names, method, dt, rtol, atol)
    if adjoint_method is not None and adjoint_method not in METHODS:
        raise SolverInputError(
            f"unknown adjoint_method {adjoint_method!r}; expected one of {METHODS.all()}."
        )
    if adjoint_params is None and not isinstance(sde, nn.Module):
        raise SolverInputError(
            "sdeint_adjoint needs the parameters to differentiate: make the sde an nn.Module, "
            "or pass adjoint_params=(...) (adjoint_params=() if there are none)."
        )
    stats = stats if stats is not None else SolverStats()
    proxy = _CountingSDE(sde, stats, names)
    if bm is None:
        bm = _default_brownian(proxy, y0, ts, method, dt, logqp)
    result = torchsde.sdeint_adjoint(
        proxy, y0, ts, bm=bm, method=method, adjoint_method=adjoint_method, dt=dt,
        adaptive=adaptive,
        adjoint_adaptive=adaptive if adjoint_adaptive is None else adjoint_adaptive,
        rtol=rtol, atol=atol,
        adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
        adjoint_atol=atol if adjoint_atol is None else adjoint_atol,
        adjoint_params=adjoint_params, logqp=logqp, **kwargs,
    )
    proxy.sink = adjoint_stats if adjoint_stats is not None else stats
    _check_finite(result, ts)
    return result
