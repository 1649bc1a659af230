"""Work-precision study: every method of ``solvers.odeint`` on reference problems, both engines.

A benchmark, not a test: it writes numbers and plots to files and is run on purpose.

Problems (ids for ``--problems``, comma-separated), all in float64:
    linear: dx/dt = A x, A = Q B Q^T with B two damped rotations (frequencies 1 and 3,
        damping 0.1 and 0.05) and Q a seeded random orthogonal matrix; 16 initial states,
        t in [0, 10]. Reference: the exact solution x(t) = expm(A t) x0.
    neural: a trained Neural ODE vector field, ``ocnode.MLPODEFunc(2, 64)`` (tanh), fitted
        by Adam (seeded, about a second) to the cubic spiral dx/dt = x^3 A_s,
        A_s = [[-0.1, 2], [-2, -0.1]] (the dynamics of torchdiffeq's ode_demo), by matching
        derivatives at states drawn in the disc of radius 2; 16 initial states on radii
        0.5..2, t in [0, 10]. Reference: dopri5 at rtol = atol = 1e-12.
    vdp: Van der Pol, x'' = mu (1 - x^2) x' - x with mu = 10 (stiff-ish: relaxation
        oscillations with fast jumps), first-order form (x, v); 8 initial states, t in [0, 20].
        Reference: dopri5 at rtol = atol = 1e-12 (about 55,000 evaluations).

The references of ``neural`` and ``vdp`` are solved by our engine with autograd switched on,
which takes its list-of-stages code path rather than the preallocated stage buffer used in
no-grad mode (the mode under test), and are cross-checked against torchdiffeq's dopri5 at the
same tolerance: the largest difference is reported as the reference's uncertainty and drawn
as a dotted line on the plots (errors below it are not resolved).

Methods (``--methods``, default all): the explicit Runge-Kutta methods (adaptive_heun,
fehlberg2, bosh3, dopri5, tsit5, dopri8; euler, midpoint, heun2, heun3, rk4, rk4_classic),
the implicit Runge-Kutta methods on a fixed grid with a Newton solve per step
(implicit_euler, implicit_midpoint, trapezoid, sdirk2, trbdf2, radauIIA3, radauIIA5, gl4,
gl6), the Adams multistep methods (explicit_adams, implicit_adams, fixed_adams: fixed grid)
and scipy_solver (scipy's LSODA, no gradients; swept like an adaptive method). For each
problem, method and engine (ours, and torchdiffeq where it has the method: "rk4" is Kutta's
3/8 rule in both; torchdiffeq has no tsit5, no classic rk4 (our "rk4_classic") and, in the
version we test, no implicit Runge-Kutta methods):
    adaptive methods: a sweep over rtol = atol (1e-2 ... 1e-9);
    fixed-step methods: a sweep over step sizes h = (output spacing) / 2^k, so that the
        output times lie on both engines' grids (no interpolation error from either).
Each point records the error against the reference (max abs over the batch, the state
components and the output times after t0; the final-time error separately), the NFE
(accepted/rejected steps for our engine), and the wall time: the median of a few repeats
in which the two engines alternate (ours first on even repeats, torchdiffeq first on odd).
A solve that raises (``solvers.SolverError`` from ours; AssertionError/RuntimeError from
torchdiffeq, e.g. "underflow in dt") or returns non-finite values is recorded as a failed
point, not a crash. A point whose predicted single-solve time exceeds MAX_SOLVE_S (from the
previous point and the method's order) is skipped, and so are the tighter ones after it.

Output (in ``--out``, default ``experiments/results`` under the working directory):
solver_comparison.json (every point, settings, machine), solver_comparison.md (tables and
summary), solver_comparison_<problem>.png (the explicit Runge-Kutta methods) and
solver_comparison_<problem>_implicit.png (the implicit, multistep and scipy methods): error
vs NFE and error vs wall time, log-log; our engine solid, torchdiffeq dashed; x = failed
solve.
With ``--grad`` (every solve with autograd on, the parameters frozen so no graph is
recorded: our engine then keeps its stages as a list instead of the reused no-grad buffer)
the files are named solver_comparison_grad*, so both modes can be kept side by side.

``--nfe-during-training`` instead trains an ``MLPODEFunc`` in an ODE block (dopri5,
backprop through the solver, Adam from the optimizer registry, one
:func:`ocnode.training.step.train_step` per iteration) on segments of the spiral trajectory and
records the forward NFE per iteration (:class:`ocnode.training.step.NFECounter`;
solver_comparison_training.json / .png). It is optional and not part of the default run.

Usage (``ocnode solvers`` runs :func:`main`)::

    ocnode solvers                       # full study, < 5 min
    ocnode solvers --quick               # fewer points, 1 repeat
    ocnode solvers --problems linear --methods dopri5,rk4
    ocnode solvers --grad                # solves with autograd on
    ocnode solvers --nfe-during-training --quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import solvers
from ocnode.nn import MLPODEFunc, ODEBlock
from ocnode.training.optimizers import build_optimizer
from ocnode.training.records import machine_info
from ocnode.training.step import NFECounter, train_step
from solvers.spec import method_kind

# ---- configuration (CLI flags override the first ones) ----------------------------------
OUT_DIR = Path("experiments/results")  # relative to the working directory
PROBLEMS = ("linear", "neural", "vdp")
ADAPTIVE = ("adaptive_heun", "bosh3", "dopri5", "tsit5")
FIXED = ("euler", "midpoint", "rk4", "rk4_classic")
#: the other methods of torchdiffeq's API, by figure: explicit Runge-Kutta (with the ones
#: above), and implicit Runge-Kutta, multistep and scipy (their own figure)
MORE_RK = ("fehlberg2", "dopri8", "heun2", "heun3")
IMPLICIT_ETC = ("implicit_euler", "implicit_midpoint", "trapezoid", "sdirk2", "trbdf2",
                "radauIIA3", "radauIIA5", "gl4", "gl6", "explicit_adams", "implicit_adams",
                "fixed_adams", "scipy_solver")
METHODS = ADAPTIVE + FIXED + MORE_RK + IMPLICIT_ETC
TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)
QUICK_TOLS = (1e-3, 1e-6, 1e-9)
HALVINGS = tuple(range(0, 11))  # fixed step h = spacing / 2**k
QUICK_HALVINGS = (1, 3, 5)
REPEATS, QUICK_REPEATS = 3, 1
THREADS = 1  # the machine is shared: one thread keeps timings stable
SEED = 0
DTYPE = torch.float64
N_OUT = 5  # output times, equally spaced, the first at t0
SLOW_S = 0.3  # a solve slower than this is timed once instead of REPEATS times
MAX_SOLVE_S = 1.5  # skip points predicted to take longer than this per solve
MAX_NUM_STEPS = 100_000  # hard cap of adaptive steps, passed to both engines
ERROR_FLOOR = 1e-13  # a fixed-step sweep stops once its error is at round-off level
REF_TOL = 1e-12
REF_METHOD = "dopri5"
TARGET_ERROR = 1e-6  # the summary's "cost to reach this error"
PLOT_ERROR_MAX = 1e2  # the plots' error axis stops here (larger: diverged, off the top)
# torchdiffeq's name for each of our methods it also has
TORCHDIFFEQ_NAME = {m: m for m in (
    "adaptive_heun", "bosh3", "dopri5", "euler", "midpoint", "rk4", "fehlberg2", "dopri8",
    "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver")}
ENGINES = ("ocnode", "torchdiffeq")
# what a failed solve raises: ours raises SolverError; torchdiffeq asserts ("underflow in dt",
# "max_num_steps exceeded") or raises RuntimeError
FAILURES = (solvers.SolverError, AssertionError, RuntimeError, OverflowError)

# problem parameters
LINEAR_BLOCKS = ((0.1, 1.0), (0.05, 3.0))  # (damping, frequency) of each 2-D rotation block
LINEAR_BATCH, LINEAR_T1 = 16, 10.0
SPIRAL_A = ((-0.1, 2.0), (-2.0, -0.1))
NEURAL_HIDDEN, NEURAL_BATCH, NEURAL_T1 = 64, 16, 10.0
NEURAL_FIT_STEPS, NEURAL_FIT_LR, NEURAL_FIT_BATCH, NEURAL_FIT_RADIUS = 600, 3e-2, 256, 2.0
VDP_MU, VDP_BATCH, VDP_T1 = 10.0, 8, 20.0
# --nfe-during-training
TRAIN_ITERS, QUICK_TRAIN_ITERS = 300, 10
TRAIN_TOL, TRAIN_LR, TRAIN_BATCH, TRAIN_SEGMENT, TRAIN_POINTS = 1e-5, 1e-2, 16, 10, 100


# ---- problems ---------------------------------------------------------------------------
@dataclass
class Problem:
    """One reference problem: a vector field, a batch of initial states, output times.

    Attributes:
        name, title: id and a one-line description.
        func: f(t, x) -> dx/dt, x of shape (B, D).
        y0: initial states, (B, D).
        t: output times, (N_OUT,), equally spaced.
        reference: the reference solution at t, (N_OUT, B, D).
        info: how the reference was obtained and other facts for the report.
    """

    name: str
    title: str
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    y0: torch.Tensor
    t: torch.Tensor
    reference: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> float:
        return float(self.t[1] - self.t[0])


def odeint_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``solvers.odeint`` on a tensor state (so the result is one tensor)."""
    ys = solvers.odeint(*args, **kwargs)
    assert isinstance(ys, torch.Tensor)
    return ys


