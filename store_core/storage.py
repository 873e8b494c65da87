"""DuckDB: the only module that imports duckdb.

The workspace database (``<workspace>/store.duckdb``) holds the catalogue as last ingested
(``items``) and, in later stages, the semantic-ID versions. Writers open it read-write
inside one transaction; queries open it read-only so they cannot change anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb
import pyarrow as pa

from store_core.errors import StoreError
from store_core.schemas import ITEMS_TABLE_DDL

logger = logging.getLogger(__name__)


def _local_path(path: str) -> str:
    if "://" in path and not path.startswith("file://"):
        raise StoreError(
            f"DuckDB database {path}: the workspace database must be on a local filesystem"
        )
    return path.removeprefix("file://")


@contextmanager
def connect(path: str, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the workspace database (created on first read-write use)."""
    local = _local_path(path)
    if read_only and not os.path.exists(local):
        raise StoreError(f"DuckDB database {local} does not exist: run `store ingest` first")
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    con = duckdb.connect(local, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


def upsert_items(path: str, items: pa.Table) -> dict[str, int]:
    """Load the catalogue into ``items`` in one transaction.

    New ids are inserted, rows whose ``content_hash`` changed are updated, ids missing from
    ``items`` are marked inactive (never deleted), and unchanged rows are not touched, so
    re-ingesting the same source changes nothing. Returns the counts of each case.
    """
    with connect(path) as con:
        con.execute(ITEMS_TABLE_DDL)
        con.register("incoming", items)
        try:
            con.execute("BEGIN TRANSACTION")
            counts = _counts(con)
            con.execute(
                """
                INSERT INTO items
                SELECT i.item_id, i.title, i.fields, i.text, i.content_hash, TRUE,
                       now()::TIMESTAMP, now()::TIMESTAMP
                FROM incoming i ANTI JOIN items t ON t.item_id = i.item_id
                """
            )
            con.execute(
                """
                UPDATE items SET title = i.title, fields = i.fields, text = i.text,
                       content_hash = i.content_hash, active = TRUE,
                       updated_at = now()::TIMESTAMP
                FROM incoming i
                WHERE items.item_id = i.item_id
                  AND (items.content_hash <> i.content_hash OR NOT items.active)
                """
            )
            con.execute(
                """
                UPDATE items SET active = FALSE, updated_at = now()::TIMESTAMP
                WHERE active AND item_id NOT IN (SELECT item_id FROM incoming)
                """
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("incoming")
    logger.info("items table: %s", counts)
    return counts


def _counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    row = con.execute(
        """
        SELECT
          count(*) FILTER (WHERE t.item_id IS NULL),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND (t.content_hash <> i.content_hash OR NOT t.active)),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND t.content_hash = i.content_hash AND t.active)
        FROM incoming i LEFT JOIN items t ON t.item_id = i.item_id
        """
    ).fetchone()
    removed = con.execute(
        "SELECT count(*) FROM items WHERE active AND item_id NOT IN (SELECT item_id FROM incoming)"
    ).fetchone()
    assert row is not None and removed is not None
    return {
        "new": int(row[0]),
        "changed": int(row[1]),
        "unchanged": int(row[2]),
        "removed": int(removed[0]),
    }


def query(path: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one SQL statement on a read-only connection; returns (column names, rows)."""
    with connect(path, read_only=True) as con:
        try:
            result = con.execute(sql)
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from None
        columns = [d[0] for d in result.description or []]
        return columns, result.fetchall()
