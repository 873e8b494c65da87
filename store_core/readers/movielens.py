"""MovieLens 100K in its original GroupLens layout.

Files in the source directory (names overridable with ``data.interactions_file`` /
``data.items_file``; ``.gz`` variants are read transparently):

- ``u.data``: ``user \\t item \\t rating \\t unix-time`` (any whitespace separates).
- ``u.item``: latin-1, pipe-separated: ``id|title|release date|video release date|IMDb URL|``
  followed by one 0/1 flag per genre.
- ``u.genre`` (optional): ``name|index`` lines naming the flags; the standard 19 names are
  used when it is absent.

Item fields, in order: ``title``, ``release_date``, ``genres`` (names of the set flags,
joined with ", "); empty values are omitted. ``data.min_rating`` keeps ratings >= it.
Records are ``"line N"`` (1-based line of the file the row came from).
"""

from __future__ import annotations

import pyarrow as pa

from store_core.config import DataConfig
from store_core.errors import DataError
from store_core.readers.base import RawCatalog
from store_core.readers.fsutil import (
    InteractionRows,
    ItemRows,
    exists,
    iter_lines,
    join,
    keep_rating,
    parse_id,
    parse_timestamp,
    text_fields,
)

#: Genre flag names of MovieLens 100K, in flag order (the content of ``u.genre``).
STANDARD_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

_ITEM_TEXT_COLUMNS = 5  # id, title, release date, video release date, IMDb URL


def read(cfg: DataConfig, path: str) -> RawCatalog:
    """Read ``u.data``, ``u.item`` and (if present) ``u.genre`` from ``path``."""
    data_uri = join(path, cfg.interactions_file or "u.data")
    item_uri = join(path, cfg.items_file or "u.item")
    genre_uri = join(path, "u.genre")
    inputs = [data_uri, item_uri]
    genres: tuple[str, ...] = STANDARD_GENRES
    if exists(genre_uri):
        genres = _read_genres(genre_uri)
        inputs.append(genre_uri)
    return RawCatalog(
        items=_read_items(item_uri, genres),
        interactions=_read_interactions(data_uri, cfg.min_rating),
        items_file=item_uri,
        interactions_file=data_uri,
        inputs=inputs,
    )


def _read_genres(uri: str) -> tuple[str, ...]:
    by_index: dict[int, str] = {}
    for number, line in iter_lines(uri, "latin-1"):
        if not line.strip():
            continue
        name, sep, index = line.rpartition("|")
        record = f"line {number}"
        digits = index.strip()
        if not sep or not name or not digits.isdigit() or len(digits) > 9:
            raise DataError(f"expected 'name|index', got {line[:80]!r}", file=uri, record=record)
        by_index[int(digits)] = name
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"genre indices must be 0..n-1, got {sorted(by_index)}", file=uri)
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_items(uri: str, genres: tuple[str, ...]) -> pa.Table:
    rows = ItemRows()
    expected = _ITEM_TEXT_COLUMNS + len(genres)
    for number, line in iter_lines(uri, "latin-1"):
        if not line.strip():
            continue
        record = f"line {number}"
        parts = line.split("|")
        if len(parts) != expected:
            raise DataError(
                f"expected {expected} '|'-separated fields, got {len(parts)}",
                file=uri,
                record=record,
            )
        item_id = parse_id(parts[0], file=uri, record=record, field="item_id")
        names = []
        for name, flag in zip(genres, parts[_ITEM_TEXT_COLUMNS:], strict=True):
            if flag.strip() not in ("0", "1"):
                raise DataError(
                    f"genre flag must be 0 or 1, got {flag!r}", file=uri, record=record, field=name
                )
            if flag.strip() == "1":
                names.append(name)
        fields = text_fields([("title", parts[1]), ("release_date", parts[2]), ("genres", names)])
        rows.add(item_id, fields, record)
    return rows.table()


def _read_interactions(uri: str, min_rating: float | None) -> pa.Table:
    rows = InteractionRows()
    for number, line in iter_lines(uri):
        if not line.strip():
            continue
        record = f"line {number}"
        parts = line.split()
        if len(parts) != 4:
            raise DataError(
                f"expected 4 fields (user, item, rating, timestamp), got {len(parts)}",
                file=uri,
                record=record,
            )
        user, item, rating, stamp = parts
        if not keep_rating(min_rating, rating, file=uri, record=record, field="rating"):
            continue
        rows.add(
            parse_id(user, file=uri, record=record, field="user_id"),
            parse_id(item, file=uri, record=record, field="item_id"),
            parse_timestamp(stamp, file=uri, record=record, field="timestamp"),
            record,
        )
    return rows.table()
