"""The checkpoint contract (store_core.checkpoint): one owner of the file names, typed and
versioned metadata, older checkpoints, Phase B's own stats, the registry record and the
one semantic-ID row."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store_core import checkpoint as ckpt
from store_core import storage
from store_core.bundle import load_bundle
from store_core.catalogue import _codebook_row
from store_core.config import load_config
from store_core.errors import StoreError
from store_core.item_tokenizer import checkpoint_dir
from store_core.recommender_training import recommender_dir
from store_core.schemas import SEMANTIC_ID_ROW_SCHEMA
from tests.conftest import REPO, copy_workspace

#: Every checkpoint file name -> the one module that may spell it.
OWNERS = {
    ckpt.METADATA_FILE: "store_core/checkpoint.py",
    ckpt.STATS_FILE: "store_core/checkpoint.py",
    ckpt.SEMANTIC_IDS_FILE: "store_core/checkpoint.py",
    ckpt.USAGE_PLOT: "store_core/checkpoint.py",
    ckpt.METRICS_FILE: "store_core/checkpoint.py",
    ckpt.LEGACY_MODEL_VERSION_FILE: "store_core/checkpoint.py",
    "codebook.safetensors": "store_core/quantizer.py",
    "codebook.json": "store_core/quantizer.py",
    "complete.json": "store_core/training_checkpoints.py",
}


def _sources() -> list[Path]:
    return sorted(
        p for top in ("store_core", "flows", "benchmarks") for p in (REPO / top).rglob("*.py")
    )


def test_each_checkpoint_file_name_is_defined_in_one_module() -> None:
    """`grep` for a checkpoint file name finds its one definition: as a string literal it
    appears in its owner module only (docstrings and comments may mention it)."""
    found: dict[str, set[str]] = {name: set() for name in OWNERS}
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for name in OWNERS:
            if re.search(rf"[\"']{re.escape(name)}[\"']", text):
                found[name].add(str(path.relative_to(REPO)))
    assert found == {name: {owner} for name, owner in OWNERS.items()}


def test_no_module_reads_checkpoint_metadata_but_the_owner() -> None:
    """Metadata is read as the typed model from store_core.checkpoint only: no other module
    builds a path to the metadata file or indexes metadata by string key."""
    offenders = []
    for path in _sources():
        if path.name == "checkpoint.py":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"/ (ckpt\.)?METADATA_FILE|\bmetadata\[|\bmetadata\.get\(", text):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


@pytest.fixture
def phase_b(tiny_pipeline: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(Phase A dir, Phase B dir) of a copy of the tiny workspace."""
    ws = copy_workspace(tiny_pipeline, tmp_path / "ws")
    cfg = load_config("tiny", [f"workspace={ws}", "tracking.enabled=false"])
    return Path(checkpoint_dir(cfg)), Path(recommender_dir(cfg))


def test_metadata_is_typed_versioned_and_phase_b_owns_its_stats(
    phase_b: tuple[Path, Path],
) -> None:
    phase_a, rec = phase_b
    meta = ckpt.read_recommender_metadata(rec)
    assert meta.format_version == ckpt.FORMAT_VERSION == 3
    assert (meta.history_len, meta.max_text_tokens, meta.cluster_levels) == (5, 32, 3)
    assert meta.checkpoint_id == ckpt.weights_id(rec)  # the same weights, the same id
    assert ckpt.read_tokenizer_metadata(phase_a).codebook_version == meta.codebook_version
    # Phase B keeps its own copy of the clustering's stats: the Phase A directory can go.
    stats = json.loads((phase_a / ckpt.STATS_FILE).read_text())
    shutil.rmtree(phase_a)
    assert ckpt.read_stats(rec) == stats
    bundle = load_bundle(str(rec))
    row = _codebook_row(bundle, None)
    assert row["collision_rate"] == stats["collision_rate"]
    assert row["level_sizes"] == meta.level_sizes


def _legacy(rec: Path) -> None:
    """Rewrite ``rec`` as main wrote it before format_version: no version, no
    checkpoint_id, ``num_levels`` for L, no stats copy, the registry record inside the
    directory."""
    raw = json.loads((rec / ckpt.METADATA_FILE).read_text())
    del raw["format_version"], raw["checkpoint_id"]
    raw["num_levels"] = raw.pop("cluster_levels")
    (rec / ckpt.METADATA_FILE).write_text(json.dumps(raw, indent=2))
    (rec / ckpt.STATS_FILE).unlink()
    record = {"name": "m", "version": "3", "run_id": "r", "source": "s", "uri": "models:/m/3"}
    (rec / ckpt.LEGACY_MODEL_VERSION_FILE).write_text(json.dumps(record))


def test_a_checkpoint_without_format_version_still_loads(phase_b: tuple[Path, Path]) -> None:
    phase_a, rec = phase_b
    _legacy(rec)
    meta = ckpt.read_recommender_metadata(rec)
    assert meta.format_version == 1 and meta.checkpoint_id is None
    # Its stats are where format 1 kept them: in the Phase A directory it names.
    assert ckpt.read_stats(rec) == json.loads((phase_a / ckpt.STATS_FILE).read_text())
    registered = ckpt.read_model_version(rec)
    assert registered is not None and registered.uri == "models:/m/3"
    assert load_bundle(str(rec)).metadata.history_len == 5
    assert meta.cluster_levels == 3  # read from the old name


