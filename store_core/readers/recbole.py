"""RecBole atomic files (``<name>.inter`` and ``<name>.item``).

``<name>`` is ``data.name`` or, when unset, the prefix of the single ``*.inter`` file in
the source directory. Both files are tab-separated with a header line of typed columns
``name:type`` (types ``token``, ``token_seq``, ``float``, ``float_seq``).

Files are split into fields the way RecBole 1.2 itself reads them: its
``Dataset._load_feat`` calls ``pandas.read_csv(sep="\\t", engine="python")`` with the
default CSV quoting, i.e. Python's :mod:`csv` dialect with ``quotechar='"'``,
``doublequote=True`` and ``strict=True``. So a field that starts with ``"`` is quoted:
``"Acme ""Pro"" Beaker, 250 ml"`` reads as ``Acme "Pro" Beaker, 250 ml``, and a tab or a
newline inside the quotes belongs to the value; a ``"`` inside an unquoted value
(``12" vinyl``) is kept as is. Blank lines are skipped. An unterminated quote, or text
after a closing quote, is a DataError (pandas raises too). Unlike pandas, a row with a
different number of fields than the header is a DataError, not filled with NaN.

- ``.inter``: ``user_id:token`` and ``item_id:token`` are required; ``timestamp:float``
  (optional) becomes float unix seconds with the fraction kept (RecBole loads it as
  ``float64``), null when the column is absent or the value empty; ``rating:float``
  (optional) is used by ``data.min_rating``, which requires the column.
- ``.item``: ``item_id:token`` plus every other column as a field named without its
  ``:type`` suffix, in column order, raw string value (``token_seq`` values such as the
  ml-100k ``class`` genres stay space-separated), empty values omitted. ``movie_title``
  is renamed ``title`` when there is no ``title`` column, so templates can use ``{title}``
  across datasets.

Records are ``"line N"`` (1-based line where the row starts; the header is line 1).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator

import pyarrow as pa

from store_core.config import DataConfig
from store_core.errors import DataError
from store_core.readers.base import RawCatalog
from store_core.readers.fsutil import (
    InteractionRows,
    ItemRows,
    infer_name,
    iter_lines,
    join,
    keep_rating,
    parse_id,
    parse_timestamp,
    text_fields,
)

COLUMN_TYPES = ("token", "token_seq", "float", "float_seq")


def read(cfg: DataConfig, path: str) -> RawCatalog:
    """Read ``<name>.inter`` and ``<name>.item`` from ``path``."""
    name = cfg.name or infer_name(path, ".inter")
    inter_uri = join(path, f"{name}.inter")
    item_uri = join(path, f"{name}.item")
    return RawCatalog(
        items=_read_items(item_uri),
        interactions=_read_interactions(inter_uri, cfg.min_rating),
        items_file=item_uri,
        interactions_file=inter_uri,
        inputs=[inter_uri, item_uri],
    )


def _split(uri: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, fields)`` per non-blank row, split as RecBole's pandas
    reader splits it (module docstring)."""
    lines = iter_lines(uri)
    last = 0

    def with_newlines() -> Iterator[str]:
        nonlocal last
        for number, text in lines:
            last = number
            yield text + "\n"

    reader = csv.reader(with_newlines(), delimiter="\t", quotechar='"', strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(
                f"cannot split the row into tab-separated fields ({exc})",
                file=uri,
                record=f"line {start}",
            ) from None
        if any(f.strip() for f in fields):
            yield start, fields
        start = last + 1


def _rows(uri: str) -> tuple[list[str], Iterator[tuple[str, list[str]]]]:
    """Column names (type suffix stripped) and an iterator of ``(record, values)``."""
    rows = _split(uri)
    header = next(rows, None)
    if header is None:
        raise DataError("missing header line of 'name:type' columns", file=uri, record="line 1")
    names = []
    for column in header[1]:
        name, sep, kind = column.strip().rpartition(":")
        if not sep or not name or kind not in COLUMN_TYPES:
            raise DataError(
                f"header column must be 'name:type' with type in {', '.join(COLUMN_TYPES)}",
                file=uri,
                record=f"line {header[0]}",
                field=column,
            )
        if name in names:
            raise DataError(
                "duplicate header column", file=uri, record=f"line {header[0]}", field=name
            )
        names.append(name)

    def values() -> Iterator[tuple[str, list[str]]]:
        for number, parts in rows:
            record = f"line {number}"
            if len(parts) != len(names):
                raise DataError(
                    f"expected {len(names)} tab-separated columns, got {len(parts)}",
                    file=uri,
                    record=record,
                )
            yield record, parts

    return names, values()


def _require(uri: str, names: list[str], column: str) -> int:
    if column not in names:
        raise DataError(
            f"required column missing from the header (columns: {', '.join(names)})",
            file=uri,
            record="line 1",
            field=column,
        )
    return names.index(column)


def _read_interactions(uri: str, min_rating: float | None) -> pa.Table:
    names, values = _rows(uri)
    user_col = _require(uri, names, "user_id")
    item_col = _require(uri, names, "item_id")
    time_col = names.index("timestamp") if "timestamp" in names else None
    rating_col = _require(uri, names, "rating") if min_rating is not None else None
    rows = InteractionRows()
    for record, parts in values:
        if rating_col is not None and not keep_rating(
            min_rating, parts[rating_col], file=uri, record=record, field="rating"
        ):
            continue
        timestamp = None
        if time_col is not None and parts[time_col].strip():
            timestamp = parse_timestamp(parts[time_col], file=uri, record=record, field="timestamp")
        rows.add(
            parse_id(parts[user_col], file=uri, record=record, field="user_id"),
            parse_id(parts[item_col], file=uri, record=record, field="item_id"),
            timestamp,
            record,
        )
    return rows.table()


def _read_items(uri: str) -> pa.Table:
    names, values = _rows(uri)
    item_col = _require(uri, names, "item_id")
    field_names = list(names)
    if "title" not in names and "movie_title" in names:
        field_names[names.index("movie_title")] = "title"
    rows = ItemRows()
    for record, parts in values:
        item_id = parse_id(parts[item_col], file=uri, record=record, field="item_id")
        pairs = [
            (n, v) for i, (n, v) in enumerate(zip(field_names, parts, strict=True)) if i != item_col
        ]
        rows.add(item_id, text_fields(pairs), record)
    return rows.table()
