"""P5-style sequential data: a user sequence text file plus item metadata.

Interactions: ``data.interactions_file`` (default ``user_sequence.txt``), one user per
line, ``user item1 item2 ...`` separated by whitespace, items in chronological order. There
are no timestamps (null) and no ratings (``data.min_rating`` is a ConfigError); empty lines
are skipped and a user with no items gives no rows. A user on two lines is a DataError
(a loader that builds a user -> sequence dict keeps the last line silently; which line is
the user's history cannot be guessed). Records: ``"line N position K"`` (both 1-based;
K counts the items after the user id).

Item metadata: ``data.items_file`` (default ``item_meta.json``), in either form, decided
by content:

- JSON lines (the default, ``.gz`` allowed): one object per line with the item id under
  ``item_id`` or, failing that, ``asin``. Lines may be strict JSON or Python literals
  (Amazon 2014 metadata style). Records: ``"line N"``.
- One JSON object mapping item id -> object of fields, recognised when the whole file is a
  single JSON object with neither ``item_id`` nor ``asin`` key. Records: ``"key 'id'"``.

Repeated ids: a key repeated in the mapping form gives two item records (ingest refuses
them when their texts differ; ``json`` alone would keep the last silently); a key
repeated inside one item object with another value is a DataError.

Item fields: every string, number or list value (lists, also nested, flattened and joined
with ", "; ``categories`` deduplicated) in key order, empty values omitted, except the id
keys and the Amazon keys that are not text (image URLs, related-item lists, sales rank).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from store_core.config import DataConfig
from store_core.errors import DataError
from store_core.readers.base import RawCatalog
from store_core.readers.fsutil import (
    InteractionRows,
    ItemRows,
    check_fields,
    iter_lines,
    join,
    json_object_lines,
    load_json_text,
    object_pairs,
    parse_id,
    read_text,
    reject_min_rating,
    text_fields,
)

ID_KEYS = ("item_id", "asin")
SKIP_KEYS = frozenset(
    {
        *ID_KEYS,
        "imUrl",
        "imageURL",
        "imageURLHighRes",
        "related",
        "also_buy",
        "also_view",
        "salesRank",
    }
)


def read(cfg: DataConfig, path: str) -> RawCatalog:
    """Read the user sequence file and the item metadata from ``path``."""
    reject_min_rating(cfg.min_rating, "p5")
    inter_uri = join(path, cfg.interactions_file or "user_sequence.txt")
    item_uri = join(path, cfg.items_file or "item_meta.json")
    return RawCatalog(
        items=_read_items(item_uri),
        interactions=_read_interactions(inter_uri),
        items_file=item_uri,
        interactions_file=inter_uri,
        inputs=[inter_uri, item_uri],
    )


def _read_interactions(uri: str) -> pa.Table:
    rows = InteractionRows()
    first_line: dict[str, int] = {}
    for number, line in iter_lines(uri):
        parts = line.split()
        if not parts:
            continue
        user_id = parse_id(parts[0], file=uri, record=f"line {number}", field="user_id")
        if user_id in first_line:
            raise DataError(
                f"user '{user_id}' already has a sequence on line {first_line[user_id]}; "
                "each user must be on one line",
                file=uri,
                record=f"line {number}",
                field="user_id",
            )
        first_line[user_id] = number
        for position, item in enumerate(parts[1:], start=1):
            record = f"line {number} position {position}"
            rows.add(user_id, item, None, record)
    return rows.table()


def _fields(obj: dict[Any, Any]) -> list[tuple[str, str]]:
    pairs = [(str(k), v) for k, v in obj.items() if k not in SKIP_KEYS]
    return text_fields(pairs, dedupe=("categories",))


def _read_items(uri: str) -> pa.Table:
    rows = ItemRows()
    text = read_text(uri)
    mapping = _as_mapping(text)
    if mapping is not None:
        seen: set[str] = set()
        for key, value in object_pairs(mapping):
            record = f"key '{key}'" if key not in seen else f"key '{key}' (repeated)"
            seen.add(key)
            if not isinstance(value, dict):
                raise DataError(
                    f"expected an object of fields, got {type(value).__name__}",
                    file=uri,
                    record=record,
                )
            check_fields(value, file=uri, record=record)
            rows.add(
                parse_id(key, file=uri, record=record, field="item_id"), _fields(value), record
            )
        return rows.table()
    for record, obj in json_object_lines(enumerate(text.split("\n"), start=1), file=uri):
        id_key = next((k for k in ID_KEYS if k in obj), ID_KEYS[0])
        item_id = parse_id(obj.get(id_key), file=uri, record=record, field=id_key)
        rows.add(item_id, _fields(obj), record)
    return rows.table()


def _as_mapping(text: str) -> dict[Any, Any] | None:
    """The whole file as an id -> fields mapping, or None when it is JSON lines."""
    try:
        data = load_json_text(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if isinstance(data, dict) and not any(k in data for k in ID_KEYS):
        return data
    return None
