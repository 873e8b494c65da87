"""The transition memory mixed into decoding (store_core.generate.transition_memory):
hand-made counts, mixtures and re-rankings with values worked out by hand, then the
library paths (evaluation, store recommend) on the tiny pipeline."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from store_core.config import load_config
from store_core.errors import ConfigError
from store_core.generate.beam import BeamResult
from store_core.generate.transition_memory import (
    TransitionMemory,
    fuse_with_transition_memory,
    without_items,
)

# 0 -> 1 twice, 0 -> 2 once, 1 -> 2 once, 2 -> 0 once; item 3 is never followed.
SEQUENCES = [[0, 1, 2], [0, 1], [3, 0, 2, 0]]


def test_counts_are_row_normalized_and_pairs_with_an_unknown_item_skipped() -> None:
    memory = TransitionMemory.from_sequences(SEQUENCES, num_items=4)
    expected = np.zeros((4, 4))
    expected[0, 1], expected[0, 2] = 2 / 3, 1 / 3
    expected[1, 2] = 1.0
    expected[2, 0] = 1.0
    expected[3, 0] = 1.0
    np.testing.assert_allclose(memory.matrix.toarray(), expected)
    skipped = TransitionMemory.from_sequences([[0, -1, 1], [1, 2]], num_items=3)
    np.testing.assert_allclose(skipped.matrix.toarray()[0], [0, 0, 0])  # 0 -> ? -> 1
    np.testing.assert_allclose(skipped.matrix.toarray()[1], [0, 0, 1])
    with pytest.raises(ValueError, match="catalogue's 3"):
        TransitionMemory.from_sequences([[0, 3]], num_items=3)


def test_next_item_probabilities_weight_the_recent_items_by_decay() -> None:
    memory = TransitionMemory.from_sequences(SEQUENCES, num_items=4)
    probs = memory.next_item_probabilities([[2, 0], [1], [], [0, 3]], depth=2, decay=0.5)
    assert probs.shape == (4, 4)
    dense = probs.toarray()
    # h_-1 = 0 (weight 1/1.5), h_-2 = 2 (weight 0.5/1.5)
    np.testing.assert_allclose(dense[0], [0.5 / 1.5, (2 / 3) / 1.5, (1 / 3) / 1.5, 0])
    np.testing.assert_allclose(dense[1], [0, 0, 1, 0])  # one item: weight 1
    np.testing.assert_allclose(dense[2], [0, 0, 0, 0])  # no history, no memory
    # h_-1 = 3 -> 0; h_-2 = 0 -> 1 (2/3), 2 (1/3)
    np.testing.assert_allclose(dense[3], [1 / 1.5, (2 / 3) * 0.5 / 1.5, (1 / 3) * 0.5 / 1.5, 0])
    np.testing.assert_allclose(dense.sum(axis=1), [1, 1, 0, 1])
    with pytest.raises(ValueError, match="decay"):
        memory.next_item_probabilities([[0]], depth=0, decay=0.5)
    with pytest.raises(ValueError, match="decay"):
        memory.next_item_probabilities([[0]], depth=1, decay=0.0)


def _beams(items: list[list[int]], probs: list[list[float]]) -> BeamResult:
    scores = np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)
    rows = np.asarray(items, dtype=np.int64)
    scores[rows < 0] = -np.inf
    return BeamResult(codes=np.zeros((*rows.shape, 2), dtype=np.int64), scores=scores, items=rows)


CODES = np.arange(10).reshape(5, 2)  # row r has codes (2r, 2r + 1)


def test_fusion_mixes_probabilities_and_lets_remembered_items_in() -> None:
    beams = _beams([[0, 1, -1]], [[0.5, 0.3, 1.0]])
    memory = sparse.csr_array(np.array([[0.0, 0.2, 0.0, 0.8, 0.0]]))
    fused = fuse_with_transition_memory(beams, memory, 0.5, CODES, beam_size=3)
    # 0: 0.25; 1: 0.15 + 0.10 = 0.25 (tie: the lower row first); 3: 0.4 (memory only)
    assert fused.items.tolist() == [[3, 0, 1]]
    np.testing.assert_allclose(np.exp(fused.scores[0]), [0.4, 0.25, 0.25], rtol=1e-6)
    assert fused.codes[0].tolist() == [[6, 7], [0, 1], [2, 3]]
    narrow = fuse_with_transition_memory(beams, memory, 0.5, CODES, beam_size=2)
    assert narrow.items.tolist() == [[3, 0]]
    wide = fuse_with_transition_memory(beams, memory, 0.5, CODES, beam_size=5)
    assert wide.items.tolist() == [[3, 0, 1, -1, -1]]  # dead slots stay dead
    assert np.isneginf(wide.scores[0, 3:]).all() and (wide.codes[0, 3:] == -1).all()


def test_fusion_with_weight_zero_keeps_the_beam_and_bad_input_is_refused() -> None:
    beams = _beams([[2, 4, 1]], [[0.5, 0.3, 0.1]])
    memory = sparse.csr_array(np.array([[0.0, 1.0, 0.0, 0.0, 0.0]]))
    same = fuse_with_transition_memory(beams, memory, 0.0, CODES, beam_size=3)
    assert same.items.tolist() == [[2, 4, 1]]
    np.testing.assert_allclose(same.scores, beams.scores, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fuse_with_transition_memory(beams, memory, 1.0, CODES, beam_size=3)
    with pytest.raises(ValueError, match="prompts x catalogue rows"):
        fuse_with_transition_memory(beams, sparse.csr_array((2, 5)), 0.5, CODES, 3)


def test_a_window_counts_pairs_further_apart_and_symmetric_both_ways() -> None:
    # one sequence 0 -> 1 -> 2 -> 3; window 2 with decay 0.5: gap-1 pairs weigh 1, gap-2 0.5
    windowed = TransitionMemory.from_sequences([[0, 1, 2, 3]], 4, window=2, window_decay=0.5)
    np.testing.assert_allclose(
        windowed.matrix.toarray(),
        [[0, 1 / 1.5, 0.5 / 1.5, 0], [0, 0, 1 / 1.5, 0.5 / 1.5], [0, 0, 0, 1], [0, 0, 0, 0]],
    )
    both = TransitionMemory.from_sequences([[0, 1, 2], [2, -1, 0]], 3, symmetric=True)
    # pairs (0,1), (1,2) each way; the pairs with the unknown item are skipped
    np.testing.assert_allclose(both.matrix.toarray(), [[0, 1, 0], [0.5, 0, 0.5], [0, 1, 0]])
    # a window past the sequence's length only counts what exists
    short = TransitionMemory.from_sequences([[1, 0]], 2, window=5)
    np.testing.assert_allclose(short.matrix.toarray(), [[0, 0], [1, 0]])
    with pytest.raises(ValueError, match="window must be >= 1"):
        TransitionMemory.from_sequences([[0, 1]], 2, window=0)
    with pytest.raises(ValueError, match="window_decay in"):
        TransitionMemory.from_sequences([[0, 1]], 2, window=2, window_decay=0.0)


def test_without_items_drops_each_prompts_own_rows() -> None:
    probabilities = sparse.csr_array(np.array([[0.5, 0.25, 0.25, 0.0], [0.0, 0.5, 0.0, 0.5]]))
    kept = without_items(probabilities, [[0, 0, 3], []])
    np.testing.assert_array_equal(kept.toarray(), [[0, 0.25, 0.25, 0], [0, 0.5, 0, 0.5]])
    assert kept.nnz == 4  # the removed entries are gone, not stored zeros
    with pytest.raises(ValueError, match="1 row lists for 2 prompts"):
        without_items(probabilities, [[0]])


def test_config_bounds_and_labels() -> None:
    base = ["tracking.enabled=false"]
    cfg = load_config("tiny", [*base, "recommender.transition_memory_weight=0.5"])
    assert cfg.recommender.transition_memory_weight == 0.5
    assert (cfg.recommender.transition_memory_depth, cfg.recommender.transition_memory_decay) == (
        2,
        0.5,
    )
    from store_core.evaluation import generative_label, tiger_config

    assert generative_label(cfg).endswith("STORE quantizer, transition memory 0.5)")
    assert generative_label(load_config("tiny", base)).endswith("STORE quantizer)")
    assert tiger_config(cfg).recommender.transition_memory_weight == 0.0  # TIGER as published
    windowed = load_config(
        "tiny",
        [
            *base,
            "recommender.transition_memory_weight=0.5",
            "recommender.transition_memory_window=5",
            "recommender.transition_memory_symmetric=true",
        ],
    )
    assert generative_label(windowed).endswith("transition memory 0.5 window 5 symmetric)")
    assert windowed.recommender.transition_memory_window_decay == 0.7
    for bad in (
        "transition_memory_weight=1.0",
        "transition_memory_depth=0",
        "transition_memory_window=0",
        "transition_memory_window_decay=0",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny", [*base, f"recommender.{bad}"])


def test_evaluation_and_recommend_follow_the_memory_when_it_dominates(
    tiny_pipeline: Path,
) -> None:
    """With weight 0.999 the memory decides the order of everything it names: each test
    user's first recommendation is the most frequent training follower of their last
    history item (depth 1) whenever that item was followed in training."""
    from store_core.bundle import load_bundle
    from store_core.data_files import read_user_splits
    from store_core.evaluation import decode_split
    from store_core.recommend_top_k import recommend
    from store_core.recommender_training import recommender_dir

    base = [f"workspace={tiny_pipeline}", "tracking.enabled=false"]
    plain = load_config("tiny", base)
    memory = ["recommender.transition_memory_weight=0.999", "recommender.transition_memory_depth=1"]
    memo = load_config("tiny", [*base, *memory])
    bundle = load_bundle(recommender_dir(plain))
    followers: dict[str, Counter[str]] = {}
    for seq in read_user_splits(plain.data_dir).train.values():
        for a, b in itertools.pairwise(seq):
            followers.setdefault(a, Counter())[b] += 1
    without = decode_split(bundle, plain, "test", progress=False)
    with_memory = decode_split(bundle, memo, "test", progress=False)
    checked = changed = 0
    for u, user in enumerate(with_memory.users):
        last = with_memory.data.history(user, "test")[-1]
        counts = followers.get(last)
        top = with_memory.item_ids[int(with_memory.result.items[u, 0])]
        if counts:
            best = max(counts.values())
            assert counts[top] == best, (user, last, top, counts)
            checked += 1
        changed += int(top != without.item_ids[int(without.result.items[u, 0])])
    assert checked > 0 and changed > 0
    # store recommend: the same rule for an ad-hoc history, and its score is the mixture's
    last = next(item for item, counts in followers.items() if len(counts) >= 1)
    recs = recommend(memo, bundle, [last], k=5)
    assert followers[last][recs[0].item_id] == max(followers[last].values())
    share = followers[last][recs[0].item_id] / sum(followers[last].values())
    assert recs[0].score >= math.log(0.999 * share) - 1e-6
    excluded = recommend(memo, bundle, [last], k=5, exclude_history=True)
    assert last not in {r.item_id for r in excluded}
    if recs[0].item_id != last:  # the memory still reads the excluded history item
        assert excluded[0].item_id == recs[0].item_id
