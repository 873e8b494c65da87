"""Stage 4: offline evaluation with the protocol of docs/EVALUATION.md.

Generative systems (STORE and the TIGER-style RQ-KMeans variant) are scored from their
constrained beam (width ``recommender.beam_size``, default 20): the target's position in
the beam is its rank, not found = miss. Besides Recall/NDCG@{1,5,10,20} and MRR this
reports:

* ``invalid_id_rate``: returned beams whose ID maps to no item (must be exactly 0);
* ``coverage_at_10``: distinct items recommended in anyone's top 10 / catalogue size;
* ``cold_*``: the same metrics on users whose test target no training sequence contains
  (never a recommendation target or history item in training, cold-start holdout
  included);
* ``*_history_excluded``: the second rule of EVALUATION.md, history items removed from
  every system's ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store_core.bundle import RecommenderBundle
from store_core.config import StoreConfig
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.metrics import rank_of, ranking_metrics
from store_core.tasks import EvalSplit, TaskData, eval_prompts, load_task_data

logger = logging.getLogger(__name__)


@dataclass
class SystemResult:
    """One system's metrics on one split (flat name -> value, MLflow-safe names)."""

    system: str
    seed: int
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def _history(data: TaskData, user: str, split: EvalSplit, n: int) -> list[str]:
    history = list(data.train_sequences.get(user, []))
    if split == "test" and user in data.valid_targets:
        history.append(data.valid_targets[user])
    return history[max(0, len(history) - n) :]


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def summarize_ranks(
    ranks: np.ndarray,
    ranks_excluded: np.ndarray,
    cold_mask: np.ndarray,
) -> dict[str, float]:
    """The headline, history-excluded and cold-start metrics from per-user ranks."""
    out = ranking_metrics(ranks)
    out.update(_prefixed(ranking_metrics(ranks_excluded), "history_excluded_"))
    if cold_mask.any():
        out.update(_prefixed(ranking_metrics(ranks[cold_mask]), "cold_"))
    out["cold_users"] = float(cold_mask.sum())
    out["users"] = float(len(ranks))
    return out


def cold_users(data: TaskData, targets: Sequence[str]) -> np.ndarray:
    """Mask of users whose target appears in no training sequence."""
    seen = {item for seq in data.train_sequences.values() for item in seq}
    return np.array([t not in seen or t in data.cold_items for t in targets], dtype=bool)


def evaluate_generative(
    bundle: RecommenderBundle,
    cfg: StoreConfig,
    *,
    system: str,
    split: EvalSplit = "test",
    max_users: int | None = None,
    progress: bool = True,
) -> SystemResult:
    """Constrained beam search for every user of ``split`` with ``bundle``'s model."""
    codes = bundle.codes()
    item_ids: list[str] = bundle.semantic_ids.column("item_id").to_pylist()
    data = load_task_data(cfg.data_dir, dict(zip(item_ids, codes.tolist(), strict=True)))
    users, prompts, targets = eval_prompts(data, bundle.builder, cfg.recommender.history_len, split)
    if max_users is not None and len(users) > max_users:
        keep = sorted(
            np.random.default_rng(0).choice(len(users), size=max_users, replace=False).tolist()
        )
        users = [users[i] for i in keep]
        prompts = [prompts[i] for i in keep]
        targets = [targets[i] for i in keep]
    trie = SemanticIdTrie.from_codes(codes, bundle.level_ids)
    result = constrained_beam_search(
        bundle.model,
        prompts,
        trie,
        beam_size=cfg.recommender.beam_size,
        pad_token_id=bundle.builder.pad_token_id,
        batch_size=cfg.recommender.eval_batch_size,
        progress=progress,
    )
    alive = np.isfinite(result.scores)  # [P, B]
    invalid = int((alive & (result.items < 0)).sum())
    returned = int(alive.sum())
    row_of = {item: i for i, item in enumerate(item_ids)}
    ranks = np.empty(len(users), dtype=np.int64)
    ranks_excluded = np.empty(len(users), dtype=np.int64)
    top10: set[int] = set()
    for u, (user, target) in enumerate(zip(users, targets, strict=True)):
        beam = result.items[u][alive[u]]
        ranks[u] = rank_of(row_of[target], beam)
        history = {row_of[i] for i in _history(data, user, split, cfg.recommender.history_len)}
        filtered = np.array([i for i in beam.tolist() if i not in history], dtype=np.int64)
        ranks_excluded[u] = rank_of(row_of[target], filtered)
        top10.update(beam[:10].tolist())
    metrics = summarize_ranks(ranks, ranks_excluded, cold_users(data, targets))
    metrics["invalid_id_rate"] = invalid / max(returned, 1)
    metrics["coverage_at_10"] = len(top10) / len(item_ids)
    metrics["returned_ids"] = float(returned)
    logger.info(
        "%s: recall@10 %.4f ndcg@10 %.4f invalid-ID rate %.4f (%d users)",
        system,
        metrics["recall_at_10"],
        metrics["ndcg_at_10"],
        metrics["invalid_id_rate"],
        len(users),
    )
    return SystemResult(system, cfg.recommender_train.seed, metrics)
