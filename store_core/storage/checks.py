"""Validation of a semantic-ID version's input (codebook row and ID rows), run on an
in-memory DuckDB before the database file is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeAlias

import duckdb
import pyarrow as pa

from store_core.storage.connection import _first, _local_path
from store_core.storage.schema import _REQUIRED_ROW_COLUMNS, SEMANTIC_ID_ROWS_SCHEMA

_CODEBOOK_REQUIRED = (
    "codebook_version",
    "quantizer",
    "cluster_levels",
    "codebook_size",
    "level_sizes",
    "pack_bits",
)
_CODEBOOK_OPTIONAL = ("collision_rate", "stats", "model_uri", "mlflow_run_id", "created_at")


def _check_codebook_row(codebook_row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in _CODEBOOK_REQUIRED if codebook_row.get(k) is None]
    unknown = sorted(set(codebook_row) - set(_CODEBOOK_REQUIRED) - set(_CODEBOOK_OPTIONAL))
    if missing or unknown:
        raise ValueError(
            f"codebook row: missing {missing}, unknown {unknown}; expected keys "
            f"{list(_CODEBOOK_REQUIRED)} and optionally {list(_CODEBOOK_OPTIONAL)}"
        )
    row: dict[str, Any] = {
        k: codebook_row.get(k) for k in (*_CODEBOOK_REQUIRED, *_CODEBOOK_OPTIONAL)
    }
    row["level_sizes"] = [int(s) for s in row["level_sizes"]]
    for key in ("cluster_levels", "codebook_size", "pack_bits"):
        row[key] = int(row[key])
    bits, sizes = row["pack_bits"], row["level_sizes"]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"codebook row: level_sizes must be positive, got {sizes}")
    if bits < 1 or bits * len(sizes) > 63:
        raise ValueError(
            f"codebook row: {len(sizes)} levels x pack_bits {bits} do not fit in a BIGINT"
        )
    if max(sizes) > (1 << bits):
        raise ValueError(f"codebook row: a level of {max(sizes)} codes needs > {bits} bits")
    if row["stats"] is not None and not isinstance(row["stats"], str):
        row["stats"] = json.dumps(row["stats"], sort_keys=True)
    return row


#: Checks of an incoming semantic-ID table, run on an in-memory DuckDB before the
#: database file is opened: (description, SQL returning the first offending item_id).
_ROW_CHECKS = (
    (
        "has a NULL field",
        "item_id IS NULL OR codes IS NULL OR sid IS NULL OR packed IS NULL "
        "OR method IS NULL OR active IS NULL OR list_contains(codes, NULL)",
    ),
    ("has the wrong number of codes", "len(codes) <> $m"),
    (
        "has a code out of range for the codebook's level_sizes",
        "list_bool_or(list_transform(codes, lambda c, i: c < 0 OR c >= $sizes[i]))",
    ),
    (
        "has a method other than 'cluster' or 'generated'",
        "method NOT IN ('cluster', 'generated')",
    ),
    (
        "has a packed value that is not pack_codes(codes, pack_bits)",
        "packed <> list_sum(list_transform(codes, lambda c, i: c::BIGINT << ($bits * ($m - i))))",
    ),
    (
        "has a sid that is not format_sid(codes)",
        "sid <> array_to_string(list_transform(codes, "
        "lambda c, i: '<' || chr(96 + i::INTEGER) || '_' || c::VARCHAR || '>'), '')",
    ),
)


#: What :func:`write_semantic_id_version` takes: an Arrow table or a Parquet file path.
RowsInput: TypeAlias = pa.Table | str | os.PathLike[str]


@contextmanager
def _incoming(con: duckdb.DuckDBPyConnection, rows: RowsInput) -> Iterator[list[str]]:
    """Expose ``rows`` (an Arrow table or a Parquet file) as the view ``incoming``.

    Yields the input's column names. A Parquet file is streamed by DuckDB, never loaded
    whole into Python.
    """
    if isinstance(rows, pa.Table):
        con.register("incoming", rows)
        try:
            yield list(rows.column_names)
        finally:
            con.unregister("incoming")
        return
    literal = "'" + _local_path(os.fspath(rows)).replace("'", "''") + "'"
    con.execute(f"CREATE OR REPLACE TEMP VIEW incoming AS SELECT * FROM read_parquet({literal})")
    try:
        result = con.execute("SELECT * FROM incoming LIMIT 0")
        columns = [d[0] for d in result.description or []]
        result.fetchall()
        yield columns
    finally:
        con.execute("DROP VIEW IF EXISTS incoming")


def _check_rows(rows: RowsInput, codebook: Mapping[str, Any]) -> tuple[bool, int]:
    """Validate the input; returns (has a content_hash column, row count)."""
    params = {
        "m": len(codebook["level_sizes"]),
        "sizes": codebook["level_sizes"],
        "bits": codebook["pack_bits"],
    }
    with duckdb.connect(":memory:") as mem, _incoming(mem, rows) as columns:
        missing = [n for n in _REQUIRED_ROW_COLUMNS if n not in columns]
        if missing:
            raise ValueError(
                f"semantic-ID rows lack columns {missing}; expected {SEMANTIC_ID_ROWS_SCHEMA}"
            )
        for problem, condition in _ROW_CHECKS:
            used = {k: v for k, v in params.items() if f"${k}" in condition}
            bad = _first(
                mem.execute(
                    f"SELECT item_id, sid, codes FROM incoming WHERE {condition} LIMIT 1", used
                )
            )
            if bad is not None:
                raise ValueError(
                    f"semantic-ID rows: item {bad[0]!r} (sid {bad[1]!r}, codes {bad[2]}) "
                    f"{problem} (codebook {codebook['codebook_version']}: "
                    f"level_sizes {codebook['level_sizes']}, pack_bits {codebook['pack_bits']})"
                )
        count = _first(mem.execute("SELECT count(*) FROM incoming"))
    assert count is not None
    return "content_hash" in columns, int(count[0])
