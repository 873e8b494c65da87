"""The library half of the scale-out (store_core.sharding), shards run in this process:
the shard plans cover every row once, and sharded catalogue tokenization / evaluation
decode give exactly what the in-process path gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from store_core import storage
from store_core.bundle import load_bundle
from store_core.catalogue import tokenize_catalogue
from store_core.config import load_config
from store_core.evaluation import evaluate_generative
from store_core.generate import SemanticIdTrie, constrained_beam_search
from store_core.recommender_training import recommender_dir
from store_core.sharding import ShardedBeams, ShardedSearch, cut_catalogue, cut_users, run_here
from tests.conftest import copy_workspace


def test_catalogue_shards_cover_every_batch_once_and_balance_the_work(tmp_path: Path) -> None:
    plan = [(8, list(range(8)))] * 5 + [(8, [])] * 2 + [(8, [1, 2])] + [(3, [0])]
    shards = cut_catalogue(
        plan, 4, items_path="i", checkpoint="c", eval_batch_size=4, directory=tmp_path
    )
    assert 2 <= len(shards) <= 4
    covered = [b for s in shards for b in range(s.first_batch, s.first_batch + len(s.batches))]
    with_work = [n for n, (_, todo) in enumerate(plan) if todo]
    assert set(with_work) <= set(covered) and len(covered) == len(set(covered))
    for shard in shards:  # the start row is the rows of every batch before the shard
        assert shard.start == sum(rows for rows, _ in plan[: shard.first_batch])
        end = shard.first_batch + len(shard.batches)
        assert list(shard.batches) == plan[shard.first_batch : end]
    assert [s.index for s in shards] == list(range(len(shards)))
    assert len({s.output for s in shards}) == len(shards)
    nothing = cut_catalogue(
        [(8, [])] * 3, 4, items_path="i", checkpoint="c", eval_batch_size=4, directory=tmp_path
    )
    assert nothing == []


def test_user_shards_are_whole_batches_of_the_length_order() -> None:
    prompts = [[1] * (1 + (i * 7) % 5) for i in range(23)]
    shards, rows = cut_users(prompts, 3, checkpoint="c", beam_size=2, batch_size=4)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert [i for chunk in rows for i in chunk] == order
    assert all(len(chunk) % 4 == 0 for chunk in rows[:-1])
    assert len(shards) == 3
    assert [s.prompts for s in shards] == [[prompts[i] for i in chunk] for chunk in rows]
    assert all(s.excluded is None for s in shards)
    excluded = [[i, i + 100] for i in range(len(prompts))]
    shards, rows = cut_users(
        prompts, 3, checkpoint="c", beam_size=2, batch_size=4, excluded=excluded
    )
    assert [s.excluded for s in shards] == [[excluded[i] for i in chunk] for chunk in rows]


@pytest.fixture
def tiny_copy(tiny_pipeline: Path, tmp_path: Path) -> Path:
    return copy_workspace(tiny_pipeline, tmp_path / "ws")


def _ids(db: str) -> pa.Table:
    table = storage.current_ids(db).sort_by("item_id")
    return table.select(["item_id", "codes", "sid", "packed", "method", "active"])


def test_sharded_catalogue_in_process_writes_the_same_ids(tiny_copy: Path, tmp_path: Path) -> None:
    other = copy_workspace(tiny_copy, tmp_path / "ws-sharded")
    tables, counts = [], []
    for workspace, sharded in ((tiny_copy, False), (other, True)):
        cfg = load_config("tiny", [f"workspace={workspace}", "tracking.enabled=false"])
        checkpoint = recommender_dir(cfg)
        remote = ShardedBeams(run_here, cfg, checkpoint, 4) if sharded else None
        outcome = tokenize_catalogue(
            cfg, checkpoint, mode="regenerate", batch_size=8, remote=remote
        )
        if remote is not None:
            assert len(remote.reports) == 4
            assert sum(r.generated for r in remote.reports) == 48
        tables.append(_ids(cfg.duckdb_path))
        counts.append(outcome.counts)
        assert not (workspace / ".catalogue-staging").exists()
    assert tables[0].num_rows == 48
    assert tables[0].equals(tables[1])
    assert counts[0] == counts[1]


def test_sharded_search_gives_the_beams_and_metrics_of_one_search(tiny_pipeline: Path) -> None:
    cfg = load_config(
        "tiny",
        [f"workspace={tiny_pipeline}", "tracking.enabled=false", "recommender.eval_batch_size=4"],
    )
    bundle = load_bundle(recommender_dir(cfg))
    search = ShardedSearch(run_here, 5)
    prompts = [bundle.builder.recommendation([c]) for c in bundle.codes().tolist()[:11]]
    prompts += [bundle.builder.recommendation(bundle.codes().tolist()[3:7])] * 6
    trie = SemanticIdTrie.from_codes(bundle.codes(), bundle.level_ids)
    # per-prompt excluded items travel with their prompts to the shards
    excluded = [[*range(i % 7), i] for i in range(len(prompts))]
    for rows in (None, excluded):
        one = constrained_beam_search(
            bundle.model,
            prompts,
            trie,
            beam_size=cfg.recommender.beam_size,
            pad_token_id=bundle.builder.pad_token_id,
            batch_size=4,
            excluded=rows,
        )
        sharded = search(bundle, prompts, cfg, rows)
        assert len(search.reports) == 5
        np.testing.assert_array_equal(sharded.codes, one.codes)
        np.testing.assert_array_equal(sharded.scores, one.scores)
        np.testing.assert_array_equal(sharded.items, one.items)
    assert not any(set(e) & set(r) for e, r in zip(excluded, sharded.items.tolist(), strict=True))
    here = evaluate_generative(bundle, cfg, system="store", progress=False)
    there = evaluate_generative(bundle, cfg, system="store", progress=False, search=search)
    assert here.metrics == there.metrics
    assert here.metrics["users"] > 8
