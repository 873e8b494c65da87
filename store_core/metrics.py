"""Ranking metrics for next-item prediction with one target per user.

Every function takes the 0-based rank of each user's target in the model's ranked list
(``-1`` when the target is not in the list at all: a miss at every cut-off), so the same
code scores generative beams and full-ranking baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CUTOFFS = (1, 5, 10, 20)


def _ranks(ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ranks, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("ranks must be one-dimensional")
    return arr


def recall_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """Share of users whose target is in the top ``k`` (= hit rate with one target)."""
    r = _ranks(ranks)
    return float(np.mean((r >= 0) & (r < k))) if r.size else 0.0


def ndcg_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top ``k``, else 0."""
    r = _ranks(ranks)
    if not r.size:
        return 0.0
    hit = (r >= 0) & (r < k)
    gains = np.zeros(r.shape, dtype=np.float64)
    gains[hit] = 1.0 / np.log2(r[hit] + 2.0)
    return float(gains.mean())


def mrr(ranks: Sequence[int] | np.ndarray) -> float:
    """Mean reciprocal rank over the returned list (a miss counts 0)."""
    r = _ranks(ranks)
    if not r.size:
        return 0.0
    rr = np.zeros(r.shape, dtype=np.float64)
    found = r >= 0
    rr[found] = 1.0 / (r[found] + 1.0)
    return float(rr.mean())


def ranking_metrics(
    ranks: Sequence[int] | np.ndarray, cutoffs: Sequence[int] = CUTOFFS
) -> dict[str, float]:
    """``recall_at_k`` and ``ndcg_at_k`` for every cut-off, plus ``mrr`` (MLflow-safe names)."""
    out: dict[str, float] = {}
    for k in cutoffs:
        out[f"recall_at_{k}"] = recall_at_k(ranks, k)
        out[f"ndcg_at_{k}"] = ndcg_at_k(ranks, k)
    out["mrr"] = mrr(ranks)
    return out


def rank_of(target: int, ranked: Sequence[int] | np.ndarray) -> int:
    """0-based position of ``target`` in ``ranked``, or -1."""
    hits = np.flatnonzero(np.asarray(ranked) == target)
    return int(hits[0]) if hits.size else -1
