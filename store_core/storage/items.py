"""The catalogue table ``items``: :func:`upsert_items`."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from store_core.storage.connection import (
    DEFAULT_LOCK_TIMEOUT_S,
    _connect_writer,
    _first,
    _transaction,
    logger,
)


def upsert_items(path: str, items: pa.Table) -> dict[str, int]:
    """Load the catalogue into ``items`` in one transaction.

    New ids are inserted, rows whose ``content_hash`` changed are updated, ids missing from
    ``items`` are marked inactive (never deleted), and unchanged rows are not touched, so
    re-ingesting the same source changes nothing. Returns the counts of each case:
    ``new``, ``changed`` (another ``content_hash``, active or not), ``restored`` (inactive
    and back with the same ``content_hash``), ``unchanged`` and ``removed`` (active and
    gone) - the categories and rule tokenize-catalogue counts a version by
    (:func:`store_core.catalogue.change_category`), so the two stages agree.
    """
    with _connect_writer(path, DEFAULT_LOCK_TIMEOUT_S) as con:
        con.register("incoming", items)
        try:
            with _transaction(con):
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
        finally:
            con.unregister("incoming")
    logger.info("items table: %s", counts)
    return counts


def _counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    row = _first(
        con.execute(
            """
        SELECT
          count(*) FILTER (WHERE t.item_id IS NULL),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND t.content_hash IS DISTINCT FROM i.content_hash),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND t.content_hash = i.content_hash AND t.active),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND t.content_hash = i.content_hash AND NOT t.active)
        FROM incoming i LEFT JOIN items t ON t.item_id = i.item_id
        """
        )
    )
    removed = _first(
        con.execute(
            "SELECT count(*) FROM items "
            "WHERE active AND item_id NOT IN (SELECT item_id FROM incoming)"
        )
    )
    assert row is not None and removed is not None
    return {
        "new": int(row[0]),
        "changed": int(row[1]),
        "restored": int(row[3]),
        "unchanged": int(row[2]),
        "removed": int(removed[0]),
    }
