"""Behaviour pinned: the tiny pipeline's semantic IDs, training result and evaluation
metrics, recorded on the code before the checkpoint/stage-result refactor of issue #16
(main at 185512a) and asserted after it. A change here is a change of behaviour: explain
it in the commit and re-record the values.

Recorded under the test numerics of tests/conftest.py (``REPRODUCIBLE_NUMERICS``: one
thread, the kernels every x86-64 CPU has) and the versions of constraints.txt; two runs gave
identical values. Before those (re-recorded 2026-12-02), the values moved with the machine:
an AVX-512 machine and an AVX2 one, or 1 and 2 threads, gave other IDs with no code change.
Re-recorded 2026-12-02 (second time) for that switch, no code change.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from store_core import storage
from store_core.bundle import load_bundle
from store_core.catalogue import tokenize_catalogue
from store_core.checkpoint import read_semantic_ids
from store_core.config import load_config
from store_core.evaluation import evaluate_generative
from store_core.item_tokenizer import checkpoint_dir
from store_core.recommender_training import load_outcome, recommender_dir
from tests.conftest import copy_workspace

#: item_id -> semantic ID of the tiny catalogue after Phase A (the checkpoint's IDs).
PINNED_SIDS = {
    "0": "<a_7><b_2><c_2><d_0>",
    "1": "<a_7><b_2><c_3><d_0>",
    "2": "<a_7><b_2><c_0><d_0>",
    "3": "<a_7><b_2><c_4><d_0>",
    "4": "<a_0><b_7><c_0><d_0>",
    "5": "<a_3><b_7><c_0><d_0>",
    "6": "<a_4><b_5><c_4><d_0>",
    "7": "<a_4><b_4><c_3><d_0>",
    "8": "<a_7><b_2><c_5><d_0>",
    "9": "<a_7><b_0><c_0><d_0>",
    "10": "<a_0><b_7><c_3><d_0>",
    "11": "<a_0><b_2><c_2><d_0>",
    "12": "<a_4><b_1><c_1><d_0>",
    "13": "<a_4><b_1><c_5><d_0>",
    "14": "<a_1><b_4><c_1><d_0>",
    "15": "<a_4><b_1><c_0><d_0>",
    "16": "<a_3><b_5><c_5><d_0>",
    "17": "<a_3><b_0><c_5><d_0>",
    "18": "<a_4><b_1><c_4><d_0>",
    "19": "<a_7><b_7><c_0><d_0>",
    "20": "<a_0><b_7><c_5><d_0>",
    "21": "<a_5><b_3><c_1><d_0>",
    "22": "<a_4><b_1><c_3><d_0>",
    "23": "<a_4><b_4><c_4><d_0>",
    "24": "<a_3><b_7><c_5><d_0>",
    "25": "<a_3><b_5><c_3><d_0>",
    "26": "<a_4><b_5><c_7><d_0>",
    "27": "<a_1><b_4><c_7><d_0>",
    "28": "<a_4><b_1><c_7><d_0>",
    "29": "<a_7><b_5><c_3><d_0>",
    "30": "<a_3><b_0><c_0><d_0>",
    "31": "<a_4><b_4><c_0><d_0>",
    "32": "<a_2><b_2><c_2><d_0>",
    "33": "<a_7><b_7><c_3><d_0>",
    "34": "<a_5><b_3><c_7><d_0>",
    "35": "<a_4><b_5><c_3><d_0>",
    "36": "<a_6><b_6><c_6><d_0>",
    "37": "<a_2><b_2><c_4><d_0>",
    "38": "<a_2><b_2><c_7><d_0>",
    "39": "<a_3><b_2><c_5><d_0>",
    "40": "<a_2><b_2><c_5><d_0>",
    "41": "<a_2><b_7><c_0><d_0>",
    "42": "<a_3><b_0><c_2><d_0>",
    "43": "<a_2><b_2><c_1><d_0>",
    "44": "<a_2><b_0><c_5><d_0>",
    "45": "<a_3><b_5><c_0><d_0>",
    "46": "<a_2><b_2><c_3><d_0>",
    "47": "<a_2><b_2><c_0><d_0>",
}

#: STORE on tiny's test split (40 users, beam 10): :func:`evaluate_generative`'s metrics.
#: history_excluded_* from the decoding with the history left out of the search (before
#: commit 3fcb758 the kept beam was filtered: R@10 0.125, N@10 0.0535).
PINNED_METRICS = {
    "cold_users": 0.0,
    "coverage_at_10": 0.22916666666666666,
    "history_excluded_mrr": 0.03419642857142857,
    "history_excluded_ndcg_at_1": 0.0,
    "history_excluded_ndcg_at_10": 0.06075364765387985,
    "history_excluded_ndcg_at_20": 0.06075364765387985,
    "history_excluded_ndcg_at_5": 0.0373070717429561,
    "history_excluded_recall_at_1": 0.0,
    "history_excluded_recall_at_10": 0.15,
    "history_excluded_recall_at_20": 0.15,
    "history_excluded_recall_at_5": 0.075,
    "invalid_id_rate": 0.0,
    "mrr": 0.024583333333333336,
    "ndcg_at_1": 0.0,
    "ndcg_at_10": 0.04761588420101352,
    "ndcg_at_20": 0.04761588420101352,
    "ndcg_at_5": 0.031842640361727084,
    "recall_at_1": 0.0,
    "recall_at_10": 0.125,
    "recall_at_20": 0.125,
    "recall_at_5": 0.075,
    "returned_ids": 400.0,
    "users": 40.0,
}

#: Phase B's headline numbers (``metrics.json``).
PINNED_TRAINING = {
    "best_val_ndcg_at_10": 0.06886236279426143,
    "best_epoch": 1,
    "agreement_full_id": 0.020833333333333332,
    "agreement_first_code": 0.1875,
    "train_steps": 27,
}


def test_tiny_semantic_ids_are_pinned(tiny_pipeline: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    for directory in (checkpoint_dir(cfg), recommender_dir(cfg)):
        table = read_semantic_ids(directory)
        ids = table.column("item_id").to_pylist()
        assert dict(zip(ids, table.column("sid").to_pylist(), strict=True)) == PINNED_SIDS


def test_tiny_training_and_evaluation_metrics_are_pinned(tiny_pipeline: Path) -> None:
    cfg = load_config("tiny", [f"workspace={tiny_pipeline}", "tracking.enabled=false"])
    outcome = load_outcome(cfg)
    assert {k: outcome.metrics[k] for k in PINNED_TRAINING} == pytest.approx(PINNED_TRAINING)
    result = evaluate_generative(
        load_bundle(recommender_dir(cfg)), cfg, system="store", progress=False
    )
    assert result.metrics == pytest.approx(PINNED_METRICS, abs=1e-9)


def test_tiny_catalogue_version_is_pinned(tiny_pipeline: Path, tmp_path: Path) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"])
    outcome = tokenize_catalogue(cfg, recommender_dir(cfg))
    assert outcome.version == 1
    assert outcome.counts == {
        "changed": 0,
        "generated": 0,
        "new": 0,
        "reassigned": 0,
        "removed": 0,
        "restored": 0,
        "unchanged": 48,
    }
    current = storage.current_ids(cfg.duckdb_path)
    ids = current.column("item_id").to_pylist()
    assert dict(zip(ids, current.column("sid").to_pylist(), strict=True)) == PINNED_SIDS
