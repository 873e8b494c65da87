"""Stage 3: tokenize the whole catalogue into a new DuckDB version of semantic IDs.

Streams ``items.parquet`` in record batches (memory stays flat as the catalogue grows),
decides per item what its ID is, writes the rows to a temporary Parquet file batch by
batch, and commits them as one new version in a single DuckDB transaction.

Two modes:

* ``keep`` (default, also the nightly job): items whose ``content_hash`` is unchanged
  keep their ID (the recommender learned it); new and changed items get an ID generated
  from their text (text -> token, no retraining) made unique by the disambiguation
  level; items gone from the catalogue stay as inactive rows. With nothing new, changed,
  restored or removed, no version is written.
* ``regenerate``: every item's ID is generated from its text (method ``generated``).

Every item an earlier version holds keeps its own ID when the model generates that ID's
prefix again (its own ID is no collision with itself, :func:`store_core.new_items.
choose_ids`): regenerating an unchanged catalogue with the same model moves no ID.

Counts (the ``counts`` of the version row, one category per item of the catalogue, the
same categories and rule as the ``items`` table's :func:`store_core.storage.upsert_items`
so ingest and tokenize-catalogue agree):

* ``new``: no row under this codebook;
* ``unchanged``: active in the base, same ``content_hash``;
* ``restored``: inactive in the base (delisted) and back with the same ``content_hash``:
  it gets its stored ID back (method kept), like an unchanged item, since that ID is
  still reserved for it and is the one the recommender learned;
* ``changed``: a different ``content_hash`` (whether the item was active or delisted);
* ``removed``: active in the base and gone from the catalogue.

Besides these, ``generated`` counts the IDs generated this run and ``reassigned`` the
items that held an ID and now hold a different one. When disambiguation codes run low or
out, a warning gives the counts (:class:`store_core.new_items.IdSpaceReport`, also on
:attr:`CatalogueOutcome.id_space`); an item with no free code left is an error.

The base the ``keep`` mode starts from is the newest version written under the
checkpoint's codebook, else the clustering IDs stored with the checkpoint (method
``cluster``). IDs once issued under a codebook are never handed to another item.

Concurrency and crashes: the whole run holds the workspace's writer lock
(:mod:`store_core.locking`), so no other writer can commit between the base being read
and the new version being written; the writing transaction re-checks that the base is
still the newest version anyway (:class:`store_core.storage.BaseVersion`). The rows are
staged in ``<workspace>/.catalogue-staging/``, which the next run empties on start, so a
killed run leaves nothing behind once the next one has started; DuckDB rolls back its
uncommitted transaction on recovery.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeGuard

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store_core import signals, storage
from store_core.bundle import RecommenderBundle, load_bundle
from store_core.checkpoint import METHOD_CLUSTER, read_stats, semantic_id_rows
from store_core.config import StoreConfig
from store_core.data_files import items_path as items_file
from store_core.data_files import open_parquet
from store_core.ingest import recover_outputs
from store_core.locking import workspace_writer
from store_core.new_items import DisambiguationState, IdSpaceReport, choose_ids, generate_ids
from store_core.progress import progress

logger = logging.getLogger(__name__)

Mode = Literal["keep", "regenerate"]
METHOD_GENERATED = "generated"
#: Where a run stages its rows before the DuckDB commit (next to the database).
STAGING_DIR = ".catalogue-staging"
#: What runs before the staging directory existed left in the workspace (mkstemp names).
_LEGACY_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}\.parquet")


@dataclass(frozen=True)
class CatalogueOutcome:
    version: int | None  # None when nothing changed and no version was written
    counts: dict[str, int]
    items_per_s: float
    seconds: float
    id_space: IdSpaceReport | None = None  # what is left of the disambiguation level

    def summary_markdown(self, mode: str, model_uri: str | None = None) -> str:
        """The run summary users see in the Prefect UI and MLflow: what changed."""
        if self.version is None:
            headline = "Catalogue unchanged: no new semantic-ID version was written."
        else:
            headline = f"Semantic-ID version **{self.version}** written."
        lines = [
            "# Catalogue tokenization",
            "",
            headline,
            "",
            "| items | count |",
            "|---|---:|",
            *(f"| {key} | {self.counts.get(key, 0)} |" for key in COUNT_KEYS),
            "",
            f"mode `{mode}`, {self.seconds:.1f} s, {self.items_per_s:.0f} items/s"
            + (f", model `{model_uri}`" if model_uri else ""),
        ]
        if self.id_space is not None:
            warn = "**warning**: " if self.id_space.pressure else ""
            lines += ["", f"{warn}semantic-ID space: {self.id_space.describe()}."]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _BaseRow:
    codes: tuple[int, ...]
    content_hash: str
    method: str
    active: bool = True


#: The keys of a run's counts, in the order the summary shows them.
COUNT_KEYS = ("new", "changed", "restored", "unchanged", "removed", "generated", "reassigned")


def change_category(old: _BaseRow | None, content_hash: str) -> str:
    """new / unchanged / restored / changed: what a catalogue item is relative to the base
    (the rule :func:`store_core.storage.upsert_items` counts the ``items`` table by)."""
    if old is None:
        return "new"
    if old.content_hash != content_hash:
        return "changed"
    return "unchanged" if old.active else "restored"


def _base_rows(
    bundle: RecommenderBundle, db: str
) -> tuple[dict[str, _BaseRow], np.ndarray, int | None]:
    """(item -> row of the base version, every ID ever issued under this codebook,
    the base's DuckDB version, None when the base is the checkpoint's clustering)."""
    table = bundle.semantic_ids
    cluster = {
        item: _BaseRow(tuple(codes), content_hash, METHOD_CLUSTER)
        for item, codes, content_hash in zip(
            table.column("item_id").to_pylist(),
            table.column("codes").to_pylist(),
            table.column("content_hash").to_pylist(),
            strict=True,
        )
    }
    issued = [list(r.codes) for r in cluster.values()]
    current = storage.current_rows(db, bundle.codebook_version)
    if current is None:
        return cluster, np.array(issued, dtype=np.int64), None
    base = {
        item: _BaseRow(tuple(codes), content_hash, method, active)
        for item, codes, content_hash, method, active in zip(
            current.column("item_id").to_pylist(),
            current.column("codes").to_pylist(),
            current.column("content_hash").to_pylist(),
            current.column("method").to_pylist(),
            current.column("active").to_pylist(),
            strict=True,
        )
    }
    issued.extend(storage.issued_codes(db, bundle.codebook_version))
    version = int(current.column("version")[0].as_py())
    return base, np.array(issued, dtype=np.int64), version


def _batches(path: str, batch_size: int, text: bool = True) -> Iterator[pa.RecordBatch]:
    parquet = open_parquet(path)
    yield from parquet.iter_batches(
        batch_size=batch_size,
        columns=["item_id", "text", "content_hash"] if text else ["item_id", "content_hash"],
    )


def keeps_id(old: _BaseRow | None, category: str, mode: Mode) -> TypeGuard[_BaseRow]:
    """Whether an item keeps its base ID as it is (no generation): in ``keep`` mode, an
    unchanged or restored item."""
    return old is not None and mode == "keep" and category in ("unchanged", "restored")


#: One batch of the catalogue as :func:`plan_batches` sees it: (rows, positions of the
#: rows that get a generated ID).
BatchPlan = tuple[int, list[int]]


def plan_batches(
    items_path: str, batch_size: int, base: dict[str, _BaseRow], mode: Mode
) -> list[BatchPlan]:
    """Every batch of ``items_path`` in the order the run reads them (``batch_size`` rows,
    fewer at the end): its row count and the positions of the rows whose ID is generated
    (:func:`keeps_id` false). Reads only ``item_id`` and ``content_hash``."""
    plan: list[BatchPlan] = []
    for batch in _batches(items_path, batch_size, text=False):
        ids = batch.column("item_id").to_pylist()
        hashes = batch.column("content_hash").to_pylist()
        todo = [
            i
            for i, (item, content) in enumerate(zip(ids, hashes, strict=True))
            if not keeps_id(base.get(item), change_category(base.get(item), content), mode)
        ]
        plan.append((len(ids), todo))
    return plan


class RemoteBeams(Protocol):
    """Generates the beams of the rows that get a new ID outside this process, e.g. shard
    tasks on a cluster (:class:`store_core.sharding.ShardedBeams`); the IDs are still
    chosen here, in the order of the in-process run, so both write the same IDs."""

    def start(self, plan: list[BatchPlan], staging: Path) -> None:
        """Generate the beams of every batch of ``plan`` (files under ``staging``); raise
        naming the failed part when one fails."""

    def beams(self, batch: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Beams [rows, B, L] and scores [rows, B] of the generated rows of batch number
        ``batch`` (its plan's positions, in order); batches are asked for in order."""


