"""Stage 1, ingestion: any supported source -> validated Parquet + manifest + DuckDB items.

Reads with the format's reader, then applies the format-independent rules in one place:
validation (empty catalogue, duplicate ids with different text, interactions whose item
has no metadata), dropping exact duplicate interactions (counted as
``dropped_duplicate`` and warned about; see :data:`store_core.splits.DUPLICATE_RULE`),
optional k-core, text rendering and hashing, chronological ordering (rows tied on time
counted as ``tied_timestamp``), the leave-one-out split and the cold-start holdout. A
result that cannot train a model (every item held out, no train target) is refused
before anything is written (:func:`check_usable`). Outputs are written to a staging
directory and swapped into ``<workspace>/data`` only when all of them are complete.

Reading and validating the source needs no lock; publishing ``data/`` and updating the
DuckDB ``items`` table happen under the workspace's writer lock
(:mod:`store_core.locking`), after :func:`recover_outputs` has repaired whatever a killed
earlier ingest left (a staging directory, ``data/`` moved aside). A rerun after a kill at
any point therefore writes the same Parquet files and the same ``items`` rows as an
uninterrupted run, and leaves nothing else behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from store_core import splits as split_rules
from store_core.config import DataConfig, StoreConfig
from store_core.data_files import (
    COLD_ITEMS_FILE,
    INTERACTIONS_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    SPLITS_FILE,
)
from store_core.errors import DataError
from store_core.locking import workspace_writer
from store_core.readers import RawCatalog, read_source
from store_core.redaction import redact
from store_core.schemas import (
    COLD_ITEMS_SCHEMA,
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    SPLIT_EXCLUDED,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    SPLITS_SCHEMA,
)
from store_core.splits import Interaction
from store_core.textrender import content_hash, render_text
from store_core.workspace import recover_directory, sha256_of, staged_directory

logger = logging.getLogger(__name__)

ROW_GROUP_SIZE = 8192


@dataclass(frozen=True)
class ResolvedSource:
    """The concrete source to read after built-in datasets are fetched."""

    data: DataConfig
    path: str
    description: str
    terms: str | None = None


@dataclass(frozen=True)
class IngestResult:
    """What ingestion wrote, for the next stage and for tracking."""

    data_dir: str
    files: dict[str, str]  # logical name -> URI
    counts: dict[str, int]
    manifest: dict[str, Any]
    catalog_changes: dict[str, int] = field(default_factory=dict)


def resolve_source(cfg: StoreConfig) -> ResolvedSource:
    """Fetch a built-in dataset if the config names one, else use ``data.path`` as is."""
    data = cfg.data
    if data.dataset == "movielens-100k":
        from store_core.datasets import MOVIELENS_TERMS, acquire_movielens_100k

        acquired = acquire_movielens_100k(f"{cfg.workspace}/cache/movielens-100k")
        resolved = data.model_copy(
            update={"format": acquired.format, "path": acquired.path, "name": acquired.name}
        )
        return ResolvedSource(resolved, acquired.path, acquired.source, MOVIELENS_TERMS)
    if data.path is None:
        raise DataError("no source given: set data.path (or data.dataset)", field="data.path")
    return ResolvedSource(data, data.path, data.path)


def build_items(raw: RawCatalog, data: DataConfig) -> pa.Table:
    """Deduplicate, validate and render the catalogue (sorted by item_id)."""
    seen: dict[str, tuple[list[tuple[str, str]], str]] = {}
    for item_id, fields, record in zip(
        raw.items.column("item_id").to_pylist(),
        raw.items.column("fields").to_pylist(),
        raw.items.column("record").to_pylist(),
        strict=True,
    ):
        if not item_id:
            raise DataError("empty item id", file=raw.items_file, record=record, field="item_id")
        pairs = [(str(k), str(v)) for k, v in fields]
        if item_id in seen:
            first_pairs, first_record = seen[item_id]
            if first_pairs != pairs:
                raise DataError(
                    f"duplicate item id '{item_id}' with different text (first seen at "
                    f"{first_record})",
                    file=raw.items_file,
                    record=record,
                    field="item_id",
                )
            continue
        seen[item_id] = (pairs, record)
    if not seen:
        raise DataError("the catalogue is empty: no item records", file=raw.items_file)

    columns: dict[str, list[Any]] = {name: [] for name in ITEMS_SCHEMA.names}
    for item_id in sorted(seen):
        pairs, record = seen[item_id]
        fields = dict(pairs)
        text = render_text(fields, data.text_template, data.max_text_chars)
        if not text:
            raise DataError(
                "item renders to empty text (no non-empty text field)",
                file=raw.items_file,
                record=record,
                field="text",
            )
        columns["item_id"].append(item_id)
        columns["title"].append(fields.get("title") or None)
        columns["fields"].append(pairs)
        columns["text"].append(text)
        columns["content_hash"].append(content_hash(fields, text))
    return pa.Table.from_pydict(columns, schema=ITEMS_SCHEMA)


def build_interactions(
    raw: RawCatalog, known_items: set[str], data: DataConfig
) -> tuple[list[Interaction], int]:
    """Validate interactions against the catalogue; returns (kept rows, dropped count)."""
    rows: list[Interaction] = []
    dropped = 0
    table = raw.interactions
    for user_id, item_id, timestamp, order, record in zip(
        table.column("user_id").to_pylist(),
        table.column("item_id").to_pylist(),
        table.column("timestamp").to_pylist(),
        table.column("source_order").to_pylist(),
        table.column("record").to_pylist(),
        strict=True,
    ):
        if not user_id:
            raise DataError(
                "empty user id", file=raw.interactions_file, record=record, field="user_id"
            )
        if item_id not in known_items:
            if data.missing_items == "fail":
                raise DataError(
                    f"item '{item_id}' has no metadata in {raw.items_file} "
                    "(set data.missing_items: drop to skip such rows)",
                    file=raw.interactions_file,
                    record=record,
                    field="item_id",
                )
            dropped += 1
            continue
        rows.append(Interaction(user_id, item_id, timestamp, order))
    if not rows:
        raise DataError("no interactions left to ingest", file=raw.interactions_file)
    return rows, dropped


def check_usable(
    split_cols: dict[str, list[Any]],
    ordered: dict[str, list[Interaction]],
    num_items: int,
    cold_items: set[str],
    data: DataConfig,
    interactions_file: str,
) -> None:
    """Refuse a cold-start holdout that leaves nothing to train on, with the reason.

    The recommendation task's targets are a user's train items after the first
    (:mod:`store_core.tasks`). Raises :class:`DataError` (field
    ``data.cold_start_fraction``) when the holdout takes every item, leaves no ``train``
    interaction, or leaves no user with two of them (no training target) while the data
    without the holdout had one: training would otherwise fail later instead of here.
    Data that has no training target even without a holdout (every user shorter than 4
    interactions) is still ingested, with a warning: it is a valid evaluation-only
    dataset, and the tiny fixtures of the tests are of that kind.
    """
    fraction = data.cold_start_fraction
    if cold_items and len(cold_items) >= num_items:
        raise DataError(
            f"data.cold_start_fraction {fraction} holds out all {num_items} items "
            f"(round({fraction} x {num_items}) = {len(cold_items)}), leaving none to train "
            "on; lower it",
            field="data.cold_start_fraction",
        )
    train_per_user: dict[str, int] = {}
    for user, label in zip(split_cols["user_id"], split_cols["split"], strict=True):
        if label == SPLIT_TRAIN:
            train_per_user[user] = train_per_user.get(user, 0) + 1
    if max(train_per_user.values(), default=0) >= 2:
        return
    longest = max((len(seq) for seq in ordered.values()), default=0)
    if split_rules.split_labels(longest).count(SPLIT_TRAIN) < 2:  # none even without holdout
        logger.warning(
            "no user has two train interactions (leave-one-out keeps the last two for "
            "valid and test), so %s has no training target; fine for evaluation only",
            redact(interactions_file),
        )
        return
    left = (
        "no train interactions are left"
        if not train_per_user
        else "no user has two train interactions left, so training has no target"
    )
    raise DataError(
        f"{left} after the cold-start holdout of {len(cold_items)} of {num_items} items "
        f"(data.cold_start_fraction {fraction}); lower it",
        file=interactions_file,
        field="data.cold_start_fraction",
    )


def _write_parquet(table: pa.Table, uri: str) -> None:
    with fsspec.open(uri, "wb") as handle:
        # Bounded row groups let later stages stream the file with flat memory.
        pq.write_table(table, handle, compression="zstd", row_group_size=ROW_GROUP_SIZE)


def _count(values: Iterable[str]) -> int:
    return len(set(values))


def recover_outputs(cfg: StoreConfig) -> list[str]:
    """Repair what a killed ingest left in ``cfg.data_dir`` (see
    :func:`store_core.workspace.recover_directory`); returns what was done.

    Call it only while holding the workspace's writer lock. Raises OSError when a
    leftover cannot be removed.
    """
    return recover_directory(cfg.data_dir)


def _publish_outputs(
    data_dir: str, outputs: dict[str, pa.Table], manifest_base: dict[str, Any]
) -> dict[str, Any]:
    """Write the tables and the manifest (with the tables' checksums) into a staging
    directory and swap it in as ``data_dir``; returns the manifest."""
    with staged_directory(data_dir) as staging:
        output_checksums = {}
        for name, table in outputs.items():
            _write_parquet(table, f"{staging}/{name}")
            output_checksums[name] = sha256_of(f"{staging}/{name}")
        manifest = {**manifest_base, "outputs": output_checksums}
        with fsspec.open(f"{staging}/{MANIFEST_FILE}", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
    return manifest


def run_ingest(cfg: StoreConfig, source: ResolvedSource | None = None) -> IngestResult:
    """Run ingestion for ``cfg`` and load the catalogue into DuckDB.

    ``source`` may be resolved beforehand (the flow fetches it in a retried I/O task).
    Raises :class:`DataError` for a bad source (named file, record and field),
    :class:`store_core.locking.WorkspaceLocked` when another writer holds the workspace
    longer than the lock timeout, and :class:`store_core.errors.StoreError` when the
    DuckDB file stays locked.
    """
    from store_core import storage  # keeps duckdb out of readers' import path

    source = source or resolve_source(cfg)
    data = source.data
    logger.info("reading %s source at %s", data.format, redact(source.path))
    raw = read_source(data, source.path)
    items = build_items(raw, data)
    item_ids = items.column("item_id").to_pylist()
    rows, dropped_missing = build_interactions(raw, set(item_ids), data)

    rows, dropped_duplicates = split_rules.drop_exact_duplicates(rows)
    if dropped_duplicates:
        logger.warning(
            "dropped %d exact duplicate interactions (same user, item and timestamp) from %s",
            dropped_duplicates,
            redact(raw.interactions_file),
        )

    before_kcore = len(rows)
    rows = split_rules.kcore(rows, data.kcore)
    if data.kcore > 1:
        if not rows:
            raise DataError(
                f"the {data.kcore}-core filter removed every interaction",
                file=raw.interactions_file,
                field="data.kcore",
            )
        kept = {r.item_id for r in rows}
        items = items.filter(pa.array([i in kept for i in item_ids]))

    ordered = split_rules.sequences(rows)
    kept_items = sorted({r.item_id for r in rows})
    cold_items = split_rules.sample_cold_items(kept_items, data.cold_start_fraction, data.seed)
    inter_cols: dict[str, list[Any]] = {n: [] for n in INTERACTIONS_SCHEMA.names}
    split_cols: dict[str, list[Any]] = {n: [] for n in SPLITS_SCHEMA.names}
    for user_id, seq in ordered.items():
        labels = split_rules.split_labels(len(seq))
        for position, (row, label) in enumerate(zip(seq, labels, strict=True)):
            cold = row.item_id in cold_items
            if cold and label != SPLIT_TEST:
                label = SPLIT_EXCLUDED
            inter_cols["user_id"].append(user_id)
            inter_cols["item_id"].append(row.item_id)
            inter_cols["timestamp"].append(row.timestamp)
            inter_cols["position"].append(position)
            split_cols["user_id"].append(user_id)
            split_cols["item_id"].append(row.item_id)
            split_cols["position"].append(position)
            split_cols["split"].append(label)
            split_cols["cold_start"].append(cold)
    interactions = pa.Table.from_pydict(inter_cols, schema=INTERACTIONS_SCHEMA)
    split_table = pa.Table.from_pydict(split_cols, schema=SPLITS_SCHEMA)

    labels_count = {
        label: split_cols["split"].count(label)
        for label in (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST, SPLIT_EXCLUDED)
    }
    check_usable(split_cols, ordered, len(kept_items), cold_items, data, raw.interactions_file)
    tied = split_rules.count_tied(ordered)
    if tied:
        logger.info(
            "%d interactions share their user's timestamp with another; ordered by %s",
            tied,
            split_rules.ORDER_RULE,
        )
    counts = {
        "users": len(ordered),
        "items": items.num_rows,
        "interactions": interactions.num_rows,
        "dropped_missing_item": dropped_missing,
        "dropped_duplicate": dropped_duplicates,
        "dropped_kcore": before_kcore - len(rows),
        "tied_timestamp": tied,
        "train": labels_count[SPLIT_TRAIN],
        "valid": labels_count[SPLIT_VALID],
        "test": labels_count[SPLIT_TEST],
        "excluded_cold_start": labels_count[SPLIT_EXCLUDED],
        "cold_start_items": len(cold_items),
        "cold_start_test_users": sum(
            1
            for label, cold in zip(split_cols["split"], split_cols["cold_start"], strict=True)
            if cold and label == SPLIT_TEST
        ),
    }
    input_checksums = {uri: sha256_of(uri) for uri in sorted(set(raw.inputs))}

    data_dir = cfg.data_dir
    files = {
        "items": f"{data_dir}/{ITEMS_FILE}",
        "interactions": f"{data_dir}/{INTERACTIONS_FILE}",
        "splits": f"{data_dir}/{SPLITS_FILE}",
        "manifest": f"{data_dir}/{MANIFEST_FILE}",
    }
    if cold_items:
        files["cold_start_items"] = f"{data_dir}/{COLD_ITEMS_FILE}"
    outputs = {ITEMS_FILE: items, INTERACTIONS_FILE: interactions, SPLITS_FILE: split_table}
    if cold_items:
        outputs[COLD_ITEMS_FILE] = pa.Table.from_pydict(
            {"item_id": sorted(cold_items)}, schema=COLD_ITEMS_SCHEMA
        )
    manifest_base = {
        "source": source.description,
        "format": data.format,
        "terms": source.terms,
        "counts": counts,
        "inputs": input_checksums,
        "rules": {
            "order": split_rules.ORDER_RULE,
            "duplicates": split_rules.DUPLICATE_RULE,
            "split": split_rules.SPLIT_RULE,
            "cold_start": split_rules.COLD_RULE if cold_items else None,
            "cold_start_fraction": data.cold_start_fraction,
            "seed": data.seed,
            "kcore": data.kcore,
            "min_rating": data.min_rating,
            "missing_items": data.missing_items,
            "text_template": data.text_template or "default: 'field: value' joined by '; '",
            "max_text_chars": data.max_text_chars,
        },
    }
    with workspace_writer(cfg.workspace, "ingest"):
        recover_outputs(cfg)
        manifest = _publish_outputs(data_dir, outputs, manifest_base)
        changes = storage.upsert_items(cfg.duckdb_path, items)
    logger.info(
        "ingested %d users, %d items, %d interactions into %s",
        counts["users"],
        counts["items"],
        counts["interactions"],
        data_dir,
    )
    return IngestResult(data_dir, files, counts, manifest, changes)
