"""Chronological ordering, the leave-one-out split and the cold-start item holdout.

The rules (also written into the data manifest):

* Exact duplicates: rows with the same user, item and (non-null) timestamp are one
  interaction recorded twice (Amazon review dumps have them); all but the first in source
  order are dropped before k-core and the split (:func:`drop_exact_duplicates`), so they
  neither count toward k-core nor put a test target into its own history. The same
  (user, item) pair at *different* times is kept as separate interactions: repeat
  consumption is part of the sequence a sequential recommender learns (as in SASRec's and
  RecBole's preprocessing), so an item may appear in a user's history and as their target.
  Rows without a timestamp (LC-Rec, P5) are never exact duplicates: their order in the
  source is their only time, and a repeat there is a repeat.
* Order per user: timestamp ascending (float unix seconds, fractions kept; null
  timestamps after dated ones), then position in the source file, then item_id. The
  source position makes ties deterministic; item_id only matters when two rows share
  both. :func:`count_tied` counts the dated rows that share their user's timestamp with
  another row, i.e. whose order came from this rule rather than from time.
* Leave-one-out: the last interaction is ``test``, the second-to-last ``valid``, the rest
  ``train``. A user with 2 interactions has one train and one test row; with 1, only test.
* Cold start (optional): a seeded sample of items is held out of all training: their
  train/valid rows become ``excluded``; test rows keep ``test`` with ``cold_start = true``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from store_core.schemas import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID

ORDER_RULE = (
    "per user: timestamp ascending (float unix seconds, fractions kept; nulls last), "
    "then source position, then item_id"
)
DUPLICATE_RULE = (
    "exact duplicates (same user, item and timestamp) are dropped before k-core and the "
    "split, the first in source order kept; the same user and item at different times, "
    "or without timestamps, are kept as separate interactions"
)
SPLIT_RULE = (
    "leave-one-out per user: last = test, second-to-last = valid, rest = train; "
    "2 interactions: train + test; 1 interaction: test only"
)
COLD_RULE = (
    "a seeded sample of items is held out: their train/valid rows are 'excluded', "
    "their test rows are flagged cold_start"
)


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    timestamp: float | None  # unix seconds, fractions kept
    source_order: int


def order_key(row: Interaction) -> tuple[int, float, int, str]:
    """Sort key implementing :data:`ORDER_RULE`."""
    has_no_time = 1 if row.timestamp is None else 0
    return (has_no_time, row.timestamp or 0.0, row.source_order, row.item_id)


def drop_exact_duplicates(rows: list[Interaction]) -> tuple[list[Interaction], int]:
    """``rows`` without exact duplicates (:data:`DUPLICATE_RULE`), and how many were
    dropped. The first row in source order of each (user, item, timestamp) is kept."""
    seen: set[tuple[str, str, float]] = set()
    kept: list[Interaction] = []
    for row in sorted(rows, key=lambda r: r.source_order):
        if row.timestamp is not None:
            key = (row.user_id, row.item_id, row.timestamp)
            if key in seen:
                continue
            seen.add(key)
        kept.append(row)
    return kept, len(rows) - len(kept)


def count_tied(ordered: dict[str, list[Interaction]]) -> int:
    """Dated rows that share their user's timestamp with at least one other row."""
    tied = 0
    for seq in ordered.values():
        per_time = Counter(r.timestamp for r in seq if r.timestamp is not None)
        tied += sum(n for n in per_time.values() if n > 1)
    return tied


def sequences(rows: list[Interaction]) -> dict[str, list[Interaction]]:
    """Group by user (users sorted by id) and order each user's rows chronologically."""
    by_user: dict[str, list[Interaction]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row)
    return {user: sorted(by_user[user], key=order_key) for user in sorted(by_user)}


def split_labels(length: int) -> list[str]:
    """Split label per position of a chronologically ordered sequence of ``length`` rows."""
    if length <= 0:
        return []
    if length == 1:
        return [SPLIT_TEST]
    if length == 2:
        return [SPLIT_TRAIN, SPLIT_TEST]
    return [SPLIT_TRAIN] * (length - 2) + [SPLIT_VALID, SPLIT_TEST]