#: A Phase A ``metadata.json`` as format 2 wrote it (L under its old name).
FORMAT_2_PHASE_A = {
    "format_version": 2,
    "codebook_version": "0123456789abcdef",
    "quantizer": "store",
    "last_level_assignment": "capacity",
    "last_level_capacity": 1,
    "num_levels": 4,
    "codebook_size": 16,
    "disambiguation_size": 2,
    "data_manifest_items_sha256": "ab" * 32,
    "training_hash": "0123456789ab",
    "backbone": "built-from-config",
    "max_text_tokens": 32,
    "pack_bits": 12,
}


def test_format_2_metadata_loads_with_num_levels_as_cluster_levels(tmp_path: Path) -> None:
    (tmp_path / ckpt.METADATA_FILE).write_text(json.dumps(FORMAT_2_PHASE_A))
    meta = ckpt.read_tokenizer_metadata(tmp_path)
    assert (meta.format_version, meta.cluster_levels, meta.codebook_size) == (2, 4, 16)
    # Written again, it is format 3 and says cluster_levels.
    ckpt.write_metadata(tmp_path, meta.model_copy(update={"format_version": 3}))
    raw = json.loads((tmp_path / ckpt.METADATA_FILE).read_text())
    assert raw["cluster_levels"] == 4 and "num_levels" not in raw
    # Format 3 with the old name only is not silently accepted.
    (tmp_path / ckpt.METADATA_FILE).write_text(
        json.dumps({**FORMAT_2_PHASE_A, "format_version": 3})
    )
    with pytest.raises(StoreError, match=r"field 'cluster_levels'.*retrain"):
        ckpt.read_tokenizer_metadata(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.pop("history_len"), r"field 'history_len'.*retrain with `store train`"),
        (lambda raw: raw.update(format_version=99), r"format 99 is newer.*retrain"),
        (lambda raw: raw.update(cluster_levels="three"), r"field 'cluster_levels'.*retrain"),
    ],
)
def test_unreadable_metadata_fails_with_one_line_saying_retrain(
    phase_b: tuple[Path, Path], edit: object, message: str
) -> None:
    _, rec = phase_b
    raw = json.loads((rec / ckpt.METADATA_FILE).read_text())
    edit(raw)  # type: ignore[operator]
    (rec / ckpt.METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(StoreError, match=message) as info:
        load_bundle(str(rec))
    assert "\n" not in str(info.value) and str(rec) in str(info.value)


def test_phase_a_checkpoint_is_not_a_recommender(phase_b: tuple[Path, Path]) -> None:
    phase_a, _ = phase_b
    with pytest.raises(StoreError, match="is a Phase A checkpoint"):
        ckpt.read_recommender_metadata(phase_a)
    with pytest.raises(StoreError, match="not a trained recommender"):
        ckpt.read_recommender_metadata(phase_a.parent / "nothing-here")


def test_registry_record_lives_next_to_the_checkpoint_and_follows_its_weights(
    phase_b: tuple[Path, Path],
) -> None:
    _, rec = phase_b
    meta = ckpt.read_recommender_metadata(rec)
    record = ckpt.RegisteredVersion(
        "m", "1", "run", "src", "models:/m/1", {"codebook_version": "x"}, meta.checkpoint_id
    )
    ckpt.write_model_version(rec, record)
    assert not (rec / ckpt.LEGACY_MODEL_VERSION_FILE).exists()  # nothing in the library's dir
    assert ckpt.model_version_path(rec) == rec.parent / f"{rec.name}.mlflow_model.json"
    assert ckpt.read_model_version(rec) == record
    # Retrained weights (a new checkpoint_id): the record no longer describes them.
    raw = json.loads((rec / ckpt.METADATA_FILE).read_text())
    raw["checkpoint_id"] = "0" * 32
    (rec / ckpt.METADATA_FILE).write_text(json.dumps(raw))
    assert ckpt.read_model_version(rec) is None
    ckpt.write_model_version(rec, None)
    assert not ckpt.model_version_path(rec).exists()


def test_one_arrow_schema_for_a_semantic_id_row(phase_b: tuple[Path, Path]) -> None:
    phase_a, rec = phase_b
    assert storage.SEMANTIC_ID_ROWS_SCHEMA is SEMANTIC_ID_ROW_SCHEMA
    table = ckpt.read_semantic_ids(phase_a)
    assert table.schema.equals(SEMANTIC_ID_ROW_SCHEMA)
    assert set(table.column("method").to_pylist()) == {ckpt.METHOD_CLUSTER}
    assert all(table.column("active").to_pylist())
    # A format-1 file (no method / active columns) reads as the same rows.
    old = table.drop_columns(["method", "active"])
    pq.write_table(old, rec / ckpt.SEMANTIC_IDS_FILE)
    assert ckpt.read_semantic_ids(rec).equals(table)
    with pytest.raises(StoreError, match="run `store train --phase tokenizer` first"):
        ckpt.read_semantic_ids(rec.parent / "missing")
    assert isinstance(table, pa.Table)
