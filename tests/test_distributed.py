"""Data-parallel training (ocnode.training.distributed): 2 CPU processes over gloo.

- step level, every optimizer (NewtonCG and E-MSA averaging inside their step): 2 ranks x
  batch b give the parameters of 1 process x batch 2b
  (1e-5 relative, float32) and bitwise equal parameters on both ranks; ranks whose adaptive
  solvers take different numbers of steps do not hang; an unused parameter is a clear error;
- loop level: ``torchrun -m ocnode train`` on 2 ranks reproduces the single-process run; a
  killed rank makes the other exit with an error; the run resumes from the last checkpoint on
  2 ranks (bit-identical to the uninterrupted run) and on 1;
- the sampler, the settings and their errors, without processes.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from ocnode.nn import MLPODEClassifier, ode_blocks
from ocnode.optim import EMSA, DDPNOpt, HorizonOptimizer, NewtonCG, SNOpt
from ocnode.training import TrainConfig, distributed, make_task, train, train_step
from ocnode.training.cli import main
from ocnode.training.loop import CHECKPOINT
from ocnode.training.records import load_checkpoint
from ocnode.training.step import NFECounter
from ocnode.training.tasks import TaskSettings
from solvers import SolverSpec

ROOT = Path(__file__).resolve().parents[1]
WORLD, BATCH, STEPS = 2, 16, 5  # global batch 16: 8 rows per rank
TIMEOUT = 120  # seconds any group of processes may take before the test fails

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, job: str, queue: Any) -> None:
    """One rank: join a gloo group (short timeout), run ``job``, report what it returned."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        from datetime import timedelta

        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        queue.put((rank, JOBS[job](rank), None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(job: str, world: int = WORLD) -> list[Any]:
    """Run ``JOBS[job](rank)`` on ``world`` ranks; their results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict((r, (out, err)) for r, out, err in
                       (queue.get(timeout=TIMEOUT) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [err for _, err in results.values() if err]
    assert not errors, "\n".join(errors)
    return [results[r][0] for r in range(world)]


# ----------------------------------------------------------------------------- scenarios

def _data(steps: int = STEPS, dim: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(steps, BATCH, dim, generator=g), torch.randint(0, 3, (steps, BATCH),
                                                                       generator=g)


def _ode_model(method: str = "rk4", trainable_t1: bool = False) -> nn.Module:
    torch.manual_seed(0)
    solver = SolverSpec(method=method, options={"step_size": 0.25}) if method == "rk4" \
        else SolverSpec(method=method, rtol=1e-5, atol=1e-5)
    return MLPODEClassifier(6, 3, hidden=10, solver=solver, t1=1.0, trainable_t1=trainable_t1)


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 3))


def _loss(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


Built = tuple[nn.Module, torch.optim.Optimizer, list[HorizonOptimizer]]


def _trained(model: nn.Module) -> list[nn.Parameter]:
    t1 = {id(b.t1_tensor) for b in ode_blocks(model)}
    return [p for p in model.parameters() if id(p) not in t1]


def _adam() -> Built:
    m = _ode_model()
    return m, torch.optim.Adam(m.parameters(), lr=1e-2), []


def _sgd() -> Built:
    m = _ode_model()
    return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), []


def _snopt() -> Built:  # refreshes at steps 0 and 3, stem and head included
    # the stage factors equal the single process's when the steps are the same on every rank
    # (fixed steps here) and every sample enters them (a factor_cost large enough)
    m = _ode_model()
    return m, SNOpt(m, lr=0.02, update_freq=3, full=True, alpha=0.75, factor_cost=1e9), []


def _horizon() -> Built:  # T moves at steps 2 and 4
    m = _ode_model(trainable_t1=True)
    block = ode_blocks(m)[0]
    horizon = HorizonOptimizer(block, _trained(m), policy="feedback", lr=0.05, update_freq=2)
    horizon.processes = distributed.world_size()  # its s divides by the global batch
    return m, torch.optim.Adam(_trained(m), lr=1e-2), [horizon]


def _ddpnopt() -> Built:
    m = _chain()
    return m, DDPNOpt(m, lr=0.1, base="sgd", momentum=0.5), []


def _ddpnopt_ekfac() -> Built:  # EKFAC refreshes at steps 0 and 3
    m = _chain()
    return m, DDPNOpt(m, lr=0.05, base="ekfac", update_freq=3), []


def _newton_cg() -> Built:  # its own averaging: gradient, HVPs, losses (damping adapts)
    m = _chain()
    return m, NewtonCG(m.parameters(), lr=0.5, damping=0.1, cg_iters=5,
                       adapt_damping=True), []


def _emsa() -> Built:  # every L-BFGS evaluation of a stage objective averaged
    m = _chain()
    return m, EMSA(m, rho=1.0, inner_steps=3), []


SCENARIOS: dict[str, Callable[[], Built]] = {
    "adam": _adam, "sgd": _sgd, "snopt": _snopt, "horizon": _horizon, "ddpnopt": _ddpnopt,
    "ddpnopt-ekfac": _ddpnopt_ekfac, "newton-cg": _newton_cg, "emsa": _emsa}


def _flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def _run(name: str, rank: int | None) -> dict[str, Any]:
    """Scenario ``name`` for STEPS steps: on the whole batch (rank None) or a rank's half."""
    model, optimizer, horizons = SCENARIOS[name]()
    loss: Callable[[nn.Module, Any], Tensor] = _loss
    if rank is not None:
        distributed.attach(optimizer)
        loss = distributed.parallel_loss(
            model, _loss, torch.device("cpu"),
            reduce_gradients=not distributed.averages_its_own_gradients(optimizer))
    rows = slice(None) if rank is None else slice(rank * BATCH // WORLD,
                                                  (rank + 1) * BATCH // WORLD)
    xs, ys = _data()
    for k in range(STEPS):
        train_step(model, optimizer, loss, (xs[k, rows], ys[k, rows]), horizons,
                   parallel=rank is not None)
    return {"params": _flat(model), "t1": [h.block.t1 for h in horizons]}


def _adaptive(rank: int) -> dict[str, Any]:
    """dopri5 blocks, SNOpt refreshing every step; rank 1's inputs are 10x larger (its
    field saturates: fewer steps)."""
    model = _ode_model("dopri5")
    with torch.no_grad():
        for layer in model.ode.func.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(4.0)
    optimizer = SNOpt(model, lr=0.05, update_freq=1)
    distributed.attach(optimizer)
    loss = distributed.parallel_loss(model, _loss, torch.device("cpu"))
    counter = NFECounter(model)
    xs, ys = _data()
    scale = 1.0 + 9.0 * rank
    nfe = []
    for k in range(3):
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        train_step(model, optimizer, loss, (scale * xs[k, part], ys[k, part]), (), counter,
                   parallel=True)
        nfe.append(counter.take())
    return {"params": _flat(model), "nfe": nfe}


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def _unused(rank: int) -> str:
    model = _Unused()
    loss = distributed.parallel_loss(model, _loss, torch.device("cpu"))
    xs, ys = _data()
    try:
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), loss,
                   (xs[0, :8], ys[0, :8]), parallel=True)
    except ValueError as err:
        return str(err)
    return "no error"


def _rank0_fails(rank: int) -> str:
    def fail() -> None:
        raise ValueError("no checkpoint here")
    try:
        distributed.on_main(fail)
    except ValueError as err:
        return str(err)
    return "no error"


def _agreed(rank: int) -> dict[str, Any]:
    same, other = torch.ones(3), torch.full((2,), float(rank))
    with pytest.warns(RuntimeWarning, match="rank 0's are used"):
        distributed.FactorSync().agree([same, other, None])
    return {"same": same.tolist(), "other": other.tolist()}


def _all_steps(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: _run(name, rank) for name in SCENARIOS}
    out["adaptive"] = _adaptive(rank)
    out["unused"] = _unused(rank)
    out["rank0_fails"] = _rank0_fails(rank)
    out["agreed"] = _agreed(rank)
    return out


JOBS: dict[str, Callable[[int], Any]] = {"steps": _all_steps}


# ----------------------------------------------------------------------------- step level

@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Every step-level scenario on 2 ranks (one group of processes for all of them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _spawn("steps")
    finally:
        torch.set_num_threads(threads)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(
        ranks: list[dict[str, Any]], name: str) -> None:
    one = _run(name, None)
    first, second = ranks[0][name], ranks[1][name]
    assert np.array_equal(first["params"], second["params"]), "ranks differ"
    assert _relative(first["params"], one["params"]) < 1e-5
    assert first["t1"] == second["t1"]
    for t_two, t_one in zip(first["t1"], one["t1"]):
        assert t_two == pytest.approx(t_one, rel=1e-5)
    if name == "horizon":
        assert abs(first["t1"][0] - 1.0) > 1e-3  # T moved


def test_the_parameters_moved_in_every_scenario(ranks: list[dict[str, Any]]) -> None:
    start = {name: _flat(SCENARIOS[name]()[0]) for name in SCENARIOS}
    for name in SCENARIOS:
        assert _relative(ranks[0][name]["params"], start[name]) > 1e-3, name


def test_ranks_whose_solvers_take_different_steps_do_not_hang(
        ranks: list[dict[str, Any]]) -> None:
    first, second = ranks[0]["adaptive"], ranks[1]["adaptive"]
    assert first["nfe"] != second["nfe"]  # the stiffer rank took more solver steps
    assert np.array_equal(first["params"], second["params"])
    assert np.isfinite(first["params"]).all()


def test_an_unused_parameter_is_a_clear_error_on_every_rank(
        ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "got no gradient from the loss: spare.weight, spare.bias;" in r["unused"]
        assert "requires_grad=False" in r["unused"]


def test_an_error_of_rank_0_is_raised_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["rank0_fails"] == "no checkpoint here"
    assert ranks[1]["rank0_fails"] == "rank 0: no checkpoint here"


def test_differing_state_is_replaced_by_rank_0s(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["agreed"] == {"same": [1.0, 1.0, 1.0], "other": [0.0, 0.0]}


# ----------------------------------------------------------------------------- loop level

#: A short loop: 4 steps per epoch (512 / 128), SNOpt refreshing (every sample in its stage
#: factors, so that 2 ranks equal 1 process), the horizon moving.
LOOP = ["--width", "16", "--method", "rk4", "--step-size", "0.5", "--batch-size", "128",
        "--train-size", "512", "--test-size", "100", "--log-every", "3", "--epochs", "24",
        "--optimizer", "snopt", "--update-freq", "5", "--lr", "0.05", "--factor-cost", "1e9",
        "--adaptive-t1", "feedback", "--t1-update-freq", "4", "--t1-lr", "0.2",
        "--device", "cpu", "--no-progress"]


def _loop_config(out: Path, **changes: Any) -> TrainConfig:
    values = dict(width=16, method="rk4", step_size=0.5, batch_size=128, train_size=512,
                  test_size=100, log_every=3, epochs=24, optimizer="snopt", update_freq=5,
                  lr=0.05, factor_cost=1e9, adaptive_t1="feedback", t1_update_freq=4,
                  t1_lr=0.2, device="cpu", progress=False)
    return TrainConfig(out=str(out), **{**values, **changes})  # type: ignore[arg-type]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "ocnode", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _tails(done: subprocess.CompletedProcess) -> str:
    """The ends of a failed run's stdout and stderr: where it stopped, and why."""
    return f"stdout:\n{done.stdout[-1500:]}\nstderr:\n{done.stderr[-3000:]}"


def _model(out: Path) -> dict[str, Tensor]:
    return load_checkpoint(out / CHECKPOINT)["model"]


def _max_relative(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The loop on 2 ranks under torchrun, uninterrupted."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    done = _torchrun(["--out", str(out), *LOOP])
    assert done.returncode == 0, _tails(done)
    assert done.stdout.count("done: epoch 24") == 1, done.stdout  # rank 0 alone prints
    return out


def test_torchrun_reproduces_the_single_process_run(torchrun_run: Path, tmp_path: Path) -> None:
    one = train(_loop_config(tmp_path / "one"))
    two = load_checkpoint(torchrun_run / CHECKPOINT)
    assert two["world_size"] == 2 and len(two["rng_ranks"]) == 2
    assert two["step"] == 24 * 4
    assert _max_relative(two["model"], _model(tmp_path / "one")) < 1e-5
    rows = (torchrun_run / "metrics.csv").read_text().splitlines()
    single = (tmp_path / "one" / "metrics.csv").read_text().splitlines()
    assert len(rows) == len(single) == 1 + 24 * 2  # written once, by rank 0
    last = dict(zip(rows[0].split(","), map(float, rows[-1].split(","))))
    assert last["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)  # rank mean
    assert last["test_acc"] == pytest.approx(one["test_acc"], abs=0.011)  # whole test subset
    assert last["t1"] == pytest.approx(one["t1"], rel=1e-5) and last["t1"] != 1.0


#: NewtonCG's loop: its gradient and Hessian-vector products averaged by the optimizer, the
#: model not wrapped in DDP (rank 0's weights broadcast at the start).
NEWTON = dict(width=16, method="rk4", step_size=0.5, batch_size=128, train_size=512,
              test_size=100, log_every=2, epochs=2, optimizer="newton-cg", lr=0.5,
              device="cpu", progress=False)


def test_torchrun_runs_newton_cg_as_the_single_process_does(tmp_path: Path) -> None:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in NEWTON.items() if k != "progress"]
    done = _torchrun(["--out", str(tmp_path / "two"), "--no-progress", *args])
    assert done.returncode == 0, _tails(done)
    train(TrainConfig(out=str(tmp_path / "one"), **NEWTON))  # type: ignore[arg-type]
    assert _max_relative(_model(tmp_path / "two"), _model(tmp_path / "one")) < 1e-5


def _launch(out: Path, port: int, extra: list[str]) -> list[subprocess.Popen]:
    """2 ranks of ``ocnode train`` with torchrun's environment, without torchrun's agent
    (which would stop the other rank itself)."""
    procs = []
    for r in range(2):
        env = _env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ocnode", "train", "--out", str(out), *LOOP, *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _kill_after_first_checkpoint(procs: list[subprocess.Popen], out: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (out / CHECKPOINT).exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint"
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)


def test_a_killed_rank_stops_the_other_and_the_run_resumes(torchrun_run: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "killed"
    procs = _launch(out, _free_port(), ["--dist-timeout", "30"])
    try:
        _kill_after_first_checkpoint(procs, out)
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert "a collective operation failed" in err and "--resume" in err
    saved = load_checkpoint(out / CHECKPOINT)
    assert 1 <= saved["epoch"] < 24

    copy = tmp_path / "copy"  # resume on 1 process too, from the same checkpoint
    copy.mkdir()
    for name in (CHECKPOINT, "metrics.csv", "config.json"):
        (copy / name).write_bytes((out / name).read_bytes())

    done = _torchrun(["--out", str(out), "--resume", "--no-progress"])
    assert done.returncode == 0, _tails(done)
    resumed, whole = load_checkpoint(out / CHECKPOINT), load_checkpoint(torchrun_run / CHECKPOINT)
    assert resumed["step"] == whole["step"]
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k  # bit-identical to the whole run
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 24 * 2

    one = train(TrainConfig.from_run(copy, progress=False))
    assert one["step"] == whole["step"]
    assert _max_relative(_model(copy), whole["model"]) < 1e-5


# ----------------------------------------------------------------------------- no processes

def _digits_task(batch: int = 128) -> Any:
    from ocnode.data import load_dataset

    return make_task(load_dataset("digits", seed=0, subset=500),
                     TaskSettings(width=8, batch_size=batch))


def test_one_rank_loader_draws_the_single_process_batches() -> None:
    task = _digits_task()
    reference = task.loader(torch.Generator().manual_seed(3))
    mine = distributed.rank_loader(task.dataset.train, 128, torch.Generator().manual_seed(3),
                                   0, 1)
    assert len(mine) == len(reference) == math.ceil(500 / 128)  # nothing dropped
    for _ in range(2):  # two epochs: the same draws from the same generator
        for a, b in zip(mine, reference, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_ranks_slices_make_up_each_global_batch() -> None:
    task = _digits_task()
    single = list(task.loader(torch.Generator().manual_seed(3)))
    parts = [list(distributed.rank_loader(task.dataset.train, 128,
                                          torch.Generator().manual_seed(3), r, 4))
             for r in range(4)]
    assert all(len(p) == 500 // 128 for p in parts)  # the partial batch is dropped
    for k in range(500 // 128):
        for t in range(2):
            joined = torch.cat([parts[r][k][t] for r in range(4)])
            assert torch.equal(joined, single[k][t])


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused() -> None:
    task = _digits_task()
    with pytest.raises(ValueError, match="global batch and must divide among the 3 processes"):
        distributed.rank_loader(task.dataset.train, 128, torch.Generator(), 0, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        distributed.rank_loader(task.dataset.train, 512, torch.Generator(), 0, 2)


def test_process_flags_without_torchrun_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="--dist-timeout only apply to multi-process runs"):
        TrainConfig(dist_timeout=10.0).validate()
    with pytest.raises(SystemExit) as stop:
        main(["train", "--out", "unused", "--dist-backend", "gloo"])
    assert stop.value.code == 2
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err


def test_torchrun_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("newton-cg", "emsa"):  # they average inside their step
        TrainConfig(optimizer=name).validate()
    with pytest.raises(ValueError, match="one device for every process"):
        TrainConfig(device="cuda:1").validate()
    with pytest.raises(ValueError, match="dist_backend"):
        TrainConfig(dist_backend="mpi").validate()
    TrainConfig(dist_timeout=5.0, dist_backend="gloo", device="cpu").validate()
    assert distributed.pick_backend(torch.device("cpu")) == "gloo"
    assert distributed.pick_backend(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        distributed.pick_backend(torch.device("cpu"), "nccl")


def test_nothing_is_parallel_without_a_process_group() -> None:
    assert not distributed.active()
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.per_process_hparams({"stats_batch": 64}, 3) == {"stats_batch": 22}
