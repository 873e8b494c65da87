"""Nightly ID stability (issue 15, item 7): a delisted item restored with the same text
gets its stored ID back and both stages count it ``restored``; regenerating with the same
model keeps every unchanged ID; the disambiguation level never runs out silently."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from store_core import storage
from store_core.catalogue import tokenize_catalogue
from store_core.config import StoreConfig, load_config
from store_core.errors import StoreError
from store_core.ingest import run_ingest
from store_core.new_items import DisambiguationState, choose_ids
from store_core.recommender_training import recommender_dir
from tests.conftest import TINY_DATA, copy_workspace

CATEGORIES = ("new", "changed", "restored", "unchanged", "removed")


def config(ws: Path, data_path: Path = TINY_DATA) -> StoreConfig:
    return load_config(
        "tiny", [f"workspace={ws}", f"data.path={data_path}", "tracking.enabled=false"]
    )


def current(db: str) -> dict[str, tuple[str, str]]:
    table = storage.current_ids(db)
    sids, methods = table.column("sid").to_pylist(), table.column("method").to_pylist()
    return {
        item: (sid, method)
        for item, sid, method in zip(
            table.column("item_id").to_pylist(), sids, methods, strict=True
        )
    }


def write_catalogue(target: Path, drop: tuple[str, ...] = (), retitle: str | None = None) -> Path:
    """The tiny dataset without the items ``drop`` (nobody interacts with them), and with
    item ``retitle``'s title changed."""
    target.mkdir(parents=True, exist_ok=True)
    items = json.loads((TINY_DATA / "Tiny.item.json").read_text())
    inters = json.loads((TINY_DATA / "Tiny.inter.json").read_text())
    for item in drop:
        del items[item]
    inters = {u: [i for i in seq if i not in drop] for u, seq in inters.items()}
    if retitle is not None:
        items[retitle]["title"] += " (2nd edition)"
    (target / "Tiny.item.json").write_text(json.dumps(items))
    (target / "Tiny.inter.json").write_text(json.dumps(inters))
    return target


def nightly(cfg: StoreConfig) -> tuple[dict[str, int], dict[str, int], int | None]:
    """One nightly run (ingest, then tokenize-catalogue): (items-table counts, version
    counts, version written)."""
    ingest = run_ingest(cfg).catalog_changes
    outcome = tokenize_catalogue(cfg, recommender_dir(cfg))
    return ingest, outcome.counts, outcome.version


