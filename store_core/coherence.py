"""Do semantic IDs carry meaning? Compare items that share an ID prefix with random pairs.

A codebook can have healthy usage and few collisions and still be meaningless (codes that
are effectively random hashes of the text). The point of semantic IDs is that items with
a common prefix are similar, so that the recommender can generalise across them and a
new item lands near related ones. This module measures exactly that, on information the
quantizer never saw directly:

- text: mean TF-IDF cosine similarity of item texts, for pairs that share the first
  ``prefix_len`` codes versus uniformly random pairs;
- categories (when the catalogue has them): how often the two items of a pair share a
  category, for the same two kinds of pairs.

Meaningful IDs give a same-prefix score well above the random one (ratio >> 1); random
codes give a ratio near 1. Pairs are sampled (with replacement, seeded) rather than
enumerated so the cost is fixed whatever the catalogue size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.feature_extraction.text import TfidfVectorizer

logger = logging.getLogger(__name__)


def semantic_coherence(
    texts: Sequence[str],
    categories: Sequence[frozenset[str]] | None,
    codes: np.ndarray,
    *,
    prefix_len: int = 1,
    num_pairs: int = 20000,
    seed: int = 0,
) -> dict[str, float]:
    """Same-prefix vs random pair similarity of item texts (and categories).

    texts: one per item; categories: one set per item (empty = never matches) or None;
    codes: [N, M] semantic IDs (or cluster codes), row i belonging to texts[i].

    Returns ``same_prefix_text_sim``, ``random_text_sim``, ``text_sim_ratio`` and, with
    categories, ``same_prefix_category_match``, ``random_category_match``,
    ``category_match_ratio``; plus ``num_pairs`` and ``same_prefix_pairs_available`` (how
    many distinct same-prefix pairs exist). Same-prefix values are NaN when no two items
    share a prefix; ratios are NaN when the random value is 0.
    """
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must be a 2-D [N, M] array, got shape {arr.shape}")
    n = arr.shape[0]
    if len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} rows of codes")
    if categories is not None and len(categories) != n:
        raise ValueError(f"{len(categories)} category sets for {n} rows of codes")
    if not 1 <= prefix_len <= arr.shape[1]:
        raise ValueError(f"prefix_len must be in 1..{arr.shape[1]}, got {prefix_len}")
    if n < 2:
        raise ValueError(f"need at least 2 items, got {n}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")

    rng = np.random.default_rng(seed)
    same_a, same_b, available = _same_prefix_pairs(arr[:, :prefix_len], num_pairs, rng)
    rand_a = rng.integers(0, n, size=num_pairs)
    rand_b = rng.integers(0, n - 1, size=num_pairs)
    rand_b = rand_b + (rand_b >= rand_a)  # distinct from rand_a, uniform over the others

    vectors = _tfidf(texts)  # [N, V] sparse, rows L2-normalised
    result: dict[str, float] = {
        "num_pairs": float(num_pairs),
        "same_prefix_pairs_available": float(available),
    }
    result["same_prefix_text_sim"] = _mean_cosine(vectors, same_a, same_b)
    result["random_text_sim"] = _mean_cosine(vectors, rand_a, rand_b)
    result["text_sim_ratio"] = _ratio(result["same_prefix_text_sim"], result["random_text_sim"])
    if categories is not None:
        result["same_prefix_category_match"] = _match_rate(categories, same_a, same_b)
        result["random_category_match"] = _match_rate(categories, rand_a, rand_b)
        result["category_match_ratio"] = _ratio(
            result["same_prefix_category_match"], result["random_category_match"]
        )
    logger.info(
        "coherence (prefix %d): text sim %.4f same-prefix vs %.4f random",
        prefix_len,
        result["same_prefix_text_sim"],
        result["random_text_sim"],
    )
    return result


def _same_prefix_pairs(
    prefixes: np.ndarray, num_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs of distinct items with equal prefixes, uniform over all such pairs.

    prefixes: [N, P]. Returns item indices a [S], b [S] (S = num_pairs, or 0 when no two
    items share a prefix) and the number of distinct same-prefix pairs.
    """
    _, inverse = np.unique(prefixes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    members = np.argsort(inverse, kind="stable")  # items grouped by prefix
    sizes = np.bincount(inverse)  # [G]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))  # [G]
    pair_counts = sizes * (sizes - 1) // 2  # [G]
    total = int(pair_counts.sum())
    if total == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, 0
    groups = rng.choice(len(sizes), size=num_pairs, p=pair_counts / total)
    size = sizes[groups]
    i = rng.integers(0, size)
    j = rng.integers(0, size - 1)
    j = j + (j >= i)
    return members[starts[groups] + i], members[starts[groups] + j], total


def _tfidf(texts: Sequence[str]) -> csr_matrix | None:
    """TF-IDF vectors [N, V] with L2-normalised rows, or None when there are no words."""
    try:
        return csr_matrix(TfidfVectorizer().fit_transform(list(texts)))
    except ValueError:  # empty vocabulary: no text anywhere, every similarity is 0
        logger.warning("no words in any text; text similarities are 0")
        return None


def _mean_cosine(vectors: csr_matrix | None, a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of the row pairs (a[s], b[s]): rows are unit vectors, so dot = cosine."""
    if a.size == 0:
        return math.nan
    if vectors is None:
        return 0.0
    dots = vectors[a].multiply(vectors[b]).sum(axis=1)  # [S, 1]
    return float(np.asarray(dots).mean())


def _match_rate(categories: Sequence[frozenset[str]], a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return math.nan
    hits = sum(
        1 for x, y in zip(a.tolist(), b.tolist(), strict=True) if categories[x] & categories[y]
    )
    return hits / a.size


def _ratio(same: float, random: float) -> float:
    if math.isnan(same) or random == 0:
        return math.nan
    return same / random


def category_sets(fields_rows: Sequence[Mapping[str, str]]) -> list[frozenset[str]]:
    """The category set of each item, from its stored text fields (one mapping per item).

    - Amazon-style ``categories`` (a comma-joined path, e.g. ``Industrial & Scientific,
      Fasteners,Staples``): the leaf, i.e. the last non-empty element, alone - the root is
      shared by the whole catalogue and would make every pair match.
    - MovieLens ``genres`` (``", "``-joined names): the set of genres.
    - RecBole ml-100k ``class`` (space-joined genres): the set of genres.

    The first of these fields present wins; an item with none gets an empty set.
    """
    result: list[frozenset[str]] = []
    for fields in fields_rows:
        cats: frozenset[str] = frozenset()
        if fields.get("categories"):
            parts = [p.strip() for p in fields["categories"].split(",") if p.strip()]
            cats = frozenset(parts[-1:])
        elif fields.get("genres"):
            cats = frozenset(g.strip() for g in fields["genres"].split(",") if g.strip())
        elif fields.get("class"):
            cats = frozenset(fields["class"].split())
        result.append(cats)
    return result
