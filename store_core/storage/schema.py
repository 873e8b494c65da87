"""The DuckDB schema: tables, views and macros, created by :func:`ensure_schema`.

See :mod:`store_core.storage` for what each table, view and macro holds.
"""

from __future__ import annotations

import duckdb

from store_core.schemas import ITEMS_TABLE_DDL, SEMANTIC_ID_ROW_SCHEMA

#: Methods that produce a semantic ID: the quantizer's clustering of the trained
#: catalogue, or generation by the trained model for a new item.
SID_METHODS = ("cluster", "generated")

#: The Arrow input of :func:`write_semantic_id_version`: one row per item of the new
#: version, :data:`store_core.schemas.SEMANTIC_ID_ROW_SCHEMA` (the one semantic-ID row).
#: ``sid`` and ``packed`` are checked against ``codes``. ``content_hash`` is optional: a
#: missing column stores NULL. Extra columns are ignored.
SEMANTIC_ID_ROWS_SCHEMA = SEMANTIC_ID_ROW_SCHEMA

#: The columns of :data:`SEMANTIC_ID_ROWS_SCHEMA` an input must have.
_REQUIRED_ROW_COLUMNS = ("item_id", "codes", "sid", "packed", "method", "active")

#: ``codebooks``: one row per codebook version.
CODEBOOKS_DDL = """
CREATE TABLE IF NOT EXISTS codebooks (
    codebook_version VARCHAR PRIMARY KEY,
    quantizer        VARCHAR NOT NULL,
    cluster_levels   INTEGER NOT NULL,   -- cluster levels L (as the quantizer counts them)
    codebook_size    INTEGER NOT NULL,   -- K
    level_sizes      INTEGER[] NOT NULL, -- codes per level, every level of an ID
    pack_bits        INTEGER NOT NULL,   -- bits per level in semantic_ids.packed
    collision_rate   DOUBLE,
    stats            JSON,
    model_uri        VARCHAR,            -- checkpoint dir or MLflow model URI
    mlflow_run_id    VARCHAR,
    created_at       TIMESTAMP NOT NULL
)
"""

#: ``semantic_ids``: one row per item per write version (a complete snapshot).
SEMANTIC_IDS_DDL = """
CREATE TABLE IF NOT EXISTS semantic_ids (
    version          INTEGER NOT NULL,
    codebook_version VARCHAR NOT NULL,
    item_id          VARCHAR NOT NULL,
    codes            INTEGER[] NOT NULL,
    c0               INTEGER,
    c1               INTEGER,
    c2               INTEGER,
    c3               INTEGER,
    sid              VARCHAR NOT NULL,
    packed           BIGINT NOT NULL,
    method           VARCHAR NOT NULL CHECK (method IN ('cluster', 'generated')),
    active           BOOLEAN NOT NULL,
    content_hash     VARCHAR,            -- of the item text the ID was made from
    created_at       TIMESTAMP NOT NULL,
    UNIQUE (version, sid),
    UNIQUE (version, item_id)
)
"""

#: A plain index on ``semantic_ids.item_id``: item -> ID lookups (``sid_of``,
#: ``neighbours``) become an index scan instead of a scan of every string.
SEMANTIC_IDS_ITEM_INDEX_DDL = """
CREATE INDEX IF NOT EXISTS semantic_ids_item_id ON semantic_ids (item_id)
"""

#: ``semantic_id_versions``: one row per complete version, inserted last.
SEMANTIC_ID_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS semantic_id_versions (
    version          INTEGER PRIMARY KEY,
    codebook_version VARCHAR NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    item_count       BIGINT NOT NULL,    -- active items
    row_count        BIGINT NOT NULL,    -- all rows, removed (inactive) items included
    counts           JSON NOT NULL,      -- {"new": .., "changed": .., "removed": .., ...}
    note             VARCHAR,
    model_uri        VARCHAR,            -- the model that tokenized this version
    mlflow_run_id    VARCHAR             -- the MLflow run that trained it
)
"""

#: Columns added after the first release, added to older databases on open.
_ADDED_COLUMNS = (
    "ALTER TABLE semantic_id_versions ADD COLUMN IF NOT EXISTS model_uri VARCHAR",
    "ALTER TABLE semantic_id_versions ADD COLUMN IF NOT EXISTS mlflow_run_id VARCHAR",
)

#: Columns renamed after the first release: (table, old name, new name). A writer renames
#: them in an older database on open (:func:`ensure_schema`); readers of such a database
#: map the old name (:func:`store_core.storage.codebook_rows`) or say how to upgrade it.
RENAMED_COLUMNS = (("codebooks", "num_levels", "cluster_levels"),)

#: What upgrades a database written before a rename: any command that writes it.
UPGRADE_HINT = "run `store ingest` (or any command that writes the database) to upgrade it"


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND database_name = "
        "current_database()",
        [table],
    ).fetchall()
    return {str(r[0]) for r in rows}


def outdated_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """``table.old_name`` of each renamed column still under its old name in the database
    ``con`` is open on (empty for a current or new database)."""
    out: list[str] = []
    for table, old, new in RENAMED_COLUMNS:
        columns = _columns(con, table)
        if old in columns and new not in columns:
            out.append(f"{table}.{old}")
    return out


def _rename_columns(con: duckdb.DuckDBPyConnection) -> None:
    for table, old, new in RENAMED_COLUMNS:
        if f"{table}.{old}" in outdated_columns(con):
            con.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")


#: ``eval_results``: one metric value per row.
EVAL_RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS eval_results (
    run_id       VARCHAR NOT NULL,
    dataset      VARCHAR NOT NULL,
    system       VARCHAR NOT NULL,
    seed         INTEGER,
    split        VARCHAR NOT NULL,
    metric       VARCHAR NOT NULL,
    value        DOUBLE,
    history_rule VARCHAR,
    created_at   TIMESTAMP NOT NULL,
    UNIQUE (run_id, dataset, system, seed, split, metric, history_rule)
)
"""

