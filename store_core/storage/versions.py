"""Semantic-ID versions: :func:`write_semantic_id_version` and the readers of the
versions, codebooks and issued IDs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from store_core.errors import MissingInputError, StoreError
from store_core.storage.checks import RowsInput, _check_codebook_row, _check_rows, _incoming
from store_core.storage.connection import (
    DEFAULT_LOCK_TIMEOUT_S,
    QUERY_LOCK_TIMEOUT_S,
    _connect_writer,
    _first,
    _has_table,
    _local_path,
    _transaction,
    connect_read_only_with_retry,
    logger,
)
from store_core.storage.schema import RENAMED_COLUMNS


class StaleBaseError(StoreError):
    """The version a write was computed from is no longer the newest one: another writer
    committed in between. Nothing was written."""


@dataclass(frozen=True)
class BaseVersion:
    """The version a new version was computed from, re-checked inside the writing
    transaction: the newest version under the codebook being written must still be
    ``version`` (None: there must be none, the base being the checkpoint's clustering)."""

    version: int | None


#: Columns that must match when a codebook version is written again.
_CODEBOOK_LAYOUT = ("quantizer", "cluster_levels", "codebook_size", "level_sizes", "pack_bits")


def _insert_codebook(con: duckdb.DuckDBPyConnection, row: Mapping[str, Any]) -> bool:
    """Insert the codebook row if its version is new; True when inserted."""
    existing = _first(
        con.execute(
            f"SELECT {', '.join(_CODEBOOK_LAYOUT)} FROM codebooks WHERE codebook_version = ?",
            [row["codebook_version"]],
        )
    )
    if existing is not None:
        stored = dict(zip(_CODEBOOK_LAYOUT, existing, strict=True))
        given = {k: row[k] for k in _CODEBOOK_LAYOUT}
        if stored != given:
            raise ValueError(
                f"codebook version {row['codebook_version']} already exists with a different "
                f"layout: stored {stored}, given {given}"
            )
        return False
    con.execute(
        """
        INSERT INTO codebooks (codebook_version, quantizer, cluster_levels, codebook_size,
                               level_sizes, pack_bits, collision_rate, stats, model_uri,
                               mlflow_run_id, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, coalesce(?, now()::TIMESTAMP))
        """,
        [
            row["codebook_version"],
            row["quantizer"],
            row["cluster_levels"],
            row["codebook_size"],
            row["level_sizes"],
            row["pack_bits"],
            row["collision_rate"],
            row["stats"],
            row["model_uri"],
            row["mlflow_run_id"],
            row["created_at"],
        ],
    )
    return True


def write_semantic_id_version(
    path: str,
    codebook_row: Mapping[str, Any],
    rows: RowsInput,
    counts: Mapping[str, int],
    note: str = "",
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    before_commit: Callable[[int], None] | None = None,
    base: BaseVersion | None = None,
) -> int:
    """Write a new, complete semantic-ID version in one transaction; returns its number.

    ``codebook_row``: the ``codebooks`` columns (``codebook_version``, ``quantizer``,
    ``cluster_levels``, ``codebook_size``, ``level_sizes``, ``pack_bits``, optionally
    ``collision_rate``, ``stats`` (dict or JSON string), ``model_uri``, ``mlflow_run_id``,
    ``created_at``); inserted when the version is new, else checked against the stored
    layout. ``rows``: :data:`SEMANTIC_ID_ROWS_SCHEMA` as an Arrow table or a Parquet file
    path, every item of the version, removed ones with ``active = False``; validated
    (lengths, code ranges, ``packed``, ``sid``, ``method``) before the file is opened.
    ``counts``: new/changed/removed/unchanged (any str -> int, stored as JSON).

    Order inside the transaction: codebook row, all ID rows (``ORDER BY packed``), then
    the ``semantic_id_versions`` row, then COMMIT. ``before_commit(version)`` runs after
    the rows and before the version row (a hook for tests and progress reporting); an
    exception anywhere rolls everything back and the previous version stays current.
    Duplicate sids or item_ids violate the table's UNIQUE constraints: ValueError, and
    nothing is written.

    ``base``: the version the rows were computed from. When given, the first statement of
    the transaction checks that it is still the newest version under the codebook (a
    writer that committed in between would otherwise be silently overwritten by rows
    computed from a stale base) and raises :class:`StaleBaseError`, writing nothing,
    when it is not. :class:`StoreError` when the database stays locked for
    ``lock_timeout_s``.
    """
    codebook = _check_codebook_row(codebook_row)
    has_hash, row_count = _check_rows(rows, codebook)
    counts_json = json.dumps({str(k): int(v) for k, v in counts.items()}, sort_keys=True)
    content_hash = "content_hash" if has_hash else "NULL"
    with _connect_writer(path, lock_timeout_s) as con, _incoming(con, rows), _transaction(con):
        if base is not None:
            _check_base(con, str(codebook["codebook_version"]), base)
        version = _next_version(con)
        created = _insert_codebook(con, codebook)
        try:
            con.execute(
                f"""
                INSERT INTO semantic_ids (version, codebook_version, item_id, codes,
                    c0, c1, c2, c3, sid, packed, method, active, content_hash, created_at)
                SELECT $version, $codebook_version, item_id, codes::INTEGER[],
                       codes[1], codes[2], codes[3], codes[4], sid, packed,
                       method, active, {content_hash}, now()::TIMESTAMP
                FROM incoming
                ORDER BY packed
                """,
                {"version": version, "codebook_version": codebook["codebook_version"]},
            )
        except duckdb.ConstraintException as exc:
            raise ValueError(
                f"semantic-ID version {version} rejected, nothing was written: {exc}"
            ) from exc
        if before_commit is not None:
            before_commit(version)
        con.execute(
            """
            INSERT INTO semantic_id_versions (version, codebook_version, created_at,
                item_count, row_count, counts, note, model_uri, mlflow_run_id)
            SELECT $version, $codebook_version, now()::TIMESTAMP,
                   count(*) FILTER (WHERE active), count(*), $counts, $note,
                   $model_uri, $mlflow_run_id
            FROM incoming
            """,
            {
                "version": version,
                "codebook_version": codebook["codebook_version"],
                "counts": counts_json,
                "note": note,
                "model_uri": codebook["model_uri"],
                "mlflow_run_id": codebook["mlflow_run_id"],
            },
        )
    logger.info(
        "semantic IDs: version %d (codebook %s%s), %d rows, %s",
        version,
        codebook["codebook_version"],
        ", new" if created else "",
        row_count,
        counts_json,
    )
    return version


def _check_base(con: duckdb.DuckDBPyConnection, codebook_version: str, base: BaseVersion) -> None:
    row = _first(
        con.execute(
            "SELECT max(version) FROM semantic_id_versions WHERE codebook_version = ?",
            [codebook_version],
        )
    )
    newest = None if row is None or row[0] is None else int(row[0])
    if newest != base.version:
        read = "no version" if base.version is None else f"version {base.version}"
        raise StaleBaseError(
            f"semantic-ID version {newest} (codebook {codebook_version}) was committed after "
            f"this run read {read} as its base; nothing was written: run "
            "tokenize-catalogue again"
        )


def _next_version(con: duckdb.DuckDBPyConnection) -> int:
    row = _first(
        con.execute(
            """
        SELECT greatest(
            (SELECT coalesce(max(version), 0) FROM semantic_id_versions),
            (SELECT coalesce(max(version), 0) FROM semantic_ids)) + 1
        """
        )
    )
    assert row is not None
    return int(row[0])


def latest_version(path: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S) -> int | None:
    """The newest complete semantic-ID version, or None when there is none (or no file)."""
    if not os.path.exists(_local_path(path)):
        return None
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "semantic_id_versions"):
            return None
        row = _first(con.execute("SELECT max(version) FROM semantic_id_versions"))
    return None if row is None or row[0] is None else int(row[0])


