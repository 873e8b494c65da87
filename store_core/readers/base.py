"""What every format reader returns, and the helpers readers share.

A reader turns one source format into a :class:`RawCatalog`: two Arrow tables in a fixed
raw schema plus the list of files it read. Everything format-independent (validation of
ids, missing metadata, duplicates, k-core, text rendering, hashing, splits) happens in
:mod:`store_core.ingest`, so readers stay small and only know their format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

#: Raw items: one row per item record in the source, in source order.
#: ``fields`` holds every text field the source has for the item (name -> value), in a
#: stable order; values are plain strings (lists are joined with ", ").
RAW_ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("fields", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("record", pa.string(), nullable=False),  # e.g. "line 12" or "key '17'"
    ]
)

#: Raw interactions: one row per interaction in the source, in source order.
RAW_INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.float64(), nullable=True),  # unix seconds (fractions kept)
        pa.field("source_order", pa.int64(), nullable=False),  # 0-based order in the source
        pa.field("record", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class RawCatalog:
    """A source dataset as read, before any validation or filtering."""

    items: pa.Table  # RAW_ITEMS_SCHEMA
    interactions: pa.Table  # RAW_INTERACTIONS_SCHEMA
    items_file: str  # URI of the file items were read from (for error messages)
    interactions_file: str  # URI of the file interactions were read from
    inputs: list[str] = field(default_factory=list)  # every URI read, for checksums
