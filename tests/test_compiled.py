"""options={'compile': ...}: the compiled step attempt of adaptive explicit methods.

Most tests compile with torch.compile's ``aot_eager`` backend (dynamo's trace and
AOTAutograd, no C++ compiler) or a counting backend: the graph is the one inductor would
fuse, so solutions, step sequences and gradients must equal the eager engine's. The tests
marked ``compiler`` use inductor itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import solvers
from solvers import compiled
from solvers.errors import SolverInputError
from solvers.stats import SolverStats

AOT = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TimeMLP(nn.Module):
    """f(t, y) = W2 tanh(W1 [y, t] + b1) + b2, y of shape (B, 2)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))


def _y0(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _solve(options: dict | None, t: torch.Tensor, method: str = "dopri5",
           tol: float = 1e-9) -> tuple[torch.Tensor, SolverStats]:
    stats = SolverStats()
    with torch.no_grad():
        ys = solvers.odeint(TimeMLP(), _y0(), t, rtol=tol, atol=tol, method=method,
                            options=options, stats=stats)
    return ys, stats


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
@pytest.mark.parametrize("t1", [2.0, -2.0])
def test_a_compiled_solve_takes_the_eager_steps_and_values(method: str, t1: float) -> None:
    t = torch.tensor([0.0, 0.3 * t1, t1], dtype=torch.float64)
    eager, stats_e = _solve(None, t, method)
    fast, stats_c = _solve({"compile": AOT}, t, method)
    assert stats_c == stats_e and stats_e.n_accepted > 5
    torch.testing.assert_close(fast, eager, rtol=1e-12, atol=1e-12)


def test_a_compiled_solve_with_rejected_steps_and_a_tuple_state() -> None:
    def field(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        return (-20.0 * y[0] * torch.cos(3 * t), y[0].sum().expand(1))
    y0 = (torch.ones(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    runs = []
    for options in ({"compile": AOT, "first_step": 0.5}, {"first_step": 0.5}):
        stats = SolverStats()
        runs.append((solvers.odeint(field, y0, t, rtol=1e-7, atol=1e-9, options=options,
                                    stats=stats), stats))
    (fast, stats_c), (eager, stats_e) = runs
    assert stats_c == stats_e and stats_e.n_rejected > 0
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _adjoint_grads(options: dict | None, params: str = "all") -> tuple[list, SolverStats]:
    func = TimeMLP()
    y0 = _y0().requires_grad_(True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    chosen = list(func.parameters()) if params == "all" else list(func.net[2].parameters())
    stats = SolverStats()
    ys = solvers.odeint_adjoint(func, y0, t, rtol=1e-8, atol=1e-8, options=options,
                                adjoint_params=chosen, adjoint_stats=stats)
    (ys[1].sin().sum() + ys[2].pow(2).sum()).backward()
    return [y0.grad, *(p.grad for p in chosen)], stats


@pytest.mark.parametrize("params", ["all", "last layer"])
def test_a_compiled_adjoint_gives_the_eager_gradients(params: str) -> None:
    eager, stats_e = _adjoint_grads(None, params)
    fast, stats_c = _adjoint_grads({"compile": AOT}, params)
    assert stats_c == stats_e
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backpropagation_through_a_compiled_solve_gives_the_eager_gradients() -> None:
    grads = []
    for options in (None, {"compile": AOT}):
        func = TimeMLP()
        y0 = _y0().requires_grad_(True)
        ys = solvers.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                            rtol=1e-7, atol=1e-7, options=options)
        ys[-1].pow(2).sum().backward()
        grads.append([y0.grad, *(p.grad for p in func.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_compiled_attempt_is_traced_once_and_reused_across_solves() -> None:
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    func, t = TimeMLP(), torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            solvers.odeint(func, _y0(), t, options={"compile": {"backend": counting}})
    assert len(graphs) == 1 and graphs[0] > 20  # one graph of the whole attempt
    assert len(compiled._CACHE[func]) == 1
    with torch.no_grad():  # a bound method is cached on its object
        for _ in range(2):
            solvers.odeint(func.forward, _y0(), t, options={"compile": {"backend": counting}})
    assert len(graphs) == 2 and len(compiled._CACHE[func]) == 2


def test_a_compiled_solve_lands_on_jump_times_as_the_eager_one() -> None:
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(t < 0.5, -y, 2.0 * y)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    runs = []
    for compile_ in (AOT, False):
        stats = SolverStats()
        ys = solvers.odeint(field, _y0(), t, rtol=1e-8, atol=1e-8, stats=stats,
                            options={"compile": compile_, "jump_t": [0.5]})
        runs.append((ys, stats))
    (fast, stats_c), (eager, stats_e) = runs
    assert stats_c == stats_e
    torch.testing.assert_close(fast, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[-1], _y0() * math.exp(0.5), rtol=1e-6, atol=0)


class _CountingStageObserver:
    """A stage observer that counts the evaluations it is shown and the accepted ones."""

    def __init__(self) -> None:
        self.seen, self.pending, self.kept = 0, 0, 0

    @contextlib.contextmanager
    def evaluation(self, t: float) -> Iterator[None]:
        self.seen += 1
        self.pending += 1
        yield

    def accept_step(self, weights: list[float]) -> None:
        self.kept += self.pending
        self.pending = 0

    def reject_step(self) -> None:
        self.pending = 0

    def finish(self) -> None:
        pass


def test_a_stage_observer_sees_every_evaluation_of_a_compiled_adjoint() -> None:
    """The observer hooks each evaluation: with it, the backward solve runs eagerly (the
    forward one stays compiled) and gives the eager gradients."""
    grads, observers = [], []
    for options in (None, {"compile": AOT}):
        func, observer, stats = TimeMLP(), _CountingStageObserver(), SolverStats()
        ys = solvers.odeint_adjoint(func, _y0(), torch.tensor([0.0, 1.0], dtype=torch.float64),
                                    rtol=1e-7, atol=1e-7, options=options, observer=observer,
                                    adjoint_stats=stats)
        ys[-1].pow(2).sum().backward()
        grads.append([p.grad for p in func.parameters()])
        observers.append((observer.seen, observer.kept, stats.nfe))
    assert observers[0] == observers[1] and observers[0][0] == observers[0][2] > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("value, match", [
    ("yes", "must be True, False or a dict"),
    ({"bakend": "eager"}, "unknown: \\['bakend'\\]"),
])
def test_bad_compile_values_are_refused(value: object, match: str) -> None:
    with pytest.raises(SolverInputError, match=match):
        solvers.odeint(TimeMLP(), _y0(), torch.tensor([0.0, 1.0]), options={"compile": value})


def test_compile_is_refused_where_the_solve_would_run_eagerly() -> None:
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(SolverInputError, match="unknown option 'compile' for method 'rk4'"):
        solvers.odeint(TimeMLP(), _y0(), t, method="rk4",
                       options={"compile": True, "step_size": 0.1})
    with pytest.raises(SolverInputError, match="not supported with checkpoint=True"):
        solvers.SolverSpec(options={"compile": True}, adjoint=False, checkpoint=True)
    with pytest.raises(SolverInputError, match="not supported with event_fn"):
        solvers.odeint(TimeMLP(), _y0(), t, options={"compile": True},
                       event_fn=lambda t, y: y[0, 0] - 10.0)
    outside = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def shifted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y + outside
    ys = solvers.odeint_adjoint(shifted, _y0(), t, options={"compile": AOT},
                                adjoint_params=(outside,))
    with pytest.raises(SolverInputError, match="differentiates func's own parameters"):
        ys.sum().backward()


@pytest.mark.compiler
def test_inductor_compiles_the_forward_and_adjoint_attempts() -> None:
    eager, stats_e = _adjoint_grads(None)
    fast, stats_c = _adjoint_grads({"compile": True})
    assert stats_c == stats_e
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
