"""benchmarks/beam_search_gap.py: ranks and metrics from decoded rows, on hand values."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.beam_search_gap import ranks_of, summary


def test_ranks_skip_dead_slots_and_mark_misses() -> None:
    items = np.array([[5, -1, 7, 9], [1, 2, 3, 4], [8, 8, 8, 8]])
    alive = np.array([[True, False, True, True], [True] * 4, [True] * 4])
    ranks = ranks_of(items, alive, np.array([7, 4, 3]))
    # user 0: the dead slot does not count, 7 is the 2nd live item
    assert ranks.tolist() == [2, 4, 0]


def test_summary_hand_values() -> None:
    out = summary(np.array([1, 2, 11, 0]))
    assert out["recall_at_1"] == 0.25
    assert out["recall_at_10"] == 0.5
    assert out["recall_at_20"] == 0.75
    assert math.isclose(out["ndcg_at_10"], (1.0 + 1.0 / math.log2(3.0)) / 4)