def tokenize_catalogue(
    cfg: StoreConfig,
    checkpoint: str,
    *,
    mode: Mode = "keep",
    batch_size: int = 256,
    note: str = "",
    extra_codebook_fields: dict[str, Any] | None = None,
    remote: RemoteBeams | None = None,
) -> CatalogueOutcome:
    """Write a new semantic-ID version for the catalogue in ``cfg.data_dir``.

    ``remote``: where the beams of new IDs are generated when not in this process
    (:mod:`store_core.sharding`); the IDs, counts and version are the same either way.

    Holds the workspace's writer lock from reading the base to the commit, and first
    cleans what a killed earlier run left (:func:`clean_staging`, and ``data/`` through
    :func:`store_core.ingest.recover_outputs`). Raises
    :class:`store_core.locking.WorkspaceLocked` when another writer keeps the workspace
    longer than the lock timeout, :class:`store_core.storage.StaleBaseError` when a
    version was written under the same codebook after the base was read (nothing is
    written then), :class:`store_core.errors.StoreError` when the DuckDB file stays
    locked, and ValueError when the rows violate the table's constraints.
    """
    started = time.perf_counter()
    with workspace_writer(cfg.workspace, "tokenize-catalogue"):
        recover_outputs(cfg)
        staging = clean_staging(cfg)
        bundle = load_bundle(checkpoint)
        bundle.trained(cfg)  # a config that disagrees with the checkpoint is named
        staging.mkdir(parents=True, exist_ok=True)
        rows_path = staging / f"semantic-ids-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        try:
            return _tokenize(
                cfg,
                bundle,
                str(rows_path),
                mode=mode,
                batch_size=batch_size,
                note=note,
                extra_codebook_fields=extra_codebook_fields,
                started=started,
                remote=remote,
            )
        finally:
            with signals.deferred():
                shutil.rmtree(staging, ignore_errors=True)