def output_times(t1: float) -> torch.Tensor:
    return torch.linspace(0.0, t1, N_OUT, dtype=DTYPE)


def make_linear() -> Problem:
    """dx/dt = A x with two damped rotations in a random orthonormal basis; exact reference."""
    gen = torch.Generator().manual_seed(SEED)
    blocks = torch.zeros(4, 4, dtype=DTYPE)
    for i, (damp, freq) in enumerate(LINEAR_BLOCKS):
        blocks[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor(
            [[-damp, freq], [-freq, -damp]], dtype=DTYPE)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=DTYPE))
    a = q @ blocks @ q.T
    y0 = torch.randn(LINEAR_BATCH, 4, generator=gen, dtype=DTYPE)
    t = output_times(LINEAR_T1)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(a * s).T for s in t])
    return Problem("linear", "linear: damped rotations in 4-D, exact reference",
                   lambda t, x: x @ a.T, y0, t, exact,
                   {"reference": "exact: expm(A t) x0", "reference_uncertainty": 0.0,
                    "note": "rk4 and rk4_classic coincide here: every 4-stage order-4 method "
                    "applies the same polynomial of h A to a linear constant-coefficient system"})


def spiral_field(x: torch.Tensor) -> torch.Tensor:
    """The cubic spiral x^3 A_s (torchdiffeq's ode_demo dynamics). x: (B, 2)."""
    return x.pow(3) @ torch.tensor(SPIRAL_A, dtype=x.dtype)


