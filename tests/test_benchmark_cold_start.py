"""benchmarks/cold_start.py: the cold / other / all split of the metrics and its table."""

from __future__ import annotations

import math

import pytest

from benchmarks.cold_start import _markdown, _split_rows


def _metrics(recall: float, ndcg: float, cold_recall: float | None, cold: int) -> dict[str, float]:
    out = {
        "users": 100.0,
        "cold_users": float(cold),
        "recall_at_10": recall,
        "ndcg_at_10": ndcg,
        "history_excluded_recall_at_10": recall,
        "history_excluded_ndcg_at_10": ndcg,
    }
    if cold_recall is not None:
        out.update({"cold_recall_at_10": cold_recall, "cold_ndcg_at_10": cold_recall / 2})
    return out


def test_other_users_metrics_are_what_all_minus_cold_leaves() -> None:
    row = _split_rows(_metrics(0.10, 0.05, 0.20, cold=10))
    # 100 users at 0.10 = 10 hits; the 10 cold users hold 2 of them: 8 hits over 90 users
    assert row["warm_recall_at_10"] == pytest.approx(8 / 90)
    assert row["cold_recall_at_10"] == pytest.approx(0.20)
    assert row["warm_ndcg_at_10"] == pytest.approx((0.05 * 100 - 0.10 * 10) / 90)
    none = _split_rows(_metrics(0.10, 0.05, None, cold=0))
    assert math.isnan(none["cold_recall_at_10"]) and none["warm_recall_at_10"] == 0.10


def test_table_has_mean_and_std_over_seeds_per_system_and_weight() -> None:
    rows = [
        {"system": "store", "seed": s, "weight": 1.0, **_split_rows(_metrics(0.1, 0.05, c, 10))}
        for s, c in ((0, 0.2), (1, 0.4))
    ]
    sasrec = _split_rows(_metrics(0.2, 0.1, 0.0, 10))
    rows.append({"system": "sasrec", "seed": 0, "weight": None, **sasrec})
    table = _markdown(rows, "python -m benchmarks.cold_start")
    assert "| store | 1 | 2 | 10 | 0.3000 ± 0.1414 |" in table
    assert "| sasrec | — | 1 | 10 | 0.0000 |" in table


def test_prefix_hits_count_top10_items_sharing_the_targets_first_codes() -> None:
    from types import SimpleNamespace

    import numpy as np

    from benchmarks.cold_start import prefix_hits

    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    items = np.array([[1, 3], [3, -1], [0, 2]])  # top rows per user; -1 a dead slot
    decoded = SimpleNamespace(
        item_ids=["a", "b", "c", "d"],
        codes=codes,
        targets=["a", "c", "b"],  # rows 0, 2, 1
        result=SimpleNamespace(items=items),
    )
    hits = prefix_hits(decoded, np.array([True, True, False]))
    # user 0 (a = 000): b = 001 shares 2 codes; user 1 (c = 010): d = 100 shares none;
    # user 2 (b = 001): a = 000 shares 2 codes, c = 010 shares 1
    assert hits["prefix_hits_cold"] == [0.5, 0.5, 0.0]
    assert hits["prefix_hits_other"] == [1.0, 1.0, 0.0]
