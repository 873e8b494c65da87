"""benchmarks/ensemble_gain.py: the product-of-experts fusion and the ranks, on hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.ensemble_gain import fuse_beams, ranks_in_lists, sasrec_ranks


def test_fuse_beams_means_log_probs_with_the_beam_floor_for_missing_items() -> None:
    # member 0: a -1, b -2, c -4 ; member 1: b -1, d -3 (dead slot skipped)
    fused = fuse_beams(
        [["a", "b", "c"], ["b", "", "d"]], [[-1.0, -2.0, -4.0], [-1.0, -math.inf, -3.0]]
    )
    # a: (-1 + -3)/2 = -2 ; b: (-2 + -1)/2 = -1.5 ; c: (-4 + -3)/2 = -3.5 ; d: (-4 + -3)/2 = -3.5
    assert fused == ["b", "a", "c", "d"]  # c and d tie: first seen first


def test_fuse_beams_weights_move_the_mean() -> None:
    items, scores = [["a", "b"], ["b", "a"]], [[-1.0, -3.0], [-1.5, -2.0]]
    # equal weights: a (-1 - 2) / 2 = -1.5, b (-3 - 1.5) / 2 = -2.25
    assert fuse_beams(items, scores) == ["a", "b"]
    # 0.1 / 0.9: a 0.1 * -1 + 0.9 * -2 = -1.9 ; b 0.1 * -3 + 0.9 * -1.5 = -1.65
    assert fuse_beams(items, scores, weights=[0.1, 0.9]) == ["b", "a"]
    assert fuse_beams(items, scores, weights=[0.0, 1.0]) == ["b", "a"]  # member 1 alone
    for bad in ([0.0, 0.0], [1.0, -0.5]):
        with pytest.raises(ValueError, match="do not fit 2 members"):
            fuse_beams(items, scores, weights=bad)
    with pytest.raises(ValueError, match="do not fit 2 members"):
        fuse_beams(items, scores, weights=[1.0])


def test_fuse_beams_of_one_member_keeps_its_order() -> None:
    assert fuse_beams([["x", "y", "z"]], [[-0.5, -0.7, -2.0]]) == ["x", "y", "z"]


def test_fuse_beams_rejects_an_empty_member_and_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="no live item"):
        fuse_beams([["a"], [""]], [[-1.0], [-math.inf]])
    with pytest.raises(ValueError, match="2 member beams but 1"):
        fuse_beams([["a"], ["b"]], [[-1.0]])


def test_ranks_in_lists_and_in_scores() -> None:
    assert ranks_in_lists([["a", "b"], ["c"], []], ["b", "x", "a"]).tolist() == [2, 0, 0]
    scores = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.3, 0.1, 0.6]]))
    # targets are 1-based item indices (column j = item j + 1)
    assert sasrec_ranks(scores, np.array([3, 2, 1]), k=2).tolist() == [2, 0, 2]
    assert sasrec_ranks(scores, np.array([3, 2, 1]), k=3).tolist() == [2, 3, 2]
