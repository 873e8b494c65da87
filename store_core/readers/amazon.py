"""Amazon review data (McAuley lab), 2014 and 2018 releases, as JSON lines.

Both files are JSON lines (``.json``/``.jsonl``, optionally ``.gz``). Each line is parsed as
strict JSON (2018 form) and, failing that, as a Python literal (the 2014 metadata form
with single quotes); a line that is neither is a DataError naming the file and line.

- Reviews: ``data.interactions_file``, default the only ``*.json[l][.gz]`` file in the
  directory not starting with ``meta`` (or, when several, the only one containing
  ``reviews``). Required keys ``reviewerID``, ``asin``, ``unixReviewTime`` (int seconds);
  ``overall`` (the rating) is used by ``data.min_rating`` and then required.
- Metadata: ``data.items_file``, default the only JSON file starting with ``meta``.
  Required key ``asin``. Fields, in order: ``title``, ``description`` (string or list),
  ``brand``, ``categories`` (from ``categories`` (2014, list of lists) or ``category``
  (2018, list); flattened, repeated names dropped, joined with ", "). Other keys are ignored.

Lines are read as the McAuley-lab loaders read them: ``json.loads`` for strict JSON and,
for the 2014 Python-literal form, :func:`ast.literal_eval` (never ``eval``, which their
sample code used). Both keep the last of a repeated key silently; here a key repeated in
one line with another value is a DataError naming the key. ``unixReviewTime`` may carry
a fraction (kept). An id or time of more than 4300 digits, or nesting too deep for the
parser, is a DataError naming the line, not a traceback.

Records are ``"line N"`` (1-based). k-core filtering and deduplication happen in ingest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from store_core.config import DataConfig
from store_core.readers.base import RawCatalog
from store_core.readers.fsutil import (
    InteractionRows,
    ItemRows,
    find_one,
    iter_lines,
    join,
    json_object_lines,
    keep_rating,
    list_files,
    parse_id,
    parse_timestamp,
    text_fields,
)

JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def read(cfg: DataConfig, path: str) -> RawCatalog:
    """Read the review and metadata JSON-lines files from ``path``."""
    reviews_uri, meta_uri = _choose_files(cfg, path)
    return RawCatalog(
        items=_read_items(meta_uri),
        interactions=_read_interactions(reviews_uri, cfg.min_rating),
        items_file=meta_uri,
        interactions_file=reviews_uri,
        inputs=[reviews_uri, meta_uri],
    )


def _choose_files(cfg: DataConfig, path: str) -> tuple[str, str]:
    if cfg.interactions_file and cfg.items_file:
        return join(path, cfg.interactions_file), join(path, cfg.items_file)
    names = [n for n in list_files(path) if n.lower().endswith(JSON_SUFFIXES)]
    if cfg.interactions_file:
        reviews = join(path, cfg.interactions_file)
    else:
        others = [n for n in names if not n.startswith("meta")]
        if len(others) == 1:
            reviews = join(path, others[0])
        else:
            reviews = find_one(path, "*reviews*", "reviews", names=others)
    if cfg.items_file:
        meta = join(path, cfg.items_file)
    else:
        meta = find_one(path, "meta*", "metadata", names=names)
    return reviews, meta


def _records(uri: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(record, object)`` for each non-empty line of a JSON-lines file."""
    yield from json_object_lines(iter_lines(uri), file=uri)


def _read_interactions(uri: str, min_rating: float | None) -> pa.Table:
    rows = InteractionRows()
    for record, obj in _records(uri):
        if not keep_rating(
            min_rating, obj.get("overall"), file=uri, record=record, field="overall"
        ):
            continue
        rows.add(
            parse_id(obj.get("reviewerID"), file=uri, record=record, field="reviewerID"),
            parse_id(obj.get("asin"), file=uri, record=record, field="asin"),
            parse_timestamp(
                obj.get("unixReviewTime"), file=uri, record=record, field="unixReviewTime"
            ),
            record,
        )
    return rows.table()


def _read_items(uri: str) -> pa.Table:
    rows = ItemRows()
    for record, obj in _records(uri):
        item_id = parse_id(obj.get("asin"), file=uri, record=record, field="asin")
        categories = obj.get("categories", obj.get("category"))
        pairs = [
            ("title", obj.get("title")),
            ("description", obj.get("description")),
            ("brand", obj.get("brand")),
            ("categories", categories),
        ]
        rows.add(item_id, text_fields(pairs, dedupe=("categories",)), record)
    return rows.table()
