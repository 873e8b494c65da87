"""benchmarks/rec_samples_throughput.py on the tiny workspace: both modes, same targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import rec_samples_throughput


def test_reports_both_modes_on_the_same_targets(
    tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rec_samples_throughput, "write_results", _writer(tmp_path))
    argv = ["rec_samples_throughput", "--config", "tiny", "--steps", "3", "--rounds", "1"]
    argv += ["--logit-batches", "2", "--name", "rs"]
    argv += ["--set", f"workspace={tiny_pipeline}", "--set", "tracking.enabled=false"]
    monkeypatch.setattr(sys, "argv", argv)
    rec_samples_throughput.main()

    report = json.loads((tmp_path / "rs.json").read_text())
    # tiny: 156 recommendation targets, history_len 5 -> 46 windows (stride 3).
    assert report["prefix_targets"] == report["sequence_targets"] == 156
    assert report["prefix_rows"] == 156 and report["sequence_rows"] == 46
    for mode in ("prefix", "sequence"):
        rates = report["train"][mode]
        assert rates["targets_per_s"] > 0 and rates["step_s"] > 0
        assert report["train_rounds"][mode][0]["batches_per_epoch"] == -(
            -report[f"{mode}_rows"] // 16
        )  # batch 16
    assert report["sequence_vs_prefix_targets_per_s"] == pytest.approx(
        report["train"]["sequence"]["targets_per_s"] / report["train"]["prefix"]["targets_per_s"],
        abs=0.01,
    )
    assert report["logits"]["full_logits_s_per_batch"] > 0
    padding = report["padding_sequence_mixture"]
    assert padding["grouped_tokens"] <= padding["shuffled_tokens"]
    assert padding["real_tokens"] <= padding["grouped_tokens"]


def _writer(directory: Path):  # type: ignore[no-untyped-def]
    def write(report: dict[str, object], file_name: str) -> Path:
        out = directory / file_name
        out.write_text(json.dumps(report))
        return out

    return write
