"""The cold-start back-off (store_core.generate.cold_start): its score is the model's
log-probability of the item's ID prefix plus log(weight / items sharing the prefix), the
merge ranks by score, and evaluation with the back-off puts never-trained items in the
beams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from store_core.generate import BeamResult, SemanticIdTrie, constrained_beam_search
from store_core.generate.cold_start import ColdStartBackoff, merge_beams
from tests.test_generate import PAD, catalogue, level_ids, random_prompts, tiny_model


def _prefix_log_prob(
    model: torch.nn.Module, prompt: list[int], codes: list[int], levels: list[list[int]]
) -> float:
    """Teacher-forced log P(codes | prompt), each code normalized over its level's codes
    (as decoding scores them)."""
    tokens = [levels[level][code] for level, code in enumerate(codes)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    total = 0.0
    for level, code in enumerate(codes):
        row = logits[len(prompt) - 1 + level, levels[level]]
        total += float(torch.log_softmax(row, dim=-1)[code])
    return total


def test_backoff_score_is_the_prefix_log_probability_plus_the_share() -> None:
    model, levels = tiny_model(3), level_ids()
    codes = catalogue(40, seed=1)
    cold_rows = np.array([2, 5, 9, 17, 33])
    backoff = ColdStartBackoff.build(codes, cold_rows, levels, depth=2, weight=0.5)
    assert backoff is not None
    prompts = random_prompts(3, seed=4)
    rows, scores = backoff.search(model, prompts, beam_size=50, pad_token_id=PAD)
    assert set(rows[0][rows[0] >= 0].tolist()) == set(cold_rows.tolist())  # beam >= prefixes
    for p, prompt in enumerate(prompts):
        for row, score in zip(rows[p].tolist(), scores[p].tolist(), strict=True):
            if row < 0:
                continue
            prefix = codes[row, :2].tolist()
            sharing = int((codes[:, :2] == codes[row, :2]).all(axis=1).sum())
            expected = _prefix_log_prob(model, prompt, prefix, levels) + np.log(0.5 / sharing)
            assert score == pytest.approx(expected, abs=1e-4)
        live = scores[p][np.isfinite(scores[p])]
        assert (np.diff(live) <= 1e-9).all()  # best first


def test_build_refuses_a_depth_outside_the_id_and_returns_none_without_cold_items() -> None:
    codes, levels = catalogue(10), level_ids()
    assert ColdStartBackoff.build(codes, [], levels, depth=2, weight=1.0) is None
    with pytest.raises(ValueError, match=r"depth must be 1\.\.3"):
        ColdStartBackoff.build(codes, [1], levels, depth=4, weight=1.0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        ColdStartBackoff.build(codes, [1], levels, depth=2, weight=0.0)


def test_merge_ranks_by_score_and_keeps_the_better_score_of_a_duplicate() -> None:
    codes = np.arange(24).reshape(6, 4)
    beam = BeamResult(
        codes=np.array([[codes[3], codes[1], [-1] * 4]]),
        scores=np.array([[-1.0, -2.0, -np.inf]], dtype=np.float32),
        items=np.array([[3, 1, -1]]),
    )
    extra_rows = np.array([[5, 1, -1]])
    extra_scores = np.array([[-1.5, -0.5, -np.inf]])
    merged = merge_beams(beam, extra_rows, extra_scores, codes, beam_size=3)
    assert merged.items.tolist() == [[1, 3, 5]]
    np.testing.assert_allclose(merged.scores, [[-0.5, -1.0, -1.5]])
    np.testing.assert_array_equal(merged.codes[0], codes[[1, 3, 5]])
    narrow = merge_beams(beam, extra_rows, extra_scores, codes, beam_size=4)
    assert narrow.items.tolist() == [[1, 3, 5, -1]] and np.isneginf(narrow.scores[0, 3])


def test_items_the_beam_cannot_reach_come_in_by_the_backoff() -> None:
    model, levels = tiny_model(5), level_ids()
    codes = catalogue(60, seed=2)
    prompts = random_prompts(4, seed=6)
    trie = SemanticIdTrie.from_codes(codes, levels)
    plain = constrained_beam_search(model, prompts, trie, beam_size=5, pad_token_id=PAD)
    reached = set(plain.items.ravel().tolist())
    cold_rows = np.array([r for r in range(len(codes)) if r not in reached][:10])
    backoff = ColdStartBackoff.build(codes, cold_rows, levels, depth=2, weight=1e9)
    assert backoff is not None
    rows, scores = backoff.search(model, prompts, beam_size=20, pad_token_id=PAD)
    merged = merge_beams(plain, rows, scores, codes, beam_size=5)
    for p in range(len(prompts)):  # a huge weight puts cold-start items first
        assert merged.items[p, 0] in set(cold_rows.tolist())
    tiny = ColdStartBackoff.build(codes, cold_rows, levels, depth=2, weight=1e-30)
    assert tiny is not None
    found = tiny.search(model, prompts, beam_size=20, pad_token_id=PAD)
    kept = merge_beams(plain, *found, codes, 5)
    np.testing.assert_array_equal(kept.items, plain.items)  # a tiny weight changes nothing


def test_evaluation_with_backoff_ranks_unseen_items(tiny_pipeline: Path, tmp_path: Path) -> None:
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.evaluation import decode_split
    from store_core.ingest import run_ingest
    from store_core.recommender_training import recommender_dir
    from tests.conftest import copy_workspace

    workspace = copy_workspace(tiny_pipeline, tmp_path / "ws")
    overrides = [f"workspace={workspace}", "tracking.enabled=false"]
    # the same model; the splits re-cut with 10% of the items held out of training
    run_ingest(load_config("tiny", [*overrides, "data.cold_start_fraction=0.1"]))
    overrides.append("data.cold_start_fraction=0.1")
    cfg = load_config("tiny", overrides)
    bundle = load_bundle(recommender_dir(cfg))
    plain = decode_split(bundle, cfg, "test", progress=False)
    seen = {item for seq in plain.data.train_sequences.values() for item in seq}
    unseen = {row for row, item in enumerate(plain.item_ids) if item not in seen}
    assert len(unseen) >= 4  # the holdout (5 of 48 items) and any item only ever a target
    boosted_cfg = load_config("tiny", [*overrides, "recommender.cold_start_backoff=1e9"])
    boosted = decode_split(bundle, boosted_cfg, "test", progress=False)
    assert all(int(row) in unseen for row in boosted.result.items[:, 0])
    assert (boosted.result.items >= 0).all()  # every slot a real item
    off_cfg = load_config("tiny", [*overrides, "recommender.cold_start_backoff=0"])
    off = decode_split(bundle, off_cfg, "test", progress=False)
    np.testing.assert_array_equal(off.result.items, plain.result.items)


def test_store_recommend_with_backoff_returns_never_trained_items(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    from store_core.bundle import load_bundle
    from store_core.config import load_config
    from store_core.data_files import trained_items
    from store_core.ingest import run_ingest
    from store_core.recommend_top_k import recommend
    from store_core.recommender_training import recommender_dir
    from tests.conftest import copy_workspace

    workspace = copy_workspace(tiny_pipeline, tmp_path / "ws")
    overrides = [f"workspace={workspace}", "tracking.enabled=false", "data.cold_start_fraction=0.1"]
    run_ingest(load_config("tiny", overrides))
    trained = trained_items(str(workspace / "data"))
    bundle = load_bundle(recommender_dir(load_config("tiny", overrides)))
    history = sorted(trained)[:3]
    plain = recommend(load_config("tiny", overrides), bundle, history, k=5)
    boosted_cfg = load_config("tiny", [*overrides, "recommender.cold_start_backoff=1e9"])
    boosted = recommend(boosted_cfg, bundle, history, k=5, exclude_history=True)
    assert boosted[0].item_id not in trained and len(boosted) == 5
    assert not {r.item_id for r in boosted} & set(history)
    assert [r.rank for r in boosted] == [1, 2, 3, 4, 5]
    assert [r.item_id for r in plain] != [r.item_id for r in boosted]
