"""Whole-catalogue tokenization into DuckDB versions, including the nightly semantics."""

from __future__ import annotations

from pathlib import Path

from store_core import storage
from store_core.catalogue import tokenize_catalogue
from store_core.config import StoreConfig, load_config
from store_core.ingest import run_ingest
from store_core.recommender_training import recommender_dir
from tests.conftest import TINY_DATA, copy_workspace, write_changed_catalogue


def config(ws: Path, data_path: Path = TINY_DATA) -> StoreConfig:
    return load_config(
        "tiny", [f"workspace={ws}", f"data.path={data_path}", "tracking.enabled=false"]
    )


def current(db: str) -> dict[str, tuple[str, str]]:
    table = storage.current_ids(db)
    return {
        i: (s, m)
        for i, s, m in zip(
            table.column("item_id").to_pylist(),
            table.column("sid").to_pylist(),
            table.column("method").to_pylist(),
            strict=True,
        )
    }


def test_first_version_keeps_the_trained_ids(tiny_pipeline: Path, tmp_path: Path) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = config(ws)
    outcome = tokenize_catalogue(cfg, recommender_dir(cfg))
    assert outcome.version == 1
    assert outcome.counts["unchanged"] == 48 and outcome.counts["generated"] == 0
    ids = current(cfg.duckdb_path)
    assert len(ids) == 48 and len({s for s, _ in ids.values()}) == 48
    assert {m for _, m in ids.values()} == {"cluster"}
    codebook = storage.codebook_rows(cfg.duckdb_path)[0]
    assert 0.0 <= codebook["collision_rate"] <= 1.0  # Phase A stats travel with the codebook
    # Everyday SQL through the macros, read-only.
    item, (sid, _) = next(iter(sorted(ids.items())))
    _, rows = storage.query(cfg.duckdb_path, f"SELECT sid_of('{item}'), item_of('{sid}')")
    assert rows == [(sid, item)]
    # Nothing changed: a second run writes no version.
    again = tokenize_catalogue(cfg, recommender_dir(cfg))
    assert again.version is None
    assert storage.latest_version(cfg.duckdb_path) == 1


def test_nightly_semantics_new_changed_removed(tiny_pipeline: Path, tmp_path: Path) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    first = tokenize_catalogue(config(ws), recommender_dir(config(ws)))
    assert first.version == 1
    before = current(config(ws).duckdb_path)

    src = write_changed_catalogue(tmp_path / "src")
    cfg = config(ws, src)
    run_ingest(cfg)
    outcome = tokenize_catalogue(cfg, recommender_dir(cfg))
    assert outcome.version == 2
    assert {k: outcome.counts[k] for k in ("new", "changed", "removed", "unchanged")} == {
        "new": 3,
        "changed": 2,
        "removed": 1,
        "unchanged": 45,
    }
    after = current(cfg.duckdb_path)
    untouched = set(before) - {"0", "1", "47"}
    assert all(after[i] == before[i] for i in untouched)
    assert "47" not in after  # inactive rows are not in the current view
    for item in ("new0", "new1", "new2", "0", "1"):
        assert after[item][1] == "generated"
    sids = [s for s, _ in after.values()]
    assert len(sids) == len(set(sids)) == 50
    # Removed items stay as inactive rows of the new version.
    _, rows = storage.query(
        cfg.duckdb_path, "SELECT active FROM semantic_ids WHERE version = 2 AND item_id = '47'"
    )
    assert rows == [(False,)]
    # A second nightly run with no catalogue change writes nothing.
    assert tokenize_catalogue(cfg, recommender_dir(cfg)).version is None
    assert storage.latest_version(cfg.duckdb_path) == 2


def test_regenerate_mode_generates_every_id(tiny_pipeline: Path, tmp_path: Path) -> None:
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = config(ws)
    outcome = tokenize_catalogue(cfg, recommender_dir(cfg), mode="regenerate", batch_size=16)
    assert outcome.counts["generated"] == 48
    ids = current(cfg.duckdb_path)
    assert {m for _, m in ids.values()} == {"generated"}
    assert len({s for s, _ in ids.values()}) == 48
