"""benchmarks/id_collisions.py: the split of Recall@10 by semantic-ID code group."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.id_collisions import collision_report


def test_collision_report_against_hand_counts() -> None:
    # Five items, L = 2 codes + a disambiguation code: items 0, 1, 2 share (0, 0); 3 and 4
    # are alone in their groups.
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 1, 0]])
    top = np.array(
        [
            [1, 3, -1],  # target 0: its group (item 1) found, the item missed
            [1, 4, 0],  # target 1: hit
            [4, 2, 3],  # target 3: hit
            [0, 1, 2],  # target 4: missed, its group not found
        ]
    )
    targets = np.array([0, 1, 3, 4])
    report = collision_report(codes, 2, top, targets, k=3)
    assert report["items"] == 5 and report["code_groups"] == 3 and report["largest_group"] == 3
    assert report["items_sharing_group"] == pytest.approx(3 / 5)
    assert report["targets_sharing_group"] == pytest.approx(2 / 4)
    assert report["recall_at_3"] == pytest.approx(2 / 4)
    assert report["group_recall_at_3"] == pytest.approx(3 / 4)
    assert report["group_found_item_missed"] == pytest.approx(1 / 4)
    assert report["recall_at_3_unique_group"] == pytest.approx(1 / 2)  # targets 3, 4
    assert report["recall_at_3_shared_group"] == pytest.approx(1 / 2)  # targets 0, 1
    assert report["group_recall_at_3_shared_group"] == pytest.approx(1.0)
    # Only the first k slots count.
    assert collision_report(codes, 2, top, targets, k=1)["recall_at_1"] == pytest.approx(1 / 4)