def current_ids(path: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S) -> pa.Table:
    """The active rows of the newest complete version (``current_semantic_ids``), by packed.

    Raises :class:`StoreError` when no version has been written.
    """
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "current_semantic_ids"):
            raise MissingInputError(path, "tokenize-catalogue", problem="has no semantic IDs yet")
        return con.sql("SELECT * FROM current_semantic_ids ORDER BY packed").to_arrow_table()


def codebook_rows(path: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every ``codebooks`` row, oldest first, ``stats`` parsed from JSON; the columns of
    an older database under their current names (:data:`.schema.RENAMED_COLUMNS`)."""
    if not os.path.exists(_local_path(path)):
        return []
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "codebooks"):
            return []
        rows = con.sql("SELECT * FROM codebooks ORDER BY created_at, codebook_version")
        out = rows.to_arrow_table().to_pylist()
    for row in out:
        for table, old, new in RENAMED_COLUMNS:  # a database no writer has upgraded yet
            if table == "codebooks" and old in row and new not in row:
                row[new] = row.pop(old)
        if isinstance(row.get("stats"), str):
            row["stats"] = json.loads(row["stats"])
    return out


def current_rows(
    path: str, codebook_version: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> pa.Table | None:
    """Every row (active and inactive) of the newest version written under
    ``codebook_version``, by packed; None when there is none (or no database).

    The base a re-tokenization starts from: unchanged items keep these IDs and removed
    items are carried on inactive.
    """
    if not os.path.exists(_local_path(path)):
        return None
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "semantic_id_versions"):
            return None
        row = _first(
            con.execute(
                "SELECT max(version) FROM semantic_id_versions WHERE codebook_version = ?",
                [codebook_version],
            )
        )
        if row is None or row[0] is None:
            return None
        return con.sql(
            "SELECT * FROM semantic_ids WHERE version = $version ORDER BY packed",
            params={"version": int(row[0])},
        ).to_arrow_table()


def issued_codes(
    path: str, codebook_version: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> list[list[int]]:
    """Every distinct ID (as codes) in any complete version under ``codebook_version``,
    by packed: the IDs that must never be handed to another item."""
    if not os.path.exists(_local_path(path)):
        return []
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "semantic_id_versions"):
            return []
        rows = con.execute(
            """
            SELECT DISTINCT s.packed, s.codes
            FROM semantic_ids s JOIN semantic_id_versions v USING (version)
            WHERE s.codebook_version = ?
            ORDER BY s.packed
            """,
            [codebook_version],
        ).fetchall()
    return [list(codes) for _, codes in rows]
