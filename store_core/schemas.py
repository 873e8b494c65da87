"""The columns of every Parquet file and DuckDB table the pipeline writes.

One place defines them so readers, writers and SQL agree. DuckDB DDL is derived from the
Arrow schemas where the table mirrors a Parquet file.
"""

from __future__ import annotations

import pyarrow as pa

#: ``items.parquet``: one row per catalogue item, sorted by item_id.
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=True),
        pa.field("fields", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
    ]
)

#: ``interactions.parquet``: one row per kept interaction, sorted by (user_id, position).
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        # unix seconds as every reader gives them, fractions kept; null when undated
        pa.field("timestamp", pa.float64(), nullable=True),
        pa.field("position", pa.int32(), nullable=False),  # 0-based, chronological per user
    ]
)

#: Split labels used in ``splits.parquet``.
SPLIT_TRAIN = "train"
SPLIT_VALID = "valid"
SPLIT_TEST = "test"
#: A train/valid interaction on a cold-start item, removed from all training.
SPLIT_EXCLUDED = "excluded"

#: ``splits.parquet``: the leave-one-out split, one row per interaction.
SPLITS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("cold_start", pa.bool_(), nullable=False),  # item is in the cold holdout
    ]
)

#: ``cold_start_items.parquet``: the items held out of all training.
COLD_ITEMS_SCHEMA = pa.schema([pa.field("item_id", pa.string(), nullable=False)])

#: One semantic-ID row, wherever one is stored: a checkpoint's ``semantic_ids.parquet``
#: (the clustering's IDs, :mod:`store_core.checkpoint`) and the rows of a DuckDB
#: semantic-ID version (:func:`store_core.storage.write_semantic_id_version`, removed
#: items included with ``active = False``). ``codes`` holds every level (disambiguation
#: included); ``sid`` is ``format_sid(codes)`` and ``packed`` ``pack_codes(codes,
#: pack_bits)``; ``method`` is ``cluster`` or ``generated``; ``content_hash`` is of the
#: text the ID was made from (null when unknown).
SEMANTIC_ID_ROW_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("codes", pa.list_(pa.int32()), nullable=False),
        pa.field("sid", pa.string(), nullable=False),
        pa.field("packed", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # 'cluster' | 'generated'
        pa.field("active", pa.bool_(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=True),
    ]
)

#: DuckDB ``items`` table: the catalogue as last ingested.
ITEMS_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS items (
    item_id      VARCHAR PRIMARY KEY,
    title        VARCHAR,
    fields       MAP(VARCHAR, VARCHAR) NOT NULL,
    text         VARCHAR NOT NULL,
    content_hash VARCHAR NOT NULL,
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    first_seen_at TIMESTAMP NOT NULL,
    updated_at    TIMESTAMP NOT NULL
)
"""
