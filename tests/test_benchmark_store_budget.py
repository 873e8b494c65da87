"""benchmarks/store_budget.py: Phase B sized in epochs (and by a time budget) on tiny."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import store_budget
from benchmarks.store_budget import plan_phase_b


def test_plan_rounds_to_validation_intervals() -> None:
    # 1000 samples at 32 per step: 32 steps per epoch.
    plan = plan_phase_b(2.5, 1000, 32, 1)
    assert (plan.steps_per_epoch, plan.eval_every, plan.max_steps) == (32, 32, 64)
    assert plan.epochs == 2.0 and not plan.capped_by_time
    plan = plan_phase_b(2.5, 1000, 32, 4)
    assert (plan.eval_every, plan.max_steps, plan.epochs) == (8, 80, 2.5)
    assert plan_phase_b(0.1, 1000, 32, 1).max_steps == 32  # at least one interval


def test_plan_fits_the_time_budget() -> None:
    # An interval: 32 steps x 32 samples at 64 samples/s = 16 s, plus a 3 s validation.
    plan = plan_phase_b(10, 1000, 32, 1, seconds_left=100, samples_per_s=64, validation_s=3)
    assert (plan.max_steps, plan.epochs, plan.capped_by_time) == (5 * 32, 5.0, True)
    roomy = plan_phase_b(2, 1000, 32, 1, seconds_left=1000, samples_per_s=64, validation_s=3)
    assert (roomy.max_steps, roomy.capped_by_time) == (64, False)
    with pytest.raises(SystemExit, match="less than one validation interval"):
        plan_phase_b(2, 1000, 32, 1, seconds_left=10, samples_per_s=64, validation_s=3)
    with pytest.raises(ValueError, match="measured"):
        plan_phase_b(2, 1000, 32, 1, seconds_left=10)


@pytest.mark.pipeline
def test_runs_phase_b_for_the_planned_epochs_and_ranks_the_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_budget, "RESULTS", tmp_path / "results")
    argv = ["store_budget", "--config", "tiny", "--epochs", "2", "--evals-per-epoch", "2"]
    argv += ["--time-budget-s", "3600", "--probe-steps", "4", "--name", "sb"]
    argv += ["--set", f"workspace={tmp_path / 'ws'}", "--set", "tracking.enabled=false"]
    monkeypatch.setattr(sys, "argv", argv)
    store_budget.main()

    report = json.loads((tmp_path / "results" / "sb.json").read_text())
    plan, phase_b = report["plan"], report["phase_b"]
    assert report["config"]["workspace"] == f"{tmp_path / 'ws'}-budget-seed0"
    # tiny: 46 recommendation windows (156 targets, history_len 5) + 48 + 48 catalogue rows
    assert plan["samples_per_epoch"] == 142
    assert plan["steps_per_epoch"] == 9 and plan["eval_every"] == 4  # batch 16
    assert plan["max_steps"] == 16 and not plan["capped_by_time"]
    assert plan["probe"]["samples_per_s"] > 0 and plan["probe"]["validation_users"] == 40
    # Trained to the planned steps (or stopped early), validated at every interval.
    assert phase_b["train_steps"] <= 16 and phase_b["train_steps"] % 4 == 0
    assert len(phase_b["validation"]) == phase_b["train_steps"] // 4
    assert [v["step"] for v in phase_b["validation"]][:2] == [4.0, 8.0]
    assert 1 <= phase_b["best_validation_round"] <= len(phase_b["validation"])
    best = phase_b["validation"][phase_b["best_validation_round"] - 1]
    assert phase_b["best_epoch"] == best["epoch"] == round(best["step"] / 9, 4)  # 9 steps/epoch
    assert report["test"]["invalid_id_rate"] == 0.0
    assert 0.0 <= report["test"]["recall_at_10"] <= 1.0
    assert Path(report["config"]["workspace"], "models", "recommender-store-multitask").is_dir()
