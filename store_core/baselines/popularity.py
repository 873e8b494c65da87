"""Popularity baseline: every user gets the most frequent training items.

Why: the floor any personalised recommender must clear on the same split. Counts come
from the train sequences only (validation and test items are never counted, cold-start
rows are already dropped); ties break by item index, i.e. item_id order, so the ranking is
deterministic. With ``exclude_history`` each user's history items are skipped, the same
rule :func:`store_core.baselines.sasrec.rank_users` applies.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from store_core.baselines.data import (
    EvalSplit,
    SequenceData,
    load_sequence_data,
    target_ranks,
    top_k_items,
)
from store_core.metrics import ranking_metrics

logger = logging.getLogger(__name__)

#: Users scored per block, to bound the [users, N] score matrix.
BLOCK_USERS = 2048


def popularity_scores(data: SequenceData) -> np.ndarray:
    """float64 [N] a strictly decreasing score along the popularity order of items 1..N."""
    counts = data.train_item_counts()[1:]  # [N]
    # lexsort: last key is primary -> by count descending, then index ascending.
    order = np.lexsort((np.arange(data.num_items), -counts))
    scores = np.empty(data.num_items, dtype=np.float64)
    scores[order] = -np.arange(data.num_items, dtype=np.float64)
    return scores


def popularity_top_items(
    data: SequenceData,
    split: EvalSplit = "test",
    k: int = 20,
    exclude_history: bool = False,
    excluded_history_len: int | None = None,
) -> np.ndarray:
    """int64 [U, k] recommended item indices for :meth:`SequenceData.eval_users` of ``split``.

    ``excluded_history_len`` limits the excluded items to the most recent ones (None: the
    user's whole history).
    """
    users = data.eval_users(split)
    base = torch.from_numpy(popularity_scores(data))  # [N]
    blocks = []
    for start in range(0, len(users), BLOCK_USERS):
        block = users[start : start + BLOCK_USERS]
        scores = base.expand(len(block), -1).clone()  # [B, N]
        exclude = (
            [data.history(u, split, excluded_history_len) for u in block]
            if exclude_history
            else None
        )
        blocks.append(top_k_items(scores, k, exclude))
    return np.concatenate(blocks) if blocks else np.zeros((0, k), dtype=np.int64)


def popularity_ranking(
    data: SequenceData,
    k: int = 20,
    exclude_history: bool = False,
    split: EvalSplit = "test",
    excluded_history_len: int | None = None,
) -> np.ndarray:
    """int64 [U] 0-based rank of each eval user's target in the top ``k`` (-1: a miss)."""
    top = popularity_top_items(data, split, k, exclude_history, excluded_history_len)
    return target_ranks(top, data.targets(split))


def run_popularity(data_dir: str, k: int = 20) -> dict[str, Any]:
    """Popularity on the test split of ``data_dir``: metrics with and without history items."""
    started = time.perf_counter()
    data = load_sequence_data(data_dir)
    ranks = popularity_ranking(data, k)
    test = ranking_metrics(ranks)
    excluded = ranking_metrics(popularity_ranking(data, k, exclude_history=True))
    cold = data.cold_mask("test")
    seconds = time.perf_counter() - started
    logger.info(
        "popularity test: R@10 %.4f N@10 %.4f (history excluded: R@10 %.4f N@10 %.4f), %.1f s",
        test["recall_at_10"],
        test["ndcg_at_10"],
        excluded["recall_at_10"],
        excluded["ndcg_at_10"],
        seconds,
    )
    return {
        "test": test,
        "test_history_excluded": excluded,
        "test_cold": ranking_metrics(ranks[cold]) if cold.any() else {},
        "cold_users": int(cold.sum()),
        "users": len(data.test_targets),
        "items": data.num_items,
        "seconds": seconds,
    }