def kcore(rows: list[Interaction], k: int) -> list[Interaction]:
    """Iteratively drop users and items with fewer than ``k`` interactions."""
    if k <= 1:
        return rows
    while True:
        users = Counter(r.user_id for r in rows)
        items = Counter(r.item_id for r in rows)
        kept = [r for r in rows if users[r.user_id] >= k and items[r.item_id] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def sample_cold_items(item_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A reproducible sample of ``fraction`` of the given items (order-independent)."""
    if fraction <= 0 or not item_ids:
        return set()
    pool = sorted(set(item_ids))
    count = max(1, round(fraction * len(pool)))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=count, replace=False)
    return {pool[i] for i in sorted(picked.tolist())}


@dataclass(frozen=True)
class UserSplits:
    """``splits.parquet`` grouped per user: what both the generative tasks and the
    ID-only baselines read, so the two see exactly the same histories and targets."""

    train: dict[str, list[str]]  # user -> train items by position ('excluded' dropped)
    valid: dict[str, str]  # user -> validation item
    test: dict[str, str]  # user -> test item
    cold: frozenset[str]  # items of the cold-start holdout


def group_splits(
    user_ids: list[str],
    item_ids: list[str],
    positions: list[int],
    labels: list[str],
    cold_flags: list[bool],
) -> UserSplits:
    """Group the rows of ``splits.parquet`` (any order) per user, ordered by position."""
    order = sorted(range(len(user_ids)), key=lambda r: (user_ids[r], positions[r]))
    train: dict[str, list[str]] = {}
    valid: dict[str, str] = {}
    test: dict[str, str] = {}
    cold: set[str] = set()
    for r in order:
        user, item, label = user_ids[r], item_ids[r], labels[r]
        sequence = train.setdefault(user, [])
        if cold_flags[r]:
            cold.add(item)
        if label == SPLIT_TRAIN:
            sequence.append(item)
        elif label == SPLIT_VALID:
            valid[user] = item
        elif label == SPLIT_TEST:
            test[user] = item
    return UserSplits(train, valid, test, frozenset(cold))


# --------------------------------------------------------------------------------------
# the history before a target (one rule for training prompts, evaluation, baselines and
# `store recommend`)
# --------------------------------------------------------------------------------------
#: The split an evaluation reads its targets from.
EvalSplit = Literal["valid", "test"]

#: A user's items, oldest first: a list (item ids or rows) or a 1-D numpy array.
Items = TypeVar("Items", list[Any], np.ndarray)

T = TypeVar("T")


def history_before(sequence: Items, target: int, history_len: int | None) -> Items:
    """The at most ``history_len`` items of ``sequence`` right before position ``target``,
    oldest first (None: every item before it); of the same type as ``sequence``.

    The one truncation rule: a target at position 0 has an empty history, a shorter one
    than ``history_len`` is kept whole. ValueError when ``history_len`` < 1 or ``target``
    is outside ``0..len(sequence)`` (``len``: the target just past the end, i.e. the
    history of a next item not in ``sequence``).
    """
    if history_len is not None and history_len < 1:
        raise ValueError(f"history length must be >= 1, got {history_len}")
    if not 0 <= target <= len(sequence):
        raise ValueError(f"target position {target} outside 0..{len(sequence)}")
    start = 0 if history_len is None else max(0, target - history_len)
    return sequence[start:target]


def recent_history(history: Items, history_len: int | None) -> Items:
    """The last ``history_len`` items of ``history`` (the prompt of the item after it):
    :func:`history_before` with the target just past the end."""
    return history_before(history, len(history), history_len)


def split_history(train: Sequence[T], valid_target: T | None, split: EvalSplit) -> list[T]:
    """A user's whole history before their ``split`` target, oldest first: valid, the
    train sequence; test, the train sequence then the validation item (when there is
    one). ValueError for another split."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    history = list(train)
    if split == "test" and valid_target is not None:
        history.append(valid_target)
    return history


# --------------------------------------------------------------------------------------
# sampling users (one rule for validation, evaluation and the agreement sample)
# --------------------------------------------------------------------------------------
#: The seed :func:`store_core.evaluation.decode_split` samples test users with
#: (``evaluation.max_users``): fixed, so every system and training seed is scored on the
#: same users. Validation samples with the training seed (``recommender_train.seed``).
EVAL_SAMPLE_SEED = 0


def seeded_subset(count: int, limit: int | None, seed: int) -> list[int]:
    """Positions (ascending) of at most ``limit`` of ``count`` things (users, items), drawn
    without replacement by ``numpy.random.default_rng(seed)``; all of them when ``limit``
    is None or at least ``count``. The same (count, limit, seed) always give the same
    positions."""
    if limit is None or count <= limit:
        return list(range(count))
    picked = np.random.default_rng(seed).choice(count, size=limit, replace=False)
    return sorted(picked.tolist())
