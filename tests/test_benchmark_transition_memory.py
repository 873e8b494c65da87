"""benchmarks/transition_memory.py: ranks on hand values, the grid choice, the seed
combination, and one run on the tiny pipeline that agrees with `store evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.transition_memory import (
    _key,
    choose,
    choose_for_config,
    combine,
    dense_ranks,
    grid,
    main,
    ranked_ranks,
)


def test_ranked_ranks_keep_and_exclude_history() -> None:
    ranked = np.array([[4, 2, 7, -1], [1, 3, 5, 6], [9, 8, -1, -1]])
    kept, excluded = ranked_ranks(ranked, np.array([7, 6, 5]), [[4], [3, 1], []])
    assert kept.tolist() == [2, 3, -1]
    assert excluded.tolist() == [1, 1, -1]  # 4 removed before 7; 1 and 3 before 6


def test_dense_ranks_count_higher_scores_and_cut_at_20() -> None:
    scores = np.array([[0.1, 0.5, 0.3, 0.5], [0.9, 0.0, 0.2, 0.1]])
    kept, excluded = dense_ranks(scores, np.array([2, 1]), [[1], [0, 1]])
    assert kept.tolist() == [2, 3]  # ties (0.5, 0.5) both above 0.3
    assert excluded.tolist() == [1, 2]  # the history item 1 removed; target 1 never removed
    many = np.arange(30, dtype=np.float64)[None, :]
    assert dense_ranks(many, np.array([5]), [[]])[0].tolist() == [-1]  # rank 24: past 20


def test_grid_choice_and_combination() -> None:
    assert grid([0.5, 0.0], [1, 2]) == [(0.0, 1, 1, False), (0.5, 1, 1, False), (0.5, 2, 1, False)]
    points = grid([0.5], [2], [(1, False), (3, True)])
    assert [_key(p) for p in points] == ["w0_d1", "w0.5_d2", "w0.5_d2_k3s"]
    per_split = {
        "valid": {"a": {"ndcg_at_10": 0.1}, "b": {"ndcg_at_10": 0.3}},
        "test": {"a": {"ndcg_at_10": 0.9}, "b": {"ndcg_at_10": 0.2}},
    }
    assert choose(per_split)["point"] == "b"
    assert choose(per_split)["test"] == {"ndcg_at_10": 0.2}  # test never picks the point

    def seed(value: float, point: str) -> dict[str, object]:
        row = {"point": point, "test": {"recall_at_10": value}}
        return {"seed": 0, "summary": {"store_alone": row}}

    rows = combine([seed(0.1, "w0_d1"), seed(0.3, "w0_d1")])["rows"]
    mean, std = rows["store_alone"]["recall_at_10"]
    assert mean == pytest.approx(0.2) and std == pytest.approx(np.std([0.1, 0.3], ddof=1))


def test_one_point_for_all_seeds_is_the_best_mean_validation() -> None:
    def seed(valid: dict[str, float], test: dict[str, float]) -> dict[str, Any]:
        per_split = {
            "valid": {p: {"ndcg_at_10": v} for p, v in valid.items()},
            "test": {p: {"ndcg_at_10": v} for p, v in test.items()},
        }
        return {"seed": 0, "grid": ["a", "b", "c"], "systems": {"store": per_split}, "summary": {}}

    # each seed alone picks a different point (a, then c); the mean picks b
    reports = [
        seed({"a": 0.30, "b": 0.28, "c": 0.10}, {"a": 0.0, "b": 0.5, "c": 0.9}),
        seed({"a": 0.10, "b": 0.28, "c": 0.30}, {"a": 0.0, "b": 0.7, "c": 0.9}),
    ]
    chosen = choose_for_config(reports, "store")
    assert chosen["point"] == "b" and chosen["mean_valid_ndcg_at_10"] == pytest.approx(0.28)
    assert [t["ndcg_at_10"] for t in chosen["test"]] == [0.5, 0.7]
    row = combine(reports)["rows"]["store_memory_config"]
    assert row["points"] == ["b"] and row["ndcg_at_10"][0] == pytest.approx(0.6)
    assert "sasrec_memory_config" not in combine(reports)["rows"]  # no such system reported


def test_one_seed_on_the_tiny_pipeline_agrees_with_store_evaluate(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.evaluation import evaluate_generative
    from store_core.recommender_training import recommender_dir

    overrides = [f"workspace={tiny_pipeline}", "tracking.enabled=false"]
    args = ["--config", "tiny", "--seed", "0", "--weights", "0.5", "0.9", "--depths", "1", "2"]
    args += ["--windows", "1", "3", "--directions", "forward", "symmetric"]
    args += ["--fixed", "0.5", "2", "--results-dir", str(tmp_path)]
    for item in overrides:
        args += ["--set", item]
    report = main(args)
    cfg = load_config("tiny", overrides)
    evaluated = evaluate_generative(
        load_bundle(recommender_dir(cfg)), cfg, system="store", progress=False
    )
    alone = report["summary"]["store_alone"]["test"]
    assert alone["recall_at_10"] == pytest.approx(evaluated.metrics["recall_at_10"])
    assert alone["ndcg_at_10"] == pytest.approx(evaluated.metrics["ndcg_at_10"])
    excluded = evaluated.metrics["history_excluded_ndcg_at_10"]
    assert alone["history_excluded_ndcg_at_10"] == pytest.approx(excluded)
    assert report["grid"][:5] == ["w0_d1", "w0.5_d1", "w0.5_d2", "w0.9_d1", "w0.9_d2"]
    assert len(report["grid"]) == 1 + 4 * 4 and "w0.9_d2_k3s" in report["grid"]
    fixed = report["summary"]["store_memory_fixed"]
    assert fixed["test"] == report["systems"]["store"]["test"]["w0.5_d2"]
    # a grid point is what `store evaluate` gives with that memory, under both rules
    memory = ["recommender.transition_memory_weight=0.5", "recommender.transition_memory_depth=2"]
    cfg_memory = load_config("tiny", overrides + memory)
    with_memory = evaluate_generative(
        load_bundle(recommender_dir(cfg_memory)), cfg_memory, system="store", progress=False
    ).metrics
    for name, value in fixed["test"].items():
        assert value == pytest.approx(with_memory[name]), name
    windowed = [
        "recommender.transition_memory_weight=0.9",
        "recommender.transition_memory_depth=2",
        "recommender.transition_memory_window=3",
        "recommender.transition_memory_symmetric=true",
    ]
    cfg_windowed = load_config("tiny", overrides + windowed)
    with_windowed = evaluate_generative(
        load_bundle(recommender_dir(cfg_windowed)), cfg_windowed, system="store", progress=False
    ).metrics
    point = report["systems"]["store"]["test"]["w0.9_d2_k3s"]
    for name, value in point.items():
        assert value == pytest.approx(with_windowed[name]), name
    assert point != report["systems"]["store"]["test"]["w0.9_d2"]  # the variant matters
    written = json.loads((tmp_path / "transition_memory_tiny_seed0.json").read_text())
    assert written["summary"] == report["summary"]
    table = (tmp_path / "transition_memory_tiny_seed0.md").read_text()
    assert "| STORE + memory |" in table and "| SASRec-CE + memory |" in table