#: The views and macros (re-created on every read-write open, so they follow the code).
#: Macro parameters are named so they cannot clash with column names.
VIEWS_AND_MACROS_SQL = (
    """
CREATE OR REPLACE VIEW current_semantic_id_version AS
SELECT * FROM semantic_id_versions
WHERE version = (SELECT max(version) FROM semantic_id_versions)
""",
    # A join (not a scalar subquery) so DuckDB pushes the version down into the scan of
    # semantic_ids as a dynamic filter and skips the row groups of older versions.
    """
CREATE OR REPLACE VIEW current_semantic_ids AS
SELECT s.*
FROM semantic_ids s
JOIN (SELECT max(version) AS current_version FROM semantic_id_versions) v
  ON s.version = v.current_version
WHERE s.active
""",
    """
CREATE OR REPLACE VIEW current_codebook AS
SELECT c.*
FROM codebooks c JOIN current_semantic_id_version v USING (codebook_version)
""",
    # Item lookups go through the item_id index (an index scan needs the item filter
    # alone on the scan, hence the MATERIALIZED CTE): ~2 ms instead of a ~30 ms full scan
    # of 1M rows.
    """
CREATE OR REPLACE MACRO sid_of(for_item) AS (
    WITH hit AS MATERIALIZED (
        SELECT version, sid FROM semantic_ids WHERE item_id = for_item AND active
    )
    SELECT min(sid) FROM hit JOIN current_semantic_id_version USING (version)
)
""",
    """
CREATE OR REPLACE MACRO item_of(for_sid) AS (
    SELECT min(item_id) FROM current_semantic_ids WHERE sid = for_sid
)
""",
    """
CREATE OR REPLACE MACRO neighbours(for_item, n) AS TABLE
WITH hit AS MATERIALIZED (
    SELECT version, packed, len(codes) AS m
    FROM semantic_ids WHERE item_id = for_item AND active
), me AS (
    SELECT hit.packed, cb.pack_bits * (hit.m - greatest(0, least(n, hit.m))) AS shift
    FROM hit
    JOIN current_semantic_id_version v USING (version)
    JOIN codebooks cb USING (codebook_version)
), bounds AS (
    SELECT (packed >> shift) << shift AS lo,
           ((packed >> shift) << shift) | ((1::HUGEINT << shift) - 1)::BIGINT AS hi
    FROM me
)
SELECT s.*
FROM current_semantic_ids s, bounds b
WHERE s.packed BETWEEN b.lo AND b.hi AND s.item_id <> for_item
ORDER BY s.packed
""",
    """
CREATE OR REPLACE MACRO items_with_codes(prefix_codes) AS TABLE
WITH layout AS (
    SELECT pack_bits AS bits, len(level_sizes) AS m,
           pack_bits * (len(level_sizes) - len(prefix_codes)) AS shift
    FROM current_codebook
    WHERE len(prefix_codes) <= len(level_sizes)
      AND coalesce(list_min(prefix_codes), 0) >= 0
      AND coalesce(list_max(prefix_codes), 0) < (1 << pack_bits)
), bounds AS (
    SELECT coalesce(list_sum(list_transform(prefix_codes,
               lambda c, i: c::BIGINT << (bits * (m - i)))), 0)::BIGINT AS lo, shift
    FROM layout
)
SELECT s.*
FROM current_semantic_ids s, bounds b
WHERE s.packed BETWEEN b.lo AND b.lo | ((1::HUGEINT << b.shift) - 1)::BIGINT
ORDER BY s.packed
""",
    """
CREATE OR REPLACE MACRO items_with_prefix(prefix_sid) AS TABLE
SELECT * FROM current_semantic_ids
WHERE starts_with(sid, prefix_sid)
ORDER BY packed
""",
)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Rename the columns of an older database (:data:`RENAMED_COLUMNS`), create the
    tables if missing and (re-)create the views and macros."""
    _rename_columns(con)
    for ddl in (
        ITEMS_TABLE_DDL,
        CODEBOOKS_DDL,
        SEMANTIC_IDS_DDL,
        SEMANTIC_IDS_ITEM_INDEX_DDL,
        SEMANTIC_ID_VERSIONS_DDL,
        EVAL_RESULTS_DDL,
        *_ADDED_COLUMNS,
        *VIEWS_AND_MACROS_SQL,
    ):
        con.execute(ddl)