def clean_staging(cfg: StoreConfig) -> Path:
    """Empty the catalogue's staging directory (``<workspace>/.catalogue-staging``) and
    remove the ``tmp*.parquet`` files runs of earlier releases left in the workspace;
    returns the directory. Call it only while holding the workspace's writer lock.
    Raises OSError when a leftover cannot be removed.
    """
    workspace = Path(cfg.duckdb_path).parent
    staging = workspace / STAGING_DIR
    if staging.exists():
        logger.warning("removing %s (left by an interrupted tokenize-catalogue)", staging)
        shutil.rmtree(staging)
    if workspace.is_dir():
        for legacy in workspace.iterdir():
            if legacy.is_file() and _LEGACY_TEMPORARY.fullmatch(legacy.name):
                logger.warning("removing %s (left by an interrupted tokenize-catalogue)", legacy)
                legacy.unlink()
    return staging


def _tokenize(
    cfg: StoreConfig,
    bundle: RecommenderBundle,
    tmp_path: str,
    *,
    mode: Mode,
    batch_size: int,
    note: str,
    extra_codebook_fields: dict[str, Any] | None,
    started: float,
    remote: RemoteBeams | None = None,
) -> CatalogueOutcome:
    """The body of :func:`tokenize_catalogue`: stream the items, stage the rows in
    ``tmp_path``, commit them as one version."""
    db = cfg.duckdb_path
    base, issued, base_version = _base_rows(bundle, db)
    id_length = len(bundle.level_ids)
    bits = bundle.pack_bits
    state = DisambiguationState(issued, len(bundle.level_ids[-1]))
    counts = dict.fromkeys(COUNT_KEYS, 0)
    seen: set[str] = set()
    items_path = items_file(cfg.data_dir)
    total = open_parquet(items_path).metadata.num_rows
    if remote is not None:
        remote.start(plan_batches(items_path, batch_size, base, mode), Path(tmp_path).parent)
    writer = pq.ParquetWriter(tmp_path, storage.SEMANTIC_ID_ROWS_SCHEMA)
    writer_open = True
    try:
        bar = progress(total=total, desc="tokenize catalogue", unit="item")
        for number, batch in enumerate(_batches(items_path, batch_size, remote is None)):
            ids: list[str] = batch.column("item_id").to_pylist()
            hashes: list[str] = batch.column("content_hash").to_pylist()
            codes = np.zeros((len(ids), id_length), dtype=np.int64)
            methods = [METHOD_GENERATED] * len(ids)
            todo: list[int] = []
            for i, (item, content) in enumerate(zip(ids, hashes, strict=True)):
                seen.add(item)
                old = base.get(item)
                category = change_category(old, content)
                counts[category] += 1
                if keeps_id(old, category, mode):
                    codes[i] = old.codes
                    methods[i] = old.method
                    continue
                todo.append(i)
            if todo and remote is not None:
                beams, scores = remote.beams(number, len(todo))
            elif todo:
                texts: list[str] = batch.column("text").to_pylist()
                beams, scores = generate_ids(
                    bundle.model,
                    bundle.builder,
                    bundle.level_ids,
                    [texts[i] for i in todo],
                    batch_size=cfg.recommender.eval_batch_size,
                )
            if todo:
                owned = [base.get(ids[i]) for i in todo]
                own = [None if o is None else o.codes for o in owned]
                chosen = choose_ids(beams, scores, [ids[i] for i in todo], state, own)
                codes[todo] = chosen
                counts["generated"] += len(todo)
                counts["reassigned"] += sum(
                    1
                    for o, row in zip(own, chosen.tolist(), strict=True)
                    if o is not None and tuple(row) != o
                )
            writer.write_table(
                semantic_id_rows(ids, codes, hashes, bits, methods, [True] * len(ids))
            )
            bundle.builder.clear_text_cache()
            bar.update(len(ids))
        bar.close()
        # Rows already inactive in the base are carried forward as they are; only items
        # that were active and are gone now count as removed.
        gone = sorted(set(base) - seen)
        removed = [i for i in gone if base[i].active]
        if gone:
            gone_codes = np.array([base[i].codes for i in gone], dtype=np.int64)
            writer.write_table(
                semantic_id_rows(
                    gone,
                    gone_codes,
                    [base[i].content_hash for i in gone],
                    bits,
                    [base[i].method for i in gone],
                    [False] * len(gone),
                )
            )
        counts["removed"] = len(removed)
        writer.close()
        writer_open = False
        seconds = time.perf_counter() - started
        id_space = state.report()
        if id_space.pressure:
            logger.warning("semantic-ID space: %s", id_space.describe())
        unchanged_catalogue = mode == "keep" and not (
            counts["new"] or counts["changed"] or counts["restored"] or counts["removed"]
        )
        if unchanged_catalogue and base_version is not None:
            logger.info("catalogue unchanged: no new semantic-ID version written")
            return CatalogueOutcome(None, counts, total / max(seconds, 1e-9), seconds, id_space)
        codebook_row = _codebook_row(bundle, extra_codebook_fields)
        version = storage.write_semantic_id_version(
            db,
            codebook_row,
            tmp_path,
            counts,
            note or f"tokenize-catalogue ({mode})",
            base=storage.BaseVersion(base_version),
        )
    finally:
        if writer_open:
            writer.close()
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    seconds = time.perf_counter() - started
    logger.info(
        "semantic-ID version %d written: %s",
        version,
        ", ".join(f"{v} {k}" for k, v in counts.items()),
    )
    return CatalogueOutcome(version, counts, total / max(seconds, 1e-9), seconds, id_space)


def _codebook_row(bundle: RecommenderBundle, extra: dict[str, Any] | None) -> dict[str, Any]:
    meta = bundle.metadata
    row: dict[str, Any] = {
        "codebook_version": meta.codebook_version,
        "quantizer": meta.quantizer,
        "cluster_levels": meta.cluster_levels,
        "codebook_size": meta.codebook_size,
        "level_sizes": meta.level_sizes,
        "pack_bits": meta.pack_bits,
        "model_uri": bundle.directory,
        "mlflow_run_id": None,
    }
    stats = read_stats(bundle.directory)  # the clustering's, copied at Phase B's publish
    if stats is not None:
        row["collision_rate"] = stats.get("collision_rate")
        row["stats"] = {k: v for k, v in stats.items() if k != "validation"}
    row.update(extra or {})
    return row