def disc_samples(n: int, r_min: float, r_max: float, gen: torch.Generator) -> torch.Tensor:
    """n points spread over the annulus r_min <= |x| <= r_max (uniform in area), (n, 2)."""
    u = torch.rand(n, 1, generator=gen, dtype=DTYPE)
    r = (r_min**2 + u * (r_max**2 - r_min**2)).sqrt()
    theta = 2 * math.pi * torch.rand(n, 1, generator=gen, dtype=DTYPE)
    return torch.cat([r * theta.cos(), r * theta.sin()], dim=1)


def fit_spiral_field() -> tuple[MLPODEFunc, float, float]:
    """Fit MLPODEFunc(2, 64) to the spiral's vector field by derivative matching.

    Returns:
        (the frozen field, its relative RMS misfit on a fresh sample, seconds taken)
    """
    start = time.perf_counter()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    func = MLPODEFunc(2, NEURAL_HIDDEN).to(DTYPE)
    opt = torch.optim.Adam(func.parameters(), lr=NEURAL_FIT_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, NEURAL_FIT_STEPS)
    for _ in range(NEURAL_FIT_STEPS):
        x = disc_samples(NEURAL_FIT_BATCH, 0.0, NEURAL_FIT_RADIUS, gen)
        t = NEURAL_T1 * torch.rand((), generator=gen, dtype=DTYPE)
        loss = (func(t, x) - spiral_field(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    func.requires_grad_(False)
    x = disc_samples(4096, 0.0, NEURAL_FIT_RADIUS, gen)
    target = spiral_field(x)
    misfit = float((func(torch.zeros((), dtype=DTYPE), x) - target).norm() / target.norm())
    return func, misfit, time.perf_counter() - start


def make_neural() -> Problem:
    """The trained MLP field; reference by dopri5 at REF_TOL."""
    func, misfit, seconds = fit_spiral_field()
    gen = torch.Generator().manual_seed(SEED + 1)
    y0 = disc_samples(NEURAL_BATCH, 0.5, NEURAL_FIT_RADIUS, gen)
    problem = Problem("neural", "trained Neural ODE: MLPODEFunc(2, 64) fitted to a spiral field",
                      func, y0, output_times(NEURAL_T1))
    problem.info.update({"fit_relative_rms_misfit": misfit, "fit_seconds": seconds,
                         "fit_steps": NEURAL_FIT_STEPS})
    return problem


def van_der_pol(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x' = v, v' = mu (1 - x^2) v - x. y: (B, 2)."""
    x, v = y[..., 0], y[..., 1]
    return torch.stack((v, VDP_MU * (1 - x * x) * v - x), dim=-1)


def make_vdp() -> Problem:
    """Van der Pol with mu = VDP_MU; reference by dopri5 at REF_TOL."""
    gen = torch.Generator().manual_seed(SEED + 2)
    x0 = 4 * torch.rand(VDP_BATCH, 1, generator=gen, dtype=DTYPE) - 2
    v0 = 2 * torch.rand(VDP_BATCH, 1, generator=gen, dtype=DTYPE) - 1
    return Problem("vdp", f"Van der Pol, mu = {VDP_MU:g}, t in [0, {VDP_T1:g}]", van_der_pol,
                   torch.cat([x0, v0], dim=1), output_times(VDP_T1))


def solve_reference(problem: Problem, check: bool) -> None:
    """Fill problem.reference by REF_METHOD at REF_TOL (our engine, autograd on).

    With ``check``, also solve with torchdiffeq at the same tolerance and record the largest
    difference as the reference's uncertainty.
    """
    for engine in ENGINES if check else ENGINES[:1]:
        stats = solvers.SolverStats()
        start = time.perf_counter()
        with torch.enable_grad():  # stage-list path: independent of the no-grad buffer
            ys = odeint_tensor(problem.func, problem.y0, problem.t, rtol=REF_TOL,
                                atol=REF_TOL, method=REF_METHOD, stats=stats, backend=engine)
        seconds = time.perf_counter() - start
        if engine == "ocnode":
            problem.reference = ys.detach()
            problem.info.update({
                "reference": f"{REF_METHOD}, rtol = atol = {REF_TOL:g}, our engine",
                "reference_nfe": stats.nfe, "reference_steps": stats.n_accepted,
                "reference_rejected": stats.n_rejected, "reference_seconds": seconds})
        else:
            diff = float((ys - problem.reference).abs().max())
            problem.info.update({"reference_uncertainty": diff,
                                 "reference_check": f"torchdiffeq {REF_METHOD} at {REF_TOL:g}: "
                                 f"max difference {diff:.2e} ({stats.nfe} NFE)"})


BUILDERS: dict[str, Callable[[], Problem]] = {
    "linear": make_linear, "neural": make_neural, "vdp": make_vdp}


# ---- one solve, one point ---------------------------------------------------------------
@dataclass
class Run:
    """One timed solve: the solution (None on failure), its stats, seconds, the exception."""

    ys: torch.Tensor | None
    stats: solvers.SolverStats
    seconds: float
    error: BaseException | None


def is_adaptive(method: str) -> bool:
    """Whether the method controls its step size (swept over tolerances, not steps)."""
    return method_kind(method) in ("adaptive", "scipy")


def error_order(method: str) -> int:
    """The order of an adaptive method's error estimate (scipy's LSODA: taken as 5)."""
    tab = solvers.get_tableau(method) if method_kind(method) == "adaptive" else None
    return tab.err_order if isinstance(tab, solvers.ButcherTableau) else 5


def solve_once(problem: Problem, method: str, engine: str, setting: float,
               grad: bool) -> Run:
    """Solve ``problem`` once; ``setting`` is rtol = atol (adaptive) or the step size."""
    adaptive = is_adaptive(method)
    name = method if engine == "ocnode" else TORCHDIFFEQ_NAME[method]
    kind = method_kind(method)
    options = ({"max_num_steps": MAX_NUM_STEPS} if kind == "adaptive" else {} if kind == "scipy"
               else {"step_size": setting})
    tol = setting if adaptive else 1e-6  # fixed-step methods ignore tolerances
    stats = solvers.SolverStats()
    ys, failure = None, None
    start = time.perf_counter()
    try:
        with torch.set_grad_enabled(grad):
            ys = odeint_tensor(problem.func, problem.y0, problem.t, rtol=tol, atol=tol,
                                method=name, options=options, stats=stats, backend=engine)
    except FAILURES as exc:
        failure = exc
    return Run(ys, stats, time.perf_counter() - start, failure)


def point_record(problem: Problem, method: str, engine: str, setting: float,
                 runs: list[Run]) -> dict[str, Any]:
    """The JSON record of one (method, engine, setting) from its runs (all alike but time)."""
    first = runs[0]
    adaptive = is_adaptive(method)
    rec: dict[str, Any] = {
        "problem": problem.name, "method": method, "engine": engine,
        "kind": "adaptive" if adaptive else "fixed",
        "tol": setting if adaptive else None, "step_size": None if adaptive else setting,
        "nfe": first.stats.nfe,
        "n_accepted": first.stats.n_accepted if engine == "ocnode" else None,
        "n_rejected": first.stats.n_rejected if engine == "ocnode" else None,
        "wall_s": statistics.median(r.seconds for r in runs),
        "wall_s_all": [r.seconds for r in runs], "status": "ok", "error": None,
        "error_final": None, "us_per_nfe": None, "failure": None,
    }
    if first.error is not None:
        rec.update(status="failed",
                   failure=f"{type(first.error).__name__}: {str(first.error)[:240]}")
        return rec
    assert first.ys is not None
    diff = (first.ys - problem.reference).abs()
    err, err_final = float(diff[1:].max()), float(diff[-1].max())
    if not (math.isfinite(err) and math.isfinite(err_final)):
        rec.update(status="failed", failure="non-finite solution (NaN or inf returned)")
        return rec
    rec.update(error=err, error_final=err_final,
               us_per_nfe=1e6 * rec["wall_s"] / max(rec["nfe"], 1))
    return rec


def skipped_record(problem: Problem, method: str, engine: str, setting: float,
                   why: str) -> dict[str, Any]:
    adaptive = is_adaptive(method)
    return {"problem": problem.name, "method": method, "engine": engine,
            "kind": "adaptive" if adaptive else "fixed",
            "tol": setting if adaptive else None, "step_size": None if adaptive else setting,
            "status": "skipped", "failure": why}


# ---- sweeps -----------------------------------------------------------------------------
@dataclass
class Budget:
    """Per-engine sweep state: the last solve's setting and time, and whether it stopped."""

    setting: float | None = None
    seconds: float = 0.0
    stopped: str | None = None

    def predicted(self, method: str, setting: float) -> float:
        """Seconds the next solve should take, from the last one and the method's order."""
        if self.setting is None:
            return 0.0
        if is_adaptive(method):
            return self.seconds * (self.setting / setting) ** (1.0 / error_order(method))
        return self.seconds * self.setting / setting


def engines_for(method: str) -> tuple[str, ...]:
    return ENGINES if method in TORCHDIFFEQ_NAME else ENGINES[:1]


def measure(problem: Problem, method: str, setting: float, budgets: dict[str, Budget],
            repeats: int, grad: bool) -> list[dict[str, Any]]:
    """All engines at one setting, interleaved; returns their records."""
    active, records = [], []
    for engine, budget in budgets.items():
        cost = budget.predicted(method, setting)
        if budget.stopped is None and cost > MAX_SOLVE_S:
            budget.stopped = f"predicted {cost:.1f} s per solve > MAX_SOLVE_S = {MAX_SOLVE_S} s"
        if budget.stopped is not None:
            records.append(skipped_record(problem, method, engine, setting, budget.stopped))
        else:
            active.append(engine)
    runs: dict[str, list[Run]] = {e: [] for e in active}
    for i in range(repeats):
        for engine in active if i % 2 == 0 else active[::-1]:
            done = runs[engine]
            if done and (done[0].error is not None or done[0].seconds > SLOW_S):
                continue  # failed or slow: one solve is enough
            done.append(solve_once(problem, method, engine, setting, grad))
    for engine in active:
        records.append(point_record(problem, method, engine, setting, runs[engine]))
        update_budget(budgets[engine], records[-1], setting)
    return records


def update_budget(budget: Budget, rec: dict[str, Any], setting: float) -> None:
    """Remember the last successful solve; stop after a slow failure or at round-off."""
    if rec["status"] == "ok":
        budget.setting, budget.seconds = setting, rec["wall_s"]
        if rec["kind"] == "fixed" and rec["error"] < ERROR_FLOOR:
            budget.stopped = f"error already below {ERROR_FLOOR:g} (round-off level)"
    elif rec["wall_s"] > MAX_SOLVE_S:
        budget.stopped = "previous point failed after more than MAX_SOLVE_S"


def sweep(problem: Problem, methods: list[str], tols: tuple[float, ...],
          halvings: tuple[int, ...], repeats: int, grad: bool) -> list[dict[str, Any]]:
    """Every selected method over its settings; prints one line per point."""
    records: list[dict[str, Any]] = []
    for method in methods:
        warm_up(problem, method)
        adaptive = is_adaptive(method)
        settings = tols if adaptive else tuple(problem.spacing / 2**k for k in halvings)
        budgets = {e: Budget() for e in engines_for(method)}
        for setting in settings:
            for rec in measure(problem, method, setting, budgets, repeats, grad):
                records.append(rec)
                print("  " + point_line(rec), flush=True)
    return records


def warm_up(problem: Problem, method: str) -> None:
    """One short solve of the method per engine, so that first-call costs (imports, caches,
    the first batched Jacobian of an implicit method: seconds) stay out of the timings."""
    short = Problem(problem.name, "", problem.func, problem.y0,
                    problem.t[:2] * 0.05, problem.reference[:2])
    setting = 1e-3 if is_adaptive(method) else short.spacing / 4
    for engine in engines_for(method):
        solve_once(short, method, engine, setting, grad=False)


def point_line(rec: dict[str, Any]) -> str:
    setting = f"tol={rec['tol']:g}" if rec["kind"] == "adaptive" else f"h={rec['step_size']:.4g}"
    head = f"{rec['problem']:6s} {rec['method']:13s} {rec['engine']:11s} {setting:12s}"
    if rec["status"] == "ok":
        return (f"{head} err={rec['error']:.2e} nfe={rec['nfe']:6d} "
                f"t={1e3 * rec['wall_s']:8.1f} ms")
    return f"{head} {rec['status'].upper()}: {rec['failure'][:100]}"


# ---- summaries --------------------------------------------------------------------------
def ok_points(records: list[dict[str, Any]], method: str, engine: str) -> list[dict[str, Any]]:
    return [r for r in records if r["method"] == method and r["engine"] == engine
            and r["status"] == "ok"]


def cost_to_reach(points: list[dict[str, Any]], target: float, key: str) -> dict | None:
    """``key`` (nfe or wall_s) needed for error <= target, interpolated log-log.

    Walks the points in increasing cost; at the first that meets the target, interpolates
    with the point before it. Returns None if none meets it; "bound" marks a value that is
    only an upper bound (the cheapest point already met the target).
    """
    pts = sorted(points, key=lambda r: r[key])
    for i, p in enumerate(pts):
        if p["error"] <= target:
            if i == 0 or pts[i - 1]["error"] <= target or pts[i - 1]["error"] == p["error"]:
                return {"value": p[key], "bound": i == 0}
            q = pts[i - 1]
            s = (math.log(target) - math.log(q["error"])) / (
                math.log(p["error"]) - math.log(q["error"]))
            value = math.exp(math.log(q[key]) + s * (math.log(p[key]) - math.log(q[key])))
            return {"value": value, "bound": False}
    return None


def summarize(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per (method, engine): cost to reach TARGET_ERROR, median time per NFE, failures."""
    rows = []
    for method in methods:
        for engine in engines_for(method):
            pts = ok_points(records, method, engine)
            big = [p["us_per_nfe"] for p in pts if p["nfe"] >= 100]
            rows.append({
                "method": method, "engine": engine,
                "nfe_to_target": cost_to_reach(pts, TARGET_ERROR, "nfe"),
                "seconds_to_target": cost_to_reach(pts, TARGET_ERROR, "wall_s"),
                "median_us_per_nfe": statistics.median(big) if big else None,
                "n_failed": sum(1 for r in records if r["method"] == method
                                and r["engine"] == engine and r["status"] == "failed"),
            })
    return {"target_error": TARGET_ERROR, "rows": rows,
            "time_per_nfe_ratio": per_nfe_ratios(records, methods)}


def per_nfe_ratios(records: list[dict[str, Any]], methods: list[str]) -> dict[str, float]:
    """Per method: median over shared settings of (ours us/NFE) / (torchdiffeq us/NFE)."""
    out = {}
    for method in methods:
        if method not in TORCHDIFFEQ_NAME:
            continue
        ours = {r["tol"] or r["step_size"]: r for r in ok_points(records, method, "ocnode")}
        theirs = ok_points(records, method, "torchdiffeq")
        ratios = [ours[r["tol"] or r["step_size"]]["us_per_nfe"] / r["us_per_nfe"]
                  for r in theirs if (r["tol"] or r["step_size"]) in ours]
        if ratios:
            out[method] = statistics.median(ratios)
    return out


# ---- plots ------------------------------------------------------------------------------
def figures(methods: list[str]) -> dict[str, list[str]]:
    """The methods of each figure: '' (explicit Runge-Kutta) and '_implicit' (implicit
    Runge-Kutta, multistep and scipy), the suffix of the figure's file name; empty ones
    left out."""
    groups = {"": [m for m in methods if m not in IMPLICIT_ETC],
              "_implicit": [m for m in methods if m in IMPLICIT_ETC]}
    return {suffix: group for suffix, group in groups.items() if group}


def plot_problem(problem: Problem, records: list[dict[str, Any]], methods: list[str],
                 path: Path) -> None:
    """Error vs NFE and error vs wall time, one line per (method, engine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.6))
    finite = [r["error"] for r in records if r["status"] == "ok" and r["method"] in methods]
    top = min(10 ** math.ceil(math.log10(max(finite))), PLOT_ERROR_MAX) if finite else 1.0
    palette = matplotlib.colormaps["tab20"]
    colors = {m: palette(i % 20) for i, m in enumerate(methods)}
    for method in methods:
        for engine in engines_for(method):
            draw_line(axes, records, method, engine, colors[method], top)
    floor = problem.info.get("reference_uncertainty") or 0.0
    for ax, xlabel in zip(axes, ("NFE (evaluations of the vector field)", "wall time [s]")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("max abs error vs reference")
        ax.set_ylim(top=top * 3)
        ax.grid(True, which="major", alpha=0.3)
        if floor > 0:
            ax.axhline(floor, color="0.4", ls=":", lw=1)
    axes[0].set_title("error vs NFE")
    axes[1].set_title("error vs wall time (median, 1 thread)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    note = ("solid: ocnode, dashed: torchdiffeq; o adaptive (tol sweep), s fixed step (h sweep)"
            "\nx: failed solve (drawn at the top); points on the top edge: diverged")
    if floor > 0:
        note += f"; dotted: reference uncertainty {floor:.1e}"
    fig.suptitle(f"{problem.title}\n{note}", fontsize=10)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_line(axes: Any, records: list[dict[str, Any]], method: str, engine: str,
              color: Any, top: float) -> None:
    """One (method, engine) on both panels; failed points as x at the top."""
    pts = sorted(ok_points(records, method, engine), key=lambda r: r["nfe"])
    failed = [r for r in records if r["method"] == method and r["engine"] == engine
              and r["status"] == "failed"]
    style = {"color": color, "ls": "-" if engine == "ocnode" else "--",
             "marker": "o" if is_adaptive(method) else "s",
             "ms": 4, "lw": 1.4, "mfc": "none" if engine == "torchdiffeq" else color}
    for ax, key in zip(axes, ("nfe", "wall_s")):
        ax.plot([p[key] for p in pts], [min(p["error"], 3 * top) for p in pts],
                label=f"{method} ({engine})", **style)
        xs = [r[key] for r in failed if r[key] > 0]
        if xs:
            ax.scatter(xs, [top] * len(xs), marker="x", color=color, s=36, zorder=5)


# ---- report -----------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1e") -> str:
    return "-" if x is None else format(x, spec)


def pivot_table(records: list[dict[str, Any]], methods: list[str], kind: str) -> list[str]:
    """Rows (method, engine), columns settings; cells 'error (NFE)' and wall ms."""
    key = "tol" if kind == "adaptive" else "step_size"
    chosen = [m for m in methods if is_adaptive(m) == (kind == "adaptive")]
    settings = sorted({r[key] for r in records if r["method"] in chosen}, reverse=True)
    if not settings:
        return []
    head = "tol" if kind == "adaptive" else "h"
    lines = [f"| method | engine | {' | '.join(f'{head}={s:.3g}' for s in settings)} |",
             "|---|---|" + "---|" * len(settings)]
    for method in chosen:
        for engine in engines_for(method):
            cells = [cell(records, method, engine, key, s) for s in settings]
            lines.append(f"| {method} | {engine} | {' | '.join(cells)} |")
    return lines


def cell(records: list[dict[str, Any]], method: str, engine: str, key: str, s: float) -> str:
    for r in records:
        if r["method"] == method and r["engine"] == engine and r[key] == s:
            if r["status"] == "ok":
                return f"{r['error']:.1e} ({r['nfe']}, {1e3 * r['wall_s']:.3g} ms)"
            return "FAILED" if r["status"] == "failed" else "skip"
    return ""


def summary_table(summary: dict[str, Any]) -> list[str]:
    lines = [f"Cost to reach max error {summary['target_error']:g} (log-log interpolation "
             "between sweep points; '<=' the cheapest point already met it; '-' never met):",
             "", "| method | engine | NFE | wall ms | median us/NFE (NFE >= 100) | failed |",
             "|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        nfe, sec = row["nfe_to_target"], row["seconds_to_target"]
        nfe_s = "-" if nfe is None else ("<=" if nfe["bound"] else "") + f"{nfe['value']:.0f}"
        sec_s = "-" if sec is None else ("<=" if sec["bound"] else "") + \
            f"{1e3 * sec['value']:.3g}"
        lines.append(f"| {row['method']} | {row['engine']} | {nfe_s} | {sec_s} "
                     f"| {fmt(row['median_us_per_nfe'], '.0f')} | {row['n_failed']} |")
    ratios = summary["time_per_nfe_ratio"]
    if ratios:
        lines += ["", "Time per NFE, ours / torchdiffeq (median over shared settings): "
                  + ", ".join(f"{m} {v:.2f}" for m, v in ratios.items()) + "."]
    return lines


def failure_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        if r["status"] == "failed":
            setting = f"tol {r['tol']:g}" if r["kind"] == "adaptive" else \
                f"h {r['step_size']:.4g}"
            why = r["failure"].split(". ")[0][:160]
            lines.append(f"- {r['method']} ({r['engine']}), {setting}: {why}")
    return lines or ["- none"]


def problem_markdown(name: str, block: dict[str, Any]) -> list[str]:
    info, records = block["info"], block["points"]
    facts = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                      for k, v in info.items())
    stem = block["stem"]
    pictures = [f"![{name}{suffix}]({stem}_{name}{suffix}.png)"
                for suffix in figures(block["methods"])]
    lines = [f"## {block['title']}", "", *pictures, "",
             f"Facts: {facts}.", "",
             "Cells: max abs error over batch, components and output times (NFE, median wall "
             "time). 'skip' = over the time budget or already at round-off.", "",
             "### Adaptive methods (rtol = atol)", "",
             *pivot_table(records, block["methods"], "adaptive"), "",
             "### Fixed-step methods (step size h)", "",
             *pivot_table(records, block["methods"], "fixed"), "",
             "### Summary", "", *summary_table(block["summary"]), "",
             "### Failed solves", "", *failure_lines(records), ""]
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = ["# solver_comparison: work-precision of every method, ours vs torchdiffeq", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, shared), torch {m['torch']} with "
             f"{m['torch_threads']} thread, torchdiffeq {m['torchdiffeq']}, Python "
             f"{m['python']}. float64. Repeats: {s['repeats']} interleaved (median; solves "
             f"over {SLOW_S} s timed once). Autograd during solves: {s['grad']}. Run time: "
             f"{result['runtime_s']:.0f} s.", ""]
    for name, block in result["problems"].items():
        lines += problem_markdown(name, block)
    return "\n".join(lines) + "\n"


# ---- NFE during training (optional) -----------------------------------------------------
class SpiralFit(nn.Module):
    """An ``MLPODEFunc(2, NEURAL_HIDDEN)`` in an ODE block that returns whole trajectories.

    The block solves with dopri5 at ``TRAIN_TOL`` and backpropagates through the solver.
    """

    def __init__(self) -> None:
        super().__init__()
        spec = solvers.SolverSpec(method="dopri5", rtol=TRAIN_TOL, atol=TRAIN_TOL, adjoint=False)
        self.ode = ODEBlock(MLPODEFunc(2, NEURAL_HIDDEN), solver=spec)

    def forward(self, x0: Tensor, t: Tensor) -> Tensor:
        """States at the times ``t`` (S,) from ``x0`` (B, 2) at ``t[0]``: (S, B, 2)."""
        ys = self.ode.trajectory(x0, t)
        assert isinstance(ys, Tensor)
        return ys


def spiral_truth() -> tuple[Tensor, Tensor]:
    """(times, states) of the spiral from (2, 0): (TRAIN_POINTS,), (TRAIN_POINTS, 2)."""
    t_all = torch.linspace(0.0, NEURAL_T1, TRAIN_POINTS, dtype=DTYPE)
    start_state = torch.tensor([[2.0, 0.0]], dtype=DTYPE)
    truth = odeint_tensor(lambda t, x: spiral_field(x), start_state, t_all, rtol=1e-10,
                          atol=1e-10)[:, 0]  # no parameters: no graph is recorded
    return t_all, truth


def segment_batch(truth: Tensor, gen: torch.Generator) -> tuple[Tensor]:
    """TRAIN_BATCH random segments of TRAIN_SEGMENT points, stacked as (S, B, 2)."""
    idx = torch.randint(0, TRAIN_POINTS - TRAIN_SEGMENT, (TRAIN_BATCH,), generator=gen)
    return (torch.stack([truth[i:i + TRAIN_SEGMENT] for i in idx], dim=1),)


def nfe_during_training(iters: int, out: Path) -> None:
    """Fit :class:`SpiralFit` to spiral trajectory segments with the training core (Adam,
    :func:`ocnode.training.step.train_step`); record the loss and NFE of every iteration."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    t_all, truth = spiral_truth()
    t_seg = t_all[:TRAIN_SEGMENT]
    model = SpiralFit().to(DTYPE)
    opt = build_optimizer("adam", model, {"lr": TRAIN_LR})
    counter = NFECounter(model)

    def loss_fn(m: nn.Module, batch: tuple[Tensor]) -> Tensor:
        segs = batch[0]
        return (m(segs[0], t_seg) - segs).abs().mean()

    log = []
    for it in range(iters):
        batch = segment_batch(truth, gen)
        start = time.perf_counter()
        loss = train_step(model, opt, loss_fn, batch, counter=counter)
        seconds = time.perf_counter() - start
        nfe_forward, nfe_backward = counter.take()
        log.append({"iter": it, "loss": loss, "nfe_forward": nfe_forward,
                    "nfe_backward": nfe_backward, "seconds": seconds})
    counter.remove()
    out.mkdir(parents=True, exist_ok=True)
    (out / "solver_comparison_training.json").write_text(json.dumps(
        {"settings": {"iters": iters, "tol": TRAIN_TOL, "lr": TRAIN_LR, "batch": TRAIN_BATCH,
                      "segment": TRAIN_SEGMENT, "optimizer": "adam", "method": "dopri5",
                      "adjoint": False}, "log": log}, indent=1) + "\n")
    plot_training(log, out / "solver_comparison_training.png")
    print(f"NFE during training: first {log[0]['nfe_forward']}, last {log[-1]['nfe_forward']}")


def plot_training(log: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    its = [r["iter"] for r in log]
    axes[0].semilogy(its, [r["loss"] for r in log])
    axes[0].set(xlabel="iteration", ylabel="L1 trajectory loss", title="loss")
    axes[1].plot(its, [r["nfe_forward"] for r in log])
    axes[1].set(xlabel="iteration", ylabel="forward NFE", title=f"dopri5 NFE at {TRAIN_TOL:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The study's flags (``argv`` None: ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(prog="ocnode solvers",
                                description=(__doc__ or "").splitlines()[0].replace("``", ""))
    p.add_argument("--quick", action="store_true",
                   help="fewer tolerances and step sizes, one repeat, no reference cross-check")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the result files")
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help=f"comma-separated subset of {','.join(PROBLEMS)}")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of the methods (default: all: "
                        + ",".join(METHODS) + ")")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repeats per point (default {REPEATS}, {QUICK_REPEATS} quick)")
    p.add_argument("--grad", action="store_true",
                   help="solve with autograd enabled (the engine's stage-list path)")
    p.add_argument("--nfe-during-training", action="store_true",
                   help="only run the optional NFE-during-training part")
    args = p.parse_args(argv)
    args.problems = [s.strip() for s in args.problems.split(",") if s.strip()]
    args.methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = [x for x in args.problems if x not in PROBLEMS] + [
        x for x in args.methods if x not in METHODS]
    if bad or not args.problems or not args.methods:
        p.error(f"unknown or empty selection: {bad}")
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else REPEATS
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def stem(args: argparse.Namespace) -> str:
    """File-name stem of the outputs: a run with --grad does not overwrite the default one."""
    return "solver_comparison_grad" if args.grad else "solver_comparison"


def run_problem(name: str, args: argparse.Namespace) -> dict[str, Any]:
    problem = BUILDERS[name]()
    if name != "linear":
        solve_reference(problem, check=not args.quick)
    print(f"{problem.title}: {json.dumps(problem.info)}", flush=True)
    records = sweep(problem, args.methods, QUICK_TOLS if args.quick else TOLS,
                    QUICK_HALVINGS if args.quick else HALVINGS, args.repeats, args.grad)
    for suffix, group in figures(args.methods).items():
        plot_problem(problem, records, group, args.out / f"{stem(args)}_{name}{suffix}.png")
    return {"title": problem.title, "info": problem.info, "methods": args.methods,
            "stem": stem(args),
            "t": problem.t.tolist(), "batch": problem.y0.shape[0],
            "summary": summarize(records, args.methods), "points": records}


def main(argv: list[str] | None = None) -> int:
    """Run the study (``ocnode solvers ARGS``); returns the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    if args.nfe_during_training:
        nfe_during_training(QUICK_TRAIN_ITERS if args.quick else TRAIN_ITERS, args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"quick": args.quick, "repeats": args.repeats, "grad": args.grad,
                     "problems": args.problems, "methods": args.methods,
                     "tols": list(QUICK_TOLS if args.quick else TOLS),
                     "halvings": list(QUICK_HALVINGS if args.quick else HALVINGS),
                     "dtype": str(DTYPE), "slow_s": SLOW_S, "max_solve_s": MAX_SOLVE_S,
                     "max_num_steps": MAX_NUM_STEPS, "ref_tol": REF_TOL,
                     "target_error": TARGET_ERROR, "seed": SEED},
        "problems": {},
    }
    for name in args.problems:
        result["problems"][name] = run_problem(name, args)
    result["runtime_s"] = time.perf_counter() - start
    (args.out / f"{stem(args)}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem(args)}.md").write_text(markdown(result))
    print(f"wrote {stem(args)}.json/.md and {len(args.problems)} PNG(s) to {args.out} "
          f"in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
