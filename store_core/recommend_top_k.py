"""Recommendation requests at inference (``store recommend``): the top-K items for a user
(or an ad-hoc history) from a trained Phase B checkpoint, always real items. (Phase B
training is :mod:`store_core.recommender_training`.)

Candidates are the current semantic-ID version in DuckDB when one exists (so items added
by the nightly job are recommendable), else the IDs stored with the checkpoint.

Requests are checked before any decoding (:func:`check_request`): ``k`` must be between
1 and :data:`MAX_K`, and the history must name at least one item. A ``k`` larger than the
catalogue returns the whole catalogue, ranked. The prompt holds the last ``history_len``
items (the checkpoint's setting), but ``exclude_history`` excludes the user's WHOLE
history, the rule of the evaluation's ``history_excluded_*`` metrics
(:meth:`store_core.tasks.TaskData.history`). It is applied inside decoding: the history
items are left out of the search for that request, so the beam search returns ``k``
items outside the history whenever the catalogue has that many, instead of filtering a
``k``-wide beam down to fewer. With ``recommender.cold_start_backoff`` > 0, items no
training sequence contains (e.g. added by the nightly job) are scored by the back-off of
:mod:`store_core.generate.cold_start` and merged into the beam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store_core import storage
from store_core.bundle import RecommenderBundle
from store_core.config import StoreConfig
from store_core.data_files import read_interactions, read_items, read_user_splits, trained_items
from store_core.errors import StoreError
from store_core.evaluation import with_cold_start_backoff, with_transition_memory
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.semantic_ids import format_sid
from store_core.splits import recent_history

#: The largest ``k`` a request may ask for. The beam is at least ``k`` wide and decoding
#: holds ``k x (L + 1)`` cache positions per request, so ``k`` is bounded by what stays
#: interactive on a CPU; to rank a whole catalogue use ``store evaluate`` or SQL.
MAX_K = 1000


@dataclass(frozen=True)
class Recommendation:
    """One recommended item. ``score``: the natural log of the item's probability under
    the model (the sum of its ID's token log-probabilities), or of the mixture with the
    transition memory when ``recommender.transition_memory_weight`` > 0."""

    rank: int
    item_id: str
    title: str | None
    score: float
    sid: str


def user_history(cfg: StoreConfig, user_id: str) -> list[str]:
    """All of a user's interactions in chronological order.

    Raises :class:`MissingInputError` before ``store ingest`` and :class:`StoreError` for
    a user without interactions."""
    table = read_interactions(
        cfg.data_dir, ["item_id", "position"], filters=[("user_id", "=", user_id)]
    )
    if table.num_rows == 0:
        raise StoreError(f"user '{user_id}' has no interactions in {cfg.data_dir}")
    order = np.argsort(np.asarray(table.column("position").to_pylist()))
    items: list[str] = table.column("item_id").to_pylist()
    return [items[i] for i in order]


def candidates(cfg: StoreConfig, bundle: RecommenderBundle) -> tuple[list[str], np.ndarray]:
    """(item ids, codes [N, L+1]) of the recommendable items."""
    db = cfg.duckdb_path
    if Path(db).exists() and storage.latest_version(db) is not None:
        table = storage.current_ids(db)
        rows = [
            (i, c)
            for i, c, v in zip(
                table.column("item_id").to_pylist(),
                table.column("codes").to_pylist(),
                table.column("codebook_version").to_pylist(),
                strict=True,
            )
            if v == bundle.codebook_version
        ]
        if rows:
            return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64)
    return bundle.semantic_ids.column("item_id").to_pylist(), bundle.codes()


def check_request(history: Sequence[str], k: int) -> None:
    """StoreError (one line) unless ``1 <= k <= MAX_K`` and ``history`` names an item."""
    if k < 1:
        raise StoreError(f"-k must be at least 1, got {k}")
    if k > MAX_K:
        raise StoreError(f"-k must be at most {MAX_K} (store_core.recommend_top_k.MAX_K), got {k}")
    if not any(item.strip() for item in history):
        raise StoreError("the history is empty: give at least one item id")


def recommend(
    cfg: StoreConfig,
    bundle: RecommenderBundle,
    history: Sequence[str],
    k: int = 10,
    *,
    exclude_history: bool = False,
) -> list[Recommendation]:
    """Top-``k`` items after ``history`` (oldest first) by constrained beam search.

    With ``exclude_history`` no item of the whole ``history`` is returned, and ``k``
    others are whenever the catalogue has them (fewer only when it has not): the history's
    items are left out inside the search (``constrained_beam_search(excluded=...)``, as
    the evaluation's history-excluded rule decodes), and under the checkpoint's
    ``id_normalization: trie`` the codes are normalized over the IDs left after the
    exclusion (what the user can still be shown). StoreError
    on an invalid request (:func:`check_request`) or an item without a semantic ID.
    """
    check_request(history, k)
    item_ids, codes = candidates(cfg, bundle)
    code_of = {item: row for item, row in zip(item_ids, codes.tolist(), strict=True)}
    unknown = [i for i in history if i not in code_of]
    if unknown:
        raise StoreError(f"items without a semantic ID: {', '.join(unknown[:5])}")
    history_len = bundle.trained(cfg).history_len
    recent = recent_history(list(history), history_len)
    prompt = bundle.builder.recommendation([code_of[i] for i in recent])
    row_of = {item: row for row, item in enumerate(item_ids)}
    excluded = sorted({row_of[i] for i in history}) if exclude_history else []
    k = min(k, len(item_ids) - len(excluded))
    if k == 0:
        return []
    result = constrained_beam_search(
        bundle.model,
        [prompt],
        SemanticIdTrie.from_codes(codes, bundle.level_ids),
        beam_size=max(cfg.recommender.beam_size, k),
        pad_token_id=bundle.builder.pad_token_id,
        normalization=bundle.trained(cfg).id_normalization,
        excluded=[excluded] if exclude_history else None,
    )
    if cfg.recommender.cold_start_backoff > 0:  # items no training sequence contains
        trained, skip = trained_items(cfg.data_dir), set(excluded)
        cold = [r for r, item in enumerate(item_ids) if item not in trained and r not in skip]
        result = with_cold_start_backoff(bundle, cfg, codes, cold, [prompt], result)
    if cfg.recommender.transition_memory_weight > 0:  # what the training sequences hold
        train = read_user_splits(cfg.data_dir).train
        result = with_transition_memory(
            cfg, train, item_ids, codes, [list(history)], result, exclude_history=exclude_history
        )
    titles = _titles(cfg)
    out: list[Recommendation] = []
    for slot in range(k):
        leaf = int(result.items[0, slot])
        if leaf < 0:
            break
        row = leaf  # a row of the catalogue: the trie holds every candidate
        item = item_ids[row]
        out.append(
            Recommendation(
                rank=len(out) + 1,
                item_id=item,
                title=titles.get(item),
                score=float(result.scores[0, slot]),
                sid=format_sid(codes[row].tolist()),
            )
        )
    return out


def _titles(cfg: StoreConfig) -> dict[str, str | None]:
    table = read_items(cfg.data_dir, ["item_id", "title"])
    return dict(
        zip(table.column("item_id").to_pylist(), table.column("title").to_pylist(), strict=True)
    )
