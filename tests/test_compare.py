"""ocnode.training.compare, the optimizer-comparison harness: interleaved training, NFE
counting, the summary's target and claim arithmetic, the memory probe."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ocnode.data import load_dataset
from ocnode.training import Task, TaskSettings, compare, make_task, train_step
from solvers import SolverSpec

_DIGITS = load_dataset("digits", subset=64)


def _task(hparams: dict | None = None) -> Task:
    """64 digits, a width-8 MLP ODE with two RK4 steps, batches of 16."""
    task = make_task(_DIGITS, TaskSettings(
        width=8, batch_size=16, test_size=64, label="toy",
        solver=SolverSpec(method="rk4", options={"step_size": 0.5})))
    task.hparams = hparams or {}
    return task


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_nfe_counter_splits_forward_and_backward_and_ignores_evaluation(one_thread) -> None:
    task = _task()
    torch.manual_seed(0)
    model = task.build_model(True)
    opt = compare.build_optimizer("adam", model, compare.hparams_for(task, "adam"))
    counter = compare.NFECounter(model)
    train_step(model, opt, task.loss, next(task.batches(0)), counter=counter)
    # rk4, 2 steps: 8 forward evaluations; the adjoint solve (rk4, 2 steps) evaluates the
    # field with its VJP 8 times
    assert counter.take() == (8, 8)
    with torch.no_grad():
        task.evaluate(model)
    assert counter.take() == (0, 0)
    counter.remove()


def test_runs_share_the_initial_model_and_stop_at_the_step_cap(one_thread) -> None:
    settings = compare._settings(_args("--optimizers", "adam,sgd,snopt,kfac",
                                       "--max-steps", "4", "--eval-every", "2"), _task())
    runs = compare.train_seed(_task(), 0, settings)
    first = {n: r.rows[0]["test_loss"] for n, r in runs.items()}
    assert len(set(first.values())) == 1, first  # one initial model for every optimizer
    for name, run in runs.items():
        assert run.steps == 4 and run.status == "max_steps", name
        assert [r["step"] for r in run.rows] == [0, 2, 4], name
        assert all(math.isfinite(r["train_loss"]) for r in run.rows[1:]), name
    assert runs["kfac"].nfe[0] == (8, 0)  # through the solver: no backward solve


def test_a_diverging_run_ends_alone(one_thread) -> None:
    task = _task({"sgd": {"lr": 1e12, "momentum": 0.0}})
    settings = compare._settings(_args("--optimizers", "adam,sgd", "--max-steps", "6"), task)
    runs = compare.train_seed(task, 0, settings)
    assert runs["sgd"].status in ("diverged",) or runs["sgd"].status.startswith("error")
    assert runs["sgd"].steps < 6
    assert runs["adam"].steps == 6 and runs["adam"].status == "max_steps"


def _run(rows: list[tuple[float, float]]) -> compare._Run:
    run = compare._Run("x", nn.Linear(1, 1), torch.optim.SGD([nn.Parameter(torch.ones(1))],
                                                            lr=1.0), iter(()), None)  # type: ignore[arg-type]
    run.rows = [{"time_s": t, "test_acc": a} for t, a in rows]
    run.step_ms, run.nfe, run.steps = [1.0, 3.0], [(2, 4), (2, 6)], 2
    return run


def test_summary_target_time_to_target_and_claim_ratios() -> None:
    task = _task()
    seed_runs = [{"adam": _run([(0, 0.1), (10, 0.8), (20, 0.9)]),
                  "sgd": _run([(0, 0.1), (20, 0.7)]),
                  "snopt": _run([(0, 0.1), (4, 0.75), (8, 0.95)])}]
    settings = {"optimizers": ["adam", "sgd", "snopt"], "seeds": [0], "budget_s": 20,
                "eval_every": 1, "max_steps": None, "threads": 1, "hparams": {}}
    s = compare.summarise(task, seed_runs, {"adam": 1.5}, settings)
    assert s["target"] == 0.9  # the best baseline's final accuracy
    assert s["optimizers"]["adam"]["time_to_target_s"] == 20
    assert s["optimizers"]["sgd"]["time_to_target_s"] is None
    assert s["optimizers"]["sgd"]["reached_target"] == "0/1"
    assert compare._median([None, 3.0, 1.0]) == 2.0 and compare._median([None]) is None
    assert s["optimizers"]["snopt"]["time_to_target_s"] == 8
    assert s["optimizers"]["snopt"]["step_ms_median"] == 2.0
    assert s["optimizers"]["snopt"]["nfe_backward_mean"] == 5.0
    assert s["optimizers"]["adam"]["peak_rss_growth_mib"] == 1.5
    assert s["claim"]["adam"]["ratio_median"] == pytest.approx(8 / 20)
    assert s["claim"]["sgd"]["ratio_median"] == pytest.approx(4 / 20)
    text = compare.markdown(s)
    assert "| snopt | 0.95 ± 0 |" in text and "| adam | 0.9 | 20.0 | 8.0 | 1/1 | 0.40 |" in text


def test_claim_at_the_baselines_best_metric_when_it_overfits() -> None:
    task = _task()
    # Adam peaks at 0.9 (t = 10) and ends at 0.8; SNOpt passes 0.8 at t = 4 and 0.9 at t = 8
    seed_runs = [{"adam": _run([(0, 0.1), (10, 0.9), (20, 0.8)]),
                  "snopt": _run([(0, 0.1), (4, 0.85), (8, 0.92), (20, 0.7)])},
                 {"adam": _run([(0, 0.1), (5, 0.6), (10, 0.7)]),
                  "snopt": _run([(0, 0.1), (10, 0.65)])}]
    settings = {"optimizers": ["adam", "snopt"], "seeds": [0, 1], "budget_s": 20,
                "eval_every": 1, "max_steps": None, "threads": 1, "hparams": {}}
    claim = compare.summarise(task, seed_runs, {}, settings)["claim"]["adam"]
    assert claim["baseline_final_mean"] == pytest.approx((0.8 + 0.7) / 2)
    assert claim["baseline_best_mean"] == pytest.approx((0.9 + 0.7) / 2)
    assert claim["ratio_median"] == pytest.approx(4 / 10)  # at 0.8; seed 1 never got 0.7
    assert claim["best_baseline_time_s"] == pytest.approx(10)  # both seeds' bests at t = 10
    assert claim["best_snopt_time_s"] == 8 and claim["best_snopt_reached"] == "1/2"
    assert claim["best_ratio_median"] == pytest.approx(8 / 10)
    text = compare.markdown(compare.summarise(task, seed_runs, {}, settings))
    assert "| adam | 0.8 | 10.0 | 8.0 | 1/2 | 0.80 |" in text  # the best-level table


def test_lower_is_better_metrics_reach_targets_from_above() -> None:
    task = _task()
    task.metric, task.higher_is_better = "nll", False
    rows = [{"time_s": 0, "nll": 3.0}, {"time_s": 5, "nll": 1.0}]
    assert compare.time_to(task, rows, 2.0) == 5
    assert compare.time_to(task, rows, 0.5) is None


def test_memory_probe_measures_a_forked_iteration(one_thread) -> None:
    growth = compare.measure_memory(_task(), "snopt")
    assert growth is not None and growth >= 0.0


def test_the_default_optimizers_are_those_that_can_train_the_tasks_model() -> None:
    ode = compare._settings(_args(), _task())["optimizers"]
    assert ode == ["adam", "sgd", "snopt", "kfac", "newton-cg"]  # not the chains-only DDPNOpt
    chain = make_task(_DIGITS, TaskSettings(model="fcn", width=8))
    assert {"ddpnopt", "dgnopt"} <= set(compare._settings(_args(), chain)["optimizers"])
    residual = make_task(_DIGITS, TaskSettings(model="resmlp", width=8))
    names = compare._settings(_args(), residual)["optimizers"]
    assert "dgnopt" in names and "ddpnopt" not in names  # DDPNOpt refuses skips
    with pytest.raises(SystemExit, match="skip connections.*use dgnopt"):
        compare._settings(_args("--optimizers", "ddpnopt"), residual)


def test_bad_optimizer_names_are_rejected() -> None:
    with pytest.raises(SystemExit, match="unknown optimizer"):
        compare._settings(_args("--optimizers", "adam,lbfgs"), _task())


def test_run_writes_a_complete_result_and_refresh_report_recomputes_it(
        one_thread, tmp_path: Path) -> None:
    args = _args("--optimizers", "adam,snopt", "--seeds", "0", "--max-steps", "2",
                 "--eval-every", "1", "--out", str(tmp_path), "--no-memory")
    summary = compare.run(_task(), args)
    assert set(summary["models"]) == {"adam", "snopt"}
    folder = tmp_path / "toy"
    assert {p.name for p in (folder / "runs").iterdir()} == {"adam_seed0.csv",
                                                            "snopt_seed0.csv"}
    assert summary["optimizers"]["adam"]["peak_rss_growth_mib"] is None
    again = compare.run(_task(), _args("--refresh-report", "--out", str(tmp_path)))
    assert again["models"] == {}
    for name in ("adam", "snopt"):
        before, after = summary["optimizers"][name], again["optimizers"][name]
        assert after["peak_rss_growth_mib"] >= 0.0
        for key in ("final_mean", "best_mean", "time_to_target_s", "step_ms_median"):
            assert after[key] == pytest.approx(before[key]), (name, key)
    assert again["target"] == pytest.approx(summary["target"])
    assert "Table recomputed from the runs" in (folder / "results.md").read_text()


def test_refresh_report_recomputes_the_claim_and_can_keep_the_memory(tmp_path, one_thread) -> None:
    task = _task()
    args = _args("--optimizers", "adam,snopt", "--max-steps", "2", "--eval-every", "1",
                 "--seeds", "0", "--out", str(tmp_path))
    first = compare.run(task, args)
    folder = tmp_path / task.label
    recorded = {n: o["peak_rss_growth_mib"] for n, o in first["optimizers"].items()}
    args.refresh_report, args.no_memory = True, True
    again = compare.run(task, args)
    assert {n: o["peak_rss_growth_mib"] for n, o in again["optimizers"].items()} == recorded
    assert again["claim"] == first["claim"] and "best_ratio_median" in again["claim"]["adam"]
    text = (folder / "results.md").read_text()
    assert "Table recomputed from the runs by" in text and "its best test_acc" in text
