"""Evaluation: every system side by side on the tiny pipeline, report, plot, DuckDB rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store_core import storage
from store_core.bundle import load_bundle
from store_core.config import load_config
from store_core.evaluation import (
    SystemResult,
    aggregate,
    evaluate_generative,
    generative_label,
    markdown_report,
    summarize_ranks,
)
from store_core.recommender_training import recommender_dir
from store_core.stages import evaluate_stage
from tests.conftest import copy_workspace


def test_generative_evaluation_has_no_invalid_ids(tiny_pipeline: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    result = evaluate_generative(
        load_bundle(recommender_dir(cfg)), cfg, system="store", progress=False
    )
    m = result.metrics
    assert m["invalid_id_rate"] == 0.0
    assert m["users"] == 40
    assert m["returned_ids"] == 40 * cfg.recommender.beam_size
    assert 0 < m["coverage_at_10"] <= 1
    assert m["recall_at_1"] <= m["recall_at_5"] <= m["recall_at_10"] <= m["recall_at_20"]
    assert "history_excluded_recall_at_10" in m


def test_history_excluded_metrics_decode_without_the_history(tiny_pipeline: Path) -> None:
    """The history-excluded rule decodes again with each user's whole history left out of
    the search: a full beam of other items (not what is left of the kept beam), the very
    list ``store recommend --exclude-history`` serves for that history, and the ranks the
    ``history_excluded_*`` metrics are computed from."""
    from store_core.evaluation import decode_split
    from store_core.metrics import rank_of, ranking_metrics
    from store_core.recommend_top_k import recommend

    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    bundle = load_bundle(recommender_dir(cfg))
    beam_size = cfg.recommender.beam_size
    kept = decode_split(bundle, cfg, "test", progress=False)
    decoded = decode_split(bundle, cfg, "test", progress=False, exclude_history=True)
    row_of = {item: row for row, item in enumerate(decoded.item_ids)}
    catalogue = len(decoded.item_ids)
    ranks, short_after_filtering = [], 0
    for u, (user, target) in enumerate(zip(decoded.users, decoded.targets, strict=True)):
        history = {row_of[i] for i in decoded.data.history(user, "test")}
        beam = decoded.result.items[u][decoded.result.alive[u]].tolist()
        assert not history & set(beam)
        assert len(beam) == min(beam_size, catalogue - len(history))
        filtered = [i for i in kept.result.items[u].tolist() if i >= 0 and i not in history]
        short_after_filtering += len(filtered) < len(beam)
        ranks.append(rank_of(row_of[target], beam))
        if u < 3:
            served = recommend(
                cfg, bundle, decoded.data.history(user, "test"), beam_size, exclude_history=True
            )
            assert [r.item_id for r in served] == [decoded.item_ids[i] for i in beam]
    assert short_after_filtering > 0  # filtering the kept beam would have left fewer
    metrics = evaluate_generative(bundle, cfg, system="store", progress=False).metrics
    expected = ranking_metrics(np.asarray(ranks))
    for name in ("recall_at_10", "ndcg_at_10", "recall_at_20", "mrr"):
        assert metrics[f"history_excluded_{name}"] == pytest.approx(expected[name])


def test_summarize_ranks_by_hand() -> None:
    ranks = np.array([0, 4, -1, 9])
    excluded = np.array([0, 2, -1, 7])
    cold = np.array([False, False, True, True])
    m = summarize_ranks(ranks, excluded, cold)
    assert m["recall_at_5"] == 0.5 and m["history_excluded_recall_at_5"] == 0.5
    assert m["cold_recall_at_10"] == 0.5 and m["cold_users"] == 2
    assert m["history_excluded_ndcg_at_1"] == 0.25


def test_report_shows_mean_and_std_over_seeds() -> None:
    results = [
        SystemResult("sasrec", 1, {"recall_at_10": 0.1, "ndcg_at_10": 0.05}),
        SystemResult("sasrec", 2, {"recall_at_10": 0.3, "ndcg_at_10": 0.07}),
    ]
    agg = aggregate(results)
    assert agg["sasrec"]["recall_at_10"][0] == 0.2
    assert abs(agg["sasrec"]["recall_at_10"][1] - 2**0.5 / 10) < 1e-12  # sample std
    text = markdown_report(results, "t")
    assert "0.2000 ± 0.1414" in text and "SASRec-CE" in text


def test_evaluate_stage_runs_every_system(tiny_pipeline: Path, tmp_path: Path) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"])
    outcome = evaluate_stage(cfg).result
    systems = {r.system for r in outcome.results}
    assert systems == {"store", "tiger", "sasrec", "popularity"}
    assert Path(ws / "models" / "recommender-rqkmeans-rec").is_dir()  # trained on demand
    report = Path(outcome.report_path).read_text()
    assert "TIGER-style" in report and "Popularity" in report
    assert Path(outcome.plot_path).stat().st_size > 1000
    rows = storage.read_eval_results(cfg.duckdb_path)
    assert {r["system"] for r in rows} == systems
    assert {r["history_rule"] for r in rows} == {"kept", "excluded"}
    store_invalid = [
        r["value"] for r in rows if r["system"] == "store" and r["metric"] == "invalid_id_rate"
    ]
    assert store_invalid == [0.0]


def test_store_label_follows_the_checkpoint_it_evaluates() -> None:
    rec_only = ["recommender.mixture=[{task: recommendation, weight: 1}]"]
    assert generative_label(load_config("tiny")) == "STORE (multi-task, STORE quantizer)"
    assert generative_label(load_config("tiny", rec_only)) == (
        "STORE (recommendation only, STORE quantizer)"
    )
    assert (
        generative_label(load_config("tiny", ["semantic_id.quantizer=rqkmeans"]))
        == "STORE (multi-task, RQ-KMeans quantizer)"
    )
    results = [
        SystemResult(
            "store",
            0,
            {"recall_at_10": 0.1},
            {"label": "STORE (recommendation only, STORE quantizer)"},
        ),
        SystemResult("popularity", 0, {"recall_at_10": 0.05}),
    ]
    text = markdown_report(results, "t")
    assert "| STORE (recommendation only, STORE quantizer) | 1 |" in text
    assert "multi-task" not in text and "| Popularity | 1 |" in text


def test_evaluation_prompts_use_the_trained_history_len(
    tiny_pipeline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`store evaluate --set recommender.history_len=1` must not prompt a model trained on
    N-item histories with 1 item: the checkpoint's N is used and the override is named."""
    from store_core.evaluation import decode_split

    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    bundle = load_bundle(recommender_dir(cfg))
    trained = bundle.metadata.history_len
    assert trained != 1
    overrides = [f"workspace={tiny_pipeline}", "tracking.enabled=false"]
    other = load_config("tiny", [*overrides, "recommender.history_len=1"])
    with caplog.at_level("WARNING", logger="store_core.bundle"):
        overridden = decode_split(bundle, other, "test", progress=False)
    assert f"differs from the {trained} this checkpoint was trained with" in caplog.text
    same = decode_split(bundle, cfg, "test", progress=False)
    np.testing.assert_array_equal(overridden.result.items, same.result.items)
    np.testing.assert_allclose(overridden.result.scores, same.result.scores)
