"""Generic Parquet or CSV tables with a column mapping (``data.columns``).

Files: ``data.interactions_file`` (default ``interactions.parquet``, else
``interactions.csv``) and ``data.items_file`` (default ``items.parquet``, else
``items.csv``); the format follows the extension (``.parquet``/``.pq``, ``.csv``/``.csv.gz``).
CSV files have a header row and every column is read as a string (ids keep leading zeros).

- Interactions: columns ``columns.user_id``, ``columns.item_id`` and, unless it is null,
  ``columns.timestamp``: unix seconds (integer or with a fraction, as numbers or CSV
  text), a Parquet timestamp of any unit or a date, or null values. Every form becomes
  float unix seconds with the fraction kept (``timestamp[ms]`` 1400000100900 ->
  1400000100.9), exactly as the other readers give them; a time outside years 1..9999
  (e.g. a uint64 near 2**64) is a DataError naming the row and column.
  ``data.min_rating`` filters on a column named ``rating``, which it then requires.
- Items: ``columns.item_id`` plus the text fields ``columns.text_fields`` (default: every
  other column, in file order). Values are converted to strings (lists joined with ", "),
  empty ones omitted.

Ids become strings (integers as their decimal form). A mapped column missing from a file,
or a column name used twice in one file (pandas would rename the second ``name.1``,
Arrow cannot select it), is a DataError naming the file and the field. Records are
``"row N"`` (1-based data row, header excluded).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from store_core.config import DataConfig
from store_core.errors import DataError
from store_core.readers.base import RawCatalog
from store_core.readers.fsutil import (
    InteractionRows,
    ItemRows,
    exists,
    join,
    keep_rating,
    open_arrow,
    parse_id,
    parse_timestamp,
    text_fields,
)

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")


def read(cfg: DataConfig, path: str) -> RawCatalog:
    """Read the interactions and items tables from ``path`` using ``cfg.columns``."""
    inter_uri = _locate(path, cfg.interactions_file, "interactions")
    item_uri = _locate(path, cfg.items_file, "items")
    return RawCatalog(
        items=_read_items(cfg, item_uri),
        interactions=_read_interactions(cfg, inter_uri),
        items_file=item_uri,
        interactions_file=inter_uri,
        inputs=[inter_uri, item_uri],
    )


def _locate(path: str, configured: str | None, stem: str) -> str:
    if configured:
        return join(path, configured)
    for suffix in (".parquet", ".csv"):
        uri = join(path, stem + suffix)
        if exists(uri):
            return uri
    raise DataError(
        f"file not found (looked for {stem}.parquet and {stem}.csv)",
        file=join(path, f"{stem}.parquet"),
    )


def _load(uri: str, required: Iterable[str], everything: bool) -> pa.Table:
    """The table in ``uri``: all columns, or only ``required``; checks they exist."""
    wanted = list(dict.fromkeys(required))
    lower = uri.lower()
    try:
        if lower.endswith(PARQUET_SUFFIXES):
            with open_arrow(uri, compression=None) as source:
                parquet = pq.ParquetFile(source)
                _check_columns(uri, parquet.schema_arrow.names, wanted)
                return parquet.read(columns=None if everything else wanted)
        if lower.endswith(CSV_SUFFIXES):
            with open_arrow(uri) as source:
                names = pacsv.open_csv(source).schema.names
            _check_columns(uri, names, wanted)
            convert = pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                include_columns=None if everything else wanted,
            )
            with open_arrow(uri) as source:
                return pacsv.read_csv(source, convert_options=convert)
    except pa.ArrowException as exc:
        reason = " ".join(str(exc).split())  # Arrow messages may span lines
        raise DataError(f"cannot parse table: {reason}", file=uri) from None
    raise DataError("unsupported file type: expected .parquet, .pq, .csv or .csv.gz", file=uri)


def _check_columns(uri: str, names: list[str], wanted: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"column name appears {names.count(repeated[0])} times in the header; rename "
            "the columns apart",
            file=uri,
            field=repeated[0],
        )
    for column in wanted:
        if column not in names:
            raise DataError(
                f"column not found (columns: {', '.join(names)}); check data.columns",
                file=uri,
                field=column,
            )


#: Units per second of each Arrow timestamp unit.
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _timestamps(column: pa.ChunkedArray) -> list[object]:
    """A timestamp column as Python values; Arrow timestamps and dates become float unix
    seconds, correctly rounded from their integer count of units (fractions kept)."""
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date64(kind):
        per_second = 1_000 if pa.types.is_date64(kind) else _PER_SECOND[kind.unit]
        counts = column.cast(pa.int64()).to_pylist()
        return [None if c is None else c / per_second for c in counts]
    if pa.types.is_date32(kind):
        return [
            None if d is None else float(d * 86_400) for d in column.cast(pa.int32()).to_pylist()
        ]
    return list(column.to_pylist())


def _read_interactions(cfg: DataConfig, uri: str) -> pa.Table:
    mapping = cfg.columns
    required = [mapping.user_id, mapping.item_id]
    if mapping.timestamp is not None:
        required.append(mapping.timestamp)
    if cfg.min_rating is not None:
        required.append("rating")
    table = _load(uri, required, everything=False)
    count = table.num_rows
    users = table.column(mapping.user_id).to_pylist()
    items = table.column(mapping.item_id).to_pylist()
    stamps = _timestamps(table.column(mapping.timestamp)) if mapping.timestamp else [None] * count
    ratings = table.column("rating").to_pylist() if cfg.min_rating is not None else [None] * count
    rows = InteractionRows()
    for index in range(count):
        record = f"row {index + 1}"
        if not keep_rating(cfg.min_rating, ratings[index], file=uri, record=record, field="rating"):
            continue
        stamp = stamps[index]
        rows.add(
            parse_id(users[index], file=uri, record=record, field=mapping.user_id),
            parse_id(items[index], file=uri, record=record, field=mapping.item_id),
            None
            if stamp is None or stamp == ""
            else parse_timestamp(stamp, file=uri, record=record, field=str(mapping.timestamp)),
            record,
        )
    return rows.table()


def _read_items(cfg: DataConfig, uri: str) -> pa.Table:
    mapping = cfg.columns
    configured = mapping.text_fields
    table = _load(uri, [mapping.item_id, *(configured or [])], everything=configured is None)
    names = configured or [n for n in table.column_names if n != mapping.item_id]
    ids = table.column(mapping.item_id).to_pylist()
    values = [table.column(name).to_pylist() for name in names]
    rows = ItemRows()
    for index, raw_id in enumerate(ids):
        record = f"row {index + 1}"
        item_id = parse_id(raw_id, file=uri, record=record, field=mapping.item_id)
        pairs = [(name, column[index]) for name, column in zip(names, values, strict=True)]
        rows.add(item_id, text_fields(pairs), record)
    return rows.table()
