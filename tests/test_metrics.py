from __future__ import annotations

import math

import pytest

from store_core.metrics import mrr, ndcg_at_k, rank_of, ranking_metrics, recall_at_k

# Four users: targets at ranks 0, 3, 12 and a miss.
RANKS = [0, 3, 12, -1]


def test_recall_by_hand() -> None:
    assert recall_at_k(RANKS, 1) == 0.25
    assert recall_at_k(RANKS, 5) == 0.5
    assert recall_at_k(RANKS, 10) == 0.5
    assert recall_at_k(RANKS, 20) == 0.75


def test_ndcg_by_hand() -> None:
    assert ndcg_at_k(RANKS, 1) == pytest.approx(0.25)
    assert ndcg_at_k(RANKS, 5) == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert ndcg_at_k(RANKS, 20) == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 4)


def test_mrr_by_hand() -> None:
    assert mrr(RANKS) == pytest.approx((1 + 1 / 4 + 1 / 13) / 4)


def test_names_and_empty() -> None:
    metrics = ranking_metrics(RANKS)
    assert set(metrics) == {
        "recall_at_1", "recall_at_5", "recall_at_10", "recall_at_20",
        "ndcg_at_1", "ndcg_at_5", "ndcg_at_10", "ndcg_at_20", "mrr",
    }  # fmt: skip
    assert ranking_metrics([])["recall_at_10"] == 0.0


def test_rank_of() -> None:
    assert rank_of(7, [3, 7, 9]) == 1
    assert rank_of(4, [3, 7, 9]) == -1