def test_delisted_item_restored_with_the_same_text_gets_its_id_back(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    assert tokenize_catalogue(config(ws), recommender_dir(config(ws))).version == 1
    before = current(config(ws).duckdb_path)

    # Night 1: items 47 and 46 delisted.
    ingest, tokenize, version = nightly(config(ws, write_catalogue(tmp_path / "n1", ("47", "46"))))
    expected = {"new": 0, "changed": 0, "restored": 0, "unchanged": 46, "removed": 2}
    assert {k: ingest[k] for k in CATEGORIES} == expected
    assert {k: tokenize[k] for k in CATEGORIES} == expected
    assert version == 2

    # Night 2: 47 back byte-identical, 46 back with another title.
    ingest, tokenize, version = nightly(config(ws, write_catalogue(tmp_path / "n2", retitle="46")))
    expected = {"new": 0, "changed": 1, "restored": 1, "unchanged": 46, "removed": 0}
    assert {k: ingest[k] for k in CATEGORIES} == expected  # the items table ...
    assert {k: tokenize[k] for k in CATEGORIES} == expected  # ... and the version agree
    assert version == 3
    assert tokenize["generated"] == 1  # only the changed item's ID is generated
    after = current(config(ws).duckdb_path)
    assert after["47"] == before["47"]  # the trained ID (method cluster) is back
    assert after["47"][1] == "cluster"
    assert after["46"][1] == "generated"
    assert all(after[i] == before[i] for i in before if i not in ("46", "47"))
    assert len({sid for sid, _ in after.values()}) == 48
    # The version row stores the same counts.
    _, rows = storage.query(
        config(ws).duckdb_path, "SELECT counts FROM semantic_id_versions WHERE version = 3"
    )
    assert json.loads(rows[0][0])["restored"] == 1
    # Nothing changed since: neither stage sees a change, no version is written.
    ingest, tokenize, version = nightly(config(ws, tmp_path / "n2"))
    assert ingest["unchanged"] == tokenize["unchanged"] == 48 and version is None


def test_ten_regenerate_runs_keep_every_unchanged_id(
    tiny_pipeline: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = config(ws)
    first = tokenize_catalogue(cfg, recommender_dir(cfg), mode="regenerate")
    ids = current(cfg.duckdb_path)
    assert {m for _, m in ids.values()} == {"generated"}
    assert len({s for s, _ in ids.values()}) == 48
    assert first.counts["unchanged"] == first.counts["generated"] == 48
    assert first.id_space is not None
    # A cluster ID whose prefix the model generates again is kept; the others move once.
    assert first.id_space.own_kept + first.counts["reassigned"] == 48
    assert first.id_space.taken == first.counts["reassigned"]
    codebook = storage.codebook_rows(cfg.duckdb_path)[0]["codebook_version"]
    issued_after_first = len(storage.issued_codes(cfg.duckdb_path, codebook))
    started = time.perf_counter()
    for run in range(2, 11):
        outcome = tokenize_catalogue(cfg, recommender_dir(cfg), mode="regenerate")
        assert outcome.version == run
        assert outcome.counts["unchanged"] == outcome.counts["generated"] == 48
        assert outcome.counts["reassigned"] == 0, f"run {run}"
        assert outcome.id_space is not None
        assert outcome.id_space.own_kept == 48 and outcome.id_space.taken == 0
        assert current(cfg.duckdb_path) == ids, f"run {run} moved an ID"
    logging.getLogger(__name__).info("9 regenerate runs in %.1f s", time.perf_counter() - started)
    # No code was issued after the first run.
    codebook = storage.codebook_rows(cfg.duckdb_path)[0]["codebook_version"]
    assert len(storage.issued_codes(cfg.duckdb_path, codebook)) == issued_after_first
    # Full or low prefixes are a warning with the counts, on every run (the tiny model
    # generates few distinct prefixes: 2 of them are full after the first run).
    assert outcome.id_space.full_prefixes > 0
    records = [r for r in caplog.records if "semantic-ID space" in r.getMessage()]
    assert len(records) == 10 and {r.levelno for r in records} == {logging.WARNING}
    warnings = [r.getMessage() for r in records]
    assert warnings[-1].endswith("0 codes taken this run, 48 items kept their own ID")
    assert f"{outcome.id_space.full_prefixes} of 48 cluster prefixes" in warnings[-1]


def test_disambiguation_codes_running_low_and_out_are_reported() -> None:
    # Last level of 4 codes; prefix (0, 0) has used 0..2, prefix (1, 1) nothing.
    state = DisambiguationState(np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2]]), last_size=4)
    report = state.report()
    assert (report.prefixes, report.full_prefixes, report.low_prefixes) == (1, 0, 1)
    assert report.pressure
    beams = np.array([[[0, 0], [1, 1]], [[0, 0], [1, 1]], [[0, 0], [0, 0]]])  # [P, B, L]
    scores = np.zeros((3, 2), dtype=np.float32)
    # "a" takes (0, 0)'s last code; "b" finds (0, 0) full and falls back to (1, 1).
    chosen = choose_ids(beams[:2], scores[:2], ["a", "b"], state)
    assert chosen.tolist() == [[0, 0, 3], [1, 1, 0]]
    report = state.report()
    assert (report.full_prefixes, report.fallbacks, report.taken) == (1, 1, 2)
    assert "1 of 2 cluster prefixes have used all 4 disambiguation codes" in report.describe()
    # An item that regenerates its own ID's prefix keeps its ID, even in a full prefix.
    own = choose_ids(beams[2:], scores[2:], ["c"], state, [(0, 0, 1)])
    assert own.tolist() == [[0, 0, 1]] and state.report().own_kept == 1
    # No prefix left: an error that names the item and gives the counts.
    with pytest.raises(StoreError, match=r"item d: .*1 of 2 cluster prefixes have used all"):
        choose_ids(beams[2:], scores[2:], ["d"], state)
