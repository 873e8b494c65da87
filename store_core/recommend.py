"""``store recommend``: top-K items for a user (or an ad-hoc history), always real items.

Candidates are the current semantic-ID version in DuckDB when one exists (so items added
by the nightly job are recommendable), else the IDs stored with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from store_core import storage
from store_core.bundle import RecommenderBundle
from store_core.config import StoreConfig
from store_core.errors import StoreError
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.ingest import INTERACTIONS_FILE, ITEMS_FILE
from store_core.semantic_ids import format_sid


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_id: str
    title: str | None
    score: float
    sid: str


def user_history(cfg: StoreConfig, user_id: str) -> list[str]:
    """All of a user's interactions in chronological order."""
    table = pq.read_table(
        Path(cfg.data_dir) / INTERACTIONS_FILE, filters=[("user_id", "=", user_id)]
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


def recommend(
    cfg: StoreConfig,
    bundle: RecommenderBundle,
    history: Sequence[str],
    k: int = 10,
    *,
    exclude_history: bool = False,
) -> list[Recommendation]:
    """Top-``k`` items after ``history`` by constrained beam search."""
    item_ids, codes = candidates(cfg, bundle)
    code_of = {item: row for item, row in zip(item_ids, codes.tolist(), strict=True)}
    unknown = [i for i in history if i not in code_of]
    if unknown:
        raise StoreError(f"items without a semantic ID: {', '.join(unknown[:5])}")
    recent = list(history)[-cfg.recommender.history_len :]
    prompt = bundle.builder.recommendation([code_of[i] for i in recent])
    beam = max(cfg.recommender.beam_size, k + (len(recent) if exclude_history else 0))
    result = constrained_beam_search(
        bundle.model,
        [prompt],
        SemanticIdTrie.from_codes(codes, bundle.level_ids),
        beam_size=beam,
        pad_token_id=bundle.builder.pad_token_id,
    )
    titles = _titles(cfg)
    seen = set(recent) if exclude_history else set()
    out: list[Recommendation] = []
    for b in range(beam):
        row = int(result.items[0, b])
        if row < 0 or item_ids[row] in seen:
            continue
        item = item_ids[row]
        out.append(
            Recommendation(
                rank=len(out) + 1,
                item_id=item,
                title=titles.get(item),
                score=float(result.scores[0, b]),
                sid=format_sid(codes[row].tolist()),
            )
        )
        if len(out) == k:
            break
    return out


def _titles(cfg: StoreConfig) -> dict[str, str | None]:
    table = pq.read_table(Path(cfg.data_dir) / ITEMS_FILE, columns=["item_id", "title"])
    return dict(
        zip(table.column("item_id").to_pylist(), table.column("title").to_pylist(), strict=True)
    )
