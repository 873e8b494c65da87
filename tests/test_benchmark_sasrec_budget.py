"""benchmarks/sasrec_budget.py: SASRec-CE by epoch cap on the tiny config."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks import sasrec_budget
from store_core.baselines.data import load_sequence_data
from store_core.config import load_config


def test_epoch_caps_bound_training_and_report_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    monkeypatch.setattr(sasrec_budget, "RESULTS", tmp_path / "results")
    argv = ["sasrec_budget", "--config", "tiny", "--seeds", "0", "1", "--epochs", "1", "2"]
    argv += ["--set", f"workspace={ws}", "--set", "tracking.enabled=false"]
    monkeypatch.setattr(sys, "argv", argv)
    sasrec_budget.main()

    report = json.loads((tmp_path / "results" / "sasrec_budget_tiny.json").read_text())
    data = load_sequence_data(load_config("tiny", [f"workspace={ws}"]).data_dir)
    targets = sum(len(seq) - 1 for seq in data.train_sequences.values())
    assert report["train_targets_per_epoch"] == targets > 0
    assert report["store_phase_b_samples"] is None  # tiny's Phase B is sized in epochs
    runs = {(r["epoch_cap"], r["seed"]): r for r in report["runs"]}
    assert sorted(runs) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    batch = report["config"]["sasrec"]["batch_size"]
    for (cap, _), run in runs.items():
        assert run["epochs"] == len(run["history"]) <= cap
        assert 1 <= run["best_epoch"] <= run["epochs"]
        assert run["targets_seen"] == targets * run["epochs"]
        windows = [row["windows"] for row in run["history"]]
        assert run["optimizer_steps"] == sum(math.ceil(w / batch) for w in windows)
        assert 0.0 <= run["test"]["recall_at_10"] <= 1.0
    # A cap of 1 is the first epoch of the same seeded run under a cap of 2.
    assert runs[(1, 0)]["history"][0]["loss"] == pytest.approx(runs[(2, 0)]["history"][0]["loss"])
    assert "| 2 |" in report["markdown"]
