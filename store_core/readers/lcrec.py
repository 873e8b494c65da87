"""LC-Rec JSON datasets (e.g. Amazon "Scientific" as used by LC-Rec).

Files in the source directory, ``<name>`` being ``data.name`` or, when unset, the prefix of
the single ``*.inter.json`` file there:

- ``<name>.inter.json``: ``{"user": [item, item, ...], ...}``, each list in chronological
  order. There are no timestamps: ``timestamp`` is null and ``source_order`` follows the
  file (users in key order, items in list order).
- ``<name>.item.json``: ``{"item": {"title": ..., "description": ..., "brand": ...,
  "categories": ..., ...}, ...}``.

Item fields: every string value (lists joined with ", ") of the item's object, in key
order, empty values omitted; numbers and nested objects are not text and are skipped.
Records: ``"user '12' position 3"`` (1-based position in the user's list) for interactions,
``"key '17'"`` for items. There are no ratings: ``data.min_rating`` is a ConfigError.

JSON is read as LC-Rec's own loader (Python's ``json``) reads it, except where ``json``
is silent or crashes (see :mod:`store_core.readers.fsutil`): a key repeated in the item
object is kept as two item records, so ingest raises its duplicate-item-id error when
their texts differ (``json`` would keep the last silently); a user key repeated in the
interaction object, or a field repeated inside one item with another value, is a
DataError; an id of more than 4300 digits is a DataError naming its record.
"""

from __future__ import annotations

import pyarrow as pa

from store_core.config import DataConfig
from store_core.errors import DataError
from store_core.readers.base import RawCatalog
from store_core.readers.fsutil import (
    InteractionRows,
    ItemRows,
    check_fields,
    infer_name,
    join,
    load_json,
    object_pairs,
    parse_id,
    reject_min_rating,
    repeated_keys,
    text_fields,
)


def read(cfg: DataConfig, path: str) -> RawCatalog:
    """Read ``<name>.inter.json`` and ``<name>.item.json`` from ``path``."""
    reject_min_rating(cfg.min_rating, "lcrec")
    name = cfg.name or infer_name(path, ".inter.json")
    inter_uri = join(path, f"{name}.inter.json")
    item_uri = join(path, f"{name}.item.json")
    return RawCatalog(
        items=_read_items(item_uri),
        interactions=_read_interactions(inter_uri),
        items_file=item_uri,
        interactions_file=inter_uri,
        inputs=[inter_uri, item_uri],
    )


def _read_interactions(uri: str) -> pa.Table:
    data = load_json(uri)
    if not isinstance(data, dict):
        raise DataError("expected a JSON object mapping user -> list of items", file=uri)
    repeated = repeated_keys(data)
    if repeated:
        raise DataError(
            "user key appears twice in the interaction object with different lists "
            "(JSON would keep only the last)",
            file=uri,
            record=f"user '{repeated[0]}'",
            field="user_id",
        )
    rows = InteractionRows()
    for user, sequence in data.items():
        if not isinstance(sequence, list):
            raise DataError(
                f"expected a list of items, got {type(sequence).__name__}",
                file=uri,
                record=f"user '{user}'",
            )
        user_id = parse_id(user, file=uri, record=f"user '{user}'", field="user_id")
        for position, item in enumerate(sequence, start=1):
            record = f"user '{user}' position {position}"
            rows.add(
                user_id, parse_id(item, file=uri, record=record, field="item_id"), None, record
            )
    return rows.table()


def _read_items(uri: str) -> pa.Table:
    data = load_json(uri)
    if not isinstance(data, dict):
        raise DataError("expected a JSON object mapping item -> object of fields", file=uri)
    rows = ItemRows()
    seen: set[str] = set()
    for key, value in object_pairs(data):
        record = f"key '{key}'" if key not in seen else f"key '{key}' (repeated)"
        seen.add(key)
        if not isinstance(value, dict):
            raise DataError(
                f"expected an object of fields, got {type(value).__name__}", file=uri, record=record
            )
        check_fields(value, file=uri, record=record)
        item_id = parse_id(key, file=uri, record=record, field="item_id")
        rows.add(item_id, text_fields(value.items(), scalars=False), record)
    return rows.table()
