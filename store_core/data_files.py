"""The ingested data files of a workspace (``<workspace>/data``): their names and the one
reader of each.

``store ingest`` writes them (:mod:`store_core.ingest`); every stage after it reads them
through this module only, with the columns of :mod:`store_core.schemas`:

    items.parquet             ITEMS_SCHEMA          :func:`read_items`, :func:`open_parquet`
    interactions.parquet      INTERACTIONS_SCHEMA   :func:`read_interactions`
    splits.parquet            SPLITS_SCHEMA         :func:`read_splits`
    cold_start_items.parquet  COLD_ITEMS_SCHEMA     (written for people to read)
    manifest.json             checksums and rules of the ingest (:mod:`store_core.ingest`)

A whole-file read of ``items.parquet`` or ``splits.parquet`` is kept for the next read of
the same file (while its size and modification time stay the same), so a stage that
needs the catalogue text several times (evaluation of several systems) reads it once.
Errors: :class:`~store_core.errors.MissingInputError` (run ``store ingest``) when a file
is missing, :class:`~store_core.errors.DataError` naming the file when it is not Parquet
or lacks a column.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from store_core.arrow_input import open_arrow_input
from store_core.errors import DataError, MissingInputError
from store_core.schemas import ITEMS_SCHEMA, SPLIT_TRAIN, SPLITS_SCHEMA
from store_core.splits import UserSplits, group_splits

ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
SPLITS_FILE = "splits.parquet"
COLD_ITEMS_FILE = "cold_start_items.parquet"
MANIFEST_FILE = "manifest.json"

#: A read filter as pyarrow takes it, e.g. ``[("user_id", "=", "42")]``.
Filters = list[tuple[str, str, Any]]


def items_path(data_dir: str) -> str:
    """Where ``items.parquet`` of ``data_dir`` (a local path or fsspec URI) is."""
    return f"{data_dir}/{ITEMS_FILE}"


def read_parquet(
    uri: str, columns: Sequence[str] | None = None, filters: Filters | None = None
) -> pa.Table:
    """``columns`` (None: all) of the Parquet file ``uri``, rows matching ``filters``.
    MissingInputError when it does not exist; DataError when it is not Parquet or lacks a
    column."""
    wanted = list(columns) if columns is not None else None
    try:
        with open_arrow_input(uri) as source:  # never a Python file: see arrow_input
            return pq.read_table(source, columns=wanted, filters=filters)
    except FileNotFoundError:
        raise MissingInputError(uri, "ingest") from None
    except (KeyError, ValueError, pa.ArrowInvalid) as exc:  # missing column, not Parquet
        raise DataError(f"cannot read columns {wanted}: {exc}", file=uri) from None


def _stamp(uri: str) -> tuple[Any, ...] | None:
    """(size, modification time) of ``uri``; None when fsspec cannot tell."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except FileNotFoundError:
        raise MissingInputError(uri, "ingest") from None
    except OSError:
        return None
    modified = info.get("mtime") or info.get("LastModified") or info.get("updated")
    return None if modified is None else (info.get("size"), str(modified))


@functools.lru_cache(maxsize=4)
def _read_whole(uri: str, columns: tuple[str, ...], stamp: tuple[Any, ...]) -> pa.Table:
    return read_parquet(uri, columns)


def _read_kept(uri: str, columns: Sequence[str]) -> pa.Table:
    stamp = _stamp(uri)
    if stamp is None:
        return read_parquet(uri, columns)
    return _read_whole(uri, tuple(columns), stamp)


def read_items(data_dir: str, columns: Sequence[str] | None = None) -> pa.Table:
    """``columns`` (None: all of ITEMS_SCHEMA) of ``items.parquet``, sorted by item_id."""
    names = columns if columns is not None else ITEMS_SCHEMA.names
    return _read_kept(items_path(data_dir), names)


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file (``items.parquet`` at :func:`items_path`, a shard) opened for reading
    by row group or batch (large catalogues). MissingInputError / DataError as above."""
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise MissingInputError(path, "ingest") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"not a Parquet file: {exc}", file=path) from None


def read_splits(data_dir: str, columns: Sequence[str] | None = None) -> pa.Table:
    """``columns`` (None: all of SPLITS_SCHEMA) of ``splits.parquet``."""
    names = columns if columns is not None else SPLITS_SCHEMA.names
    return _read_kept(f"{data_dir}/{SPLITS_FILE}", names)


def read_interactions(
    data_dir: str, columns: Sequence[str] | None = None, filters: Filters | None = None
) -> pa.Table:
    """``columns`` (None: all) of ``interactions.parquet``, rows matching ``filters``."""
    return read_parquet(f"{data_dir}/{INTERACTIONS_FILE}", columns, filters)


def read_user_splits(data_dir: str) -> UserSplits:
    """``splits.parquet`` grouped per user (:func:`store_core.splits.group_splits`): the
    training sequences (item ids, oldest first), validation and test targets, cold items."""
    table = read_splits(data_dir)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return group_splits(
        columns["user_id"],
        columns["item_id"],
        columns["position"],
        columns["split"],
        columns["cold_start"],
    )


def trained_items(data_dir: str) -> set[str]:
    """The items some training sequence contains (``split = 'train'`` rows of
    ``splits.parquet``): the complement is what the cold-start back-off scores."""
    table = read_splits(data_dir, ["item_id", "split"])
    items = table.column("item_id").to_pylist()
    labels = table.column("split").to_pylist()
    return {item for item, label in zip(items, labels, strict=True) if label == SPLIT_TRAIN}
