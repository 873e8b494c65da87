"""Ingest on the real-world inputs of issue 15: time precision, duplicate interactions,
repeated ids and impossible cold-start holdouts, each with its right value."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from store_core.config import StoreConfig, validate_config
from store_core.errors import DataError
from store_core.ingest import run_ingest
from store_core.splits import sample_cold_items


def config(workspace: Path, src: Path, fmt: str, **data: Any) -> StoreConfig:
    return validate_config(
        {
            "workspace": str(workspace),
            "data": {"format": fmt, "path": str(src), **data},
            "tracking": {"enabled": False},
        }
    )


def splits_by_user(workspace: Path) -> dict[str, list[tuple[str, str]]]:
    by_user: dict[str, list[tuple[str, str]]] = {}
    rows = pq.read_table(workspace / "data" / "splits.parquet").to_pylist()
    for row in sorted(rows, key=lambda r: (r["user_id"], r["position"])):
        by_user.setdefault(row["user_id"], []).append((row["item_id"], row["split"]))
    return by_user


def manifest_counts(workspace: Path) -> dict[str, int]:
    manifest = json.loads((workspace / "data" / "manifest.json").read_text())
    counts: dict[str, int] = manifest["counts"]
    return counts


# --------------------------------------------------------------------------- 1. time


def recbole_source(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    (root / "shop.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + body)
    items = sorted({i for _, i, _ in rows})
    (root / "shop.item").write_text(
        "item_id:token\ttitle:token\n" + "".join(f"{i}\tItem {i}\n" for i in items)
    )
    return root


def test_fractional_seconds_order_the_split(workspace: Path, tmp_path: Path) -> None:
    rows = [
        ("U1", "I1", "1400000100.9"),
        ("U1", "I2", "1400000100.2"),
        ("U1", "I3", "1400000050.0"),
    ]
    result = run_ingest(config(workspace, recbole_source(tmp_path / "src", rows), "recbole"))
    assert splits_by_user(workspace)["U1"] == [("I3", "train"), ("I2", "valid"), ("I1", "test")]
    stamps = pq.read_table(workspace / "data" / "interactions.parquet")["timestamp"].to_pylist()
    assert stamps == [1400000050.0, 1400000100.2, 1400000100.9]
    assert result.counts["tied_timestamp"] == 0
    assert "fractions kept" in result.manifest["rules"]["order"]


def test_ties_break_by_source_position_and_are_counted(workspace: Path, tmp_path: Path) -> None:
    rows = [
        ("U1", "B", "7"),
        ("U1", "A", "7"),
        ("U1", "C", "3"),
        ("U2", "A", "7"),
        ("U2", "B", "8"),
    ]
    result = run_ingest(config(workspace, recbole_source(tmp_path / "src", rows), "recbole"))
    assert [i for i, _ in splits_by_user(workspace)["U1"]] == ["C", "B", "A"]
    assert result.counts["tied_timestamp"] == 2 == manifest_counts(workspace)["tied_timestamp"]


# --------------------------------------------------------------------------- 2. duplicates


def amazon_source(root: Path, reviews: list[tuple[str, str, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "reviews_Shop.json").write_text(
        "".join(
            json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t}) + "\n"
            for u, a, t in reviews
        )
    )
    asins = sorted({a for _, a, _ in reviews})
    (root / "meta_Shop.json").write_text(
        "".join(json.dumps({"asin": a, "title": f"Product {a}"}) + "\n" for a in asins)
    )
    return root


def test_exact_duplicates_are_dropped_counted_and_warned(
    workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reviews = [("A1", "P1", 1), ("A1", "P2", 2), ("A1", "P3", 3), ("A1", "P3", 3)]
    with caplog.at_level(logging.WARNING, logger="store_core.ingest"):
        result = run_ingest(config(workspace, amazon_source(tmp_path / "src", reviews), "amazon"))
    # P3 is the test item only; it is not also the validation item (its own prompt).
    assert splits_by_user(workspace)["A1"] == [("P1", "train"), ("P2", "valid"), ("P3", "test")]
    assert (
        result.counts["dropped_duplicate"] == 1 == manifest_counts(workspace)["dropped_duplicate"]
    )
    assert result.counts["interactions"] == 3
    assert any("1 exact duplicate" in r.getMessage() for r in caplog.records)
    assert "exact duplicates" in result.manifest["rules"]["duplicates"]


def test_duplicates_do_not_count_toward_kcore(workspace: Path, tmp_path: Path) -> None:
    reviews = [("A1", "P1", 1), ("A1", "P2", 2), ("A1", "P3", 3), ("A1", "P3", 3)]
    reviews += [("A2", "P1", 1), ("A2", "P2", 2)]
    src = amazon_source(tmp_path / "src", reviews)
    result = run_ingest(config(workspace, src, "amazon", kcore=2))
    assert result.counts["dropped_duplicate"] == 1
    # P3 has one real interaction: the 2-core drops it (with the duplicate it had two).
    items = pq.read_table(workspace / "data" / "items.parquet")["item_id"].to_pylist()
    assert items == ["P1", "P2"]


def test_same_item_at_different_times_is_kept(workspace: Path, tmp_path: Path) -> None:
    reviews = [("A1", "P1", 1), ("A1", "P2", 2), ("A1", "P1", 3)]
    result = run_ingest(config(workspace, amazon_source(tmp_path / "src", reviews), "amazon"))
    assert splits_by_user(workspace)["A1"] == [("P1", "train"), ("P2", "valid"), ("P1", "test")]
    assert result.counts["dropped_duplicate"] == 0


# --------------------------------------------------------------------------- 5. silent acceptance


def lcrec_source(root: Path, items_json: str, inters: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Shop.item.json").write_text(items_json)
    (root / "Shop.inter.json").write_text(json.dumps(inters))
    return root


INTERS = {"10": ["1", "2", "3", "4"], "11": ["2", "3"], "12": ["4"]}
ITEMS_JSON = (
    '{"1": {"title": "Beaker"}, "2": {"title": "Gloves"}, '
    '"3": {"title": "Multimeter"}, "4": {"title": "Caliper"}'
)


def test_lcrec_key_twice_with_different_text_is_refused(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_source(tmp_path / "src", ITEMS_JSON + ', "1": {"title": "Flask"}}', INTERS)
    with pytest.raises(DataError) as info:
        run_ingest(config(workspace, src, "lcrec", name="Shop"))
    assert info.value.field == "item_id"
    assert "duplicate item id '1' with different text" in str(info.value)
    assert not (workspace / "data").exists()


def test_lcrec_key_twice_with_same_text_is_merged(workspace: Path, tmp_path: Path) -> None:
    src = lcrec_source(tmp_path / "src", ITEMS_JSON + ', "1": {"title": "Beaker"}}', INTERS)
    assert run_ingest(config(workspace, src, "lcrec", name="Shop")).counts["items"] == 4


def test_cold_start_fraction_holding_out_every_item_is_refused(
    workspace: Path, tmp_path: Path
) -> None:
    src = lcrec_source(tmp_path / "src", ITEMS_JSON + "}", INTERS)
    cfg = config(workspace, src, "lcrec", name="Shop", cold_start_fraction=0.99)
    with pytest.raises(DataError) as info:
        run_ingest(cfg)
    assert info.value.field == "data.cold_start_fraction"
    assert "holds out all 4 items" in str(info.value)
    assert not (workspace / "data").exists()


def test_cold_start_leaving_no_train_target_is_refused(workspace: Path, tmp_path: Path) -> None:
    # User 10 is the only one with two train items (1, 2); hold out one of them.
    seed = next(s for s in range(1000) if sample_cold_items(list("1234"), 0.25, s) == {"1"})
    src = lcrec_source(tmp_path / "src", ITEMS_JSON + "}", INTERS)
    cfg = config(workspace, src, "lcrec", name="Shop", cold_start_fraction=0.25, seed=seed)
    with pytest.raises(DataError, match="no user has two train interactions left") as info:
        run_ingest(cfg)
    assert info.value.field == "data.cold_start_fraction"
    assert not (workspace / "data").exists()
