"""Users' chronological item-index sequences for the ID-based baselines.

Why a separate view of ``splits.parquet``: ID-based models need dense item indices and
per-user arrays, while the generative pipeline works on item-id strings
(:mod:`store_core.tasks`). The rules are the same, so baselines and STORE see identical
data:

* item index ``0`` is padding; catalogue items (``items.parquet``, plus any item of
  ``splits.parquet`` missing there) are ``1 .. N`` in item_id order. Ranking is over all N.
* a user's *train sequence* is their ``train`` rows by ``position``; ``excluded`` rows
  (cold-start items held out of training) are dropped.
* the validation history is the train sequence; the test history is the train sequence
  followed by the validation item (where the user has one). A model input keeps the most
  recent ``n`` items, oldest first (:meth:`SequenceData.history`), like
  :func:`store_core.tasks.eval_prompts`.
* evaluation users of a split are those with a target in it, sorted by user_id.

The ranking helpers (:func:`top_k_items`, :func:`target_ranks`) are shared by every
full-ranking baseline so the protocol - top-k over all N items, optional removal of the
user's history items, 0-based ranks with -1 for a miss - is written once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from store_core.data_files import ITEMS_FILE, SPLITS_FILE, read_items, read_splits
from store_core.splits import EvalSplit, group_splits, recent_history, split_history

logger = logging.getLogger(__name__)

PAD = 0


@dataclass(frozen=True)
class SequenceData:
    """Item-index sequences of every user (rules in the module docstring)."""

    item_ids: tuple[str, ...]
    """Catalogue in index order: index ``i + 1`` is ``item_ids[i]`` (0 is padding)."""
    train_sequences: Mapping[str, np.ndarray]
    """user_id -> int64 [n] train item indices, oldest first (every user, maybe empty)."""
    valid_targets: Mapping[str, int]
    """user_id -> validation item index (users with one)."""
    test_targets: Mapping[str, int]
    """user_id -> test item index."""
    cold_items: frozenset[int] = frozenset()
    """Indices of cold-start items (never in any train sequence)."""

    @property
    def num_items(self) -> int:
        """N: catalogue size, excluding padding."""
        return len(self.item_ids)

    def item_index(self) -> dict[str, int]:
        """item_id -> index (1-based)."""
        return {item: i + 1 for i, item in enumerate(self.item_ids)}

    def eval_users(self, split: EvalSplit) -> list[str]:
        """Users with a target in ``split``, sorted by id (the row order of every ranking)."""
        return sorted(self._targets(split))

    def targets(self, split: EvalSplit) -> np.ndarray:
        """int64 [U] target item index of each of :meth:`eval_users`."""
        table = self._targets(split)
        return np.array([table[u] for u in self.eval_users(split)], dtype=np.int64)

    def cold_mask(self, split: EvalSplit) -> np.ndarray:
        """bool [U] per :meth:`eval_users`: the target is in no train sequence (or in the
        cold-start holdout), the users of the ``cold_*`` metrics (the rule of
        :func:`store_core.evaluation.cold_users`)."""
        counts = self.train_item_counts()
        return np.array(
            [counts[t] == 0 or t in self.cold_items for t in self.targets(split).tolist()],
            dtype=bool,
        )

    def history(self, user: str, split: EvalSplit, n: int | None = None) -> np.ndarray:
        """int64 [<= n] the input history for ``user``'s ``split`` target, oldest first.

        valid: the train sequence; test: the train sequence then the validation item.
        ``n`` keeps the most recent ``n`` items (None: all of them).
        """
        self._targets(split)  # validates the split name
        train = self.train_sequences.get(user, np.zeros(0, dtype=np.int64)).tolist()
        history = split_history(train, self.valid_targets.get(user), split)
        return np.asarray(recent_history(history, n), dtype=np.int64)

    def histories(self, split: EvalSplit, n: int | None = None) -> list[np.ndarray]:
        """:meth:`history` of every one of :meth:`eval_users`, in that order."""
        return [self.history(u, split, n) for u in self.eval_users(split)]

    def train_item_counts(self) -> np.ndarray:
        """int64 [N + 1] how often each item occurs in the train sequences (0 at padding)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for seq in self.train_sequences.values():
            np.add.at(counts, seq, 1)
        return counts

    def _targets(self, split: str) -> Mapping[str, int]:
        if split == "valid":
            return self.valid_targets
        if split == "test":
            return self.test_targets
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


def load_sequence_data(data_dir: str) -> SequenceData:
    """Read ``items.parquet`` and ``splits.parquet`` of an ingested workspace's data dir."""
    splits_uri = f"{data_dir}/{SPLITS_FILE}"
    rows = read_splits(data_dir)
    catalogue = read_items(data_dir, ["item_id"]).column("item_id").to_pylist()
    cols: dict[str, list[Any]] = {
        name: rows.column(name).to_pylist() for name in ("user_id", "item_id", "position", "split")
    }
    cold_flags = rows.column("cold_start").to_pylist()
    item_ids = tuple(sorted(set(catalogue) | set(cols["item_id"])))
    if len(item_ids) > len(set(catalogue)):
        logger.warning(
            "%d items of %s are not in %s; ranked anyway",
            len(item_ids) - len(set(catalogue)),
            splits_uri,
            ITEMS_FILE,
        )
    index = {item: i + 1 for i, item in enumerate(item_ids)}

    grouped = group_splits(
        cols["user_id"], cols["item_id"], cols["position"], cols["split"], cold_flags
    )
    train = {u: [index[i] for i in seq] for u, seq in grouped.train.items()}
    valid = {u: index[i] for u, i in grouped.valid.items()}
    test = {u: index[i] for u, i in grouped.test.items()}
    cold = {index[i] for i in grouped.cold}
    data = SequenceData(
        item_ids=item_ids,
        train_sequences={u: np.asarray(s, dtype=np.int64) for u, s in train.items()},
        valid_targets=valid,
        test_targets=test,
        cold_items=frozenset(cold),
    )
    logger.info(
        "sequence data: %d items (%d cold-start), %d users, %d train interactions, "
        "%d valid / %d test targets",
        data.num_items,
        len(cold),
        len(train),
        sum(len(s) for s in train.values()),
        len(valid),
        len(test),
    )
    return data


def top_k_items(
    scores: torch.Tensor, k: int, exclude: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """int64 [U, k] the ``k`` best item indices (1-based) per row of ``scores``.

    ``scores`` [U, N] rates items ``1 .. N`` (column ``j`` is item ``j + 1``); it is
    modified in place when ``exclude`` (one int array of item indices per row) is given:
    those items get ``-inf`` and are never returned. Slots left without any allowed item
    hold 0 (padding). ``k`` is capped at N.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [U, N], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude is not None:
        if len(exclude) != scores.shape[0]:
            raise ValueError(f"{len(exclude)} exclusion lists for {scores.shape[0]} rows")
        lengths = [len(h) for h in exclude]
        if sum(lengths):
            rows = torch.from_numpy(np.repeat(np.arange(len(exclude)), lengths))
            cols = torch.from_numpy(np.concatenate(exclude).astype(np.int64) - 1)
            scores[rows, cols] = float("-inf")
    values, columns = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # [U, k]
    items = columns + 1
    items[values == float("-inf")] = PAD
    return items.numpy().astype(np.int64)


def target_ranks(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """int64 [U] 0-based position of each target in its row of ``top`` [U, k], -1 if absent."""
    if top.shape[0] != targets.shape[0]:
        raise ValueError(f"{top.shape[0]} ranked lists for {targets.shape[0]} targets")
    hits = top == targets[:, None]  # [U, k]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1).astype(np.int64)
