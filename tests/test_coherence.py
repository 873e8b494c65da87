"""Semantic coherence: same-prefix pairs vs random pairs, and category extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from store_core.coherence import category_sets, semantic_coherence


def _catalogue(
    n: int = 300, num_cats: int = 6, seed: int = 0
) -> tuple[list[str], list[frozenset[str]], np.ndarray]:
    """Texts drawn from a per-category vocabulary plus shared words; category per item."""
    rng = np.random.default_rng(seed)
    cats = rng.integers(0, num_cats, size=n)
    common = [f"common{w}" for w in range(30)]
    texts = []
    for c in cats:
        own = [f"cat{c}word{w}" for w in rng.integers(0, 12, size=6)]
        shared = [common[w] for w in rng.integers(0, len(common), size=6)]
        texts.append(" ".join(own + shared))
    return texts, [frozenset({f"cat{c}"}) for c in cats], cats


def test_codes_that_follow_categories_are_coherent() -> None:
    texts, categories, cats = _catalogue()
    rng = np.random.default_rng(1)
    codes = np.stack([cats, rng.integers(0, 4, size=len(cats))], axis=1)  # [N, 2]
    result = semantic_coherence(texts, categories, codes, num_pairs=4000, seed=0)
    assert result["same_prefix_category_match"] == 1.0
    assert result["random_category_match"] == pytest.approx(1 / 6, abs=0.03)
    assert result["category_match_ratio"] > 5
    assert result["same_prefix_text_sim"] > 2 * result["random_text_sim"]
    assert result["text_sim_ratio"] > 2
    assert result["num_pairs"] == 4000.0


def test_random_codes_are_not_coherent() -> None:
    texts, categories, _ = _catalogue()
    codes = np.random.default_rng(2).integers(0, 6, size=(len(texts), 3))
    result = semantic_coherence(texts, categories, codes, num_pairs=6000, seed=0)
    assert result["same_prefix_category_match"] == pytest.approx(
        result["random_category_match"], abs=0.04
    )
    assert result["text_sim_ratio"] == pytest.approx(1.0, abs=0.1)


def test_deterministic_and_edge_cases() -> None:
    texts, categories, cats = _catalogue(n=50)
    codes = cats[:, None]
    a = semantic_coherence(texts, categories, codes, num_pairs=500, seed=3)
    assert a == semantic_coherence(texts, categories, codes, num_pairs=500, seed=3)
    assert "same_prefix_category_match" not in semantic_coherence(texts, None, codes)
    # No two items share a prefix: same-prefix values are undefined, not 0.
    unique = np.arange(50)[:, None]
    result = semantic_coherence(texts, categories, unique, num_pairs=100)
    assert math.isnan(result["same_prefix_text_sim"]) and result["same_prefix_pairs_available"] == 0
    assert not math.isnan(result["random_text_sim"])
    # Items without categories never match.
    empty = [frozenset[str]()] * 50
    assert semantic_coherence(texts, empty, codes, num_pairs=100)["random_category_match"] == 0.0
    # No words at all: similarities are 0, not a crash.
    blank = semantic_coherence(["", "!!"] * 25, None, codes, num_pairs=100)
    assert blank["random_text_sim"] == 0.0


def test_validation() -> None:
    texts, categories, cats = _catalogue(n=20)
    codes = cats[:, None]
    with pytest.raises(ValueError, match="prefix_len"):
        semantic_coherence(texts, categories, codes, prefix_len=2)
    with pytest.raises(ValueError, match="texts"):
        semantic_coherence(texts[:5], categories, codes)
    with pytest.raises(ValueError, match="category"):
        semantic_coherence(texts, categories[:5], codes)


def test_category_sets() -> None:
    rows = [
        {
            "title": "x",
            "categories": "Industrial & Scientific,Fasteners,Collated Fasteners,Staples",
        },
        {"categories": "Industrial & Scientific, Lab Supplies, Pipettes"},  # Amazon reader
        {"title": "Toy Story (1995)", "genres": "Animation, Children's, Comedy"},
        {"movie_title": "Heat", "class": "Action Crime Thriller"},
        {"title": "no category"},
        {"categories": ""},
    ]
    assert category_sets(rows) == [
        frozenset({"Staples"}),
        frozenset({"Pipettes"}),
        frozenset({"Animation", "Children's", "Comedy"}),
        frozenset({"Action", "Crime", "Thriller"}),
        frozenset(),
        frozenset(),
    ]
