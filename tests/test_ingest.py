from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from store_core.config import StoreConfig, load_config, validate_config
from store_core.errors import DataError
from store_core.ingest import run_ingest
from store_core.storage import query
from tests.conftest import shared_dataset


def lcrec_dir(root: Path, items: dict[str, Any], inters: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Shop.item.json").write_text(json.dumps(items))
    (root / "Shop.inter.json").write_text(json.dumps(inters))
    return root


def config_for(workspace: Path, path: str, **data: Any) -> StoreConfig:
    return validate_config(
        {
            "workspace": str(workspace),
            "data": {"format": "lcrec", "path": path, "name": "Shop", **data},
            "tracking": {"enabled": False},
        }
    )


ITEMS = {
    "1": {"title": "Beaker", "brand": "Acme", "categories": "Lab"},
    "2": {"title": "Gloves", "brand": "Safe", "categories": "Safety"},
    "3": {"title": "Multimeter", "brand": "Volt", "categories": "Electronics"},
    "4": {"title": "Caliper", "brand": "Meas", "categories": "Measurement"},
}
INTERS = {"10": ["1", "2", "3", "4"], "11": ["2", "3"], "12": ["4"]}


def leftovers(workspace: Path) -> list[str]:
    """Anything a failed run left in the workspace (staging dirs, partial data)."""
    if not workspace.exists():
        return []
    return sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*"))


def test_small_lcrec_ingest_writes_every_output(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", ITEMS, INTERS)
    result = run_ingest(config_for(workspace, str(src)))
    data = workspace / "data"
    assert sorted(p.name for p in data.iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "manifest.json",
        "splits.parquet",
    ]
    items = pq.read_table(data / "items.parquet").to_pylist()
    assert [i["item_id"] for i in items] == ["1", "2", "3", "4"]
    assert items[0]["title"] == "Beaker"
    assert items[0]["fields"] == [("title", "Beaker"), ("brand", "Acme"), ("categories", "Lab")]
    assert items[0]["text"] == "title: Beaker; brand: Acme; categories: Lab"
    assert len(items[0]["content_hash"]) == 64

    splits = pq.read_table(data / "splits.parquet").to_pylist()
    by_user: dict[str, list[tuple[str, str]]] = {}
    for row in splits:
        by_user.setdefault(row["user_id"], []).append((row["item_id"], row["split"]))
    assert by_user["10"] == [("1", "train"), ("2", "train"), ("3", "valid"), ("4", "test")]
    assert by_user["11"] == [("2", "train"), ("3", "test")]
    assert by_user["12"] == [("4", "test")]

    inter = pq.read_table(data / "interactions.parquet").to_pylist()
    assert inter[0] == {"user_id": "10", "item_id": "1", "timestamp": None, "position": 0}

    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"]["users"] == 3
    assert manifest["counts"]["interactions"] == 7
    assert manifest["counts"]["test"] == 3
    assert "source position" in manifest["rules"]["order"]
    assert set(manifest["outputs"]) == {"items.parquet", "interactions.parquet", "splits.parquet"}
    assert len(manifest["inputs"]) == 2
    assert result.catalog_changes == {
        "new": 4,
        "changed": 0,
        "restored": 0,
        "unchanged": 0,
        "removed": 0,
    }


def test_memory_filesystem_source(workspace: Path, clean_memory_fs: None) -> None:
    with fsspec.open("memory://src/Shop.item.json", "w") as f:
        f.write(json.dumps(ITEMS))
    with fsspec.open("memory://src/Shop.inter.json", "w") as f:
        f.write(json.dumps(INTERS))
    result = run_ingest(config_for(workspace, "memory://src"))
    assert result.counts["items"] == 4
    assert result.counts["interactions"] == 7


def test_memory_filesystem_workspace_for_parquet(clean_memory_fs: None, tmp_path: Path) -> None:
    """Parquet outputs go through fsspec too; only DuckDB must be local."""
    src = lcrec_dir(tmp_path / "src", ITEMS, INTERS)
    cfg = config_for(tmp_path / "ws", str(src)).model_copy(update={"workspace": "memory://ws"})
    with pytest.raises(Exception, match="local filesystem"):
        run_ingest(cfg)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/ws/data/items.parquet")


def test_reingest_is_idempotent_and_tracks_changes(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", ITEMS, INTERS)
    cfg = config_for(workspace, str(src))
    first = run_ingest(cfg)
    db = str(workspace / "store.duckdb")
    before = query(db, "SELECT * FROM items ORDER BY item_id")[1]
    second = run_ingest(cfg)
    assert second.manifest["outputs"] == first.manifest["outputs"]
    assert second.catalog_changes == {
        "new": 0,
        "changed": 0,
        "restored": 0,
        "unchanged": 4,
        "removed": 0,
    }
    assert query(db, "SELECT * FROM items ORDER BY item_id")[1] == before

    changed = dict(ITEMS)
    changed["2"] = {"title": "Gloves XL", "brand": "Safe", "categories": "Safety"}
    del changed["4"]
    changed["5"] = {"title": "Funnel"}
    lcrec_dir(src, changed, {"10": ["1", "2", "3", "5"], "11": ["2", "3"]})
    third = run_ingest(cfg)
    assert third.catalog_changes == {
        "new": 1,
        "changed": 1,
        "restored": 0,
        "unchanged": 2,
        "removed": 1,
    }
    rows = dict(query(db, "SELECT item_id, title FROM items WHERE active")[1])
    assert rows == {"1": "Beaker", "2": "Gloves XL", "3": "Multimeter", "5": "Funnel"}
    inactive = query(db, "SELECT item_id FROM items WHERE NOT active")[1]
    assert inactive == [("4",)]
    old_hash = {r[0]: r[4] for r in before}
    new_hash = dict(query(db, "SELECT item_id, content_hash FROM items")[1])
    assert new_hash["1"] == old_hash["1"]
    assert new_hash["2"] != old_hash["2"]


def test_missing_items_drop_is_counted(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", ITEMS, {"10": ["1", "99", "2"]})
    result = run_ingest(config_for(workspace, str(src)))
    assert result.counts["dropped_missing_item"] == 1
    assert result.manifest["counts"]["dropped_missing_item"] == 1
    assert result.counts["interactions"] == 2


def test_missing_items_fail_names_file_record_field(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", ITEMS, {"10": ["1", "99", "2"]})
    with pytest.raises(DataError) as info:
        run_ingest(config_for(workspace, str(src), missing_items="fail"))
    message = str(info.value)
    assert "Shop.inter.json" in message and "'99'" in message and "item_id" in message
    assert info.value.record is not None
    assert leftovers(workspace) == []


def test_duplicate_item_with_different_text_fails(workspace: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Shop.item.json").write_text(
        '{"1": {"title": "Beaker"}, "2": {"title": "Flask"}, "1": {"title": "Other"}}'
    )
    (src / "Shop.inter.json").write_text(json.dumps({"10": ["1", "2"]}))
    # JSON objects cannot hold a key twice; use the tabular format for a real duplicate.
    (src / "items.csv").write_text("item_id,title\n1,Beaker\n2,Flask\n1,Other\n1,Beaker\n")
    (src / "interactions.csv").write_text("user_id,item_id,timestamp\n10,1,5\n10,2,6\n")
    cfg = validate_config(
        {
            "workspace": str(workspace),
            "data": {"format": "tabular", "path": str(src)},
            "tracking": {"enabled": False},
        }
    )
    with pytest.raises(DataError) as info:
        run_ingest(cfg)
    message = str(info.value)
    assert "items.csv" in message and "duplicate item id '1'" in message
    assert info.value.field == "item_id"
    assert leftovers(workspace) == []


def test_duplicate_item_with_same_text_is_merged(workspace: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_text("item_id,title\n1,Beaker\n2,Flask\n1,Beaker\n")
    (src / "interactions.csv").write_text("user_id,item_id,timestamp\n10,1,5\n10,2,6\n")
    cfg = validate_config(
        {
            "workspace": str(workspace),
            "data": {"format": "tabular", "path": str(src)},
            "tracking": {"enabled": False},
        }
    )
    assert run_ingest(cfg).counts["items"] == 2


def test_empty_catalogue_fails(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", {}, {"10": ["1"]})
    with pytest.raises(DataError, match="catalogue is empty") as info:
        run_ingest(config_for(workspace, str(src)))
    assert "Shop.item.json" in str(info.value)
    assert leftovers(workspace) == []


def test_missing_file_fails_cleanly(workspace: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Shop.inter.json").write_text(json.dumps(INTERS))
    with pytest.raises(DataError) as info:
        run_ingest(config_for(workspace, str(src)))
    assert "Shop.item.json" in str(info.value)
    assert leftovers(workspace) == []


def test_malformed_line_fails_with_line_number(workspace: Path, tmp_path: Path) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "u.item").write_bytes(
        b"1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    )
    (src / "u.data").write_text("1\t1\t5\t881250949\n2\t1\tfive\tnot-a-time\n")
    cfg = validate_config(
        {
            "workspace": str(workspace),
            "data": {"format": "movielens", "path": str(src)},
            "tracking": {"enabled": False},
        }
    )
    with pytest.raises(DataError) as info:
        run_ingest(cfg)
    assert "u.data" in str(info.value) and "line 2" in str(info.value)
    assert leftovers(workspace) == []


def test_bad_encoding_fails_cleanly(workspace: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Shop.item.json").write_bytes(b'{"1": {"title": "Bad \xff\xfe byte"}}')
    (src / "Shop.inter.json").write_text(json.dumps({"10": ["1"]}))
    with pytest.raises(DataError) as info:
        run_ingest(config_for(workspace, str(src)))
    assert "Shop.item.json" in str(info.value)
    assert leftovers(workspace) == []


def test_failed_reingest_keeps_previous_outputs(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", ITEMS, INTERS)
    cfg = config_for(workspace, str(src))
    first = run_ingest(cfg)
    (src / "Shop.item.json").write_text("{not json")
    with pytest.raises(DataError):
        run_ingest(cfg)
    manifest = json.loads((workspace / "data" / "manifest.json").read_text())
    assert manifest["outputs"] == first.manifest["outputs"]
    assert not [p for p in workspace.iterdir() if "staging" in p.name]


def test_cold_start_holdout(workspace: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "tiny",
        [f"workspace={workspace}", "data.cold_start_fraction=0.25", "tracking.enabled=false"],
    )
    result = run_ingest(cfg)
    cold = set(
        pq.read_table(workspace / "data" / "cold_start_items.parquet")["item_id"].to_pylist()
    )
    assert len(cold) == result.counts["cold_start_items"] == 12
    splits = pq.read_table(workspace / "data" / "splits.parquet").to_pylist()
    for row in splits:
        assert row["cold_start"] == (row["item_id"] in cold)
        if row["item_id"] in cold:
            assert row["split"] in {"test", "excluded"}
    assert result.counts["excluded_cold_start"] == sum(r["split"] == "excluded" for r in splits)
    assert result.counts["cold_start_test_users"] > 0


def test_kcore_filter_restricts_catalogue(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_dir(tmp_path / "src", ITEMS, {"a": ["1", "2"], "b": ["1", "2"], "c": ["3"]})
    result = run_ingest(config_for(workspace, str(src), kcore=2))
    assert result.counts["items"] == 2
    assert result.counts["dropped_kcore"] == 1
    assert result.counts["users"] == 2


def check_split(workspace: Path, users: int) -> None:
    splits = pq.read_table(workspace / "data" / "splits.parquet")
    tests = [r for r in splits.to_pylist() if r["split"] == "test"]
    assert len(tests) == users
    assert len({r["user_id"] for r in tests}) == users


def test_ml100k_counts_split_and_determinism(tmp_path: Path) -> None:
    path = shared_dataset("ml-100k")
    ws = tmp_path / "ws"
    cfg = load_config(
        None,
        [
            f"workspace={ws}",
            "data.dataset=null",
            "data.format=movielens",
            f"data.path={path}",
            "tracking.enabled=false",
        ],
    )
    first = run_ingest(cfg)
    assert first.counts["users"] == 943
    assert first.counts["items"] == 1682
    assert first.counts["interactions"] == 100_000
    assert first.counts["test"] == 943 and first.counts["valid"] == 943
    check_split(ws, 943)
    items = pq.read_table(ws / "data" / "items.parquet")
    row = next(r for r in items.to_pylist() if r["item_id"] == "1")
    assert row["text"] == (
        "title: Toy Story (1995); release date: 01-Jan-1995; genres: Animation, Children's, Comedy"
    )
    # Ties (same user, same second) follow the source order: positions are a permutation
    # consistent with timestamps.
    inter = pq.read_table(ws / "data" / "interactions.parquet").to_pylist()
    user = [r for r in inter if r["user_id"] == "1"]
    assert [r["position"] for r in user] == list(range(len(user)))
    assert all(a["timestamp"] <= b["timestamp"] for a, b in itertools.pairwise(user))
    second = run_ingest(cfg)
    assert second.manifest["outputs"] == first.manifest["outputs"]


def test_scientific_counts(tmp_path: Path) -> None:
    shared_dataset("scientific")
    ws = tmp_path / "ws"
    cfg = load_config("scientific", [f"workspace={ws}", "tracking.enabled=false"])
    result = run_ingest(cfg)
    assert result.counts["users"] == 8317
    assert result.counts["items"] == 4344
    assert result.counts["interactions"] == 58_492
    check_split(ws, 8317)
    assert query(str(ws / "store.duckdb"), "SELECT count(*) FROM items")[1] == [(4344,)]
